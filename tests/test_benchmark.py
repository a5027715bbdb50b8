"""Smoke test of benchmarks/benchmark.py: the tiniest CPU run measures every requested row and writes JSON."""

from __future__ import annotations

import json

import pytest

from benchmarks import benchmark


def test_cpu_benchmark_rows_and_json(tmp_path, capsys):
    out = tmp_path / "results" / "bench.json"
    result = benchmark.main([
        "--cpu", "--sizes", "64:1", "--models", "dpt", "primus", "hf_dpt", "--steps", "1", "--warmup", "0",
        "--hf-config", "tiny", "--threads", "1", "--infer-batch", "1", "--matmul-size", "128", "--out", str(out),
    ])
    assert json.loads(out.read_text()) == result
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"dpt", "primus", "hf_dpt"}
    for row in rows.values():
        assert row["note"] == "", row["note"]
        assert row["train_img_s"] > 0 and row["infer_img_s"] > 0 and row["tflop_per_img"] > 0
        assert row["size"] == 64 and row["batch"] == 1 and row["precision"] == "fp32"
    assert rows["hf_dpt"]["ratio_vs_hf_dpt"] == pytest.approx(1.0)
    assert result["environment"]["versions"]["torch"]
    table = capsys.readouterr().out
    assert "| model" in table and "hf_dpt" in table


def test_unet_plan_has_4x4_bottleneck():
    n_stages, features, strides = benchmark.unet_plan(512)
    assert n_stages == 8 and features == [32, 64, 128, 256, 512, 512, 512, 512] and strides == [1] + [2] * 7
    assert benchmark.unet_plan(1024)[0] == 9
