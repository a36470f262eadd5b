"""Which folders and files lorafuse may write over: only its own. Every command that writes an output asks here.

The marker. Every folder lorafuse creates as an output carries `.lorafuse`, a small JSON file:

    {"kind": "run" | "adapter" | "merge" | "export", "version": "<lorafuse version>", "files": [...]}

"files" (folders written whole: adapters, merged models, exports) lists the top-level names the output holds; a
run folder grows over time and has no list. The marker is what tells a folder lorafuse wrote from one it did not.

The rules:
  * Never an output: `/`, the home folder, the current folder and any folder above the current one or above
    home (a run or merge there would mix its files with everything else).
  * A run (`prepare_run_dir`) takes a new or empty folder, its own earlier run folder (marker kind "run"), or a
    run folder written before the marker existed (`legacy_run_evidence`), which it adopts by writing the marker.
    Anything else that is non-empty is refused. Inside an owned run folder lorafuse moves only the names it writes
    (RUN_FILES and checkpoint-N/, see lorafuse.training.checkpoint); a file the user put there is never touched.
  * A folder written whole (`atomic_folder`, which calls `check_replaceable` before it swaps a folder in)
    replaces an existing folder only when that folder is empty, or carries a marker of the same kind and holds
    nothing but the names its marker lists. So `merge --out <a run folder>` cannot replace the run.
  * merge/export (`check_output_dir`) also refuse the folders they read from: the adapter's folder, the base
    model's folder, anything inside them and any folder above them, named in the message.
  * A single output file (`check_output_file`, e.g. a GGUF export) replaces only a file lorafuse wrote, as told
    by a callable that recognises its own files (their metadata), since a sidecar marker file would litter.

`atomic_folder(path, kind)`: a context manager yielding a temp folder beside `path`; on normal exit the folder gets
its marker (kind + the names written), every file and folder in it is fsynced and it takes `path`'s place (an existing
folder is swapped out in one renameat2(RENAME_EXCHANGE) where Linux has it, else renamed aside first and then
deleted), so readers see the old folder or the complete new one. On an exception the temp folder is removed and `path`
is left untouched. `check_replaceable` runs before the body and again before the swap.

A legacy run folder (no marker) is recognised by what only a lorafuse run writes: a `checkpoint-N/` folder whose
`trainer_state.json` is a JSON object with "step" and "micro_per_epoch" (the training loop's own counters), or a
`config.yaml` whose top-level keys are lorafuse's config sections (with model, data, train and output) beside a
`metrics.jsonl` (a run that stopped before its first checkpoint). Other files beside them are the user's and stay.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from lorafuse.atomic import fsync_path, fsync_tree, normal_file_modes, write_atomic
from lorafuse.config import SECTIONS
from lorafuse.errors import LorafuseError
from lorafuse.version import __version__

MARKER = ".lorafuse"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a run writes at the top of its folder (besides checkpoint-N/, .lock, .cache/ and archive-*/).
RUN_FILES = ("adapter", "metrics.jsonl", "loss.png", "summary.json", "best.json", "config.yaml")
RUN_FILES += ("trackers.json", "tensorboard", "wandb", "mlruns")  # train.report_to (lorafuse.training.trackers)
RUN_FILES += ("reference_logps.safetensors",)  # train.dpo_reference=precomputed (lorafuse.training.reference)
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


# --------------------------------------------------------------------------------------------------- the marker


def read_marker(folder: str | Path) -> dict | None:
    """The folder's marker as a dict with a "kind", or None (no marker, or one that is not ours)."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def write_marker(folder: str | Path, kind: str, files: list[str] | None = None) -> Path:
    """Write `<folder>/.lorafuse` atomically; `files`: the top-level names of an output written whole."""
    data = {"kind": kind, "version": __version__}
    if files is not None:
        data["files"] = sorted(files)
    return write_atomic(Path(folder) / MARKER, json.dumps(data, indent=1) + "\n")


def mark_written(folder: str | Path, kind: str) -> Path:
    """Mark a folder just written whole: its marker lists every top-level name in it."""
    folder = Path(folder)
    return write_marker(folder, kind, [p.name for p in folder.iterdir() if p.name != MARKER])


