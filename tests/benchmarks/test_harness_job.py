"""`lorafuse bench --job`: the `lorafuse train` job's own step (benchmarks/peers/lorafuse_job.py) beside the
harness's, on a CPU; its config, its rows and step times, its table lines, and the combinations it refuses."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path[:0] = [str(BENCH), str(BENCH / "peers")]
import bench  # noqa: E402  (the harness lives in benchmarks/, beside its runners)
import bench_table  # noqa: E402
import lorafuse_job  # noqa: E402
import lorafuse_stack  # noqa: E402

from lorafuse import cli  # noqa: E402

BATCH, SEQ = 2, 32


def _spec(folder, **changes) -> dict:
    args = bench.parse_args(["--shape", "tiny", "--device", "cpu", "--stacks", "lorafuse", "--job"])
    return {**bench._spec(args, "lorafuse", "qlora", folder, "job"), "batch": BATCH, "seq": SEQ, **changes}


@pytest.mark.slow
def test_job_row_beside_the_harness_row(tmp_path, capsys):
    """The job trains the tiny checkpoint for warmup + steps steps; its row times the last --steps of them."""
    argv = ["--shape", "tiny", "--device", "cpu", "--batch", str(BATCH), "--seq", str(SEQ), "--steps", "3"]
    argv += ["--warmup", "1", "--stacks", "lorafuse", "--methods", "lora", "--job", "--out", str(tmp_path)]
    rc = bench.main(argv + ["--model-dir", str(tmp_path / "models"), "--memory-log", str(tmp_path / "m.jsonl")])
    printed = capsys.readouterr().out
    assert rc == 0
    rows = [json.loads(x) for x in next(tmp_path.glob("*-cpu.jsonl")).read_text().splitlines()]
    harness, job = rows
    assert (harness["runner"], job["runner"]) == ("harness", "job")
    assert (
        job["stack"] == "lorafuse" and job["method"] == "lora" and not [k for k in bench.REQUIRED_KEYS if k not in job]
    )
    assert job["status"] == "ok", job.get("reason")
    assert job["step_s"] > 0 and len(job["step_times"]) == 3
    assert job["tokens_per_s"] == pytest.approx(BATCH * SEQ / job["step_s"])
    assert abs(job["loss_first"] - math.log(512)) < 1.0 and math.isfinite(job["loss_last"])
    assert job["trainable_params"] == harness["trainable_params"] and job["metrics_memory_mb"] > 0
    assert job["fast_path"]["applied"] is False and job["cuda_graphs"]["applied"] is False
    assert any(n.startswith("rows: 8 read, 8 used") for n in job["notes"])
    table = printed[printed.index("method  stack") :]
    assert "lora    lorafuse     " in table and "lora    lorafuse job " in table
    ratio = job["step_s"] / harness["step_s"]
    assert f"lora: lorafuse job/harness step time {ratio:.2f}x" in table
    assert not (tmp_path / "m.jsonl").exists()  # CPU runs measure no GPU peak


def test_job_config_is_the_harness_step(tmp_path):
    """The job's config resolves to the Options the harness's lorafuse runner builds from the same spec."""
    settings = {"gc": "offload", "embeddings_on_host": True, "head_on_host": True, "uncheckpointed_layers": 2}
    spec = _spec("folder", **settings, dequant_cap_mib=48, fp8=True, cuda_graphs=False, fast_path="off")
    cfg = lorafuse_job.job_config(spec, tmp_path / "rows.jsonl", tmp_path / "run")
    assert cfg.options() == lorafuse_stack._options(spec)
    assert (cfg.model.quant, cfg.model.compute_dtype, cfg.lora.r, cfg.lora.alpha) == ("nf4", "float32", 16, 32.0)
    assert cfg.lora.targets == lorafuse_stack.PROJ7 and cfg.lora.dropout == 0.0
    assert (cfg.data.format, cfg.data.max_length, cfg.data.packing, cfg.data.val_size) == ("text", SEQ, False, 0)
    train = cfg.train
    assert (train.micro_batch_size, train.grad_accum, train.max_steps, train.log_every) == (BATCH, 1, 13, 1)
    assert (train.optimizer, train.save_every, train.device) == ("paged_adamw_8bit", 13, "cpu")
    lora = lorafuse_job.job_config(_spec("folder", method="lora"), tmp_path / "rows.jsonl", tmp_path / "run")
    assert lora.model.quant == "none"


def test_rows_are_exactly_seq_tokens(tmp_path, tiny_model_dir):
    """Every row the job tokenizes is seq tokens: each micro-batch is batch x seq real tokens, no padding."""
    from lorafuse.data import build_datasets
    from lorafuse.model.load import load_tokenizer

    spec = _spec(str(tiny_model_dir), warmup=1, steps=2)
    cfg = lorafuse_job.job_config(spec, lorafuse_job.write_rows(spec, tmp_path / "rows.jsonl"), tmp_path / "run")
    train, _, _ = build_datasets(cfg.data, load_tokenizer(str(tiny_model_dir)), seed=0, cache_dir=str(tmp_path))
    assert len(train) == 3 * BATCH and {len(train[i]["input_ids"]) for i in range(len(train))} == {SEQ}


def test_the_step_is_the_wall_time_between_rows_and_the_loops_own_time_stands_beside():
    """With tokens_per_s in the rows (one step a row), a step is the time a user waits (the row's tokens over its
    tokens_per_s); the loop's own training time (time_s differences) stands beside it."""
    n = BATCH * SEQ
    rows = [
        {"step": k, "loss": 5.0, "time_s": t, "tokens": k * n, "tokens_per_s": n / wall, "memory_mb": 1.0}
        for k, (t, wall) in enumerate([(0.5, 0.9), (0.8, 0.35), (1.1, 0.34), (1.45, 0.4)], 1)
    ]
    got = lorafuse_job.summarize({"warmup": 1, "steps": 3, "batch": BATCH, "seq": SEQ}, rows)
    assert got["step_times"] == pytest.approx([0.35, 0.34, 0.4]) and got["step_s"] == pytest.approx(0.35)
    assert got["loop_step_times"] == pytest.approx([0.3, 0.3, 0.35]) and got["loop_step_s"] == pytest.approx(0.3)
    assert got["tokens_per_s"] == pytest.approx(n / 0.35)


