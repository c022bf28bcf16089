"""Padding, label masking and dynamic MLM masking of :class:`Collator`."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

from kdistill.data.collate import Collator
from kdistill.data.formats import CausalLMFormat, ClassificationFormat, MaskedLMFormat
from kdistill.errors import ConfigError, DataError
from kdistill.losses.reduce import IGNORE_INDEX

WORDS = (
    "the a an film movie is was very good bad great awful fun dull plot actors story it "
    "and but not really quite boring lovely sad happy long short funny scene ending music "
    "best worst ever of to in with this that i liked hated love hate made"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizerFast:
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join([*SPECIALS, *WORDS]) + "\n")
    return BertTokenizerFast.from_pretrained(str(d))


@pytest.fixture(scope="module")
def gpt() -> PreTrainedTokenizerFast:
    """Word-level tokenizer that appends </s> and has no pad token."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def sentences(n: int, seed: int = 0, lo: int = 3, hi: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        idx = torch.randint(len(WORDS), (k,), generator=g).tolist()
        rows.append({"text": " ".join(WORDS[i] for i in idx)})
    return rows


# ------------------------------------------------------------------------------ classification


def test_classification_batch(bert) -> None:
    rows = [
        {"text": "good film", "label": 1, "probs": [0.1, 0.9]},
        {"text": "a very very dull and boring movie", "label": 0, "probs": [0.8, 0.2]},
    ]
    examples = ClassificationFormat().encode(rows, bert)
    batch = Collator(bert, "classification")(examples)
    n0, n1 = (len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (2, n1) and n0 < n1
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0, n0:].eq(bert.pad_token_id).all()
    assert batch["attention_mask"].tolist() == [[1] * n0 + [0] * (n1 - n0), [1] * n1]
    assert batch["token_type_ids"].eq(0).all()
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert batch["soft_labels"].dtype == torch.float32
    assert torch.allclose(batch["soft_labels"], torch.tensor([[0.1, 0.9], [0.8, 0.2]]))
    assert batch["example_ids"].tolist() == [0, 1]


def test_mixed_batches_give_real_rows_one_hot_soft_labels(bert) -> None:
    rows = [{"text": "good", "label": 1, "probs": [0.1, 0.9]}, {"text": "bad", "label": 0}]
    batch = Collator(bert, "classification")(ClassificationFormat().encode(rows, bert))
    assert batch["soft_labels"].tolist() == [[pytest.approx(0.1), pytest.approx(0.9)], [1.0, 0.0]]
    hard_only = Collator(bert, "classification")(ClassificationFormat().encode(rows[1:], bert))
    assert "soft_labels" not in hard_only


def test_example_ids_carried_and_pad_to_multiple(bert) -> None:
    examples = MaskedLMFormat().encode(sentences(10), bert)
    picked = [examples[7], examples[2], examples[5]]
    batch = Collator(bert, "mlm", pad_to_multiple_of=8)(picked, torch.Generator().manual_seed(0))
    assert batch["example_ids"].tolist() == [7, 2, 5]
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["input_ids"].shape[1] >= max(len(e["input_ids"]) for e in picked)


def test_no_pad_token_refused_except_causal(bert, gpt) -> None:
    for task in ("classification", "mlm"):
        with pytest.raises(DataError, match="tokenizer has no pad token"):
            Collator(gpt, task)
    assert Collator(gpt, "causal").pad_token_id == gpt.eos_token_id


def test_bad_options(bert) -> None:
    with pytest.raises(ConfigError, match="task: unknown task 'seq2seq'"):
        Collator(bert, "seq2seq")
    with pytest.raises(ConfigError, match="mlm_probability"):
        Collator(bert, "mlm", mlm_probability=0.0)
    with pytest.raises(ConfigError, match="pad_to_multiple_of"):
        Collator(bert, "mlm", pad_to_multiple_of=0)
    with pytest.raises(DataError, match="empty batch"):
        Collator(bert, "mlm")([])


# ------------------------------------------------------------------------------ causal


def test_causal_padding_masked_by_attention_mask_when_pad_is_eos(gpt) -> None:
    examples = CausalLMFormat().encode([{"text": "good"}, {"text": "the film was very good"}], gpt)
    batch = Collator(gpt, "causal")(examples)
    eos = gpt.eos_token_id
    n0, n1 = (len(e["input_ids"]) for e in examples)
    assert batch["input_ids"][0].tolist() == examples[0]["input_ids"] + [eos] * (n1 - n0)
    # The real EOS ending each text stays a target; the EOS used as padding does not.
    assert batch["labels"][0].tolist() == examples[0]["input_ids"] + [IGNORE_INDEX] * (n1 - n0)
    assert batch["labels"][1].tolist() == examples[1]["input_ids"]
    assert batch["labels"][0, n0 - 1] == eos
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert batch["example_ids"].tolist() == [0, 1]
    assert "token_type_ids" not in batch


