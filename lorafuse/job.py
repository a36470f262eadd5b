"""The training job: `run(cfg)` (what `lorafuse train` calls) and `train(model, tokenizer, data)` (Python API).

run(cfg, resume="auto", force=False, console=None), in order:
    1. output.dir must be a run folder of lorafuse's own (lorafuse.outputs: new, empty, or an earlier run's) and
       writable (checked before anything is loaded), and is locked for the run.
    2. train.auto_fit: the planner's fastest setting that fits the visible GPU (lorafuse.training.start).
    3. inputs checked before any weights are read (preflight.check_inputs: model source, tokenizer, data), and
       before the start point can move an earlier run's files.
    4. the start point: a fresh start or the checkpoint to resume from, checked against the config
       (lorafuse.training.start: what moves where, and when a resume is refused).
    5. device and compute dtype ("auto": bf16 where supported, fp16 on pre-Ampere GPUs, fp32 on CPU; printed),
       seed, load_model, apply_lora (prints the trainable-params line), build_datasets (a cache hit), Batchers.
    6. the loop (lorafuse.training.loop), then `<output.dir>/adapter/` (PEFT format), loss.png, summary.json.
       The run's prompt format (data format, template, system prompt, EOS) goes on the model first, so every adapter
       written (checkpoints too) records it in lorafuse.json. An early stop keeps the best checkpoint's weights (the
       adapter is that evaluation's). The built-in demo ends with its before/after table (lorafuse.demo). A re-run
       of a finished run (stop_reason already_complete) rewrites nothing: it prints "already complete: <summary>" and
       returns the saved summary. On SIGINT/SIGTERM the result has stop_reason "signal" and `exit_code` 130/143 (the
       CLI's).

Under torchrun (WORLD_SIZE > 1) both run as one rank of a data-parallel job (lorafuse.training.distributed): rank 0
does steps 1-4 and every file write and print, the others get its decisions; each rank loads the model onto
cuda:LOCAL_RANK (or the CPU) and trains on its shard of the batches.

train(model, tokenizer, data, output_dir=..., **overrides) is the Python API's flow: the model is already
loaded and LoRA-applied; `data` is a file path or a list of row dicts; overrides are DataConfig/TrainConfig
field names (lr=1e-4, epochs=3, max_length=256, ...). It builds the same RunConfig and runs steps 1, 4,
the dtype and data of 5, and 6 (not auto_fit: the model is already in memory).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorafuse import accel
from lorafuse.artifacts.adapter_io import save_adapter
from lorafuse.config import DataConfig, TrainConfig, save_config, validate_config
from lorafuse.demo import before_after, is_demo
from lorafuse.errors import ConfigError, LorafuseError
from lorafuse.model.inject import apply_lora, print_trainable_parameters
from lorafuse.model.load import load_model, resolve_compute_dtype
from lorafuse.model_state import model_state
from lorafuse.outputs import prepare_run_dir
from lorafuse.run_data import model_and_data
from lorafuse.training import checkpoint as ckpt
from lorafuse.training import reference
from lorafuse.training.distributed import launch
from lorafuse.training.loop import TrainingLoop
from lorafuse.training.metrics import finished_summary, print_summary, summary_line
from lorafuse.training.objectives import build_objective
from lorafuse.training.preflight import check_inputs
from lorafuse.training.rng import seed_everything
from lorafuse.training.start import auto_fit, start_point
from lorafuse.training.trackers import require_trackers


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path | None  # None when the run stopped on a signal (resume to finish)
    stop_reason: str  # finished | early_stopping | signal | already_complete
    steps: int
    total_steps: int
    first_loss: float | None
    last_loss: float | None
    best_eval_loss: float | None
    best_step: int | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    tokens: int
    wall_s: float
    peak_memory_bytes: int
    compute_dtype: str
    demo: dict | None = None  # the built-in demo's held-out answers: exact, total, base_exact, shown (lorafuse.demo)
    stop_signal: str | None = None  # "SIGINT" | "SIGTERM" when stop_reason is "signal"
    speedups: dict = dataclasses.field(default_factory=dict)  # fast_path, fused_loss, cuda_graph_replays: what ran

    @property
    def exit_code(self) -> int:
        """What `lorafuse train` exits with: 0, or 128 + the signal's number after a signal stop (130, 143). A rank
        of a torchrun job that stopped because another rank got the signal reports SIGTERM's."""
        if self.stop_reason != "signal":
            return 0
        return 128 + (signal.Signals[self.stop_signal] if self.stop_signal else signal.SIGTERM).value


