"""pyllm.models: the course's transformer classes on pyllm's fused ops.

Accuracy rule (tests/helpers.py): error against an fp64 run of the same weights must be
<= 3x plain PyTorch's own fp32 error, with a 1e-5 model-level floor.
"""
from __future__ import annotations

import copy
import json
import math
import struct
import types
import zlib

import pytest
import torch
import torch.nn.functional as F

import pyllm
from helpers import assert_close_to_ref
from pyllm.models import (ClassifierHead, DecoderLayer, DecoderOnlyTransformer, EncoderLayer,
                          FeedForwardSubLayer, MultiHeadAttention, PositionalEncoding, Transformer,
                          TransformerDecoder, TransformerEncoder, order_task)

MODEL_FLOOR = 1e-5
D, H, FF = 32, 4, 64


def _keep_mask(lengths, total):
    """bool [B, total], True on the first `length` positions of each row."""
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


# ----------------------------------------------------------------------------- vs torch.nn
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch(norm_first):
    ref_layer = torch.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True,
                                                 norm_first=norm_first).eval()
    layer = EncoderLayer.from_torch(ref_layer).eval()
    assert layer.norm_first == norm_first
    x = torch.randn(3, 7, D)
    keep = _keep_mask([7, 4, 1], 7)  # pyllm: True = attend; torch: True = ignore
    with torch.no_grad():
        ours = layer(x, keep[:, None, None, :])
        theirs = ref_layer(x, src_key_padding_mask=~keep)
        ref64 = copy.deepcopy(ref_layer).double()(x.double(), src_key_padding_mask=~keep)
    assert_close_to_ref(ours, ref64, theirs, mult=3.0, floor=MODEL_FLOOR, name="EncoderLayer")
    # same layer, causal instead of padding
    with torch.no_grad():
        causal = torch.nn.Transformer.generate_square_subsequent_mask(7)
        ours = layer(x, is_causal=True)
        theirs = ref_layer(x, src_mask=causal, is_causal=True)
        ref64 = copy.deepcopy(ref_layer).double()(x.double(), src_mask=causal.double(), is_causal=True)
    assert_close_to_ref(ours, ref64, theirs, mult=3.0, floor=MODEL_FLOOR, name="EncoderLayer causal")


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first):
    ref_layer = torch.nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, batch_first=True,
                                                 norm_first=norm_first).eval()
    layer = DecoderLayer.from_torch(ref_layer).eval()
    x, y = torch.randn(3, 6, D), torch.randn(3, 9, D)
    src_keep = _keep_mask([9, 5, 2], 9)
    tgt_keep = _keep_mask([6, 6, 3], 6)
    causal = ~torch.tril(torch.ones(6, 6, dtype=torch.bool))  # torch: True = ignore (above the diagonal)

    def torch_run(m, xx, yy):
        return m(xx, yy, tgt_mask=causal, tgt_key_padding_mask=~tgt_keep,
                 memory_key_padding_mask=~src_keep, tgt_is_causal=True)

    with torch.no_grad():
        # causal by itself (no mask tensor) + target padding on top, source padding for cross-attention
        ours = layer(x, y, tgt_keep[:, None, None, :], src_keep[:, None, None, :], is_causal=True)
        theirs = torch_run(ref_layer, x, y)
        ref64 = torch_run(copy.deepcopy(ref_layer).double(), x.double(), y.double())
    assert_close_to_ref(ours, ref64, theirs, mult=3.0, floor=MODEL_FLOOR, name="DecoderLayer")
    # course style: an explicit bool causal mask (True = attend) gives the same result
    with torch.no_grad():
        tril = torch.tril(torch.ones(6, 6, dtype=torch.bool))
        explicit = layer(x, y, tril[None, None] & tgt_keep[:, None, None, :], src_keep[:, None, None, :])
    torch.testing.assert_close(explicit, ours, rtol=0, atol=2e-6)


def test_mask_forms_agree():
    """None (is_causal), bool tril, additive -inf tril and a broadcast [1, 1, L, L] mask agree;
    a course-style float 0/1 mask is rejected with a clear message."""
    mha = MultiHeadAttention(D, H).eval()
    x = torch.randn(2, 5, D)
    tril = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    additive = torch.zeros(5, 5).masked_fill(~tril, float("-inf"))
    with torch.no_grad():
        base = mha(x, x, x, is_causal=True)
        for m in (tril, additive, tril[None, None].expand(2, 1, 5, 5), tril[None].expand(2, 5, 5)):
            torch.testing.assert_close(mha(x, x, x, m), base, rtol=0, atol=2e-6)
        with pytest.raises(ValueError, match=r"0s and 1s.*bool"):
            mha(x, x, x, tril.float())


