"""``python -m pyllm train-demo``: train two tiny transformers on pyllm's fused ops, on CPU.

1. A character-level decoder-only language model (:class:`DecoderOnlyTransformer`) learns the
   shipped public-domain text by next-token prediction (labels = inputs shifted by one), then
   samples text with the KV cache.
2. A classifier (:class:`TransformerEncoder` + :class:`ClassifierHead`) learns the
   deterministic "does ``a`` come before ``b``?" task and is scored on held-out sequences.

Writes the training curves (``loss_curve.png``, ``classifier_loss.png``; matplotlib), ``sample.txt``
and ``results.json`` into ``--out``. ``--steps N`` sets the number of optimizer steps of each part (default 600 / 300).
"""
from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pyllm import explain
from pyllm.models.datasets import ORDER_PAD, ORDER_VOCAB, CharTokenizer, load_text, order_task
from pyllm.models.layers import ClassifierHead
from pyllm.models.transformer import DecoderOnlyTransformer, TransformerEncoder
from pyllm.tools.plot import save_line_plot

LM_STEPS, CLF_STEPS = 600, 300
PROMPTS = ("Shall I compare thee", "Four score and", "Tyger Tyger")


def _step(loss, opt, sched, bar, losses, clip=None):
    """One optimizer step (gradient clipping to norm 1 when `clip` gives the parameters)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()
    losses.append(loss.item())
    bar.update(1)
    bar.set_postfix(loss=f"{loss.item():.3f}")


def train_language_model(steps: int, seed: int = 0, block: int = 64, batch: int = 16):
    torch.manual_seed(seed)
    text = load_text()
    tok = CharTokenizer(text)
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    model = DecoderOnlyTransformer(tok.vocab_size, d_model=64, num_layers=2, num_heads=4, d_ff=256,
                                   dropout=0.0, max_sequence_length=block, norm_first=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=max(steps, 1), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(total=steps, desc="language model", dynamic_ncols=True)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=g)
        chunk = torch.stack([data[s: s + block + 1] for s in starts.tolist()])
        inputs, labels = chunk[:, :-1], chunk[:, 1:]          # next-token prediction
        logits = model(inputs)                                # causal without any mask tensor
        loss = F.cross_entropy(logits.reshape(-1, tok.vocab_size), labels.reshape(-1))
        _step(loss, opt, sched, bar, losses, clip=model.parameters())
    bar.close()

    model.eval()
    with torch.no_grad():  # loss over the whole text, no dropout, in windows of `block`
        n = (len(data) - 1) // block
        x = data[: n * block].view(n, block)
        y = data[1: n * block + 1].view(n, block)
        eval_loss = F.cross_entropy(model(x).reshape(-1, tok.vocab_size), y.reshape(-1)).item()
    greedy, sampled = [], []
    gen = torch.Generator().manual_seed(seed)
    for prompt in PROMPTS:  # fill the trained context of `block` characters (KV-cached decoding)
        ids = torch.tensor([tok.encode(prompt)])
        greedy.append(tok.decode(model.generate(ids, block - ids.shape[1])[0]))
        sampled.append(tok.decode(model.generate(ids, block - ids.shape[1], do_sample=True, temperature=0.8,
                                                 top_k=10, generator=gen)[0]))
    return dict(model=model, losses=losses, eval_loss=eval_loss, vocab_size=tok.vocab_size,
                corpus_chars=len(text), greedy=greedy, sampled=sampled)


def train_classifier(steps: int, seed: int = 0, batch: int = 64):
    torch.manual_seed(seed)
    x_train, y_train = order_task(4000, seed=seed)
    x_test, y_test = order_task(1000, seed=seed + 1)
    encoder = TransformerEncoder(len(ORDER_VOCAB), d_model=64, num_layers=2, num_heads=4, d_ff=128,
                                 dropout=0.0, max_sequence_length=x_train.shape[1], pad_token_id=ORDER_PAD)
    head = ClassifierHead(64, 2, pooling="first")  # log-probabilities from the [CLS] position
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=max(steps, 1), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(total=steps, desc="classifier", dynamic_ncols=True)
    encoder.train()
    head.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (batch,), generator=g)
        logp = head(encoder(x_train[idx]))                   # padding mask from pad_token_id
        loss = F.nll_loss(logp, y_train[idx])
        _step(loss, opt, sched, bar, losses)
    bar.close()
    encoder.eval()
    head.eval()
    with torch.no_grad():
        acc = (head(encoder(x_test)).argmax(-1) == y_test).float().mean().item()
        train_acc = (head(encoder(x_train)).argmax(-1) == y_train).float().mean().item()
    return dict(losses=losses, test_accuracy=acc, train_accuracy=train_acc, n_test=len(y_test))


def main(args) -> int:
    lm_steps = args.steps if getattr(args, "steps", None) is not None else LM_STEPS
    clf_steps = args.steps if getattr(args, "steps", None) is not None else CLF_STEPS
    if lm_steps < 1:
        raise SystemExit("pyllm train-demo: --steps must be >= 1")
    out = getattr(args, "out", None) or "train_demo_out"
    os.makedirs(out, exist_ok=True)

    # Tiny matrices: one thread is as fast as two and much faster on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(lm_steps, clf_steps, out)
    finally:
        torch.set_num_threads(threads)


def _run(lm_steps, clf_steps, out) -> int:
    t0 = time.perf_counter()
    lm = train_language_model(lm_steps)
    t_lm = time.perf_counter() - t0
    print(explain("scaled_dot_product_attention"))
    print(explain("add_layer_norm"))
    t1 = time.perf_counter()
    clf = train_classifier(clf_steps)
    t_clf = time.perf_counter() - t1

    def smooth(xs, k=20):
        return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]

    # Training curves, smoothed over 20 steps.
    save_line_plot(os.path.join(out, "loss_curve.png"), smooth(lm["losses"]), xs=range(1, len(lm["losses"]) + 1),
                   title="character-level language model", xlabel="step",
                   ylabel="cross-entropy (smoothed over 20 steps)")
    save_line_plot(os.path.join(out, "classifier_loss.png"), smooth(clf["losses"]),
                   xs=range(1, len(clf["losses"]) + 1), title="classifier ('a' before 'b'?)", xlabel="step",
                   ylabel="cross-entropy (smoothed over 20 steps)")
    with open(os.path.join(out, "sample.txt"), "w") as f:
        f.write("greedy:\n" + "\n".join(lm["greedy"]) + "\n\nsampled (T=0.8, top_k=10):\n"
                + "\n".join(lm["sampled"]) + "\n")
    results = {
        "language_model": {
            "steps": lm_steps, "vocab_size": lm["vocab_size"], "corpus_chars": lm["corpus_chars"],
            "initial_loss": lm["losses"][0], "uniform_loss": math.log(lm["vocab_size"]),
            "final_train_loss_avg20": sum(lm["losses"][-20:]) / len(lm["losses"][-20:]),
            "eval_loss_full_text": lm["eval_loss"], "seconds": round(t_lm, 1),
        },
        "classifier": {
            "steps": clf_steps, "final_train_loss_avg20": sum(clf["losses"][-20:]) / len(clf["losses"][-20:]),
            "train_accuracy": clf["train_accuracy"], "test_accuracy": clf["test_accuracy"],
            "n_test": clf["n_test"], "seconds": round(t_clf, 1),
        },
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    r = results["language_model"]
    print(f"\nLanguage model: loss {r['initial_loss']:.3f} -> {r['final_train_loss_avg20']:.3f} "
          f"(train, last 20 steps); {r['eval_loss_full_text']:.3f} on the whole text in eval mode "
          f"(uniform guess: {r['uniform_loss']:.3f}); {t_lm:.1f} s")
    print("Greedy continuations:")
    for line in lm["greedy"]:
        print("  " + repr(line))
    print("Sampled (T=0.8, top_k=10):")
    for line in lm["sampled"]:
        print("  " + repr(line))
    c = results["classifier"]
    print(f"\nClassifier ('a' before 'b'?): test accuracy {100 * c['test_accuracy']:.1f}% on {c['n_test']} "
          f"held-out sequences (train {100 * c['train_accuracy']:.1f}%); {t_clf:.1f} s")
    print(f"Wrote {out}/loss_curve.png, classifier_loss.png, sample.txt, results.json")
    return 0
