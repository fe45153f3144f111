"""Hugging Face's kernel mapping (``from_pretrained(..., use_kernels=True, kernel_config=...)``) onto pyllm.

transformers marks some layer classes as kernel-replaceable (``@use_kernel_forward_from_hub("RMSNorm")``
on ``LlamaRMSNorm`` and ~140 other classes). With ``use_kernels=True`` and a ``KernelConfig``, the
``kernels`` library replaces those modules' ``forward`` with the ``forward`` of a layer class loaded
from a kernel repository; with ``use_local_kernel=True`` the repository is a local directory.
pyllm ships such a directory, :mod:`pyllm.hf.kernel_layers` (its ``layers`` run
:func:`pyllm.functional.rms_norm`), and :func:`kernel_config` returns a ``KernelConfig`` pointing at
the installed copy::

    model = AutoModelForCausalLM.from_pretrained(path, use_kernels=True, kernel_config=pyllm.hf.kernel_config())

Why a subclass of ``KernelConfig`` (:class:`PyllmKernelConfig`) and not a plain one: with the pinned
versions (transformers 5.23.0, kernels 0.18.3) the plain local form
``KernelConfig({"RMSNorm": "<dir>:RMSNorm"}, use_local_kernel=True)`` cannot run on any device:

* on CPU ``create_compatible_mapping`` raises ``ValueError: Only devices in ['cuda', 'rocm', 'xpu',
  'npu', 'neuron', 'tpu', 'mps'] are supported, got: cpu`` (transformers' own device list has no
  ``"cpu"``, although ``kernels`` maps CPU layers);
* on the devices it lists, ``from_pretrained`` first rewrites every entry into a
  ``("<dir>:RMSNorm", {"version": 1, ...})`` tuple (``register_kernel_replacements_and_fusions``), and
  ``create_compatible_mapping`` then calls ``.split(":")`` on that tuple: ``AttributeError: 'tuple'
  object has no attribute 'split'``.

:class:`PyllmKernelConfig` overrides exactly those two steps (both are public ``KernelConfig``
methods that ``PreTrainedModel.set_use_kernels`` calls): ``sanitize_kernel_mapping`` keeps the
layer names the model declares (one config fits Llama, which has ``"RMSNorm"``, and Qwen3.5, which has
``"RMSNormZeroCentered"``; the stock check raises on a name the model lacks) and
``create_compatible_mapping`` builds the mapping ``kernels`` expects
(``{name: {device: {Mode.FALLBACK: LocalLayerRepository(dir, layer_name=...)}}}``) for CPU and CUDA,
pyllm's two kernel devices. ``Mode.FALLBACK`` serves inference and training (the layers have a
backward) and, under ``Mode.TORCH_COMPILE``, ``kernels`` keeps the stock forward (the layers do not
claim ``can_torch_compile``). On any other device nothing is mapped and the stock forwards run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from transformers import KernelConfig

KERNEL_LAYERS_DIR = Path(__file__).resolve().parent / "kernel_layers"
"""The installed kernel repository directory (``metadata.json``, ``__init__.py``, ``layers.py``)."""

# transformers' layer name (use_kernel_forward_from_hub) -> class in pyllm/hf/kernel_layers/layers.py
LAYERS = {"RMSNorm": "RMSNorm", "RMSNormZeroCentered": "RMSNormZeroCentered"}

# Device types (transformers.utils.import_utils.get_device_type) where pyllm has kernels.
DEVICES = ("cpu", "cuda")

# The kernels versions transformers 5.23 accepts (transformers.utils.import_utils.KERNELS_MIN/MAX_VERSION).
_PIN = "kernels==0.18.3"


def kernels_available() -> bool:
    """Whether the installed ``kernels`` package is one transformers accepts (``use_kernels`` needs it)."""
    from transformers.utils.import_utils import is_kernels_available

    return is_kernels_available()


def _parse(layer_name: str, entry) -> tuple[str, str]:
    """``(directory, class name)`` of one mapping entry: ``"<dir>:<Class>"``, or the
    ``("<dir>:<Class>", metadata)`` tuple that transformers' from_pretrained rewrites it into."""
    repo = entry[0] if isinstance(entry, tuple) and entry and isinstance(entry[0], str) else entry
    if not isinstance(repo, str):
        raise ValueError(f"pyllm: kernel mapping entry for {layer_name!r} must be '<dir>:<LayerClass>' "
                         f"(or transformers' (str, metadata) tuple), got {entry!r}")
    path, sep, cls = repo.rpartition(":")
    if not sep or not path or not cls:
        raise ValueError(f"pyllm: kernel mapping entry for {layer_name!r} must be '<dir>:<LayerClass>', got {repo!r}")
    return path, cls


