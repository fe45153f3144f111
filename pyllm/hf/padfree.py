"""Padding-free execution of Hugging Face encoders (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, CamemBERT,
DistilBERT).

A padded batch ``[B, L]`` is packed once, at the start, into one sequence of the ``T`` real
tokens ``[1, T]`` (:func:`pyllm.functional.unpad_input`); every layer (embeddings, linear
layers, residual adds, LayerNorms, feed-forward) then runs on real tokens only, and attention
runs per sequence through :func:`pyllm.functional.varlen_attention`, reached through
transformers' own packed-sequence kwargs (``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/
``max_length_k``, as its padding-free data collator uses) and the ``"pyllm"`` attention function.
The output is re-padded to ``[B, L, hidden]``: ``last_hidden_state`` equals the stock model's on
real tokens and holds **zeros at pad positions** (stock models compute unused values there);
the pooler and task heads run on the re-padded output, so shapes and values on real tokens are
the stock ones. A model with a pooler given a batch whose position 0 is a pad in some row (left
padding) runs the stock padded path instead: the stock pooler reads that pad position.

Position ids and token type ids are computed as the stock model computes them for the padded
batch (absolute positions for BERT/ELECTRA, ``padding_idx``-based ones for RoBERTa/XLM-R) and
packed with the tokens, so outputs match the stock model for left and right padding alike.
The wrapper is an instance-level ``forward`` on the base model; :func:`disable` removes it.

**Decoders** (GPT-2, Llama, Mistral, Qwen2 base models): the *prefill* of a padded batch (a 2-D
attention mask with pads, an empty or no KV cache, inference) runs packed the same way, causal per
sequence. The KV cache is still filled in the stock padded layout ``[B, H, L, D]`` (zeros at pad
positions, which the attention mask hides from every later step): each layer's ``cache.update`` is
intercepted for that one call, its packed keys/values scattered to the padded layout and stored, and
the packed ones returned to the layer. Decoding steps (one new token per row, a non-empty cache) run
the stock path, so ``generate`` works unchanged and gives the same tokens. A model whose sliding
window is shorter than the batch's padded length runs its prefill on the stock path.

Under ``torch.compile``, ``torch.export`` and ``torch.onnx.export`` (``torch.compiler.is_compiling()``)
both run the stock padded path with pyllm attention and norms: packing is data-dependent, and a
traced graph with a shape per token count would recompile for every batch.
"""
from __future__ import annotations

import inspect
import types

import torch

from .. import functional as PF

_ORIG = "_pyllm_padfree_forward"
SUPPORTED = ("BertModel", "RobertaModel", "XLMRobertaModel", "ElectraModel", "CamembertModel", "DistilBertModel")
DECODERS = ("GPT2Model", "LlamaModel", "MistralModel", "Qwen2Model")
_TOKEN_TYPES = "_pyllm_padfree_token_types"


def supports(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    if name in DECODERS:
        return not getattr(module.config, "add_cross_attention", False)
    return name in SUPPORTED and not getattr(module.config, "is_decoder", False)


def _position_ids(model, input_ids, keep, seqlen):
    emb = model.embeddings
    padding_idx = getattr(emb, "padding_idx", None)
    if padding_idx is not None and hasattr(emb, "create_position_ids_from_input_ids"):
        if input_ids is not None:  # RoBERTa: padding_idx + 1 + index among the real tokens
            return emb.create_position_ids_from_input_ids(input_ids, padding_idx)
        # from embeddings: consecutive positions from padding_idx + 1, pads included (as stock)
        return (torch.arange(seqlen, device=keep.device) + padding_idx + 1).expand(keep.shape)
    return torch.arange(seqlen, device=keep.device).expand(keep.shape)


def _stock(self, orig, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, kwargs):
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    return orig(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                inputs_embeds=inputs_embeds, **kwargs)


def _padfree_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                     inputs_embeds=None, **kwargs):
    orig = getattr(self, _ORIG)
    plain = attention_mask is not None and attention_mask.dim() == 2
    unsupported = any(kwargs.get(k) for k in ("encoder_hidden_states", "past_key_values", "use_cache",
                                               "output_attentions", "output_hidden_states",
                                               "cu_seq_lens_q"))
    # torch.compile / torch.export / torch.onnx.export: packing is data-dependent (the token count
    # depends on the mask's values), so a traced graph runs the stock padded path (docs/HF.md)
    if not plain or unsupported or kwargs.get("return_dict") is False or torch.compiler.is_compiling():
        return _stock(self, orig, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, kwargs)
    ref = input_ids if input_ids is not None else inputs_embeds
    b, seqlen = ref.shape[0], ref.shape[1]
    keep = attention_mask.bool()
    if getattr(self, "pooler", None) is not None and not bool(keep[:, 0].all()):
        # The pooler reads position 0; where that is a pad (left padding) the stock model pools a
        # pad position's hidden state. Run the stock path so heads keep the stock values.
        return _stock(self, orig, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, kwargs)
    if position_ids is None:
        position_ids = _position_ids(self, input_ids, keep, seqlen)
    token_types = getattr(self, _TOKEN_TYPES)
    if token_type_ids is None and token_types:
        token_type_ids = torch.zeros(b, seqlen, dtype=torch.long, device=ref.device)
    lens = keep.sum(-1, dtype=torch.int32)
    idx = keep.flatten().nonzero().flatten()
    cu = torch.zeros(b + 1, dtype=torch.int32, device=ref.device)
    cu[1:] = lens.cumsum(0)
    mx = int(lens.max()) if b else 0

    def pack(t):
        return None if t is None else t.expand(b, seqlen, *t.shape[2:]).flatten(0, 1)[idx].unsqueeze(0)

    if token_types:
        kwargs["token_type_ids"] = pack(token_type_ids)
    out = orig(input_ids=pack(input_ids), attention_mask=None, position_ids=pack(position_ids),
               inputs_embeds=pack(inputs_embeds), cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=mx,
               max_length_k=mx, **kwargs)
    hidden = PF.pad_input(out.last_hidden_state[0], idx, b, seqlen)
    pooled = self.pooler(hidden) if getattr(self, "pooler", None) is not None else None
    fields = {"last_hidden_state": hidden}
    if "pooler_output" in out:
        fields["pooler_output"] = pooled
    return type(out)(**fields)


