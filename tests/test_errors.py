"""Bad input gets a clear Python exception that names the offending argument and says
what was expected. Tensors on another device are simulated with the "meta" device."""
from __future__ import annotations

import pytest
import torch

import pyllm
from pyllm import _ext
from pyllm import functional as P
from pyllm import nn as pnn

X = torch.randn(2, 3, 8)
W8 = torch.ones(8)


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


Q = torch.randn(4, 2, 8)  # [L, N, E] for MultiheadAttention(8, 2)


def MHA(*args, **kwargs):
    return pnn.MultiheadAttention(8, 2)(*args, need_weights=False, **kwargs)


# (id, callable, exception type, regex the message must match)
CASES = [
    # ---- layer_norm / add_layer_norm
    ("ln-weight-size", lambda: P.layer_norm(X, 8, torch.ones(7)), ValueError,
     r"weight must have shape \[8\].*got \[7\]"),
    ("ln-bias-size", lambda: P.layer_norm(X, 8, W8, torch.ones(8, 1)), ValueError,
     r"bias must have shape \[8\].*got \[8, 1\]"),
    ("ln-normalized-shape-mismatch", lambda: P.layer_norm(X, (3, 7)), ValueError,
     r"normalized_shape \[3, 7\] must match the last dims of input of shape \[2, 3, 8\]"),
    ("ln-normalized-shape-too-long", lambda: P.layer_norm(torch.randn(8), (1, 8)), ValueError,
     r"normalized_shape \[1, 8\]"),
    ("ln-normalized-shape-empty", lambda: P.layer_norm(X, ()), ValueError, r"normalized_shape \[\]"),
    ("ln-normalized-shape-type", lambda: P.layer_norm(X, "8"), (TypeError, ValueError), r"normalized_shape"),
    ("ln-normalized-shape-float", lambda: P.layer_norm(X, 8.5), TypeError,
     r"normalized_shape must be an int or a sequence of ints"),
    ("ln-integer-input", lambda: P.layer_norm(torch.ones(2, 8, dtype=torch.int64), 8), TypeError,
     r"input must be a floating tensor.*got torch.int64"),
    ("ln-complex-input", lambda: P.layer_norm(torch.ones(2, 8, dtype=torch.complex64), 8), TypeError,
     r"input must be a floating tensor"),
    ("ln-integer-weight", lambda: P.layer_norm(X, 8, torch.ones(8, dtype=torch.int32)), TypeError,
     r"weight must be a floating tensor.*int32"),
    ("ln-weight-device", lambda: P.layer_norm(X, 8, meta(8)), ValueError,
     r"weight is on meta but input is on cpu"),
    ("ln-bias-device", lambda: P.layer_norm(X, 8, W8, meta(8)), ValueError, r"bias is on meta but input is on cpu"),
    ("ln-non-tensor-input", lambda: P.layer_norm([[1.0, 2.0]], 2), TypeError,
     r"input must be a torch.Tensor, got list"),
    ("ln-non-tensor-weight", lambda: P.layer_norm(X, 8, [1.0] * 8), TypeError,
     r"weight must be a torch.Tensor, got list"),
    ("ln-eps-type", lambda: P.layer_norm(X, 8, eps="1e-5"), TypeError, r"eps must be a (Python )?number"),
    ("addln-residual-shape", lambda: P.add_layer_norm(X, torch.randn(1, 3, 8), 8), ValueError,
     r"residual must have the input's shape \[2, 3, 8\], got \[1, 3, 8\]"),
    ("addln-residual-dtype", lambda: P.add_layer_norm(X, X.half(), 8), TypeError,
     r"residual must have the input's dtype torch.float32, got torch.float16"),
    ("addln-residual-device", lambda: P.add_layer_norm(X, meta(2, 3, 8), 8), ValueError,
     r"residual is on meta but input is on cpu"),
    ("addln-residual-int", lambda: P.add_layer_norm(X, X.long(), 8), TypeError, r"residual must be a floating"),
    ("addln-residual-non-tensor", lambda: P.add_layer_norm(X, 1.0, 8), TypeError,
     r"residual must be a torch.Tensor, got float"),
    ("addln-weight-size", lambda: P.add_layer_norm(X, X, 8, torch.ones(9)), ValueError, r"weight must have shape \[8\]"),
    # ---- rms_norm
    ("rms-weight-size", lambda: P.rms_norm(X, 8, torch.ones(4)), ValueError, r"weight must have shape \[8\]"),
    ("rms-style", lambda: P.rms_norm(X, 8, W8, style="mistral"), ValueError,
     r"style must be one of \('torch', 'llama', 't5', 'gemma'\), got 'mistral'"),
    ("rms-style-no-weight", lambda: P.rms_norm(X, 8, style="Llama"), ValueError, r"style must be one of"),
    ("rms-integer-input", lambda: P.rms_norm(torch.ones(2, 8, dtype=torch.int16), 8), TypeError,
     r"input must be a floating tensor"),
    ("rms-weight-device", lambda: P.rms_norm(X, 8, meta(8)), ValueError, r"weight is on meta but input is on cpu"),
    ("rms-normalized-shape", lambda: P.rms_norm(X, 9), ValueError, r"normalized_shape \[9\]"),
    ("rms-eps-type", lambda: P.rms_norm(X, 8, W8, eps=[1e-6]), TypeError, r"eps must be a (Python )?number"),
    ("nn-rmsnorm-style", lambda: pnn.RMSNorm(8, style="fast"), ValueError, r"style must be one of"),
    # ---- masked_softmax
    ("sm-mask-not-broadcastable", lambda: P.masked_softmax(X, torch.ones(3, 7, dtype=torch.bool)), ValueError,
     r"mask of shape \[3, 7\] is not broadcastable to input of shape \[2, 3, 8\]"),
    ("sm-mask-too-many-dims", lambda: P.masked_softmax(X, torch.ones(1, 2, 3, 8, dtype=torch.bool)), ValueError,
     r"mask of shape \[1, 2, 3, 8\] is not broadcastable"),
    ("sm-mask-would-grow-input", lambda: P.masked_softmax(torch.randn(1, 8), torch.ones(4, 8)), ValueError,
     r"mask of shape \[4, 8\] is not broadcastable to input of shape \[1, 8\]"),
    ("sm-integer-mask", lambda: P.masked_softmax(X, torch.ones(8, dtype=torch.int64)), TypeError,
     r"mask must be bool \(True = keep\) or a floating additive mask, got torch.int64"),
    ("sm-uint8-mask", lambda: P.masked_softmax(X, torch.ones(8, dtype=torch.uint8)), TypeError, r"mask must be bool"),
    ("sm-integer-input", lambda: P.masked_softmax(torch.ones(2, 8, dtype=torch.int32)), TypeError,
     r"input must be a floating tensor"),
    ("sm-bool-input", lambda: P.masked_softmax(torch.ones(2, 8, dtype=torch.bool)), TypeError,
     r"input must be a floating tensor"),
    ("sm-mask-device", lambda: P.masked_softmax(X, meta(8, dtype=torch.bool)), ValueError,
     r"mask is on meta but input is on cpu"),
    ("sm-causal-1d", lambda: P.masked_softmax(torch.randn(8), causal=True), ValueError,
     r"causal=True needs input with at least 2 dims \[\.\.\., Lq, Lk\], got shape \[8\]"),
    ("sm-scalar-input", lambda: P.masked_softmax(torch.tensor(1.0)), ValueError,
     r"input must have at least 1 dimension"),
    ("sm-scale-string", lambda: P.masked_softmax(X, scale="0.5"), TypeError,
     r"scale must be a Python number, got str"),
    ("sm-scale-tensor", lambda: P.masked_softmax(X, scale=torch.tensor(0.5)), TypeError,
     r"scale must be a Python number, got Tensor"),
    ("sm-scale-bool", lambda: P.masked_softmax(X, scale=True), TypeError, r"scale must be a Python number, got bool"),
    ("sm-scale-none", lambda: P.masked_softmax(X, scale=None), TypeError, r"scale must be a Python number"),
    ("sm-non-tensor-input", lambda: P.masked_softmax([1.0, 2.0]), TypeError, r"input must be a torch.Tensor, got list"),
    ("sm-non-tensor-mask", lambda: P.masked_softmax(X, [True] * 8), TypeError, r"mask must be a torch.Tensor, got list"),
    ("nn-softmax-bad-mask", lambda: pnn.FusedScaleMaskSoftmax(0.5)(X, torch.ones(5)), ValueError,
     r"mask of shape \[5\] is not broadcastable"),
    # ---- nn modules: bad constructor arguments fail at construction, bad forward arguments name themselves
    ("nn-layernorm-float-shape", lambda: pnn.LayerNorm(8.5), TypeError,
     r"normalized_shape must be an int or a sequence of ints, got 8.5"),
    ("nn-layernorm-negative-shape", lambda: pnn.LayerNorm(-1), ValueError,
     r"normalized_shape must be a non-empty sequence of sizes >= 0, got \[-1\]"),
    ("nn-layernorm-eps-nan", lambda: pnn.LayerNorm(8, eps=float("nan")), ValueError, r"eps must be a finite number"),
    ("nn-layernorm-eps-str", lambda: pnn.LayerNorm(8, eps="1e-5"), TypeError, r"eps must be a Python number, got str"),
    ("nn-rmsnorm-float-shape", lambda: pnn.RMSNorm([8.0]), TypeError, r"normalized_shape must be an int"),
    ("nn-rmsnorm-eps-negative", lambda: pnn.RMSNorm(8, eps=-1e-6), ValueError, r"eps must be >= 0"),
    ("nn-rmsnorm-style-none", lambda: pnn.RMSNorm(8, style=None), ValueError, r"style must be one of .*got None"),
    ("nn-softmax-scale-str", lambda: pnn.FusedScaleMaskSoftmax("0.5"), TypeError,
     r"scale must be a Python number, got str"),
    ("nn-softmax-scale-nan", lambda: pnn.FusedScaleMaskSoftmax(float("nan")), ValueError,
     r"scale must be a finite number, got nan"),
    ("nn-softmax-causal-str", lambda: pnn.FusedScaleMaskSoftmax(1.0, "no"), TypeError,
     r"causal must be a bool, got str 'no'"),
    ("nn-mha-heads-divide", lambda: pnn.MultiheadAttention(8, 3), ValueError,
     r"embed_dim \(8\) must be divisible by num_heads \(3\)"),
    ("nn-mha-zero-heads", lambda: pnn.MultiheadAttention(8, 0), ValueError, r"num_heads must be >= 1, got 0"),
    ("nn-mha-float-dim", lambda: pnn.MultiheadAttention(8.0, 2), TypeError, r"embed_dim must be an int, got float"),
    ("nn-mha-dropout", lambda: pnn.MultiheadAttention(8, 2, dropout=1.5), ValueError,
     r"dropout must be in \[0, 1\], got 1.5"),
    ("nn-mha-int-key-padding-mask", lambda: MHA(Q, Q, Q, key_padding_mask=torch.zeros(2, 4, dtype=torch.long)),
     TypeError, r"key_padding_mask must be bool \(True = not allowed to attend\) or a floating additive mask, "
     r"got torch.int64"),
    ("nn-mha-int-attn-mask", lambda: MHA(Q, Q, Q, attn_mask=torch.zeros(4, 4, dtype=torch.int32)), TypeError,
     r"attn_mask must be bool .* got torch.int32"),
    ("nn-mha-key-padding-mask-device", lambda: MHA(Q, Q, Q, key_padding_mask=meta(2, 4, dtype=torch.bool)),
     ValueError, r"key_padding_mask is on meta but query is on cpu"),
    ("nn-mha-key-batch", lambda: MHA(Q, torch.randn(4, 3, 8), torch.randn(4, 3, 8)), ValueError,
     r"query, key and value must have the same batch size, got shapes \[4, 2, 8\], \[4, 3, 8\], \[4, 3, 8\]"),
    ("nn-mha-key-value-length", lambda: MHA(Q, Q, torch.randn(5, 2, 8)), ValueError,
     r"key and value must have the same length, got shapes \[4, 2, 8\] and \[5, 2, 8\]"),
    ("nn-mha-key-embed", lambda: MHA(Q, torch.randn(4, 2, 6), torch.randn(4, 2, 6)), ValueError,
     r"key's last dim must be 8 \(kdim\), got shape \[4, 2, 6\]"),
    ("nn-mha-non-tensor", lambda: MHA([1.0], Q, Q), TypeError, r"query must be a torch.Tensor, got list"),
    # ---- backends
    ("backend-unknown", lambda: pyllm.use_backend("cuda").__enter__(), ValueError,
     r"unknown backend 'cuda'; choose one of \['auto', 'native', 'torch', 'cuda-emulated'\]"),
    ("backend-not-a-name", lambda: pyllm.use_backend(["auto"]).__enter__(), ValueError,
     r"unknown backend \['auto'\]; choose one of"),
    ("explain-not-a-name", lambda: pyllm.explain(5), TypeError, r"op must be an op name \(a str"),
    ("last-decision-not-a-name", lambda: pyllm.last_decision(["layer_norm"]), TypeError, r"op must be an op name"),
]


