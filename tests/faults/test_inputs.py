"""Bad inputs and faults through the real CLI: one clear error with its fix, exit 2, no traceback, nothing damaged.

Config values, keys, types and YAML; data files and rows; model folders and files; adapters for generate and merge;
the token cache; command-line options; a full disk, a quota, a read-only or forbidden folder at each write site; out
of memory; and the one-line report of an unknown bug (exit 1). The harness is in conftest.py. Data faults are found
before any weights load, so those cases never train. Disk faults are injected by making the library's own writer
raise what it raises on a full disk (measured on a full tmpfs: safetensors' SafetensorError "... (os error 28)",
tokenizers' Exception "... (os error 28)", OSError(ENOSPC) from torch.save through a Python file and from open()).
"""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

YAML_RUN = "model:\n  path: builtin:tiny-llama\n  quant: none\ndata:\n  path: builtin:demo\n"


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def rows(path, *items):
    return write(path, "".join((i if isinstance(i, str) else json.dumps(i, ensure_ascii=False)) + "\n" for i in items))


ROW = {"instruction": "2+2は?", "input": "", "output": "4です。"}

# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, says",
    [
        ("lora.rank=8", ["lora.rank", "did you mean 'lora.r'"]),
        ("lora.dropout=1.5", ["lora.dropout", "< 1"]),
        ("train.lr=.inf", ["train.lr", "finite"]),
        ("train.lr=.nan", ["train.lr", "finite"]),
        ("lora.alpha=-.inf", ["lora.alpha", "finite"]),
        ("data.val_size=.inf", ["data.val_size", "finite"]),
        (f"train.seed={2**64 + 1}", ["train.seed", "< 4294967296"]),
        ("train.seed=-1", ["train.seed", ">= 0"]),
        ("lora.r=true", ["lora.r", "not true/false"]),
        ("train.max_steps=many", ["train.max_steps", "whole number"]),
        ("lora.r=null", ["lora.r is null", "whole number"]),
        ("model.path=null", ["model.path is null", "text string"]),
        ("model.quant=nf5", ["model.quant", "did you mean 'nf4'"]),
        ("lora.targets=(q_proj", ["lora.targets", "regex"]),
        ("data.val_path=v.jsonl data.val_size=0.1", ["data.val_path", "data.val_size"]),
        ("train.early_stopping_patience=2", ["early_stopping_patience", "validation data"]),
        ("output.dir=$LORAFUSE_UNSET_VAR/run", ["$LORAFUSE_UNSET_VAR", "not set"]),
    ],
)
def test_bad_config_value(cli, override, says):
    cli.fails(*cli.train(*override.split()), says=says)
    assert not cli.out.exists()  # refused before the output folder is made


def test_bad_value_touches_an_earlier_run_pointed_at(cli):
    cli.fails("train", f"output.dir={cli.earlier}", "train.lr=.inf", says=["train.lr"])


def test_yaml_syntax_error_names_the_line(cli):
    cfg = write(cli.tmp / "c.yaml", YAML_RUN + "train: {lr: [1}\n")
    cli.fails("train", cfg, f"output.dir={cli.out}", says=["c.yaml", "line 6"], extra_lines=1)


@pytest.mark.parametrize(
    "text, says",
    [
        ("- model\n- data\n", ["holds a list"]),
        ("model:\n  path: builtin:tiny-llama\ndata:\n", ["data.path", "section 'data' is empty"]),
        (YAML_RUN + "trian:\n  lr: 1e-4\n", ["trian", "did you mean 'train'"]),
    ],
)
def test_bad_config_file(cli, text, says):
    cli.fails("train", write(cli.tmp / "c.yaml", text), f"output.dir={cli.out}", says=says)


def test_missing_config_file_and_stray_argument(cli):
    cli.fails("train", "missing.yaml", says=["missing.yaml"])
    cli.fails("train", "lora.r=8", "stray", says=["'stray' is not a key=value override"])


