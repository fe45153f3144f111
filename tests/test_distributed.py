"""pyllm under torch.distributed (docs/DISTRIBUTED.md): each test runs 2 gloo ranks on the CPU.

* the recipes are the fenced ``python`` blocks of docs/DISTRIBUTED.md, exec'd in each rank
  (:func:`_doc_recipes`): tensor (and sequence) parallelism of a tiny Hugging Face Llama, FSDP2
  training of a ``pyllm.models`` decoder, pyllm ops on DTensors;
* every distributed result is compared with the same computation in one process, on the full
  tensors (each rank holds them: the ranks seed identically);
* the DTensor sharding rules of ``pyllm.distributed``: outputs and gradients, their placements,
  no communication inside a pyllm op, and the errors for what cannot run shard-locally.

Every test is bounded: a rank that hangs dumps its stack and exits after ``TIMEOUT - 10`` s, and the
parent kills the ranks at ``TIMEOUT``. The ranks use one thread each (the machine may have 2 cores).
"""
from __future__ import annotations

import datetime
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyllm
from pyllm import _ext

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "DISTRIBUTED.md"
WORLD = 2
TIMEOUT = 120  # seconds, per test

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch was built without torch.distributed / gloo")
needs_native = pytest.mark.skipif(not _ext.HAS_C, reason=f"native extension not loaded ({_ext.C_ERROR})")


# --------------------------------------------------------------------------- running ranks
def _entry(rank, fn, store, args):
    import faulthandler

    faulthandler.dump_traceback_later(TIMEOUT - 10, exit=True)  # a hung rank says where it hangs
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(fn, tmp_path, *args):
    """Runs ``fn(rank, *args)`` in WORLD fresh processes (a gloo process group each, initialized through
    a file store in ``tmp_path``: no port to pick); an exception in a rank fails the test with its
    traceback."""
    ctx = mp.start_processes(_entry, args=(fn, str(tmp_path / "store"), args), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn.__name__}: the ranks ran past {TIMEOUT} s")
    finally:
        for p in ctx.processes:  # only on failure or timeout: they have exited otherwise
            if p.is_alive():
                p.kill()
                p.join(5)


def _doc_recipes() -> dict:
    """The fenced python blocks of docs/DISTRIBUTED.md, exec'd in order in one namespace."""
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert blocks, f"no python blocks in {DOC}"
    ns = {"__name__": "distributed_recipes"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC}:block{i + 1}", "exec"), ns)
    return ns


def _kernels_active() -> bool:
    """True when the session's backend (PYLLM_BACKEND, inherited by the ranks) runs pyllm's kernels."""
    b = pyllm.current_backend()
    return (b in ("auto", "native") and _ext.HAS_C) or (b == "cuda-emulated" and _ext.HAS_EMU)


def _assert_native(*ops):
    """The models ran pyllm's kernels, not the reference, when the session's backend picks kernels."""
    if _kernels_active():
        for op in ops:
            assert pyllm.last_decision(op).path != "reference", pyllm.last_decision(op)


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


