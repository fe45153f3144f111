"""Complete models: encoder, decoder, decoder-only LM, encoder-decoder, with generation."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

from .. import functional as PF
from ..nn import LayerNorm
from .layers import (DecoderLayer, EncoderLayer, PositionalEncoding, _check_dropout, _check_heads,
                     _check_positive_int, merge_masks, normalize_mask)

__all__ = ["TransformerEncoder", "TransformerDecoder", "DecoderOnlyTransformer", "Transformer"]


def _check_common(vocab_size, d_model, num_layers, num_heads, d_ff, dropout, max_len, pad_token_id):
    _check_positive_int(vocab_size, "vocab_size")
    _check_heads(d_model, num_heads)
    _check_positive_int(num_layers, "num_layers")
    _check_positive_int(d_ff, "d_ff")
    _check_dropout(dropout)
    _check_positive_int(max_len, "max_sequence_length")
    if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)
                                     or not 0 <= pad_token_id < vocab_size):
        raise ValueError(f"pyllm: pad_token_id must be None or an int in [0, vocab_size={vocab_size}), "
                         f"got {pad_token_id!r}")


def _check_ids(ids, name: str, vocab_size: int) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"pyllm: {name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"pyllm: {name} must be an int64/int32 tensor of shape [B, L], got "
                         f"{ids.dtype} {list(ids.shape)}")


def _key_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, Lk]`` (1/True = real token) -> bool ``[B, 1, 1, Lk]`` for SDPA."""
    return attention_mask.bool()[:, None, None, :]


def _positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting only real tokens (left padding starts at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _Embed(nn.Module):
    """Token embedding + sinusoidal positions (+ dropout). With ``scale`` the embeddings are
    multiplied by sqrt(d_model) (the paper's choice when the embedding is tied to the LM head)."""

    def __init__(self, vocab_size, d_model, max_len, dropout, scale: bool):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.positional_encoding = PositionalEncoding(d_model, max_len)
        self.dropout = nn.Dropout(dropout)
        self.scale = math.sqrt(d_model) if scale else 1.0
        if scale:
            nn.init.normal_(self.embedding.weight, std=d_model ** -0.5)

    def forward(self, ids, positions=None, offset=0):
        x = self.embedding(ids)
        if self.scale != 1.0:
            x = x * self.scale
        return self.dropout(self.positional_encoding(x, positions, offset))


# =========================================================================== encoder
class TransformerEncoder(nn.Module):
    """Embedding + positional encoding + ``num_layers`` :class:`EncoderLayer` s.

    ``forward(x, src_mask=None)`` maps token ids ``[B, L]`` to hidden states ``[B, L, d_model]``.
    Without ``src_mask``, a padding mask is built from ``pad_token_id`` (if given).
    ``norm_first=True``: pre-norm layers and a final LayerNorm.
    """

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int, d_ff: int,
                 dropout: float = 0.1, max_sequence_length: int = 512, *, pad_token_id: Optional[int] = None,
                 norm_first: bool = False):
        super().__init__()
        _check_common(vocab_size, d_model, num_layers, num_heads, d_ff, dropout, max_sequence_length,
                      pad_token_id)
        self.vocab_size, self.d_model, self.pad_token_id = vocab_size, d_model, pad_token_id
        self.max_sequence_length = max_sequence_length
        self.embed = _Embed(vocab_size, d_model, max_sequence_length, dropout, scale=False)
        self.layers = nn.ModuleList(EncoderLayer(d_model, num_heads, d_ff, dropout, norm_first=norm_first)
                                    for _ in range(num_layers))
        self.final_norm = LayerNorm(d_model) if norm_first else None

    # course names
    @property
    def embedding(self):
        return self.embed.embedding

    @property
    def positional_encoding(self):
        return self.embed.positional_encoding

    def padding_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """bool ``[B, 1, 1, L]`` (True = real token) from ``pad_token_id``, or None."""
        return None if self.pad_token_id is None else _key_padding(x != self.pad_token_id)

    def forward(self, x: torch.Tensor, src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_ids(x, "x", self.vocab_size)
        mask = normalize_mask(src_mask, "src_mask") if src_mask is not None else self.padding_mask(x)
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, mask)
        return self.final_norm(h) if self.final_norm is not None else h