def test_step_times_from_the_running_time():
    """time_s is the loop's running total: a step takes its row's time_s minus the previous row's; a skipped step
    (no time) shares the next row's; evaluation rows are not steps."""
    rows = [
        {"step": 1, "loss": 6.0, "time_s": 0.5, "tokens": 64, "memory_mb": 10.0},
        {"step": 2, "loss": None, "skipped": True},
        {"step": 3, "loss": 5.0, "time_s": 1.1, "tokens": 192, "memory_mb": 12.0},
        {"step": 3, "eval_loss": 5.5},
        {"step": 4, "loss": 4.0, "time_s": 1.5, "tokens": 256, "memory_mb": 11.0},
    ]
    assert lorafuse_job.step_times(rows) == [0.5, 0.3, 0.3, 0.4]
    spec = {"warmup": 1, "steps": 3, "batch": BATCH, "seq": SEQ}
    got = lorafuse_job.summarize(spec, rows)
    assert got["status"] == "ok" and got["step_times"] == [0.3, 0.3, 0.4] and got["step_s"] == 0.3
    assert (got["loss_first"], got["loss_last"], got["metrics_memory_mb"]) == (6.0, 4.0, 12.0)
    assert got["tokens_per_s"] == pytest.approx(BATCH * SEQ / 0.3)
    short = lorafuse_job.summarize({**spec, "seq": 64}, rows)
    assert short["status"] == "error" and "not the harness's" in short["reason"]
    retry = rows + [{"step": 2, "event": "oom_retry", "micro_batch_size": 1}]
    assert lorafuse_job.summarize(spec, retry)["status"] == "oom"


def test_runs_with_the_job():
    args = bench.parse_args(["--job", "--stacks", "lorafuse,hf", "--methods", "qlora,full"])
    assert bench.plan_runners(args) == [
        ("lorafuse", "qlora", "harness"),
        ("lorafuse", "qlora", "job"),
        ("hf", "qlora", "harness"),
        ("lorafuse", "full", "harness"),
        ("hf", "full", "harness"),
    ]
    assert bench._script("lorafuse", "job").name == "lorafuse_job.py"
    assert bench._script("hf").name == "hf_stack.py"
    assert bench._row(args, "r", "lorafuse", "qlora", {}, {}, ("c", None), runner="job")["runner"] == "job"
    assert bench._row(args, "r", "hf", "qlora", {}, {}, ("c", None))["runner"] == "harness"


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--random-init", "--stacks", "lorafuse"], "--random-init"),
        (["--objective", "dpo"], "--objective dpo"),
        (["--stacks", "hf,unsloth"], "lorafuse to --stacks"),
        (["--stacks", "lorafuse", "--methods", "full"], "qlora or lora to --methods"),
    ],
)
def test_job_refuses_what_it_cannot_time(argv, said, capsys):
    """`lorafuse bench --job` with a combination it cannot run exits 2 with the problem and its fix, no traceback."""
    assert cli.main(["bench", "--job", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --job") and "fix:" in err and said in err and "Traceback" not in err


def test_table_puts_the_job_beside_the_harness():
    def row(stack, step, peak, runner="harness"):
        return {
            "stack": stack,
            "method": "qlora",
            "runner": runner,
            "status": "ok",
            "step_s": step,
            "tokens_per_s": 2048 / step,
            "peak_alloc_gib": peak,
            "device": "cpu",
            "reason": None,
        }

    rows = [row("lorafuse", 0.5, 6.0), row("lorafuse", 0.55, 6.5, "job"), row("unsloth", 0.6, 8.0)]
    text = bench_table.render(rows)
    assert "qlora   lorafuse job    0.550" in text
    assert "qlora: lorafuse vs unsloth: speed 1.20x, memory 0.75x" in text
    assert "qlora: lorafuse job vs unsloth: speed 1.09x" in text
    assert "qlora: lorafuse job/harness step time 1.10x (0.550 s / 0.500 s" in text
    seed = bench_table.render_seed_table(rows[:2]).splitlines()
    assert seed[3].split()[:2] == ["qlora", "6.00"]  # the seed's table shows the harness's step, not the job's


def test_the_script_answers_a_bad_combination_as_the_cli_does():
    """`python benchmarks/bench.py ...` goes through lorafuse's command-line boundary: one error, exit 2."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench.py"), "--job", "--objective", "dpo", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCH.parent,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: --job"), done.stderr
    assert "Traceback" not in done.stderr and "fix:" in done.stderr