def test_tilde_is_expanded_and_never_made_as_a_folder(cli, monkeypatch):
    monkeypatch.setenv("HOME", str(cli.tmp / "home"))
    cli.fails(*cli.train("data.path=~/data/train.jsonl"), says=[str(cli.tmp / "home" / "data" / "train.jsonl")])
    assert not (cli.tmp / "~").exists()


# ----------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("bad.jsonl", [ROW, ROW, '{"instruction": "x", "output": '], ["line 3", "bad.jsonl"]),
        ("q.jsonl", [{"question": "a", "answer": "b"}] * 3, ["question", "data.fields.instruction=question"]),
        ("list.jsonl", [ROW, "[1, 2]"], ["line 2", "not an object"]),
        ("nested.jsonl", [{**ROW, "output": {"text": "4"}}], ["field 'output' should be text"]),
        ("empty.jsonl", [""], ["empty"]),
        ("rows.json", ['[{"instruction": "a", "output": "b"}, 3]'], ["row 2", "not an object"]),
        ("data.txt", [ROW], ["unknown data file type", ".txt"]),
        ("answers.jsonl", [{**ROW, "output": ""}] * 4, ["no row", "answer", "line 1"]),
    ],
)
def test_bad_data_file(cli, name, content, says):
    path = rows(cli.tmp / name, *content) if content != [""] else write(cli.tmp / name, "\n")
    cli.fails(*cli.train(f"data.path={path}"), says=says)


def test_missing_data_file_names_the_key(cli):
    cli.fails(*cli.train(f"data.path={cli.tmp / 'nope.jsonl'}"), says=["nope.jsonl", "(data.path)"])


def test_missing_val_path_is_blamed_on_val_path(cli):
    cli.fails(*cli.train(f"data.val_path={cli.tmp / 'val.jsonl'}"), says=["(data.val_path)", "check data.val_path"])


def test_data_not_utf8_names_the_encoding(cli):
    path = cli.tmp / "sjis.jsonl"
    path.write_bytes(json.dumps(ROW, ensure_ascii=False).encode("cp932") + b"\n")
    cli.fails(*cli.train(f"data.path={path}"), says=["not UTF-8", "cp932"])


def test_corrupt_parquet(cli):
    path = cli.tmp / "d.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    cli.fails(*cli.train(f"data.path={path}"), says=["d.parquet", "Parquet"])


def test_folder_that_is_no_dataset(cli):
    (cli.tmp / "folder").mkdir()
    cli.fails(*cli.train(f"data.path={cli.tmp / 'folder'}"), says=["not a `datasets` save_to_disk folder"])


def test_corrupt_saved_dataset_folder(cli):
    folder = cli.tmp / "saved"
    folder.mkdir()
    write(folder / "dataset_info.json", "{not json")
    cli.fails(*cli.train(f"data.path={folder}"), says=["the saved data set", str(folder)])


def test_sharegpt_unknown_role(cli):
    path = rows(cli.tmp / "c.jsonl", {"conversations": [{"from": "alien", "value": "hi"}]})
    cli.fails(*cli.train(f"data.path={path}", "data.format=sharegpt"), says=["unknown role 'alien'", "line 1"])


def test_prompt_longer_than_max_length(cli):
    path = rows(cli.tmp / "long.jsonl", {**ROW, "instruction": "長い" * 400})
    cli.fails(*cli.train(f"data.path={path}", "data.max_length=16"), says=["data.max_length"])


def test_validation_split_leaves_nothing(cli):
    path = rows(cli.tmp / "two.jsonl", ROW, ROW)
    cli.fails(*cli.train(f"data.path={path}", "data.val_size=2"), says=["data.val_size", "leaving none"])


def test_cache_dir_that_is_a_file(cli):
    blocker = write(cli.tmp / "cache", "a file")
    cli.fails(*cli.train(f"data.cache_dir={blocker}"), says=["is a file", "data.cache_dir"])


