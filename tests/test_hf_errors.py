"""Bad use of pyllm.hf.optimize / revert / report: a clear message (an error or a warning, as
docs/HF.md "Errors and warnings" says) and the model left exactly as it was: state_dict bit for bit,
module types and Parameter objects, every module's instance attributes, the configs' attention
implementations and the forward outputs."""
from __future__ import annotations

import importlib
import re
import warnings

import pytest
import torch

# (ids first: tests/test_errors.py counts them in the public API's bad-input cases)
CASE_IDS = [
    "optimize-plain-module-nothing-to-switch", "optimize-architecture-without-attention", "optimize-twice",
    "optimize-twice-other-options", "optimize-submodule-of-optimized", "optimize-holder-of-optimized",
    "optimize-option-not-bool", "optimize-non-module", "revert-never-optimized", "revert-twice",
    "revert-submodule-of-optimized", "revert-non-module", "report-never-optimized", "report-non-module",
]

transformers = pytest.importorskip("transformers")

import pyllm.hf  # noqa: E402
from pyllm.hf import optimize, report, revert  # noqa: E402
from pyllm.hf.testing import tiny_model  # noqa: E402

_optimize_module = importlib.import_module("pyllm.hf.optimize")  # (pyllm.hf.optimize is the function)

torch.set_num_threads(min(2, torch.get_num_threads()))

_MARKS = ("_pyllm_hf_state", "pyllm_report")  # what optimize adds to the model it was given


# ----------------------------------------------------------------------------- models and probes
def bert():
    m = tiny_model("bert", "sdpa")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 500, (2, 9), generator=g)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, 6:] = 0
    return m, lambda model: model(input_ids=ids, attention_mask=am).last_hidden_state


def resnet():
    """A transformers model without attention and without a LayerNorm (BatchNorm only)."""
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    torch.manual_seed(0)
    m = transformers.ResNetModel(cfg).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return m, lambda model: model(pixel_values=x).last_hidden_state


def plain():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    return m, lambda model: model(x)


class Holder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.head = torch.nn.Linear(64, 2)

    def forward(self, **kw):
        return self.head(self.inner(**kw).last_hidden_state)


def optimized_bert():
    m, fwd = bert()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tiny BERT is fully supported: no warning
        optimize(m)
    return m, fwd


def holder_of_optimized_bert():
    inner, fwd = optimized_bert()
    return Holder(inner), (lambda model: fwd(model.inner))


def reverted_bert():
    m, fwd = optimized_bert()
    revert(m)
    return m, fwd


# ----------------------------------------------------------------------------- the snapshot
def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view(torch.uint8) if t.dtype.is_floating_point else t


def _configs(model):
    out = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            out[id(cfg)] = cfg._attn_implementation_internal
    return out


def snapshot(model, fwd, root_marks: bool = True):
    with torch.no_grad():
        out = fwd(model)
    root_keys = set(vars(model)) if root_marks else set(vars(model)) - set(_MARKS)
    return {
        "state_dict": {k: (v.dtype, tuple(v.shape), _bits(v).clone()) for k, v in model.state_dict().items()},
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "attrs": [(n, sorted(vars(m)) if m is not model else sorted(root_keys)) for n, m in model.named_modules()],
        "configs": _configs(model),
        "out": out.detach().clone(),
    }


def assert_unchanged(before, after, what):
    assert before["state_dict"].keys() == after["state_dict"].keys(), f"{what}: state_dict keys changed"
    for k, (dt, shape, bits) in before["state_dict"].items():
        dt2, shape2, bits2 = after["state_dict"][k]
        assert (dt, shape) == (dt2, shape2) and torch.equal(bits, bits2), f"{what}: state_dict[{k!r}] changed"
    assert before["modules"] == after["modules"], f"{what}: module objects or types changed"
    assert before["params"] == after["params"], f"{what}: Parameter objects changed"
    assert before["attrs"] == after["attrs"], f"{what}: module attributes changed (a forward override?)"
    assert before["configs"] == after["configs"], f"{what}: attention implementations changed"
    assert torch.equal(before["out"], after["out"]), f"{what}: forward output changed"


# ----------------------------------------------------------------------------- the cases
def raises(exc, match):
    return ("raises", exc, match)


def warns(match):
    return ("warns", UserWarning, match)


