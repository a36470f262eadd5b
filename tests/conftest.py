"""Shared fixtures: tiny random-init models and tokenizers built offline, and the gpu marker."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the kernel tests run Triton's CPU interpreter, which must be chosen before lorafuse.kernels is imported.
# Interpreter rules: tiny shapes (numpy runs every program), fp32/fp16 only (the interpreter's bf16 `tl.dot` and bf16
# casts are wrong); bf16 and real shapes are the `gpu`-marked tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lorafuse.kernels import _runtime  # noqa: E402  (after the env var, on purpose)

_KERNEL_DIRS = {"kernels", "accel"}


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


@pytest.fixture(autouse=True)
def _kernels_on_cpu(request):
    """Send CPU tensors to the interpreted kernels for the duration of each test under tests/kernels and tests/accel
    (the Triton kernels, and the model surgery that calls them)."""
    if not _KERNEL_DIRS.intersection(request.node.path.parts) or torch.cuda.is_available() or not _runtime.INTERPRET:
        yield
        return
    with _runtime.cpu_kernels():
        yield


@pytest.fixture
def device():
    """Where the small parity tests run: the GPU if present, else the interpreter on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not (_runtime.HAS_TRITON and _runtime.INTERPRET):
        pytest.skip(
            "lorafuse.kernels was imported before TRITON_INTERPRET=1; set TRITON_INTERPRET=1 before importing it"
        )
    return torch.device("cpu")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error ||got - want|| / ||want|| in fp64 (Frobenius)."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.fixture
def parity():
    """The DESIGN rule 2 assertion, as a fixture (test modules here are not a package)."""
    return assert_close_to_oracle


def assert_close_to_oracle(
    name: str,
    kernel: torch.Tensor,
    ref_same_dtype: torch.Tensor,
    oracle: torch.Tensor,
    factor: float = 2.0,
    floor: float | None = None,
) -> None:
    """DESIGN rule 2: the kernel's error vs the fp32 oracle is at most `factor` times the error of the
    reference computed in the kernel's dtype. `floor` is the dtype's unit roundoff scale, used only when
    the same-dtype reference is exact (e.g. fp32 vs fp32), so a bit-identical reference cannot demand
    a bit-identical kernel."""
    e_kernel = rel_err(kernel, oracle)
    e_ref = rel_err(ref_same_dtype, oracle)
    bound = factor * max(e_ref, floor if floor is not None else _eps(kernel.dtype))
    assert e_kernel <= bound, f"{name}: kernel err {e_kernel:.3e} > {factor} x ref err {e_ref:.3e} (bound {bound:.3e})"


def _eps(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 1e-6)
