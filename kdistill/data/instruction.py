"""Instruction data (Alpaca / Self-Instruct) for supervised fine-tuning of causal LMs.

Each row has ``instruction``, optional ``input`` and ``output``. The prompt is the Alpaca template
(with or without input) or, with ``template="chat"``, the tokenizer's chat template with the
generation prompt. The loss is on the response only: prompt positions get label -100, the
response ends with EOS, which is learned.

Prompt and response are tokenized **separately** and concatenated, so the label mask falls
exactly on the boundary (tokenizing the joined text can merge the last prompt token with the
first response token and shift the mask). Rows whose response is cut away entirely by
``max_length`` are dropped and counted (``num_truncated``): an all-masked row would train on
nothing and divide by zero.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kdistill.data.formats import Example, _check_max_length, _row_numbers, _text
from kdistill.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt, with the input section only when there is an input."""
    if input_text.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


@dataclass
class InstructionFormat:
    """Instruction rows -> input_ids, attention_mask, labels (-100 on the prompt)."""

    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    template: Literal["alpaca", "chat"] = "alpaca"
    max_length: int = 512
    num_dropped: int = field(default=0, init=False)
    num_truncated: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        _check_max_length(self.max_length)
        if self.template not in ("alpaca", "chat"):
            raise ConfigError(f"template: must be 'alpaca' or 'chat', got {self.template!r}")

    def _prompt_and_response(self, tokenizer, instruction: str, input_text: str, output: str) -> tuple[list, list]:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no EOS token: instruction tuning needs one to end responses")
        if self.template == "alpaca":
            prompt_ids = tokenizer(alpaca_prompt(instruction, input_text))["input_ids"]
            response_ids = tokenizer(output, add_special_tokens=False)["input_ids"] + [eos]
            return prompt_ids, response_ids
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template: chat, but the tokenizer has no chat template; use template: alpaca")
        user = instruction if not input_text.strip() else f"{instruction}\n\n{input_text}"
        messages = [{"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": output}], tokenize=False)
        if not full.startswith(prompt):
            raise ConfigError("the chat template does not render the prompt as a prefix of the conversation")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        if not response_ids or response_ids[-1] != eos:
            response_ids = response_ids + [eos]
        return prompt_ids, response_ids

    def encode(self, rows: Sequence[dict[str, Any]], tokenizer, source_name: str = "data",
               row_numbers: Sequence[int] | None = None) -> list[Example]:
        """Tokenize ``rows``; rows with no response left after truncation are dropped and counted.
        Errors name ``source_name`` and the row's number there (``row_numbers``, default position + 1)."""
        examples, self.num_dropped, self.num_truncated = [], 0, 0
        for i, (n, row) in enumerate(zip(_row_numbers(rows, row_numbers), rows)):
            where = f"{source_name} row {n}"
            instruction = _text(row, where, self.instruction_column)
            input_text = row.get(self.input_column) or ""
            if not isinstance(input_text, str):
                raise DataError(f"{where}: column {self.input_column!r} must be a string")
            output = _text(row, where, self.output_column)
            if not instruction.strip() or not output.strip():
                self.num_dropped += 1
                continue
            prompt_ids, response_ids = self._prompt_and_response(tokenizer, instruction, input_text, output)
            room = self.max_length - len(prompt_ids)
            if room <= 0:  # the prompt alone fills the window: no response token would be trained
                self.num_truncated += 1
                continue
            response_ids = response_ids[:room]
            ids = prompt_ids + response_ids
            examples.append({"example_id": i, "input_ids": ids, "attention_mask": [1] * len(ids),
                             "labels": [-100] * len(prompt_ids) + response_ids})
        if examples and (self.num_truncated or self.num_dropped):  # (with none left, the error below says it)
            logger.warning("%s: dropped %d row(s) with an empty instruction/output and %d whose response "
                           "max_length=%d cut away entirely", source_name, self.num_dropped, self.num_truncated,
                           self.max_length)
        if not examples:
            raise DataError(f"{source_name}: no trainable rows ({self.num_dropped} empty, {self.num_truncated} "
                            f"with the response truncated away at max_length={self.max_length})")
        return examples