def run(cfg, resume: str | None = "auto", force: bool = False, console=None) -> TrainResult:
    """The `lorafuse train` job for a RunConfig (see the module docstring)."""
    require_trackers(cfg.train.report_to)  # a missing tracker package stops the run before the model loads
    with launch(resolve_device(cfg.train.device)) as world:  # torch.distributed only under torchrun
        console = world.console(_console(console))
        out = world.decide(prepare_run_dir, Path(cfg.output.dir))
        with world.main_only(ckpt.RunLock(out)):
            cfg = world.decide(auto_fit, cfg, out, resume, console)  # no-op unless train.auto_fit
            world.decide(check_inputs, cfg, out)  # model source, tokenizer and data checked before any weights
            start_from = world.decide(start_point, cfg, out, resume, force, console)  # may move earlier files
            device = world.device  # cuda:LOCAL_RANK under torchrun
            dtype = _announce_dtype(cfg.model.compute_dtype, device, console)
            seed_everything(cfg.train.seed)  # LoRA init below is a function of the seed
            model, tokenizer = load_model(
                cfg.model.path,
                quant=cfg.model.quant,
                compute_dtype=dtype,
                device=device,
                blocksize=cfg.model.blocksize,
                double_quant=cfg.model.double_quant,
                attn_implementation=cfg.model.attn_implementation,
                trust_remote_code=cfg.model.trust_remote_code,
            )
            lc = cfg.lora
            apply_lora(
                model,
                r=lc.r,
                alpha=lc.alpha,
                dropout=lc.dropout,
                targets=lc.targets,
                rslora=lc.rslora,
                dora=lc.dora,
                modules_to_save=lc.modules_to_save,
                init=lc.init,
            )
            if world.is_main:
                print_trainable_parameters(model)
            return _train(cfg, model, tokenizer, out, start_from, dtype, console, world, force)


def train(
    model,
    tokenizer,
    data,
    *,
    output_dir,
    format: str = "alpaca",
    resume: str | None = "auto",
    force: bool = False,
    console=None,
    **overrides,
) -> TrainResult:
    """Fine-tune an already loaded, LoRA-applied model on `data` (a path or a list of row dicts)."""
    with launch(next(model.parameters()).device) as world:  # torchrun: the model must be on cuda:LOCAL_RANK
        console = world.console(_console(console))
        out = world.decide(prepare_run_dir, Path(output_dir))
        cfg = world.decide(config_for_model, model, data, out, format, overrides)
        if cfg.train.auto_fit:  # the planner sizes a run before its model is loaded; this one already is
            console.print(
                "auto_fit: not applied by lorafuse.train(), which gets a model already in GPU memory; "
                "use `lorafuse train` (lorafuse.job.run) for it. Out-of-memory retries still apply."
            )
        with world.main_only(ckpt.RunLock(out)):
            start_from = world.decide(start_point, cfg, out, resume, force, console)
            dtype = _announce_dtype(cfg.model.compute_dtype, world.device, console)
            return _train(cfg, model, tokenizer, out, start_from, dtype, console, world, force)


# ------------------------------------------------------------------------------------------------ setup


