"""pyllm ops on DTensors: the sharding rules of every native op (docs/DISTRIBUTED.md).

``import pyllm.distributed`` registers, for every op of the registry (:func:`pyllm.ops.specs`) in
every loaded namespace (``torch.ops.pyllm``, ``torch.ops.pyllm_emu``), a DTensor sharding rule, so
that a pyllm op given DTensors runs shard-locally on each rank's local tensors:

* attention (``attention``, ``attention_backward``): q/k/v ``[B, H, L, D]`` sharded on the batch
  and/or heads dims -> outputs sharded the same (``varlen_attention``: heads only);
* the norms and ``masked_softmax``: replicated, or sharded on any dim but the normalized (last) one
  (``masked_softmax`` with ``causal=True``: not on the query dim either) -> shard-local; the weight
  and bias gradients of the backward ops are ``Partial`` (sums over the local rows);
* ``bias_gelu``: elementwise, any dim (the bias sharded with the input's last dim).

A rule never communicates. Anything else (an input sharded on the normalized dim, on the sequence
dims of attention, a ``Partial`` input, operands sharded differently) raises a ``RuntimeError`` that
names the op, the argument and the placement, and says what to do; it is never a silent all-gather.
The one redistribution a rule asks for is ``Replicate() -> Shard(d)`` of an operand next to sharded
ones (a replicated residual, mask or key), which DTensor does by slicing its local copy, without
communication; never of an input the op writes in place.

When: on ``import pyllm.distributed``, or at the first public pyllm call given a DTensor
(:func:`pyllm.backends.select` imports this module then, and makes the wrappers' reference path
raise :func:`check_reference`'s error for DTensors). Not on ``import pyllm``: the rules need
``torch.distributed.tensor``, whose import costs ~0.8 s (``import pyllm`` as a whole takes ~0.1 s
after torch). A native op called directly with DTensors before that raises DTensor's own
``NotImplementedError: Operator pyllm.<op>.default does not have a sharding strategy registered``.

The rules are registered with DTensor's op-strategy registry (what
``torch.distributed.tensor.experimental.register_sharding`` calls too), not through
``register_sharding`` itself: its cache key only hashes the arguments from the first ``int`` one
on, so a ``bool`` such as ``masked_softmax``'s ``causal``, which changes what may be sharded, would
reuse a decision taken for the other value. Here every non-tensor argument is part of the key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

if not dist.is_available():  # pragma: no cover - torch builds without distributed support
    raise ImportError("pyllm.distributed needs a torch build with torch.distributed")

from torch.distributed.tensor import DTensor, Partial, Replicate, Shard  # noqa: E402
from torch.distributed.tensor._dtensor_spec import DTensorSpec  # noqa: E402
from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, RuntimeSchemaInfo  # noqa: E402
from torch.distributed.tensor._op_schema import OpSpec as _DOpSpec  # noqa: E402

from . import ops as _ops  # noqa: E402

__all__ = ["register", "registered_ops", "describe", "check_reference", "Layout", "LAYOUTS"]


# --------------------------------------------------------------------------- layouts
# Argument roles, by name in the native schemas:
#   "same"      the op's main tensors (input, residual, q/k/v, gradients, the saved rstd/mean/lse,
#               whose dims are the input's leading dims): one common placement per mesh dim, that of
#               whichever of them is sharded there (a Replicate() one is sliced locally).
#   "param"     a weight/bias over the normalized dim: must be Replicate().
#   "bcast:N"   broadcast (right-aligned) against the first N dims of the main tensors (N=0: all of
#               them): sharded where they are, Replicate() where it has size 1 or no such dim.
#   "replicate" must be Replicate() (varlen's cu_seqlens: they index the global tokens).
# Output roles, by position:
#   "same", "pgrad:<arg>" (the gradient of a parameter, a sum over the rows: Partial() where the rows
#   are sharded, Replicate() otherwise or when <arg> is None: the output is then empty), "dmask"
#   (attention's mask gradient: "same" when computed, an empty Replicate() tensor otherwise).

@dataclass(frozen=True)
class Layout:
    """How an op family may be sharded: the dims of the primary tensor that may not be sharded (and
    why), and the roles of the arguments and outputs of its native ops."""
    what: str                        # the primary tensor's layout, in words
    roles: dict                      # argument name -> role
    outputs: dict                    # native op name -> output roles (by position)
    shardable: str                   # in words, for describe()
    forbidden: dict = field(default_factory=dict)  # dim (negative: from the end) -> why not, or
    #                                                 f(args) -> why not / None (allowed for these args)
    heads_dim: Optional[int] = None  # GQA: Hq and Hkv must split evenly when this dim is sharded

    def why_not(self, d: int, rank: int, args: dict) -> Optional[str]:
        """None if dim ``d`` of a primary tensor of rank ``rank`` may be sharded, else why not."""
        for key in (d, d - rank):
            why = self.forbidden.get(key)
            why = why(args) if callable(why) else why
            if why:
                return why
        return None


_NORM_ROLES = {"input": "same", "residual": "same", "grad_out": "same", "grad_extra": "same",
               "mean": "same", "rstd": "same", "weight": "param", "bias": "param"}
_NORMALIZED = {-1: "the normalized (last) dim: every output element needs the statistics of its whole row"}


def _softmax_query_dim(args):
    if args.get("causal"):
        return "the query dim (dim -2) with causal=True: the causal mask needs each query's global position"
    return None


_ATTN_ROLES = {"grad_out": "same", "query": "same", "key": "same", "value": "same", "out": "same",
               "lse": "same", "mask": "bcast:0", "alibi_slopes": "bcast:2"}
_SEQ = ("the {} length dim: every query needs every key (sequence/context parallelism is ring "
        "attention, which pyllm does not implement)")

_LEADING = "any dim but the last (batch, sequence, ...)"

LAYOUTS = {
    "layer_norm": Layout(
        "[..., N], normalized over N", _NORM_ROLES,
        {"layer_norm": ("same", "same", "same"),
         "layer_norm_backward": ("same", "pgrad:weight", "pgrad:weight")}, _LEADING, _NORMALIZED),
    "add_layer_norm": Layout(
        "[..., N], normalized over N", _NORM_ROLES,
        {"add_layer_norm": ("same", "same", "same", "same"), "add_layer_norm_inplace": ()}, _LEADING, _NORMALIZED),
    "rms_norm": Layout(
        "[..., N], normalized over N", _NORM_ROLES,
        {"rms_norm": ("same", "same"), "rms_norm_backward": ("same", "pgrad:weight")}, _LEADING, _NORMALIZED),
    "add_rms_norm": Layout(
        "[..., N], normalized over N", _NORM_ROLES, {"add_rms_norm": ("same", "same", "same")}, _LEADING,
        _NORMALIZED),
    "masked_softmax": Layout(
        "[..., Lq, Lk], softmax over Lk", {"input": "same", "grad_out": "same", "out": "same", "mask": "bcast:0"},
        {"masked_softmax": ("same",), "masked_softmax_backward": ("same",)},
        _LEADING + "; not the query dim with causal=True",
        {-1: "the softmax (last) dim: every output element needs its whole row", -2: _softmax_query_dim}),
    "scaled_dot_product_attention": Layout(
        "[B, H, L, D]", _ATTN_ROLES,
        {"attention": ("same", "same"), "attention_backward": ("same", "same", "same", "dmask")},
        "batch (dim 0) and heads (dim 1); GQA: both head counts divisible by the split",
        {2: _SEQ.format("query/key"), 3: "the head dim: the q.k dot products run over it"}, heads_dim=1),
    "varlen_attention": Layout(
        "[T, H, D] (packed tokens)",
        {"grad_out": "same", "q": "same", "k": "same", "v": "same", "out": "same", "lse": "same",
         "cu_seqlens_q": "replicate", "cu_seqlens_k": "replicate", "alibi_slopes": "bcast:2"},
        {"varlen_attention": ("same", "same"), "varlen_attention_backward": ("same", "same", "same")},
        "heads (dim 1); GQA: both head counts divisible by the split",
        {0: "the packed token dim: cu_seqlens index the global tokens, and every query needs its "
            "sequence's keys", 2: "the head dim: the q.k dot products run over it"}, heads_dim=1),
    "bias_gelu": Layout(
        "[..., N], elementwise", {"input": "same", "grad_out": "same", "bias": "bcast:0"},
        {"bias_gelu": ("same",), "bias_gelu_backward": ("same",)}, "any dim (the bias is sliced with the last)"),
}


# --------------------------------------------------------------------------- the rule
def _err(op, msg) -> RuntimeError:
    return RuntimeError(f"pyllm: {op} on DTensors: {msg}. pyllm's sharding rules never communicate "
                        f"(docs/DISTRIBUTED.md)")


def _spec(v):
    if isinstance(v, OpStrategy):
        return v.strategies[0].output_spec
    return v


def _shape(spec) -> tuple:
    return tuple(spec.tensor_meta.shape) if spec.tensor_meta is not None else ()


_GRADS = ("grad_out", "grad_extra")  # backward ops are linear in these: a Partial() one gives Partial() outputs


def _rule(layout: Layout, op_name: str, public: str):
    where = f"{public} ({op_name})"

    def strategy(op_schema: OpSchema) -> OpStrategy:
        schema = op_schema.op._schema
        args = {}
        for i, a in enumerate(schema.arguments):
            if i < len(op_schema.args_schema):
                args[a.name] = _spec(op_schema.args_schema[i])
            elif a.name in op_schema.kwargs_schema:
                args[a.name] = _spec(op_schema.kwargs_schema[a.name])
            else:
                args[a.name] = a.default_value if a.has_default_value() else None
        tensors = [(a.name, args[a.name]) for a in schema.arguments if isinstance(args[a.name], DTensorSpec)]
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        primary = tensors[0][1]
        mesh, rank = primary.mesh, len(_shape(primary))
        decision = tuple(_decide(where, layout, tensors, args, m, rank) for m in range(mesh.ndim))
        _check_heads(where, layout, tensors, decision, mesh, rank)

        input_specs = []
        for nm, s in tensors:
            want = _want(where, layout.roles.get(nm), nm, s, decision, rank)
            for m, (have, w) in enumerate(zip(s.placements, want)):
                # the same, or Replicate -> Shard: a local slice, no communication (never for a written input)
                if have == w or (isinstance(have, Replicate) and isinstance(w, Shard) and nm not in written):
                    continue
                inplace = "; it is written in place, so it cannot be sliced either" if nm in written else ""
                raise _err(where, f"{nm} is {have!r} on mesh dim {m} but must be {w!r} there "
                                  f"({_role_words(layout.roles.get(nm), decision[m])}){inplace}")
            input_specs.append(DTensorSpec(mesh, want))

        outs = []
        for r in layout.outputs[op_name]:
            if r == "same":
                outs.append(DTensorSpec(mesh, decision))
            elif r.startswith("pgrad:"):  # a sum over the rows: Partial() where rows are split
                present = isinstance(args.get(r[6:]), DTensorSpec)
                outs.append(DTensorSpec(mesh, tuple(p if isinstance(p, Partial) else
                                                    Partial() if present and isinstance(p, Shard) else Replicate()
                                                    for p in decision)))
            elif r == "dmask":
                mask = args.get("mask")
                computed = (bool(args.get("mask_grad")) and isinstance(mask, DTensorSpec)
                            and mask.tensor_meta is not None and mask.tensor_meta.dtype != torch.bool)
                outs.append(DTensorSpec(mesh, decision if computed else (Replicate(),) * mesh.ndim))
            else:  # pragma: no cover - a typo in LAYOUTS
                raise AssertionError(f"pyllm: unknown output role {r!r} of {op_name}")
        n_ret = len(schema.returns)
        output_specs = None if n_ret == 0 else outs[0] if n_ret == 1 else tuple(outs)
        return OpStrategy([_DOpSpec(output_specs=output_specs, input_specs=input_specs)])

    return strategy


def _decide(where, layout, tensors, args, m, rank):
    """The placement of the op's rows on mesh dim ``m``: Shard(d) if a "same" argument is sharded
    there (on a dim the op allows; they must agree), Partial() if a gradient argument of a backward op
    is Partial() (the backward ops are linear in it) and every other argument is replicated there,
    else Replicate()."""
    shards, partial = {}, []
    for nm, s in tensors:
        p, role = s.placements[m], layout.roles.get(nm)
        if isinstance(p, Partial):
            if nm not in _GRADS:
                raise _err(where, f"{nm} is Partial() on mesh dim {m} (a pending sum) and the op is not linear in "
                                  f"it; redistribute it to Replicate() (or Shard() a batch dim) first")
            partial.append(nm)
        elif isinstance(p, Shard):
            if type(p) is not Shard:
                raise _err(where, f"{nm} has the placement {p!r} on mesh dim {m}; only Shard(d), Replicate() and, "
                                  "for gradients, Partial() are supported")
            d = p.dim if p.dim >= 0 else p.dim + len(_shape(s))
            if role == "same":
                why = layout.why_not(d, rank, args)
                if why is not None:
                    ok = [str(i) for i in range(rank) if layout.why_not(i, rank, args) is None]
                    instead = f", or shard dim {' or '.join(ok)} instead" if ok else ""
                    raise _err(where, f"{nm} ({layout.what}, shape {list(_shape(s))}) is sharded on dim {d} "
                                      f"(Shard({p.dim}) on mesh dim {m}): {why}; replicate that dim (redistribute "
                                      f"it to Replicate()){instead}")
                shards.setdefault(d, []).append(nm)
        elif not isinstance(p, Replicate):
            raise _err(where, f"{nm} has the placement {p!r} on mesh dim {m}; only Shard(d), Replicate() and, "
                              "for gradients, Partial() are supported")
    if len(shards) > 1:
        desc = ", ".join(f"{'/'.join(v)} Shard({d})" for d, v in shards.items())
        raise _err(where, f"its tensors are sharded on different dims on mesh dim {m} ({desc}); give them the "
                          f"same placement")
    if partial:
        others = [nm for nm, s in tensors if nm not in partial and not isinstance(s.placements[m], Replicate)]
        if others:
            raise _err(where, f"{'/'.join(partial)} is Partial() on mesh dim {m} while {'/'.join(others)} is "
                              f"sharded there; redistribute {partial[0]} to the same Shard() placement first")
        return Partial()
    if shards:
        return Shard(next(iter(shards)))
    return Replicate()


def _check_heads(where, layout, tensors, decision, mesh, rank):
    hd = layout.heads_dim
    if hd is None or not any(isinstance(p, Shard) and p.dim == hd for p in decision):
        return
    n = math.prod(mesh.size(m) for m, p in enumerate(decision) if isinstance(p, Shard) and p.dim == hd)
    heads = {nm: _shape(s)[hd] for nm, s in tensors if layout.roles.get(nm) == "same" and len(_shape(s)) == rank}
    if len(set(heads.values())) > 1 and any(h % n for h in heads.values()):
        raise _err(where, f"the heads dim is split {n} ways, but the head counts {heads} are not all divisible by "
                          f"{n}: grouped-query attention keeps its query-head -> kv-head mapping only with even "
                          f"splits; shard the batch dim, or use a mesh size that divides every head count")


def _role_words(role, decided) -> str:
    if role == "param":
        return "a weight or bias of the normalized dim is never sharded"
    if role == "replicate":
        return "it indexes the global tensor"
    if role and role.startswith("bcast"):
        return f"it broadcasts against the op's tensors, which are {decided!r} there"
    return f"the op's tensors are {decided!r} there; a Replicate() one is sliced locally"


def _want(where, role, nm, s, decision, rank) -> tuple:
    """The placement argument ``nm`` must have, given the op's ``decision`` (one per mesh dim)."""
    if role is None:  # pragma: no cover - an argument LAYOUTS does not know
        raise _err(where, f"pyllm has no sharding role for argument {nm!r}; pass local tensors")
    if role in ("param", "replicate"):
        return (Replicate(),) * len(decision)
    if role == "same":
        return tuple(Partial() if isinstance(p, Partial) and nm in _GRADS else
                     Replicate() if isinstance(p, Partial) else p for p in decision)
    if role.startswith("bcast:"):  # right-aligned against the first `target` dims of the op's tensors
        shape, target = _shape(s), int(role[6:]) or rank
        out = []
        for p in decision:
            d = p.dim - (target - len(shape)) if isinstance(p, Shard) else -1
            out.append(Shard(d) if isinstance(p, Shard) and p.dim < target and d >= 0 and shape[d] != 1
                       else Replicate())
        return tuple(out)
    raise AssertionError(f"pyllm: unknown role {role!r}")  # pragma: no cover


