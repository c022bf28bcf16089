"""Self-Instruct (Wang et al., 2023) and Alpaca (Taori et al., 2023) instruction data from a text teacher.

Stages, each resumable, each with its own append-only JSONL file in the output directory:

| stage                   | file                    | what                                                           |
|-------------------------|-------------------------|----------------------------------------------------------------|
| ``generate_instructions`` | ``instructions.jsonl`` | few-shot prompts of 8 numbered instructions (6 seed + 2 machine when any are kept), new numbered instructions parsed; length, keyword, start and ROUGE-L filters decide online, as in Self-Instruct, so the in-context machine instructions and the target count are of kept ones. With ``mode="alpaca"``: Alpaca's prompt of 3 seed tasks, a list of 20 tasks with input and output |
| ``classify_tasks``      | ``classifications.jsonl`` | few-shot yes/no: is the instruction a classification task?  |
| ``generate_instances``  | ``instances.jsonl``     | input-first prompts for generation tasks, output-first (class label, then input) for classification tasks; input/output pairs parsed |
| ``filter_examples``     | ``filtered.jsonl``, ``rejected.jsonl`` | example filters (:class:`~kdistill.blackbox.filters.ExampleFilter`) |
| ``export_dataset``      | ``data.json``, ``data.jsonl`` | Alpaca records ``instruction, input, output``            |

:func:`run_self_instruct` runs them and writes ``data_card.md`` / ``data_card.json``.

**Resume.** Each teacher call's results are appended as one group: a header line
(``{"_group": k, "_n": m, ...}``) and its ``m`` records, in one write. On load, a group cut short
by a kill is dropped (and cut from the file), so its prompts are sent again; records are keyed
by id and finished ids are never asked for again. The in-context sample of prompt ``p`` of call
``k`` comes from ``random.Random(f"{seed}:{k}:{p}")`` over the pool rebuilt from the file, so
a resumed run sends the same prompts as an uninterrupted one. Sampled instructions are seeded too
(call ``k`` samples with seed :func:`call_seed` ``(seed, k)`` unless the sampling parameters name
one), so a run is reproducible where the teacher honours seeds (a local model always does). A directory is refused if it
holds a run with another teacher, seed file or generation setting.

Malformed teacher outputs (unnumbered or empty list items, a yes/no answer that is neither,
instances without an ``Output:`` or ``Class label:``) are dropped and counted; the last item of
a completion cut by ``max_tokens`` is dropped (instructions) or marked truncated (instances).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from kdistill.blackbox.backends import BlackBoxError, BudgetExhausted, Completion, SamplingParams, TextTeacher
from kdistill.blackbox.cards import LICENCE_WARNING, write_data_card
from kdistill.blackbox.filters import (
    Decontaminator,
    ExampleFilter,
    FilterConfig,
    KeywordBlocklist,
    RougeNoveltyFilter,
    instruction_reason,
)
from kdistill.data.sources import iter_jsonl
from kdistill.errors import ConfigError, DataError
from kdistill.hashing import sha256_file

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int | None], None]
"""``progress(stage, done, total)``; ``total`` is ``None`` when unknown."""

INSTRUCTIONS_FILE = "instructions.jsonl"
CLASSIFICATIONS_FILE = "classifications.jsonl"
INSTANCES_FILE = "instances.jsonl"
FILTERED_FILE = "filtered.jsonl"
REJECTED_FILE = "rejected.jsonl"
DATA_JSON = "data.json"
DATA_JSONL = "data.jsonl"
RUN_FILE = "run.json"


class GenerationIncomplete(BlackBoxError):
    """The teacher's (or the configured) budget ran out; what was generated is kept on disk."""


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    input: str
    output: str


@dataclass(frozen=True)
class SeedTask:
    """One task of the Self-Instruct schema (``id, name, instruction, instances, is_classification``)."""

    id: str
    name: str
    instruction: str
    instances: tuple[Instance, ...]
    is_classification: bool = False


def default_seed_path() -> Path:
    """The packaged seed set (32 tasks written for kdistill, Self-Instruct schema)."""
    return Path(str(resources.files("kdistill.blackbox").joinpath("seed_tasks.jsonl")))


def _field(obj: dict[str, Any], key: str, where: str, *, required: bool = True, default: str = "") -> str:
    if key not in obj:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return default
    value = obj[key]
    if value is None and not required:
        return default
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _seed_from_obj(obj: Any, where: str, index: int) -> SeedTask:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    instruction = _field(obj, "instruction", where)
    if not instruction.strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    if "instances" in obj:  # Self-Instruct schema
        raw = obj["instances"]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: field 'instances' must be a non-empty list of {{input, output}}")
        instances = []
        for j, inst in enumerate(raw):
            if not isinstance(inst, dict):
                raise DataError(f"{where}: instances[{j}] must be an object with 'input' and 'output'")
            instances.append(Instance(_field(inst, "input", f"{where}: instances[{j}]", required=False),
                                      _field(inst, "output", f"{where}: instances[{j}]")))
    elif "output" in obj:  # Alpaca record
        instances = [Instance(_field(obj, "input", where, required=False), _field(obj, "output", where))]
    else:
        raise DataError(f"{where}: missing field 'instances' (or Alpaca's 'output')")
    is_clf = obj.get("is_classification", False)
    if not isinstance(is_clf, bool):
        raise DataError(f"{where}: field 'is_classification' must be true or false, got {is_clf!r}")
    return SeedTask(
        id=str(obj.get("id", f"seed_task_{index}")),
        name=str(obj.get("name", "")),
        instruction=instruction.strip(),
        instances=tuple(instances),
        is_classification=is_clf,
    )


