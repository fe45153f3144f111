"""Padding-free encoders (pyllm.hf.padfree through pyllm.hf.optimize): outputs on real tokens vs the
stock model in fp64 (the oracle) judged against stock sdpa in the same dtype; zeros at pads; the
report says what runs padding-free; revert restores the stock forward."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyllm  # noqa: E402
import pyllm.hf  # noqa: E402
from pyllm.hf import padfree  # noqa: E402
from pyllm.hf.testing import tiny_config, tiny_model  # noqa: E402

from helpers import assert_close_to_ref, assert_grads_close  # noqa: E402

T = transformers
ENCODERS = {
    "bert": lambda: tiny_model("bert", "eager"),
    "roberta": lambda: tiny_model("roberta", "eager"),
    "xlm-roberta": lambda: _from_cfg(T.XLMRobertaModel, T.XLMRobertaConfig(**tiny_config("roberta").to_dict())),
    "electra": lambda: _from_cfg(T.ElectraModel, T.ElectraConfig(
        vocab_size=512, embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.1)),
    "distilbert": lambda: tiny_model("distilbert", "eager"),
    "bert-classifier": lambda: _from_cfg(T.BertForSequenceClassification, tiny_config("bert", num_labels=3)),
}


def _from_cfg(cls, cfg):
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    return cls(cfg).eval()


_cache = {}


def stock(name):
    if name not in _cache:
        _cache[name] = ENCODERS[name]()
    return copy.deepcopy(_cache[name])


def batch(model, layout, b=4, length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 500, (b, length), generator=g)
    am = torch.ones(b, length, dtype=torch.long)
    lens = {"right": [11, 1, 6, 9], "left": [11, 1, 6, 9], "none": [11] * 4, "single": [5]}[layout][:b]
    for i, n in enumerate(lens):
        if layout == "left":
            am[i, : length - n] = 0
        else:
            am[i, n:] = 0
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return ids.masked_fill(am == 0, pad), am


def _first(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("layout", ["right", "left", "none", "single"])
@pytest.mark.parametrize("name", list(ENCODERS))
def test_padding_free_matches_stock(name, layout):
    m = stock(name)
    rep = pyllm.hf.optimize(m).pyllm_report
    assert padfree.is_enabled(m.base_model) and type(m.base_model).__name__ in rep.padding_free, str(rep)
    assert "padding-free" in str(rep)
    b = 1 if layout == "single" else 4
    ids, am = batch(m, layout, b=b)
    oracle, base = stock(name).double(), stock(name)
    oracle.set_attn_implementation("sdpa")
    base.set_attn_implementation("sdpa")
    with torch.no_grad():
        ours, ref, bas = m(input_ids=ids, attention_mask=am), oracle(input_ids=ids, attention_mask=am), \
            base(input_ids=ids, attention_mask=am)
    if hasattr(ours, "logits"):  # task head: stock shapes and values
        assert_close_to_ref(ours.logits, ref.logits, bas.logits, name=f"{name} logits")
    else:
        keep = am.bool()
        assert ours.last_hidden_state.shape == bas.last_hidden_state.shape
        assert_close_to_ref(ours.last_hidden_state[keep], ref.last_hidden_state[keep], bas.last_hidden_state[keep],
                            name=f"{name} {layout} last_hidden_state")
        padfree_ran = layout in ("right", "none", "single") or getattr(m, "pooler", None) is None
        if padfree_ran and not keep.all():
            assert torch.equal(ours.last_hidden_state[~keep], torch.zeros_like(ours.last_hidden_state[~keep]))
        if getattr(ours, "pooler_output", None) is not None:
            assert_close_to_ref(ours.pooler_output, ref.pooler_output, bas.pooler_output, name=f"{name} pooler")
    pyllm.hf.revert(m)
    assert not padfree.is_enabled(m.base_model) and "forward" not in m.base_model.__dict__


def test_padding_free_runs_varlen_on_real_tokens_only(monkeypatch):
    m = stock("bert")
    pyllm.hf.optimize(m)
    ids, am = batch(m, "right")
    seen = []
    orig = pyllm.functional.varlen_attention

    def spy(q, *a, **kw):
        seen.append(q.shape[0])
        return orig(q, *a, **kw)

    monkeypatch.setattr(pyllm.functional, "varlen_attention", spy)
    with torch.no_grad():
        m(input_ids=ids, attention_mask=am)
    assert seen == [int(am.sum())] * m.config.num_hidden_layers  # every layer, real tokens only


def test_padding_free_gradients_match_stock():
    """Training through the packed path: every parameter's gradient vs the stock model in fp64."""
    m, ref, base = stock("bert"), stock("bert").double(), stock("bert")
    pyllm.hf.optimize(m)
    ref.set_attn_implementation("sdpa")
    base.set_attn_implementation("sdpa")
    ids, am = batch(m, "right")
    keep = am.bool()
    grads = []
    for model in (m, ref, base):
        model.train()
        loss = model(input_ids=ids, attention_mask=am).last_hidden_state[keep].square().sum()
        names = [n for n, p in model.named_parameters()]
        grads.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
    assert_grads_close(grads[0], grads[1], grads[2], names=names)