def test_positional_encoding_formula():
    pe = PositionalEncoding(7, 11)  # odd d_model
    assert "pe" in dict(pe.named_buffers()) and "pe" in pe.state_dict()
    assert not any(True for _ in pe.parameters())
    assert pe.pe.shape == (1, 11, 7)
    for pos in (0, 3, 10):
        for i in range(7):
            angle = pos / 10000 ** ((i - i % 2) / 7)
            expect = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert abs(pe.pe[0, pos, i].item() - expect) < 1e-6
    x = torch.zeros(2, 4, 7)
    torch.testing.assert_close(pe(x, offset=3), pe.pe[:, 3:7].expand(2, 4, 7))
    with pytest.raises(ValueError, match="max_seq_length 11"):
        pe(torch.zeros(1, 12, 7))


def test_feed_forward_shapes():
    ff = FeedForwardSubLayer(D, FF)
    assert ff.fc1.weight.shape == (FF, D) and ff.fc2.weight.shape == (D, FF)
    x = torch.randn(2, 3, D)
    torch.testing.assert_close(ff(x), ff.fc2(torch.relu(ff.fc1(x))))


# ----------------------------------------------------------------------------- backends
def _models():
    torch.manual_seed(0)
    return {
        "decoder_only": DecoderOnlyTransformer(40, D, 2, H, FF, 0.0, 32, pad_token_id=0),
        "decoder_only_prenorm_tied": DecoderOnlyTransformer(40, D, 2, H, FF, 0.0, 32, norm_first=True,
                                                            tie_weights=True),
        "encoder_decoder": Transformer(40, D, H, 2, FF, 32, 0.0, pad_token_id=0),
    }


def _run(name, model, src, tgt):
    if name == "encoder_decoder":
        return model(src, tgt)
    return model(tgt)


@pytest.mark.parametrize("name", ["decoder_only", "decoder_only_prenorm_tied", "encoder_decoder"])
def test_models_agree_across_backends(name):
    model = _models()[name].eval()
    src = torch.randint(1, 40, (3, 11))
    src[1, 7:] = 0   # padding
    tgt = torch.randint(1, 40, (3, 9))
    tgt[2, 5:] = 0
    with torch.no_grad():
        with pyllm.use_backend("torch"):
            out_torch = _run(name, model, src, tgt)
            ref64 = _run(name, copy.deepcopy(model).double(), src, tgt)
        out_default = _run(name, model, src, tgt)
    assert torch.isfinite(out_default).all()
    assert_close_to_ref(out_default, ref64, out_torch, mult=3.0, floor=MODEL_FLOOR, name=f"{name} default backend")
    assert_close_to_ref(out_torch, ref64, None, floor=MODEL_FLOOR * 10, name=f"{name} torch backend")


