"""What the loop needs from the device and the process: the precision policy and stop signals.

Precision: on CUDA, autocast to the compute dtype (bf16; fp16 with a GradScaler, since fp16 gradients underflow
without loss scaling); nothing on CPU in fp32. Trainable tensors are fp32 masters whatever the compute dtype: a
16-bit master rounds small AdamW steps away, and GradScaler refuses to unscale fp16 gradients.

Signals: SIGTERM/SIGINT set a flag the loop checks after each optimizer step (it then saves and returns); a
second SIGINT raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import signal
import threading
from contextlib import nullcontext

import torch


class Precision:
    """Autocast + GradScaler policy for one compute dtype on one device."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.amp = dtype in (torch.bfloat16, torch.float16)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.amp else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


class StopSignals:
    """SIGTERM/SIGINT set a flag (checked after each step); a second SIGINT raises KeyboardInterrupt."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