class PyllmKernelConfig(KernelConfig):
    """A ``transformers.KernelConfig`` (local form) mapping transformers' kernel-replaceable layers onto
    pyllm's layer package, on CPU and CUDA. Build it with :func:`kernel_config`. transformers rewrites a
    ``KernelConfig`` in place while loading, so use a fresh one per ``from_pretrained`` call."""

    def __init__(self, kernel_mapping=None, devices: Iterable[str] = DEVICES):
        super().__init__(kernel_mapping=kernel_mapping, use_local_kernel=True, inherit_mapping=False)
        self.devices = tuple(devices)
        self.not_in_model: list = []   # mapped layer names the last model did not declare
        self.device: Optional[str] = None  # the device type the last model was mapped for

    def sanitize_kernel_mapping(self, model):
        """Keep the layer names ``model`` declares (recorded in ``not_in_model`` otherwise), then the
        stock checks."""
        self.store_registered_layer_names(model)
        declared = set(self.registered_layer_names.values())
        if isinstance(self.kernel_mapping, dict):
            self.not_in_model = sorted(k for k in self.kernel_mapping if k not in declared)
            self.kernel_mapping = {k: v for k, v in self.kernel_mapping.items() if k in declared}
        super().sanitize_kernel_mapping(model)

    def create_compatible_mapping(self, model, compile: bool = False):
        """``{layer: {device: {Mode.FALLBACK: LocalLayerRepository}}}`` for the model's device when
        pyllm has kernels there (``devices``), else an empty mapping (stock forwards)."""
        from kernels import LocalLayerRepository, Mode
        from transformers.utils.kernel_config import infer_device

        device = infer_device(model)
        self.device = device
        mapping = {}
        if device in self.devices:
            for layer_name, entry in self.kernel_mapping.items():
                path, cls = _parse(layer_name, entry)
                mapping[layer_name] = {device: {Mode.FALLBACK: LocalLayerRepository(repo_path=Path(path),
                                                                                    layer_name=cls)}}
        self.kernel_mapping = mapping


def layer_mapping(layers: Optional[Iterable[str]] = None) -> dict:
    """The local-form mapping ``{layer name: "<installed kernel_layers dir>:<Class>"}`` (what a
    ``KernelConfig(..., use_local_kernel=True)`` takes), for ``layers`` (default: all of :data:`LAYERS`)."""
    names = list(LAYERS) if layers is None else list(layers)
    bad = [n for n in names if n not in LAYERS]
    if bad:
        raise ValueError(f"pyllm: no pyllm layer for {bad}; pyllm maps {sorted(LAYERS)}")
    return {n: f"{os.fspath(KERNEL_LAYERS_DIR)}:{LAYERS[n]}" for n in names}


def kernel_config(layers: Optional[Iterable[str]] = None, *, devices: Iterable[str] = DEVICES) -> PyllmKernelConfig:
    """A ready ``KernelConfig`` for ``from_pretrained(..., use_kernels=True, kernel_config=...)`` (or
    ``model.set_use_kernels(True, kernel_config)``) running pyllm's layers: ``RMSNorm`` (Llama-program
    RMSNorms) and ``RMSNormZeroCentered`` (Qwen3.5, Gemma's program), on ``devices`` (CPU and CUDA).
    Needs ``kernels`` in the versions transformers accepts (pinned: ``kernels==0.18.3``)."""
    if not kernels_available():
        from transformers.utils.import_utils import KERNELS_MAX_VERSION, KERNELS_MIN_VERSION

        raise ImportError(f"pyllm.hf.kernel_config needs the `kernels` package, {KERNELS_MIN_VERSION} <= version < "
                          f"{KERNELS_MAX_VERSION} for this transformers (pip install {_PIN})")
    devices = tuple(devices)
    bad = [d for d in devices if d not in DEVICES]
    if bad:
        raise ValueError(f"pyllm: pyllm has kernels on {DEVICES} only, got {bad}")
    return PyllmKernelConfig(layer_mapping(layers), devices=devices)


__all__ = ["KERNEL_LAYERS_DIR", "LAYERS", "DEVICES", "PyllmKernelConfig", "kernel_config", "layer_mapping",
           "kernels_available"]
