"""Shared fixtures: tiny random-init models and tokenizers built offline, and the gpu marker."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption(  # tests/ui/test_ui_browser.py: docs/ui/*.png are made with --ui-screenshots docs/ui
        "--ui-screenshots", default=None, metavar="DIR", help="keep the UI browser test's screenshots in DIR"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: extra torch threads only add contention on a small shared machine (8x slower seen here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from lorafuse.model.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama folder (config.json, model.safetensors, tokenizer files), fp32 weights."""
    from lorafuse.model.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", tokenizer=tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Qwen2 folder (the generic, non-Llama path; Qwen2 has q/k/v biases)."""
    from lorafuse.model.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    build_tiny_model("qwen2", tokenizer=tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
