"""``optimize(model)`` / ``revert(model)``: switch a built transformers model to pyllm and back."""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import fused as _fused
from . import norms as _norms
from . import padfree as _padfree
from .attention import NAME

_STATE = "_pyllm_hf_state"


@dataclass
class OptimizeReport:
    """What :func:`optimize` changed, and what it left alone (and why)."""

    attention: list = field(default_factory=list)           # model classes now on pyllm attention
    attention_skipped: dict = field(default_factory=dict)   # model class -> reason
    norms: Counter = field(default_factory=Counter)         # "Original -> pyllm.nn.X(style)" -> count
    skipped: Counter = field(default_factory=Counter)       # "ClassName: reason" -> count
    padding_free: list = field(default_factory=list)        # base models that run without pad tokens
    fused: Counter = field(default_factory=Counter)         # "Class: what runs fused" -> count
    not_fused: Counter = field(default_factory=Counter)     # "Class: why not" -> count (informational)

    @property
    def complete(self) -> bool:
        """True when every attention and normalization module found runs on pyllm."""
        return not self.attention_skipped and not self.skipped

    def __str__(self) -> str:
        lines = [f"pyllm.hf.optimize: attention -> pyllm in {', '.join(self.attention) or 'no model'}"]
        for k, v in self.attention_skipped.items():
            lines.append(f"  attention NOT switched in {k}: {v}")
        for k, v in sorted(self.norms.items()):
            lines.append(f"  {v} x {k}")
        for k, v in sorted(self.skipped.items()):
            lines.append(f"  left unchanged: {v} x {k}")
        for k, v in sorted(self.fused.items()):
            lines.append(f"  fused: {v} x {k}")
        for k, v in sorted(self.not_fused.items()):
            lines.append(f"  not fused: {v} x {k}")
        if self.padding_free:
            lines.append(f"  padding-free (pad tokens removed once, attention per sequence): "
                         f"{', '.join(self.padding_free)}")
        return "\n".join(lines)


def _configs(model):
    """Every config reachable from the model's PreTrainedModels and their sub-configs."""
    from transformers import PreTrainedModel

    seen, out = set(), []
    stack = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        out.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, key, None))
    return out


def is_optimized(model: torch.nn.Module) -> bool:
    return getattr(model, _STATE, None) is not None


def report(model: torch.nn.Module) -> OptimizeReport:
    """The :class:`OptimizeReport` of a model switched by :func:`optimize` (also ``model.pyllm_report``)."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(f"pyllm: report(model) needs a model switched by pyllm.hf.optimize(model); "
                         f"this {type(model).__name__} was not")
    return state["report"]


def _transformers_models(model):
    """The outermost transformers PreTrainedModels in ``model`` (the model itself if it is one; the
    ones inside a wrapper such as a sentence-transformers ``SentenceTransformer`` otherwise)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return [model]
    found, inner = [], set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and id(m) not in inner:
            found.append(m)
            inner.update(id(x) for x in m.modules())
    return found


