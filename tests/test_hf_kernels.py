"""Hugging Face's kernel mapping (``use_kernels=True`` + ``kernel_config``) onto pyllm's layer package.

Offline, on CPU, with the pinned transformers 5.23.0 and kernels 0.18.3. What is checked:

* ``from_pretrained(tmp, use_kernels=True, kernel_config=pyllm.hf.kernel_config())`` replaces the
  ``forward`` of every ``LlamaRMSNorm`` with pyllm's layer, and a forward pass then calls
  ``pyllm.functional.rms_norm`` once per norm (5 in a 2-layer Llama) and, with the native extension,
  the native op ``pyllm::rms_norm`` (seen by a TorchDispatchMode); a stock model loaded afterwards
  calls neither (nothing is patched globally);
* accuracy by the rule of tests/test_hf.py (tests/helpers.py): against the same model in fp64
  (oracle), pyllm's logits error at most 2x the stock model's own error in the same dtype (fp32 and
  bf16), fp32 gradients 3x, with a floor of 1e-6 x max|ref| in fp32 (about 8 ulps; 8e-3, about an
  ulp, in bf16), on real tokens only. Both sides compute RMSNorm's statistics in fp32 with different
  summation orders (pyllm's kernel vs ``pow(2).mean``), so neither is bit-exact and the fp64 oracle
  judges both (observed: fp32 logits within ~2e-6 of the stock model's);
* training mode (transformers re-kernelizes on ``model.train()``) keeps pyllm and its backward;
* a class declared ``"RMSNorm"`` with another program (gpt-oss) keeps its own result bit for bit;
  ``"RMSNormZeroCentered"`` (Qwen3.5, Gemma's program) runs pyllm's ``gemma`` style;
* what the installed versions cannot do, asserted as observed: transformers' plain
  ``KernelConfig`` local form fails on CPU (its device list has no "cpu") and, after
  ``from_pretrained`` rewrote the mapping into tuples, on every device; attention cannot be given as
  a local path; it maps through ``attn_implementation="<org>/<name>"`` with kernels'
  ``LOCAL_KERNELS`` override only.
"""
from __future__ import annotations

import copy
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
kernels = pytest.importorskip("kernels")

import pyllm  # noqa: E402
import pyllm.hf  # noqa: E402
from pyllm.hf import kernel_mapping as km  # noqa: E402
from pyllm.hf.testing import tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM, KernelConfig  # noqa: E402

from helpers import assert_close_to_ref, assert_grads_close, expected_path  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

N_NORMS = 5  # tiny Llama: 2 layers x (input, post-attention) + final norm