def test_training_steps_agree_across_backends():
    """Five seeded AdamW steps on both backends: same losses (to fp32 accuracy), and the loss falls."""
    torch.manual_seed(0)
    init = DecoderOnlyTransformer(30, D, 2, H, FF, 0.0, 24, norm_first=False)
    data = torch.randint(0, 30, (4, 17))
    curves = {}
    for backend in ("torch", pyllm.current_backend()):
        model = copy.deepcopy(init)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        with pyllm.use_backend(backend):
            for _ in range(5):
                logits = model(data[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, 30), data[:, 1:].reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        curves[backend] = losses
    a, b = curves["torch"], curves[pyllm.current_backend()]
    assert a[-1] < a[0] - 0.1, f"loss did not fall: {a}"
    for la, lb in zip(a, b):
        assert abs(la - lb) <= 1e-4 * max(1.0, abs(la)), f"losses differ across backends: {a} vs {b}"


def test_classifier_gradients_agree_across_backends():
    torch.manual_seed(0)
    enc = TransformerEncoder(14, D, 2, H, FF, 0.0, 17, pad_token_id=0)
    head = ClassifierHead(D, 2, pooling="mean")
    x, y = order_task(8, seed=3)
    grads = {}
    for backend in ("torch", pyllm.current_backend()):
        with pyllm.use_backend(backend):
            enc.zero_grad()
            head.zero_grad()
            F.cross_entropy(head(enc(x), x != 0), y).backward()
        grads[backend] = [p.grad.clone() for p in list(enc.parameters()) + list(head.parameters())]
    for ga, gb in zip(grads["torch"], grads[pyllm.current_backend()]):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_generation_equals_uncached(norm_first):
    torch.manual_seed(1)
    model = DecoderOnlyTransformer(50, D, 2, H, FF, 0.1, 64, norm_first=norm_first).eval()
    prompt = torch.randint(0, 50, (3, 5))
    cached = model.generate(prompt, 30)
    uncached = model.generate(prompt, 30, use_cache=False)
    assert cached.shape == (3, 35)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)
    # the uncached greedy decode by hand: argmax of the full forward, token by token
    ids = prompt
    with torch.no_grad():
        for _ in range(30):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)
    # cached logits match the full forward (not only the argmax)
    with torch.no_grad():
        logits, cache = model(cached[:, :-1][:, :20], use_cache=True)
        step, _ = model(cached[:, 20:21], past_key_values=cache, use_cache=True)
        full = model(cached[:, :21])
    torch.testing.assert_close(step[:, 0], full[:, 20], rtol=1e-5, atol=1e-5)
    # sampling: the same generator seed gives the same tokens with and without the cache
    kw = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9)
    s1 = model.generate(prompt, 20, generator=torch.Generator().manual_seed(5), **kw)
    s2 = model.generate(prompt, 20, use_cache=False, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(s1, s2)
    assert model.training is False


def test_left_padded_batch_generation_matches_single_prompts():
    torch.manual_seed(2)
    model = DecoderOnlyTransformer(30, D, 2, H, FF, 0.0, 40, pad_token_id=0).eval()
    p1, p2 = torch.randint(1, 30, (1, 6)), torch.randint(1, 30, (1, 3))
    batch = torch.cat([p1, torch.cat([torch.zeros(1, 3, dtype=torch.long), p2], 1)])
    out = model.generate(batch, 12)
    assert torch.equal(out, model.generate(batch, 12, use_cache=False))
    assert torch.equal(out[0, 6:], model.generate(p1, 12)[0, 6:])
    assert torch.equal(out[1, 6:], model.generate(p2, 12)[0, 3:])


def test_eos_stops_and_fills():
    torch.manual_seed(3)
    model = DecoderOnlyTransformer(20, D, 1, H, FF, 0.0, 40).eval()
    prompt = torch.randint(0, 20, (4, 3))
    free = model.generate(prompt, 15)
    eos = int(free[0, 5])  # a token row 0 produces at step 3
    out = model.generate(prompt, 15, eos_token_id=eos)
    for row_free, row in zip(free, out):
        gen = row_free[3:].tolist()
        stop = gen.index(eos) if eos in gen else None
        if stop is None:
            assert row[3:].tolist() == gen[: row.shape[0] - 3]
        else:
            assert row[3: 4 + stop].tolist() == gen[: stop + 1]
            assert (row[4 + stop:] == eos).all()
    assert out.shape[1] <= free.shape[1]


def test_encoder_decoder_cached_generation_equals_uncached():
    torch.manual_seed(4)
    model = Transformer(40, D, H, 2, FF, 32, 0.1, pad_token_id=0).eval()
    src = torch.randint(1, 40, (3, 10))
    src[0, 6:] = 0
    cached = model.generate(src, 20, bos_token_id=1)
    assert cached.shape == (3, 21) and (cached[:, 0] == 1).all()
    assert torch.equal(cached, model.generate(src, 20, bos_token_id=1, use_cache=False))
    with torch.no_grad():  # and equals teacher-forced argmax decoding with the full forward
        ids = torch.ones(3, 1, dtype=torch.long)
        for _ in range(20):
            logits = model.decoder(ids, model.encoder(src), None, model.encoder.padding_mask(src),
                                   attention_mask=torch.ones_like(ids, dtype=torch.bool))
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, ids)


def test_generation_needs_room():
    model = DecoderOnlyTransformer(20, D, 1, H, FF, 0.0, 16)
    with pytest.raises(ValueError, match="max_sequence_length 16"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, do_sample=True, top_p=0.0)


# ----------------------------------------------------------------------------- misc API
def test_weight_tying_shares_the_parameter():
    model = DecoderOnlyTransformer(50, D, 1, H, FF, 0.0, 16, tie_weights=True)
    assert model.fc.weight is model.embedding.weight
    n_untied = sum(p.numel() for p in DecoderOnlyTransformer(50, D, 1, H, FF, 0.0, 16).parameters())
    assert sum(p.numel() for p in model.parameters()) == n_untied - 50 * D
    model(torch.randint(0, 50, (2, 5))).sum().backward()
    assert model.embedding.weight.grad is not None
    t = Transformer(50, D, H, 1, FF, 16, 0.0, tie_weights=True)
    assert t.encoder.embedding.weight is t.decoder.embedding.weight is t.decoder.fc.weight