# =========================================================================== generation
def _check_generate_args(max_new_tokens, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"pyllm: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"pyllm: temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"pyllm: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"pyllm: top_p must be None or a number in (0, 1], got {top_p!r}")


def next_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token from ``logits`` ``[B, V]``: argmax (greedy) or a sample from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens and to the
    smallest set whose probability reaches ``top_p`` (nucleus). The filtered softmax is one
    :func:`pyllm.functional.masked_softmax` call (keep-mask + temperature as its scale)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float()
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        keep &= logits >= kth
    if top_p is not None and top_p < 1.0:
        probs = PF.masked_softmax(logits, keep, scale=1.0 / temperature)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p          # mass of the strictly more likely tokens
        keep_sorted = before < top_p                     # always keeps the most likely token
        keep &= torch.zeros_like(keep).scatter(-1, order, keep_sorted)
    probs = PF.masked_softmax(logits, keep, scale=1.0 / temperature)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Generation:
    """Shared loop: ``step(ids_so_far, new_ids, cache) -> (logits of last position, cache)``."""

    @staticmethod
    def _loop(step, ids, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, fill_id,
              generator):
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        cache = None
        new = ids
        for _ in range(max_new_tokens):
            logits, cache = step(ids, new, cache)
            tok = next_token(logits, do_sample, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                tok = torch.where(finished, torch.full_like(tok, fill_id), tok)
                finished |= tok == eos_token_id
            new = tok[:, None]
            ids = torch.cat([ids, new], dim=1)
            if eos_token_id is not None and bool(finished.all()):
                break
        return ids


# =========================================================================== decoder-only
class _DecoderStack(nn.Module):
    """Embedding + positions, ``num_layers`` :class:`DecoderLayer` s, optional final norm and the
    LM head ``fc`` (optionally tied): shared by :class:`DecoderOnlyTransformer` (self-attention
    only) and :class:`TransformerDecoder` (with cross-attention)."""

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int, d_ff: int,
                 dropout: float, max_sequence_length: int, *, pad_token_id: Optional[int],
                 norm_first: bool, tie_weights: bool, cross_attention: bool):
        super().__init__()
        _check_common(vocab_size, d_model, num_layers, num_heads, d_ff, dropout, max_sequence_length,
                      pad_token_id)
        self.vocab_size, self.d_model, self.pad_token_id = vocab_size, d_model, pad_token_id
        self.max_sequence_length = max_sequence_length
        self.embed = _Embed(vocab_size, d_model, max_sequence_length, dropout, scale=tie_weights)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, num_heads, d_ff, dropout, cross_attention=cross_attention, norm_first=norm_first)
            for _ in range(num_layers))
        self.final_norm = LayerNorm(d_model) if norm_first else None
        self.fc = nn.Linear(d_model, vocab_size)
        if tie_weights:
            self.fc.weight = self.embed.embedding.weight

    @property
    def embedding(self):
        return self.embed.embedding

    @property
    def positional_encoding(self):
        return self.embed.positional_encoding


