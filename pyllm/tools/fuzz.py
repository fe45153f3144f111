"""``python -m pyllm fuzz``: hypothesis campaigns for every registered op against the fp64 torch oracle.

One strategy per op (:data:`STRATEGIES`, keyed by the registry name; a test checks that every op in
:func:`pyllm.ops.specs` has one) draws a :class:`Case`: shapes with 0- and 1-sized dims and odd sizes,
layouts (transposed, sliced, misaligned by one element, expanded with stride 0, heads-major),
dtypes fp32/fp16/bf16, mask kinds and broadcast shapes, scales and eps, and for attention causal and
windowed geometry, GQA, Lq != Lk, ALiBi slopes and dropout_p=0. :func:`check` runs the case on one
backend (``native``: the CPU kernels; ``cuda-emulated``: the CUDA kernels under the CPU emulation)
without gradients (``torch.no_grad`` or ``torch.inference_mode``) or with them (outputs and the
gradients of every floating input), and judges it with the shared accuracy rule
(:func:`pyllm.testing.assert_close_to_ref`: error against the fp64 oracle at most 2x, gradients 3x,
plain torch's error in the same dtype, floor a few ulps).

The oracle is torch: each op's ``torch_baseline`` (F.layer_norm, F.rms_norm or the Hugging Face
formulas, F.scaled_dot_product_attention with explicit masks, F.gelu) evaluated on fp64 copies of
the inputs, and the same composition in the test dtype is the baseline; masked_softmax uses
:func:`pyllm.testing.softmax_torch` (its ``torch_baseline`` gives NaN on rows that an additive
``-inf`` mask hides completely, where pyllm documents zeros). Never pyllm's own reference.

How the rule is applied, so that it measures the kernels and not the noise of the rule (each point
is explained where it is implemented):

* the baseline runs on contiguous copies of the arguments, attention on [B, H, L, D] views, GELU on at
  least 64 elements: torch picks its kernels by layout, rank and size (vectorized or scalar loops, its
  fused flash attention or the math path) and their errors differ several-fold;
* tiny examples (under POOL_ELEMENTS elements, or POOL_ROWS rows) are evaluated on more draws of the
  same configuration and the rule is applied to the pooled errors, as to one large tensor;
* gradients that vanish identically (softmax's invariance to a constant along the keys: a mask
  constant along the keys, rows that see at most one key) are not compared: the oracle's exact zeros
  would demand bit-exact zeros from a cancellation;
* attention logits stay in the range of trained models (spread up to 8, see QK_SCALE).

The command runs every (op, backend) pair with a seed (each round of examples gets a seed derived
from it, so a campaign is reproducible), for a time budget split over the pairs and/or a number of
examples per pair, prints the examples run per op and backend, and for a failure hypothesis's
shrunk falsifying example and a one-line reproduction (``check(Case(...), backend)``); it exits 1 on
any failure. ``--keep-going`` goes on after a failure and reports every distinct one.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

try:
    import hypothesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError as e:  # a test dependency, not a core one
    raise ImportError("python -m pyllm fuzz needs hypothesis: pip install hypothesis "
                      "(or the test extra: pip install -e .[test])") from e

import pyllm
from pyllm import ops
from pyllm.testing import assert_close_to_ref, keep_mask, softmax_torch

BACKENDS = ("native", "cuda-emulated")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALIASES = {"attention": "scaled_dot_product_attention", "sdpa": "scaled_dot_product_attention"}


@dataclass(frozen=True)
class Case:
    """One fuzz example: the op's registry name and every drawn parameter (plain Python values, so the
    repr is the reproduction: ``check(Case('layer_norm', {...}), 'native')``)."""
    op: str
    params: dict

    def __repr__(self) -> str:
        return f"Case({self.op!r}, {self.params!r})"


# --------------------------------------------------------------------------- inputs
def _layout(shape: tuple, layout: str):
    """(stored shape, view fn) giving a tensor of ``shape`` laid out as ``layout``, where the shape
    allows it (else contiguous): "transposed" (last two dims swapped in memory), "sliced" (every other
    element of the last dim), "offset" (contiguous from the second element of a buffer: misaligned),
    "broadcast" (dim 0 expanded from 1: stride 0), "heads" (dims -3 and -2 swapped in memory: [L, H, D]
    storage of a [H, L, D] argument, the layout of Hugging Face attention and of packed varlen q/k/v)."""
    shape = tuple(shape)
    n = len(shape)
    if layout == "transposed" and n >= 2:
        return shape[:-2] + (shape[-1], shape[-2]), lambda t: t.transpose(-1, -2)
    if layout == "heads" and n >= 3:
        return shape[:-3] + (shape[-2], shape[-3], shape[-1]), lambda t: t.transpose(-3, -2)
    if layout == "sliced" and n >= 1:
        return shape[:-1] + (2 * shape[-1] + 1,), lambda t: t[..., 1::2]
    if layout == "offset" and n >= 1:
        numel = 1
        for s in shape:
            numel *= s
        return (numel + 1,), lambda t: t[1:].view(shape)
    if layout == "broadcast" and n >= 2:
        return (1,) + shape[1:], lambda t: t.expand(shape)
    return shape, lambda t: t


@dataclass
class Built:
    """The inputs of one case: base tensors (``leaves``; what gradients are taken against), the views
    that turn them into arguments, and the call. ``oracle`` is the torch composition with the public
    signature (default: the op's ``torch_baseline``); ``ours`` what runs on the backend (default: the
    op's public function); ``n_out`` how many outputs to compare."""
    leaves: dict = field(default_factory=dict)
    views: dict = field(default_factory=dict)
    grad: tuple = ()
    args: Callable = None
    oracle: Optional[Callable] = None
    ours: Optional[Callable] = None
    n_out: Optional[int] = None

    def leaf(self, name, shape, dtype, layout, g, scale=1.0, shift=0.0, grad=True, values=None):
        base_shape, view = _layout(shape, layout)
        t = values(base_shape) if values is not None else torch.randn(base_shape, generator=g) * scale + shift
        self.leaves[name] = t.to(dtype)
        self.views[name] = view
        if grad and dtype.is_floating_point:
            self.grad += (name,)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask_leaf(b: Built, p: dict, target: tuple, dtype, g, grad: bool) -> None:
    """A mask leaf from p["mask"] (none, bool, add_same, add_f32, add_ninf), broadcastable to ``target``:
    p["mask_dims"] keeps (True) or broadcasts (False) each dim, p["mask_drop"] drops that many leading
    broadcast dims, p["mask_view"] is "plain", "transposed" or "expanded" (a stride-0 view at ``target``)."""
    kind = p["mask"]
    if kind == "none":
        return
    if kind == "bool_pad":  # [*lead, 1, 1, Lk] padding: a random prefix of keys per batch entry
        mshape = tuple(target[:-3]) + (1, 1, target[-1])
    else:
        mshape = tuple(s if k else 1 for s, k in zip(target, p["mask_dims"]))
    drop = 0
    while drop < min(p["mask_drop"], len(mshape) - 1) and mshape[drop] == 1:
        drop += 1
    mshape = mshape[drop:]
    if kind == "bool_pad":
        lk = target[-1]
        lens = torch.randint(0, lk + 1, mshape[:-1], generator=g) if lk else torch.zeros(mshape[:-1])
        vals = torch.arange(lk) < lens.unsqueeze(-1)
    elif kind == "bool":
        vals = torch.rand(mshape, generator=g) < p["p_keep"]
    else:
        vals = torch.randn(mshape, generator=g) * 3
        if kind == "add_ninf":
            vals = vals.masked_fill(torch.rand(mshape, generator=g) < 1 - p["p_keep"], float("-inf"))
        vals = vals.to(torch.float32 if kind == "add_f32" else dtype)
    view = p["mask_view"]
    tview = lambda t: t  # noqa: E731
    if view == "transposed" and vals.dim() >= 2:  # stored with the last two dims swapped
        vals, tview = vals.transpose(-1, -2).contiguous(), (lambda t: t.transpose(-1, -2))
    b.leaves["mask"] = vals
    b.views["mask"] = (lambda t: tview(t).expand(target)) if view == "expanded" else tview
    if grad and vals.dtype.is_floating_point:
        b.grad += ("mask",)


def _visible(keep: torch.Tensor, b: Built) -> torch.Tensor:
    """``keep`` (bool, the scores' shape) narrowed by the mask leaf: False where a bool mask hides a key or
    an additive mask is -inf."""
    if "mask" in b.leaves:
        m = b.views["mask"](b.leaves["mask"])
        keep = keep & (m if m.dtype == torch.bool else m > float("-inf"))
    return keep


def _drop_zero_grads(b: Built, max_visible: int = 0, qk=()) -> None:
    """Stops differentiating inputs whose exact gradient vanishes identically (softmax is invariant to
    adding a constant along the keys): a mask constant along the key dim (broadcast there, or one key),
    and, when no query row sees more than one key, the queries and keys (``qk``) and the mask. The fp64
    oracle gives exact zeros there, which the rule (floor relative to max|ref|) turns into a demand for
    exact zeros from a sum whose terms cancel only up to rounding; the outputs and the other gradients
    of such cases are still checked."""
    drop = set()
    if "mask" in b.leaves:  # (a view's key dim: one key, or stride 0)
        m = b.views["mask"](b.leaves["mask"])
        if m.dim() == 0 or m.shape[-1] <= 1 or m.stride(-1) == 0:
            drop.add("mask")
    if qk and max_visible <= 1:
        drop.update(qk + ("mask",))
    b.grad = tuple(n for n in b.grad if n not in drop)


# --------------------------------------------------------------------------- strategies
SEEDS = st.integers(0, 2**31 - 1)
DTYPE = st.sampled_from(tuple(DTYPES))
MODE = st.sampled_from(("no_grad", "inference", "grad"))
WIDTH = st.one_of(st.integers(0, 40), st.integers(41, 700), st.sampled_from((1023, 1024, 1025, 2049, 4097)))
LAYOUT = st.sampled_from(("contiguous", "transposed", "sliced", "offset", "broadcast"))
PARAM_LAYOUT = st.sampled_from(("contiguous", "sliced", "offset"))
SCALE = st.sampled_from((1.0, 0.01, 30.0))
SHIFT = st.sampled_from((0.0, 5.0, -100.0))
MASK_KIND = st.sampled_from(("none", "bool", "add_same", "add_f32", "add_ninf"))
MASK_VIEW = st.sampled_from(("plain", "transposed", "expanded"))
P_KEEP = st.sampled_from((0.0, 0.3, 0.9, 1.0))
HEAD_DIMS = (1, 2, 3, 8, 16, 31, 32, 64, 65, 80, 96, 128, 200, 256)
# Attention logits: q and k ~ qk_scale * N(0, 1), softmax scale = scale_mult / sqrt(d) (None: the default
# 1 / sqrt(d)), so the logits' spread is qk_scale**2 * |scale_mult| <= 8 at any head dim, the range of trained
# models. Far beyond it (spread 30+) the outputs' error is that of exp() at large arguments at a few
# saturated entries, and the max-error ratio of two correct implementations is noise (it exceeded 2 for
# 3-12% of cases pooled over 8 draws).
QK_SCALE = st.sampled_from((1.0, 2.0))
SCALE_MULT = st.sampled_from((None, None, 0.5, 2.0, -1.0))
WINDOW = st.one_of(st.none(), st.tuples(st.integers(-1, 6), st.integers(-1, 6)))


def _lead(max_dims=3, max_size=4, min_dims=0):
    return st.lists(st.integers(0, max_size), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def _norm_common(draw):
    return {"dtype": draw(DTYPE), "lead": draw(_lead()), "n": draw(WIDTH),
            "extra": draw(st.sampled_from((None, None, None, 1, 3))),  # a second normalized dim: (extra, n)
            "nshape": draw(st.sampled_from(("int", "tuple", "list"))),
            "layout": draw(LAYOUT), "scale": draw(SCALE), "shift": draw(SHIFT)}


def _nshape(p):
    if p["extra"] is not None:
        return (p["extra"], p["n"]) if p["nshape"] != "list" else [p["extra"], p["n"]]
    return {"int": p["n"], "tuple": (p["n"],), "list": [p["n"]]}[p["nshape"]]


@st.composite
def layer_norm_cases(draw):
    p = draw(_norm_common())
    p.update(weight=draw(st.booleans()), bias=draw(st.booleans()), param_layout=draw(PARAM_LAYOUT),
             eps=draw(st.sampled_from((1e-5, 1e-6, 1e-2, 1.0))), mode=draw(MODE), seed=draw(SEEDS))
    return Case("layer_norm", p)


@st.composite
def add_layer_norm_cases(draw):
    p = draw(_norm_common())
    p.update(res_layout=draw(LAYOUT), weight=draw(st.booleans()), bias=draw(st.booleans()),
             param_layout=draw(PARAM_LAYOUT), eps=draw(st.sampled_from((1e-5, 1e-6, 1e-2))), mode=draw(MODE))
    # add_layer_norm_ (in place, inference only) on a writable input (not an expanded view)
    p["inplace"] = p["mode"] != "grad" and p["layout"] != "broadcast" and draw(st.booleans())
    p["seed"] = draw(SEEDS)
    return Case("add_layer_norm", p)


@st.composite
def rms_norm_cases(draw):
    p = draw(_norm_common())
    p.update(style=draw(st.sampled_from(("torch", "llama", "t5", "gemma"))),
             weight=draw(st.sampled_from(("same", "float32", None))), param_layout=draw(PARAM_LAYOUT),
             eps=draw(st.sampled_from((None, 1e-6, 1e-5, 1e-2))), mode=draw(MODE), seed=draw(SEEDS))
    return Case("rms_norm", p)


@st.composite
def add_rms_norm_cases(draw):
    p = draw(rms_norm_cases()).params
    p.update(res_layout=draw(LAYOUT))
    return Case("add_rms_norm", p)


@st.composite
def masked_softmax_cases(draw):
    one_d = draw(st.booleans()) and draw(st.booleans())  # 1 in 4: a 1-D input
    lk = draw(st.one_of(st.integers(0, 40), st.sampled_from((64, 257, 1100))))
    shape = (lk,) if one_d else draw(_lead(2, 3)) + (draw(st.integers(0, 9)), lk)
    p = {"dtype": draw(DTYPE), "shape": shape, "layout": draw(LAYOUT), "scale": draw(SCALE),
         "shift": draw(st.sampled_from((0.0, 5.0))),
         "mask": draw(MASK_KIND), "mask_dims": draw(st.lists(st.booleans(), min_size=len(shape), max_size=len(shape))),
         "mask_drop": draw(st.integers(0, len(shape))), "mask_view": draw(MASK_VIEW), "p_keep": draw(P_KEEP),
         "causal": (not one_d) and draw(st.booleans()), "softmax_scale": draw(st.sampled_from((1.0, 0.125, 2.5, -0.7, 0.0))),
         "mode": draw(MODE), "seed": draw(SEEDS)}
    return Case("masked_softmax", p)


@st.composite
def attention_cases(draw):
    lead = draw(_lead(2, 2))
    hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    lq = draw(st.one_of(st.integers(0, 12), st.integers(13, 40)))
    lk = draw(st.one_of(st.integers(0, 12), st.integers(13, 48), st.sampled_from((64, 65))))
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = draw(st.one_of(st.just(d), st.sampled_from(HEAD_DIMS)))
    target = lead + (hkv * group, lq, lk)
    p = {"dtype": draw(DTYPE), "lead": lead, "hkv": hkv, "group": group, "lq": lq, "lk": lk, "d": d, "dv": dv,
         "gqa": group > 1 or draw(st.booleans()),
         "is_causal": draw(st.booleans()), "alignment": draw(st.sampled_from(("top_left", "bottom_right"))),
         "window": draw(WINDOW), "scale_mult": draw(SCALE_MULT),
         "mask": draw(st.sampled_from(("none", "bool", "bool_pad", "add_same", "add_f32", "add_ninf"))),
         "mask_dims": draw(st.lists(st.booleans(), min_size=len(target), max_size=len(target))),
         "mask_drop": draw(st.integers(0, len(target))), "mask_view": draw(MASK_VIEW), "p_keep": draw(P_KEEP),
         "alibi": draw(st.sampled_from((None, None, "h", "bh") if lead else (None, None, "h"))),
         "alibi_dtype": draw(st.sampled_from(("float32", "same"))),
         "q_layout": draw(st.sampled_from(("contiguous", "heads", "sliced", "transposed", "offset"))),
         "kv_layout": draw(st.sampled_from(("contiguous", "heads", "sliced", "transposed", "offset", "broadcast"))),
         "qk_scale": draw(QK_SCALE), "mode": draw(MODE), "seed": draw(SEEDS)}
    return Case("scaled_dot_product_attention", p)


@st.composite
def varlen_attention_cases(draw):
    nseq = draw(st.integers(0, 4))
    lens_q = draw(st.lists(st.integers(0, 20), min_size=nseq, max_size=nseq))
    self_attn = draw(st.booleans())
    lens_k = lens_q if self_attn else draw(st.lists(st.integers(0, 24), min_size=nseq, max_size=nseq))
    d = draw(st.sampled_from(HEAD_DIMS))
    p = {"dtype": draw(DTYPE), "lens_q": tuple(lens_q), "lens_k": tuple(lens_k), "hkv": draw(st.integers(1, 2)),
         "group": draw(st.integers(1, 3)), "d": d, "dv": draw(st.one_of(st.just(d), st.sampled_from(HEAD_DIMS))),
         "causal": draw(st.booleans()), "window": draw(st.one_of(st.just((-1, -1)), WINDOW.filter(bool))),
         "scale_mult": draw(SCALE_MULT),
         "alibi": draw(st.sampled_from((None, None, "h", "bh"))), "alibi_dtype": draw(st.sampled_from(("float32", "same"))),
         "cu_dtype": draw(st.sampled_from(("int32", "int64"))), "max_extra": draw(st.sampled_from((0, 0, 3))),
         "q_layout": draw(st.sampled_from(("contiguous", "heads", "sliced", "offset"))),
         "kv_layout": draw(st.sampled_from(("contiguous", "heads", "sliced", "offset"))),
         "qk_scale": draw(QK_SCALE), "mode": draw(MODE), "seed": draw(SEEDS)}
    return Case("varlen_attention", p)


@st.composite
def bias_gelu_cases(draw):
    p = {"dtype": draw(DTYPE), "lead": draw(_lead()), "n": draw(WIDTH), "layout": draw(LAYOUT),
         "bias": draw(st.booleans()), "param_layout": draw(PARAM_LAYOUT),
         "approximate": draw(st.sampled_from(("none", "tanh"))), "scale": draw(st.sampled_from((1.0, 3.0, 10.0))),
         "shift": draw(st.sampled_from((0.0, -2.0))), "mode": draw(MODE), "seed": draw(SEEDS)}
    return Case("bias_gelu", p)


# One strategy per registered op (tests/test_fuzz.py checks that none is missing).
STRATEGIES: dict[str, Callable[[], st.SearchStrategy]] = {
    "layer_norm": layer_norm_cases,
    "add_layer_norm": add_layer_norm_cases,
    "rms_norm": rms_norm_cases,
    "add_rms_norm": add_rms_norm_cases,
    "masked_softmax": masked_softmax_cases,
    "scaled_dot_product_attention": attention_cases,
    "varlen_attention": varlen_attention_cases,
    "bias_gelu": bias_gelu_cases,
}


# --------------------------------------------------------------------------- builders
def _norm_shapes(p):
    """(input shape, weight/bias shape) of a norm case."""
    shape = tuple(p["lead"]) + ((p["extra"],) if p["extra"] is not None else ()) + (p["n"],)
    pshape = shape[len(p["lead"]):]
    return shape, pshape


def build_layer_norm(p) -> Built:
    dt, g, b = DTYPES[p["dtype"]], _gen(p["seed"]), Built()
    shape, pshape = _norm_shapes(p)
    b.leaf("x", shape, dt, p["layout"], g, p["scale"], p["shift"])
    if p["weight"]:
        b.leaf("weight", pshape, dt, p["param_layout"], g, 1.0, 1.0)
    if p["bias"]:
        b.leaf("bias", pshape, dt, p["param_layout"], g)
    b.args = lambda v: ((v["x"], _nshape(p), v.get("weight"), v.get("bias"), p["eps"]), {})
    return b


def build_add_layer_norm(p) -> Built:
    dt, g, b = DTYPES[p["dtype"]], _gen(p["seed"]), Built()
    shape, pshape = _norm_shapes(p)
    b.leaf("x", shape, dt, p["layout"], g, p["scale"], p["shift"])
    b.leaf("residual", shape, dt, p["res_layout"], g, p["scale"])
    if p["weight"]:
        b.leaf("weight", pshape, dt, p["param_layout"], g, 1.0, 1.0)
    if p["bias"]:
        b.leaf("bias", pshape, dt, p["param_layout"], g)
    b.args = lambda v: ((v["x"], v["residual"], _nshape(p), v.get("weight"), v.get("bias"), p["eps"]), {})
    if p["inplace"]:
        b.ours, b.n_out = pyllm.functional.add_layer_norm_, 1
    return b


def build_rms_norm(p) -> Built:
    dt, g, b = DTYPES[p["dtype"]], _gen(p["seed"]), Built()
    shape, pshape = _norm_shapes(p)
    b.leaf("x", shape, dt, p["layout"], g, p["scale"], p["shift"])
    if p["weight"] is not None:
        wdt = dt if p["weight"] == "same" else DTYPES[p["weight"]]
        b.leaf("weight", pshape, wdt, p["param_layout"], g, 1.0, 0.0 if p["style"] == "gemma" else 1.0)
    b.args = lambda v: ((v["x"], _nshape(p), v.get("weight"), p["eps"]), {"style": p["style"]})

    def oracle(input, normalized_shape, weight=None, eps=None, *, style="torch"):
        # eps=None is torch.finfo(float32).eps for every kernel dtype (F.rms_norm's opmath eps);
        # the fp64 oracle must use the same number, not fp64's eps.
        eps = torch.finfo(torch.float32).eps if eps is None else eps
        return ops.get("rms_norm").torch_baseline(input, normalized_shape, weight, eps, style=style)

    b.oracle = oracle
    return b


def build_add_rms_norm(p) -> Built:
    b = build_rms_norm(p)
    dt, g = DTYPES[p["dtype"]], _gen(p["seed"] + 1)
    shape, _ = _norm_shapes(p)
    b.leaf("residual", shape, dt, p["res_layout"], g, p["scale"])
    b.args = lambda v: ((v["x"], v["residual"], _nshape(p), v.get("weight"), p["eps"]), {"style": p["style"]})

    def oracle(input, residual, normalized_shape, weight=None, eps=None, *, style="torch"):
        eps = torch.finfo(torch.float32).eps if eps is None else eps  # as build_rms_norm's oracle
        return ops.get("add_rms_norm").torch_baseline(input, residual, normalized_shape, weight, eps, style=style)

    b.oracle = oracle
    return b


def build_masked_softmax(p) -> Built:
    dt, g, b = DTYPES[p["dtype"]], _gen(p["seed"]), Built()
    shape = tuple(p["shape"])
    b.leaf("input", shape, dt, p["layout"], g, p["scale"], p["shift"])
    _mask_leaf(b, p, shape, dt, g, grad=True)
    b.args = lambda v: ((v["input"], v.get("mask"), p["softmax_scale"], p["causal"]), {})
    _drop_zero_grads(b)
    b.oracle = lambda input, mask=None, scale=1.0, causal=False: softmax_torch(input, mask, scale, causal)
    return b


def _scale(p):
    return None if p["scale_mult"] is None else p["scale_mult"] / max(p["d"], 1) ** 0.5


def _slopes(b, p, shape, dt, g):
    if p.get("alibi") is None:
        return
    sdt = torch.float32 if p["alibi_dtype"] == "float32" else dt
    b.leaf("alibi_slopes", shape, sdt, "contiguous", g, grad=False, values=lambda s: torch.rand(s, generator=g))


def build_attention(p) -> Built:
    dt, g, b = DTYPES[p["dtype"]], _gen(p["seed"]), Built()
    lead, hkv = tuple(p["lead"]), p["hkv"]
    hq = hkv * p["group"]
    b.leaf("query", lead + (hq, p["lq"], p["d"]), dt, p["q_layout"], g, p["qk_scale"])
    b.leaf("key", lead + (hkv, p["lk"], p["d"]), dt, p["kv_layout"], g, p["qk_scale"])
    b.leaf("value", lead + (hkv, p["lk"], p["dv"]), dt, p["kv_layout"], g)
    _mask_leaf(b, p, lead + (hq, p["lq"], p["lk"]), dt, g, grad=True)
    _slopes(b, p, (hq,) if p["alibi"] == "h" else lead + (hq,), dt, g)
    keep = torch.ones(lead + (hq, p["lq"], p["lk"]), dtype=torch.bool)
    geom = keep_mask(p["lq"], p["lk"], p["is_causal"], p["alignment"], p["window"])
    vis = _visible(keep if geom is None else keep & geom, b)
    _drop_zero_grads(b, int(vis.sum(-1).max()) if vis.numel() else 0, ("query", "key"))
    b.args = lambda v: ((v["query"], v["key"], v["value"], v.get("mask"), 0.0, p["is_causal"], _scale(p), p["gqa"]),
                        {"causal_alignment": p["alignment"], "sliding_window": p["window"],
                         "alibi_slopes": v.get("alibi_slopes")})
    b.oracle = attention_oracle
    return b


def attention_oracle(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                     *, causal_alignment="top_left", sliding_window=None, alibi_slopes=None):
    """The op's torch baseline (``torch_attention``: F.scaled_dot_product_attention with the geometry, ALiBi and
    zeroed dead rows made explicit) on [B, H, L, D] views, leading dims flattened, as pyllm's kernels see
    them. Torch runs its fused CPU flash kernel for 4-D inputs and its math path for 3-D and 5-D ones, with
    different rounding (at head dims of a few elements their half-precision gradients differ several-fold):
    4-D views make the baseline torch's kernel for the call whatever rank the fuzzer drew."""
    baseline = ops.get("scaled_dot_product_attention").torch_baseline
    lead, (hq, lq, _), lk = query.shape[:-3], query.shape[-3:], key.shape[-2]
    nb = 1
    for n in lead:
        nb *= n
    q, k, v = (t.reshape(nb, *t.shape[-3:]) for t in (query, key, value))
    m = attn_mask
    if m is not None and len(lead) != 1:
        m = m.expand(*lead, hq, lq, lk).reshape(nb, hq, lq, lk) if lead else m
    slopes = alibi_slopes
    if slopes is not None and slopes.dim() > 1:
        slopes = slopes.reshape(nb, hq)
    out = baseline(q, k, v, m, dropout_p, is_causal, scale, enable_gqa, causal_alignment=causal_alignment,
                   sliding_window=sliding_window, alibi_slopes=slopes)
    return out.reshape(*lead, hq, lq, value.shape[-1])


def varlen_oracle(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                  softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None):
    """``torch_varlen_attention``'s composition (each sequence through F.scaled_dot_product_attention with
    the bottom-right causal/window mask and ALiBi made explicit; queries that see no key get zeros), with
    each sequence as a [1, H, L, D] call of :func:`attention_oracle`, so torch runs the kernel it runs for
    a 4-D call (its fused CPU kernel) as for the dense op."""
    window = None if tuple(window_size) == (-1, -1) else tuple(window_size)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(bq) - 1):
        qs, ks, vs = (t[a:z].transpose(0, 1).unsqueeze(0) for t, a, z in
                      ((q, bq[i], bq[i + 1]), (k, bk[i], bk[i + 1]), (v, bk[i], bk[i + 1])))
        slopes = None if alibi_slopes is None else (alibi_slopes[i] if alibi_slopes.dim() == 2 else alibi_slopes)
        o = attention_oracle(qs, ks, vs, None, dropout_p, causal, softmax_scale, qs.shape[1] != ks.shape[1],
                             causal_alignment="bottom_right", sliding_window=window, alibi_slopes=slopes)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros((0, q.shape[1], v.shape[2]))


def build_varlen_attention(p) -> Built:
    dt, g, b = DTYPES[p["dtype"]], _gen(p["seed"]), Built()
    hkv = p["hkv"]
    hq = hkv * p["group"]
    tq, tk = sum(p["lens_q"]), sum(p["lens_k"])
    b.leaf("q", (tq, hq, p["d"]), dt, p["q_layout"], g, p["qk_scale"])
    b.leaf("k", (tk, hkv, p["d"]), dt, p["kv_layout"], g, p["qk_scale"])
    b.leaf("v", (tk, hkv, p["dv"]), dt, p["kv_layout"], g)
    cdt = torch.int32 if p["cu_dtype"] == "int32" else torch.int64
    for name, lens in (("cu_seqlens_q", p["lens_q"]), ("cu_seqlens_k", p["lens_k"])):
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        b.leaf(name, (len(cu),), cdt, "contiguous", g, grad=False, values=lambda s, cu=cu: torch.tensor(cu))
    _slopes(b, p, (hq,) if p["alibi"] == "h" else (len(p["lens_q"]), hq), dt, g)
    counts = [keep_mask(lq, lk, p["causal"], "bottom_right", None if tuple(p["window"]) == (-1, -1) else p["window"])
              for lq, lk in zip(p["lens_q"], p["lens_k"])]
    counts = [torch.full((lq,), lk) if c is None else c.sum(-1) for c, lq, lk in zip(counts, p["lens_q"], p["lens_k"])]
    _drop_zero_grads(b, max((int(c.max()) for c in counts if c.numel()), default=0), ("q", "k"))
    mq = max(p["lens_q"], default=0) + p["max_extra"]
    mk = max(p["lens_k"], default=0) + p["max_extra"]
    b.args = lambda v: ((v["q"], v["k"], v["v"], v["cu_seqlens_q"], v["cu_seqlens_k"], mq, mk, 0.0,
                         _scale(p), p["causal"], tuple(p["window"]), v.get("alibi_slopes")), {})
    b.oracle = varlen_oracle
    return b


def build_bias_gelu(p) -> Built:
    dt, g, b = DTYPES[p["dtype"]], _gen(p["seed"]), Built()
    b.leaf("input", tuple(p["lead"]) + (p["n"],), dt, p["layout"], g, p["scale"], p["shift"])
    if p["bias"]:
        b.leaf("bias", (p["n"],), dt, p["param_layout"], g)
    b.args = lambda v: ((v["input"], v.get("bias"), p["approximate"]), {})
    b.oracle = gelu_oracle
    return b


def gelu_oracle(input, bias=None, approximate="none"):
    """The torch baseline ``F.gelu(input + bias)``, evaluated as torch's GELU kernel evaluates any tensor
    of more than a few elements. Torch's CPU GELU runs its vectorized erf/tanh on whole vectors and the
    scalar libm function on the tail; a tensor of fewer than 2 vectors (16 to 64 elements) is all tail,
    so its error is that of the scalar function, a few times smaller than torch's own kernel at any
    realistic size. The values go through GELU zero-padded to a multiple of 64 elements; each element's
    result is what torch's kernel computes for it (GELU is elementwise)."""
    z = input if bias is None else input + bias
    flat = z.reshape(-1)
    padded = torch.cat([flat, flat.new_zeros((-flat.numel()) % 64 or 64)])
    return torch.nn.functional.gelu(padded, approximate=approximate)[:flat.numel()].view(z.shape)


BUILDERS: dict[str, Callable[[dict], Built]] = {
    "layer_norm": build_layer_norm,
    "add_layer_norm": build_add_layer_norm,
    "rms_norm": build_rms_norm,
    "add_rms_norm": build_add_rms_norm,
    "masked_softmax": build_masked_softmax,
    "scaled_dot_product_attention": build_attention,
    "varlen_attention": build_varlen_attention,
    "bias_gelu": build_bias_gelu,
}


# --------------------------------------------------------------------------- one example
class OracleError(Exception):
    """torch itself rejects the drawn input: the case is outside the ops' common domain."""


def _outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _evaluate(fn, b: Built, leaves: dict, mode: str, gos=None, contiguous: bool = False):
    """Runs fn on the arguments built from ``leaves`` (with ``contiguous``, on contiguous copies of the
    views); in mode "grad" also the gradients of every leaf in ``b.grad`` for upstream gradients ``gos``
    (one per compared output; None: make them). Returns (outputs, grads, gos)."""
    leaves = {k: t.detach().clone() for k, t in leaves.items()}
    grad = mode == "grad"
    if grad:
        for k in b.grad:
            leaves[k].requires_grad_(True)
    viewed = {k: b.views[k](t) for k, t in leaves.items()}
    if contiguous:  # fresh row-major strides (contiguous() keeps the odd strides of size-1 dims)
        viewed = {k: t.clone(memory_format=torch.contiguous_format) for k, t in viewed.items()}
    args, kwargs = b.args(viewed)
    ctx = {"no_grad": torch.no_grad, "inference": torch.inference_mode, "grad": contextlib.nullcontext}[mode]
    with ctx():
        outs = _outputs(fn(*args, **kwargs))
    outs = outs[:b.n_out] if b.n_out else outs
    if not grad:
        return [o.detach() for o in outs], [], gos
    if gos is None:
        g = _gen(12345)
        gos = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    live = [leaves[k] for k in b.grad]
    pairs = [(o, go) for o, go in zip(outs, gos) if o.requires_grad]
    if pairs and live:
        gs = torch.autograd.grad([o for o, _ in pairs], live, [go.to(o.dtype) for o, go in pairs], allow_unused=True)
    else:
        gs = [None] * len(live)
    # a missing gradient is a zero gradient
    gs = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(live, gs)]
    return [o.detach() for o in outs], gs, gos