# id -> (model factory, action, expectation); every message names the function and the model's class
CASES = {
    "optimize-plain-module-nothing-to-switch": (
        plain, optimize, warns(r"^pyllm.hf.optimize found nothing to switch in Sequential: the model is unchanged")),
    "optimize-architecture-without-attention": (
        resnet, optimize, warns(r"^pyllm.hf.optimize found nothing to switch in ResNetModel: the model is unchanged"
                                r"(.|\n)*no attention layer in ResNetModel(.|\n)*BatchNorm2d: not a recognized")),
    "optimize-twice": (
        optimized_bert, optimize, warns(r"^pyllm.hf.optimize: this BertModel is already optimized; nothing changed")),
    "optimize-twice-other-options": (
        optimized_bert, lambda m: optimize(m, fuse=False, padding_free=False),
        raises(ValueError, r"^pyllm: this BertModel is already optimized \(with padding_free=True, fuse=True\); "
                           r"optimize\(model, padding_free=False, fuse=False\) cannot change that in place: call "
                           r"pyllm.hf.revert\(model\) first. Nothing changed")),
    "optimize-submodule-of-optimized": (
        optimized_bert, lambda m: optimize(m.encoder),
        raises(ValueError, r"^pyllm: this BertEncoder is part of a BertModel that pyllm.hf.optimize already "
                           r"switched, so it runs on pyllm already; nothing changed")),
    "optimize-holder-of-optimized": (
        holder_of_optimized_bert, optimize,
        raises(ValueError, r"^pyllm: this Holder holds a BertModel that pyllm.hf.optimize already switched; revert "
                           r"that one \(pyllm.hf.revert\) before optimizing the whole Holder. Nothing changed")),
    "optimize-option-not-bool": (
        bert, lambda m: optimize(m, fuse="no"),
        raises(TypeError, r"^pyllm: optimize\(\.\.\., fuse=\) must be a bool, got str 'no'")),
    "optimize-non-module": (
        bert, lambda m: optimize(m.state_dict()),
        raises(TypeError, r"^pyllm: optimize\(model\) takes a torch.nn.Module \(a transformers model\), "
                          r"got OrderedDict")),
    "revert-never-optimized": (
        bert, revert,
        raises(ValueError, r"^pyllm: revert\(model\) needs a model switched by pyllm.hf.optimize\(model\); this "
                           r"BertModel is not \(it was never optimized, or was reverted already\). Nothing changed")),
    "revert-twice": (
        reverted_bert, revert, raises(ValueError, r"^pyllm: revert\(model\) needs .* this BertModel is not \(it was "
                                                  r"never optimized, or was reverted already\)")),
    "revert-submodule-of-optimized": (
        optimized_bert, lambda m: revert(m.encoder),
        raises(ValueError, r"^pyllm: revert\(model\) needs .* this BertEncoder is not \(it is part of a BertModel "
                           r"that was optimized: revert that model\)")),
    "revert-non-module": (
        bert, lambda m: revert("BertModel"), raises(TypeError, r"^pyllm: revert\(model\) takes a torch.nn.Module")),
    "report-never-optimized": (
        bert, report, raises(ValueError, r"^pyllm: report\(model\) needs a model switched by "
                                         r"pyllm.hf.optimize\(model\); this BertModel was not")),
    "report-non-module": (
        bert, lambda m: report(None),
        raises(TypeError, r"^pyllm: report\(model\) takes a torch.nn.Module \(a transformers model\), got NoneType")),
}


def test_case_ids_are_the_table():
    assert CASE_IDS == list(CASES)


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_use_is_clear_and_leaves_the_model_unchanged(case):
    make, action, (kind, exc, match) = CASES[case]
    model, fwd = make()
    # optimize marks the model it was given (pyllm_report stays readable); nothing else may change
    before = snapshot(model, fwd, root_marks=kind != "warns")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "raises":
            with pytest.raises(exc, match=match):
                action(model)
        else:
            assert action(model) is model
    ours = [w for w in caught if "pyllm" in str(w.message)]
    if kind == "warns":
        assert len(ours) == 1, [str(w.message) for w in ours]
        assert issubclass(ours[0].category, exc)
        assert re.search(match, str(ours[0].message)), str(ours[0].message)
        assert ours[0].filename == __file__, "the warning should point at the caller's line (stacklevel)"
    else:
        assert not ours, [str(w.message) for w in ours]
    assert_unchanged(before, snapshot(model, fwd, root_marks=kind != "warns"), case)


def test_nothing_to_switch_is_marked_so_report_and_revert_work():
    """The documented contract of a model with nothing to switch: returned unchanged, with an empty
    report (``pyllm.hf.report`` works), and ``revert`` a no-op that removes the mark."""
    for make, name in ((plain, "Sequential"), (resnet, "ResNetModel")):
        model, fwd = make()
        before = snapshot(model, fwd)
        with pytest.warns(UserWarning, match=f"found nothing to switch in {name}"):
            optimize(model)
        rep = report(model)
        assert not rep.switched and not rep.attention and not rep.norms and not rep.fused
        assert model.pyllm_report is rep and pyllm.hf.is_optimized(model)
        if name == "ResNetModel":
            assert rep.no_attention == ["ResNetModel"] and model.config._attn_implementation == "eager"
        assert revert(model) is model and not pyllm.hf.is_optimized(model)
        assert_unchanged(before, snapshot(model, fwd), f"{name} after optimize + revert")


def test_warn_false_silences_the_second_call():
    model, fwd = optimized_bert()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert optimize(model, warn=False) is model


def test_failed_optimize_leaves_no_half_switched_model(monkeypatch):
    """An exception while switching (here: from the padding-free step, after attention, norms and fused
    epilogues were switched) undoes everything before it propagates."""
    model, fwd = bert()
    before = snapshot(model, fwd)

    def boom(m):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(_optimize_module._padfree, "enable", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        optimize(model)
    assert not pyllm.hf.is_optimized(model)
    assert_unchanged(before, snapshot(model, fwd), "after a failed optimize")
    monkeypatch.undo()
    optimize(model)  # and it can be optimized afterwards
    assert report(model).complete and report(model).padding_free


def test_an_optimized_model_still_optimizes_after_its_holder_is_gone():
    """The record of optimized models holds no strong reference and revert forgets the model."""
    inner, fwd = optimized_bert()
    revert(inner)
    holder = Holder(inner)
    optimize(holder)  # not refused: nothing inside is optimized any more
    assert report(holder).attention == ["BertModel"]
    revert(holder)