# --------------------------------------------------------------------------- import and registry
def test_import_is_lazy_and_rules_cover_every_op():
    """``import pyllm`` does not import torch.distributed.tensor (~0.8 s); ``import pyllm.distributed``
    registers a rule for every native op of every loaded namespace, found through the op registry; the
    rules table of the doc is the one the code describes."""
    code = (
        "import sys, torch, pyllm\n"
        "assert 'torch.distributed.tensor' not in sys.modules, 'import pyllm imported torch.distributed.tensor'\n"
        "import pyllm.distributed as pd\n"
        "from torch.distributed.tensor import DTensor\n"
        "funcs = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs\n"
        "want = {getattr(getattr(torch.ops, ns), op).default for ns in pyllm.ops.namespaces()\n"
        "        for op in pyllm.ops.native_ops()}\n"
        "assert want <= set(funcs), sorted(map(str, want - set(funcs)))\n"
        "assert set(pd.registered_ops()) == want\n"
        "missing = sorted(str(o) for o, kind in pd.registered_ops().items() if kind != 'rule')\n"
        "assert not missing, f'ops without a sharding rule: {missing}'\n"
        "assert pd.register() and len(pd.registered_ops()) == len(want)  # idempotent\n"
        "print(len(want), ' '.join(pyllm.ops.namespaces()))\n"
        f"assert pd.describe() in open({str(DOC)!r}).read(), 'docs/DISTRIBUTED.md: rules table != describe()'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    n, *namespaces = r.stdout.split()
    assert "pyllm" in namespaces or not _ext.HAS_C
    assert int(n) == len(namespaces) * sum(len(s.schemas) for s in pyllm.ops.specs())


# --------------------------------------------------------------------------- DTensor ops
# The DTensor run is the same kernel on a subset of the rows (heads, batch entries), so the outputs and
# the sharded inputs' gradients come out bit-identical (measured); the gradients of what is replicated
# (norm weights and biases, masks) are sums over the rows, which the sharded run adds in two halves and
# then across ranks: fp32 reassociation of <= 24 terms, measured <= 1.9e-6 on values of up to ~10. A wrong
# rule (a misplaced shard, a gradient left Partial or reduced twice, a wrong GQA head mapping) is off
# by O(1) (a Replicate() weight gradient instead of Partial(): off by 7.8).
OPS_TOL = dict(rtol=1e-5, atol=1e-5)


def _dt(t, mesh, placement, grad=False):
    from torch.distributed.tensor import distribute_tensor

    d = distribute_tensor(t, mesh, [placement])
    return d.requires_grad_() if grad else d


def _check_op(call, args, placements, mesh, partial_grad=False):
    """``call(*args)`` on DTensors (``placements``, None = not a tensor) against ``call`` on the full
    tensors: the op communicates nothing, its outputs have the inputs' sharded placement and equal the
    local outputs, and so do the gradients of the floating inputs (``partial_grad``: the incoming
    gradient is Partial(), held whole by rank 0, zeros on rank 1)."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.debug import CommDebugMode

    floats = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()
              and placements[i] is not None]
    local = [a.clone().requires_grad_() if i in floats else a for i, a in enumerate(args)]
    dargs = [_dt(a, mesh, placements[i], grad=i in floats) if placements[i] is not None else a
             for i, a in enumerate(args)]
    with CommDebugMode() as comm:
        out = call(*dargs)
    assert comm.get_total_counts() == 0, f"the op communicated: {comm.get_comm_counts()}"
    ref = call(*local)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    sharded = [p for p in placements if p is not None and not isinstance(p, Replicate)]
    for o, r in zip(outs, refs):
        assert isinstance(o, DTensor)
        assert o.placements == ((sharded[0] if sharded else Replicate()),), o.placements
        torch.testing.assert_close(o.full_tensor(), r, **OPS_TOL)

    g = torch.Generator().manual_seed(0)
    cots = [torch.randn(r.shape, generator=g) for r in refs]
    if partial_grad:
        dcots = [_partial(c, mesh) for c in cots]
    else:
        dcots = [_dt(c, mesh, o.placements[0]) for c, o in zip(cots, outs)]
    with CommDebugMode() as comm:
        dgrads = torch.autograd.grad(outs, [dargs[i] for i in floats], dcots)
    assert comm.get_total_counts() == 0, f"the backward communicated: {comm.get_comm_counts()}"
    grads = torch.autograd.grad(refs, [local[i] for i in floats], cots)
    for i, dg, lg in zip(floats, dgrads, grads):
        assert isinstance(dg, DTensor)
        torch.testing.assert_close(dg.full_tensor(), lg, **OPS_TOL, msg=lambda m: f"gradient of arg {i}: {m}")
    return outs


def _ops_on_dtensors(ns_name, mesh):
    import pyllm.functional as F
    from torch.distributed.tensor import Replicate, Shard

    g = torch.Generator().manual_seed(1)
    rn = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    R, S0, S1, S2 = Replicate(), Shard(0), Shard(1), Shard(2)

    # norms [4, 6, 16]: replicated, batch- or sequence-sharded; the weight/bias replicated.
    x, r, w, b = rn(4, 6, 16), rn(4, 6, 16), rn(16), rn(16)
    for p in (R, S0, S1):
        _check_op(lambda x, w: F.rms_norm(x, 16, w, 1e-6, style="llama"), (x, w), (p, R), mesh)
        _check_op(lambda x, w, b: F.layer_norm(x, 16, w, b), (x, w, b), (p, R, R), mesh)
        _check_op(lambda x, r, w: F.add_rms_norm(x, r, 16, w, 1e-6), (x, r, w), (p, p, R), mesh)
        _check_op(lambda x, r, w, b: F.add_layer_norm(x, r, 16, w, b), (x, r, w, b), (p, p, R, R), mesh)
    # a replicated residual next to a sharded input is sliced locally (no communication)
    _check_op(lambda x, r, w: F.add_rms_norm(x, r, 16, w, 1e-6), (x, r, w), (S1, R, R), mesh)
    # the backward ops are linear in the incoming gradient: Partial() in, Partial() out
    _check_op(lambda x, w, b: F.layer_norm(x, 16, w, b), (x, w, b), (R, R, R), mesh, partial_grad=True)
    _check_op(lambda x, w: F.rms_norm(x, 16, w, 1e-6), (x, w), (R, R), mesh, partial_grad=True)
    assert pyllm.last_decision("rms_norm").kernel == ns_name

    # masked_softmax [2, 3, 5, 7] with a float mask [2, 1, 5, 7] (broadcast over the heads)
    s, m = rn(2, 3, 5, 7), rn(2, 1, 5, 7)
    for p in (S0, S1, S2):  # S2, the query dim: without causal
        _check_op(lambda s, m: F.masked_softmax(s, m, 0.5), (s, m), (p, R), mesh)
    _check_op(lambda s: F.masked_softmax(s, None, 1.0, True), (s,), (S1,), mesh)
    assert pyllm.last_decision("masked_softmax").kernel == ns_name

    # attention: GQA 4 query heads / 2 kv heads, a float mask [2, 1, 5, 7], causal bottom-right
    q, k, v, am = rn(2, 4, 5, 8), rn(2, 2, 7, 8), rn(2, 2, 7, 8), rn(2, 1, 5, 7)
    for p in (S0, S1):
        _check_op(lambda q, k, v, am: F.scaled_dot_product_attention(q, k, v, am, enable_gqa=True),
                  (q, k, v, am), (p, p, p, R), mesh)
        _check_op(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                 causal_alignment="bottom_right"),
                  (q, k, v), (p, p, p), mesh)
    assert pyllm.last_decision("scaled_dot_product_attention").kernel == ns_name
    out = _dt(q, mesh, S1)
    out = F.scaled_dot_product_attention(out, _dt(k, mesh, S1), _dt(v, mesh, S1), enable_gqa=True)
    assert out.to_local().shape == (2, 2, 5, 8)  # each rank: its 2 query heads (and its kv head)

    lib = getattr(torch.ops, ns_name)
    # varlen attention [T, H, D], two sequences (3 and 4 tokens), heads sharded; cu_seqlens replicated:
    # the native op, and the public wrapper (it reads cu_seqlens' values from the local copy)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    vq, vk, vv = rn(7, 4, 8), rn(7, 2, 8), rn(7, 2, 8)
    _check_op(lambda q, k, v, cq, ck: lib.varlen_attention(q, k, v, cq, ck, 0.35, True, -1, -1, 0.0, 0, None),
              (vq, vk, vv, cu, cu), (S1, S1, S1, R, R), mesh)
    _check_op(lambda q, k, v, cq, ck: F.varlen_attention(q, k, v, cq, ck, 4, 4, softmax_scale=0.35, causal=True),
              (vq, vk, vv, cu, cu), (S1, S1, S1, R, R), mesh)
    assert pyllm.last_decision("varlen_attention").kernel == ns_name

    # bias_gelu is elementwise: any dim, the bias sliced with the last
    x2, b2 = rn(4, 6), rn(6)
    for p in (S0, Shard(1)):
        _check_op(lambda x, b: F.bias_gelu(x, b), (x2, b2), (p, R), mesh)
    assert pyllm.last_decision("bias_gelu").kernel == ns_name

    # the in-place add + LayerNorm: the native op, and the public wrapper (its overlap check reads the
    # local tensors)
    xi = _dt(x.clone(), mesh, S0)
    lib.add_layer_norm_inplace(xi, _dt(r, mesh, R), _dt(w, mesh, R), _dt(b, mesh, R), 1e-5)
    assert xi.placements == (S0,)
    torch.testing.assert_close(xi.full_tensor(), torch.nn.functional.layer_norm(x + r, (16,), w, b), **OPS_TOL)
    xi = _dt(x.clone(), mesh, S0)
    with torch.no_grad():
        F.add_layer_norm_(xi, _dt(r, mesh, S0), (16,), _dt(w, mesh, R), _dt(b, mesh, R))
    assert xi.placements == (S0,) and pyllm.last_decision("add_layer_norm").kernel == ns_name
    torch.testing.assert_close(xi.full_tensor(), torch.nn.functional.layer_norm(x + r, (16,), w, b), **OPS_TOL)

    # ---- what cannot run shard-locally: a clear error, never a silent all-gather
    def raises(match, fn):
        with pytest.raises(RuntimeError, match=match):
            fn()

    wr = _dt(w, mesh, R)
    raises(r"pyllm: rms_norm \(rms_norm\) on DTensors: input .* shape \[4, 6, 16\]\) is sharded on dim 2 "
           r"\(Shard\(2\) on mesh dim 0\): the normalized \(last\) dim.*or shard dim 0 or 1 instead",
           lambda: F.rms_norm(_dt(x, mesh, S2), 16, wr))
    raises(r"add_layer_norm .*: input .* is sharded on dim 2 .*the normalized \(last\) dim",
           lambda: F.add_layer_norm(_dt(x, mesh, S2), _dt(r, mesh, S2), 16))
    raises(r"layer_norm .*: weight is Shard\(dim=0\) on mesh dim 0 but must be Replicate\(\) there \(a weight "
           r"or bias of the normalized dim is never sharded\)",
           lambda: F.layer_norm(_dt(x, mesh, S0), 16, _dt(w, mesh, S0)))
    raises(r"rms_norm .*: input is Partial\(\) on mesh dim 0 \(a pending sum\) and the op is not linear in it",
           lambda: F.rms_norm(_partial(x, mesh), 16, wr))
    raises(r"add_rms_norm .*: its tensors are sharded on different dims on mesh dim 0 \(input Shard\(0\), "
           r"residual Shard\(1\)\); give them the same placement",
           lambda: F.add_rms_norm(_dt(x, mesh, S0), _dt(r, mesh, S1), 16))
    # causal=False decided Shard(2) fine just above; causal=True must not reuse that cached decision
    raises(r"masked_softmax .*: input .* is sharded on dim 2 .*: the query dim \(dim -2\) with causal=True",
           lambda: F.masked_softmax(_dt(s, mesh, S2), None, 1.0, True))
    raises(r"masked_softmax .*: the softmax \(last\) dim", lambda: F.masked_softmax(_dt(s, mesh, Shard(3))))
    raises(r"scaled_dot_product_attention \(attention\) on DTensors: query .* is sharded on dim 2 .*the "
           r"query/key length dim.*ring attention",
           lambda: F.scaled_dot_product_attention(*(_dt(t, mesh, S2) for t in (q, k, v)), enable_gqa=True))
    raises(r"the head dim: the q.k dot products",
           lambda: F.scaled_dot_product_attention(*(_dt(t, mesh, Shard(3)) for t in (q, k, v)), enable_gqa=True))
    raises(r"its tensors are sharded on different dims on mesh dim 0 \(query/value Shard\(1\), key Shard\(0\)\)",
           lambda: F.scaled_dot_product_attention(_dt(q, mesh, S1), _dt(k, mesh, S0), _dt(v, mesh, S1),
                                                  enable_gqa=True))
    k1, v1 = rn(2, 1, 7, 8), rn(2, 1, 7, 8)  # one kv head cannot be split over 2 ranks
    raises(r"the heads dim is split 2 ways, but the head counts .* are not all divisible by 2",
           lambda: F.scaled_dot_product_attention(*(_dt(t, mesh, S1) for t in (q, k1, v1)), enable_gqa=True))
    raises(r"varlen_attention .*: q .* is sharded on dim 0 .*the packed token dim",
           lambda: lib.varlen_attention(*(_dt(t, mesh, S0) for t in (vq, vk, vv)), _dt(cu, mesh, R),
                                        _dt(cu, mesh, R), 0.35, True, -1, -1, 0.0, 0, None))
    raises(r"varlen_attention .*: cu_seqlens_q is Shard\(dim=0\) on mesh dim 0 but must be Replicate\(\) there "
           r"\(it indexes the global tensor\)",
           lambda: lib.varlen_attention(*(_dt(t, mesh, S1) for t in (vq, vk, vv)), _dt(cu, mesh, S0),
                                        _dt(cu, mesh, R), 0.35, True, -1, -1, 0.0, 0, None))
    raises(r"add_layer_norm \(add_layer_norm_inplace\) .*: input is Replicate\(\) on mesh dim 0 but must be "
           r"Shard\(dim=0\) there .*written in place",
           lambda: lib.add_layer_norm_inplace(_dt(x.clone(), mesh, R), _dt(r, mesh, S0), None, None, 1e-5))


def _partial(full, mesh):
    """A Partial() DTensor summing to ``full``: rank 0 holds it, the others zeros."""
    from torch.distributed.tensor import DTensor, Partial

    return DTensor.from_local(full if dist.get_rank() == 0 else torch.zeros_like(full), mesh, [Partial()])


def _rank_dtensor_ops(rank):
    import pyllm.functional as F
    from torch.distributed.tensor import Replicate, Shard

    mesh = _mesh()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 6, 16, generator=g), torch.randn(16, generator=g)
    # Before `import pyllm.distributed`: the native op alone has no rule (DTensor's own error, not a
    # silent fallback) ...
    assert "pyllm.distributed" not in sys.modules
    with pytest.raises(NotImplementedError, match=r"pyllm\.rms_norm\.default does not have a sharding strategy"):
        torch.ops.pyllm.rms_norm(_dt(x, mesh, Shard(0)), _dt(w, mesh, Replicate()), 1e-6, None, 0.0, x.dtype)
    # ... while the public wrapper's first DTensor registers the rules (backends.select)
    with pyllm.use_backend("native"):
        y0 = F.rms_norm(_dt(x, mesh, Shard(0)), 16, _dt(w, mesh, Replicate()))
    assert "pyllm.distributed" in sys.modules and y0.placements == (Shard(0),)
    torch.testing.assert_close(y0.full_tensor(), F.rms_norm(x, 16, w))
    recipes = _doc_recipes()
    import pyllm.distributed as pd

    for ns_name in pyllm.ops.namespaces():
        with pyllm.use_backend({"pyllm": "native", "pyllm_emu": "cuda-emulated"}[ns_name]):
            _ops_on_dtensors(ns_name, mesh)

    # the doc's examples, against the local computation
    q, k, v = (torch.randn(2, h, 6, 8, generator=g) for h in (4, 2, 2))
    with pyllm.use_backend("native"):
        out = recipes["heads_parallel_attention"](q, k, v, mesh, is_causal=True)
        h, nw = torch.randn(2, 6, 16, generator=g), torch.randn(16, generator=g)
        y = recipes["sequence_parallel_rms_norm"](h, nw, mesh)
    assert out.placements == (Shard(1),)
    torch.testing.assert_close(out.full_tensor(), F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                 enable_gqa=True), **OPS_TOL)
    assert y.placements == (Shard(1),) and y.to_local().shape == (2, 3, 16)
    torch.testing.assert_close(y.full_tensor(), F.rms_norm(h, 16, nw, 1e-6), **OPS_TOL)

    # the reference path is not shard-aware: the wrappers raise instead of letting DTensor all-gather
    # (fp64 has no kernel; backend "torch" always runs the reference)
    with pytest.raises(RuntimeError, match=r"pyllm: rms_norm would run its pure-PyTorch reference on DTensors "
                                           r"\(reference \(PyTorch\) because float64 has no kernel.*could all-gather"):
        F.rms_norm(_dt(x.double(), mesh, Shard(2)), 16)
    with pyllm.use_backend("torch"), pytest.raises(RuntimeError, match=r"masked_softmax would run its pure-PyTorch"):
        F.masked_softmax(_dt(x, mesh, Shard(0)))
    pd.check_reference("rms_norm", (x, None))  # plain tensors: nothing to say


@needs_native
def test_dtensor_ops(tmp_path):
    """pyllm.functional on DTensors, in every loaded namespace (``pyllm``; ``pyllm_emu`` when built):
    shard-local (no communication) and equal to the local computation, outputs and gradients; the
    clear errors; the doc's DTensor examples."""
    _spawn(_rank_dtensor_ops, tmp_path)


# --------------------------------------------------------------------------- tensor parallel Llama
# Tensor parallelism changes one thing numerically: o_proj, down_proj (and, with sequence parallelism,
# the embedding and the LM head) sum their dot products in two halves, one per rank, then
# all-reduce, instead of in one pass. That is fp32 reassociation of <= 128-term sums, a relative error
# of a few ulps per layer; measured 2e-6 on logits of magnitude ~3 for this 3-layer model. 1e-4 is
# ~50x that and still ~3e-5 of the logits' scale, while a wrong split (heads mapped to the wrong kv
# head, a missing all-reduce, a norm over a sharded dim) moves logits by O(0.1-1).
TP_ATOL = 1e-4
TP_GRAD_ATOL = 1e-6


def _rank_tensor_parallel(rank):
    import pyllm.hf
    from pyllm.hf.testing import tiny_model
    from torch.distributed.tensor import DTensor, Shard
    from torch.utils._python_dispatch import TorchDispatchMode

    recipes = _doc_recipes()
    mesh = recipes["setup"]()  # the process group exists: the doc's setup makes the mesh
    cfg = dict(num_hidden_layers=3)  # hidden 64, 4 query heads, 2 kv heads (tiny_config)
    ref = tiny_model("llama", attn_implementation="pyllm", seed=0, **cfg)
    pyllm.hf.optimize(ref)
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    _assert_native("scaled_dot_product_attention", "rms_norm")
    gen = ref.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    # Greedy tokens can only be compared if no step is a near tie: every step's best token leads the
    # second by far more than the logits' tolerance.
    top2 = torch.stack(gen.scores, 1).topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 10 * TP_ATOL

    class NormInputs(TorchDispatchMode):  # what reaches pyllm's RMSNorm kernel
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace in ("pyllm", "pyllm_emu") and func._opname == "rms_norm":
                self.seen.append(args[0].placements if isinstance(args[0], DTensor) else type(args[0]).__name__)
            return func(*args, **(kwargs or {}))

    models = {
        "parallelize_module": recipes["tensor_parallel"](tiny_model("llama", attn_implementation="pyllm", seed=0,
                                                                    **cfg), mesh),
        "sequence parallel": recipes["sequence_parallel"](tiny_model("llama", attn_implementation="pyllm", seed=0,
                                                                     **cfg), mesh),
    }
    for name, model in models.items():
        # the split is real: each rank holds half of q_proj's rows (2 of the 4 heads)
        wq = model.model.layers[0].self_attn.q_proj.weight
        local = wq.to_local() if isinstance(wq, DTensor) else wq
        assert tuple(local.shape) == (32, 64), (name, tuple(local.shape))
        if isinstance(wq, DTensor):
            assert wq.placements == (Shard(0),), name
        spy = NormInputs()
        with torch.no_grad(), spy:
            got = model(ids).logits
        got = got.full_tensor() if isinstance(got, DTensor) else got
        torch.testing.assert_close(got, want, rtol=0, atol=TP_ATOL, msg=lambda m: f"{name}: {m}")
        if not _kernels_active():
            pass  # the reference ran: no pyllm kernel to watch
        elif name == "sequence parallel":  # the norms ran on their DTensor rule, on the local tokens
            assert spy.seen and all(p == (Shard(1),) for p in spy.seen), spy.seen
        else:
            assert spy.seen and set(spy.seen) == {"Tensor"}, spy.seen
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(out, gen.sequences), (name, out, gen.sequences)

    # one backward through the sequence-parallel model: the norm weights' gradients (Partial() sums over
    # each rank's tokens, from pyllm's rule) equal the single-process ones. They are <= 0.11 here and
    # differ by reassociation only (measured <= 7e-8); TP_GRAD_ATOL is ~15x that, a Replicate() gradient
    # instead of Partial() (each rank's half-sum taken for the whole) is off by 0.12.
    sp = models["sequence parallel"]
    loss = lambda m: torch.nn.functional.cross_entropy(  # noqa: E731
        m(ids).logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    loss(ref).backward()
    loss(sp).backward()
    for i, (a, b) in enumerate(zip(ref.model.layers, sp.model.layers)):
        for n in ("input_layernorm", "post_attention_layernorm"):
            ga, gb = getattr(a, n).weight.grad, getattr(b, n).weight.grad
            gb = gb.full_tensor() if isinstance(gb, DTensor) else gb
            torch.testing.assert_close(gb, ga, rtol=0, atol=TP_GRAD_ATOL, msg=lambda m: f"layer {i} {n}: {m}")


def test_tensor_parallel_llama(tmp_path):
    """A tiny random-weight Llama (3 layers, hidden 64, 4 heads, 2 kv heads) on pyllm attention and RMSNorm,
    split over 2 ranks by the doc's recipes (parallelize_module, and with sequence parallelism): logits equal
    the single-process model's, greedy generation is token-identical; with sequence parallelism the RMSNorms
    run on sequence-sharded DTensors, and their weights' gradients equal the single-process ones."""
    _spawn(_rank_tensor_parallel, tmp_path)


# --------------------------------------------------------------------------- FSDP2 training
# Data parallelism changes one thing: each gradient is the average of two half-batch means, reduce-
# scattered, instead of one full-batch mean, i.e. fp32 reassociation (~1e-7 relative). AdamW's step
# lr * m / (sqrt(v) + eps) is smooth in the gradient wherever the gradient stands well above that noise
# (not for the key biases, below), so after 5 steps the losses agree to 1 ulp (measured 4.8e-7 on
# losses of ~4.3, the first one included: a mean of two half-batch means) and the parameters to ~1e-7.
# The bounds leave a margin of ~10x; without the gradient reduction (each rank training on its half
# alone) the mean loss moves by 0.06 after one step and 0.2 after five (measured).
FSDP_LOSS_TOL = dict(rtol=2e-6, atol=2e-6)
FSDP_PARAM_TOL = dict(rtol=1e-6, atol=1e-6)


def _rank_fsdp(rank):
    from pyllm.models import DecoderOnlyTransformer
    from torch.distributed.tensor import DTensor, Shard

    recipes = _doc_recipes()
    mesh = recipes["setup"]()

    def make():
        torch.manual_seed(0)
        return DecoderOnlyTransformer(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, dropout=0.0,
                                      max_sequence_length=32, norm_first=True)

    # 4 sequences of 17 tokens, the same batch every step (so 5 steps visibly lower the loss)
    data = torch.randint(0, 64, (1, 4, 17), generator=torch.Generator().manual_seed(0)).expand(5, 4, 17)
    ref = make()
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    want = torch.stack([recipes["train_step"](ref, opt, d[:, :-1], d[:, 1:]) for d in data])
    _assert_native("scaled_dot_product_attention", "add_layer_norm", "layer_norm")

    model = recipes["fsdp2"](make(), mesh)
    p = model.layers[0].self_attn.W_q.weight
    assert isinstance(p, DTensor) and p.placements == (Shard(0),) and p.to_local().shape == (16, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    half = slice(2 * rank, 2 * rank + 2)  # each rank: its 2 of the 4 sequences
    got = torch.stack([recipes["train_step"](model, opt, d[half, :-1], d[half, 1:]) for d in data])
    dist.all_reduce(got, op=dist.ReduceOp.AVG)  # the full batch's mean loss
    assert want[-1] < want[0]  # it trains
    torch.testing.assert_close(got, want, **FSDP_LOSS_TOL)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        if name.endswith("W_k.bias"):
            # A key bias adds q.b_k to every score of a query: softmax ignores it, its exact gradient is 0 and
            # both runs' gradients are rounding noise (~1e-8), which AdamW normalizes to steps of ~lr: its
            # value is noise in both runs, not a result.
            continue
        torch.testing.assert_close(b.full_tensor(), a.detach(), **FSDP_PARAM_TOL, msg=lambda m: f"{name}: {m}")


def test_fsdp2_decoder_training(tmp_path):
    """A pyllm.models decoder (pre-norm, fused add + LayerNorm, pyllm attention) trained 5 AdamW steps with
    FSDP2 over 2 ranks, each on half the batch: the losses and the final parameters equal the
    single-process full-batch run."""
    _spawn(_rank_fsdp, tmp_path)