def _to64(leaves: dict) -> dict:
    return {k: (t.double() if t.dtype.is_floating_point else t) for k, t in leaves.items()}


@dataclass
class Stats:
    examples: int = 0
    draws: int = 0      # evaluations (tiny examples pool several draws)
    rejected: int = 0
    reference: int = 0  # examples the backend ran on the reference (outside the kernels' limits)
    by_mode: dict = field(default_factory=dict)


# The rule compares maxima of errors; over a handful of elements, or of rows (in a softmax or a norm the
# error of a row comes from that row's one cancellation), the ratio of two rounding errors is noise
# (torch is sometimes exact by luck; over 4 rows of a saturated softmax gradient it exceeded 3 for 3% of
# cases, over 16 for none). An example whose compared tensors have fewer than POOL_ELEMENTS elements, or
# fewer than POOL_ROWS rows (elements / last dim) and fewer than POOL_WIDE elements (a few wide rows have
# thousands of independent roundings), is therefore evaluated on more draws of the same configuration
# (value seeds seed + 1, seed + 2, ...; at most MAX_DRAWS) and the rule is applied to each output and
# gradient pooled over the draws, as it is applied to one large tensor.
POOL_ELEMENTS = 256
POOL_ROWS = 16
POOL_WIDE = 4096
MAX_DRAWS = 64