def _console(console):
    from lorafuse.console import make_console

    return console or make_console()


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise LorafuseError(
            "train.device is cuda but PyTorch sees no CUDA GPU",
            "set train.device=auto (or cpu), or install a CUDA build of PyTorch "
            "(`lorafuse env` shows what is installed)",
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _announce_dtype(requested: str, device: torch.device, console) -> torch.dtype:
    """Resolve the compute dtype (ModelError with the fix for bf16 on a GPU without it) and say which."""
    dtype = resolve_compute_dtype(requested, device)
    name = str(dtype).removeprefix("torch.")
    if requested == "auto":
        why = {"cpu": "CPU"}.get(device.type) or (
            "bf16 supported" if dtype == torch.bfloat16 else "this GPU has no bf16: fp16 with loss scaling"
        )
        console.print(f"compute dtype: {name} (auto: {why}) on {device}")
    else:
        console.print(f"compute dtype: {name} on {device}")
    return dtype


def config_for_model(model, data, out: Path, format: str, overrides: dict):
    """A RunConfig describing an already loaded model (its model_state: base and lora) and the given data."""
    base = model_state(model).base
    lora = model_state(model).lora
    if lora is None:
        raise LorafuseError(
            "the model has no LoRA adapter to train",
            "call lorafuse.apply_lora(model, r=16, alpha=32, ...) before lorafuse.train(...)",
        )
    sections = {"data": {}, "train": {}}
    for key, value in overrides.items():
        section = "data" if key in DataConfig.model_fields else "train" if key in TrainConfig.model_fields else None
        if section is None:
            known = list(DataConfig.model_fields) + list(TrainConfig.model_fields)
            near = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(
                f"lorafuse.train() got an unknown setting {key!r}",
                f"did you mean {near[0]!r}?" if near else f"valid settings: {', '.join(known)}",
            )
        sections[section][key] = value
    raw = {
        "model": {
            "path": str(base.get("name_or_path") or getattr(model, "name_or_path", "") or "model"),
            "quant": base.get("quant", "none"),
            "compute_dtype": base.get("compute_dtype", "auto"),
        },
        "lora": {
            k: lora[k]
            for k in ("r", "alpha", "dropout", "rslora", "dora", "modules_to_save", "init")
            if lora.get(k) is not None
        }
        | {"targets": lora["target_modules"]},
        "data": {"path": _data_path(data, out), "format": format, **sections["data"]},
        "train": sections["train"],
        "output": {"dir": str(out)},
    }
    return validate_config(raw, source="lorafuse.train() arguments")


def _data_path(data, out: Path) -> str:
    """A path as given; a list of row dicts is written to <out>/train_rows.jsonl (so resume sees the same file)."""
    if isinstance(data, (str, Path)):
        return str(data)
    rows = list(data)
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise LorafuseError(
            "lorafuse.train() data must be a file path or a non-empty list of row dicts",
            'e.g. [{"instruction": "...", "input": "", "output": "..."}, ...]',
        )
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = out / "train_rows.jsonl"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        ckpt.write_atomic(path, text)
    return str(path)


# ------------------------------------------------------------------------------------------------ the run


def _train(cfg, model, tokenizer, out: Path, start_from, dtype, console, world, force=False) -> TrainResult:
    """The loaded, LoRA-applied model trained on the config's data: the loop, then the run's files (`_finish`)."""
    objective = build_objective(cfg.train)
    train_b, val_b, fingerprint = model_and_data(cfg, model, tokenizer, out, console, world)
    reference.check_start(objective, model, fresh=start_from is None)  # before accel changes the model

    def write_adapter(m, folder):
        save_adapter(m, folder, base_model_name_or_path=cfg.model.path, tokenizer=tokenizer)

    try:  # the loop prepares the model (lorafuse.accel), also when it then stops before the first step
        loop = TrainingLoop(
            model,
            train_b,
            cfg.train,
            val_batches=val_b,
            out_dir=out,
            config=cfg,
            compute_dtype=dtype,
            console=console,
            adapter_writer=write_adapter,
            world=world,
            options=cfg.options(),
            data_fingerprint=fingerprint,
            objective=objective,
        )
        if start_from is not None:
            loop.resume(start_from, force=force)
        loop.reference_logps = reference.precomputed(
            objective,
            model,
            loop.ctx,
            {"train": train_b, "val": val_b},
            loop.reference_logps,
            fresh=start_from is None,
            out=out if world.is_main else None,
            note=loop.note,
        )
        if world.is_main and loop.state.step < loop.total:  # after the resume's checks; a no-op re-run keeps it
            save_config(cfg, out / "config.yaml")
        res = loop.run()
        if res.stop_reason == "early_stopping" and res.best_checkpoint is not None:
            ckpt.load_trainable(res.best_checkpoint, model)  # the adapter is the best evaluation's, as said
            console.print(f"the adapter is {res.best_checkpoint.name}'s (best eval loss {res.state.best_eval:.4f})")
    finally:  # the speed and memory changes are for training: generation afterwards runs the plain modules
        accel.restore(model)
    if res.stop_reason == "already_complete":
        kept = world.decide(finished_summary, out)
        if kept is not None:  # a no-op re-run: the finished run's adapter and summary.json stay as they are
            console.print(f"already complete: {summary_line(kept)}", highlight=False, markup=False, soft_wrap=True)
            return _result_from_summary(kept)
    return _finish(cfg, model, tokenizer, out, res, loop.metrics, dtype, console, world, write_adapter)


def _finish(cfg, model, tokenizer, out: Path, res, metrics, dtype, console, world, write_adapter) -> TrainResult:
    """After the loop: the adapter, loss.png, the demo's before/after table, summary.json and the summary table."""
    adapter_dir = None
    if res.stop_reason != "signal":
        adapter_dir = out / "adapter"
        if world.is_main:
            write_adapter(model, adapter_dir)
            metrics.plot(out / "loss.png")
    demo = None
    if is_demo(cfg) and res.stop_reason != "signal" and world.is_main:
        demo = dataclasses.asdict(before_after(cfg, model, tokenizer, console))
    st = res.state
    result = TrainResult(
        output_dir=out,
        adapter_dir=adapter_dir,
        stop_reason=res.stop_reason,
        steps=st.step,
        total_steps=res.total_steps,
        first_loss=res.first_loss,
        last_loss=res.last_loss,
        best_eval_loss=st.best_eval,
        best_step=st.best_step,
        best_checkpoint=res.best_checkpoint,
        last_checkpoint=res.last_checkpoint,
        tokens=st.tokens,
        wall_s=res.wall_s,
        peak_memory_bytes=res.peak_memory_bytes,
        compute_dtype=str(dtype).removeprefix("torch."),
        demo=demo,
        stop_signal=res.stop_signal,
        speedups=res.speedups,
    )
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    summary.update(
        tokens_per_s=st.tokens / res.wall_s if res.wall_s else 0.0,
        train_seconds=st.train_seconds,
        skipped_steps=st.skipped_steps,
        finished_at=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    if world.is_main:
        ckpt.write_atomic(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
        print_summary(console, summary)
    world.barrier()  # no rank leaves (and tears the process group down) before rank 0's files are written
    return result


def _result_from_summary(summary: dict) -> TrainResult:
    """The TrainResult a finished run's summary.json records, with stop_reason "already_complete"."""
    names = {f.name for f in dataclasses.fields(TrainResult)}
    kept = {k: v for k, v in summary.items() if k in names}
    for key in ("output_dir", "adapter_dir", "best_checkpoint", "last_checkpoint"):
        kept[key] = Path(kept[key]) if kept.get(key) else None
    return TrainResult(**{**kept, "stop_reason": "already_complete"})