def _no_rule(op_name: str, public: str):
    def strategy(op_schema: OpSchema):
        raise _err(f"{public} ({op_name})", "this op has no DTensor sharding rule yet; call it on local tensors "
                                            "(DTensor.to_local(), or torch.distributed.tensor.experimental.local_map)")
    return strategy


# --------------------------------------------------------------------------- registration
_REGISTERED: dict = {}  # OpOverload -> "rule" | "no rule"


def register() -> list:
    """Registers the rule of every native op of every loaded namespace (idempotent): every op of the
    registry, so an op added later gets at least the clear "no rule yet" error. Returns the op
    overloads registered. Called when this module is imported."""
    prop = DTensor._op_dispatcher.sharding_propagator
    for ns in _ops.namespaces():
        lib = getattr(torch.ops, ns)
        for spec in _ops.specs():
            layout = LAYOUTS.get(spec.name)
            for op_name in spec.schemas:
                overload = getattr(lib, op_name).default
                if overload in _REGISTERED:
                    continue
                schema = overload._schema
                # Every non-tensor argument is part of the sharding cache key (see the module docstring).
                static = next((i for i, a in enumerate(schema.arguments)
                               if not isinstance(a.type, torch.TensorType)
                               and not (isinstance(a.type, torch.OptionalType)
                                        and isinstance(a.type.getElementType(), torch.TensorType))),
                              len(schema.arguments))
                info = RuntimeSchemaInfo(static_argnum=static)
                if layout is not None and op_name in layout.outputs \
                        and len(layout.outputs[op_name]) == len(schema.returns):
                    prop.register_op_strategy(overload, _rule(layout, op_name, spec.name), info)
                    _REGISTERED[overload] = "rule"
                else:
                    prop.register_op_strategy(overload, _no_rule(op_name, spec.name), info)
                    _REGISTERED[overload] = "no rule"
    return list(_REGISTERED)


