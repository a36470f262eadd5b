"""The training loop's checkpoints: what `TrainingLoop.resume` restores and what a save writes (lorafuse.training.loop
describes when each happens). Both take the loop and read or set its state, optimizer, metrics and counters; the
files themselves are lorafuse.training.checkpoint's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lorafuse.errors import LorafuseError
from lorafuse.training import checkpoint as ckpt
from lorafuse.training import oom
from lorafuse.training.state import LoopState


def restore(loop, folder: Path, force: bool = False) -> None:
    """Restore tensors, optimizer, counters, metrics and (at run start) RNG from a checkpoint folder.
    force: go on although the data changed since the checkpoint (same micro-batch count, other rows)."""
    restored = ckpt.load_checkpoint(folder, model=loop.model, optimizer=loop.optimizer, scaler=loop.precision.scaler)
    saved = restored["trainer_state"]
    loop.world.check_resume(saved, folder)
    if saved["micro_per_epoch"] != loop.state.micro_per_epoch:
        raise LorafuseError(
            f"{folder} was trained with {saved['micro_per_epoch']} micro-batches per epoch, the data now "
            f"gives {loop.state.micro_per_epoch}: the data file or its settings changed",
            "resume with the same data, or start over with --no-resume",
        )
    if ckpt.data_changed(saved.get("data_sha256"), loop.data_fingerprint, folder, force):
        loop.note(f"resuming {folder.name} on changed training data (--force)")
    names = set(LoopState.__dataclass_fields__)
    loop.state = LoopState(**{k: v for k, v in saved.items() if k in names})
    loop._rng = loop.world.own_rng(restored["rng"])
    loop.window.load_state_dict(saved.get("log_window", {}))
    loop.metrics.restore(restored["metrics_jsonl"])
    loop.reference_logps = restored["reference_logps"]
    loop.last_checkpoint, loop._saved_step = Path(folder), loop.state.step
    if loop.out_dir is not None and loop.world.is_main:  # the best pointer must match the timeline we continue
        ckpt.reset_best(loop.out_dir, loop.state.best_step, loop.state.best_eval)
    if loop.state.oom_overrides:  # say why the setting is not the config's, and make the model match it
        loop.note(
            f"continuing at {oom.describe(loop.setting())} (lowered after an out-of-memory error earlier in this run)"
        )
        loop._match_setting()


def save(loop, improved: bool) -> None:
    """A checkpoint of the loop's step (once per step: a later call at the same step only updates the best pointer),
    the best pointer when `improved`, rotation and the loss plot on rank 0; every rank waits for rank 0's files."""
    if loop.out_dir is None:
        return
    st, world = loop.state, loop.world
    if loop._saved_step != st.step:
        trainer_state = {
            **dataclasses.asdict(st),
            "total_steps": loop.total,
            "data_sha256": loop.data_fingerprint,
            "schedule": loop.schedule.state_dict(),
            "log_window": loop.window.state_dict(),  # a logged row may span a save
            "world_size": world.size,
        }
        rng = world.gather_rng()  # a collective: every rank's state, on rank 0
        loop.last_checkpoint = (
            ckpt.save_checkpoint(
                loop.out_dir,
                st.step,
                model=loop.model,
                optimizer=loop.optimizer,
                trainer_state=trainer_state,
                scaler=loop.precision.scaler,
                config=loop.config,
                metrics_jsonl=loop.metrics.jsonl(),
                adapter_writer=loop.adapter_writer,
                rng_states=rng,
                reference_logps=loop.reference_logps,
            )
            if world.is_main
            else loop.out_dir / f"checkpoint-{st.step}"
        )
        loop._saved_step = st.step
    if world.is_main:
        if improved:
            ckpt.write_best(loop.out_dir, st.step, st.best_eval)
        ckpt.rotate(loop.out_dir, loop.tc.save_total_limit)
        loop.metrics.plot(loop.out_dir / "loss.png")
    world.barrier()  # the others wait for rank 0's files (a failed save stops the job here)