# --------------------------------------------------------------------------------------------------- places


def _real(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_protected(path: str | Path, what: str) -> Path:
    """Refuse `/`, home, the current folder, and any folder above the current one or above home."""
    real = _real(Path(path))
    cwd, home = _real(Path.cwd()), _real(Path.home())
    why = None
    if real == Path(real.anchor):
        why = "the root of the filesystem"
    elif real == home:
        why = "your home folder"
    elif real == cwd:
        why = "the current folder"
    elif real in cwd.parents:
        why = "a folder above the current folder"
    elif real in home.parents:
        why = "a folder above your home folder"
    if why:
        raise LorafuseError(
            f"{what} {path} is {why}; lorafuse writes an output only into a folder of its own",
            _new_folder_fix(what),
        )
    return Path(path).expanduser()


_NOUN = {"merge": "merged model", "export": "export", "adapter": "adapter", "run": "run"}


def _new_folder_fix(what: str) -> str:
    if what == "output.dir":
        return "set output.dir to a new or empty folder, e.g. output.dir=runs/my-run"
    return "write the output to a new or empty folder, e.g. runs/my-run/merged"


def ensure_writable_dir(out_dir: str | Path) -> Path:
    """Create `out_dir` and prove it is writable, or raise a LorafuseError (before any model is loaded)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise LorafuseError(
            f"the output folder {out_dir} is not writable ({exc.strerror or exc})",
            "set output.dir to a folder you can write to, e.g. output.dir=runs/my-run",
        ) from None
    return out_dir


def _names(folder: Path, limit: int = 4) -> str:
    names = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _is_empty(folder: Path) -> bool:
    return not any(True for _ in folder.iterdir())


def describe(folder: Path) -> str:
    """What an existing non-empty folder holds, in words, for a refusal."""
    marker = read_marker(folder)
    if marker is not None:
        return f"a lorafuse {marker['kind']} folder"
    if (folder / "adapter_config.json").is_file():
        return "an adapter (adapter_config.json)"
    if (folder / "config.json").is_file() and any(p.name.endswith(_WEIGHTS) for p in folder.iterdir()):
        return "a model (config.json and weights)"
    if legacy_run_evidence(folder):
        return "a lorafuse run"
    return f"files lorafuse did not write ({_names(folder)})"


# --------------------------------------------------------------------------------------------------- runs


def legacy_run_evidence(folder: Path) -> str | None:
    """Why `folder` (without a marker) is a run folder lorafuse wrote, or None (see the module docstring)."""
    for child in sorted(folder.iterdir()):
        if CHECKPOINT_RE.match(child.name) and child.is_dir():
            try:
                state = json.loads((child / "trainer_state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(state, dict) and {"step", "micro_per_epoch"} <= state.keys():
                return f"{child.name}/trainer_state.json"
    if (folder / "metrics.jsonl").is_file() and _is_lorafuse_config(folder / "config.yaml"):
        return "config.yaml and metrics.jsonl"
    return None


def _is_lorafuse_config(path: Path) -> bool:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and {"model", "data", "train", "output"} <= set(raw) <= set(SECTIONS)


def prepare_run_dir(path: str | Path) -> Path:
    """The run folder for output.dir: checked, created, marked (module docstring); a LorafuseError otherwise."""
    out = check_not_protected(path, "output.dir")
    if out.exists() and not out.is_dir():
        raise LorafuseError(
            f"output.dir {out} is a file, not a folder", "set output.dir to a new folder, e.g. output.dir=runs/my-run"
        )
    marker = read_marker(out) if out.is_dir() else None
    if marker is not None and marker["kind"] != "run":
        raise LorafuseError(
            f"output.dir {out} holds a lorafuse {marker['kind']} output, not a training run",
            "set output.dir to a new or empty folder, e.g. output.dir=runs/my-run",
        )
    if marker is None and out.is_dir() and not _is_empty(out):
        if legacy_run_evidence(out) is None:
            raise LorafuseError(
                f"output.dir {out} already holds {describe(out)}; lorafuse never moves or replaces files it did "
                "not write",
                "set output.dir to a new or empty folder (e.g. output.dir=runs/my-run), or move those files away",
            )
        _adopt_adapter(out / "adapter")
    ensure_writable_dir(out)
    if marker is None:
        write_marker(out, "run")
    return out


def _adopt_adapter(adapter: Path) -> None:
    """A legacy run's adapter/ folder becomes a marked adapter output (the run writes it again at its end)."""
    if adapter.is_dir() and read_marker(adapter) is None and (adapter / "adapter_config.json").is_file():
        mark_written(adapter, "adapter")


# --------------------------------------------------------------------------------------------------- outputs


def check_replaceable(path: str | Path, kind: str, what: str = "the output folder") -> None:
    """Raise unless `path` is absent, an empty folder, or a `kind` output holding only what its marker lists."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise LorafuseError(f"{what} {path} is a file, not a folder", "choose a new folder for the output")
    if _is_empty(path):
        return
    marker = read_marker(path)
    if marker is None or marker["kind"] != kind:
        raise LorafuseError(
            f"{what} {path} already holds {describe(path)}; lorafuse replaces only an earlier {_NOUN.get(kind, kind)} "
            "it wrote there",
            _new_folder_fix(what),
        )
    listed = set(marker.get("files") or ()) | {MARKER}
    extra = sorted(p.name for p in path.iterdir() if p.name not in listed)
    if extra:
        raise LorafuseError(
            f"{what} {path} is an earlier {_NOUN.get(kind, kind)}, but now also holds files lorafuse did not write "
            f"({', '.join(extra[:4])}); replacing the folder would delete them",
            "move those files out of it, or write to a new or empty folder",
        )


def check_output_dir(
    path: str | Path, kind: str, inputs: dict[str, str | Path], what: str = "the output folder"
) -> Path:
    """The rule for merge/export folders: not a protected place, not one of `inputs` ({"adapter": dir, ...}),
    not inside or above them, and replaceable (`check_replaceable`)."""
    out = check_not_protected(path, what)
    real = _real(out)
    for name, source in inputs.items():
        src = _real(Path(source))
        if not src.exists():
            continue
        if real == src:
            problem = f"{what} {path} is the {name} folder"
        elif real in src.parents:
            problem = f"{what} {path} holds the {name} folder {source}"
        elif src in real.parents and src.is_dir():
            problem = f"{what} {path} is inside the {name} folder {source}"
        else:
            continue
        raise LorafuseError(
            f"{problem}; writing the {_NOUN.get(kind, kind)} there would mix with or replace it",
            f"write the {_NOUN.get(kind, kind)} to a new folder of its own (beside the {name}, not in it or above it)",
        )
    check_replaceable(out, kind, what)
    return out


def check_output_file(path: str | Path, kind: str, is_ours, what: str = "--out") -> Path:
    """The rule for a single output file: absent, or a file `is_ours(path)` recognises as lorafuse's `kind` output.

    is_ours: a callable (Path -> bool) that reads the file's own metadata (e.g. a GGUF key naming lorafuse) and
    returns False for anything it cannot parse."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise LorafuseError(f"{what} {path} is a folder; the {kind} output is one file", f"pass a file path for {what}")
    if out.exists() and not is_ours(out):
        raise LorafuseError(
            f"{what} {path} already exists and was not written by lorafuse {kind}; lorafuse never replaces a file "
            "it did not write",
            f"choose a new file name for {what}, or move the existing file away",
        )
    return out


# ------------------------------------------------------------------------------------------- writing a folder whole


@contextlib.contextmanager
def atomic_folder(path: str | Path, kind: str):
    """`with atomic_folder(out, "merge") as tmp: <write files into tmp>` replaces `out` only once everything is
    written, and only when `out` is absent, empty or an earlier `kind` output (module docstring)."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise LorafuseError(f"{path} exists and is a file, not a folder", "choose another output path or remove it")
    check_replaceable(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result should look like a normal folder
    try:
        yield tmp
        mark_written(tmp, kind)
        normal_file_modes(tmp)  # safetensors writes 0600: the folder's files get what a plain open() gives
        fsync_tree(tmp)
        check_replaceable(path, kind)  # again: the folder may have changed while the body wrote
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
