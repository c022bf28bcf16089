"""A tiny random GPT-2 with a small real tokenizer, saved to disk, and a teacher over it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from kdistill.blackbox import LocalTeacher

WORDS = ("the a movie film plot actor story is was very not really good great bad dull fun "
         "and but it this that user assistant system say hello").split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["<eos>", "<unk>"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny matmuls: one intra-op thread is ~50x faster than a contended pool on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64,
                        initializer_range=0.3, eos_token_id=0, bos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def local_teacher(tiny_lm_dir) -> LocalTeacher:
    return LocalTeacher(str(tiny_lm_dir), batch_size=4)


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """Prompts of different lengths (so batches are padded)."""
    return ["the movie was", "a very good film and the plot", "hello", "it is not really fun but"]
