"""The training job: `run(cfg)` (what `lorafuse train` calls) and `train(model, tokenizer, data)` (Python API).

run(cfg, resume="auto"):
    1. output.dir must be a run folder of lorafuse's own (lorafuse.outputs: new, empty, or an earlier run's) and
       writable (checked before anything is loaded), and is locked for the run; stale `checkpoint-N.tmp-<pid>`
       folders from crashed runs are removed.
    2. resume:  "auto"  -> the newest intact checkpoint in output.dir, if any (damaged newer ones are moved to
                           `archive-<date>-<time>/`, with one line saying which and why);
                <path>  -> that checkpoint (newer checkpoints of the abandoned timeline are archived);
                None    -> start over: an earlier run's checkpoints and files are MOVED to
                           `<output.dir>/archive-<date>-<time>/` (never deleted, never mixed with the new run; only
                           what a run writes moves, a file the user put there stays).
       A checkpoint trained under a different config (config_diff: the math changed, not just the cadence
       or the run length) is refused with the differing keys, unless force=True.
       Before that check, train.auto_fit applies the planner's fastest setting that fits the visible GPU
       (`auto_fit`: micro_batch_size with grad_accum keeping the effective batch, gradient checkpointing,
       max_length only when nothing else fits) and prints it. config.yaml (the run's and every checkpoint's)
       holds the fitted values, so the check compares fitted with fitted. Resuming an auto-fitted run keeps
       the checkpoint's micro_batch_size, grad_accum and checkpointing when the config asks for the same
       effective batch (they do not change the math, and the data position is counted in micro-batches), so
       a resumed run reaches the same values on another GPU or with other free memory; max_length is fitted
       afresh, so a different cut is reported by the check. No GPU: one line, nothing changes. An OOM
       during training is handled by the loop (lorafuse.training.oom), with or without auto_fit.
    3. device and compute dtype ("auto": bf16 where supported, fp16 on pre-Ampere GPUs, fp32 on CPU; printed).
    4. inputs checked before any weights are read (preflight.check_inputs: model source, tokenizer, data), then
       seed, load_model, apply_lora (prints the trainable-params line), build_datasets (a cache hit), Batchers.
    5. the loop (lorafuse.training.loop), then `<output.dir>/adapter/` (PEFT format), loss.png, summary.json.
       For the built-in demo model, a generation for one demo prompt is printed at the end. A re-run of a finished
       run (stop_reason already_complete) rewrites nothing: it prints "already complete: <summary>" and returns the
       saved summary. On SIGINT/SIGTERM the result has stop_reason "signal" and `exit_code` 130/143 (the CLI's).

Under torchrun (WORLD_SIZE > 1) both run as one rank of a data-parallel job (lorafuse.training.distributed): rank 0
does steps 1-2 and every file write and print, the others get its decisions; each rank loads the model onto
cuda:LOCAL_RANK (or the CPU) and trains on its shard of the batches.

train(model, tokenizer, data, output_dir=..., **overrides) mirrors the seed's flow: the model is already
loaded and LoRA-applied; `data` is a file path or a list of row dicts; overrides are DataConfig/TrainConfig
field names (lr=1e-4, epochs=3, max_length=256, ...). It builds the same RunConfig and runs the same steps
from 2 on.
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
from lorafuse.errors import ConfigError, LorafuseError
from lorafuse.model.state import model_state
from lorafuse.outputs import prepare_run_dir
from lorafuse.training import checkpoint as ckpt
from lorafuse.training.distributed import launch
from lorafuse.training.loop import TrainingLoop
from lorafuse.training.metrics import finished_summary, print_summary, summary_line
from lorafuse.training.preflight import check_inputs

DEMO_PROMPT = {"instruction": "次の日本語を英語に翻訳してください。", "input": "ありがとうございます。"}


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
    sample: str | None = None  # the demo's generation
    stop_signal: str | None = None  # "SIGINT" | "SIGTERM" when stop_reason is "signal"

    @property
    def exit_code(self) -> int:
        """What `lorafuse train` exits with: 0, or 128 + the signal's number after a signal stop (130, 143). A rank
        of a torchrun job that stopped because another rank got the signal reports SIGTERM's."""
        if self.stop_reason != "signal":
            return 0
        return 128 + (signal.Signals[self.stop_signal] if self.stop_signal else signal.SIGTERM).value


def run(cfg, resume: str | None = "auto", force: bool = False, console=None) -> TrainResult:
    """The `lorafuse train` job for a RunConfig (see the module docstring)."""
    from lorafuse.model.inject import apply_lora, print_trainable_parameters
    from lorafuse.model.load import load_model

    with launch(resolve_device(cfg.train.device)) as world:  # torch.distributed only under torchrun
        console = world.console(_console(console))
        out = world.decide(prepare_run_dir, Path(cfg.output.dir))
        with world.main_only(ckpt.RunLock(out)):
            cfg = world.decide(auto_fit, cfg, out, resume, console)  # no-op unless train.auto_fit
            world.decide(check_inputs, cfg, out)  # model source, tokenizer and data checked before any weights
            start_from = world.decide(_start_point, cfg, out, resume, force, console)  # may move earlier files
            device = world.device  # cuda:LOCAL_RANK under torchrun
            dtype = _announce_dtype(cfg.model.compute_dtype, device, console)
            ckpt.seed_everything(cfg.train.seed)  # LoRA init below is a function of the seed
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
                "use `lorafuse train` (lorafuse.training.api.run) for it. Out-of-memory retries still apply."
            )
        with world.main_only(ckpt.RunLock(out)):
            start_from = world.decide(_start_point, cfg, out, resume, force, console)
            dtype = _announce_dtype(cfg.model.compute_dtype, world.device, console)
            return _train(cfg, model, tokenizer, out, start_from, dtype, console, world, force)