def test_padding_free_can_be_turned_off():
    m = stock("bert")
    rep = pyllm.hf.optimize(m, padding_free=False).pyllm_report
    assert rep.padding_free == [] and not padfree.is_enabled(m)


# ----------------------------------------------------------------------------- fused epilogues
def test_fused_epilogues_report_run_and_revert(monkeypatch):
    from pyllm.hf import fused

    m = stock("bert")
    rep = pyllm.hf.optimize(m).pyllm_report
    n = m.config.num_hidden_layers
    assert rep.fused["BertSelfOutput: dense -> pyllm add_layer_norm_ (residual + LayerNorm, in place)"] == n
    assert rep.fused["BertOutput: dense -> pyllm add_layer_norm_ (residual + LayerNorm, in place)"] == n
    assert any("GELU(erf)" in k for k in rep.not_fused)  # erf GELU stays on torch, and says why
    assert rep.complete  # not fusing is not "left on stock PyTorch"
    calls = []
    orig = pyllm.functional.add_layer_norm_
    monkeypatch.setattr(pyllm.functional, "add_layer_norm_", lambda *a, **k: calls.append(1) or orig(*a, **k))
    ids, am = batch(m, "right")
    with torch.no_grad():
        m(input_ids=ids, attention_mask=am)
    assert len(calls) == 2 * n  # in place in every layer under no_grad
    m.train()
    m.config.hidden_dropout_prob = 0.1
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.1
    calls.clear()
    m(input_ids=ids, attention_mask=am)
    assert calls == []  # training with dropout: the stock forward runs
    pyllm.hf.revert(m)
    assert not any(fused.is_enabled(x) or "forward" in x.__dict__ for x in m.modules())