def load_seeds(path: str | os.PathLike[str]) -> list[SeedTask]:
    """Seed tasks from Self-Instruct JSONL (one task a line) or Alpaca JSON (a list of
    ``{instruction, input, output}``); errors name the file and line."""
    p = Path(path)
    name = p.name
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"seed file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    seeds: list[SeedTask] = []
    if text.lstrip().startswith("["):
        decoder = json.JSONDecoder()
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise DataError(f"{name} line {text.count(chr(10)) + 1}: invalid JSON: unterminated list")
            if text[pos] == "]":
                rest = text[pos + 1:].strip()
                if rest:
                    line = text.count("\n", 0, text.index(rest, pos)) + 1
                    raise DataError(f"{name} line {line}: invalid JSON: text after the list ({rest[:20]!r})")
                break
            line = text.count("\n", 0, pos) + 1
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DataError(f"{name} line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            seeds.append(_seed_from_obj(obj, f"{name} line {line}", len(seeds)))
    else:
        lines = text.splitlines()
        first = next((line for line in lines if line.strip()), "")
        if first.strip() in ("{", "{}") or (first.strip().startswith("{") and not first.rstrip().endswith("}")):
            raise DataError(f"{name}: one JSON object spread over lines; seed files are JSONL (one task a line) "
                            "or a JSON list of tasks (Alpaca)")
        for lineno, obj in iter_jsonl(lines, name):
            seeds.append(_seed_from_obj(obj, f"{name} line {lineno}", len(seeds)))
    if not seeds:
        raise DataError(f"{name}: no seed tasks")
    return seeds


# --------------------------------------------------------------------------------------------
# Prompts and parsing
# --------------------------------------------------------------------------------------------

INSTRUCTION_HEADER = "Come up with a series of tasks:\n"

CLASSIFY_TEMPLATE = """\
Can the following task be answered by choosing one label from a small, fixed set of labels?

Task: Tell me whether the email below asks for a meeting.
Is it classification? Yes

Task: Write a limerick about a cat who learns to swim.
Is it classification? No

Task: Which of these numbers are prime: 21, 23, 27, 29?
Is it classification? No

Task: Label each movie review as positive or negative.
Is it classification? Yes

Task: Suggest a name for a coffee shop run by retired sailors.
Is it classification? No

Task: Is the following argument valid or invalid?
Is it classification? Yes

Task: Explain why the sky looks red at sunset.
Is it classification? No

Task: Determine which of the three customer segments (students, families, retirees) the product description targets.
Is it classification? Yes

Task: Translate the sentence into French.
Is it classification? No

Task: Given a tweet, say whether it is sarcastic.
Is it classification? Yes

Task: {instruction}
Is it classification?"""

INPUT_FIRST_TEMPLATE = """\
Write examples for each task below. Give several examples when the task allows it. If a task \
needs no input, write the output directly.

Task: Convert the temperature from Celsius to Fahrenheit.
Example 1
Temperature: 25 °C
Output: 77 °F
Example 2
Temperature: -40 °C
Output: -40 °F

Task: Suggest three names for a bakery that sells only sourdough bread.
Output:
- Wild Yeast
- The Slow Loaf
- Crust & Starter

Task: Turn the list of facts into one fluent sentence.
Example 1
Facts: river Thames; length 346 km; flows through London
Output: The Thames, which flows through London, is 346 km long.
Example 2
Facts: honeybees; visit about 2 million flowers; to make one pound of honey
Output: Honeybees visit about 2 million flowers to make a single pound of honey.

Task: What are good habits for falling asleep faster?
Output: Keep a fixed bedtime, avoid screens and caffeine in the evening, keep the bedroom cool and \
dark, and get some daylight in the morning.

Task: {instruction}
"""

OUTPUT_FIRST_TEMPLATE = """\
Given a classification task and its possible labels, write an input for each label. If the task \
needs no input, just list the possible labels.

Task: Decide whether the restaurant review is positive or negative.
Class label: Positive
Review: The soup was hot, the bread was fresh and the staff were lovely.
Class label: Negative
Review: We waited an hour and the pasta arrived cold.

Task: Which of the two words is the odd one out for the category?
Class label: tulip
Category: kitchen tools
Words: whisk, tulip
Class label: hammer
Category: fruits
Words: hammer, plum

Task: Is the number even or odd?
Class label: Even
Number: 148
Class label: Odd
Number: 73

Task: {instruction}
"""

ALPACA_HEADER = """\
You are asked to come up with a set of {n} diverse task instructions, each with an input and an \
output. A language model will be asked to complete the instructions, and we will evaluate it.

Requirements:
1. Do not repeat the verb from one instruction to the next: vary the instructions as much as possible.
2. Vary the language too: mix questions with imperative instructions.
3. Vary the type of task: open-ended generation, classification, editing, rewriting, reasoning, and so on.
4. A text-only language model must be able to complete each instruction: no visual or audio \
output, and no actions in the world such as setting a reminder.
5. Write the instructions in English, in one or two sentences each.
6. Give an input when the instruction needs one: a concrete, realistic example of up to about \
100 words, never a placeholder. When no input is needed, write "<noinput>" in the input field.
7. Give an appropriate output for the instruction and input, in fewer than 100 words.

List of {n} tasks:
"""

NO_INPUT = "<noinput>"


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def sample_in_context(
    seed_instructions: Sequence[str],
    machine_instructions: Sequence[str],
    rng: random.Random,
    num_seed: int = 6,
    num_machine: int = 2,
) -> list[str]:
    """``num_machine`` machine instructions when that many exist, seeds for the rest, shuffled."""
    machine = rng.sample(list(machine_instructions), min(num_machine, len(machine_instructions)))
    seeds = rng.sample(list(seed_instructions), min(num_seed + num_machine - len(machine), len(seed_instructions)))
    chosen = machine + seeds
    rng.shuffle(chosen)
    return chosen


def instruction_prompt(instructions: Sequence[str]) -> str:
    """Self-Instruct's prompt: the numbered in-context instructions, ending at the next number."""
    lines = [f"{i}. {_one_line(inst).rstrip(':')}" for i, inst in enumerate(instructions, start=1)]
    return INSTRUCTION_HEADER + "\n".join(lines) + f"\n{len(instructions) + 1}."


def instruction_stop(num_in_context: int, new_per_prompt: int) -> tuple[str, ...]:
    last = num_in_context + new_per_prompt + 1
    return ("\n\n", f"\n{last}", f"{last}.", f"{last} .")


@dataclass
class Parsed:
    """Items parsed from one completion, with what was dropped."""

    items: list[Any] = field(default_factory=list)
    malformed: int = 0
    truncated: int = 0
    conflicting: int = 0


_NUMBERED = re.compile(r"^\s*(\d+)\s*\.(?!\d)\s*(.*)$")  # "12. text", "12.text"; not "2.5 litres"


def parse_instructions(text: str, first_number: int, finish_reason: str = "stop") -> Parsed:
    """Numbered instructions of a completion that continues the prompt after ``first_number.``.

    A line ``k. text`` starts item ``k``; other lines continue the current item. Items that are
    empty or out of sequence are malformed; the last item is dropped when the completion was cut
    (``finish_reason == "length"``).
    """
    out = Parsed()
    lines = text.splitlines() or [""]
    items: list[tuple[int, list[str]]] = [(first_number, [lines[0]])]  # the prompt ends with "9."
    for line in lines[1:]:
        m = _NUMBERED.match(line)
        if m:
            items.append((int(m.group(1)), [m.group(2) or ""]))
        else:
            items[-1][1].append(line)
    if finish_reason == "length" and items:
        items.pop()
        out.truncated += 1
    expected = first_number
    for number, parts in items:
        inst = _one_line(" ".join(parts))
        if number != expected or not inst:
            out.malformed += 1
        else:
            out.items.append(inst[0].upper() + inst[1:])
        expected = number + 1
    return out


def alpaca_prompt(tasks: Sequence[tuple[str, str, str]], list_size: int = 20) -> str:
    """Alpaca's prompt: requirements, then ``###``-separated numbered tasks, ending at the next one."""
    prompt = ALPACA_HEADER.format(n=list_size) + "\n"
    for idx, (instruction, inp, output) in enumerate(tasks, start=1):
        inp = inp if inp.strip() else NO_INPUT
        prompt += (f"###\n{idx}. Instruction: {_one_line(instruction).rstrip(':')}\n"
                   f"{idx}. Input:\n{inp}\n{idx}. Output:\n{output}\n")
    return prompt + f"###\n{len(tasks) + 1}. Instruction:"


def parse_alpaca(text: str, first_number: int, finish_reason: str = "stop") -> Parsed:
    """``(instruction, input, output)`` triples from an Alpaca completion (after ``first_number. Instruction:``)."""
    out = Parsed()
    chunks = re.split(r"###", f"{first_number}. Instruction:" + text)
    for idx, chunk in enumerate(chunks):
        if not chunk.strip():
            continue
        if idx == len(chunks) - 1 and finish_reason == "length":
            out.truncated += 1
            continue
        number = first_number + idx
        parts = re.split(rf"{number}\.\s+(Instruction|Input|Output):", chunk)
        if len(parts) != 7 or [parts[1], parts[3], parts[5]] != ["Instruction", "Input", "Output"]:
            out.malformed += 1
            continue
        inst, inp, output = _one_line(parts[2]), parts[4].strip(), parts[6].strip()
        if not inst:
            out.malformed += 1
            continue
        out.items.append((inst[0].upper() + inst[1:], "" if inp.lower() == NO_INPUT else inp, output))
    return out


def classification_prompt(instruction: str) -> str:
    return CLASSIFY_TEMPLATE.format(instruction=_one_line(instruction))


def parse_classification(text: str) -> bool | None:
    """``True`` for yes, ``False`` for no, ``None`` for anything else (malformed)."""
    m = re.match(r"\s*([A-Za-z]+)", text)
    word = m.group(1).lower() if m else ""
    return {"yes": True, "no": False}.get(word)


def instance_prompt(instruction: str, is_classification: bool) -> str:
    """Output-first (class label, then input) for classification tasks, input-first otherwise."""
    template = OUTPUT_FIRST_TEMPLATE if is_classification else INPUT_FIRST_TEMPLATE
    return template.format(instruction=_one_line(instruction))


def instance_stop(max_instances: int) -> tuple[str, ...]:
    return (f"Example {max_instances + 1}", "Task:")


_OUTPUT = re.compile(r"Output\s*\d*\s*:")
_INPUT_PREFIX = re.compile(r"^Input\s*\d*\s*:")
_INPUT = re.compile(r"Input\s*\d*\s*:")
_EXAMPLE = re.compile(r"(?m)^[ \t]*Example\s?\d*\s*[.:]?")  # at a line start only, unlike Self-Instruct


def _input_output(chunk: str) -> tuple[str, str] | None:
    parts = _OUTPUT.split(chunk, maxsplit=1)
    if len(parts) != 2:
        return None
    inp, output = parts[0].strip(), parts[1].strip()
    output = _INPUT.split(output, maxsplit=1)[0].strip()  # a second pair run on
    return _INPUT_PREFIX.sub("", inp).strip(), output


def parse_instances(text: str, is_classification: bool, finish_reason: str = "stop", max_instances: int = 5) -> Parsed:
    """``(input, output, finish_reason)`` triples from an instance completion.

    Generation tasks: ``Example k`` blocks (the marker at a line start) (or one block) of ``[input] Output: output``.
    Classification tasks: ``Class label: label`` lines, each followed by its input.
    Blocks without an output marker (or label) are malformed; inputs given conflicting outputs
    are dropped (``conflicting``). In a completion cut by ``max_tokens`` the last block is
    marked ``"length"`` (left to the ``truncated`` filter), or counted ``truncated`` when it
    did not even reach its output marker.
    """
    out = Parsed()
    text = text.strip()
    if is_classification:
        if "Class label:" not in text:
            out.malformed += 1
            return out
        blocks: list[tuple[str, str] | None] = []
        for chunk in text.split("Class label:")[1:]:
            label, _, inp = chunk.strip().partition("\n")
            blocks.append((inp.strip(), label.strip()) if label.strip() else None)
    else:
        chunks = [c for c in _EXAMPLE.split(text) if c.strip()] if _EXAMPLE.search(text) else [text]
        blocks = [_input_output(chunk) for chunk in chunks]
    cut = finish_reason == "length"
    pairs: list[tuple[str, str, str]] = []
    for k, block in enumerate(blocks):
        last = k == len(blocks) - 1
        if block is None:
            if cut and last:
                out.truncated += 1
            else:
                out.malformed += 1
        else:
            pairs.append((*block, "length" if cut and last else "stop"))
    outputs_by_input: dict[str, set[str]] = {}
    for inp, output, _ in pairs:
        outputs_by_input.setdefault(inp, set()).add(output)
    for pair in pairs:
        if len(outputs_by_input[pair[0]]) > 1:
            out.conflicting += 1
        else:
            out.items.append(pair)
    out.items = out.items[:max_instances]
    return out


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

Mode = Literal["self_instruct", "alpaca"]


@dataclass(frozen=True)
class SelfInstructConfig:
    """Generation settings. Sampling defaults follow Self-Instruct (``top_p`` 0 → greedy at
    temperature 0) and Alpaca; ``None`` takes the stage's default."""

    num_instructions: int = 100
    """Target: stage 1 stops once at least this many machine instructions are kept."""
    mode: Mode = "self_instruct"
    num_seed_in_context: int = 6
    num_machine_in_context: int = 2
    new_per_prompt: int = 7
    """Self-Instruct: new instructions asked per prompt (the stop is the number after them)."""
    alpaca_in_context: int = 3
    alpaca_list_size: int = 20
    prompts_per_call: int = 5
    max_instances: int = 5
    max_prompts: int | None = None
    """Own budget: prompts sent by all stages together, counted across restarts."""
    patience: int = 20
    """Stage 1 gives up after this many calls in a row without a new kept instruction."""
    seed: int = 0
    """Picks the in-context examples and, per call, the instruction sampler's seed (:func:`call_seed`)."""
    instruction_params: SamplingParams | None = None
    classify_params: SamplingParams | None = None
    instance_params: SamplingParams | None = None
    filters: FilterConfig = field(default_factory=FilterConfig)
    teacher_licence: str | None = None
    """The licence or terms of use of the teacher's outputs, for the data card."""

    def __post_init__(self) -> None:
        if self.mode not in ("self_instruct", "alpaca"):
            raise ConfigError(f"mode: must be 'self_instruct' or 'alpaca', got {self.mode!r}")
        for name in ("num_instructions", "new_per_prompt", "alpaca_in_context", "prompts_per_call",
                     "max_instances", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be an integer ≥ 1, got {value!r}")
        for name in ("num_seed_in_context", "num_machine_in_context"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be ≥ 0, got {getattr(self, name)}")
        if self.num_seed_in_context + self.num_machine_in_context < 1:
            raise ConfigError("num_seed_in_context: the prompt needs at least one in-context instruction")
        if self.alpaca_list_size <= self.alpaca_in_context:
            raise ConfigError(f"alpaca_list_size: must exceed alpaca_in_context ({self.alpaca_in_context}), "
                              f"got {self.alpaca_list_size}")
        if self.max_prompts is not None and self.max_prompts < 0:
            raise ConfigError(f"max_prompts: must be ≥ 0 or None, got {self.max_prompts}")

    # stage defaults ---------------------------------------------------------------------

    @property
    def num_in_context(self) -> int:
        if self.mode == "alpaca":
            return self.alpaca_in_context
        return self.num_seed_in_context + self.num_machine_in_context

    def instruction_sampling(self) -> SamplingParams:
        if self.instruction_params is not None:
            return self.instruction_params
        if self.mode == "alpaca":
            n = self.alpaca_list_size
            return SamplingParams(max_tokens=3072, temperature=1.0, top_p=1.0, stop=(f"\n{n}", f"{n}."))
        return SamplingParams(max_tokens=1024, temperature=0.7, top_p=0.5,
                              stop=instruction_stop(self.num_in_context, self.new_per_prompt))

    def classify_sampling(self) -> SamplingParams:
        return self.classify_params or SamplingParams(max_tokens=3, temperature=0.0, stop=("\n", "Task"))

    def instance_sampling(self) -> SamplingParams:
        return self.instance_params or SamplingParams(max_tokens=300, temperature=0.0,
                                                      stop=instance_stop(self.max_instances))

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share (targets and budgets may change)."""
        d = asdict(self)
        for key in ("num_instructions", "max_prompts", "patience", "teacher_licence"):
            d.pop(key)
        d["instruction_params"] = self.instruction_sampling().to_dict()
        d["classify_params"] = self.classify_sampling().to_dict()
        d["instance_params"] = self.instance_sampling().to_dict()
        d["filters"]["blocklist"] = list(self.filters.blocklist)
        return d


# --------------------------------------------------------------------------------------------
# Append-only group log
# --------------------------------------------------------------------------------------------


class GroupLog:
    """JSONL of groups: a header ``{"_group": k, "_n": m, ...}`` followed by ``m`` records.

    ``append`` writes a group with one ``os.write`` and fsyncs; ``load`` returns the complete
    groups and cuts an incomplete trailing group (a kill mid-write) from the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        groups: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        good_end = 0
        pos = 0
        header: dict[str, Any] | None = None
        records: list[dict[str, Any]] = []
        lineno = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:  # no newline: a cut last line
                break
            lineno += 1
            line = data[pos:end]
            pos = end + 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{self.path} line {lineno}: invalid JSON ({exc}); "
                                "the file is corrupt, not just cut short") from None
            if header is None:
                if not isinstance(obj, dict) or "_group" not in obj:
                    raise DataError(f"{self.path} line {lineno}: expected a group header with '_group'")
                header, records = obj, []
            else:
                records.append(obj)
            if len(records) == header["_n"]:
                groups.append((header, records))
                header, good_end = None, pos
        if good_end < len(data):
            logger.info("%s: dropping an incomplete group at the end (%d bytes)", self.path, len(data) - good_end)
            with self.path.open("r+b") as f:
                f.truncate(good_end)
        return groups

    def append(self, header: dict[str, Any], records: Sequence[dict[str, Any]]) -> None:
        header = {**header, "_n": len(records)}
        payload = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in (header, *records)).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def _records(groups: Iterable[tuple[dict[str, Any], list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for _, records in groups:
        for r in records:
            if r["id"] not in seen:
                seen.add(r["id"])
                out.append(r)
    return out


def _prompts_sent(out_dir: Path) -> int:
    return sum(h.get("prompts", 0) for name in (INSTRUCTIONS_FILE, CLASSIFICATIONS_FILE, INSTANCES_FILE)
               for h, _ in GroupLog(out_dir / name).load())


class _Stop(Exception):
    """A budget ran out in ``stage``; the results before it are on disk."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class _PromptBudget:
    """``config.max_prompts`` over all stages and restarts: the prompts on disk are counted once."""

    def __init__(self, out_dir: Path, config: SelfInstructConfig, stage: str) -> None:
        self.limit = config.max_prompts
        self.stage = stage
        self.used = _prompts_sent(out_dir) if self.limit is not None else 0

    def take(self, want: int) -> int:
        """How many prompts the next call may send (raises ``_Stop`` at the limit)."""
        if self.limit is None:
            return want
        left = self.limit - self.used
        if left <= 0:
            raise _Stop(self.stage, f"max_prompts={self.limit} reached")
        return min(want, left)

    def spend(self, answered: int) -> None:
        self.used += answered


def call_seed(seed: int, call: int) -> int:
    """The sampling seed of instruction call ``call`` of a run seeded ``seed`` (31 bits of a sha256)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{call}".encode()).digest()[:4], "big") >> 1


def _complete(
    teacher: TextTeacher, prompts: list[str], params: SamplingParams
) -> tuple[list[Completion | None], BlackBoxError | None]:
    """One completion per prompt (``None`` where none came back) and the error that cut the call."""
    try:
        results: Sequence[Sequence[Completion] | None] = teacher.complete(prompts, params, n=1)
        error = None
    except BlackBoxError as exc:
        if exc.partial is None:
            if isinstance(exc, BudgetExhausted):
                return [None] * len(prompts), exc
            raise
        results, error = exc.partial, exc
    out = [r[0] if r else None for r in results]
    return out + [None] * (len(prompts) - len(out)), error


def _after_call(stage: str, error: BlackBoxError | None) -> None:
    if isinstance(error, BudgetExhausted):
        raise _Stop(stage, str(error))
    if error is not None:
        raise error


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def generate_instructions(
    teacher: TextTeacher,
    seeds: Sequence[SeedTask],
    out_dir: str | os.PathLike[str],
    config: SelfInstructConfig | None = None,
    *,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Stage 1: new instructions until ``num_instructions`` are kept; returns the kept records
    (``id, instruction, kept, reason`` and, in Alpaca mode, ``instances``)."""
    config = config or SelfInstructConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = GroupLog(out / INSTRUCTIONS_FILE)
    fc = config.filters
    blocklist = KeywordBlocklist(fc.blocklist)
    seed_instructions = [s.instruction for s in seeds]
    seed_triples = [(s.instruction, s.instances[0].input, s.instances[0].output) for s in seeds]
    novelty = RougeNoveltyFilter(fc.rouge_threshold, seed_instructions) if fc.rouge_threshold is not None else None
    params = config.instruction_sampling()
    alpaca = config.mode == "alpaca"

    groups = log.load()
    machine: list[str] = []
    kept: list[dict[str, Any]] = []
    for rec in _records(groups):
        if rec["kept"]:
            kept.append(rec)
            machine.append(rec["instruction"])
            if novelty is not None:
                novelty.add(rec["instruction"])
    call = len(groups)
    stalled = 0
    budget = _PromptBudget(out, config, "generate_instructions")
    while len(kept) < config.num_instructions:
        if stalled >= config.patience:
            logger.warning("generate_instructions: %d calls in a row kept nothing new; stopping at %d of %d",
                           stalled, len(kept), config.num_instructions)
            break
        n_prompts = budget.take(config.prompts_per_call)
        prompts, firsts = [], []  # firsts: the number each completion continues from
        for p in range(n_prompts):
            rng = random.Random(f"{config.seed}:{call}:{p}")
            if alpaca:
                shown = rng.sample(seed_triples, min(config.alpaca_in_context, len(seed_triples)))
                prompts.append(alpaca_prompt(shown, config.alpaca_list_size))
            else:
                shown = sample_in_context(seed_instructions, machine, rng, config.num_seed_in_context,
                                          config.num_machine_in_context)
                prompts.append(instruction_prompt(shown))
            firsts.append(len(shown) + 1)
        seeded = params if params.seed is not None else replace(params, seed=call_seed(config.seed, call))
        completions, error = _complete(teacher, prompts, seeded)
        header: dict[str, Any] = {"_group": call, "prompts": 0, "malformed": 0, "truncated": 0}
        records: list[dict[str, Any]] = []
        for p, comp in enumerate(completions):
            if comp is None:
                continue
            header["prompts"] += 1
            parsed = (parse_alpaca if alpaca else parse_instructions)(comp.text, firsts[p], comp.finish_reason)
            header["malformed"] += parsed.malformed
            header["truncated"] += parsed.truncated
            for j, item in enumerate(parsed.items):
                inst = item[0] if alpaca else item
                reason = instruction_reason(inst, fc, blocklist)
                if reason is None and novelty is not None and not novelty.offer(inst):
                    reason = "rouge_l"
                rec: dict[str, Any] = {"id": f"i{call:05d}-{p:02d}-{j:02d}", "instruction": inst,
                                       "kept": reason is None, "reason": reason}
                if alpaca:
                    rec["instances"] = [{"input": item[1], "output": item[2], "finish_reason": "stop"}]
                records.append(rec)
        if header["prompts"]:
            log.append(header, records)
            budget.spend(header["prompts"])
            call += 1
        new = [r for r in records if r["kept"]]
        kept.extend(new)
        machine.extend(r["instruction"] for r in new)
        stalled = 0 if new else stalled + 1
        if progress is not None:
            progress("generate_instructions", len(kept), config.num_instructions)
        _after_call("generate_instructions", error)
    logger.info("generate_instructions: %d instructions kept", len(kept))
    return kept


def _kept_instructions(out: Path) -> list[dict[str, Any]]:
    return [r for r in _records(GroupLog(out / INSTRUCTIONS_FILE).load()) if r["kept"]]


def _by_id_stage(
    teacher: TextTeacher,
    out: Path,
    config: SelfInstructConfig,
    stage: str,
    log: GroupLog,
    todo: list[dict[str, Any]],
    make_prompt: Callable[[dict[str, Any]], str],
    params: SamplingParams,
    make_record: Callable[[dict[str, Any], Completion], tuple[dict[str, Any], int]],
    done: int,
    total: int,
    progress: Progress | None,
) -> None:
    """Send ``todo`` in calls of ``prompts_per_call`` prompts; append one record per answered task."""
    call = len(log.load())
    budget = _PromptBudget(out, config, stage)
    i = 0
    while i < len(todo):
        n = budget.take(config.prompts_per_call)
        batch = todo[i : i + n]
        completions, error = _complete(teacher, [make_prompt(t) for t in batch], params)
        records, malformed = [], 0
        for task, comp in zip(batch, completions):
            if comp is not None:
                rec, bad = make_record(task, comp)
                records.append(rec)
                malformed += bad
        if records:
            log.append({"_group": call, "prompts": len(records), "malformed": malformed}, records)
            budget.spend(len(records))
            call += 1
        done += len(records)
        if progress is not None:
            progress(stage, done, total)
        _after_call(stage, error)
        i += n


def classify_tasks(
    teacher: TextTeacher,
    out_dir: str | os.PathLike[str],
    config: SelfInstructConfig | None = None,
    *,
    progress: Progress | None = None,
) -> dict[str, bool | None]:
    """Stage 2: ``{instruction id: is_classification}`` (``None``: malformed answer, dropped)."""
    config = config or SelfInstructConfig()
    out = Path(out_dir)
    log = GroupLog(out / CLASSIFICATIONS_FILE)
    tasks = [r for r in _kept_instructions(out) if "instances" not in r]
    done = {r["id"] for r in _records(log.load())}
    todo = [t for t in tasks if t["id"] not in done]

    def record(task: dict[str, Any], comp: Completion) -> tuple[dict[str, Any], int]:
        label = parse_classification(comp.text)
        return {"id": task["id"], "is_classification": label, "answer": comp.text.strip()[:40]}, int(label is None)

    _by_id_stage(teacher, out, config, "classify_tasks", log, todo,
                 lambda t: classification_prompt(t["instruction"]), config.classify_sampling(), record,
                 len(tasks) - len(todo), len(tasks), progress)
    return {r["id"]: r["is_classification"] for r in _records(log.load())}


def generate_instances(
    teacher: TextTeacher,
    out_dir: str | os.PathLike[str],
    config: SelfInstructConfig | None = None,
    *,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Stage 3: input/output pairs for every classified instruction; returns the task records
    (``id, instruction, is_classification, instances: [{input, output, finish_reason}]``)."""
    config = config or SelfInstructConfig()
    out = Path(out_dir)
    log = GroupLog(out / INSTANCES_FILE)
    labels = {r["id"]: r["is_classification"] for r in _records(GroupLog(out / CLASSIFICATIONS_FILE).load())}
    tasks = [{**t, "is_classification": labels[t["id"]]} for t in _kept_instructions(out)
             if "instances" not in t and labels.get(t["id"]) is not None]
    done = {r["id"] for r in _records(log.load())}
    todo = [t for t in tasks if t["id"] not in done]

    def record(task: dict[str, Any], comp: Completion) -> tuple[dict[str, Any], int]:
        parsed = parse_instances(comp.text, task["is_classification"], comp.finish_reason, config.max_instances)
        instances = [{"input": i, "output": o, "finish_reason": fr} for i, o, fr in parsed.items]
        return ({"id": task["id"], "instruction": task["instruction"], "is_classification": task["is_classification"],
                 "instances": instances, "malformed": parsed.malformed, "truncated": parsed.truncated,
                 "conflicting": parsed.conflicting},
                parsed.malformed)

    _by_id_stage(teacher, out, config, "generate_instances", log, todo,
                 lambda t: instance_prompt(t["instruction"], t["is_classification"]), config.instance_sampling(),
                 record, len(tasks) - len(todo), len(tasks), progress)
    return _records(log.load())


def _example_rows(out: Path) -> list[dict[str, Any]]:
    kept = _kept_instructions(out)
    order = {t["id"]: i for i, t in enumerate(kept)}
    tasks = [t for t in kept if "instances" in t] + _records(GroupLog(out / INSTANCES_FILE).load())
    tasks.sort(key=lambda t: order.get(t["id"], len(order)))
    return [{"id": f"{t['id']}/{k}", "instruction": t["instruction"], "input": inst["input"],
             "output": inst["output"], "finish_reason": inst.get("finish_reason", "stop")}
            for t in tasks for k, inst in enumerate(t["instances"])]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@dataclass
class FilterReport:
    kept: list[dict[str, Any]]
    counts: Counter[str]
    contaminated_by: Counter[str]
    generated: int


def filter_examples(
    out_dir: str | os.PathLike[str],
    config: SelfInstructConfig | None = None,
    *,
    eval_sets: Mapping[str, Iterable[str]] | None = None,
) -> FilterReport:
    """Stage 4: example filters over every generated instance, in id order; writes
    ``filtered.jsonl`` (kept) and ``rejected.jsonl`` (with ``reason``). Deterministic: it is
    recomputed whole on every run."""
    config = config or SelfInstructConfig()
    out = Path(out_dir)
    fc = config.filters
    decon = Decontaminator(eval_sets, fc.decontam_ngram, fc.decontam_min_tokens) if eval_sets else None
    flt = ExampleFilter(fc, decon)
    rows = _example_rows(out)
    kept, rejected = [], []
    for row in rows:
        why = flt.reason(row)
        if why is None:
            kept.append({k: row[k] for k in ("id", "instruction", "input", "output")})
        else:
            flt.counts[why] += 1
            rejected.append({**row, "reason": why})
    _write_atomic(out / FILTERED_FILE, _jsonl(kept))
    _write_atomic(out / REJECTED_FILE, _jsonl(rejected))
    return FilterReport(kept, flt.counts, flt.contaminated_by, len(rows))


def export_dataset(out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Stage 5: ``data.json`` (Alpaca: a list of ``{instruction, input, output}``) and
    ``data.jsonl`` (the same with ``id``), both loadable with ``datasets.load_dataset("json", ...)``."""
    out = Path(out_dir)
    path = out / FILTERED_FILE
    if not path.exists():
        raise DataError(f"{path}: not found; run filter_examples first")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    alpaca = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in rows]
    _write_atomic(out / DATA_JSON, json.dumps(alpaca, ensure_ascii=False, indent=1) + "\n")
    _write_atomic(out / DATA_JSONL, _jsonl({"id": r["id"], **a} for r, a in zip(rows, alpaca)))
    return out / DATA_JSON, out / DATA_JSONL


# --------------------------------------------------------------------------------------------
# Counts, run directory, the whole pipeline
# --------------------------------------------------------------------------------------------


def collect_counts(out_dir: str | os.PathLike[str], report: FilterReport | None = None) -> dict[str, Any]:
    """What each stage produced and each filter dropped, from the files in ``out_dir``."""
    out = Path(out_dir)
    ig = GroupLog(out / INSTRUCTIONS_FILE).load()
    cg = GroupLog(out / CLASSIFICATIONS_FILE).load()
    eg = GroupLog(out / INSTANCES_FILE).load()
    inst = _records(ig)
    cls = _records(cg)
    tasks = _records(eg)
    dropped = Counter(r["reason"] for r in inst if not r["kept"])
    counts: dict[str, Any] = {
        "prompts": {"instructions": sum(h["prompts"] for h, _ in ig),
                    "classify": sum(h["prompts"] for h, _ in cg),
                    "instances": sum(h["prompts"] for h, _ in eg)},
        "instructions_parsed": len(inst),
        "instructions_kept": sum(r["kept"] for r in inst),
        "instructions_dropped": dict(sorted(dropped.items())),
        "malformed": {"instruction_items": sum(h["malformed"] for h, _ in ig),
                      "classifications": sum(r["is_classification"] is None for r in cls),
                      "instance_blocks": sum(r["malformed"] for r in tasks)},
        "truncated": {"instruction_items": sum(h["truncated"] for h, _ in ig),
                      "instance_blocks": sum(r.get("truncated", 0) for r in tasks)},
        "conflicting_instances": sum(r["conflicting"] for r in tasks),
        "classified": {"classification": sum(r["is_classification"] is True for r in cls),
                       "generation": sum(r["is_classification"] is False for r in cls)},
        "tasks_with_instances": sum(bool(r["instances"]) for r in tasks)
        + sum(1 for r in inst if r["kept"] and r.get("instances")),
    }
    if report is not None:
        counts["examples_generated"] = report.generated
        counts["examples_dropped"] = dict(sorted(report.counts.items()))
        if report.contaminated_by:
            counts["contaminated_by"] = dict(sorted(report.contaminated_by.items()))
        counts["examples_kept"] = len(report.kept)
    else:
        counts["examples_generated"] = len(_example_rows(out))
    return counts


def _first_difference(old: Any, new: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if diff is not None:
                return diff
        return None
    return None if old == new else (path, old, new)


def _check_run_dir(out: Path, identity: dict[str, Any]) -> None:
    path = out / RUN_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {exc.lineno}: invalid JSON: {exc.msg}") from None
        diff = _first_difference(old, identity, "")
        if diff is not None:
            key, was, now = diff
            raise ConfigError(f"{out}: holds a run with another {key!r} ({was!r}, now {now!r}); "
                              "use another output directory")
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(identity, indent=1, ensure_ascii=False) + "\n")


@dataclass
class RunResult:
    out_dir: Path
    counts: dict[str, Any]
    data_json: Path
    data_jsonl: Path
    card_md: Path
    card_json: Path


def run_self_instruct(
    teacher: TextTeacher,
    out_dir: str | os.PathLike[str],
    config: SelfInstructConfig | None = None,
    *,
    seeds: str | os.PathLike[str] | None = None,
    eval_sets: Mapping[str, Iterable[str]] | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Every stage, then the data card. Rerun on the same directory to continue a stopped run.

    Raises :class:`GenerationIncomplete` when a budget runs out (the partial data is filtered,
    exported and described in the card first) and :class:`BlackBoxError` when every generated
    example was filtered out (the card and the generated files are kept).
    """
    config = config or SelfInstructConfig()
    out = Path(out_dir)
    seed_path = Path(seeds) if seeds is not None else default_seed_path()
    seed_tasks = load_seeds(seed_path)
    seed_sha = sha256_file(seed_path)
    _check_run_dir(out, {"teacher": teacher.name, "seed_file_sha256": seed_sha, "config": config.identity()})

    stopped: _Stop | None = None
    try:
        generate_instructions(teacher, seed_tasks, out, config, progress=progress)
        if config.mode == "self_instruct":
            classify_tasks(teacher, out, config, progress=progress)
            generate_instances(teacher, out, config, progress=progress)
    except _Stop as stop:
        stopped = stop
        logger.info("%s: budget exhausted (%s); keeping the partial results", stop.stage, stop.reason)

    report = filter_examples(out, config, eval_sets=eval_sets)
    json_path, jsonl_path = export_dataset(out)
    counts = collect_counts(out, report)
    licence = config.teacher_licence or getattr(teacher, "licence", None) or "unknown"
    status = "complete" if stopped is None else f"incomplete: budget exhausted during {stopped.stage}"
    card_md, card_json = write_data_card(
        out,
        teacher_name=teacher.name,
        teacher_licence=licence,
        prompt_template=_templates(config),
        sampling_params={"instructions": config.instruction_sampling(), "classify": config.classify_sampling(),
                         "instances": config.instance_sampling()},
        budget={"max_prompts": config.max_prompts, "prompts_sent": sum(counts["prompts"].values()),
                "stopped": None if stopped is None else stopped.reason},
        counts=counts,
        seed_file_sha256=seed_sha,
        warning=LICENCE_WARNING.format(teacher=teacher.name, licence=licence),
        status=status,
        extra={"seed_file": str(seed_path), "num_seed_tasks": len(seed_tasks), "mode": config.mode,
               "output_files": [DATA_JSON, DATA_JSONL]},
    )
    if stopped is not None:
        raise GenerationIncomplete(
            f"teacher budget exhausted during {stopped.stage} ({stopped.reason}): {counts['instructions_kept']} "
            "instructions, "
            f"{counts['examples_generated']} examples generated, {counts['examples_kept']} kept after filtering "
            f"(saved in {out}; rerun with more budget to continue)"
        )
    if counts["examples_kept"] == 0:
        dropped = {**counts["instructions_dropped"], **counts["examples_dropped"]}
        detail = ", ".join(f"{k} {v}" for k, v in dropped.items()) or "nothing parseable"
        raise BlackBoxError(
            f"no examples left: all {counts['instructions_parsed']} parsed instructions and "
            f"{counts['examples_generated']} generated examples were filtered out ({detail}); "
            f"the generated files are kept in {out}"
        )
    return RunResult(out, counts, json_path, jsonl_path, card_md, card_json)


def _templates(config: SelfInstructConfig) -> dict[str, str]:
    if config.mode == "alpaca":
        return {"instructions": ALPACA_HEADER.format(n=config.alpaca_list_size)
                + "###\n1. Instruction: ...\n1. Input:\n...\n1. Output:\n...\n"}
    return {"instructions": INSTRUCTION_HEADER + "1. {instruction}\n...\n"
            f"{config.num_in_context}. {{instruction}}\n{config.num_in_context + 1}.",
            "classify": CLASSIFY_TEMPLATE, "instances_generation": INPUT_FIRST_TEMPLATE,
            "instances_classification": OUTPUT_FIRST_TEMPLATE}


__all__ = [
    "GenerationIncomplete", "Instance", "SeedTask", "SelfInstructConfig", "RunResult", "FilterReport", "GroupLog",
    "load_seeds", "default_seed_path", "sample_in_context", "instruction_prompt", "parse_instructions",
    "alpaca_prompt", "parse_alpaca", "classification_prompt", "parse_classification", "instance_prompt",
    "parse_instances", "generate_instructions", "classify_tasks", "generate_instances", "filter_examples",
    "export_dataset", "collect_counts", "run_self_instruct",
]  # fmt: skip