@pytest.mark.parametrize("fn,exc,match", [pytest.param(f, e, m, id=i) for i, f, e, m in CASES])
def test_bad_input_raises_clear_error(fn, exc, match):
    with pytest.raises(exc, match=match) as info:
        fn()
    assert str(info.value).startswith("pyllm: "), f"message should say it comes from pyllm: {info.value}"


def test_there_are_many_error_cases():
    assert len(CASES) >= 15


def _hf_case_ids() -> list:
    """The hf optimize/revert bad-use cases (tests/test_hf_errors.py), when transformers is installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return []
    import test_hf_errors
    return [f"hf-{i}" for i in test_hf_errors.CASE_IDS]


def test_at_least_60_distinct_bad_input_cases_across_the_public_api():
    """Issue 12 item 7: at least 60 distinct bad-input cases, each a clear pyllm error (tested above,
    per backend in test_registry_bad_inputs, and in tests/test_hf_errors.py)."""
    table = [i for i, *_ in CASES]
    registry = [f"{s.name}-{b.desc}" for s in pyllm.ops.specs() for b in s.bad_inputs()]
    hf = _hf_case_ids()
    ids = table + registry + hf
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"case ids must be distinct: {dupes}"
    per_op = {s.name: len(s.bad_inputs()) for s in pyllm.ops.specs()}
    total = len(set(ids))
    assert total >= 60, (f"only {total} distinct bad-input cases: {len(table)} in CASES, {len(registry)} in the "
                         f"ops' bad_inputs() {per_op}, {len(hf)} hf")
    print(f"{total} distinct bad-input cases: {len(table)} in CASES, {len(registry)} in the ops' bad_inputs() "
          f"{per_op}, {len(hf)} hf")


def test_errors_do_not_depend_on_backend():
    """Validation happens before dispatch: the reference path rejects the same inputs."""
    with pyllm.use_backend("torch"):
        with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
            P.layer_norm(X, 8, torch.ones(7))
        with pytest.raises(TypeError, match=r"mask must be bool"):
            P.masked_softmax(X, torch.ones(8, dtype=torch.int32))


def test_meta_tensors_are_rejected_by_native_backend():
    """All tensors on a device pyllm has no kernel for: `native` says so, `auto` falls back."""
    x = meta(2, 8)
    with pyllm.use_backend("native"):
        with pytest.raises(RuntimeError, match=r"backend 'native' cannot run layer_norm: "):
            P.layer_norm(x, 8)
    with pyllm.use_backend("auto"):
        out = P.layer_norm(x, 8)  # reference on meta: shape propagation only
        assert out.shape == (2, 8) and out.device.type == "meta"
        assert "reference (PyTorch) because" in pyllm.explain("layer_norm")


# -------------------------------------------------------------- direct torch.ops.pyllm calls
needs_native = pytest.mark.skipif(not _ext.HAS_C, reason=f"native extension not loaded ({_ext.C_ERROR})")


@needs_native
@pytest.mark.parametrize("call,match", [
    (lambda o: o.layer_norm(X, torch.ones(7), None, 1e-5), r"weight must have shape \[8\]"),
    (lambda o: o.layer_norm(X, None, torch.ones(2, 4), 1e-5), r"bias must have shape \[8\]"),
    (lambda o: o.layer_norm(X.long(), None, None, 1e-5), r"input must be float32, float16 or bfloat16, got Long"),
    (lambda o: o.layer_norm(X.double(), None, None, 1e-5), r"input must be float32, float16 or bfloat16"),
    (lambda o: o.add_layer_norm(X, X[:1], None, None, 1e-5), r"residual must have the input's shape"),
    (lambda o: o.add_layer_norm(X, X.half(), None, None, 1e-5), r"residual must have the input's shape .* and dtype"),
    (lambda o: o.rms_norm(X, torch.ones(3), 1e-6, None, 0.0, torch.float32), r"weight must have shape \[8\]"),
    (lambda o: o.rms_norm(X, None, 1e-6, None, 0.0, torch.int32), r"out_dtype must be a float type"),
    (lambda o: o.masked_softmax(X, torch.ones(8, dtype=torch.int32), 1.0, False), r"mask must be bool"),
    (lambda o: o.masked_softmax(torch.randn(8), None, 1.0, True), r"causal=True needs input with >= 2 dims"),
    (lambda o: o.masked_softmax(X, torch.ones(1, 1, 3, 8, dtype=torch.bool), 1.0, False), r"mask of shape"),
    (lambda o: o.layer_norm_backward(X[:1], X, X[..., 0], X[..., 0], None, None), r"grad_out must have shape"),
    (lambda o: o.masked_softmax_backward(X[..., :4], X, 1.0), r"grad_out must have shape"),
], ids=["ln-w", "ln-b", "ln-int", "ln-f64", "addln-shape", "addln-dtype", "rms-w", "rms-outdtype",
        "sm-intmask", "sm-causal1d", "sm-mask-bcast", "ln-bwd-shape", "sm-bwd-shape"])
def test_native_ops_check_arguments(call, match):
    """Direct calls of torch.ops.pyllm.* (bypassing pyllm.functional) fail cleanly too."""
    with pytest.raises(RuntimeError, match=match):
        call(torch.ops.pyllm)


# -------------------------------------------------------------- every registered op's bad inputs
BAD = [pytest.param(b, id=f"{s.name}-{b.desc}") for s in pyllm.ops.specs() for b in s.bad_inputs()]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_registry_bad_inputs(bad, backend):
    """Each slice's bad inputs raise the named error before any backend decision."""
    with pyllm.use_backend(backend):
        with pytest.raises(bad.error, match=bad.match) as info:
            bad.call()
    assert str(info.value).startswith("pyllm: "), info.value


def test_every_op_has_bad_inputs():
    for spec in pyllm.ops.specs():
        assert len(spec.bad_inputs()) >= 3, f"{spec.name}: too few bad-input cases"
