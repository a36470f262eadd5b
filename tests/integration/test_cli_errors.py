"""Bad input through the real CLI: a clear message with the fix, exit status 2, no traceback, nothing damaged.

Each case runs `lorafuse train` in-process on the builtin tiny model with a broken piece of input; the errors are
raised by the real config, data, model and training code (no stand-ins).
"""

from __future__ import annotations

import json

import pytest

from lorafuse.cli import main
from lorafuse.outputs import write_marker


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    out.mkdir()
    write_marker(out, "run")  # an earlier run's folder (a folder lorafuse did not make is refused before anything)
    (out / "keep.txt").write_text("earlier work", encoding="utf-8")
    return out


def _train(capsys, out, *overrides):
    code = main(["train", f"output.dir={out}", "train.max_steps=2", *overrides])
    err = capsys.readouterr().err
    assert (out / "keep.txt").read_text(encoding="utf-8") == "earlier work"  # nothing already written damaged
    return code, err


def _rows(path, rows):
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def test_missing_data_file(capsys, out_dir, tmp_path):
    code, err = _train(capsys, out_dir, f"data.path={tmp_path / 'nope.jsonl'}")
    assert code == 2 and "nope.jsonl" in err and "fix:" in err and "Traceback" not in err


def test_malformed_json_names_the_line(capsys, out_dir, tmp_path):
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    path = _rows(tmp_path / "bad.jsonl", [good, good, '{"instruction": "x", "output": '])
    code, err = _train(capsys, out_dir, f"data.path={path}")
    assert code == 2 and "line 3" in err and "Traceback" not in err


def test_row_missing_a_field_says_how_to_map_it(capsys, out_dir, tmp_path):
    path = _rows(tmp_path / "q.jsonl", [json.dumps({"question": "a", "answer": "b"})] * 3)
    code, err = _train(capsys, out_dir, f"data.path={path}")
    assert code == 2 and "question" in err and "data.fields" in err and "Traceback" not in err


def test_unknown_config_key_suggests_the_nearest(capsys, out_dir):
    code, err = _train(capsys, out_dir, "lora.rank=8")
    assert code == 2 and "lora.r" in err and "Traceback" not in err


def test_out_of_range_value(capsys, out_dir):
    code, err = _train(capsys, out_dir, "lora.dropout=1.5")
    assert code == 2 and "lora.dropout" in err and "Traceback" not in err


def test_target_modules_not_found_lists_the_linears(capsys, out_dir):
    code, err = _train(capsys, out_dir, "lora.targets=[query,value]")
    assert code == 2 and "q_proj" in err and "Traceback" not in err


def test_model_folder_missing(capsys, out_dir, tmp_path):
    code, err = _train(capsys, out_dir, f"model.path={tmp_path / 'no-model'}")
    assert code == 2 and "model folder not found" in err and "Traceback" not in err


def test_debug_shows_the_traceback(capsys, out_dir):
    code = main(["--debug", "train", f"output.dir={out_dir}", "lora.dropout=1.5"])
    assert code != 0 and "Traceback" in capsys.readouterr().err