def test_fused_bias_gelu_tanh_matches_stock(monkeypatch):
    cfg = tiny_config("bert", hidden_act="gelu_pytorch_tanh")
    m0 = _from_cfg(T.BertModel, cfg)
    m, oracle, base = copy.deepcopy(m0), copy.deepcopy(m0).double(), copy.deepcopy(m0)
    rep = pyllm.hf.optimize(m).pyllm_report
    assert rep.fused["BertIntermediate: dense without bias -> pyllm bias_gelu(tanh)"] == cfg.num_hidden_layers
    calls = []
    orig = pyllm.functional.bias_gelu
    monkeypatch.setattr(pyllm.functional, "bias_gelu", lambda *a, **k: calls.append(1) or orig(*a, **k))
    ids, am = batch(m, "right")
    keep = am.bool()
    with torch.no_grad():
        ours, ref, bas = (x(input_ids=ids, attention_mask=am).last_hidden_state for x in (m, oracle, base))
    assert len(calls) == cfg.num_hidden_layers
    assert_close_to_ref(ours[keep], ref[keep], bas[keep], name="bert (tanh GELU) fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_decoder_residual_rms_norm_fused(arch, dtype, monkeypatch):
    """Llama-family decoder layers: residual + attention output and post_attention_layernorm run as one
    add_rms_norm (once per layer); logits and gradients vs the fp64 stock model, judged against the
    stock model in the same dtype; revert restores the class's forward."""
    from pyllm.hf import fused

    base = tiny_model(arch, "sdpa").to(dtype)
    m, oracle = pyllm.hf.optimize(copy.deepcopy(base)), copy.deepcopy(base).double()
    n = base.config.num_hidden_layers
    label = f"{type(base.model.layers[0]).__name__}: residual + post_attention_layernorm -> pyllm add_rms_norm"
    assert m.pyllm_report.fused[label] == n
    calls = []
    orig = pyllm.functional.add_rms_norm
    monkeypatch.setattr(pyllm.functional, "add_rms_norm", lambda *a, **k: calls.append(1) or orig(*a, **k))
    ids, am, _ = _left_padded(m, [12, 5, 1, 9], seed=5)
    keep = am.bool()
    with torch.no_grad():
        ours, ref, bas = (x(input_ids=ids, attention_mask=am).logits for x in (m, oracle, base))
    assert len(calls) == n
    assert_close_to_ref(ours[keep], ref[keep], bas[keep], name=f"{arch} {dtype} fused logits")
    if dtype == torch.float32:  # gradients through the fused op (training, no dropout in these layers)
        grads = []
        for x in (m, oracle, base):
            x.train()
            x.zero_grad()
            logits = x(input_ids=ids, attention_mask=am).logits
            (logits[keep].float().square().mean()).backward()
            grads.append([x.model.layers[0].post_attention_layernorm.weight.grad,
                          x.model.layers[0].self_attn.o_proj.weight.grad, x.model.embed_tokens.weight.grad])
        assert_grads_close(*grads, names=["post_attention_layernorm.weight", "o_proj.weight", "embed_tokens.weight"])
    pyllm.hf.revert(m)
    assert not any(fused.is_enabled(x) or "forward" in x.__dict__ for x in m.modules())


# ----------------------------------------------------------------------------- decoders: packed prefill
DECODERS = ["gpt2", "llama", "mistral", "mistral-wide", "qwen2"]


def _decoder(arch):
    """tiny_model's decoders; "mistral" has a 4-token sliding window (shorter than the batches here: its
    prefill stays on the stock path), "mistral-wide" a 64-token one (packed)."""
    if arch == "mistral-wide":
        m = T.MistralForCausalLM(tiny_config("mistral", sliding_window=64, attn_implementation="sdpa"))
        torch.manual_seed(0)
        return T.MistralForCausalLM(m.config).eval()
    return tiny_model(arch, "sdpa")


def _left_padded(model, lens, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (len(lens), length), generator=g)
    am = torch.ones_like(ids)
    for i, n in enumerate(lens):
        am[i, : length - n] = 0
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return ids.masked_fill(am == 0, pad), am, pad


@pytest.mark.parametrize("lens", [[12, 5, 1, 9], [12, 12], [7]], ids=["left-padded", "no-padding", "batch-of-1"])
@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_packed_prefill_generates_stock_tokens(arch, lens, monkeypatch):
    base = _decoder(arch)
    m = pyllm.hf.optimize(copy.deepcopy(base))
    inner = m.base_model
    assert padfree.is_enabled(inner) and type(inner).__name__ in m.pyllm_report.padding_free
    ids, am, pad = _left_padded(m, lens)
    seen = []
    orig = pyllm.functional.varlen_attention
    monkeypatch.setattr(pyllm.functional, "varlen_attention", lambda q, *a, **k: seen.append(q.shape[0]) or orig(q, *a, **k))
    with torch.no_grad():
        want = base.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=pad)
        got = m.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    assert torch.equal(got, want)  # greedy generation token-identical
    packed = not bool(am.bool().all()) and arch != "mistral"  # mistral: window 4 < 12 tokens
    # the prefill ran packed (real tokens only, every layer) exactly when there was padding
    assert seen == ([int(am.sum())] * base.config.num_hidden_layers if packed else [])


@pytest.mark.parametrize("arch", [a for a in DECODERS if a != "mistral"])
def test_decoder_packed_prefill_logits_and_cache(arch):
    base = _decoder(arch)
    m = pyllm.hf.optimize(copy.deepcopy(base))
    oracle = copy.deepcopy(base).double()
    ids, am, _ = _left_padded(m, [12, 5, 1, 9], seed=3)
    keep = am.bool()
    with torch.no_grad():
        ours, ref, bas = (x(input_ids=ids, attention_mask=am, use_cache=True) for x in (m, oracle, base))
    assert_close_to_ref(ours.logits[keep], ref.logits[keep], bas.logits[keep], name=f"{arch} prefill logits")
    # the cache holds the stock padded layout; real positions equal the stock keys/values
    for lo, lr, lb in zip(ours.past_key_values.layers, ref.past_key_values.layers, bas.past_key_values.layers):
        assert lo.keys.shape == lb.keys.shape and lo.values.shape == lb.values.shape
        k4 = keep[:, None, :, None].expand_as(lo.keys)
        assert_close_to_ref(lo.keys[k4], lr.keys[k4], lb.keys[k4], name=f"{arch} cached keys")
        assert_close_to_ref(lo.values[k4], lr.values[k4], lb.values[k4], name=f"{arch} cached values")
        assert torch.equal(lo.keys[~k4], torch.zeros_like(lo.keys[~k4]))
    pyllm.hf.revert(m)
    assert not padfree.is_enabled(m.base_model) and "forward" not in m.base_model.__dict__
