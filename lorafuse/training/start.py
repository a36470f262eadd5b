"""Where a run starts: train.auto_fit, the checkpoint to resume from, and the config check against it.

`start_point(cfg, out, resume, force, console)` (rank 0, inside the run's lock):
    stale `checkpoint-N.tmp-<pid>` folders of crashed runs are removed, then `resume` says where to start:
        "auto"  -> the newest intact checkpoint in output.dir, if any (damaged newer ones are moved to
                   `archive-<date>-<time>/`, with one line saying which and why);
        <path>  -> that checkpoint, or a run folder's newest (newer checkpoints of the abandoned timeline are
                   archived);
        None    -> start over: an earlier run's checkpoints and files are MOVED to `<output.dir>/archive-<date>-<time>/`
                   (never deleted, never mixed with the new run; only what a run writes moves, a file the user put
                   there stays).
    A checkpoint trained under a different config (config_diff: the math changed, not just the cadence or the run
    length) is refused with the differing keys, unless force=True.

`auto_fit(cfg, out, resume, console)` runs before that check: with train.auto_fit it applies the planner's fastest
setting that fits the visible GPU (micro_batch_size with grad_accum keeping the effective batch, gradient
checkpointing, max_length only when nothing else fits) and prints it. config.yaml (the run's and every checkpoint's)
holds the fitted values, so the check compares fitted with fitted. Resuming an auto-fitted run keeps the
checkpoint's micro_batch_size, grad_accum and checkpointing when the config asks for the same effective batch (they
do not change the math, and the data position is counted in micro-batches), so a resumed run reaches the same values
on another GPU or with other free memory; max_length is fitted afresh, so a different cut is reported by the check.
No GPU: one line, nothing changes. An out-of-memory error during training is the loop's (lorafuse.training.oom),
with or without auto_fit.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafuse.config import config_diff, flatten, load_config
from lorafuse.errors import LorafuseError
from lorafuse.plan import apply_overrides, plan, speed, suggest
from lorafuse.plan.memory import GIB
from lorafuse.training import checkpoint as ckpt

FIT_KEYS = ("train.micro_batch_size", "train.grad_accum", "train.gradient_checkpointing", "data.max_length")


def auto_fit(cfg, out: Path, resume, console):
    """train.auto_fit: `cfg` with the planner's fastest setting that fits the visible GPU (module docstring)."""
    if not cfg.train.auto_fit:
        return cfg
    if cfg.train.device == "cpu" or speed.detect_gpu() is None:
        console.print("auto_fit: no CUDA GPU to fit the run to; training with the config as written")
        return cfg
    over = suggest(cfg, gpu_memory=None)
    kept = _fitted_setting(cfg, out, resume)
    if kept is not None:  # resume: the checkpoint's micro-batches (see the module docstring)
        over = {**{k: v for k, v in over.items() if k == "data.max_length"}, **kept}
    fitted = apply_overrides(cfg, over)
    p = plan(fitted)
    was, now = flatten(cfg), flatten(fitted)
    changes = ", ".join(f"{k} {json.dumps(was[k])} -> {json.dumps(now[k])}" for k in FIT_KEYS if was[k] != now[k])
    where = f"predicted peak {p.estimate.peak / GIB:.1f} GiB of {p.budget / GIB:.1f} GiB" + (
        ", micro-batches kept from the checkpoint" if kept is not None else ""
    )
    console.print(
        f"auto_fit: {changes or 'the config already is the fastest setting that fits'} ({where})",
        highlight=False,
        markup=False,
    )
    return fitted