def _draws_needed(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 1
    rows = t.numel() // t.shape[-1] if t.dim() else 1
    return max(-(-POOL_ELEMENTS // t.numel()), -(-POOL_ROWS // rows) if t.numel() < POOL_WIDE else 1)


def _draw(case: Case, backend: str, seed: int) -> dict:
    """One evaluation of ``case`` with value seed ``seed``: {"out": [(ours, ref, base)], "grad": {leaf:
    (ours, ref, base)}, "decision": ...}, after checking each output's shape and dtype."""
    spec = ops.get(case.op)
    p = dict(case.params, seed=seed)
    b = BUILDERS[case.op](p)
    oracle = b.oracle or spec.torch_baseline
    mode = p["mode"]
    # The baseline draws the upstream gradients (in its output dtypes); the oracle uses the same values.
    # Torch picks its kernels by layout (vectorized or scalar loops; the fused flash attention for
    # contiguous q/k/v, the math path for strided ones), with different rounding: the baseline runs on
    # contiguous copies of the arguments, so its error is torch's for these values in the layout torch
    # usually sees, whatever layout pyllm is fuzzed with.
    try:
        base, base_g, gos = _evaluate(oracle, b, b.leaves, mode, contiguous=True)
        ref, ref_g, _ = _evaluate(oracle, b, _to64(b.leaves), mode, gos)
    except Exception as e:  # noqa: BLE001 - torch rejects the input: not a pyllm bug
        raise OracleError(f"torch oracle rejects {case!r}: {type(e).__name__}: {e}") from e
    with pyllm.use_backend(backend):
        ours, ours_g, _ = _evaluate(b.ours or spec.functional, b, b.leaves, mode, gos)
        decision = pyllm.last_decision(case.op)
    where = f"{case.op} on {backend}"
    assert len(ours) == len(ref), f"{where}: {len(ours)} outputs, torch gives {len(ref)}"
    for i, (o, r, t) in enumerate(zip(ours, ref, base)):
        assert isinstance(o, torch.Tensor), f"{where}: output {i} is a {type(o).__name__}"
        assert o.shape == r.shape, f"{where}: output {i} has shape {tuple(o.shape)}, torch's {tuple(r.shape)}"
        assert o.dtype == t.dtype, f"{where}: output {i} has dtype {o.dtype}, torch's {t.dtype}"
    for name, o, r in zip(b.grad, ours_g, ref_g):
        assert o.shape == r.shape, f"{where}: grad of {name} has shape {tuple(o.shape)}, torch's {tuple(r.shape)}"
    return {"out": list(zip(ours, ref, base)), "grad": dict(zip(b.grad, zip(ours_g, ref_g, base_g))),
            "decision": decision}


def _pooled(triples):
    """(ours, ref, base) of several draws -> one triple of flat concatenations."""
    return tuple(torch.cat([t[i].detach().reshape(-1) for t in triples]) for i in range(3))


def check(case: Case, backend: str, stats: Optional[Stats] = None) -> None:
    """Runs ``case`` on ``backend`` and asserts the shared accuracy rule for every output (and gradient in
    mode "grad") against the op's torch composition in fp64, baseline: the same composition in the
    test dtype (pooled over extra draws for tiny cases, see POOL_ELEMENTS). Raises AssertionError (or the
    op's own exception) on failure, :class:`OracleError` if torch itself rejects the input."""
    seed = case.params["seed"]
    draws = [_draw(case, backend, seed)]
    compared = [t[1] for t in draws[0]["out"]] + [t[1] for t in draws[0]["grad"].values()]
    need = min(MAX_DRAWS, max((_draws_needed(t) for t in compared), default=1))
    draws += [_draw(case, backend, seed + i) for i in range(1, need)]
    where = f"{case.op} on {backend}"
    for i in range(len(draws[0]["out"])):
        o, r, t = _pooled([d["out"][i] for d in draws])
        assert_close_to_ref(o, r, t, mult=2.0, name=f"{where}: output {i}" + (f" ({len(draws)} draws)" if len(draws) > 1 else ""))
    for name in dict.fromkeys(n for d in draws for n in d["grad"]):
        o, r, t = _pooled([d["grad"][name] for d in draws if name in d["grad"]])
        assert_close_to_ref(o, r, t, mult=3.0, name=f"{where}: grad of {name}" + (f" ({len(draws)} draws)" if len(draws) > 1 else ""))
    if stats is not None:
        mode = case.params["mode"]
        stats.examples += 1
        stats.draws += len(draws)
        stats.by_mode[mode] = stats.by_mode.get(mode, 0) + 1
        decision = draws[0]["decision"]
        if decision is not None and not decision.uses_kernel:
            stats.reference += 1


# --------------------------------------------------------------------------- campaigns
def round_seed(seed: int, op: str, backend: str, rnd: int) -> int:
    """The hypothesis seed of round ``rnd`` of (op, backend) in a campaign with ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{op}:{backend}:{rnd}".encode()).digest()[:8], "little")


@dataclass
class Failure:
    op: str
    backend: str
    seed: int            # the round's hypothesis seed
    case: Optional[Case]  # the last (shrunk) failing case
    report: str           # hypothesis's report: falsifying example(s) and the error

    def reproduction(self) -> str:
        return (f"python -c \"from pyllm.tools.fuzz import Case, check; check({self.case!r}, {self.backend!r})\""
                if self.case is not None else "(no case recorded)")


@dataclass
class PairResult:
    op: str
    backend: str
    stats: Stats
    seconds: float
    rounds: int
    failures: list = field(default_factory=list)  # distinct failures (of one round unless keep_going)

    @property
    def failure(self) -> Optional[Failure]:
        return self.failures[0] if self.failures else None


# Hypothesis shrinks a failure for up to 300 s (its engine's MAX_SHRINKING_SECONDS); an emulated attention
# example costs up to seconds, so a campaign's time budget would go to one shrink. 60 s gives small cases.
SHRINK_SECONDS = 60


@contextlib.contextmanager
def _shrink_limit(seconds: float):
    from hypothesis.internal.conjecture import engine  # internal: no public setting bounds shrinking time

    old = getattr(engine, "MAX_SHRINKING_SECONDS", None)
    if old is not None:
        engine.MAX_SHRINKING_SECONDS = min(old, seconds)
    try:
        yield
    finally:
        if old is not None:
            engine.MAX_SHRINKING_SECONDS = old


def run_round(op: str, backend: str, seed: int, max_examples: int, stats: Stats, shrink: bool = True) -> list:
    """One hypothesis run of ``max_examples`` examples of ``op`` on ``backend`` with ``seed``; returns its
    failures (hypothesis reports distinct bugs separately, each shrunk unless ``shrink`` is False: CI
    reports the first failing example as found, in bounded time)."""
    failing: list = []  # (case, exception) of every failing call; the shrunk ones are re-raised last
    phases = None if shrink else (hypothesis.Phase.explicit, hypothesis.Phase.generate)

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=False, print_blob=False,
              suppress_health_check=list(HealthCheck), **({} if phases is None else {"phases": phases}))
    @hypothesis.seed(seed)
    @given(case=STRATEGIES[op]())
    def fuzz(case):
        try:
            check(case, backend, stats)
        except OracleError:
            stats.rejected += 1
            hypothesis.reject()
        except Exception as e:
            failing.append((case, e))
            raise

    try:
        with _shrink_limit(SHRINK_SECONDS):
            fuzz()
    except Exception as e:  # noqa: BLE001 - any failure is reported with its falsifying example
        out = []
        for x in (list(e.exceptions) if isinstance(e, BaseExceptionGroup) else [e]):
            case = next((c for c, err in reversed(failing) if err is x), None)
            out.append(Failure(op, backend, seed, case, _report(x)))
        return out
    return []


def _report(x: BaseException) -> str:
    lines = [n for n in getattr(x, "__notes__", []) if n.strip()]
    tb = traceback.extract_tb(x.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    lines.append(f"{type(x).__name__}: {x}{where}")
    return "\n".join(lines)


def signature(f: Failure) -> str:
    """What tells failures apart across rounds: the error's first line without its numbers."""
    last = f.report.strip().splitlines()[-1] if f.report.strip() else ""
    return f"{f.op}/{f.backend}: " + re.sub(r"[-+]?\d[\d.e+-]*", "#", last.split(" (at ")[0])[:160]


def fuzz_pair(op: str, backend: str, seed: int, seconds: Optional[float] = None,
              max_examples: Optional[int] = None, keep_going: bool = False, shrink: bool = True) -> PairResult:
    """Runs rounds of examples of ``op`` on ``backend`` until ``seconds`` pass or ``max_examples`` have
    run (whichever first; at least one round). Stops at the first failure, or with ``keep_going`` runs
    on and keeps the failures whose :func:`signature` is new."""
    stats = Stats()
    t0 = time.perf_counter()
    rnd = 0
    failures: list = []
    while True:
        left = None if max_examples is None else max_examples - stats.examples
        elapsed = time.perf_counter() - t0
        if rnd and ((left is not None and left <= 0) or (seconds is not None and elapsed >= seconds)):
            break
        if seconds is None:
            chunk = left
        else:  # a round of about half the time left at the rate seen so far (examples grow as the run goes on)
            rate = stats.examples / elapsed if rnd and elapsed > 0 else 0.0
            chunk = 5 if not rate else int(min(100, max(2, 0.5 * rate * (seconds - elapsed))))
            chunk = chunk if left is None else min(chunk, left)
        before = stats.examples
        found = run_round(op, backend, round_seed(seed, op, backend, rnd), max(1, chunk), stats, shrink)
        rnd += 1
        for f in found:
            if signature(f) not in {signature(g) for g in failures}:
                failures.append(f)
        if (found and not keep_going) or (seconds is None and stats.examples == before):
            break
    return PairResult(op, backend, stats, time.perf_counter() - t0, rnd, failures)


def resolve_ops(names) -> list[str]:
    known = [s.name for s in ops.specs()]
    if not names:
        return known
    out = []
    for n in names:
        n = ALIASES.get(n, n)
        if n not in known:
            raise SystemExit(f"pyllm fuzz: no op {n!r}; registered: {', '.join(known)}")
        out.append(n)
    return out


def resolve_backends(name: str) -> list[str]:
    if name == "all":
        return list(BACKENDS)
    if name not in BACKENDS:
        raise SystemExit(f"pyllm fuzz: --backend must be one of {', '.join(BACKENDS)} or all, got {name!r}")
    return [name]


def campaign(seed: int, op_names: list, backends: list, seconds: Optional[float] = None,
             max_examples: Optional[int] = None, keep_going: bool = False, log=print) -> list[PairResult]:
    """Every (op, backend) pair: the time budget is split over the pairs still to run (time a pair
    leaves unused goes to the next), ``max_examples`` caps each pair."""
    pairs = [(op, be) for op in op_names for be in backends]
    results = []
    t0 = time.perf_counter()
    for i, (op, be) in enumerate(pairs):
        share = None
        if seconds is not None:
            share = max(0.0, seconds - (time.perf_counter() - t0)) / (len(pairs) - i)
        r = fuzz_pair(op, be, seed, share, max_examples, keep_going)
        results.append(r)
        s = r.stats
        extra = [f"{s.by_mode.get(m, 0)} {m}" for m in ("no_grad", "inference", "grad")] + [f"{s.draws} draws"]
        if s.rejected:
            extra.append(f"{s.rejected} rejected by torch")
        if s.reference:
            extra.append(f"{s.reference} ran the reference")
        log(f"  {op:30s} {be:14s} {s.examples:6d} examples ({', '.join(extra)})  {r.seconds:6.1f} s  "
            f"{'FAIL' + (' x%d' % len(r.failures) if len(r.failures) > 1 else '') if r.failures else 'ok'}")
    return results


def format_failure(f: Failure) -> str:
    body = "\n".join("    " + line for line in f.report.splitlines())
    return (f"FAIL {f.op} on {f.backend} (hypothesis seed {f.seed}):\n{body}\n"
            f"  reproduce: {f.reproduction()}")


def main(args) -> int:
    op_names = resolve_ops([s for s in (args.ops or "").split(",") if s])
    backends = resolve_backends(args.backend)
    if "cuda-emulated" in backends and not pyllm._ext.HAS_EMU:
        raise SystemExit(f"pyllm fuzz: backend cuda-emulated unavailable ({pyllm._ext.C_EMU_ERROR}); "
                         "use --backend native")
    seconds, max_examples = args.seconds, args.max_examples
    if seconds is None and max_examples is None:
        seconds = 60.0
    print(f"pyllm fuzz: seed {args.seed}, "
          f"{'%g s' % seconds if seconds is not None else 'no time limit'}, "
          f"{'%d examples' % max_examples if max_examples is not None else 'no example limit'} per op and backend; "
          f"{len(op_names)} ops x {', '.join(backends)} (hypothesis {hypothesis.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    results = campaign(args.seed, op_names, backends, seconds, max_examples, getattr(args, "keep_going", False))
    failures = [f for r in results for f in r.failures]
    for f in failures:
        print(format_failure(f))
    total = sum(r.stats.examples for r in results)
    print(f"pyllm fuzz: {total} examples in {sum(r.seconds for r in results):.1f} s, "
          f"{sum(1 for r in results if r.failures)} failing (op, backend) pairs, {len(failures)} distinct failures")
    return 1 if failures else 0
