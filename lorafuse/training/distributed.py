"""Data parallelism over the processes torchrun starts: one process ("rank") per GPU, the same config on 1 or N.

    torchrun --nproc_per_node N -m lorafuse train CONFIG

What a rank does. It loads the whole model onto its own device (cuda:LOCAL_RANK; with QLoRA each rank quantizes
its own copy: LoRA-sized models fit one card, and nothing but the adapter's gradients ever crosses ranks), trains
the same LoRA tensors, and reads its shard of every epoch: micro-batch k of rank r is global micro-batch k*N + r
(`Batcher(num_shards=N, shard=r)`, which drops the < N global micro-batches of the epoch's tail so every rank runs
the same steps). Rank 0 alone writes the output folder (lock, checkpoints, metrics, plots, adapter, summary) and
prints; the other ranks wait at a barrier after each save. A single process (no WORLD_SIZE, or 1) never touches
torch.distributed: every collective below returns its input unchanged when `size == 1`.

The step (token-normalised over the whole job). On N ranks, each with micro-batch B and accumulation A, step s
sees the N*A micro-batches of its window across ranks and minimises

    loss_s = sum_{all N*A micro-batches b} sum_{targets t in b} -log p(y_t) / N_s,   N_s = GLOBAL target count

(for SFT; a preference objective normalises by the pairs instead: N_s is the global count of the objective's
units). Each rank counts its window's units, targets and input tokens; one all-reduce (three int64) gives the
global counts before the first forward; each micro-batch backpropagates loss_sum_b / N_s; after the window, ONE
all-reduce SUM of the flattened fp32 trainable gradients (plus the window's loss and metric sums and a
has-gradient flag per tensor) leaves on every rank exactly
d loss_s / d theta. That is the update 1 rank computes with micro-batch B and accumulation N*A over the same
micro-batches; only the order of the fp32 additions differs (tests/integration/test_ddp.py bounds the gap).
The all-reduced gradients are bitwise identical on every rank, so clipping, the NaN/overflow decision and the
optimizer step agree and the replicas never drift; rank 0's trainable tensors are broadcast once at the start.

Why an explicit all-reduce and not torch.nn.parallel.DistributedDataParallel:
  * accumulation: there is nothing to disable on non-final micro-steps (DDP needs `no_sync()` around them);
  * gradient checkpointing: DDP's autograd hooks fire again on recompute ("Expected to mark a variable ready
    only once", peft#313) unless the graph is declared static; here no hook exists, any checkpointing works;
  * the model stays unwrapped: `model.base_model`, the output head, the fast-path module swap and save_adapter
    see the same object as on one GPU;
  * cost: LoRA gradients are 10-200 MB, one bucket; DDP's overlap of communication with backward would hide
    ~1-10 ms of NVLink/PCIe time in a step of seconds. Buckets are capped at 2^25 elements (128 MiB of fp32)
    so the flat copy stays bounded for very large adapters.

Evaluation: each rank takes every N-th validation batch (k % N == r; nothing dropped: there is no per-batch
collective, so ranks may hold different counts), then one all-reduce (float64) of (loss sum, metric sums, unit count).

Resume: all ranks read the same checkpoint. Each rank's RNG state is gathered to rank 0 and saved in `rng.pt`
("per_rank"); rank r restores its own. Dropout draws from seed + rank, so ranks drop different units. A checkpoint
written by N processes resumes only on N (the data position and RNG streams are per rank).

Backends: NCCL on CUDA (each rank bound to cuda:LOCAL_RANK), gloo on CPU (CI tests it). NVLink multicast (NVLS)
settings are left to NCCL's defaults.
"""

from __future__ import annotations

import itertools
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch

from lorafuse.errors import LorafuseError