class DecoderOnlyTransformer(_DecoderStack, _Generation):
    """GPT-style language model: embedding + positions, ``num_layers`` causal self-attention
    blocks (:class:`DecoderLayer` without cross-attention), LM head ``fc`` -> logits ``[B, L, V]``.

    ``forward(x, tgt_mask=None)``: without ``tgt_mask`` the model is causal by itself (SDPA's
    ``is_causal``; no ``[L, L]`` mask is built) and masks padding keys when ``pad_token_id`` is
    set. ``tie_weights=True`` shares the embedding matrix with the LM head (and scales the
    embeddings by sqrt(d_model), as the original paper). ``norm_first=True``: pre-norm blocks and
    a final LayerNorm (GPT-2 layout).
    """

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int, d_ff: int,
                 dropout: float = 0.1, max_sequence_length: int = 512, *, pad_token_id: Optional[int] = None,
                 norm_first: bool = False, tie_weights: bool = False):
        super().__init__(vocab_size, d_model, num_layers, num_heads, d_ff, dropout, max_sequence_length,
                         pad_token_id=pad_token_id, norm_first=norm_first, tie_weights=tie_weights,
                         cross_attention=False)

    def forward(self, x: torch.Tensor, tgt_mask: Optional[torch.Tensor] = None, *,
                attention_mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                past_key_values: Optional[List] = None, use_cache: bool = False):
        """Logits ``[B, L, vocab_size]`` (and the new cache with ``use_cache=True``).

        ``attention_mask`` ``[B, Lk]`` (1 = real token, Lk = cached + new tokens) masks padding
        keys; by default it comes from ``pad_token_id`` (without a cache). Positions count real
        tokens only, so left-padded prompts start at position 0. ``tgt_mask`` (course style, e.g.
        ``torch.tril(torch.ones(L, L)).bool()``) replaces the built-in causal masking.
        """
        _check_ids(x, "x", self.vocab_size)
        offset = 0 if past_key_values is None else past_key_values[0][0][0].shape[2]
        if attention_mask is None and self.pad_token_id is not None and past_key_values is None:
            attention_mask = x != self.pad_token_id
        if attention_mask is not None and attention_mask.shape != (x.shape[0], offset + x.shape[1]):
            raise ValueError(f"pyllm: attention_mask must have shape [B, cached + new] = "
                             f"{[x.shape[0], offset + x.shape[1]]}, got {list(attention_mask.shape)}")
        if positions is None and attention_mask is not None:
            positions = _positions_from_mask(attention_mask)[:, offset:]
        mask = _key_padding(attention_mask) if attention_mask is not None else None
        is_causal = tgt_mask is None
        if tgt_mask is not None:
            mask = merge_masks(normalize_mask(tgt_mask, "tgt_mask"), mask)
        h = self.embed(x, positions, offset)
        new_cache = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            h, layer_cache = layer(h, None, mask, None, is_causal=is_causal, past_kv=past, use_cache=True)
            new_cache.append(layer_cache)
        if self.final_norm is not None:
            h = self.final_norm(h)
        logits = self.fc(h)
        return (logits, new_cache) if use_cache else logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, *, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Append up to ``max_new_tokens`` tokens to ``input_ids`` ``[B, L]``; returns ``[B, L + n]``.

        With ``use_cache`` (default) the prompt is run once and each step feeds one token
        (query length 1 over the cached keys/values); ``use_cache=False`` reruns the whole
        sequence each step (same tokens, slower). Rows that produced ``eos_token_id`` are filled
        with ``pad_token_id`` (or eos); generation stops when every row has finished. Prompts of
        different lengths: left-pad them with ``pad_token_id``.
        """
        _check_ids(input_ids, "input_ids", self.vocab_size)
        _check_generate_args(max_new_tokens, temperature, top_k, top_p)
        if input_ids.shape[1] + max_new_tokens > self.max_sequence_length:
            raise ValueError(f"pyllm: prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} "
                             f"exceeds max_sequence_length {self.max_sequence_length}")
        was_training = self.training
        self.eval()
        prompt_mask = (input_ids != self.pad_token_id) if self.pad_token_id is not None else None

        def full_mask(n_total):
            if prompt_mask is None:
                return None
            extra = torch.ones(prompt_mask.shape[0], n_total - prompt_mask.shape[1], dtype=torch.bool,
                               device=prompt_mask.device)
            return torch.cat([prompt_mask, extra], dim=1)

        def step(ids, new, cache):
            am = full_mask(ids.shape[1])
            if not use_cache:
                return self(ids, attention_mask=am)[:, -1], None
            logits, cache = self(new, attention_mask=am, past_key_values=cache, use_cache=True)
            return logits[:, -1], cache

        fill = self.pad_token_id if self.pad_token_id is not None else eos_token_id
        try:
            return self._loop(step, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p,
                              eos_token_id, fill, generator)
        finally:
            self.train(was_training)


# =========================================================================== encoder-decoder
class TransformerDecoder(_DecoderStack):
    """Decoder of the encoder-decoder: embedding + positions, ``num_layers`` :class:`DecoderLayer` s
    (causal self-attention, cross-attention over the encoder output ``y``), LM head ``fc``.

    ``forward(x, y, tgt_mask=None, cross_mask=None)`` -> logits ``[B, Lt, vocab_size]``.
    """

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int, d_ff: int,
                 dropout: float = 0.1, max_sequence_length: int = 512, *, pad_token_id: Optional[int] = None,
                 norm_first: bool = False, tie_weights: bool = False):
        super().__init__(vocab_size, d_model, num_layers, num_heads, d_ff, dropout, max_sequence_length,
                         pad_token_id=pad_token_id, norm_first=norm_first, tie_weights=tie_weights,
                         cross_attention=True)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor], tgt_mask: Optional[torch.Tensor] = None,
                cross_mask: Optional[torch.Tensor] = None, *, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[List] = None, use_cache: bool = False):
        """``y``: encoder output ``[B, Ls, d_model]`` (may be None once the cache holds the
        cross-attention keys/values). Target padding (``attention_mask`` ``[B, cached + new]``,
        by default from ``pad_token_id`` without a cache) is masked in addition to causality;
        a given ``tgt_mask`` replaces the causal masking."""
        _check_ids(x, "x", self.vocab_size)
        offset = 0 if past_key_values is None else past_key_values[0][0][0].shape[2]
        if attention_mask is None and self.pad_token_id is not None and past_key_values is None:
            attention_mask = x != self.pad_token_id
        if attention_mask is not None and attention_mask.shape != (x.shape[0], offset + x.shape[1]):
            raise ValueError(f"pyllm: attention_mask must have shape [B, cached + new] = "
                             f"{[x.shape[0], offset + x.shape[1]]}, got {list(attention_mask.shape)}")
        mask = _key_padding(attention_mask) if attention_mask is not None else None
        is_causal = tgt_mask is None
        if tgt_mask is not None:
            mask = merge_masks(normalize_mask(tgt_mask, "tgt_mask"), mask)
        cross_mask = normalize_mask(cross_mask, "cross_mask")
        h = self.embed(x, None, offset)
        new_cache = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            h, layer_cache = layer(h, y, mask, cross_mask, is_causal=is_causal, past_kv=past, use_cache=True)
            new_cache.append(layer_cache)
        if self.final_norm is not None:
            h = self.final_norm(h)
        logits = self.fc(h)
        return (logits, new_cache) if use_cache else logits


class Transformer(nn.Module, _Generation):
    """Encoder-decoder transformer (the course's argument order) over one shared vocabulary.

    ``forward(src, tgt, src_mask=None, tgt_mask=None)`` -> logits ``[B, Lt, vocab_size]``:
    the encoder reads ``src``, the decoder predicts ``tgt`` shifted by one (teacher forcing).
    Padding masks come from ``pad_token_id``; the decoder is causal by itself.
    ``tie_weights=True`` shares one embedding matrix between encoder, decoder and LM head.
    """

    def __init__(self, vocab_size: int, d_model: int, num_heads: int, num_layers: int, d_ff: int,
                 max_seq_len: int, dropout: float = 0.1, *, pad_token_id: Optional[int] = None,
                 norm_first: bool = False, tie_weights: bool = False):
        super().__init__()
        self.pad_token_id, self.vocab_size = pad_token_id, vocab_size
        self.encoder = TransformerEncoder(vocab_size, d_model, num_layers, num_heads, d_ff, dropout, max_seq_len,
                                          pad_token_id=pad_token_id, norm_first=norm_first)
        self.decoder = TransformerDecoder(vocab_size, d_model, num_layers, num_heads, d_ff, dropout, max_seq_len,
                                          pad_token_id=pad_token_id, norm_first=norm_first, tie_weights=tie_weights)
        if tie_weights:
            self.encoder.embed.embedding.weight = self.decoder.embed.embedding.weight
            self.encoder.embed.scale = self.decoder.embed.scale

    def _cross_mask(self, src, src_mask):
        if src_mask is not None:
            m = normalize_mask(src_mask, "src_mask")
            return m if m.shape[-2] == 1 else None  # a key-only (padding) mask also applies to cross-attention
        return self.encoder.padding_mask(src)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                tgt_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        memory = self.encoder(src, src_mask)
        return self.decoder(tgt, memory, tgt_mask, self._cross_mask(src, src_mask))

    @torch.no_grad()
    def generate(self, src_ids: torch.Tensor, max_new_tokens: int, bos_token_id: int,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id: Optional[int] = None, *, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Encode ``src_ids`` once, then decode from ``bos_token_id``; returns ``[B, 1 + n]``
        (starting with bos). With the cache, each step runs one token through the decoder and
        the cross-attention keys/values are computed once."""
        _check_ids(src_ids, "src_ids", self.vocab_size)
        _check_generate_args(max_new_tokens, temperature, top_k, top_p)
        if 1 + max_new_tokens > self.decoder.max_sequence_length:
            raise ValueError(f"pyllm: 1 + max_new_tokens ({1 + max_new_tokens}) exceeds max_seq_len "
                             f"{self.decoder.max_sequence_length}")
        was_training = self.training
        self.eval()
        try:
            memory = self.encoder(src_ids)
            cross = self._cross_mask(src_ids, None)
            start = torch.full((src_ids.shape[0], 1), int(bos_token_id), dtype=src_ids.dtype, device=src_ids.device)

            def step(ids, new, cache):
                if not use_cache:  # generated tokens are never padding, even if one equals pad_token_id
                    am = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
                    return self.decoder(ids, memory, None, cross, attention_mask=am)[:, -1], None
                logits, cache = self.decoder(new, memory, None, cross, past_key_values=cache, use_cache=True)
                return logits[:, -1], cache

            fill = self.pad_token_id if self.pad_token_id is not None else eos_token_id
            return self._loop(step, start, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                              fill, generator)
        finally:
            self.train(was_training)
