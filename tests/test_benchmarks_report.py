"""The benchmarks' table and JSON format (no model loaded, nothing measured)."""

from __future__ import annotations

import json

import pytest

from benchmarks.report import ROW_KEYS, emit, format_table, make_row, write_json

META = {"cpu": "Test CPU", "capability": "AVX2", "native_bf16": False, "dtype": "float32"}


def _rows() -> list[dict]:
    return [
        make_row("steered_generation_tok_s", 250.0, "tok/s", meta=META, baseline=25.0, ceiling=500.0,
                 note="engine decode, refill; batch 32"),
        make_row("steering_overhead", 0.03, "fraction", meta=META, baseline=0.05),
        make_row("train_fp32_tok_s", 800.0, "tok/s", meta={**META, "dtype": "torch.bfloat16"}, ceiling=4000.0,
                 note="x" * 200),
        make_row("quick_pipeline_peak_rss_mb", 2048.5, "MiB", meta=META),
    ]


def test_row_keys_ratio_and_share():
    rows = _rows()
    assert all(tuple(r) == ROW_KEYS for r in rows)
    gen, overhead, train, rss = rows
    assert gen["ratio"] == pytest.approx(10.0) and gen["share_of_ceiling"] == pytest.approx(0.5)
    assert overhead["ratio"] == pytest.approx(0.6) and overhead["value"] == 0.03  # fractions, not percent
    assert train["dtype"] == "bfloat16" and train["ratio"] is None and train["share_of_ceiling"] == pytest.approx(0.2)
    assert rss["baseline"] is rss["ratio"] is rss["ceiling"] is rss["share_of_ceiling"] is rss["note"] is None
    assert make_row("x", 1.0, "s", meta=META, baseline=0)["ratio"] is None


def test_json_is_a_list_of_rows_with_exactly_the_keys(tmp_path):
    path = tmp_path / "sub" / "bench.json"
    write_json([{**_rows()[0], "extra": 1}] + _rows()[1:], path)
    data = json.loads(path.read_text())
    assert isinstance(data, list) and len(data) == 4
    assert all(set(r) == set(ROW_KEYS) for r in data)
    assert data[0]["measure"] == "steered_generation_tok_s" and data[0]["ratio"] == pytest.approx(10.0)
    assert {r["capability"] for r in data} == {"AVX2"}
    assert data[2]["note"] == "x" * 200  # the JSON keeps notes whole


def test_table_one_header_one_line_per_row_then_machine(tmp_path, capsys):
    rows = _rows()
    emit(rows, str(tmp_path / "b.json"))
    out = capsys.readouterr().out
    assert out.strip() == format_table(rows)
    lines = out.strip().splitlines()
    assert lines[0].split() == ["measure", "value", "unit", "baseline", "ratio", "ceiling", "share", "note"]
    body = [line for line in lines[1:-1] if not set(line) <= {"-", " "}]
    assert [line.split()[0] for line in body] == [r["measure"] for r in rows]
    assert lines[-1].startswith("machine:") and "AVX2" in lines[-1] and "float32" in lines[-1]
    assert "bfloat16" in lines[-1] and "Test CPU" in lines[-1]
    assert max(len(line) for line in lines[:-1]) < 200  # long notes are cut in the table
    assert " 10" in lines[2] and "0.5" in lines[2]  # ratio and share printed
    assert json.loads((tmp_path / "b.json").read_text())[0]["measure"] == "steered_generation_tok_s"
