"""`lorafuse bench --shape tiny --device cpu`: the whole harness (benchmarks/bench.py) on a CPU, each stack in its
own process."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench  # noqa: E402  (the harness lives in benchmarks/, beside its runners)
import bench_table  # noqa: E402

from lorafuse.errors import LorafuseError  # noqa: E402

pytestmark = pytest.mark.slow  # the lab's harness, not the product: run with `-m slow`
# two short timed steps of the tiny shape on the CPU, each stack in its process
TINY_CPU = ["--shape", "tiny", "--device", "cpu", "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    models = tmp_path_factory.mktemp("bench-models")
    memory_log = out / "measured.jsonl"
    argv = [*TINY_CPU, "--stacks", "lorafuse,hf,unsloth", "--methods", "qlora,lora", "--out", str(out)]
    rc = bench.main(argv + ["--model-dir", str(models), "--memory-log", str(memory_log), "--timeout", "600"])
    files = list(out.glob("*-cpu.jsonl"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    return rc, files, rows, memory_log


def test_bench_rows(smoke, capsys):
    rc, files, rows, memory_log = smoke
    assert rc == 0 and len(files) == 1
    assert len(rows) == 6 and len({r["run"] for r in rows}) == 1
    for row in rows:
        missing = [k for k in bench.REQUIRED_KEYS if k not in row]
        assert not missing, (row["stack"], row["method"], missing)
        assert row["card"] == "cpu" and row["shape"] == "tiny" and (row["batch"], row["seq"]) == (2, 32)
    by = {(r["stack"], r["method"]): r for r in rows}
    for key in [("hf", "qlora"), ("unsloth", "qlora"), ("unsloth", "lora")]:
        assert by[key]["status"] == "unavailable" and "CUDA" in by[key]["reason"]
    for key in [("lorafuse", "lora"), ("lorafuse", "qlora"), ("hf", "lora")]:
        r = by[key]
        assert r["status"] == "ok", (key, r.get("reason"))
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s"])
        # random init, random tokens: the loss starts near ln(vocab)
        assert abs(r["loss_first"] - math.log(512)) < 1.0
        assert len(r["step_times"]) == 2
    # LoRA r16 on the 7 projections of the tiny shape: 2 layers x 16 x sum(in + out)
    lora_params = 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert by["lorafuse", "lora"]["trainable_params"] == by["hf", "lora"]["trainable_params"] == lora_params
    assert not memory_log.exists()  # CPU runs measure no GPU peak


def test_precheck_skips_full_fine_tuning_that_cannot_fit():
    args = bench.parse_args(["--shape", "llama2-7b", "--table"])
    assert bench.plan_runs(args) == [("hf", "full"), ("lorafuse", "lora"), ("lorafuse", "qlora")]
    small = bench._precheck(args, "hf", "full", {"memory_gib": 22.0})
    assert small.startswith("skipped: the planner predicts")
    assert bench._precheck(args, "hf", "full", {"memory_gib": 139.8}) is None
    assert bench._precheck(args, "lorafuse", "full", {}).startswith("unavailable")


def test_seed_table_and_ratios():
    def row(stack, method, step, peak):
        return {
            "stack": stack,
            "method": method,
            "status": "ok",
            "step_s": step,
            "tokens_per_s": 2048 / step,
            "peak_alloc_gib": peak,
            "device": "cuda",
            "reason": None,
        }

    rows = [row("hf", "full", 2.0, 60.0), row("lorafuse", "lora", 0.5, 15.0), row("lorafuse", "qlora", 0.6, 6.0)]
    table = bench_table.render_seed_table(rows)
    assert "25%" in table and "10%" in table and "30%" in table and "28 GB+" in table
    text = bench_table.render(rows + [row("hf", "qlora", 1.2, 9.0)])
    assert "qlora: lorafuse vs hf: speed 2.00x, memory 0.67x" in text
    lean = {
        **row("lorafuse", "qlora", 0.14, 3.99),
        "gc": "offload",
        "embeddings_on_host": True,
        "head_on_host": True,
        "dequant_cap_mib": 48,
        "fp8": True,
        "fast_path": {"applied": True},
        "cuda_graphs": {"applied": True},
    }
    assert "(fast path on, graphs on, offload, host embedding, host head, cap 48 MiB, FP8)" in bench_table.render(
        [lean]
    )


def test_card_slug_and_bad_flags():
    assert bench.card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    with pytest.raises(LorafuseError, match="--stacks"):
        bench.plan_runs(bench.parse_args(["--stacks", "lorafuse,trl"]))
    with pytest.raises(LorafuseError, match="--shape"):
        bench.parse_args(["--shape", "gpt-5"])


def test_random_init_is_lorafuse_only():
    with pytest.raises(LorafuseError, match="--stacks lorafuse"):
        bench.parse_args(["--random-init", "--stacks", "lorafuse,hf"])
    with pytest.raises(LorafuseError, match="--stacks lorafuse"):
        bench.parse_args(["--random-init", "--stacks", "lorafuse", "--table"])


def test_prediction_before_the_run_assumes_the_fast_path_on_cuda():
    args = bench.parse_args(["--shape", "llama2-7b"])
    assert bench._lorafuse_workload(args, "qlora", {}).kernels == "fused"
    assert (
        bench._lorafuse_workload(args, "qlora", {"fast_path": {"applied": False}, "fused_loss": False}).kernels
        == "reference"
    )
    cpu = bench.parse_args(["--shape", "llama2-7b", "--device", "cpu"])
    assert bench._lorafuse_workload(cpu, "qlora", {}).kernels == "reference"


def test_random_init_run_with_a_profile(tmp_path, capsys):
    """--random-init generates the model in the runner (no checkpoint folder is written); --profile writes the
    profiler's table of 2 more steps; the row carries the planner's prediction made before the run."""
    models, prof = tmp_path / "models", tmp_path / "prof"
    rc = bench.main(
        [
            *TINY_CPU,
            "--stacks",
            "lorafuse",
            "--methods",
            "qlora",
            "--random-init",
            "--out",
            str(tmp_path),
            "--model-dir",
            str(models),
            "--memory-log",
            "",
            "--profile",
            str(prof),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "the planner predicts a peak of" in printed
    row = json.loads(next(tmp_path.glob("*-cpu.jsonl")).read_text().splitlines()[0])
    assert row["status"] == "ok" and row["random_init"] is True and row["predicted_peak_alloc_gib"] > 0
    assert not models.exists() or not any(models.iterdir()), "nothing saved with --random-init"
    table = (prof / "lorafuse-qlora-tiny-2x32.txt").read_text()
    assert "aten::mm" in table and "by input shape" in table


def test_memory_settings_with_peers_apply_to_lorafuse_rows_only():
    """--offload, --host-* and --keep-layers are lorafuse's: in a run with peers, the peers' runners get (and
    their rows record) checkpointing on and their own defaults, so one run compares lorafuse's lean setting with
    the peers' defaults and each row says what it ran."""
    args = bench.parse_args(
        [
            "--offload",
            "--host-embeddings",
            "--host-head",
            "--keep-layers",
            "2",
            "--stacks",
            "lorafuse,unsloth,hf",
            "--shape",
            "llama2-7b",
        ]
    )
    own = bench._spec(args, "lorafuse", "qlora", None)
    assert (own["gc"], own["embeddings_on_host"], own["head_on_host"], own["uncheckpointed_layers"]) == (
        "offload",
        True,
        True,
        2,
    )
    for stack in ("unsloth", "hf"):
        spec = bench._spec(args, stack, "qlora", None)
        row = bench._row(args, "r", stack, "qlora", {}, {}, ("c", None))
        for got in (spec, row):
            assert (got["gc"], got["embeddings_on_host"], got["head_on_host"], got["uncheckpointed_layers"]) == (
                True,
                False,
                False,
                0,
            )
    no_gc = bench.parse_args(["--no-gc", "--stacks", "lorafuse,hf"])
    assert bench._spec(no_gc, "hf", "qlora", None)["gc"] is False