def test_causal_with_a_real_pad_token(bert) -> None:
    examples = CausalLMFormat().encode([{"text": "good"}, {"text": "the film was good"}], bert)
    batch = Collator(bert, "causal")(examples)
    assert batch["input_ids"][0, -1] == bert.pad_token_id
    assert (batch["labels"] == IGNORE_INDEX).eq(batch["attention_mask"] == 0).all()


# ------------------------------------------------------------------------------ masked LM


@pytest.fixture(scope="module")
def mlm_batch(bert):
    """~30k maskable tokens in one batch, masked with a fixed generator."""
    examples = MaskedLMFormat(max_length=64).encode(sentences(2000, seed=1, lo=5, hi=25), bert)
    batch = Collator(bert, "mlm")(examples, torch.Generator().manual_seed(1234))
    return examples, batch


def test_mlm_masking_statistics(bert, mlm_batch) -> None:
    examples, batch = mlm_batch
    collator = Collator(bert, "causal")  # plain padding of the originals, no masking
    plain = collator([{k: v for k, v in e.items() if k != "special_tokens_mask"} for e in examples])
    orig, attn = plain["input_ids"], plain["attention_mask"]
    special = torch.isin(orig, torch.tensor(bert.all_special_ids))
    candidates = (attn == 1) & ~special
    labels, masked_ids = batch["labels"], batch["input_ids"]
    selected = labels != IGNORE_INDEX
    n_cand = int(candidates.sum())
    assert n_cand > 20_000

    # Special tokens ([CLS], [SEP]) and padding are never selected, and never changed.
    assert not (selected & ~candidates).any()
    assert torch.equal(masked_ids[~selected], orig[~selected])
    assert torch.equal(labels[selected], orig[selected])

    frac = selected.sum().item() / n_cand
    assert abs(frac - 0.15) < 0.01, frac
    n_sel = int(selected.sum())
    to_mask = (masked_ids == bert.mask_token_id) & selected
    unchanged = (masked_ids == orig) & selected
    randomised = selected & ~to_mask & ~unchanged
    assert abs(to_mask.sum().item() / n_sel - 0.8) < 0.02
    # A random replacement equal to the original counts as unchanged: expect 0.1 * (1 - 1/V).
    v = len(WORDS)
    assert abs(randomised.sum().item() / n_sel - 0.1 * (1 - 1 / v)) < 0.02
    assert abs(unchanged.sum().item() / n_sel - (0.1 + 0.1 / v)) < 0.02
    # Random replacements are ordinary tokens, never special ones.
    assert not torch.isin(masked_ids[randomised], torch.tensor(bert.all_special_ids)).any()


def test_mlm_same_generator_seed_same_batch(bert, mlm_batch) -> None:
    examples, batch = mlm_batch
    collator = Collator(bert, "mlm")
    again = collator(examples, torch.Generator().manual_seed(1234))
    assert set(again) == set(batch) == {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "labels",
        "example_ids",
    }
    for key in batch:
        assert torch.equal(again[key], batch[key]), key
    other = collator(examples, torch.Generator().manual_seed(4321))
    assert not torch.equal(other["labels"], batch["labels"])


def test_mlm_resumable_from_generator_state(bert) -> None:
    examples = MaskedLMFormat().encode(sentences(64, seed=2), bert)
    collator = Collator(bert, "mlm")
    g = torch.Generator().manual_seed(7)
    collator(examples[:32], g)
    state = g.get_state()
    second = collator(examples[32:], g)
    g2 = torch.Generator()
    g2.set_state(state)
    replay = collator(examples[32:], g2)
    assert torch.equal(second["input_ids"], replay["input_ids"])
    assert torch.equal(second["labels"], replay["labels"])


def test_mlm_without_special_tokens_mask_asks_tokenizer(bert) -> None:
    examples = MaskedLMFormat().encode(sentences(300, seed=3), bert)
    stripped = [{k: v for k, v in e.items() if k != "special_tokens_mask"} for e in examples]
    collator = Collator(bert, "mlm", mlm_probability=0.9)
    a = collator(examples, torch.Generator().manual_seed(5))
    b = collator(stripped, torch.Generator().manual_seed(5))
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    selected_ids = Collator(bert, "causal")(stripped)["input_ids"][a["labels"] != IGNORE_INDEX]
    assert not torch.isin(selected_ids, torch.tensor(bert.all_special_ids)).any()


def test_mismatched_lengths_refused(bert) -> None:
    bad = {"example_id": 3, "input_ids": [2, 5, 3], "attention_mask": [1, 1]}
    with pytest.raises(DataError, match=r"example 3: 'attention_mask' has length 2, input_ids has 3"):
        Collator(bert, "causal")([bad])
