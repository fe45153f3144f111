"""The layers of pyllm's kernel package (see ``__init__``): one class per layer name that
transformers declares kernel-replaceable and pyllm computes exactly.

``kernels.kernelize`` binds ``forward`` of the class named in the mapping onto each matching module
(``module.forward = MethodType(Layer.forward, module)``), so ``self`` is the Hugging Face module
itself (its ``weight``, its eps attribute), and the class may hold nothing else: ``kernels``
rejects a layer with its own ``__init__`` or any member besides ``forward``, ``has_backward`` and
``can_torch_compile``.

One layer name covers many classes (about 140 transformers classes are declared ``"RMSNorm"``, and
they do not all compute the same thing: gpt-oss, OLMo 2, ... cast differently). So ``forward``
checks, per class, that the module computes exactly one of the programs pyllm reproduces
(:func:`pyllm.hf.norms.hf_rms_style`: the same syntax tree as ``LlamaRMSNorm`` / ``T5LayerNorm`` /
``GemmaRMSNorm``) and otherwise runs the class's own ``forward``: a mapped model never computes
something else than the stock model, it only runs pyllm where pyllm is exact.
"""
from __future__ import annotations

import torch

from pyllm import functional as _F
from pyllm.hf import norms as _norms


class RMSNorm(torch.nn.Module):
    """``forward`` for transformers' ``"RMSNorm"`` layers (``LlamaRMSNorm`` and its copies: Mistral,
    Qwen2/3, Phi-3, ...): :func:`pyllm.functional.rms_norm` with the casting of the class's program
    (style ``"llama"``: fp32 statistics, normalized value rounded to the input dtype, times the
    weight). Classes with another program run their own ``forward``."""

    has_backward = True         # pyllm.functional.rms_norm has its autograd (native backward kernel)
    can_torch_compile = False   # the per-class check reads source code: not claimed under torch.compile

    def forward(self, hidden_states):
        rec = _norms.hf_rms_style(type(self))  # cached per class
        if rec is not None:
            style, eps_attr = rec
            weight, eps = getattr(self, "weight", None), getattr(self, eps_attr, None)
            if (isinstance(weight, torch.Tensor) and weight.dim() == 1 and isinstance(eps, (int, float))
                    and not isinstance(eps, bool) and isinstance(hidden_states, torch.Tensor)):
                return _F.rms_norm(hidden_states, weight.shape, weight, float(eps), style=style)
        return type(self).forward(self, hidden_states)


class RMSNormZeroCentered(RMSNorm):
    """``forward`` for transformers' ``"RMSNormZeroCentered"`` layers (Qwen3.5: ``GemmaRMSNorm``'s
    program, ``x * rsqrt(mean(x^2) + eps) * (1 + weight)`` in fp32): style ``"gemma"``."""