def registered_ops() -> dict:
    """{op overload: "rule" or "no rule" (a clear error)} for every op this module registered."""
    return dict(_REGISTERED)


def describe() -> str:
    """The rules as the Markdown table of docs/DISTRIBUTED.md (a test checks the doc holds it)."""
    rows = ["| op | layout | may be sharded on | never on |", "|---|---|---|---|"]
    for spec in _ops.specs():
        lay = LAYOUTS.get(spec.name)
        if lay is None:
            rows.append(f"| `{spec.name}` | - | nothing: no rule yet (a clear error) | - |")
            continue
        never = "; ".join(f"dim {d}: {why if isinstance(why, str) else why({'causal': True})}"
                          for d, why in sorted(lay.forbidden.items(), key=lambda kv: (kv[0] < 0, abs(kv[0]))))
        rows.append(f"| `{spec.name}` | {lay.what} | {lay.shardable} | {never or '-'} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- the reference path
def check_reference(op: str, tensors, reason: str = "") -> None:
    """Raises if ``tensors`` hold a DTensor: the pure-PyTorch reference of ``op`` is not shard-aware
    (DTensor would run its aten ops with their own rules, all-gathering a tensor sharded on the
    normalized dim). For the public wrappers' reference path: see docs/DISTRIBUTED.md."""
    found = [t for t in tensors if isinstance(t, DTensor)]
    if found:
        because = f" ({reason})" if reason else ""
        raise RuntimeError(
            f"pyllm: {op} would run its pure-PyTorch reference on DTensors{because}; the reference is not "
            f"shard-aware and DTensor could all-gather. Use a kernel dtype (float32, float16, bfloat16) on the "
            f"'auto' or 'native' backend so the native op runs with its sharding rule, or run it on the local "
            f"tensors (x.to_local()) inside torch.distributed.tensor.experimental.local_map")


register()