def optimize(model: torch.nn.Module, *, attention: bool = True, norms: bool = True,
             padding_free: bool = True, fuse: bool = True, warn: bool = True) -> torch.nn.Module:
    """Run an already built transformers model on pyllm, in place; returns the model
    (``model = pyllm.hf.optimize(model)`` works, as with ``torch.compile``).

    ``model`` is a transformers ``PreTrainedModel`` or a module holding some, such as a
    sentence-transformers ``SentenceTransformer`` (the transformers models inside are switched).

    * attention: ``model.set_attn_implementation("pyllm")`` (transformers' own switch, which also
      updates sub-models and sub-configs); models whose attention does not go through
      transformers' AttentionInterface are reported and left unchanged.
    * normalization: ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` become ``pyllm.nn.LayerNorm`` /
      ``pyllm.nn.RMSNorm`` (same object, class switched); Hugging Face RMSNorm modules that compute
      exactly the Llama, T5 or Gemma program are replaced by ``pyllm.nn.RMSNorm(style=...)`` holding
      the very same ``weight`` Parameter. Anything else named like a norm is reported.
    * padding-free (``padding_free=True``, with pyllm attention): the encoders of BERT, RoBERTa,
      XLM-RoBERTa, ELECTRA, CamemBERT and DistilBERT models remove the pad tokens of a padded batch once and run
      every layer on the real tokens only (:mod:`pyllm.hf.padfree`); their ``last_hidden_state``
      holds zeros at pad positions.

    * fused epilogues (``fuse=True``): encoder layers computing exactly BERT's ``SelfOutput`` /
      ``Output`` (dense, residual add, LayerNorm) run the residual add + LayerNorm fused and in
      place; ``Intermediate`` layers with a tanh GELU run bias + GELU fused
      (:mod:`pyllm.hf.fused`).

    Outputs match the stock model to floating-point rounding. What it switched and what it left
    (and why) is an :class:`OptimizeReport`: ``pyllm.hf.report(model)`` or ``model.pyllm_report``;
    it warns about anything left unchanged unless ``warn=False``. :func:`revert` undoes it exactly.
    Calling it on an optimized model changes nothing.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"pyllm: model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if getattr(model, _STATE, None) is not None:
        return model
    report = OptimizeReport()
    state = {"report": report, "attn": [], "classes": [], "children": []}

    if attention:
        hf_models = _transformers_models(model)
        if not hf_models:
            report.attention_skipped[type(model).__name__] = "no transformers PreTrainedModel in it"
        for hf_model in hf_models:
            state["attn"].append((hf_model, [(cfg, cfg._attn_implementation_internal) for cfg in _configs(hf_model)]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' own notices; we report below
                hf_model.set_attn_implementation(NAME)
        if hf_models:
            seen = set()
            for m in model.modules():
                if isinstance(m, PreTrainedModel) and id(m.config) not in seen:
                    seen.add(id(m.config))
                    name = type(m).__name__
                    if m.config._attn_implementation == NAME:
                        report.attention.append(name)
                    else:
                        report.attention_skipped[name] = (
                            f"its attention does not use transformers' AttentionInterface "
                            f"(still {m.config._attn_implementation!r})")

    if norms:
        memo = {}
        for parent in list(model.modules()):
            for cname, child in list(parent.named_children()):
                if id(child) in memo:  # a module shared by several parents
                    rep = memo[id(child)]
                    if rep is not None:
                        setattr(parent, cname, rep)
                        state["children"].append((parent, cname, child, rep))
                    continue
                p = _norms.plan(child)
                memo[id(child)] = None
                if p is None:
                    continue
                kind = p[0]
                if kind == "class":
                    _, cls, extra = p
                    state["classes"].append((child, type(child), tuple(extra)))
                    report.norms[f"torch.nn.{type(child).__name__} -> pyllm.nn.{cls.__name__}"] += 1
                    child.__class__ = cls
                    for k, v in extra.items():
                        setattr(child, k, v)
                elif kind == "replace":
                    rep = p[1]
                    memo[id(child)] = rep
                    setattr(parent, cname, rep)
                    state["children"].append((parent, cname, child, rep))
                    report.norms[f"{type(child).__name__} -> pyllm.nn.RMSNorm(style={rep.style!r})"] += 1
                else:
                    report.skipped[f"{type(child).__name__}: {p[1]}"] += 1
    state["fused"] = []
    if fuse:
        for m in model.modules():
            p = _fused.plan(m)
            if p is None or _fused.is_enabled(m):
                continue
            if p[0] == "skip":
                report.not_fused[p[1]] += 1
            else:
                _fused.enable(m, p[0])
                state["fused"].append(m)
                report.fused[p[1]] += 1
    state["padfree"] = []
    if padding_free and attention and report.attention:
        for m in model.modules():
            if _padfree.enable(m):
                state["padfree"].append(m)
                report.padding_free.append(type(m).__name__)
    object.__setattr__(model, _STATE, state)
    object.__setattr__(model, "pyllm_report", report)
    if warn and not report.complete:
        warnings.warn(f"pyllm.hf.optimize left parts of {type(model).__name__} on stock PyTorch "
                      f"(results stay exact, only not accelerated):\n{report}", stacklevel=2)
    return model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`optimize` exactly: attention implementations of every config and the original
    module objects and classes (sharing the current Parameters). Returns the model."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("pyllm: revert(model) needs a model switched by pyllm.hf.optimize(model)")
    for m in state.get("padfree", []):
        _padfree.disable(m)
    for m in state.get("fused", []):
        _fused.disable(m)
    for parent, cname, original, rep in reversed(state["children"]):
        if rep.weight is not original.weight:  # parameters replaced meanwhile (e.g. load with assign=True)
            original.weight = rep.weight
        original.train(rep.training)
        setattr(parent, cname, original)
    for module, cls, extra in reversed(state["classes"]):
        module.__class__ = cls
        for k in extra:
            module.__dict__.pop(k, None)
    for hf_model, saved in state["attn"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                hf_model.set_attn_implementation(saved[0][1])
            except Exception:  # noqa: BLE001  (restored exactly just below anyway)
                pass
        for cfg, impl in saved:
            cfg._attn_implementation_internal = impl
    object.__delattr__(model, _STATE)
    object.__delattr__(model, "pyllm_report")
    return model