def _scatter_to_padded(t, idx, b, seqlen):
    """Packed ``[1, H, T, D]`` -> padded ``[B, H, L, D]`` with zeros at pad positions."""
    h, d = t.shape[1], t.shape[3]
    out = t.new_zeros((b * seqlen, h, d))
    out[idx] = t[0].transpose(0, 1)
    return out.view(b, seqlen, h, d).transpose(1, 2)


def _decoder_forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None,
                     inputs_embeds=None, use_cache=None, **kwargs):
    orig = getattr(self, _ORIG)
    stock = dict(input_ids=input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                 position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    ref = input_ids if input_ids is not None else inputs_embeds
    if (self.training or torch.compiler.is_compiling() or ref is None or attention_mask is None or attention_mask.dim() != 2
            or attention_mask.shape != ref.shape[:2] or kwargs.get("output_attentions")
            or kwargs.get("output_hidden_states") or kwargs.get("cu_seq_lens_q") is not None
            or kwargs.get("return_dict") is False or (past_key_values is not None and past_key_values.get_seq_length() > 0)):
        return orig(**stock)
    keep = attention_mask.bool()
    b, seqlen = keep.shape
    window = getattr(self.config, "sliding_window", None)
    if bool(keep.all()) or (isinstance(window, int) and 0 < window < seqlen):
        return orig(**stock)  # nothing to remove, or a window the packed call would not apply
    from transformers import DynamicCache

    use_cache = self.config.use_cache if use_cache is None else use_cache
    cache = past_key_values if past_key_values is not None else DynamicCache(config=self.config)
    if position_ids is None:  # as the stock model: consecutive positions from 0, pads included
        position_ids = torch.arange(seqlen, device=ref.device)
    position_ids = position_ids.expand(b, seqlen)
    lens = keep.sum(-1, dtype=torch.int32)
    idx = keep.flatten().nonzero().flatten()
    cu = torch.zeros(b + 1, dtype=torch.int32, device=ref.device)
    cu[1:] = lens.cumsum(0)
    mx = int(lens.max())

    def pack(t):
        return None if t is None else t.flatten(0, 1)[idx].unsqueeze(0)

    def packed_update(cache_self, key_states, value_states, layer_idx, *args, **kw):
        type(cache_self).update(cache_self, _scatter_to_padded(key_states, idx, b, seqlen),
                                _scatter_to_padded(value_states, idx, b, seqlen), layer_idx, *args, **kw)
        return key_states, value_states  # the (empty-cache) prefill attends to its own keys only

    cache.update = types.MethodType(packed_update, cache)
    try:
        out = orig(input_ids=pack(input_ids), past_key_values=cache, attention_mask=None,
                   position_ids=pack(position_ids), inputs_embeds=pack(inputs_embeds), use_cache=True,
                   cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=mx, max_length_k=mx, **kwargs)
    finally:
        del cache.update  # the instance attribute; the class's update shows again
    hidden = PF.pad_input(out.last_hidden_state[0], idx, b, seqlen)
    return type(out)(last_hidden_state=hidden, past_key_values=cache if use_cache else None)


def enable(module: torch.nn.Module) -> bool:
    """Makes a supported base model run padding-free (idempotent). Returns True if it did."""
    if not supports(module) or hasattr(module, _ORIG):
        return False
    setattr(module, _ORIG, module.forward)
    setattr(module, _TOKEN_TYPES, "token_type_ids" in inspect.signature(type(module).forward).parameters)
    fwd = _decoder_forward if type(module).__name__ in DECODERS else _padfree_forward
    module.forward = types.MethodType(fwd, module)
    return True


def disable(module: torch.nn.Module) -> None:
    if hasattr(module, _ORIG):
        del module.forward  # the instance attribute; the class's forward shows again
        delattr(module, _ORIG)
        delattr(module, _TOKEN_TYPES)


def is_enabled(module: torch.nn.Module) -> bool:
    return hasattr(module, _ORIG)
