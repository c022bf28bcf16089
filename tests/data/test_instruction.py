"""Instruction format: response-only labels, exact boundary, truncation, pad = EOS, chat template."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kdistill.data import Collator
from kdistill.data.instruction import InstructionFormat, alpaca_prompt
from kdistill.errors import ConfigError, DataError

CORPUS = ["Below is an instruction that describes a task.", "### Response:", "Write a short poem about rain.",
          "The rain falls softly on the roof.", "Translate to French: good morning", "bonjour",
          "Response: yes", "Input: a list of numbers 1 2 3"] * 5


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.decoder = decoders.ByteLevel()
    # pad = EOS, as in many causal LMs
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


ROWS = [{"instruction": "Write a short poem about rain.", "input": "", "output": "The rain falls softly."},
        {"instruction": "Translate to French", "input": "good morning", "output": "bonjour"}]


def test_labels_cover_exactly_the_response_and_eos(tokenizer) -> None:
    examples = InstructionFormat(max_length=256).encode(ROWS, tokenizer)
    for row, ex in zip(ROWS, examples):
        prompt_ids = tokenizer(alpaca_prompt(row["instruction"], row["input"]))["input_ids"]
        n = len(prompt_ids)
        assert ex["input_ids"][:n] == prompt_ids and ex["labels"][:n] == [-100] * n
        response = ex["labels"][n:]
        assert response == ex["input_ids"][n:] and response[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(response[:-1]) == row["output"]
    assert "### Input:" in alpaca_prompt("x", "y") and "### Input:" not in alpaca_prompt("x")


def test_boundary_is_not_shifted_by_joint_tokenization() -> None:
    # a BPE without pre-tokenizer, trained on whole conversations, merges across the prompt/response boundary
    row = {"instruction": "Response", "input": "", "output": ": yes"}
    joined = alpaca_prompt(row["instruction"]) + row["output"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.train_from_iterator([joined] * 20, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<eos>"]))
    core.decoder = decoders.Fuse()  # tokens concatenated as they are
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")
    prompt_ids = tokenizer(alpaca_prompt(row["instruction"]))["input_ids"]
    output_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    assert tokenizer(joined)["input_ids"] != prompt_ids + output_ids  # the case this test is about
    ex = InstructionFormat(max_length=256).encode([row], tokenizer)[0]
    assert ex["input_ids"] == prompt_ids + output_ids + [tokenizer.eos_token_id]
    assert ex["labels"] == [-100] * len(prompt_ids) + output_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(output_ids) == ": yes"


def test_truncation_that_removes_every_response_token_drops_the_row(tokenizer) -> None:
    room = len(tokenizer(alpaca_prompt(ROWS[0]["instruction"]))["input_ids"]) + 3
    fmt = InstructionFormat(max_length=room)  # ROWS[0] keeps 3 response tokens
    long_prompt = {"instruction": "Write a short poem about rain. " * 10, "input": "", "output": "ok"}
    examples = fmt.encode([ROWS[0], long_prompt], tokenizer)
    assert [ex["example_id"] for ex in examples] == [0] and fmt.num_truncated == 1
    assert sum(t != -100 for t in examples[0]["labels"]) == 3 and len(examples[0]["input_ids"]) == room
    with pytest.raises(DataError, match="no trainable rows"):
        fmt.encode([long_prompt], tokenizer)


def test_pad_equal_to_eos_keeps_the_learned_eos(tokenizer) -> None:
    examples = InstructionFormat(max_length=256).encode(ROWS, tokenizer)
    batch = Collator(tokenizer, "causal")(examples)
    short = min(range(2), key=lambda b: len(examples[b]["input_ids"]))
    n = len(examples[short]["input_ids"])
    assert batch["labels"][short, n - 1] == tokenizer.eos_token_id  # the real EOS is trained
    assert (batch["labels"][short, n:] == -100).all()  # padding (same id) is not


def test_chat_template_renders_prompt_prefix(tokenizer, tmp_path) -> None:
    tokenizer.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ex = InstructionFormat(template="chat", max_length=256).encode(ROWS[:1], tok)[0]
    labelled = [t for t in ex["labels"] if t != -100]
    assert tok.decode(labelled[:-1]).endswith("The rain falls softly.")
    with pytest.raises(ConfigError, match="no chat template"):
        InstructionFormat(template="chat").encode(ROWS, tokenizer)


def test_missing_output_column_names_the_row(tokenizer) -> None:
    with pytest.raises(DataError, match="^data row 2: missing column 'output'"):
        InstructionFormat().encode([ROWS[0], {"instruction": "x"}], tokenizer)
