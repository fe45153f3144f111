"""Whole-model torch.compile (issue 14): tiny Hugging Face BERT and Llama with
``attn_implementation="pyllm"`` and after ``pyllm.hf.optimize`` compile with
``torch.compile(fullgraph=True)`` and the default inductor backend.

* No graph breaks from pyllm: ``torch._dynamo.explain`` finds one graph and no break, and the graph
  holds pyllm's ops (the kernels run inside inductor's graph as opaque custom ops).
* Outputs: the compiled pyllm model against the fp64 stock sdpa model on real tokens, within 2x the
  error of the compiled stock ``sdpa`` model in fp32 (FlashAttention's rule, pyllm.testing's helper).
  Under compile pyllm runs the padded path (packing is data-dependent), so pad positions are not
  compared (eager padding-free leaves zeros there, the stock model computes unused values).
* Static-cache generation with transformers' compiled decoding (``CompileConfig``): token-identical
  to eager ``generate``, no graph break, no recompilation between decoding steps.
"""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
import torch._dynamo as dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import pyllm  # noqa: E402
import pyllm.hf  # noqa: E402
from pyllm.hf.testing import tiny_model  # noqa: E402
from pyllm.testing import assert_close_to_ref  # noqa: E402

needs_ext = pytest.mark.skipif(not pyllm._ext.HAS_C, reason="the native extension is not loaded: no pyllm op "
                                                            "to keep in the graph")
torch.set_num_threads(min(2, torch.get_num_threads()))


def batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 500, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0   # right padding
    mask[2, :4] = 0   # left padding
    return ids, mask


def output(arch, out):
    return out.last_hidden_state if arch == "bert" else out.logits


def pyllm_model(arch, how):
    if how == "attn_implementation":
        return tiny_model(arch, attn_implementation="pyllm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pyllm.hf.optimize(tiny_model(arch), warn=False)


def graph_ops(gm):
    return {str(n.target).split(".")[1] for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("pyllm.")}


@needs_ext
@pytest.mark.parametrize("how", ["attn_implementation", "optimize"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_whole_model_compiles_fullgraph_with_inductor(arch, how):
    ids, mask = batch()
    feed = {"input_ids": ids, "attention_mask": mask}
    model = pyllm_model(arch, how)
    with torch.no_grad():
        explained = dynamo.explain(model)(**feed)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        ops = graph_ops(explained.graphs[0])
        want = {"attention"} | ({"layer_norm"} if arch == "bert" else {"rms_norm", "add_rms_norm"}) \
            if how == "optimize" else {"attention"}
        assert want <= ops, ops

        dynamo.reset()
        got = output(arch, torch.compile(model, fullgraph=True)(**feed))
        dynamo.reset()
        stock = tiny_model(arch, attn_implementation="sdpa")
        base = output(arch, torch.compile(stock, fullgraph=True)(**feed))
        # fp64 oracle: stock sdpa (stock eager in fp64 gives NaN on left-padded Llama rows: its additive
        # mask of finfo(float64).min overflows to -inf, pad queries see only -inf, NaN spreads via V)
        ref = output(arch, tiny_model(arch, attn_implementation="sdpa").double()(**feed))
    dynamo.reset()
    keep = mask.bool()
    assert_close_to_ref(got[keep], ref[keep], base[keep], name=f"{arch} ({how}) compiled")


@needs_ext
def test_static_cache_generation_compiled():
    from transformers import CompileConfig

    ids, mask = batch()
    model = pyllm_model("llama", "optimize")
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    # transformers compiles the decoding steps on CUDA by default; _compile_all_devices extends it to CPU
    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True
    with torch.no_grad():
        eager = model.generate(ids, **kw)
        dynamo.reset()
        counters.clear()
        compiled = model.generate(ids, compile_config=config, **kw)
        stats, breaks = dict(counters["stats"]), dict(counters["graph_break"])
        again = model.generate(ids, compile_config=config, **kw)   # reuses the graph
        stats_again = dict(counters["stats"])
    dynamo.reset()
    assert torch.equal(compiled, eager), (compiled, eager)
    assert torch.equal(again, eager)
    assert stats.get("unique_graphs", 0) == 1 and not breaks, (stats, breaks)
    assert stats_again.get("unique_graphs", 0) == 1, stats_again
    assert "native CPU kernel" in pyllm.explain("scaled_dot_product_attention")


def test_compiled_calls_do_not_recompile_on_decisions():
    """pyllm records each op's decision for explain(); a write inside a traced graph would be a side
    effect that dynamo replays and guards on (it recompiled the graph once per newly seen op)."""
    ln = pyllm.nn.LayerNorm(8)
    x = torch.randn(2, 8)
    dynamo.reset()
    counters.clear()
    f = torch.compile(lambda t: pyllm.functional.rms_norm(ln(t), 8), fullgraph=True, backend="eager")
    for _ in range(3):
        torch.testing.assert_close(f(x), pyllm.functional.rms_norm(ln(x), 8))
    assert dict(counters["stats"]).get("unique_graphs") == 1, dict(counters["stats"])
    dynamo.reset()