def test_data_error_comes_before_the_weights_are_read(cli):
    model = cli.model_copy()
    (model / "model.safetensors").write_bytes(b"not weights")  # loading it would fail with another error
    path = rows(cli.tmp / "bad.jsonl", '{"instruction": ')
    cli.fails(*cli.train(f"model.path={model}", f"data.path={path}"), says=["malformed JSON", "line 1"])


def test_data_preview_reports_the_same_error(cli):
    path = rows(cli.tmp / "bad.jsonl", ROW, "{oops")
    cli.fails("data", "preview", f"data.path={path}", says=["line 2"])


# ----------------------------------------------------------------------------------------------- model


def test_model_folder_missing(cli):
    cli.fails(*cli.train(f"model.path={cli.tmp / 'no-model'}"), says=["model folder not found", "no-model"])


def test_model_path_that_is_a_file(cli):
    model = cli.model_copy()
    cli.fails(*cli.train(f"model.path={model / 'config.json'}"), says=["is a file, not a model folder"])


def test_model_folder_without_config(cli):
    (cli.tmp / "empty-model").mkdir()
    cli.fails(*cli.train(f"model.path={cli.tmp / 'empty-model'}"), says=["no config.json"])


def test_corrupt_config_json_is_named(cli):
    model = cli.model_copy()
    write(model / "config.json", '{"model_type": "llama",')
    message = cli.fails(*cli.train(f"model.path={model}"), says=["config.json", "not valid JSON", "line 1"])
    assert "tokenizer" not in message


def test_model_that_needs_remote_code(cli):
    model = cli.model_copy()
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mystery-lm", auto_map={"AutoModelForCausalLM": "modeling_mystery.MysteryLM"})
    write(model / "config.json", json.dumps(config))
    cli.fails(*cli.train(f"model.path={model}"), says=["own Python code", "model.trust_remote_code=true"])


def test_offline_hub_id_not_cached_fails_at_once(cli):
    start = time.perf_counter()
    message = cli.fails(*cli.train("model.path=nobody/no-such-model"), says=["hub cannot be reached", "local cache"])
    assert "tokenizer" not in message
    assert time.perf_counter() - start < 5  # no network retries (transformers' own path takes ~50 s offline)


def test_offline_without_the_env_flag_checks_the_hub_once(cli, monkeypatch):
    from lorafuse import hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "reachable", lambda endpoint: False)  # what a machine without network sees
    cli.fails(*cli.train("model.path=nobody/no-such-model"), says=["no answer from", "not in the local cache"])


def test_unknown_attention_backend(cli):
    cli.fails(*cli.train("model.attn_implementation=turbo"), says=["'turbo'", "sdpa"])