class OpRecorder(TorchDispatchMode):
    """Counts every op that reaches the dispatcher (aten and pyllm native ops)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    def pyllm_ops(self):
        return {k: v for k, v in self.ops.items() if k.startswith(("pyllm::", "pyllm_emu::"))}


@pytest.fixture
def rms_calls(monkeypatch):
    """Counts calls of pyllm.functional.rms_norm (what the layer package calls), whatever the backend."""
    calls = []
    real = pyllm.functional.rms_norm

    def counting(*args, **kwargs):
        calls.append(kwargs.get("style"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pyllm.functional, "rms_norm", counting)
    return calls


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", "sdpa").save_pretrained(d)
    return d


def batch(B=3, L=11, seed=1):
    """Token ids and a left-padded 0/1 mask (rows of 11, 6 and 2 real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 500, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    for b, n_pad in enumerate([0, 5, 9][:B]):
        am[b, :n_pad] = 0
    return ids, am


def real(t, am):
    """Rows of real (non-pad) positions only: pad query positions are not compared."""
    return t[am.bool()]


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def assert_mapped(model, layer_cls="RMSNorm"):
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == N_NORMS
    for m in norms:
        fwd = m.__dict__.get("forward")
        assert fwd is not None and fwd.__func__.__qualname__ == f"{layer_cls}.forward", fwd
        assert fwd.__func__.__module__.endswith(".layers")
        assert str(km.KERNEL_LAYERS_DIR) in str(m.__dict__.get("_kernel_repo"))


# ----------------------------------------------------------------------------- the layer package
def test_layer_package_loads_with_kernels_and_ships_its_metadata():
    mod = kernels.get_local_kernel(km.KERNEL_LAYERS_DIR)
    assert mod.__name__ == "pyllm_hf_kernel_layers_0_1_0"  # metadata.json's id
    for cls in km.LAYERS.values():
        layer = getattr(mod.layers, cls)
        assert issubclass(layer, torch.nn.Module) and layer.__init__ is torch.nn.Module.__init__
        assert layer.has_backward is True and layer.can_torch_compile is False
    assert mod.flash_attn_forward is pyllm.hf.attention_forward
    # the wheel must carry metadata.json (not a .py file): pyproject's package-data says so
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        assert re.search(r'^"pyllm\.hf\.kernel_layers" = \[[^]]*"metadata\.json"', text, re.M)
    else:
        assert "metadata.json" in tomllib.loads(text)["tool"]["setuptools"]["package-data"]["pyllm.hf.kernel_layers"]
    assert (km.KERNEL_LAYERS_DIR / "metadata.json").is_file()


def test_kernel_config_mapping_and_errors(monkeypatch):
    kc = pyllm.hf.kernel_config()
    assert isinstance(kc, KernelConfig) and kc.use_local_kernel
    assert kc.kernel_mapping == {"RMSNorm": f"{km.KERNEL_LAYERS_DIR}:RMSNorm",
                                 "RMSNormZeroCentered": f"{km.KERNEL_LAYERS_DIR}:RMSNormZeroCentered"}
    with pytest.raises(ValueError, match=r"no pyllm layer for \['LayerNorm'\]"):
        pyllm.hf.kernel_config(["LayerNorm"])
    with pytest.raises(ValueError, match=r"kernels on \('cpu', 'cuda'\) only, got \['mps'\]"):
        pyllm.hf.kernel_config(devices=["mps"])
    monkeypatch.setattr(km, "kernels_available", lambda: False)
    with pytest.raises(ImportError, match=r"0\.18\.2 <= version < 0\.19\.0 .*kernels==0\.18\.3"):
        pyllm.hf.kernel_config()


# ----------------------------------------------------------------------------- from_pretrained
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_from_pretrained_use_kernels_runs_pyllm_rms_norm(saved_llama, rms_calls, dtype):
    kc = pyllm.hf.kernel_config()
    model = load(saved_llama, use_kernels=True, kernel_config=kc, dtype=dtype)
    assert model.use_kernels and kc.device == "cpu"
    assert kc.not_in_model == ["RMSNormZeroCentered"]  # Llama declares "RMSNorm" only
    assert_mapped(model)

    ids, am = batch()
    rec = OpRecorder()
    with torch.no_grad(), rec:
        ours = model(ids, attention_mask=am).logits
    assert rms_calls == ["llama"] * N_NORMS
    if expected_path("rms_norm") == "native":
        assert rec.pyllm_ops() == {"pyllm::rms_norm": N_NORMS}, rec.pyllm_ops()
        assert "native CPU kernel" in pyllm.explain("rms_norm")
    else:  # PYLLM_BACKEND=torch or no extension: pyllm's reference, no native op
        assert rec.pyllm_ops() == {}

    # the stock model, loaded after: nothing of pyllm runs (kernelize patched instances, not classes)
    stock = load(saved_llama, dtype=dtype)
    assert all("forward" not in m.__dict__ for m in stock.modules())
    rec = OpRecorder()
    with torch.no_grad(), rec:
        base = stock(ids, attention_mask=am).logits
    assert rec.pyllm_ops() == {} and len(rms_calls) == N_NORMS

    with torch.no_grad():
        ref = load(saved_llama, dtype=torch.float64)(ids, attention_mask=am).logits
    assert_close_to_ref(real(ours, am), real(ref, am), real(base, am), name=f"use_kernels logits ({dtype})")


def test_set_use_kernels_on_a_built_model(saved_llama, rms_calls):
    model = load(saved_llama)
    model.set_use_kernels(True, pyllm.hf.kernel_config())  # no from_pretrained rewrite: string entries
    assert_mapped(model)
    with torch.no_grad():
        model(*batch())
    assert rms_calls == ["llama"] * N_NORMS


def test_training_mode_keeps_pyllm_and_its_backward(saved_llama, rms_calls):
    model = load(saved_llama, use_kernels=True, kernel_config=pyllm.hf.kernel_config())
    model.train()  # transformers calls kernelize again, in Mode.TRAINING
    assert_mapped(model)
    ids, am = batch()
    labels = ids.masked_fill(am == 0, -100)

    def grads(m):
        m.zero_grad(set_to_none=True)
        m(ids, attention_mask=am, labels=labels).loss.backward()
        return [p.grad for _, p in sorted(m.named_parameters())]

    ours = grads(model)
    assert len(rms_calls) == N_NORMS
    ref = grads(load(saved_llama, dtype=torch.float64).train())
    base = grads(load(saved_llama).train())
    names = [n for n, _ in sorted(model.named_parameters())]
    assert_grads_close(ours, ref, base, names=names)


# ----------------------------------------------------------------------------- other classes
def _kernelize(module, layer_name):
    repo = kernels.LocalLayerRepository(repo_path=km.KERNEL_LAYERS_DIR, layer_name=km.LAYERS[layer_name])
    with kernels.use_kernel_mapping({layer_name: {"cpu": repo}}, inherit_mapping=False):
        kernels.kernelize(module, device="cpu", mode=kernels.Mode.INFERENCE, use_fallback=False)
    assert module.__dict__["forward"].__func__ is repo.load().forward
    return module


def test_rms_norm_of_another_program_keeps_its_own_forward(rms_calls):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    assert GptOssRMSNorm.kernel_layer_name == "RMSNorm"  # declared replaceable under the same name
    m = GptOssRMSNorm(64).eval()
    with torch.no_grad():
        m.weight.normal_()
    stock = copy.deepcopy(m)
    _kernelize(m, "RMSNorm")  # the mapping reaches it...
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = m(x)
    assert rms_calls == []  # ...but (weight * h).to(dtype) is not Llama's program: its own forward runs
    assert torch.equal(out, stock(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_zero_centered_runs_pyllm_gemma_style(rms_calls, dtype):
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

    assert Qwen3_5RMSNorm.kernel_layer_name == "RMSNormZeroCentered"
    m = Qwen3_5RMSNorm(64).eval()
    with torch.no_grad():
        m.weight.normal_()
    stock = copy.deepcopy(m)
    _kernelize(m, "RMSNormZeroCentered")
    x = torch.randn(3, 7, 64).to(dtype)
    with torch.no_grad():
        out = m(x)
        ref = copy.deepcopy(stock).double()(x.double())
        base = stock(x)
    assert rms_calls == ["gemma"]
    assert_close_to_ref(out, ref, base, name=f"RMSNormZeroCentered {dtype}")


# ----------------------------------------------------------------------------- what does not map
def test_plain_local_kernel_config_fails_on_cpu(saved_llama):
    kc = KernelConfig(km.layer_mapping(["RMSNorm"]), use_local_kernel=True)
    with pytest.raises(ValueError, match=r"^Only devices in \['cuda', 'rocm', 'xpu', 'npu', 'neuron', 'tpu', "
                                         r"'mps'\] are supported, got: cpu$"):
        load(saved_llama, use_kernels=True, kernel_config=kc)


def test_plain_local_kernel_config_fails_after_from_pretrained_rewrites_it(saved_llama, monkeypatch):
    """The same path on a device transformers lists (here its device inference answers "cuda": the
    failing step never touches the device). from_pretrained first rewrites every entry into a
    ``(str, metadata)`` tuple; the stock create_compatible_mapping then splits it as a string."""
    from transformers.integrations.hub_kernels import register_kernel_replacements_and_fusions
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    import transformers.utils.kernel_config as tkc

    model = load(saved_llama)
    kc = KernelConfig(km.layer_mapping(["RMSNorm"]), use_local_kernel=True)
    register_kernel_replacements_and_fusions(LlamaForCausalLM, model.config, kc)
    assert kc.kernel_mapping == {"RMSNorm": (f"{km.KERNEL_LAYERS_DIR}:RMSNorm",
                                             {"version": 1, "trust_remote_code": False})}
    monkeypatch.setattr(tkc, "infer_device", lambda m: "cuda")
    kc.sanitize_kernel_mapping(model)
    with pytest.raises(AttributeError, match=r"^'tuple' object has no attribute 'split'$"):
        kc.create_compatible_mapping(model)
    # without that rewrite (model.set_use_kernels(True, config) on a built model) the stock config
    # builds its CUDA mapping: only the from_pretrained route fails there
    plain = KernelConfig(km.layer_mapping(["RMSNorm"]), use_local_kernel=True)
    plain.sanitize_kernel_mapping(model)
    plain.create_compatible_mapping(model)
    assert plain.kernel_mapping == {"RMSNorm": {"cuda": {kernels.Mode.INFERENCE: kernels.LocalLayerRepository(
        repo_path=km.KERNEL_LAYERS_DIR, layer_name="RMSNorm")}}}

    # pyllm's config builds kernels' mapping from that same rewritten form, for CUDA...
    ours = pyllm.hf.kernel_config()
    register_kernel_replacements_and_fusions(LlamaForCausalLM, model.config, ours)
    ours.sanitize_kernel_mapping(model)
    ours.create_compatible_mapping(model)
    (name, by_device), = ours.kernel_mapping.items()
    (device, by_mode), = by_device.items()
    (mode, repo), = by_mode.items()
    assert (name, device, mode) == ("RMSNorm", "cuda", kernels.Mode.FALLBACK)
    assert repo == kernels.LocalLayerRepository(repo_path=km.KERNEL_LAYERS_DIR, layer_name="RMSNorm")
    # ...and maps nothing on a device where pyllm has no kernels
    monkeypatch.setattr(tkc, "infer_device", lambda m: "mps")
    mps = pyllm.hf.kernel_config()
    mps.create_compatible_mapping(model)
    assert mps.kernel_mapping == {} and mps.device == "mps"


def test_attention_local_path_is_rejected(saved_llama):
    for impl in (str(km.KERNEL_LAYERS_DIR), f"{km.KERNEL_LAYERS_DIR}:flash_attn_forward"):
        with pytest.raises(ValueError, match="^" + re.escape(f'Specified `attn_implementation="{impl}"` is not supported')):
            load(saved_llama, attn_implementation=impl)


def test_attention_through_local_kernels_override(saved_llama, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    name = "pyllm-test/layers"
    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    with pytest.raises(ValueError, match=f"Version 1 of '{name}' is not available in the local cache and "
                                         f"Hugging Face Hub is in offline mode"):
        load(saved_llama, attn_implementation=name)

    monkeypatch.setenv("LOCAL_KERNELS", f"{name}={km.KERNEL_LAYERS_DIR}")
    model = load(saved_llama, attn_implementation=name)
    assert model.config._attn_implementation == name
    ids, am = batch()
    rec = OpRecorder()
    with torch.no_grad(), rec:
        ours = model(ids, attention_mask=am).logits
    if expected_path("scaled_dot_product_attention") == "native":
        assert rec.pyllm_ops() == {"pyllm::attention": 2}, rec.pyllm_ops()  # one per layer
    with torch.no_grad():
        base = load(saved_llama)(ids, attention_mask=am).logits
        ref = load(saved_llama, dtype=torch.float64)(ids, attention_mask=am).logits
    assert_close_to_ref(real(ours, am), real(ref, am), real(base, am), name="attention via kernels (fp32)")
    assert sys.modules["pyllm_hf_kernel_layers_0_1_0"].flash_attn_forward is pyllm.hf.attention_forward
