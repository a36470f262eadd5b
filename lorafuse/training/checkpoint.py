"""The run folder: atomic checkpoints, rotation, the best pointer, resume discovery, archive, lock.

Layout of `<output.dir>`:

    checkpoint-<step>/          a complete checkpoint (a folder with this exact name is always complete)
        adapter/                PEFT-format adapter (lorafuse.artifacts.adapter_io.save_adapter): usable as is
        trainable.safetensors   every trainable tensor, bit-exact, keyed by the model's parameter names
        optimizer.pt            optimizer state_dict + GradScaler state (torch.load(weights_only=True) safe)
        rng.pt                  python / numpy / torch CPU / CUDA RNG states (+ "per_rank": each rank's, under torchrun)
        trainer_state.json      step, data position (epoch, micro-batch in epoch), tokens, best eval, the data's
                                sha256, ...
        config.yaml             the resolved RunConfig (when the run has one)
        metrics.jsonl           the metric rows up to this step (the resume rewrites <dir>/metrics.jsonl from it)
        reference_logps.safetensors  DPO's precomputed reference log-probs ("train", "val": one per data set row),
                                when train.dpo_reference=precomputed: a resume reads them instead of recomputing
        manifest.json           every other file's size and sha256, written last (lorafuse.training.manifest)
    checkpoint-<step>.tmp-<pid>/  a checkpoint being written by process <pid> (removed at the next start;
                                .old-<pid> / .del-<pid>: one being replaced / deleted)
    best.json                   {"step", "eval_loss", "checkpoint"}: the best evaluation so far
    .lock                       flock held by the running process: two runs never write one folder
    .lorafuse                   the marker that makes this a lorafuse run folder (lorafuse.outputs)
    archive-<date>-<time>/      an earlier run's files (start over), or checkpoints set aside (corrupt, or newer
                                than the one resumed, or written from weights that then gave NaN losses)

Atomicity: everything is written into `checkpoint-<step>.tmp-<pid>`, each file and folder is fsynced, then
one `os.rename` gives the final name and the parent folder is fsynced. A crash (SIGKILL, power loss) before
the rename leaves only the tmp folder; after it, a complete checkpoint. `trainable.safetensors` duplicates the
adapter's tensors on purpose: the adapter is the user-facing PEFT file, while resume needs every trainable
tensor (including ones a PEFT adapter does not name) bit for bit, independent of adapter_io's key mapping.

Trust: a checkpoint is verified against its manifest before it is loaded or kept as the best one; the resume takes
the newest intact checkpoint and sets the damaged newer ones aside (`newest_intact`), saying which and why. A
checkpoint is never written from non-finite trainable weights: the save stops the run instead, naming the last
checkpoint with finite weights.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from lorafuse.atomic import fsync_path, fsync_tree, normal_file_modes, process_running, write_atomic
from lorafuse.errors import LorafuseError
from lorafuse.io_errors import io_errno, save_torch
from lorafuse.outputs import CHECKPOINT_RE, RUN_FILES
from lorafuse.training import rng
from lorafuse.training.manifest import STATE_FILES, verify, write_manifest
from lorafuse.training.optim import check_group_rates

REFERENCE_FILE = "reference_logps.safetensors"  # DPO's precomputed reference, in checkpoints and the run folder
TMP_RE = re.compile(r"^checkpoint-(\d+)\.(?:tmp|old|del)-(\d+)$")  # being written / replaced / deleted


class RunLock:
    """An exclusive flock on `<dir>/.lock` for the whole run (no-op where fcntl does not exist)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self._fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; a second run is the user's responsibility
            return self
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(self._fd, 32).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise LorafuseError(
                f"another lorafuse run (pid {other}) is writing to {self.path.parent}",
                "wait for it to finish, stop it, or choose another output.dir",
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


# ----------------------------------------------------------------------------------------- discovery


def checkpoint_folders(out_dir: Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-N/` folder (intact or not) as (step, folder), oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), c) for c in out_dir.iterdir() if (m := CHECKPOINT_RE.match(c.name)) and c.is_dir()]
    return sorted(found)


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints holding every state file as (step, folder), oldest first (rotation counts these)."""
    return [(s, c) for s, c in checkpoint_folders(out_dir) if all((c / f).is_file() for f in STATE_FILES)]


def newest_intact(out_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that passes `verify`, or None; [(newer damaged folder, why), ...] newest first)."""
    damaged = []
    for _, folder in reversed(checkpoint_folders(out_dir)):
        why = verify(folder)
        if why is None:
            return folder, damaged
        damaged.append((folder, why))
    return None, damaged


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest intact checkpoint (the one a resume continues), or None."""
    return newest_intact(out_dir)[0]


def _pid_alive(pid: int) -> bool:
    # our own pid: leftovers from a failed save in this process
    return pid != os.getpid() and process_running(pid)


def clean_stale_tmp(out_dir: Path) -> list[Path]:
    """Remove `checkpoint-N.tmp-<pid>` folders left by processes that no longer run."""
    removed = []
    if Path(out_dir).is_dir():
        for child in Path(out_dir).iterdir():
            m = TMP_RE.match(child.name)
            if m and not _pid_alive(int(m.group(2))):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def archive_previous(out_dir: Path) -> Path | None:
    """Move an earlier run's checkpoints and files into `<dir>/archive-<date>-<time>/` (start-over mode).
    Only what a run writes moves (checkpoint-N/ and RUN_FILES); anything else in the folder stays where it is."""
    out_dir = Path(out_dir)
    old = [c for _, c in checkpoint_folders(out_dir)] + [out_dir / n for n in RUN_FILES if (out_dir / n).exists()]
    return _archive(out_dir, old)


def archive_newer(out_dir: Path, step: int) -> Path | None:
    """Move checkpoints after `step` away (resuming an older checkpoint abandons their timeline)."""
    return _archive(Path(out_dir), [c for s, c in checkpoint_folders(out_dir) if s > step])


def _archive(out_dir: Path, old: list[Path]) -> Path | None:
    if not old:
        return None
    base = time.strftime("archive-%Y%m%d-%H%M%S")
    target, suffix = out_dir / base, 1
    while target.exists():
        target, suffix = out_dir / f"{base}-{suffix}", suffix + 1
    target.mkdir()
    for item in old:
        os.rename(item, target / item.name)
    fsync_path(out_dir)
    return target


# ----------------------------------------------------------------------------------------- save / load


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    out_dir: Path,
    step: int,
    *,
    model,
    optimizer,
    trainer_state: dict,
    scaler=None,
    config=None,
    metrics_jsonl: str = "",
    adapter_writer=None,
    rng_states=None,
    reference_logps: dict | None = None,
) -> Path:
    """Write `<out_dir>/checkpoint-<step>` atomically, manifest last. Disk full -> LorafuseError; the tmp folder is
    removed. Non-finite trainable weights -> LorafuseError naming the last good checkpoint; nothing is written.

    adapter_writer(model, folder) writes the PEFT adapter (None: no adapter folder, e.g. a bare nn.Module).
    rng_states: every rank's RNG state in rank order (several processes: rank 0's keys + "per_rank"); None: this
    process's state. reference_logps: {"train": (rows,), "val": (rows,)} float32 arrays, or None.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tensors = trainable_state(model)
    nonfinite = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if nonfinite:
        raise nonfinite_weights_error(out_dir, step, nonfinite)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f"checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        if adapter_writer is not None:
            adapter_writer(model, tmp / "adapter")
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        save_torch(
            {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None},
            tmp / "optimizer.pt",
        )
        states = rng_states or [rng.rng_state()]
        save_torch(states[0] if len(states) == 1 else {**states[0], "per_rank": states}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        (tmp / "metrics.jsonl").write_text(metrics_jsonl, encoding="utf-8")
        if reference_logps is not None:
            save_file({k: torch.from_numpy(v) for k, v in reference_logps.items()}, str(tmp / REFERENCE_FILE))
        if config is not None:
            from lorafuse.config import save_config

            save_config(config, tmp / "config.yaml")
        write_manifest(tmp, step)
        normal_file_modes(tmp)  # safetensors writes 0600
        fsync_tree(tmp)
        _install(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if io_errno(exc) is not None:  # OSError, or a library's own type carrying one (safetensors, tokenizers)
            raise _write_error(exc, final, out_dir) from exc
        raise
    return final


def _install(tmp: Path, final: Path) -> None:
    """rename tmp -> final; an existing final (same step saved twice) is swapped out first."""
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(final.parent)


def _write_error(exc: BaseException, final: Path, out_dir: Path) -> LorafuseError:
    previous = latest_checkpoint(out_dir)
    kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    if io_errno(exc) in (errno.ENOSPC, errno.EDQUOT):
        return LorafuseError(
            f"the disk is full: could not write {final.name} in {out_dir} ({kept})",
            "free disk space (or lower train.save_total_limit, or move output.dir to a bigger disk), "
            "then run the same command again to resume",
        )
    return LorafuseError(
        f"could not write {final.name} in {out_dir}: {getattr(exc, 'strerror', None) or exc} ({kept})",
        "check the folder's permissions and free space, then run the same command to resume",
    )


def nonfinite_weights_error(out_dir: Path, step: int, names: list[str]) -> LorafuseError:
    """The run stops: weights went NaN/inf; what to resume from after lowering the learning rate."""
    last = latest_checkpoint(out_dir)
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    resume = (
        f"run the same command with --force: it resumes from {last.name}, the last checkpoint with finite weights"
        if last is not None
        else "run the same command again (no checkpoint has finite weights, so it starts over)"
    )
    return LorafuseError(
        f"the trainable weights became NaN/inf by step {step} ({names[0]}{more}): training diverged, and no "
        "checkpoint or adapter was written from them",
        f"lower train.lr (e.g. 10x) or raise train.warmup_steps, then {resume}",
    )


def damaged_error(folder: Path, why: str) -> LorafuseError:
    return LorafuseError(
        f"{folder} is not an intact checkpoint: {why}",
        "resume from another checkpoint-N folder of the run (a plain resume picks the newest intact one), "
        "or start over with --no-resume",
    )


def load_trainable(folder: Path, model) -> None:
    """Copy a checkpoint's trainable tensors (trainable.safetensors) into `model`, bit for bit; the caller has
    verified the folder."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(folder) / "trainable.safetensors"))
    params = dict(model.named_parameters())
    current = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != current:
        missing, extra = sorted(current - set(saved)), sorted(set(saved) - current)
        raise LorafuseError(
            f"{folder} does not match this model's trainable parameters "
            f"(not in the checkpoint: {missing[:3]}; only in the checkpoint: {extra[:3]})",
            "resume with the LoRA settings the checkpoint was trained with, or start over with --no-resume",
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def load_checkpoint(folder: Path, *, model, optimizer, scaler=None) -> dict:
    """Verify `folder` (lorafuse.training.manifest), then restore trainable tensors, optimizer and scaler from it.

    Returns {"trainer_state", "rng", "metrics_jsonl", "reference_logps" (a dict of float32 arrays, or None)}. The
    RNG state is returned, not applied: the loop applies it right before its first step, after everything that
    consumes randomness at setup.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    why = verify(folder)
    if why is not None:
        raise damaged_error(folder, why)
    load_trainable(folder, model)
    blob = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    check_group_rates(blob["optimizer"], optimizer)
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    rng_states = torch.load(folder / "rng.pt", map_location="cpu", weights_only=True)
    reference = folder / REFERENCE_FILE
    return {
        "trainer_state": state,
        "rng": rng_states,
        "metrics_jsonl": (folder / "metrics.jsonl").read_text(encoding="utf-8"),
        "reference_logps": {k: v.numpy() for k, v in load_file(str(reference)).items()}
        if reference.is_file()
        else None,
    }


# ----------------------------------------------------------------------------------------- rotation / best


def data_changed(saved: str | None, now: str | None, folder: Path, force: bool) -> bool:
    """Whether a resume goes on from `folder` on other training data (its sha256 `saved` against `now`): refused with
    a LorafuseError unless forced; True when forced. A checkpoint without the sha256 is not checked."""
    if saved is None or now is None or saved == now:
        return False
    if not force:
        raise LorafuseError(
            f"the training data changed since {Path(folder).name} was saved (the same number of batches, but other "
            "rows or tokens: the data file, its settings or the tokenizer changed)",
            "resume with the data the checkpoint was trained on, pass --force (force=True) to go on with the new "
            "data from this point, or start over with --no-resume",
        )
    return True


def read_best(out_dir: Path) -> dict | None:
    path = Path(out_dir) / "best.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_best(out_dir: Path, step: int, eval_loss: float) -> None:
    write_atomic(
        Path(out_dir) / "best.json",
        json.dumps({"step": step, "eval_loss": eval_loss, "checkpoint": f"checkpoint-{step}"}, indent=1),
    )


def reset_best(out_dir: Path, step: int | None, eval_loss: float | None) -> None:
    """best.json <- (step, eval_loss) when that checkpoint is here and intact, else removed."""
    if step is not None and verify(Path(out_dir) / f"checkpoint-{step}") is None:
        write_best(out_dir, step, eval_loss)
    else:
        (Path(out_dir) / "best.json").unlink(missing_ok=True)


def rotate(out_dir: Path, keep: int) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the newest `keep`, never the best one."""
    best = read_best(out_dir)
    protected = {best["step"]} if best else set()
    found = list_checkpoints(out_dir)
    doomed = [c for s, c in found[:-keep] if s not in protected] if keep > 0 else []
    for folder in doomed:
        # Rename first so a crash mid-delete never leaves a half-deleted folder under a complete name.
        trash = folder.with_name(f"{folder.name}.del-{os.getpid()}")
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed
