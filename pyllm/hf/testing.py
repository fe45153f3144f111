"""Tiny random-weight transformers models of every supported family (no download), for tests,
benchmarks and examples: ``tiny_model("llama")``. Dropout is off so train-mode runs are deterministic;
weights use a larger init than the libraries' default (std 0.02) so attention is far from uniform
and a wrong mask changes the outputs."""
from __future__ import annotations

import torch

ARCHS = ("bert", "distilbert", "roberta", "gpt2", "t5", "bart", "llama", "mistral", "qwen2", "gemma")
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "gemma")
ENCODER_DECODERS = ("t5", "bart")
ENCODERS = ("bert", "distilbert", "roberta")


def tiny_config(arch: str, vocab_size: int = 512, hidden: int = 64, **overrides):
    import transformers as T

    h, ff, n = hidden, 2 * hidden, 2
    if arch == "bert":
        cfg = T.BertConfig(vocab_size=vocab_size, hidden_size=h, num_hidden_layers=n, num_attention_heads=4,
                           intermediate_size=ff, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           initializer_range=0.1, max_position_embeddings=512)
    elif arch == "distilbert":
        cfg = T.DistilBertConfig(vocab_size=vocab_size, dim=h, n_layers=n, n_heads=4, hidden_dim=ff, dropout=0.0,
                                 attention_dropout=0.0, seq_classif_dropout=0.0, qa_dropout=0.0,
                                 initializer_range=0.1, max_position_embeddings=512)
    elif arch == "roberta":
        cfg = T.RobertaConfig(vocab_size=vocab_size, hidden_size=h, num_hidden_layers=n, num_attention_heads=4,
                              intermediate_size=ff, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              initializer_range=0.1, max_position_embeddings=514, pad_token_id=1)
    elif arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=vocab_size, n_embd=h, n_layer=n, n_head=4, n_positions=512, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1, bos_token_id=vocab_size - 1,
                           eos_token_id=vocab_size - 1)
    elif arch == "t5":
        cfg = T.T5Config(vocab_size=vocab_size, d_model=h, d_kv=h // 4, d_ff=ff, num_layers=n, num_heads=4,
                         dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    elif arch == "bart":
        cfg = T.BartConfig(vocab_size=vocab_size, d_model=h, encoder_layers=n, decoder_layers=n,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=ff,
                           decoder_ffn_dim=ff, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                           init_std=0.1, max_position_embeddings=512, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    elif arch in ("llama", "mistral", "qwen2", "gemma"):
        kw = dict(vocab_size=vocab_size, hidden_size=h, intermediate_size=ff, num_hidden_layers=n,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, max_position_embeddings=512,
                  attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        if arch == "llama":
            cfg = T.LlamaConfig(**kw)
        elif arch == "mistral":
            cfg = T.MistralConfig(sliding_window=4, **kw)  # small, so the window matters
        elif arch == "qwen2":
            cfg = T.Qwen2Config(**kw)
        else:
            cfg = T.GemmaConfig(head_dim=h // 4, **kw)
    else:
        raise ValueError(f"pyllm: unknown tiny architecture {arch!r}; choose from {ARCHS}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


_HEADS = {
    "bert": "BertModel", "distilbert": "DistilBertModel", "roberta": "RobertaModel",
    "gpt2": "GPT2LMHeadModel", "t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration",
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
}


def tiny_model(arch: str, attn_implementation: str = "eager", seed: int = 0, model_class=None, **config_overrides):
    """A tiny random-weight model (eval mode); the same seed gives the same weights for every
    ``attn_implementation``."""
    import transformers as T

    cfg = tiny_config(arch, **config_overrides)
    cls = model_class or getattr(T, _HEADS[arch])
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn_implementation) if hasattr(cls, "_from_config") \
        else cls(cfg)
    if model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model.eval()