@pytest.mark.parametrize("quant", ["none", "nf4"])  # from_pretrained and the streaming NF4 loader
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_model_weights_name_the_file(cli, quant, damage):
    model = cli.model_copy()
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 8 if damage == "garbage" else data[: len(data) // 2])
    cli.fails(*cli.train(f"model.path={model}", f"model.quant={quant}"), says=[str(weights), "safetensors"])


def test_corrupt_tokenizer_file(cli):
    model = cli.model_copy()
    write(model / "tokenizer.json", '{"version": "1.0", "model": ')
    cli.fails(*cli.train(f"model.path={model}"), says=[str(model / "tokenizer.json"), "not valid JSON"])


def test_rank_above_a_layer_dimension_names_the_layer(cli):
    cli.fails(*cli.train("lora.r=512"), says=["lora.r=512", "model.layers.0.self_attn.q_proj", "128 x 128"])


def test_targets_matching_nothing_list_the_linears(cli):
    cli.fails(*cli.train("lora.targets=[query,value]"), says=["matched no module", "q_proj"])


# ----------------------------------------------------------------------------------------------- adapters


def generate(cli, adapter, *extra):
    return ["generate", "--model", "builtin:tiny-llama", "--quant", "none", "--adapter", adapter, "--prompt", "hi",
            "--max-new-tokens", "2", *extra]  # fmt: skip


def test_adapter_folder_missing_or_a_file(cli):
    cli.fails(*generate(cli, cli.tmp / "no-adapter"), says=["adapter folder not found"])
    adapter = cli.adapter_copy()
    cli.fails(*generate(cli, adapter / "adapter_config.json"), says=["is a file, not an adapter folder"])


@pytest.mark.parametrize(
    "edit, says",
    [
        ({"lora_alpha": "sixteen"}, ["lora_alpha='sixteen'", "number"]),
        ({"r": "8"}, ["r='8'", "whole number"]),
        ({"lora_dropout": 1.5}, ["lora_dropout=1.5", "< 1"]),
        ({"r": 4}, ["rank differs", "r=4"]),
        ({"peft_type": "IA3"}, ["peft_type 'IA3'"]),
    ],
)
def test_bad_adapter_config_value(cli, edit, says):
    adapter = cli.adapter_copy()
    config = json.loads((adapter / "adapter_config.json").read_text())
    write(adapter / "adapter_config.json", json.dumps({**config, **edit}))
    cli.fails(*generate(cli, adapter), says=says)


def test_adapter_config_not_json(cli):
    adapter = cli.adapter_copy()
    write(adapter / "adapter_config.json", "{'r': 8}")
    cli.fails(*generate(cli, adapter), says=["adapter_config.json", "not valid JSON"])


def test_corrupt_adapter_weights(cli):
    adapter = cli.adapter_copy()
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cli.fails(*generate(cli, adapter), says=[str(weights), "safetensors"])


def test_adapter_without_weights(cli):
    adapter = cli.adapter_copy()
    (adapter / "adapter_model.safetensors").unlink()
    cli.fails(*generate(cli, adapter), says=["no adapter_model.safetensors"])


class _Payload:
    """Unpickling this runs a shell command: safe loading must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_refused_by_safe_loading_is_never_run(cli):
    import torch

    adapter = cli.adapter_copy()
    (adapter / "adapter_model.safetensors").unlink()
    marker = cli.tmp / "pwned"
    torch.save({"base_model.model.x": _Payload(marker)}, adapter / "adapter_model.bin")
    cli.fails(*generate(cli, adapter), says=["adapter_model.bin", "safe loading refuses"])
    assert not marker.exists()


def test_merge_with_a_corrupt_adapter_writes_nothing(cli):
    adapter = cli.adapter_copy()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    merged = cli.tmp / "merged"
    cli.fails("merge", "--model", "builtin:tiny-llama", "--adapter", adapter, "--out", merged, says=["safetensors"])
    assert not merged.exists()


# ----------------------------------------------------------------------------------------------- CLI options


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--max-new-tokens", "-5", ["--max-new-tokens", ">= 1"]),
        ("--max-new-tokens", "ten", ["--max-new-tokens", "whole number"]),
        ("--temperature", "nan", ["--temperature", "finite"]),
        ("--top-p", "0", ["--top-p", "> 0"]),
        ("--seed", str(2**64), ["--seed", "4294967295"]),
    ],
)
def test_bad_generate_option(cli, option, value, says):
    cli.fails(*generate(cli, cli.earlier / "adapter", option, value), says=says)


def test_the_ui_refuses_an_address_it_cannot_serve_on(cli, tmp_path):
    pytest.importorskip("gradio")
    import socket

    runs = str(tmp_path / "runs")
    cli.fails("ui", "--runs", runs, "--port", "99999", says=["--port", "<= 65535"])
    with socket.socket() as holder:  # another program listening on the port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cli.fails("ui", "--runs", runs, "--port", str(port), says=[f"127.0.0.1:{port}", "another port"])
    cli.fails("ui", "--runs", runs, "--host", "no-such-host.invalid", says=["does not resolve", "127.0.0.1"])


def test_bad_preview_count_and_exclusive_flags(cli):
    cli.fails("data", "preview", "-n", "0", says=["-n", ">= 1"])
    cli.fails("train", "--resume", "x", "--no-resume", says=["not allowed with"])


# ----------------------------------------------------------------------------------------------- disk and memory


def _full_disk_at(monkeypatch, site: str):
    """Make one library writer fail as it does on a full disk (see the module docstring)."""
    import safetensors.torch
    import tokenizers
    import torch

    real_save_file = safetensors.torch.save_file

    def safetensors_full(tensors, filename, metadata=None):
        if site == "adapter" and "checkpoint-" in str(filename):  # the checkpoints fit; the final adapter does not
            return real_save_file(tensors, filename, metadata=metadata)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def torch_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def tokenizer_full(self, path, pretty=True):
        raise Exception("No space left on device (os error 28)")

    def fsync_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = {
        "safetensors": (safetensors.torch, "save_file", safetensors_full),
        "adapter": (safetensors.torch, "save_file", safetensors_full),
        "torch.save": (torch, "save", torch_full),
        "tokenizer": (tokenizers.Tokenizer, "save", tokenizer_full),
        "write_atomic": (os, "fsync", fsync_full),  # write_atomic's fsync of <output.dir>/config.yaml
    }[site]
    monkeypatch.setattr(*target)


@pytest.mark.parametrize(
    "site, says",
    [
        ("safetensors", ["could not write checkpoint-1"]),
        ("torch.save", ["could not write checkpoint-1"]),
        ("tokenizer", ["could not write checkpoint-1"]),
        ("write_atomic", []),  # the run's first small file (which one depends on the run's setup)
        ("adapter", ["adapter"]),
    ],
)
def test_disk_full_at_each_write_site(cli, monkeypatch, site, says):
    _full_disk_at(monkeypatch, site)
    cli.fails(*cli.train(), says=["the disk is full", str(cli.out), *says])
    assert not [p for p in cli.out.rglob("*") if ".tmp-" in p.name]  # no half-written file or folder is left
    if site == "adapter":
        assert (cli.out / "checkpoint-2" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 512 KiB tmpfs: room for the config and the token cache, not for a checkpoint (needs mount rights)."""
    import subprocess

    folder = tmp_path / "tiny-disk"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the write sites are covered by test_disk_full_at_each_write_site")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_really_full_disk(cli, tiny_disk):
    out = tiny_disk / "run"
    cli.fails("train", f"output.dir={out}", *cli.train()[2:], says=["the disk is full", "checkpoint-1", str(out)])
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize(
    "code, says",
    [
        (errno.EROFS, ["read-only", "config.yaml"]),
        (errno.EACCES, ["no permission to write", "config.yaml"]),
        (errno.EDQUOT, ["disk quota", "config.yaml"]),
    ],
)
def test_unwritable_output_file(cli, monkeypatch, code, says):
    real_open = open

    def refusing_open(path, *args, **kwargs):  # the run's first write_atomic: <output.dir>/config.yaml
        if "config.yaml" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("lorafuse.atomic.open", refusing_open, raising=False)
    cli.fails(*cli.train(), says=says)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_read_only_output_folder(cli):
    cli.out.mkdir()
    cli.out.chmod(0o500)
    try:
        cli.fails(*cli.train(), says=["not writable", str(cli.out)])
    finally:
        cli.out.chmod(0o700)


def test_out_of_memory_while_loading(cli, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr("lorafuse.job.load_model", no_memory)
    cli.fails(*cli.train(), says=["ran out of memory"])


def test_an_unknown_exception_is_reported_as_a_bug(cli, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero in a helper")

    monkeypatch.setattr("lorafuse.job.apply_lora", broken)
    result = cli.run(*cli.train())
    assert result.code == 1 and "Traceback" not in result.err
    assert "error: ZeroDivisionError: division by zero in a helper" in result.err
    assert "this is a bug in lorafuse: run with --debug and report it" in result.err


def test_debug_keeps_the_traceback(cli):
    result = cli.run("--debug", *cli.train("train.lr=.inf"))
    assert result.code == 2 and "Traceback" in result.err and "error: invalid config" in result.err
