"""Export: torch.export keeps pyllm ops as single nodes and runs them bit for bit; torch.onnx.export
(plain torch.onnx.export(dynamo=True): pyllm ops trace as their references) runs in ONNX Runtime
close to eager.

Tolerance for ONNX Runtime vs eager (fp32): the graphs compute the same math with different
summation orders and fused kernels (ORT's MatMul/ReduceMean vs pyllm's kernels), so each value
may differ by a few fp32 roundings per reduction step; we allow ``64 * eps(fp32) * max|ref|``
(about 7.6e-6 at unit scale): 2**6 ulps of the largest output, far below any real error (a wrong
mask or scale moves outputs by 1e-2 or more).
"""
from __future__ import annotations

import copy

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo ONNX exporter's dependency (requirements.txt)

import pyllm  # noqa: E402
from pyllm import ops  # noqa: E402
from pyllm.export import ONNX_UNSUPPORTED, onnx_export  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

EPS32 = torch.finfo(torch.float32).eps


def assert_ort_close(got, ref, what=""):
    ref = ref.detach().float()
    got = torch.as_tensor(got).float()
    assert got.shape == ref.shape, what
    bound = 64 * EPS32 * max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= bound, f"{what}: max |onnxruntime - eager| = {err:.3g} > {bound:.3g}"


def ort_run(prog, inputs):
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert len(names) == len(inputs), names
    return sess.run(None, {n: x.numpy() for n, x in zip(names, inputs)})


def pyllm_nodes(ep):
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("pyllm.")}


def tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


class Call(torch.nn.Module):
    """One call of an op's public function as a module: the sample's tensors are the inputs."""

    def __init__(self, fn, sample):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, sample.args, sample.kwargs
        self.pos = [i for i, a in enumerate(sample.args) if isinstance(a, torch.Tensor)]
        self.keys = [k for k, a in sample.kwargs.items() if isinstance(a, torch.Tensor)]

    def inputs(self):
        return tuple(self.args[i] for i in self.pos) + tuple(self.kwargs[k] for k in self.keys)

    def forward(self, *ts):
        a, kw = list(self.args), dict(self.kwargs)
        for i, t in zip(self.pos, ts):
            a[i] = t
        for k, t in zip(self.keys, ts[len(self.pos):]):
            kw[k] = t
        return self.fn(*a, **kw)


def op_case(spec):
    """The op's largest fp32 CPU sample from the registry (no grad)."""
    samples = spec.samples("cpu", torch.float32, False)
    sample = max(samples, key=lambda s: sum(t.numel() for t in Call(spec.functional, s).inputs()))
    return Call(spec.functional, sample).eval()


needs_ext = pytest.mark.skipif(not pyllm._ext.HAS_C, reason="the native extension is not loaded")
SPECS = ops.specs()


@needs_ext
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_op_torch_export(spec):
    """Every registered op: one pyllm node in the ExportedProgram, same outputs bit for bit."""
    m = op_case(spec)
    x = m.inputs()
    with torch.no_grad():
        ref = m(*x)
        ep = torch.export.export(m, x)
        got = ep.module()(*x)
    nodes = pyllm_nodes(ep)
    assert nodes and all(n.endswith(".default") for n in nodes), nodes
    assert {n.split(".")[1] for n in nodes} <= set(spec.schemas), nodes
    for g, r in zip(tensors(got), tensors(ref), strict=True):
        assert torch.equal(g, r)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_op_onnx(spec):
    """Every registered op exports to ONNX (its reference) and runs in ONNX Runtime close to eager,
    except the ops in ONNX_UNSUPPORTED, whose exact failure is asserted (fix it -> remove it there)."""
    m = op_case(spec)
    x = m.inputs()
    with torch.no_grad():
        ref = m(*x)
    if spec.name in ONNX_UNSUPPORTED:
        # non-strict torch.export of the reference stops at a data-dependent shape; the exporter's
        # next capture strategy (dynamo, which folds is_in_onnx_export() to False) keeps the native
        # op, and the error names it
        with pytest.raises(Exception, match=rf"No ONNX function found for .*pyllm.{spec.name}"):
            torch.onnx.export(m, x, dynamo=True)
        return
    prog = torch.onnx.export(m, x, dynamo=True)
    assert not any(n.domain.startswith("pyllm") for n in prog.model_proto.graph.node)
    outs = ort_run(prog, x)
    for i, (g, r) in enumerate(zip(outs, tensors(ref), strict=True)):
        assert_ort_close(g, r, f"{spec.name} output {i}")


