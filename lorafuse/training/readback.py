"""Device values read on the host later, without stalling the GPU, and updates that a device-side flag can cancel.

Why: `tensor.item()`, `.tolist()` or `float(tensor)` of a CUDA tensor waits until the GPU has run everything queued
so far. While it waits the host queues nothing, so the GPU goes idle after the last kernel and stays idle for all the
host does next (logging, the next micro-batch, the next launches). A `Readback` instead queues a copy of the values
into pinned host memory right behind the kernels that make them, with an event after the copy; `get()` later waits for
that event only. Work queued after it (the next step) keeps the GPU busy meanwhile. On the CPU nothing runs ahead:
the values are kept as they are.

`kept_unless(apply, tensors)` makes an in-place update conditional on a 0-dim bool device tensor without reading it:
the tensors are copied before the update and `torch.where(apply, updated, copy)` is written back after it, so an
applied update is bit for bit the unconditional one and a cancelled one leaves every bit as it was.

`StepClock` says when the device finished a point of the queued work, on the host's clock: a timed CUDA event
recorded there, read against one recorded (and waited for) when the clock was made; on the CPU, where nothing runs
ahead, the host's clock when the point was reached. A loop that reads a step's numbers one step late still logs when
that step ended, not when the host got around to reading it.

`CancelledSteps` keeps an optimizer's per-parameter step counters (host numbers: AdamW's bias correction
1 - b^t is computed on the host from them) exact without reading the flag at once: a flagged step advances them, and
the optimizer's next step (or its state_dict) reads the flag, by then long computed, and takes the advance back if the
step was cancelled. The counters used by any update are therefore those of an optimizer that never ran the
cancelled steps.
"""

from __future__ import annotations

import contextlib
import time

import torch


class Readback:
    """A snapshot of `values` (any shape, any device) for the host, read with `get()` when needed."""

    def __init__(self, values: torch.Tensor):
        values = values.detach()
        self._done: torch.cuda.Event | None = None
        if values.is_cuda:
            # Pinned memory: the copy runs on the stream without the host waiting for it; the caching host allocator
            # keeps the block until the copy has run.
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = values.clone()

    def get(self) -> list:
        """The values as Python numbers (`tolist()`), once the GPU has made them."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        return self._host.tolist()


class StepClock:
    """`mark()` a point in the work queued on `device`; `seconds(mark)`: when the device passed it, in
    time.perf_counter() seconds (waits for it)."""

    def __init__(self, device: torch.device):
        self._ref: torch.cuda.Event | None = None
        if device.type == "cuda":
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record()
            self._ref.synchronize()
        self._t0 = time.perf_counter()

    def mark(self):
        if self._ref is None:
            return time.perf_counter()
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        return done

    def seconds(self, mark) -> float:
        if self._ref is None:
            return mark
        mark.synchronize()
        return self._t0 + self._ref.elapsed_time(mark) / 1000


@contextlib.contextmanager
def kept_unless(apply: torch.Tensor | None, tensors: list[torch.Tensor]):
    """The in-place update in the block takes effect only where `apply` (0-dim bool, on the tensors' device) is True;
    `apply` None: unconditionally, nothing copied."""
    if apply is None:
        yield
        return
    saved = [t.clone() for t in tensors]
    yield
    for t, old in zip(tensors, saved):
        t.copy_(torch.where(apply, t, old))


class CancelledSteps:
    """The step counters an optimizer advanced for a flagged step, taken back if the flag turns out False."""

    def __init__(self):
        self._flag: Readback | None = None
        self._states: list[dict] = []

    def record(self, apply: torch.Tensor, states: list[dict]) -> None:
        """`states` (optimizer state dicts with a "step" counter) were advanced by a step flagged `apply`."""
        self.settle()
        self._flag, self._states = Readback(apply), states

    def settle(self) -> None:
        """Read the last flag (waits for the device only if it has not computed it yet) and undo a cancelled step."""
        if self._flag is None:
            return
        applied = bool(self._flag.get())
        if not applied:
            for state in self._states:
                state["step"] -= 1
        self._flag, self._states = None, []

    def forget(self) -> None:
        """Drop the record (the states it names were replaced, e.g. by load_state_dict)."""
        self._flag, self._states = None, []
