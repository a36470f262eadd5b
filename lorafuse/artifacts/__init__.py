"""What a training run leaves behind, in the formats other tools read: GGUF files for llama.cpp / Ollama / LM Studio
(`gguf`, `gguf_arch`, `gguf_vocab`, `gguf_tensors`), an Ollama Modelfile (`ollama`), and `export`, the one entry
point that writes them (or the merged 16-bit folder `lorafuse.artifacts.merge` writes).
"""
