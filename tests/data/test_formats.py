"""Rows -> tokenized examples for classification, masked LM and causal LM."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

from kdistill.data.formats import CausalLMFormat, ClassificationFormat, MaskedLMFormat, infer_labels
from kdistill.errors import ConfigError, DataError

WORDS = (
    "the a an film movie is was very good bad great awful fun dull plot actors story it "
    "and but not really quite boring lovely sad happy long short funny scene ending music "
    "best worst ever of to in with this that i liked hated love hate made"
).split()


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizerFast:
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
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


def ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


# ------------------------------------------------------------------------------ classification


def test_classification_by_name_and_index(bert) -> None:
    rows = [
        {"text": "a good film", "label": "positive"},
        {"text": "a bad film", "label": 0},
        {"text": "it was fun", "label": "1"},  # digits from CSV: an index when names are words
    ]
    fmt = ClassificationFormat(labels=["negative", "positive"])
    out = fmt.encode(rows, bert)
    assert [e["labels"] for e in out] == [1, 0, 1]
    assert [e["example_id"] for e in out] == [0, 1, 2]
    assert out[0]["input_ids"] == ids(bert, "a good film")
    assert out[0]["attention_mask"] == [1] * len(out[0]["input_ids"])
    assert out[0]["token_type_ids"] == [0] * len(out[0]["input_ids"])
    assert fmt.num_labels == 2 and fmt.num_dropped == 0
    assert "soft_labels" not in out[0]


def test_classification_bad_label_names_row(bert) -> None:
    rows = [{"text": "good", "label": "positive"}] * 12 + [{"text": "meh", "label": "neutral"}]
    with pytest.raises(DataError, match=r"train row 13: label 'neutral' is not in the label set \["):
        ClassificationFormat(labels=["negative", "positive"]).encode(rows, bert, source_name="train")
    with pytest.raises(DataError, match=r"data row 1: label 2 is not in the label set"):
        ClassificationFormat(labels=["negative", "positive"]).encode([{"text": "x", "label": 2}], bert)


def test_numeric_label_names_match_by_name(bert) -> None:
    rows = [{"text": "good", "label": 2}, {"text": "bad", "label": "1"}, {"text": "ok", "label": 10}]
    names = infer_labels(rows, "label")
    assert names == ["1", "2", "10"]
    out = ClassificationFormat(labels=names).encode(rows, bert)
    assert [e["labels"] for e in out] == [1, 0, 2]
    with pytest.raises(DataError, match="label 0 is not in the label set"):
        ClassificationFormat(labels=names).encode([{"text": "x", "label": 0}], bert)


def test_classification_int_labels_without_names(bert) -> None:
    fmt = ClassificationFormat()
    out = fmt.encode([{"text": "good", "label": "3"}, {"text": "bad", "label": 0}], bert)
    assert [e["labels"] for e in out] == [3, 0]
    assert fmt.num_labels == 4
    with pytest.raises(DataError, match=r"data row 2: label 'pos' is not a non-negative integer"):
        ClassificationFormat().encode([{"text": "a", "label": 1}, {"text": "b", "label": "pos"}], bert)
    with pytest.raises(DataError, match=r"^data row 1: label -1 is not a non-negative integer"):
        ClassificationFormat().encode([{"text": "a", "label": -1}], bert)


def test_missing_column_named(bert) -> None:
    rows = [{"sentence": "good", "label": 1}] * 3 + [{"text": "x", "label": 1}]
    fmt = ClassificationFormat(text_column="sentence")
    with pytest.raises(DataError, match=r"dev row 4: missing column 'sentence' \(columns: text, label\)"):
        fmt.encode(rows, bert, source_name="dev")
    with pytest.raises(DataError, match=r"^data row 1: missing column 'label'"):
        ClassificationFormat().encode([{"text": "x"}], bert)


def test_text_pair(bert) -> None:
    out = ClassificationFormat(text_pair_column="hyp").encode(
        [{"text": "the film", "hyp": "it was good", "label": 1}], bert
    )
    assert out[0]["input_ids"] == bert("the film", "it was good")["input_ids"]
    assert sorted(set(out[0]["token_type_ids"])) == [0, 1]


def test_soft_labels(bert) -> None:
    rows = [
        {"text": "good", "label": 1, "probs": [0.2, 0.8]},
        {"text": "bad", "label": 0, "probs": "[0.9, 0.1]"},  # JSON text, as from a CSV
        {"text": "fun", "label": 1},
    ]
    out = ClassificationFormat(labels=["neg", "pos"]).encode(rows, bert)
    assert out[0]["soft_labels"] == [0.2, 0.8] and out[1]["soft_labels"] == [0.9, 0.1]
    assert "soft_labels" not in out[2]


@pytest.mark.parametrize(
    ("probs", "pattern"),
    [
        ([0.5, 0.6], r"^data row 2: column 'probs' sums to 1\.1"),
        ([0.2, 0.3, 0.5], r"^data row 2: column 'probs' has 3 probabilities, expected 2"),
        (["a", "b"], r"^data row 2: column 'probs' must be a list of probabilities"),
        ([1.5, -0.5], r"^data row 2: column 'probs' must be a list of probabilities"),
    ],
)
def test_bad_soft_labels(bert, probs, pattern) -> None:
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0, "probs": probs}]
    with pytest.raises(DataError, match=pattern):
        ClassificationFormat(labels=["neg", "pos"]).encode(rows, bert)


def test_soft_labels_within_tolerance(bert) -> None:
    out = ClassificationFormat().encode([{"text": "a", "label": 1, "probs": [0.3, 0.7005]}], bert)
    assert out[0]["soft_labels"] == [0.3, 0.7005]


def test_infer_labels() -> None:
    assert infer_labels([{"label": "pos"}, {"label": "neg"}, {"label": "pos"}]) == ["neg", "pos"]
    assert infer_labels([{"y": 10}, {"y": 2}], "y") == ["2", "10"]
    with pytest.raises(DataError, match="^data row 2: missing column 'y'"):
        infer_labels([{"y": 1}, {"x": 1}], "y")


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_length"):
        ClassificationFormat(max_length=0)
    with pytest.raises(ConfigError, match="duplicate label 'a'"):
        ClassificationFormat(labels=["a", "b", "a"])
    with pytest.raises(ConfigError, match="empty"):
        ClassificationFormat(labels=[])
    with pytest.raises(ConfigError, match="max_length"):
        CausalLMFormat(max_length=-3)


def test_truncation(bert) -> None:
    out = ClassificationFormat(max_length=5).encode([{"text": " ".join(WORDS), "label": 0}], bert)
    assert len(out[0]["input_ids"]) == 5 and out[0]["input_ids"][-1] == bert.sep_token_id


# ------------------------------------------------------------------------------ LM formats


def test_masked_lm_format(bert) -> None:
    rows = [{"text": "the film was good"}, {"text": "   "}, {"text": "bad"}]
    fmt = MaskedLMFormat(max_length=16)
    out = fmt.encode(rows, bert)
    assert [e["example_id"] for e in out] == [0, 2]
    assert fmt.num_dropped == 1
    assert out[0]["special_tokens_mask"] == [1, 0, 0, 0, 0, 1]
    assert set(out[0]) == {"example_id", "input_ids", "attention_mask", "token_type_ids", "special_tokens_mask"}


def test_causal_lm_format(gpt) -> None:
    fmt = CausalLMFormat()
    out = fmt.encode([{"text": ""}, {"text": "the film was good"}], gpt)
    assert fmt.num_dropped == 1
    (ex,) = out
    assert ex["example_id"] == 1
    assert ex["input_ids"][-1] == gpt.eos_token_id
    assert ex["labels"] == ex["input_ids"] and ex["labels"] is not ex["input_ids"]
    assert set(ex) == {"example_id", "input_ids", "attention_mask", "labels"}


def test_all_dropped_is_an_error(gpt) -> None:
    with pytest.raises(DataError, match=r"corpus: every text tokenized to nothing \(2 rows\)"):
        CausalLMFormat().encode([{"text": ""}, {"text": " "}], gpt, source_name="corpus")


def test_non_string_text(bert) -> None:
    with pytest.raises(DataError, match=r"^data row 2: column 'text' must be a string, got NoneType"):
        MaskedLMFormat().encode([{"text": "a"}, {"text": None}], bert)


def test_many_rows_are_chunked(bert) -> None:
    rows = [{"text": WORDS[i % len(WORDS)], "label": i % 2} for i in range(5000)]
    out = ClassificationFormat().encode(rows, bert)
    assert len(out) == 5000 and out[-1]["example_id"] == 4999
    assert out[4321]["input_ids"] == ids(bert, WORDS[4321 % len(WORDS)])
