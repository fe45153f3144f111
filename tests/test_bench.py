"""Smoke tests of the benchmark harness and the GPU check's no-GPU path.

They check that the harness runs and produces its table, markdown and CSV; they assert
nothing about speed (speed is measured by `python -m pyllm bench`, never tested).
"""
import argparse
import csv
import os
import subprocess
import sys

import pytest
import torch

from pyllm import bench, gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(**kw):
    base = dict(ops=None, models=False, device="cpu", quick=True, output="", csv=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_quick_bench_produces_table_markdown_and_csv(tmp_path, capsys):
    md, rows_csv = tmp_path / "bench.md", tmp_path / "results.csv"
    assert bench.main(_args(output=str(md), csv=str(rows_csv))) == 0
    out = capsys.readouterr().out

    assert "limits: copy" in out and "GFLOP/s float32" in out
    for op in ("layer_norm", "add_layer_norm", "masked_softmax", "rms_norm", "attention"):
        assert op in out, f"{op} missing from the printed table"
    assert "MISMATCH" not in out, "a benchmarked pyllm op disagrees with its torch baseline"

    text = md.read_text()
    assert "## Measured limits" in text and "## Results" in text and "Quick mode" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| op |")]
    ops_in_table = {line.split("|")[1].strip() for line in table_rows}
    assert {"layer_norm", "add_layer_norm", "masked_softmax", "rms_norm", "attention"} <= ops_in_table

    with open(rows_csv) as f:
        rows = list(csv.DictReader(f))
    assert rows and set(bench.CSV_FIELDS) == set(rows[0])
    timed = {(r["op"], r["dtype"], r["baseline"]) for r in rows}
    assert ("layer_norm", "float32", "F.layer_norm") in timed
    assert ("masked_softmax", "bfloat16", "torch.softmax (no mask, floor)") in timed
    for r in rows:
        assert float(r["pyllm_us"]) > 0 and float(r["baseline_us"]) > 0 and float(r["speedup"]) > 0
        assert r["quick"] == "1"


def test_quick_never_overwrites_default_docs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench.main(_args(ops=["layer_norm"], output=bench.DEFAULT_OUTPUT)) == 0
    assert not (tmp_path / bench.DEFAULT_OUTPUT).exists()
    assert not (tmp_path / bench.DEFAULT_CSV).exists()
    assert "not overwriting" in capsys.readouterr().out


def test_unknown_op_is_a_clear_error(capsys):
    assert bench.main(_args(ops=["layer_nrom"])) == 2
    assert "layer_nrom" in capsys.readouterr().err


def test_models_flag_reports_availability(capsys):
    assert bench.main(_args(ops=[], models=True)) == 0
    out = capsys.readouterr().out
    assert "model-level benchmarks" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_bench_without_gpu_exits_2(capsys):
    assert bench.main(_args(device="cuda")) == 2
    assert "no CUDA device visible" in capsys.readouterr().err


def test_gpu_check_without_gpu_exits_2_cli(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    report = tmp_path / "gpu_report.md"
    p = subprocess.run([sys.executable, "-m", "pyllm", "gpu-check", "--report", str(report)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no CUDA device visible" in p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert not report.exists()


def test_gpu_check_sanitizer_script_runs_on_cpu(monkeypatch, capsys):
    # The script compute-sanitizer runs on GPU day; run it here on CPU kernels so that a
    # mistake in the script itself is found before a GPU machine is lent.
    monkeypatch.setenv("PYLLM_SANITIZE_DEVICE", "cpu")
    exec(compile(gpu_check.SANITIZER_SCRIPT, "pyllm_sanitize.py", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert ("exercised: norms+softmax torch.float32; attention torch.float32; norms+softmax torch.float16; "
            "attention torch.float16; norms+softmax torch.bfloat16; attention torch.bfloat16") in out
