"""Tiny real models and data on disk for engine tests: saved with save_pretrained, loaded by path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

WORDS = ("good great fine bad awful poor movie film plot actor story the a is was very not really quite "
         "fun dull loved hated it this that and but").split()


def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else ["<pad>", "<unk>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        from tokenizers.processors import TemplateProcessing

        core.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                 special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def _sentences(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        label = int(torch.randint(0, 2, (1,), generator=g))
        good, bad = ["good", "great", "fun", "loved"], ["bad", "awful", "dull", "hated"]
        word = (good if label else bad)[int(torch.randint(0, 4, (1,), generator=g))]
        filler = [WORDS[int(i)] for i in torch.randint(6, 20, (4,), generator=g)]
        rows.append({"text": " ".join(["the", "movie", "was", word] + filler), "label": label})
    return rows


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """Directories of tiny teachers (BERT classifier, BERT MLM, GPT-2) and data files."""
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    bert_tok, gpt_tok = _tokenizer("bert"), _tokenizer("gpt")
    bert = dict(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    paths = {}
    for name, model in [("bert-cls", BertForSequenceClassification(BertConfig(**bert, num_labels=2))),
                        ("bert-mlm", BertForMaskedLM(BertConfig(**bert)))]:
        model.save_pretrained(root / name)
        bert_tok.save_pretrained(root / name)
        paths[name] = root / name
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt_tok), n_embd=32, n_layer=4, n_head=4, n_positions=256,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3,
                                     bos_token_id=2, eos_token_id=2, pad_token_id=0))
    gpt.save_pretrained(root / "gpt2")
    gpt_tok.save_pretrained(root / "gpt2")
    paths["gpt2"] = root / "gpt2"
    for split, (n, seed) in {"train": (96, 1), "dev": (32, 2)}.items():
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _sentences(n, seed)))
        paths[split] = path
    return paths