BUCKET_ELEMENTS = 1 << 25  # fp32 elements per gradient all-reduce (128 MiB)
# Rank 0 tokenizes (and may download) while the others wait at a barrier: longer than NCCL's 10 min default.
_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank (0..size-1), size, local_rank, and the device it trains on."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --------------------------------------------------------------------------------- control
    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def console(self, console):
        """The console on rank 0; a silent one elsewhere (progress and notes print once)."""
        if self.is_main:
            return console
        from rich.console import Console

        return Console(quiet=True)

    def describe(self, tc) -> str:
        """One line for the run log: how many processes and what one optimizer step covers."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        per_step = self.size * tc.micro_batch_size * tc.grad_accum
        return (
            f"data parallel: {self.size} processes ({backend}) x micro_batch_size {tc.micro_batch_size} x "
            f"grad_accum {tc.grad_accum} = {per_step} rows per optimizer step"
        )

    def main_only(self, context):
        """`context` (e.g. the output folder's lock) on rank 0, nothing elsewhere."""
        return context if self.is_main else nullcontext()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the body first (it tokenizes and writes the data cache), then the others (they read it).
        A LorafuseError in rank 0's body is raised on every rank."""
        if self.size == 1:
            yield
        elif not self.is_main:
            self._receive()
            yield
        else:
            with self._reporting():
                yield
            self._send(("ok", None))

    def decide(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on rank 0 only; its result, or the LorafuseError it raised, reaches every rank."""
        if self.size == 1:
            return fn(*args, **kwargs)
        if not self.is_main:
            return self._receive()
        with self._reporting():
            result = fn(*args, **kwargs)
        self._send(("ok", result))
        return result

    @contextmanager
    def _reporting(self):
        """On rank 0: an exception in the body is announced to the waiting ranks, then raised here."""
        try:
            yield
        except LorafuseError as exc:
            self._send(("error", type(exc), exc.problem, exc.fix))
            raise
        except BaseException:
            self._send(("crash",))
            raise

    def _send(self, outcome: tuple) -> None:
        torch.distributed.broadcast_object_list([outcome], src=0)

    def _receive(self):
        box = [None]
        torch.distributed.broadcast_object_list(box, src=0)
        kind, *rest = box[0]
        if kind == "error":  # the same user-facing error as rank 0 (the CLI prints it, exit status 2)
            raise rest[0](rest[1], rest[2])
        if kind == "crash":
            raise RuntimeError("rank 0 failed; its traceback is printed above")
        return rest[0]

    # --------------------------------------------------------------------------------- collectives
    def all_reduce_sum(self, values: list, dtype: torch.dtype = torch.int64) -> list:
        """Element-wise sum over the ranks of a short list of numbers."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=dtype, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (e.g. a stop signal reached only some ranks)."""
        return flag if self.size == 1 else bool(self.all_reduce_sum([int(flag)])[0])

    def stride(self, iterable):
        """Every size-th item, starting at this rank's index (evaluation shards)."""
        return iterable if self.size == 1 else itertools.islice(iterable, self.rank, None, self.size)

    def sync_gradients(self, params: list, sums: torch.Tensor) -> torch.Tensor:
        """Sum the trainable gradients and the window's sums (a 1-D tensor: the loss sum, then each metric's) over
        the ranks (module docstring); returns the summed sums, on the device (one process: `sums` itself).

        A tensor whose gradient is None on every rank keeps None (the optimizer then skips it, as it does in one
        process); one with a gradient on some rank gets the sum, zeros counted for the others. Reading those flags
        is the one host synchronisation here (several processes only).
        """
        if self.size == 1:
            return sums
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        k = sums.numel()
        head = torch.cat([sums.detach().reshape(-1).float().to(self.device), has])
        for i, group in enumerate(_buckets(params)):
            parts = [head] if i == 0 else []
            parts += [
                p.grad.reshape(-1).float()
                if p.grad is not None
                else torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                for p in group
            ]
            flat = torch.cat(parts)
            torch.distributed.all_reduce(flat)
            if i == 0:
                head, flat = flat[: head.numel()], flat[head.numel() :]
            for p, g in zip(group, flat.split([p.numel() for p in group])):
                if p.grad is None:
                    p.grad = g.view_as(p).to(p.dtype, copy=True)
                else:
                    p.grad.copy_(g.view_as(p))
        for p, flag in zip(params, head[k:].tolist()):
            if flag == 0:
                p.grad = None
        return head[:k]

    @torch.no_grad()
    def broadcast_params(self, params: list) -> None:
        """Rank 0's values for `params` on every rank (the replicas start equal whatever each rank's init did)."""
        if self.size == 1:
            return
        for group in _buckets(params):
            flat = torch.cat([p.detach().reshape(-1).float() for p in group])
            torch.distributed.broadcast(flat, src=0)
            for p, v in zip(group, flat.split([p.numel() for p in group])):
                p.copy_(v.view_as(p))

    # --------------------------------------------------------------------------------- checkpoints
    def gather_rng(self) -> list[dict] | None:
        """Every rank's RNG state, in rank order, on rank 0 (None elsewhere). All ranks must call it."""
        from lorafuse.training.rng import rng_state

        state = rng_state()
        if self.size == 1:
            return [state]
        states = [None] * self.size
        torch.distributed.all_gather_object(states, state)
        return states if self.is_main else None

    def own_rng(self, saved: dict) -> dict:
        """This rank's RNG state from a checkpoint's rng.pt."""
        return saved["per_rank"][self.rank] if "per_rank" in saved else saved

    def check_resume(self, trainer_state: dict, folder) -> None:
        """A checkpoint resumes only on as many processes as wrote it (data position and RNG are per rank)."""
        was = int(trainer_state.get("world_size", 1))
        if was != self.size:
            raise LorafuseError(
                f"{folder} was trained by {was} process(es) (GPUs), this run has {self.size}: the data shards "
                "and random streams of a checkpoint belong to its number of processes",
                f"resume with the same number of processes (torchrun --nproc_per_node {was}, or no torchrun "
                "for 1), or start over with --no-resume",
            )


def _buckets(params: list) -> list[list]:
    """Consecutive groups of params with at most BUCKET_ELEMENTS elements each (a larger tensor is alone)."""
    groups, size = [[]], 0
    for p in params:
        if groups[-1] and size + p.numel() > BUCKET_ELEMENTS:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel()
    return groups


SINGLE = World()


@contextmanager
def launch(device: torch.device):
    """The World of this process. Under torchrun (WORLD_SIZE > 1) it initialises the process group (NCCL on
    CUDA, bound to cuda:LOCAL_RANK; gloo on CPU) unless the caller already did, and destroys the one it created
    when the body ends without an error (after an error torchrun stops every rank anyway)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield World(device=device)
        return
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _rank_device(device, local)
    if dist.is_initialized():  # the Python API inside the user's own torchrun script: their group, their exit
        yield World(dist.get_rank(), dist.get_world_size(), local, device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=_TIMEOUT)
    yield World(dist.get_rank(), dist.get_world_size(), local, device)
    dist.destroy_process_group()


def _rank_device(device: torch.device, local: int) -> torch.device:
    """cuda -> cuda:LOCAL_RANK (checked); cpu stays cpu."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local >= count:
        raise LorafuseError(
            f"this is local rank {local} but the machine shows {count} GPU(s)",
            "start at most one process per GPU: torchrun --nproc_per_node <number of GPUs>",
        )
    if device.index is not None and device.index != local:
        raise LorafuseError(
            f"the model is on {device} but this process is local rank {local}: under torchrun each process "
            "trains on its own GPU",
            "load it on the rank's GPU: lorafuse.load_model(..., device=f\"cuda:{os.environ['LOCAL_RANK']}\")",
        )
    return torch.device("cuda", local)
