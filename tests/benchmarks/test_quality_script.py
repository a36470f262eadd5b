"""benchmarks/quality.py: its --smoke run on a CPU (every piece of the GPU grid that runs here), and the quality
column `lorafuse bench --table` reads from its results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_table  # noqa: E402  (the harness's tables, in benchmarks/ beside it)

pytestmark = pytest.mark.slow  # the lab's benchmark scripts, not the product: run with `-m slow`


def _smoke(cwd: Path, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`quality.py --smoke ARGV --out CWD` run in CWD; it must succeed."""
    script = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--smoke", *argv, "--out", str(cwd)]
    done = subprocess.run(script, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_smoke_run_scores_every_method_it_can_and_trains_the_zeroed_rows(tmp_path):
    done = _smoke(tmp_path)
    (results,) = tmp_path.glob("*-cpu-quality.jsonl")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    runs = [r for r in rows if r["kind"] == "run"]
    status = {(r["method"], r["zeroed"]): r["status"] for r in runs}
    for zeroed in (False, True):
        for method in ("full", "lora", "qlora", "seed lora"):
            assert status[(method, zeroed)] == "ok", [r for r in runs if r["method"] == method]
        for method in ("qlora+fast", "qlora+fast+fp8", "seed qlora"):
            assert status[(method, zeroed)] == "unavailable"
    assert all(0.0 <= r["accuracy"] <= r["token_accuracy"] <= 1.0 for r in runs if r["status"] == "ok")
    assert all(0.0 < r["answer_loss"] < 20.0 for r in runs if r["status"] == "ok")  # nats per token, vocab ~40
    # the zeroed base looks like a real one to lorafuse: the two template tokens' rows are found and trained
    for r in runs:
        if r["stack"] == "lorafuse" and r["zeroed"] and r["status"] == "ok":
            assert {4, 5} <= set(r["token_rows"]["embed_tokens"]) and {4, 5} <= set(r["token_rows"]["lm_head"]), r
    best = [r for r in rows if r["kind"] == "best"]
    assert len(best) == 2 * 8 and {r["method"] for r in best} >= {"full", "lora", "qlora"}
    assert {r["status"] for r in best if r["method"] == "full projections"} == {"unavailable"}  # run on request
    assert "template rows zeroed" in done.stdout and "| sort digits, exact match | 100% |" in done.stdout


def test_a_base_folder_is_pretrained_once_and_reused_for_a_longer_task(tmp_path):
    def smoke(*extra):
        argv = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--smoke", "--methods", "full", "--out"]
        done = subprocess.run(
            argv + [str(tmp_path / "out"), "--base", str(tmp_path / "base"), *extra],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    assert "pretrained in" in smoke("--pretrain-steps", "7")
    weights = {p: p.read_bytes() for p in (tmp_path / "base").rglob("*.safetensors")}
    assert len(weights) == 2  # the plain and the zeroed base
    out = smoke("--sort-length", "12", "--seeds", "1,2")  # 12 digits: rows longer than the 6-digit default's
    assert "pretrained in" not in out and "bases from" in out and "mean of seeds 1,2" in out
    assert {p: p.read_bytes() for p in (tmp_path / "base").rglob("*.safetensors")} == weights
    rows = [json.loads(line) for line in next((tmp_path / "out").glob("*.jsonl")).read_text().splitlines()]
    runs = [r for r in rows if r["kind"] == "run"]
    want = {("sort 6 digits", 0), ("sort 12 digits", 1), ("sort 12 digits", 2)}
    assert {(r["task"], r["seed"]) for r in runs} == want
    assert {r["pretrain_steps"] for r in runs} == {7} and all(r["status"] == "ok" for r in runs)
    best = [r for r in rows if r["kind"] == "best" and r["method"] == "full" and r["seeds"] == [1, 2]]
    assert len(best) == 2  # one per base


def test_the_best_cell_is_the_best_mean_over_seeds():
    """A rate that wins one seed by luck loses to one that is steadier and higher on average; the range and the
    ratio to full fine-tuning come from the means."""
    import quality
    import quality_report

    def run(method, lr, seed, acc):
        return {"kind": "run", "run": "r", "method": method, "zeroed": False, "lr": lr, "seed": seed,
                "status": "ok", "accuracy": acc, "token_accuracy": acc}  # fmt: skip

    rows = [run("lora", 1e-3, 0, 0.9), run("lora", 1e-3, 1, 0.1), run("lora", 3e-3, 0, 0.6), run("lora", 3e-3, 1, 0.7)]
    rows += [run("full", 3e-4, 0, 0.8), run("full", 3e-4, 1, 0.6)]
    best = {r["method"]: r for r in quality_report.best_rows(rows, quality.METHODS) if not r["zeroed"]}
    assert best["lora"]["lr"] == 3e-3 and best["lora"]["accuracy"] == pytest.approx(0.65)
    assert (best["lora"]["accuracy_min"], best["lora"]["accuracy_max"], best["lora"]["seeds"]) == (0.6, 0.7, [0, 1])
    assert best["lora"]["relative_to_full"] == pytest.approx(0.65 / 0.7)
    assert best["qlora"]["status"] == "unavailable" and best["qlora"]["accuracy"] is None


def test_the_answer_loss_column_is_the_lowest_mean_loss_over_the_grid():
    """The loss block picks each method's lowest mean held-out loss over its rates (not the best-accuracy rate's),
    with its range over the seeds; cells from rows without the field show no loss."""
    import quality
    import quality_report

    def run(method, lr, seed, acc, loss):
        return {"kind": "run", "run": "r", "method": method, "zeroed": False, "lr": lr, "seed": seed,
                "status": "ok", "accuracy": acc, "token_accuracy": acc, "answer_loss": loss}  # fmt: skip

    rows = [run("lora", 1e-3, 0, 0.9, 0.50), run("lora", 1e-3, 1, 0.1, 0.70)]  # best accuracy: mean 0.5
    rows += [run("lora", 3e-3, 0, 0.3, 0.40), run("lora", 3e-3, 1, 0.4, 0.44)]  # lowest loss: mean 0.42
    rows += [run("full", 3e-4, 0, 0.8, None), run("full", 3e-4, 1, 0.6, None)]
    best = {r["method"]: r for r in quality_report.best_rows(rows, quality.METHODS) if not r["zeroed"]}
    assert best["lora"]["lr"] == 1e-3 and best["lora"]["answer_loss_lr"] == 3e-3
    assert best["lora"]["answer_loss"] == pytest.approx(0.42) and best["lora"]["answer_loss_range"] == [0.40, 0.44]
    assert best["full"]["answer_loss"] is None and best["full"]["accuracy"] == pytest.approx(0.7)
    text = quality_report.table(
        quality_report.best_rows(rows, quality.METHODS) , quality.METHODS,
        {"length": 6, "eval_rows": 2, "steps": 1, "batch": 1}, "cpu", [0, 1],
    )  # fmt: skip
    assert "held-out answer loss" in text and "0.4200" in text and "0.400-0.440" in text


def _best(run, method, zeroed, rel):
    return {"kind": "best", "run": run, "method": method, "zeroed": zeroed, "relative_to_full": rel}


def test_the_seed_table_shows_the_newest_quality_run(tmp_path):
    old = [_best("20260101T000000", "lora", z, 0.5) for z in (False, True)]
    new = [_best("20260102T000000", "lora", False, 0.997), _best("20260102T000000", "lora", True, 0.981)]
    new += [_best("20260102T000000", "qlora", False, 0.99), _best("20260102T000000", "qlora", True, None)]
    (tmp_path / "2026-01-02-h100-quality.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in old + new + [{"kind": "run", "run": "20260103T000000"}])
    )
    quality = bench_table.latest_quality(tmp_path)
    assert quality == {"lora": "99.7% / 98.1%", "qlora": "99.0% / n/a"}
    table = bench_table.render_seed_table([], quality)
    assert "99.7% / 98.1%" in table and "not measured" in table and "98%" in table
    assert bench_table.latest_quality(tmp_path / "nothing-here") == {}


def test_runs_side_by_side_share_one_base_and_report_together_by_tag(tmp_path):
    """One process pretrains; two more, one seed each, run at once on that base; --report TAG builds the table over
    both seeds' rows, and refuses a tag with no rows (exit 2)."""
    script = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--out", str(tmp_path / "out")]
    grid = ["--smoke", "--methods", "full", "--base", str(tmp_path / "base")]
    pre = subprocess.run(script + grid + ["--pretrain-steps", "3", "--pretrain-only"], capture_output=True, text=True)
    assert pre.returncode == 0 and "pretrained in" in pre.stdout, pre.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # a pretraining alone writes no result rows
    procs = [
        subprocess.Popen(script + grid + ["--seeds", s, "--tag", "t1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for s in ("0", "1")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    done = subprocess.run(script + ["--report", "t1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mean of seeds 0,1" in done.stdout
    (results,) = (tmp_path / "out").glob("*-quality.jsonl")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    runs = [r for r in rows if r["kind"] == "run"]
    assert sorted((r["seed"], r["zeroed"]) for r in runs) == [(0, False), (0, True), (1, False), (1, True)]
    best = [r for r in rows if r["kind"] == "best"]  # only the report's: a tagged part writes none of its own
    assert {(r["method"], r["zeroed"], r["tag"]) for r in best if r["method"] == "full"} == {
        ("full", False, "t1"),
        ("full", True, "t1"),
    }
    assert all(r["seeds"] == [0, 1] for r in best if r["accuracy"] is not None)
    assert min(r["run"] for r in best) > max(r["run"] for r in runs)  # newest: `bench --table` reads it
    assert set(bench_table.latest_quality(tmp_path / "out")) >= {"lora"}
    missing = subprocess.run(script + ["--report", "t2"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no run rows tagged 't2'" in missing.stderr


def test_loraplus_grid_runs_lorafuse_and_peft_adapters_with_the_ratio(tmp_path):
    _smoke(tmp_path, "--methods", "lora,seed lora", "--bases", "plain", "--loraplus-ratio", "16", timeout=300)
    (results,) = tmp_path.glob("*-cpu-quality.jsonl")
    runs = [json.loads(line) for line in results.read_text().splitlines()]
    runs = [r for r in runs if r["kind"] == "run"]
    assert {r["method"] for r in runs} == {"lora", "seed lora"}
    assert all(r["status"] == "ok" and r["loraplus_lr_ratio"] == 16 for r in runs), runs


def test_rank_sets_every_adapter_s_size(tmp_path):
    sizes = {}
    for rank in (4, 8):
        out = tmp_path / f"r{rank}"
        out.mkdir()
        _smoke(out, "--methods", "lora,seed lora", "--bases", "plain", "--rank", str(rank), timeout=300)
        (results,) = out.glob("*-cpu-quality.jsonl")
        runs = [json.loads(line) for line in results.read_text().splitlines()]
        sizes[rank] = {r["method"]: r["adapter_params"] for r in runs if r["kind"] == "run"}
    # the smoke model: 2 layers, hidden 64, intermediate 128, 2 heads of 32 (k, v as wide as q): r (in + out) a matrix
    per_rank = 2 * (4 * (64 + 64) + 2 * (64 + 128) + (128 + 64))
    for rank in (4, 8):
        assert sizes[rank] == {"lora": rank * per_rank, "seed lora": rank * per_rank}, sizes


def test_the_stand_in_pretrains_a_wider_base_than_the_smoke_run(tmp_path):
    widths = {}
    for flag in ("--smoke", "--stand-in"):
        base = tmp_path / flag.strip("-")
        argv = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), flag, "--device", "cpu", "--pretrain-only"]
        argv += ["--pretrain-steps", "2", "--base", str(base), "--out", str(tmp_path / "out")]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        configs = [json.loads(p.read_text()) for p in base.rglob("config.json")]
        assert len(configs) == 2  # the plain and the zeroed base
        widths[flag] = {(c["hidden_size"], c["num_hidden_layers"]) for c in configs}
    assert widths == {"--smoke": {(64, 2)}, "--stand-in": {(128, 4)}}


def _run_row(tag, method, zeroed, lr, seed, accuracy, **settings):
    return {
        "kind": "run", "tag": tag, "method": method, "stack": "x", "zeroed": zeroed, "lr": lr, "seed": seed,
        "accuracy": accuracy, "token_accuracy": accuracy, "answer_loss": 1 - accuracy, "status": "ok",
        "task": "sort 4 digits", "steps": 5, "batch": 2, "eval_rows": 8, "card": "cpu", "run": "20260101T000000",
        "modules_to_save": None, **settings,
    }  # fmt: skip


def test_a_report_over_several_tags_puts_grids_run_apart_in_one_table(tmp_path, capsys):
    """--report A,B: full fine-tuning and an adapter run as two grids (each its own rates) in one table, each
    relative to the other's full; grids with other settings (the tables trained whole) are refused, not mixed."""
    import quality
    import quality_report

    rows = [_run_row("a", "full", z, 3e-4, s, 0.8) for z in (False, True) for s in (0, 1)]
    rows += [_run_row("b", "lora", z, lr, s, acc) for z in (False, True) for s in (0, 1) for lr, acc in
             ((1e-3, 0.4), (2e-3, 0.6))]  # fmt: skip
    rows += [_run_row("c", "lora", False, 2e-3, s, 0.9, modules_to_save=["lm_head"]) for s in (0, 1)]
    results = tmp_path / "2026-01-01-cpu-quality.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert quality_report.report("a,b", str(tmp_path), quality.METHODS) == 0
    best = [json.loads(line) for line in results.read_text().splitlines()][len(rows) :]
    lora = next(r for r in best if r["method"] == "lora" and not r["zeroed"])
    assert lora["lr"] == 2e-3 and abs(lora["relative_to_full"] - 0.6 / 0.8) < 1e-12 and lora["tag"] == "a,b"
    capsys.readouterr()
    assert quality_report.report("a,c", str(tmp_path), quality.METHODS) == 2
    assert "mix settings" in capsys.readouterr().err


def test_the_pretraining_stream_is_the_tokenizers_ids_looked_up_by_character():
    import quality_data

    tokenizer = quality_data.build_tokenizer()
    text = quality_data.pretraining_text(400, seed=3)
    assert quality_data.char_ids(tokenizer, text).tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        quality_data.char_ids(tokenizer, "sort: 3 1 ?")
