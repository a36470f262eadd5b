"""Reading data sources: every supported kind, and each user error with its fix."""

from __future__ import annotations

import json
import os

import pytest

from lorafuse.data.readers import demo_data_path, read_rows, source_fingerprint
from lorafuse.errors import DataError

ROWS = [
    {"instruction": "足し算: 2+3", "input": "", "output": "5"},
    {"instruction": "Translate", "input": "猫", "output": "cat"},
]


def test_jsonl_rows_and_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps(ROWS[0], ensure_ascii=False) + "\n\n" + json.dumps(ROWS[1], ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    src = read_rows(str(p))
    assert src.rows == ROWS
    assert src.where(1) == f"line 3 of {p}"  # the blank line is skipped but line numbers stay the file's


@pytest.mark.parametrize("layout", ["list", "data", "split"])
def test_json_layouts(tmp_path, layout):
    body = {"list": ROWS, "data": {"data": ROWS, "version": 2}, "split": {"train": ROWS, "test": ROWS[:1]}}[layout]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    assert read_rows(str(p)).rows == ROWS


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "d.json", ROWS)
    assert read_rows(str(p)).rows == ROWS


def test_json_object_without_rows_says_which_keys(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"items": ROWS}), encoding="utf-8")
    with pytest.raises(DataError, match=r"keys \['items'\]") as e:
        read_rows(str(p))
    assert '"data"' in e.value.fix


def test_csv_with_excel_bom_and_tsv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes("\ufeffinstruction,input,output\n足し算: 2+3,,5\nTranslate,猫,cat\n".encode("utf-8"))
    assert read_rows(str(p)).rows == ROWS
    t = tmp_path / "d.tsv"
    t.write_text("instruction\tinput\toutput\nTranslate\t猫\tcat\n", encoding="utf-8")
    assert read_rows(str(t)).rows == ROWS[1:]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    assert read_rows(str(p)).rows == ROWS


def test_datasets_save_to_disk_folder_and_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert read_rows(str(tmp_path / "ds")).rows == ROWS
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "eval": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(tmp_path / "dd"))
    assert read_rows(str(tmp_path / "dd"), split="eval").rows == ROWS[:1]
    with pytest.raises(DataError, match="has splits") as e:
        read_rows(str(tmp_path / "dd"), split="validation")
    assert "data.split" in e.value.fix


def test_builtin_demo_translates_both_ways_and_holds_out_whole_combinations():
    import re

    from lorafuse.demo import heldout_rows

    src, held = read_rows("builtin:demo"), heldout_rows()
    assert all(set(r) == {"instruction", "output"} for r in src.rows + held)
    to_en = [r for r in src.rows if r["instruction"].startswith("英語に翻訳してください: ")]
    assert len(to_en) * 2 == len(src.rows)  # the other half translates into Japanese
    assert not {r["instruction"] for r in src.rows} & {r["instruction"] for r in held}

    def words(rows) -> set[str]:  # the English sentences' words: a held-out sentence recombines trained ones
        return {w for r in rows for w in re.findall(r"[a-z]+", (r["output"] + r["instruction"]).lower())}

    assert words(held) <= words(src.rows) and len(held) == 80
    assert demo_data_path().is_file()


def test_num_rows_keeps_the_first_rows(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS * 5)
    src = read_rows(str(p), num_rows=3)
    assert src.rows == (ROWS * 5)[:3]


def test_missing_file_names_path_and_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        read_rows("data/train.jsonl")
    msg = str(e.value)
    assert "data/train.jsonl" in msg and str(tmp_path) in msg and "current directory" in msg


def test_empty_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        read_rows(str(p))
    q = tmp_path / "e.json"
    q.write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        read_rows(str(q))


def test_malformed_json_line_names_line_and_shows_its_start(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"instruction": "oops", "output": 3,\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as e:
        read_rows(str(p))
    assert "line 3" in str(e.value) and '{"instruction": "oops"' in str(e.value)
    assert "one complete JSON object" in e.value.fix


def test_malformed_json_file_names_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n {"a": 1},\n {"a": 2,}\n]', encoding="utf-8")
    with pytest.raises(DataError, match="line 3"):
        read_rows(str(p))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + '\n["a", "b"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2 .* list"):
        read_rows(str(p))


def test_non_utf8_names_byte_offset_line_and_encoding(tmp_path):
    good = json.dumps(ROWS[0], ensure_ascii=False) + "\n"
    bad = json.dumps({"instruction": "翻訳", "input": "", "output": "translation"}, ensure_ascii=False) + "\n"
    p = tmp_path / "sjis.jsonl"
    p.write_bytes(good.encode("utf-8") + bad.encode("cp932"))
    with pytest.raises(DataError) as e:
        read_rows(str(p))
    offset = len(good.encode("utf-8")) + bad.encode("cp932").index("翻".encode("cp932"))
    assert f"byte offset {offset}" in str(e.value) and "line 2" in str(e.value)
    assert "cp932" in str(e.value) and "iconv -f cp932 -t UTF-8" in e.value.fix


def test_unknown_extension(tmp_path):
    p = tmp_path / "d.xlsx"
    p.write_bytes(b"PK\x03\x04 not text")
    with pytest.raises(DataError, match="xlsx|UTF-8"):
        read_rows(str(p))
    q = tmp_path / "d.txt"
    q.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="unknown data file type"):
        read_rows(str(q))


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    with pytest.raises(DataError, match="save_to_disk"):
        read_rows(str(tmp_path))


def test_hub_name_offline_says_hub_unreachable_and_how_to_pass_a_file(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        read_rows("lorafuse-test-nobody/does-not-exist-xyz")
    assert "cannot be reached" in str(e.value)
    assert "data.path=" in e.value.fix and ".jsonl" in e.value.fix


def test_fingerprint_follows_content(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    fp = source_fingerprint(str(p))
    assert fp == read_rows(str(p)).fingerprint
    st = os.stat(p)
    write_jsonl(p, ROWS[::-1])
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, different content: still a new fingerprint
    assert source_fingerprint(str(p)) != fp
    assert source_fingerprint("owner/name") is None