# ------------------------------------------------------------------------------------------------ setup


def _console(console):
    from rich.console import Console

    return console or Console()


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
    from lorafuse.model.load import resolve_compute_dtype

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


FIT_KEYS = ("train.micro_batch_size", "train.grad_accum", "train.gradient_checkpointing", "data.max_length")


def auto_fit(cfg, out: Path, resume, console):
    """train.auto_fit: `cfg` with the planner's fastest setting that fits the visible GPU (module docstring)."""
    if not cfg.train.auto_fit:
        return cfg
    from lorafuse.config import flatten
    from lorafuse.plan import apply_overrides, plan, suggest
    from lorafuse.plan.memory import GIB
    from lorafuse.plan.speed import detect_gpu

    if cfg.train.device == "cpu" or detect_gpu() is None:
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
    from lorafuse.config import load_config

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


def _start_point(cfg, out: Path, resume, force: bool, console) -> Path | None:
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
    from lorafuse.config import config_diff, load_config

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


def config_for_model(model, data, out: Path, format: str, overrides: dict):
    """A RunConfig describing an already loaded model (its model_state: base and lora) and the given data."""
    from lorafuse.config import DataConfig, TrainConfig, validate_config

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


def _batchers(cfg, tokenizer, out: Path, console, world):
    from lorafuse.data import Batcher, build_datasets
    from lorafuse.data.cache import tokens_fingerprint

    dc, tc = cfg.data, cfg.train
    with world.main_first():  # rank 0 tokenizes and writes the cache, then the others read it
        train_ds, val_ds, stats = build_datasets(
            dc, tokenizer, seed=tc.seed, cache_dir=dc.cache_dir or str(out / ".cache")
        )
    for line in stats.summary():
        console.print(line, highlight=False)
    # On CUDA, padded rows are padded to a multiple of 64: a few distinct shapes, so CUDA graphs can capture them
    # (train/graphs.py), and tensor-core friendly sizes; the pads carry no loss and no attention.
    multiple = 64 if world.device.type == "cuda" and not dc.packing else 1
    common = dict(
        pad_id=tokenizer.pad_token_id,
        packing=dc.packing,
        max_length=dc.max_length,
        seed=tc.seed,
        pad_to_multiple_of=multiple,
    )
    train_b = Batcher(
        train_ds, tc.micro_batch_size, shuffle=dc.shuffle, num_shards=world.size, shard=world.rank, **common
    )  # validation stays whole: evaluate() strides over it, so no batch is dropped
    # Eval batches are never larger than train micro-batches unless asked: eval must not be what OOMs.
    val_b = (
        Batcher(val_ds, tc.eval_batch_size or tc.micro_batch_size, shuffle=False, **common)
        if val_ds is not None and len(val_ds)
        else None
    )
    return train_b, val_b, tokens_fingerprint(train_ds, val_ds)


def _train(cfg, model, tokenizer, out: Path, start_from, dtype, console, world, force=False) -> TrainResult:
    from lorafuse.config import save_config
    from lorafuse.lora.adapter_io import save_adapter

    train_b, val_b, fingerprint = _batchers(cfg, tokenizer, out, console, world)
    if world.size > 1:
        console.print(world.describe(cfg.train), highlight=False)

    def write_adapter(m, folder):
        save_adapter(m, folder, base_model_name_or_path=cfg.model.path, tokenizer=tokenizer)

    try:  # the loop turns train.fp8 on (prepare_model), also when it then stops before the first step
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
        )
        if start_from is not None:
            loop.resume(start_from, force=force)
        if world.is_main and loop.state.step < loop.total:  # after the resume's checks; a no-op re-run keeps it
            save_config(cfg, out / "config.yaml")
        res = loop.run()
    finally:  # the speed and memory changes are for training: generation afterwards runs the plain modules
        accel.restore(model)
    if res.stop_reason == "already_complete":
        kept = world.decide(finished_summary, out)
        if kept is not None:  # a no-op re-run: the finished run's adapter and summary.json stay as they are
            console.print(f"already complete: {summary_line(kept)}", highlight=False, markup=False, soft_wrap=True)
            return _result_from_summary(kept)
    adapter_dir = None
    if res.stop_reason != "signal":
        adapter_dir = out / "adapter"
        if world.is_main:
            write_adapter(model, adapter_dir)
            loop.metrics.plot(out / "loss.png")
    sample = _demo_generation(cfg, model, tokenizer, console) if res.stop_reason != "signal" and world.is_main else None
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
        sample=sample,
        stop_signal=res.stop_signal,
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


def _demo_generation(cfg, model, tokenizer, console) -> str | None:
    """For the built-in demo model: what the trained adapter answers to one demo prompt."""
    from lorafuse.config import BUILTIN_MODEL

    if cfg.model.path != BUILTIN_MODEL:
        return None
    from lorafuse.data.formats import plain_prompt
    from lorafuse.infer.generate import generate

    prompt = plain_prompt(cfg.data.format, DEMO_PROMPT["instruction"], DEMO_PROMPT["input"])
    model.eval()
    text = generate(model, tokenizer, prompt, max_new_tokens=24)
    console.print(f"demo prompt:\n{prompt}{text}", highlight=False, markup=False)
    return text
