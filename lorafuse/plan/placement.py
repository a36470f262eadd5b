"""Where the planner puts things besides the GPU's working set: tables in host memory, a streamed head, layers kept
out of the checkpoints. Predicates on a Workload (plan/workload.py); where the runtime decides the same thing, both call
plan/policy.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorafuse.plan.workload import Workload

from lorafuse.plan.policy import HEAD_AHEAD, HEAD_CHUNK_BYTES, head_streams


def host_embedding(w: Workload) -> bool:
    """Does the input embedding live in host memory (`train.embeddings_on_host`; not when tied to the head, whose
    GEMM reads all of it, and not when it is trained)?"""
    return (
        w.embeddings_on_host
        and w.method != "full"
        and w.shape.head_params > 0
        and "embed_tokens" not in w.modules_to_save
    )


def kept_layers(w: Workload) -> int:
    """Decoder layers that save their activations although checkpointing is on (`train.uncheckpointed_layers`,
    the last ones): each skips its recompute in the backward, for its whole saved set held from its forward on."""
    return 0 if w.checkpointing == "off" else min(w.uncheckpointed, w.shape.num_layers)


def host_head(w: Workload) -> bool:
    """Does the output head wait in host memory between losses (`train.head_on_host`)? Not when tied to the input
    embedding or trained, and only where the loss reads the head's weight itself (chunked or fused loss)."""
    return (
        w.head_on_host
        and w.method != "full"
        and w.shape.head_params > 0
        and w.loss != "full"
        and "lm_head" not in w.modules_to_save
    )


def streamed_head(w: Workload) -> tuple[int, int] | None:
    """(head bytes staged, loss workspace) when the host head streams in vocabulary chunks (accel/host_tables.py
    HeadStage: its fp32 (tokens, hidden) state is smaller than the head), else None. Staged: AHEAD chunks of
    ~32 MiB. Loss (kernels/streamed_head.py): the fp32 state o (4 D n), the gradient (c D n) and, per chunk, one
    fp32 logits block of <= 64 MiB, its 16-bit copy and their (rows, D) product, fp32."""
    D, c, n = w.shape.hidden_size, w.compute_bytes, w.tokens
    head = c * w.shape.head_params
    if not host_head(w) or not head_streams(n, D, head):
        return None
    chunk = max(1, min(w.shape.vocab_size, HEAD_CHUNK_BYTES // (D * c)))
    rows = min(n, max(1, (64 << 20) // (4 * chunk)))
    return min(head, HEAD_AHEAD * chunk * D * c), 4 * D * n + c * D * n + (4 + c) * rows * chunk + 4 * rows * D