def test_plain_onnx_export_runs_the_reference_then_kernels_again():
    """Issue 14: plain torch.onnx.export of a pyllm module failed ("No ONNX function found for
    pyllm.layer_norm"). While the exporter traces, pyllm's decision is the reference (explain says
    why); the next eager call runs the kernel again; the ONNX graph computes the module."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(pyllm.nn.LayerNorm(8), pyllm.nn.RMSNorm(8)).eval()
    x = torch.randn(3, 8)
    seen = []
    hook = m[0].register_forward_hook(lambda *a: seen.append(pyllm.explain("layer_norm")))
    prog = torch.onnx.export(m, (x,), dynamo=True)
    hook.remove()
    assert seen and all("torch.onnx.export is tracing" in s for s in seen), seen
    assert {n.op_type for n in prog.model_proto.graph.node}.isdisjoint({"layer_norm", "rms_norm"})
    with torch.no_grad():
        ref = m(x)
    if pyllm._ext.HAS_C:
        assert "native CPU kernel" in pyllm.explain("layer_norm")
    assert_ort_close(ort_run(prog, [x])[0], ref, "LayerNorm + RMSNorm")
    assert onnx_export is not None and callable(onnx_export)


# --------------------------------------------------------------------------- models
def export_and_compare(model, args, kwargs, out_of, keep=None):
    """torch.export round trip (same outputs) and ONNX Runtime vs eager; ``keep`` [B, L] masks the
    compared positions (padding)."""
    model.eval()

    def pick(out):
        y = out_of(out).detach()
        return y if keep is None else y * keep[..., None].to(y.dtype)

    with torch.no_grad():
        ref = pick(model(*args, **kwargs))
        ep = torch.export.export(model, args, kwargs)
        got = pick(ep.module()(*args, **kwargs))
    if pyllm._ext.HAS_C:
        assert pyllm_nodes(ep), "the exported program should keep pyllm ops"
    return ref, got, ep


def test_decoder_only_transformer():
    from pyllm.models import DecoderOnlyTransformer

    torch.manual_seed(0)
    m = DecoderOnlyTransformer(vocab_size=97, d_model=64, num_layers=2, num_heads=4, d_ff=128, dropout=0.0,
                               max_sequence_length=32, norm_first=True)
    ids = torch.randint(0, 97, (2, 11))
    ref, got, ep = export_and_compare(m, (ids,), {}, lambda o: o)
    assert torch.equal(got, ref)
    prog = onnx_export(m.eval(), (ids,))
    assert_ort_close(ort_run(prog, (ids,))[0], ref, "DecoderOnlyTransformer logits")


def test_nn_modules():
    """A block of pyllm.nn modules: LayerNorm, RMSNorm, MultiheadAttention with a key padding mask."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = pyllm.nn.LayerNorm(32)
            self.rms = pyllm.nn.RMSNorm(32, eps=1e-6)
            self.attn = pyllm.nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x, pad):
            h = self.ln(x)
            a, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
            return self.rms(x + a)

    torch.manual_seed(0)
    m = Block()
    x = torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    ref, got, ep = export_and_compare(m, (x, pad), {}, lambda o: o)
    assert torch.equal(got, ref)
    assert_ort_close(ort_run(onnx_export(m, (x, pad)), (x, pad))[0], ref, "pyllm.nn block")


def hf_case(arch):
    from pyllm.hf import optimize
    from pyllm.hf.testing import tiny_model

    m = tiny_model(arch, "eager")
    assert optimize(m, warn=False) is m
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 500, (3, 13), generator=g)
    am = torch.ones(3, 13, dtype=torch.long)
    am[1, 8:] = 0  # padded rows (right padding)
    am[2, 4:] = 0
    return m, ids, am


def test_hf_bert_optimized():
    """BERT after pyllm.hf.optimize (pyllm attention, norms, fused epilogues; the padding-free path
    runs the stock padded path under export), with padding: compared on real tokens (eager's
    padding-free output holds zeros at pad positions, the exported padded path stock values)."""
    m, ids, am = hf_case("bert")
    kw = {"input_ids": ids, "attention_mask": am}
    ref, got, ep = export_and_compare(m, (), kw, lambda o: o.last_hidden_state, keep=am)
    torch.testing.assert_close(got, ref, rtol=0, atol=64 * EPS32 * max(1.0, ref.abs().max().item()))
    prog = onnx_export(m, (), kwargs=kw)
    out = torch.as_tensor(ort_run(prog, (ids, am))[0]) * am[..., None]
    assert_ort_close(out, ref, "BERT last_hidden_state (real tokens)")


def test_hf_llama_optimized():
    """Llama (causal LM) after pyllm.hf.optimize, with a padded batch; logits on real tokens (eager's
    padding-free prefill vs the padded path under export: compared to fp32 rounding)."""
    m, ids, am = hf_case("llama")
    m.config.use_cache = False
    kw = {"input_ids": ids, "attention_mask": am, "use_cache": False}
    ref, got, ep = export_and_compare(m, (), kw, lambda o: o.logits, keep=am)
    # eager runs the padded batch's prefill padding-free (packed), the export the padded path
    torch.testing.assert_close(got, ref, rtol=0, atol=64 * EPS32 * max(1.0, ref.abs().max().item()))
    prog = onnx_export(m, (), kwargs=kw)
    out = torch.as_tensor(ort_run(prog, (ids, am))[0]) * am[..., None]
    assert_ort_close(out, ref, "Llama logits (real tokens)")
