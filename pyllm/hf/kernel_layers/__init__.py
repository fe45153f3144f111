"""pyllm's layer package for Hugging Face's ``kernels`` library (``use_kernels=True``).

This directory is a kernel repository in the *local* layout of ``kernels`` (``metadata.json`` beside
``__init__.py``, loaded with ``kernels.LocalLayerRepository`` / ``get_local_kernel``): its ``layers``
submodule holds the ``nn.Module`` classes whose ``forward`` replaces the ``forward`` of the layers
that transformers marks as kernel-replaceable (``@use_kernel_forward_from_hub("RMSNorm")``, ...).
The code is pure Python; the work is done by :mod:`pyllm.functional` (the native CPU or CUDA kernels
of ``pyllm._C``, chosen per call by the tensors' device, or the reference). ``kernels`` imports this
file under the module name given by ``metadata.json``'s ``id``, so only relative imports of this
package are used here.

Use :func:`pyllm.hf.kernel_config` (see docs/HF.md, "Hugging Face kernel mapping").
"""
from . import layers  # noqa: F401  (kernels looks up ``<package>.layers.<LayerName>``)

# Attention, through transformers' attention-kernel protocol (``attn_implementation="<org>/<name>"``,
# transformers 5.23 ``integrations.hub_kernels.load_and_register_attn_kernel``): for a kernel module
# with ``flash_attn_forward`` and ``supports_flash_attn``, transformers registers ``flash_attn_forward``
# as an AttentionInterface function with the SDPA mask function, i.e. the calling convention of
# ``attn_implementation="pyllm"``. The name is transformers'; the function is pyllm's attention
# (pyllm.functional.scaled_dot_product_attention behind it). transformers only checks that
# ``supports_flash_attn`` exists. A local directory is reached only under a hub-style name
# (``LOCAL_KERNELS=<org>/<name>=<this directory>``): see docs/HF.md.
from pyllm.hf.attention import attention_forward as flash_attn_forward  # noqa: E402,F401

supports_flash_attn = True