def test_offload_flag_is_lorafuse_checkpointing():
    with pytest.raises(LorafuseError, match="--no-gc"):
        bench.parse_args(["--offload", "--no-gc", "--stacks", "lorafuse"])
    args = bench.parse_args(["--offload", "--stacks", "lorafuse"])
    assert bench._spec(args, "lorafuse", "qlora", None)["gc"] == "offload"
    assert bench._lorafuse_workload(args, "qlora", {}).checkpointing == "offload"


def test_host_embeddings_flag_is_a_lorafuse_setting():
    args = bench.parse_args(["--host-embeddings", "--stacks", "lorafuse", "--shape", "llama2-7b"])
    assert bench._spec(args, "lorafuse", "qlora", None)["embeddings_on_host"] is True
    on_host = bench._lorafuse_workload(args, "qlora", {})
    assert on_host.embeddings_on_host
    plain = bench._lorafuse_workload(bench.parse_args(["--stacks", "lorafuse", "--shape", "llama2-7b"]), "qlora", {})
    shape = on_host.shape
    assert bench.estimate(plain).peak_alloc - bench.estimate(on_host).peak_alloc == 2 * shape.embed_params


def test_host_head_flag_is_a_lorafuse_setting():
    args = bench.parse_args(["--host-head", "--offload", "--stacks", "lorafuse", "--shape", "llama2-7b"])
    assert bench._spec(args, "lorafuse", "qlora", None)["head_on_host"] is True
    on_host = bench._lorafuse_workload(args, "qlora", {})
    plain = bench._lorafuse_workload(
        bench.parse_args(["--offload", "--stacks", "lorafuse", "--shape", "llama2-7b"]), "qlora", {}
    )
    assert on_host.head_on_host and not plain.head_on_host
    assert bench.estimate(on_host).peak_alloc < bench.estimate(plain).peak_alloc  # the backward peaks at 4 x 512


def test_keep_layers_flag_is_a_lorafuse_setting():
    args = bench.parse_args(["--keep-layers", "4", "--shape", "llama2-7b"])  # with the peers: lorafuse's rows only
    assert bench._spec(args, "lorafuse", "qlora", None)["uncheckpointed_layers"] == 4
    assert bench._spec(args, "unsloth", "qlora", None)["uncheckpointed_layers"] == 0
    assert bench._lorafuse_workload(args, "qlora", {}).uncheckpointed == 4


def test_experimental_switches_are_lorafuse_settings():
    """--experimental KEY turns a config experimental-section switch on for lorafuse's rows only; the runner builds
    the kernel options `lorafuse train` would build from that section."""
    sys.path.insert(0, str(Path(bench.__file__).resolve().parent / "peers"))
    import lorafuse_stack

    args = bench.parse_args(["--experimental", "fused_ds_db", "--shape", "llama2-7b"])
    own = bench._spec(args, "lorafuse", "qlora", None)
    assert own["experimental"] == ["fused_ds_db"]
    assert bench._spec(args, "unsloth", "qlora", None)["experimental"] == []
    assert lorafuse_stack._options(own).kernel.fused_ds_db
    plain = bench._spec(bench.parse_args([]), "lorafuse", "qlora", None)
    assert not lorafuse_stack._options(plain).kernel.fused_ds_db
    with pytest.raises(SystemExit) as bad:
        bench.parse_args(["--experimental", "no_such_switch"])
    assert bad.value.code == 2
