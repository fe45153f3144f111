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
"""
from __future__ import annotations

import inspect
import types

import torch

from .. import functional as PF

_ORIG = "_pyllm_padfree_forward"
SUPPORTED = ("BertModel", "RobertaModel", "XLMRobertaModel", "ElectraModel", "CamembertModel", "DistilBertModel")
_TOKEN_TYPES = "_pyllm_padfree_token_types"


def supports(module: torch.nn.Module) -> bool:
    return type(module).__name__ in SUPPORTED and not getattr(module.config, "is_decoder", False)


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
    if not plain or unsupported or kwargs.get("return_dict") is False:
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


def enable(module: torch.nn.Module) -> bool:
    """Makes a supported base model run padding-free (idempotent). Returns True if it did."""
    if not supports(module) or hasattr(module, _ORIG):
        return False
    setattr(module, _ORIG, module.forward)
    setattr(module, _TOKEN_TYPES, "token_type_ids" in inspect.signature(type(module).forward).parameters)
    module.forward = types.MethodType(_padfree_forward, module)
    return True


def disable(module: torch.nn.Module) -> None:
    if hasattr(module, _ORIG):
        del module.forward  # the instance attribute; the class's forward shows again
        delattr(module, _ORIG)
        delattr(module, _TOKEN_TYPES)


def is_enabled(module: torch.nn.Module) -> bool:
    return hasattr(module, _ORIG)
