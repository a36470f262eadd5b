"""What a training run leaves behind, in the formats other tools read: the PEFT adapter folder (`adapter_io` writes
it, `adapter_load` reads ours and peft's), the merged 16-bit model (`merge`), GGUF files for llama.cpp / Ollama /
LM Studio (`gguf`, `gguf_arch`, `gguf_vocab`, `gguf_tensors`), an Ollama Modelfile (`ollama`), and `export`, the one
entry point that writes them (or the merged folder `merge` writes).
"""
