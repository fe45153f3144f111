"""``optimize(model)`` / ``revert(model)``: switch a built transformers model to pyllm and back."""
from __future__ import annotations

import sys
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import fused as _fused
from . import norms as _norms
from . import padfree as _padfree
from .attention import NAME

_STATE = "_pyllm_hf_state"
_OPTIONS = ("attention", "norms", "padding_free", "fuse")
# The models optimize() switched and revert() has not restored yet (to recognize one of their submodules).
_OPTIMIZED = weakref.WeakSet()


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
    no_attention: list = field(default_factory=list)         # model classes without attention layers

    @property
    def switched(self) -> bool:
        """True when anything at all runs on pyllm now."""
        return bool(self.attention or self.norms or self.fused or self.padding_free)

    @property
    def complete(self) -> bool:
        """True when every attention and normalization module found runs on pyllm."""
        return not self.attention_skipped and not self.skipped

    def __str__(self) -> str:
        lines = [f"pyllm.hf.optimize: attention -> pyllm in {', '.join(self.attention) or 'no model'}"]
        for k in self.no_attention:
            lines.append(f"  no attention layer in {k} (nothing to switch there; its config is left as it was)")
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


def _check_module(model, fn: str) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"pyllm: {fn}(model) takes a torch.nn.Module (a transformers model), "
                        f"got {type(model).__name__}")


def _enclosing(model):
    """An optimized model (not ``model`` itself) holding ``model`` as a submodule, or None."""
    for root in list(_OPTIMIZED):
        if root is not model and getattr(root, _STATE, None) is not None \
                and any(m is model for m in root.modules()):
            return root
    return None


def _has_attention(hf_model) -> bool:
    """Whether a transformers model has attention layers at all: a module class named like one, or
    defined in a module that dispatches through transformers' AttentionInterface. (ResNet, ConvNeXt,
    Mamba or FNet have none: setting their attention implementation would change nothing but the config.)"""
    for m in hf_model.modules():
        cls = type(m)
        if "Attention" in cls.__name__:
            return True
        mod = sys.modules.get(cls.__module__)
        if mod is not None and "ALL_ATTENTION_FUNCTIONS" in vars(mod):
            return True
    return False


def report(model: torch.nn.Module) -> OptimizeReport:
    """The :class:`OptimizeReport` of a model switched by :func:`optimize` (also ``model.pyllm_report``)."""
    _check_module(model, "report")
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

    Bad use never half-changes a model (docs/HF.md, "Errors and warnings"): a model with nothing to
    switch (no attention layer, no LayerNorm/RMSNorm pyllm reproduces) is returned unchanged with a
    warning (its empty report stays readable, ``revert`` is a no-op); a second call on an optimized
    model changes nothing and warns, or raises ``ValueError`` if it asks for other options; a
    submodule of an optimized model, or a model holding an optimized one, raises ``ValueError``.
    """
    _check_module(model, "optimize")
    options = {"attention": attention, "norms": norms, "padding_free": padding_free, "fuse": fuse, "warn": warn}
    for k, v in options.items():
        if not isinstance(v, bool):
            raise TypeError(f"pyllm: optimize(..., {k}=) must be a bool, got {type(v).__name__} {v!r}")
    options.pop("warn")
    name = type(model).__name__
    state = getattr(model, _STATE, None)
    if state is not None:
        before = state.get("options", options)
        if before != options:
            diff = ", ".join(f"{k}={v}" for k, v in options.items() if before[k] != v)
            was = ", ".join(f"{k}={before[k]}" for k, v in options.items() if before[k] != v)
            raise ValueError(f"pyllm: this {name} is already optimized (with {was}); optimize(model, {diff}) "
                             f"cannot change that in place: call pyllm.hf.revert(model) first. Nothing changed")
        if warn:
            warnings.warn(f"pyllm.hf.optimize: this {name} is already optimized; nothing changed (the first call's "
                          f"switches stay; pyllm.hf.report(model) lists them)", stacklevel=2)
        return model
    inner = next((m for m in model.modules() if m is not model and getattr(m, _STATE, None) is not None), None)
    if inner is not None:
        raise ValueError(f"pyllm: this {name} holds a {type(inner).__name__} that pyllm.hf.optimize already "
                         f"switched; revert that one (pyllm.hf.revert) before optimizing the whole {name}. "
                         f"Nothing changed")
    outer = _enclosing(model)
    if outer is not None:
        raise ValueError(f"pyllm: this {name} is part of a {type(outer).__name__} that pyllm.hf.optimize already "
                         f"switched, so it runs on pyllm already; nothing changed")
    report = OptimizeReport()
    state = {"report": report, "attn": [], "classes": [], "children": [], "fused": [], "padfree": [],
             "options": options}
    try:
        _switch(model, state, report, **options)
    except BaseException:
        _undo(state)  # never leave a half-switched model behind
        raise
    object.__setattr__(model, _STATE, state)
    object.__setattr__(model, "pyllm_report", report)
    try:
        _OPTIMIZED.add(model)
    except TypeError:  # an unhashable module class: only the submodule checks lose it
        pass
    if warn and not report.switched:
        warnings.warn(f"pyllm.hf.optimize found nothing to switch in {name}: the model is unchanged (no attention "
                      f"layer, norm or fusable layer pyllm runs exactly{_asked(options)}); what it found:\n{report}",
                      stacklevel=2)
    elif warn and not report.complete:
        warnings.warn(f"pyllm.hf.optimize left parts of {name} on stock PyTorch "
                      f"(results stay exact, only not accelerated):\n{report}", stacklevel=2)
    return model


def _asked(options) -> str:
    off = [k for k, v in options.items() if not v]
    return f" with {', '.join(f'{k}=False' for k in off)}" if off else ""


def _switch(model, state, report, *, attention, norms, padding_free, fuse) -> None:
    """The switches of :func:`optimize`, each recorded in ``state`` as soon as it is made."""
    from transformers import PreTrainedModel

    if attention:
        hf_models = _transformers_models(model)
        if not hf_models:
            report.attention_skipped[type(model).__name__] = "no transformers PreTrainedModel in it"
        for hf_model in hf_models:
            if not _has_attention(hf_model):
                report.no_attention.append(type(hf_model).__name__)
                continue
            state["attn"].append((hf_model, [(cfg, cfg._attn_implementation_internal) for cfg in _configs(hf_model)]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' own notices; we report below
                hf_model.set_attn_implementation(NAME)
        if state["attn"]:
            seen = set()
            for hf_model, _ in state["attn"]:
                for m in hf_model.modules():
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
    if padding_free and attention and report.attention:
        for m in model.modules():
            if _padfree.enable(m):
                state["padfree"].append(m)
                report.padding_free.append(type(m).__name__)


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`optimize` exactly: attention implementations of every config and the original
    module objects and classes (sharing the current Parameters). Returns the model.

    A model that is not optimized (never, or already reverted) raises ``ValueError`` and is left as it is."""
    _check_module(model, "revert")
    state = getattr(model, _STATE, None)
    if state is None:
        outer = _enclosing(model)
        why = (f"it is part of a {type(outer).__name__} that was optimized: revert that model" if outer is not None
               else "it was never optimized, or was reverted already")
        raise ValueError(f"pyllm: revert(model) needs a model switched by pyllm.hf.optimize(model); this "
                         f"{type(model).__name__} is not ({why}). Nothing changed")
    _undo(state)
    object.__delattr__(model, _STATE)
    object.__delattr__(model, "pyllm_report")
    _OPTIMIZED.discard(model)
    return model


def _undo(state) -> None:
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
