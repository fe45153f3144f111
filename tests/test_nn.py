"""pyllm.nn drop-ins: same constructor, repr, parameters and state_dict as torch's modules,
outputs judged against an fp64 copy of torch's module; and torch.compile(fullgraph=True)
over the modules and the functional ops (forward and backward) matching eager."""
from __future__ import annotations

import copy

import pytest
import torch

from pyllm import functional as P
from pyllm import nn as pnn

from helpers import assert_close_to_ref, grads_of, softmax_torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

LN_CONFIGS = [dict(normalized_shape=64), dict(normalized_shape=(4, 6), eps=1e-6),
              dict(normalized_shape=33, elementwise_affine=False), dict(normalized_shape=17, bias=False)]
RMS_CONFIGS = [dict(normalized_shape=64), dict(normalized_shape=(4, 6), eps=1e-5),
               dict(normalized_shape=33, elementwise_affine=False), dict(normalized_shape=[9])]


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    return m


@pytest.mark.parametrize("cfg", LN_CONFIGS, ids=str)
def test_layer_norm_is_a_drop_in(cfg):
    ours, theirs = pnn.LayerNorm(**cfg), torch.nn.LayerNorm(**cfg)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert repr(ours) == repr(theirs)
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())      # torch -> pyllm
    back = torch.nn.LayerNorm(**cfg)
    back.load_state_dict(ours.state_dict())        # pyllm -> torch
    for a, b in zip(back.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", RMS_CONFIGS, ids=str)
def test_rms_norm_is_a_drop_in(cfg):
    ours, theirs = pnn.RMSNorm(**cfg), torch.nn.RMSNorm(**cfg)
    assert isinstance(ours, torch.nn.RMSNorm)
    assert repr(ours) == repr(theirs)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.RMSNorm(**cfg)
    back.load_state_dict(ours.state_dict())
    for a, b in zip(back.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    styled = pnn.RMSNorm(cfg["normalized_shape"], style="llama")
    assert repr(styled).endswith("style='llama')")
    assert list(styled.state_dict()) == list(torch.nn.RMSNorm(cfg["normalized_shape"]).state_dict())


def test_constructor_kwargs_dtype_device():
    m = pnn.LayerNorm(8, dtype=torch.bfloat16, device="cpu")
    assert m.weight.dtype == torch.bfloat16 and m.bias.dtype == torch.bfloat16
    r = pnn.RMSNorm(8, eps=None, dtype=torch.float16)
    assert r.weight.dtype == torch.float16 and r.eps is None
    s = pnn.FusedScaleMaskSoftmax(0.125, causal=True)
    assert repr(s) == "FusedScaleMaskSoftmax(scale=0.125, causal=True)"
    assert list(s.parameters()) == [] and s.state_dict() == {}


def _fp64_copy(m):
    return copy.deepcopy(m).double()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cfg", LN_CONFIGS, ids=str)
def test_layer_norm_module_matches_torch(cfg, dtype):
    theirs = _randomize(torch.nn.LayerNorm(**cfg)).to(dtype)
    ours = pnn.LayerNorm(**cfg).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    ns = cfg["normalized_shape"]
    ns = (ns,) if isinstance(ns, int) else tuple(ns)
    x = (torch.randn((3, 5) + ns) * 2 + 0.5).to(dtype)
    r = torch.randn(x.shape).to(dtype)
    ref = _fp64_copy(theirs)
    assert_close_to_ref(ours(x), ref(x.double()), theirs(x))
    out, summed = ours.forward_add(x, r)
    assert torch.equal(summed, x + r)
    assert_close_to_ref(out, ref((x + r).double()), theirs(x + r))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cfg", RMS_CONFIGS, ids=str)
def test_rms_norm_module_matches_torch(cfg, dtype):
    theirs = _randomize(torch.nn.RMSNorm(**cfg)).to(dtype)
    ours = pnn.RMSNorm(**cfg).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    ns = cfg["normalized_shape"]
    ns = (ns,) if isinstance(ns, int) else tuple(ns)
    x = (torch.randn((2, 7) + ns) * 2).to(dtype)
    ref = _fp64_copy(theirs)
    if ref.eps is None:  # torch uses finfo(float32).eps for fp32/fp16/bf16 inputs, not fp64's
        ref.eps = torch.finfo(torch.float32).eps
    assert_close_to_ref(ours(x), ref(x.double()), theirs(x))


def test_module_grads_match_torch():
    theirs = _randomize(torch.nn.LayerNorm(48))
    ours = pnn.LayerNorm(48)
    ours.load_state_dict(theirs.state_dict())
    ref = _fp64_copy(theirs)
    x = torch.randn(6, 48, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    gy = torch.randn(6, 48)
    g_ours = grads_of((ours(x) * gy).sum(), [x, ours.weight, ours.bias])
    g_torch = grads_of((theirs(x) * gy).sum(), [x, theirs.weight, theirs.bias])
    g_ref = grads_of((ref(x64) * gy.double()).sum(), [x64, ref.weight, ref.bias])
    for a, b, c in zip(g_ours, g_ref, g_torch):
        assert_close_to_ref(a, b, c, mult=3.0)


def test_fused_scale_mask_softmax_module():
    m = pnn.FusedScaleMaskSoftmax(scale=0.25, causal=True)
    x = torch.randn(2, 3, 5, 9)
    mask = torch.rand(2, 1, 1, 9) < 0.8
    got = m(x, mask)
    want = softmax_torch(x.double(), mask, 0.25, True)
    assert_close_to_ref(got, want, softmax_torch(x, mask, 0.25, True))
    dead = m(x, torch.zeros(9, dtype=torch.bool))
    assert torch.equal(dead, torch.zeros_like(dead))  # no key visible: zeros, never NaN


# ---------------------------------------------------------------------------- torch.compile
class Block(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.ln = pnn.LayerNorm(d)
        self.rms = pnn.RMSNorm(d, eps=1e-6, style="llama")
        self.sm = pnn.FusedScaleMaskSoftmax(scale=0.5, causal=True)

    def forward(self, x, r, mask):
        h, s = self.ln.forward_add(x, r)
        h = self.ln(h) + s
        h = self.rms(h)
        p = self.sm(h @ h.transpose(-1, -2), mask)
        return p @ h


def _compile_inputs(d=32):
    x = torch.randn(2, 6, d, requires_grad=True)
    r = torch.randn(2, 6, d, requires_grad=True)
    mask = torch.randn(2, 1, 6).requires_grad_()
    return x, r, mask


def test_compile_modules_forward_and_backward():
    """Dynamo (fullgraph) + AOTAutograd over the modules, forward and backward. backend
    "aot_eager" exercises everything pyllm registers (fake kernels, autograd formulas,
    functionalization) without paying inductor's C++ codegen of the surrounding matmuls;
    test_compile_functional_ops runs the default inductor backend."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _randomize(Block())
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x, r, mask = _compile_inputs()
    out_e = eager(x, r, mask)
    xc, rc, mc = (t.detach().clone().requires_grad_() for t in (x, r, mask))
    out_c = compiled(xc, rc, mc)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    gy = torch.randn_like(out_e)
    params_e = list(eager.parameters())
    params_c = list(compiled_model.parameters())
    g_e = torch.autograd.grad((out_e * gy).sum(), [x, r, mask] + params_e)
    g_c = torch.autograd.grad((out_c * gy).sum(), [xc, rc, mc] + params_c)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_functional_ops():
    torch._dynamo.reset()

    def f(x, r, w, b, mask):
        y = P.layer_norm(x, 16, w, b)
        o, s = P.add_layer_norm(y, r, (16,), w, None, 1e-6)
        z = P.rms_norm(o + s, 16, w, style="gemma") + P.rms_norm(x, (4, 16))
        return P.masked_softmax(z, mask, 0.7) + P.masked_softmax(z, None, 1.0, causal=True)

    x, r = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    w, b = torch.randn(16), torch.randn(16)
    mask = torch.rand(3, 1, 16) < 0.7
    cf = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(cf(x, r, w, b, mask), f(x, r, w, b, mask), rtol=1e-5, atol=1e-6)
    x2, r2 = torch.randn(5, 4, 16), torch.randn(5, 4, 16)  # a new shape: recompiles or runs dynamic
    mask2 = torch.rand(5, 1, 16) < 0.7
    torch.testing.assert_close(cf(x2, r2, w, b, mask2), f(x2, r2, w, b, mask2), rtol=1e-5, atol=1e-6)


def test_compiled_graph_calls_pyllm_ops():
    """fullgraph tracing keeps the fused ops as single nodes (native kernels when active)."""
    from conftest import native_active

    torch._dynamo.reset()
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    m = torch.nn.Sequential(pnn.LayerNorm(16), pnn.RMSNorm(16), pnn.FusedScaleMaskSoftmax(0.5))
    x = torch.randn(2, 16)
    torch.testing.assert_close(torch.compile(m, fullgraph=True, backend=record)(x), m(x))
    if native_active():
        for op in ("pyllm.layer_norm", "pyllm.rms_norm", "pyllm.masked_softmax"):
            assert any(op in t for t in seen), f"{op} not in the compiled graph: {seen}"
    else:
        assert not any("pyllm." in t for t in seen)