def test_prenorm_models_train_and_differ_from_postnorm():
    torch.manual_seed(0)
    post = DecoderOnlyTransformer(30, D, 2, H, FF, 0.0, 16)
    pre = DecoderOnlyTransformer(30, D, 2, H, FF, 0.0, 16, norm_first=True)
    assert pre.final_norm is not None and post.final_norm is None
    pre.load_state_dict({k: v for k, v in post.state_dict().items()}, strict=False)
    x = torch.randint(0, 30, (2, 9))
    assert not torch.allclose(pre(x), post(x))
    enc = TransformerEncoder(30, D, 2, H, FF, 0.0, 16, norm_first=True)
    assert enc(x).shape == (2, 9, D)


def test_classifier_head_pooling():
    x = torch.randn(2, 4, D)
    head = ClassifierHead(D, 3)
    torch.testing.assert_close(head(x), head.fc(x[:, 0]))
    mean = ClassifierHead(D, 3, pooling="mean")
    keep = _keep_mask([4, 2], 4)
    torch.testing.assert_close(mean(x, keep[:, None, None, :])[1], mean.fc(x[1, :2].mean(0)))


@pytest.mark.parametrize("make, pattern", [
    (lambda: MultiHeadAttention(30, 4), r"d_model \(30\) must be divisible by num_heads \(4\)"),
    (lambda: EncoderLayer(30, 4, 64, 0.1), r"divisible by num_heads"),
    (lambda: DecoderOnlyTransformer(100, 30, 2, 4, 64, 0.1, 32), r"divisible by num_heads"),
    (lambda: Transformer(100, 64, 0, 2, 128, 32, 0.1), r"num_heads must be a positive int"),
    (lambda: TransformerEncoder(100, 64, 2, 4, 128, 1.5, 32), r"dropout must be a number in \[0, 1\)"),
    (lambda: TransformerDecoder(100, 64, 2, 4, 128, 0.1, 0), r"max_sequence_length must be a positive int"),
    (lambda: DecoderOnlyTransformer(100, 64, 2, 4, 128, 0.1, 32, pad_token_id=100), r"pad_token_id"),
    (lambda: ClassifierHead(64, 2, pooling="max"), r"pooling must be"),
])
def test_bad_constructor_args(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_bad_inputs_name_the_argument():
    mha = MultiHeadAttention(D, H)
    with pytest.raises(ValueError, match=r"query must have shape \[B, L, 32\]"):
        mha(torch.randn(2, 5, 16))
    model = DecoderOnlyTransformer(20, D, 1, H, FF, 0.0, 8)
    with pytest.raises(ValueError, match=r"x must be an int64/int32 tensor"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match="exceeds max_seq_length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_decoder_only_compiles_fullgraph():
    model = DecoderOnlyTransformer(20, D, 1, H, FF, 0.0, 16, pad_token_id=0).eval()
    x = torch.randint(0, 20, (2, 7))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


# ----------------------------------------------------------------------------- data + demo
def test_order_task_is_deterministic_and_balanced():
    x1, y1 = order_task(200, seed=7)
    x2, y2 = order_task(200, seed=7)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert int(y1.sum()) == 100
    for row, label in zip(x1, y1):
        seq = row.tolist()
        assert seq.count(2) == 1 and seq.count(3) == 1  # one 'a', one 'b'
        assert (seq.index(2) < seq.index(3)) == bool(label)


def _read_png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    # every chunk's CRC is valid and the image data inflates to h rows of 1 + 3w bytes
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos: pos + 4])
        tag, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n: pos + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF
        if tag == b"IDAT":
            idat += body
        pos += 12 + n
    assert len(zlib.decompress(idat)) == h * (1 + 3 * w)
    return w, h


def test_train_demo_smoke(tmp_path, capsys):
    from pyllm.tools.train_demo import main

    assert main(types.SimpleNamespace(steps=3, out=str(tmp_path))) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["language_model"]["steps"] == 3 and res["classifier"]["steps"] == 3
    assert math.isfinite(res["language_model"]["eval_loss_full_text"])
    assert 0.0 <= res["classifier"]["test_accuracy"] <= 1.0
    assert _read_png_size(tmp_path / "loss_curve.png") == (640, 400)
    assert "greedy" in (tmp_path / "sample.txt").read_text()
    assert "test accuracy" in capsys.readouterr().out