def _fitted_setting(cfg, out: Path, resume) -> dict | None:
    """The micro-batch setting of the auto-fitted checkpoint a resume would continue, if it asks for the same
    effective batch; else None (a fresh start, or a changed request the resume check will report)."""
    if resume is None:
        return None
    folder = ckpt.latest_checkpoint(out) if resume == "auto" else _explicit_checkpoint(Path(resume))
    if folder is None or not (folder / "config.yaml").is_file():
        return None
    saved, tc = load_config(folder / "config.yaml").train, cfg.train
    if not saved.auto_fit or saved.micro_batch_size * saved.grad_accum != tc.micro_batch_size * tc.grad_accum:
        return None
    return {
        "train.micro_batch_size": saved.micro_batch_size,
        "train.grad_accum": saved.grad_accum,
        "train.gradient_checkpointing": saved.gradient_checkpointing,
    }


def start_point(cfg, out: Path, resume, force: bool, console) -> Path | None:
    """Rank 0's setup of the run folder: stale tmp folders removed, then the checkpoint to resume from."""
    ckpt.clean_stale_tmp(out)
    return resolve_resume(cfg, out, resume, force, console)


def resolve_resume(cfg, out: Path, resume, force: bool, console) -> Path | None:
    """The checkpoint to resume from (None: fresh start), after the config check; see module docstring."""
    if resume is None or (resume == "auto" and not ckpt.checkpoint_folders(out)):
        archived = ckpt.archive_previous(out)  # with "auto": files of a run that stopped before its first checkpoint
        if archived is not None:
            names = ", ".join(sorted(p.name for p in archived.iterdir()))
            console.print(
                f"starting over: the earlier run's {names} moved to {archived}", highlight=False, soft_wrap=True
            )
        return None
    if resume == "auto":
        folder = _newest_intact(out, console)
    else:
        folder = _explicit_checkpoint(Path(resume))
        newer = ckpt.archive_newer(out, _step_of(folder)) if folder.parent.resolve() == out.resolve() else None
        if newer is not None:
            console.print(f"checkpoints newer than {folder.name} were moved to {newer}")
    _check_config(cfg, folder, force, console)
    console.print(f"resuming from {folder}")
    return folder


def _newest_intact(out: Path, console) -> Path:
    """The newest intact checkpoint; damaged newer ones are moved aside, in one line saying which and why."""
    folder, damaged = ckpt.newest_intact(out)
    if not damaged:
        return folder
    why = "; ".join(f"{f.name}: {reason}" for f, reason in damaged)
    if folder is None:
        raise LorafuseError(
            f"no intact checkpoint in {out} to resume from ({why})",
            "start over with --no-resume (the damaged checkpoints are moved to an archive folder, not deleted)",
        )
    moved = ckpt.archive_newer(out, _step_of(folder))
    console.print(
        f"{why}; resuming from {folder.name}, the newest intact checkpoint (damaged ones moved to {moved})",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    return folder


def _explicit_checkpoint(path: Path) -> Path:
    if path.is_dir() and not (path / "trainer_state.json").exists():
        latest = ckpt.latest_checkpoint(path)  # a run folder was given: its newest intact checkpoint
        if latest is not None:
            return latest
    if not (path / "trainer_state.json").is_file():
        raise LorafuseError(
            f"{path} is not a complete lorafuse checkpoint (no trainer_state.json)",
            "pass a checkpoint-N folder of an earlier run, or resume=auto / --no-resume",
        )
    why = ckpt.verify(path)
    if why is not None:
        raise ckpt.damaged_error(path, why)
    return path


def _step_of(folder: Path) -> int:
    return json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["step"]


def _check_config(cfg, folder: Path, force: bool, console) -> None:
    saved_path = folder / "config.yaml"
    if not saved_path.is_file():
        return
    diff = config_diff(load_config(saved_path), cfg)
    if not diff:
        return
    lines = "\n".join(f"    {line}" for line in diff)
    if not force:
        raise LorafuseError(
            f"the config differs from the one {folder.name} was trained with (saved -> now):\n{lines}",
            "run with the original values, pass --force (force=True) to resume with the new ones from this "
            "point on, or --no-resume to start over (the earlier run is archived, not deleted)",
        )
    console.print(f"[yellow]resuming under a changed config (--force):[/yellow]\n{lines}")
