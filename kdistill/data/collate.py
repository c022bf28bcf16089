"""Batch tokenized examples into padded tensors, with dynamic masking for masked LM.

Output of :class:`Collator` for a batch of B examples padded (on the right) to length L:

| key              | shape  | notes                                                          |
|------------------|--------|----------------------------------------------------------------|
| ``input_ids``    | (B, L) | ``pad_token_id`` on padding; masked-LM: after masking          |
| ``attention_mask`` | (B, L) | 0 on padding                                                 |
| ``token_type_ids`` | (B, L) | when the examples have them; 0 on padding                    |
| ``labels``       | (B,) or (B, L) | classification: class index; LM: token id or -100 (ignored) |
| ``soft_labels``  | (B, C) | classification, when every example of the batch has them (float32) |
| ``example_ids``  | (B,)   | the examples' ``example_id``                                   |

Causal-LM labels are -100 wherever ``attention_mask`` is 0 — by mask, never by pad id, since a
tokenizer without a pad token pads with EOS, which is also a real target.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdistill.errors import ConfigError, DataError
from kdistill.losses.reduce import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASKS: tuple[str, ...] = ("classification", "mlm", "causal")
_ALIASES = {"masked_lm": "mlm", "causal_lm": "causal", "clm": "causal"}
_MASK_FRACTION = 0.8  # of selected positions -> [MASK]
_RANDOM_FRACTION = 0.5  # of the rest -> random token (so 10% / 10% overall)


class Collator:
    """``collator(examples, generator=None) -> dict[str, Tensor]`` for one task.

    ``task``: ``"classification"``, ``"mlm"`` or ``"causal"``. Masked LM selects each non-special,
    non-padding token with probability ``mlm_probability`` (drawn from ``generator``, so a seeded
    generator gives the same batch again); of those 80% become the mask token, 10% a random
    non-special token and 10% stay. ``pad_to_multiple_of`` rounds L up.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        task: str,
        mlm_probability: float = 0.15,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        task = _ALIASES.get(task, task)
        if task not in TASKS:
            raise ConfigError(f"task: unknown task {task!r} (choose from {', '.join(TASKS)})")
        if pad_to_multiple_of is not None and (
            isinstance(pad_to_multiple_of, bool)
            or not isinstance(pad_to_multiple_of, int)
            or pad_to_multiple_of < 1
        ):
            raise ConfigError(f"pad_to_multiple_of: must be a positive integer, got {pad_to_multiple_of!r}")
        self.tokenizer = tokenizer
        self.task = task
        self.pad_to_multiple_of = pad_to_multiple_of
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            if task != "causal" or tokenizer.eos_token_id is None:
                raise DataError(
                    f"tokenizer has no pad token; set one (e.g. tokenizer.pad_token = "
                    f"tokenizer.eos_token) before collating for {task}"
                )
            pad_id = tokenizer.eos_token_id  # safe: causal labels are masked by attention_mask
        self.pad_token_id = int(pad_id)
        self.mlm_probability = mlm_probability
        if task == "mlm":
            if not 0.0 < mlm_probability < 1.0:
                raise ConfigError(f"mlm_probability: must be in (0, 1), got {mlm_probability}")
            if tokenizer.mask_token_id is None:
                raise DataError("tokenizer has no mask token; masked-LM distillation needs one")
            self.mask_token_id = int(tokenizer.mask_token_id)
            special = set(tokenizer.all_special_ids)
            ids = [i for i in range(len(tokenizer)) if i not in special]
            if not ids:
                raise DataError("tokenizer has no non-special token to draw random replacements from")
            self._random_ids = torch.tensor(ids, dtype=torch.long)

    # ------------------------------------------------------------------------------------------

    def __call__(
        self, examples: Sequence[dict[str, Any]], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        if not examples:
            raise DataError("cannot collate an empty batch")
        for k, ex in enumerate(examples):
            if "example_id" not in ex or "input_ids" not in ex:
                raise DataError(f"batch example {k}: needs 'example_id' and 'input_ids'")
        length = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = -(-length // m) * m
        batch: dict[str, Tensor] = {
            "input_ids": self._pad(examples, "input_ids", self.pad_token_id, length),
            "attention_mask": self._pad(examples, "attention_mask", 0, length, default=1),
        }
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = self._pad(examples, "token_type_ids", 0, length)
        if self.task == "classification":
            self._class_labels(examples, batch)
        elif self.task == "causal":
            key = "labels" if "labels" in examples[0] else "input_ids"
            labels = self._pad(examples, key, IGNORE_INDEX, length)
            batch["labels"] = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        else:
            self._mask(examples, batch, length, generator)
        batch["example_ids"] = torch.tensor([int(ex["example_id"]) for ex in examples], dtype=torch.long)
        return batch

    def _pad(
        self,
        examples: Sequence[dict[str, Any]],
        key: str,
        value: int,
        length: int,
        default: int | None = None,
    ) -> Tensor:
        """(B, length) LongTensor of ``ex[key]`` padded with ``value``; ``default`` fills a missing key."""
        out = torch.full((len(examples), length), value, dtype=torch.long)
        for b, ex in enumerate(examples):
            n = len(ex["input_ids"])
            seq = ex.get(key)
            if seq is None:
                if default is None:
                    raise DataError(f"example {ex['example_id']}: missing {key!r}")
                out[b, :n] = default
                continue
            if len(seq) != n:
                raise DataError(
                    f"example {ex['example_id']}: {key!r} has length {len(seq)}, input_ids has {n}"
                )
            if n:
                out[b, :n] = torch.as_tensor(seq, dtype=torch.long)
        return out

    def _class_labels(self, examples: Sequence[dict[str, Any]], batch: dict[str, Tensor]) -> None:
        labels = []
        for ex in examples:
            label = ex.get("labels")
            if isinstance(label, bool) or not isinstance(label, numbers.Integral):
                raise DataError(f"example {ex['example_id']}: 'labels' must be a class index, got {label!r}")
            labels.append(int(label))
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        if any(ex.get("soft_labels") is not None for ex in examples):
            # a mix of synthetic (soft) and real (hard) rows: real rows get one-hot soft labels,
            # so one soft-target cross-entropy trains on both
            widths = {len(ex["soft_labels"]) for ex in examples if ex.get("soft_labels") is not None}
            if len(widths) != 1:
                raise DataError(f"batch: soft_labels have different lengths {sorted(widths)}")
            width = widths.pop()
            soft = torch.zeros(len(examples), width, dtype=torch.float32)
            for b, ex in enumerate(examples):
                if ex.get("soft_labels") is not None:
                    soft[b] = torch.tensor(ex["soft_labels"], dtype=torch.float32)
                elif labels[b] < width:
                    soft[b, labels[b]] = 1.0
                else:
                    raise DataError(f"example {ex['example_id']}: label {labels[b]} has no soft-label column")
            batch["soft_labels"] = soft

    def _special_mask(self, examples: Sequence[dict[str, Any]], length: int) -> Tensor:
        """(B, length) bool: special tokens and padding (never selected for masking)."""
        if all("special_tokens_mask" in ex for ex in examples):
            return self._pad(examples, "special_tokens_mask", 1, length).bool()
        # Examples built elsewhere: ask the tokenizer which ids are special.
        out = torch.ones((len(examples), length), dtype=torch.bool)
        for b, ex in enumerate(examples):
            row = ex.get("special_tokens_mask")
            if row is None:
                row = self.tokenizer.get_special_tokens_mask(
                    list(ex["input_ids"]), already_has_special_tokens=True
                )
            if row:
                out[b, : len(row)] = torch.as_tensor(row, dtype=torch.bool)
        return out

    def _mask(
        self,
        examples: Sequence[dict[str, Any]],
        batch: dict[str, Tensor],
        length: int,
        generator: torch.Generator | None,
    ) -> None:
        """BERT-style dynamic masking of ``batch['input_ids']`` in place; sets ``labels``."""
        input_ids = batch["input_ids"]
        candidates = ~self._special_mask(examples, length) & (batch["attention_mask"] == 1)
        shape = input_ids.shape
        # Draw every random number for the full (B, L) grid, whatever is selected: the stream
        # consumed depends only on the batch shape, so a restored generator replays the batch.
        selected = torch.bernoulli(torch.full(shape, self.mlm_probability), generator=generator).bool()
        to_mask = torch.bernoulli(torch.full(shape, _MASK_FRACTION), generator=generator).bool()
        to_random = torch.bernoulli(torch.full(shape, _RANDOM_FRACTION), generator=generator).bool()
        picks = torch.randint(len(self._random_ids), shape, generator=generator)
        selected &= candidates
        to_mask &= selected
        to_random &= selected & ~to_mask
        batch["labels"] = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        input_ids[to_mask] = self.mask_token_id
        input_ids[to_random] = self._random_ids[picks[to_random]]
