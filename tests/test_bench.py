"""Tests of the tools (pyllm/tools/): the registry-driven benchmark harness, the sanitizer
program, the GPU check's no-GPU path and the timing and plot helpers.

They check that the harness runs and produces its table, markdown and CSV; they assert
nothing about speed (speed is measured by `python -m pyllm bench`, never tested).
"""
import argparse
import csv
import os
import struct
import subprocess
import sys
import zlib

import pytest
import torch

import pyllm
import pyllm.ops
from pyllm.tools import bench, timing
from pyllm.tools.plot import save_line_plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = {"native-cpu", "native-cuda", "cuda-emulated", "reference"}


def _args(**kw):
    base = dict(ops=None, models=False, device="cpu", quick=True, output="", csv=None)
    base.update(kw)
    return argparse.Namespace(**base)


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _table_rows(md_text):
    """The results table of a benchmarks page as dicts (header -> cell)."""
    lines = [line for line in md_text.splitlines() if line.startswith("| ")]
    head_i = next(i for i, line in enumerate(lines) if line.startswith("| op |"))
    head = [c.strip() for c in lines[head_i].strip("|").split(" | ")]
    rows = []
    for line in lines[head_i + 1:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != len(head):
            break
        rows.append(dict(zip(head, cells)))
    return rows


def _expected_rows(spec):
    """(op, case, dtype, baseline) of every row the bench must produce for `spec` (quick, CPU)."""
    out = []
    for dtype in bench.DTYPES:
        for c in spec.bench_cases(dtype, torch.device("cpu"), True):
            out += [(c.op, c.case, bench._dname(dtype), name) for name in c.baselines]
    return out


def test_quick_bench_one_op_has_a_row_per_case_with_its_path(tmp_path, capsys):
    md, rows_csv = tmp_path / "bench.md", tmp_path / "results.csv"
    assert bench.main(_args(ops=["layer_norm"], output=str(md), csv=str(rows_csv))) == 0
    out = capsys.readouterr().out
    assert "limits: copy" in out and "GFLOP/s float32" in out

    spec = pyllm.ops.get("layer_norm")
    expected = _expected_rows(spec)
    assert expected, "layer_norm has no bench cases"
    text = md.read_text()
    assert "## Measured limits" in text and "## Results" in text and "Quick mode" in text
    rows = _table_rows(text)
    assert [(r["op"], r["case"], r["dtype"], r["baseline"]) for r in rows] == expected
    # The path column is the backend decision of the call, as pyllm records it.
    c = spec.bench_cases(torch.float32, torch.device("cpu"), True)[0]
    c.candidate()
    decision = pyllm.backends.last_decision("layer_norm")
    for r in rows:
        assert r["path"] in PATHS
        assert r["path"] == decision.path
        if r["path"] == "reference":
            assert r["note"].startswith("reference ("), r
        else:
            assert "reference" not in r["note"], r
        assert "MISMATCH" not in r["note"], r
        assert float(r["pyllm us"]) > 0 and float(r["baseline us"]) > 0
    if pyllm.build_info()["native_loaded"] and pyllm.current_backend() == "auto":
        assert {r["path"] for r in rows} == {"native-cpu"}
    # targets come from the cases
    targets = {name: t for dtype in bench.DTYPES for case in spec.bench_cases(dtype, "cpu", True)
               for name, t in case.targets.items()}
    for r in rows:
        if r["baseline"] in targets:
            assert r["target"] == f">= {targets[r['baseline']]}x"

    with open(rows_csv) as f:
        csv_rows = list(csv.DictReader(f))
    assert csv_rows and set(bench.CSV_FIELDS) == set(csv_rows[0])
    assert [(r["op"], r["case"], r["dtype"], r["baseline"]) for r in csv_rows] == expected
    for r in csv_rows:
        assert r["path"] in PATHS and r["quick"] == "1"
        assert float(r["pyllm_us"]) > 0 and float(r["baseline_us"]) > 0 and float(r["speedup"]) > 0


def test_quick_bench_covers_every_registered_op(tmp_path, capsys):
    md = tmp_path / "bench.md"
    assert bench.main(_args(output=str(md))) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out, "a benchmarked pyllm op disagrees with its torch baseline"
    rows = _table_rows(md.read_text())
    expected = [row for spec in pyllm.ops.specs() for row in _expected_rows(spec)]
    assert [(r["op"], r["case"], r["dtype"], r["baseline"]) for r in rows] == expected
    assert {r["op"] for r in rows} >= {s.name for s in pyllm.ops.specs()}
    assert all(r["path"] in PATHS for r in rows)


def test_ops_take_the_attention_alias_and_registry_order(capsys):
    specs, unknown = bench.resolve_ops(["attention", "masked_softmax", "layer_norm"])
    assert not unknown
    names = [s.name for s in pyllm.ops.specs()]
    assert [s.name for s in specs] == [n for n in names
                                       if n in ("scaled_dot_product_attention", "masked_softmax", "layer_norm")]
    assert bench.resolve_ops(None)[0] == pyllm.ops.specs()


def test_quick_never_overwrites_default_docs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench.main(_args(ops=["layer_norm"], output=bench.DEFAULT_OUTPUT)) == 0
    assert not (tmp_path / bench.DEFAULT_OUTPUT).exists()
    assert not (tmp_path / bench.DEFAULT_CSV).exists()
    assert "not overwriting" in capsys.readouterr().out


def test_unknown_op_is_a_clear_error(capsys):
    assert bench.main(_args(ops=["layer_nrom"])) == 2
    err = capsys.readouterr().err
    assert "layer_nrom" in err and "layer_norm" in err


def test_unknown_op_cli_exits_2():
    p = subprocess.run([sys.executable, "-m", "pyllm", "bench", "--quick", "--output", "", "--ops", "nope"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "unknown op(s) ['nope']" in p.stderr and "Traceback" not in p.stderr


def test_models_flag_reports_availability(capsys):
    assert bench.main(_args(ops=[], models=True)) == 0
    out = capsys.readouterr().out
    assert "model-level benchmarks (pyllm.tools.hf_bench.run)" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_bench_without_gpu_exits_2(capsys):
    assert bench.main(_args(device="cuda")) == 2
    assert "no CUDA device visible" in capsys.readouterr().err


def test_gpu_check_without_gpu_exits_2_cli(tmp_path):
    env = dict(_env(), CUDA_VISIBLE_DEVICES="")
    report = tmp_path / "gpu_report.md"
    p = subprocess.run([sys.executable, "-m", "pyllm", "gpu-check", "--report", str(report)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no CUDA device visible" in p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert not report.exists()


@pytest.mark.skipif(not pyllm.build_info()["native_loaded"], reason="needs the native CPU kernels")
def test_sanitizer_module_runs_every_registered_op_on_cpu():
    # The program compute-sanitizer runs on GPU day; run it here on the CPU kernels so that a
    # mistake in it is found before a GPU machine is lent.
    p = subprocess.run([sys.executable, "-m", "pyllm.tools.sanitize", "--device", "cpu"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    line = next(line for line in p.stdout.splitlines() if line.startswith("exercised: "))
    assert line[len("exercised: "):].split(", ") == [s.name for s in pyllm.ops.specs()]
    for spec in pyllm.ops.specs():
        for dt in ("float32", "float16", "bfloat16"):
            n = len(spec.samples("cpu", getattr(torch, dt), requires_grad=True))
            assert f"{dt:9s} {n}/{n} samples passed" in p.stdout, (spec.name, dt)
    assert "FAIL" not in p.stdout


def test_sanitizer_fails_loudly_when_no_kernel_runs():
    # A call that does not reach a kernel is a failure, never a pass: here a stand-in spec whose
    # public function runs layer_norm on the reference backend.
    from types import SimpleNamespace

    from pyllm.tools import sanitize

    spec = pyllm.ops.get("layer_norm")

    def on_reference(*args, **kwargs):
        with pyllm.use_backend("torch"):
            return spec.functional(*args, **kwargs)

    sample = spec.samples("cpu", torch.float32, requires_grad=True)[1]
    why = sanitize.run_sample(SimpleNamespace(name="layer_norm", functional=on_reference), sample, lambda: None)
    assert why is not None and "no kernel ran" in why and "a kernel is missing" in why


def test_core_does_not_import_the_tools():
    code = ("import sys, pyllm, pyllm.functional, pyllm.nn, pyllm.models, pyllm.ops; pyllm.ops.specs(); "
            "bad = sorted(m for m in sys.modules if m.startswith('pyllm.tools')); print(bad); assert not bad")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


def test_interleaved_rotates_and_counts_calls():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    ticks = []
    times = timing.interleaved(timing.Clock("cpu"), fns, reps=4, warmup=2, inner=3, progress=lambda: ticks.append(1))
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in times.values() for t in v)
    assert calls[:6] == list("aabbcc")                   # warm-up, then
    timed = calls[6:]
    assert len(timed) == 4 * 3 * 3                       # reps x names x inner
    firsts = [timed[i * 9] for i in range(4)]
    assert firsts == ["a", "b", "c", "a"]                # the order rotates every repetition
    assert len(ticks) == 3 * 2 + 4 * 3
    assert timing.paired_speedup([1.0, 2.0, 4.0], [2.0, 2.0, 2.0]) == 1.0
    assert timing.medians({"x": [0.001, 0.003, 0.002]}, scale=1e3) == {"x": pytest.approx(2.0)}


def test_save_line_plot_writes_an_rgb_png(tmp_path):
    path = tmp_path / "sub" / "curve.png"
    assert save_line_plot(str(path), [3.0, 2.0, 1.5, 1.2], xs=[1, 2, 3, 4], title="loss", ylabel="loss") == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h, depth, color = struct.unpack(">IIBB", data[16:26])
    assert (w, h, depth, color) == (640, 400, 8, 2)      # 8-bit RGB
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos: pos + 4])
        if data[pos + 4: pos + 8] == b"IDAT":
            idat += data[pos + 8: pos + 8 + n]
        pos += 12 + n
    assert len(zlib.decompress(idat)) == h * (1 + 3 * w)
    with pytest.raises(ValueError, match="as many xs as ys"):
        save_line_plot(str(path), [1.0, 2.0], xs=[1])
