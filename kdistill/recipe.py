"""The recipe: what to distil, from what, on which data, with which objective and hyper-parameters.

A recipe is data-only YAML (it never names code to import), validated once by pydantic and saved
next to every output. Field names follow ``transformers`` where one exists
(``per_device_train_batch_size``, ``learning_rate``, ``gradient_accumulation_steps``, ``bf16``).
Command-line overrides are ``key.sub=value`` (the value parsed as YAML: ``training.learning_rate=1e-4``,
``objective.0.weight=2``). A mistake is a :class:`~kdistill.errors.ConfigError` naming the file,
the line and the field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdistill.errors import ConfigError

Task = Literal["classification", "mlm", "causal"]
Positions = Literal["default", "labels", "tokens", "examples"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherSpec(_Strict):
    """A teacher: a model reference (hub id, local dir or alias), its weight in an ensemble, and the
    precision its body runs in (``bfloat16``: bf16 weights and autocast, head and logits fp32; see
    ``kdistill.models.precision``). ``kdistill cache`` and a live teacher both honour ``dtype``; a
    cache's manifest hashes the weights as run, so a cache refuses a recipe with the other dtype."""

    model: str
    weight: float = Field(1.0, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"


class VocabSpec(_Strict):
    """Trim the student's vocabulary to the tokens the training corpus uses (+ special and byte tokens)."""

    keep: Literal["corpus"] = "corpus"
    max_size: int | None = Field(None, ge=2)


class StudentInit(_Strict):
    """Build the student from the teacher's layers (optionally with a trimmed vocabulary)."""

    strategy: Literal["every_other", "uniform", "first", "explicit"] = "every_other"
    num_layers: int | None = Field(None, ge=1)
    layers: list[int] | None = None
    vocab: VocabSpec | None = None


class StudentSpec(_Strict):
    """The student: its own model reference, or built from the (first) teacher."""

    model: str | None = None
    init_from_teacher: StudentInit | None = None

    @model_validator(mode="after")
    def _one_way(self) -> StudentSpec:
        if (self.model is None) == (self.init_from_teacher is None):
            raise ValueError("give exactly one of student.model and student.init_from_teacher")
        return self


class SplitSpec(_Strict):
    """One data split: a file or HF dataset, with an optional row limit."""

    source: str
    format: str | None = None
    split: str | None = None
    config_name: str | None = None
    limit: int | None = Field(None, ge=1)


class DataSpec(_Strict):
    train: SplitSpec
    validation: SplitSpec | None = None
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = Field(None, min_length=2)  # class names; a classifier needs two or more
    max_length: int = Field(128, ge=8)
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    format: Literal["text", "instruction"] = "text"  # causal LM: raw text, or instruction/response rows
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    template: Literal["alpaca", "chat"] = "alpaca"

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str] | None) -> list[str] | None:
        repeated = sorted({name for name in labels or [] if labels.count(name) > 1})
        if repeated:
            raise ValueError(f"label names must differ; repeated: {', '.join(map(repr, repeated))}")
        return labels


class TermSpec(_Strict):
    """One objective term: a loss ``kind`` (see ``kdistill losses``, plus ``ce``), its weight and options.

    positions: where token-level terms are computed: ``labels`` (positions with a label, e.g. the
    masked tokens of MLM or the next tokens of a causal LM), ``tokens`` (every non-padding token),
    ``examples`` (one per example: classification logits, pooled states). ``default`` picks
    ``examples`` for classification and ``labels`` otherwise for response terms and ``ce``,
    ``tokens`` for feature and relation terms.
    layers: (student, teacher) pairs of hidden-state indices (0 = embeddings, -1 = last) or module
    paths, for feature terms; the hidden state for pooled relation terms.
    modules: (student, teacher) module paths whose outputs feed ``attention_relation_kl`` (e.g. the
    query projections of one layer).
    """

    kind: str
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    scale_by_t2: bool = True
    beta: float = Field(0.5, ge=0, le=1)
    alpha: float = Field(0.1, ge=0, lt=1)
    positions: Positions = "default"
    layers: list[tuple[int | str, int | str]] = Field(default_factory=list)
    modules: list[tuple[str, str]] = Field(default_factory=list)
    num_relation_heads: int = Field(1, ge=1)
    missing_mass: Literal["tail", "renormalize"] = "tail"  # sparse (cached) targets: mass outside the top-k

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        from kdistill.losses import get_loss

        if kind != "ce":
            try:
                get_loss(kind)
            except ConfigError as error:  # pydantic reports ValueErrors with their location
                raise ValueError(f"{error}, ce") from None
        return kind


class SignalSpec(_Strict):
    """Where teacher targets come from: a live teacher, or a top-k cache written by ``kdistill cache``."""

    source: Literal["live", "cache"] = "live"
    cache_dir: str | None = None  # default: <output_dir>/cache
    k: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    sampled: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(1024, ge=1)


class TextTeacherSpec(_Strict):
    """A black-box teacher: a local HF causal LM, or a model behind an OpenAI-compatible API.

    The API key is read from the environment variable ``api_key_env`` only (never from the recipe).
    Every request and answer is recorded (SQLite in the run's ``data/``) unless ``replay: false``,
    so a rerun costs nothing.
    """

    backend: Literal["local", "openai", "replay"] = "local"
    model: str  # for replay: the recorded teacher's name, e.g. local:gemma-3-270m
    base_url: str | None = None
    replay_file: str | None = None  # backend replay: answers only from this recording (no teacher runs)
    dtype: Literal["float32", "bfloat16"] | None = None  # backend local: load precision (bf16: faster on CPU)
    api_key_env: str = "OPENAI_API_KEY"
    chat: bool = False
    batch_size: int = Field(8, ge=1)
    max_concurrency: int = Field(4, ge=1)
    max_requests: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    replay: bool = True

    # the settings each backend uses besides backend and model; one changed from its default for
    # another backend is refused (a written-out recipe holds every default)
    _USED_BY: ClassVar[dict[str, set[str]]] = {
        "local": {"dtype", "batch_size", "replay"},
        "openai": {"base_url", "api_key_env", "chat", "batch_size", "max_concurrency", "max_requests", "max_tokens",
                   "replay"},
        "replay": {"replay_file", "batch_size"},
    }

    @model_validator(mode="after")
    def _url(self) -> TextTeacherSpec:
        changed = {name for name, spec in type(self).model_fields.items() if getattr(self, name) != spec.default}
        unused = sorted(changed - self._USED_BY[self.backend] - {"backend", "model"})
        if unused:
            users = [b for b, used in self._USED_BY.items() if unused[0] in used]
            raise ValueError(f"{unused[0]} has no effect with backend {self.backend} (it is for backend "
                             f"{' or '.join(users)}); remove it")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("an openai backend needs base_url (e.g. https://api.openai.com/v1)")
        if self.backend == "replay" and not self.replay_file:
            raise ValueError("a replay backend needs replay_file (a recording of teacher calls)")
        return self


class AugmentSpec(_Strict):
    """GPT3Mix augmentation: what the prompt says, how many examples to write, how to mix them in."""

    teacher: TextTeacherSpec
    text_type: str
    label_type: str
    verbalizers: list[str] | None = None  # label names as the teacher writes them (default: data.labels)
    k: int = Field(4, ge=1)
    sampling: Literal["uniform", "balanced"] = "balanced"
    num_examples: int = Field(100, ge=1)
    seed: int = 0
    temperature: float = Field(0.9, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    top_logprobs: int = Field(10, ge=1)
    votes: int = Field(8, ge=1)
    ratio: float = Field(1.0, ge=0)  # synthetic : real rows when training

    @field_validator("verbalizers")
    @classmethod
    def _parseable(cls, names: list[str] | None) -> list[str] | None:
        """The teacher writes "<text> (<label_type>: <name>)": a name must fit between ':' and ')'."""
        for name in names or []:
            if not name.strip() or any(c in name for c in ")\n"):
                raise ValueError(f"verbalizer {name!r} could never be read back from the teacher's "
                                 "'(<label_type>: <name>)'; use a non-empty name without ')' or a line break")
        return names


class GenerateSpec(_Strict):
    """Self-Instruct / Alpaca generation of instruction data by a black-box teacher."""

    teacher: TextTeacherSpec
    mode: Literal["self_instruct", "alpaca"] = "self_instruct"
    seeds: str | None = None  # Self-Instruct JSONL or Alpaca JSON; default: kdistill's built-in seed tasks
    num_instructions: int = Field(100, ge=1)
    max_instances: int = Field(5, ge=1)
    prompts_per_call: int = Field(5, ge=1)
    max_prompts: int | None = Field(None, ge=1)
    eval_sets: list[str] = Field(default_factory=list)  # files of evaluation texts to decontaminate against
    seed: int = 0
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_new_tokens: int | None = Field(None, ge=1)


class TrainingSpec(_Strict):
    per_device_train_batch_size: int = Field(16, ge=1)
    per_device_eval_batch_size: int = Field(64, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = 1.0
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int = Field(2, ge=1)
    metric_for_best_model: str | None = None
    early_stopping_patience: int | None = Field(None, ge=1)
    bf16: bool = False
    gradient_checkpointing: bool = False  # recompute the student's layer activations in backward: less memory, more compute
    lean_activations: bool = True  # RMSNorms and gated MLPs keep only what backward needs (same forward; kdistill.models.lean)
    trim_heap: bool = False  # CPU: give freed heap pages back within each step: lower peak RSS, slower (kdistill.distill.memory)
    compile: bool = False  # torch.compile the student's and live teachers' forwards (kdistill.distill.compiled)
    seed: int = 42


class Recipe(_Strict):
    name: str
    task: Task
    output_dir: str | None = None
    teachers: list[TeacherSpec] = Field(default_factory=list)
    student: StudentSpec
    data: DataSpec
    objective: list[TermSpec]
    training: TrainingSpec = TrainingSpec()
    augment: AugmentSpec | None = None
    generate: GenerateSpec | None = None
    signal: SignalSpec = SignalSpec()
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _teacher_shorthand(cls, values: Any) -> Any:
        """``teacher: ref`` is shorthand for ``teachers: [{model: ref}]``."""
        if isinstance(values, dict) and "teacher" in values:
            values = dict(values)
            teacher = values.pop("teacher")
            if teacher is not None:
                if "teachers" in values:
                    raise ValueError("give teacher or teachers, not both")
                values["teachers"] = [teacher if isinstance(teacher, dict) else {"model": teacher}]
        return values

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if not self.objective:
            raise ValueError("objective: give at least one term")
        needs_teacher = [t.kind for t in self.objective if t.kind != "ce"]
        if needs_teacher and not self.teachers:
            raise ValueError(f"objective terms {needs_teacher} need a teacher; add teacher: <model>")
        if self.student.init_from_teacher is not None and not self.teachers:
            raise ValueError("student.init_from_teacher needs a teacher")
        if self.signal.source == "cache":
            if self.task != "causal":
                raise ValueError(f"signal.source cache is for causal LMs, not task {self.task}")
            for term in self.objective:
                if term.kind == "ce":
                    continue
                from kdistill.losses import get_loss

                if get_loss(term.kind).family != "response":
                    raise ValueError(f"objective term {term.kind} needs a live teacher (the cache holds top-k targets)")
                if term.temperature != self.signal.temperature:
                    raise ValueError(f"objective term {term.kind} has temperature {term.temperature} but the cache is "
                                     f"written at signal.temperature {self.signal.temperature}")
        init = self.student.init_from_teacher
        if init is not None and init.vocab is not None and self.task != "causal":
            raise ValueError(f"student.init_from_teacher.vocab only trims causal LMs, not a {self.task} model")
        if self.augment is not None and self.task != "classification":
            raise ValueError(f"augment (GPT3Mix) makes classification data; task is {self.task}")
        if self.generate is not None and self.task != "causal":
            raise ValueError(f"generate (Self-Instruct) makes instruction data for a causal LM; task is {self.task}")
        if (self.training.early_stopping_patience and self.data.validation is None
                and not self.data.validation_fraction):
            raise ValueError("training.early_stopping_patience needs a validation split to watch: give "
                             "data.validation or data.validation_fraction")
        if self.training.early_stopping_patience and not self.training.eval_steps:
            raise ValueError("training.early_stopping_patience needs training.eval_steps (without it the "
                             "validation split is scored only after the last step)")
        if self.data.format == "instruction" and self.task != "causal":
            raise ValueError(f"data.format instruction needs task causal, not {self.task}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or os.path.join("runs", self.name))

    @property
    def cache_dir(self) -> Path:
        return Path(self.signal.cache_dir) if self.signal.cache_dir else self.run_dir / "cache"


# ------------------------------------------------------------------ loading, overrides, errors


def _yaml_line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at pydantic location ``loc`` (closest existing parent)."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(key)), None)
            if match is None:
                match = next((k for k, v in node.value if k.value == str(key)), None)
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` (value parsed as YAML; list items by index) in a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key (expected key.sub=value)")
        target: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(target, list):
                if not part.isdigit() or int(part) >= len(target):
                    raise ConfigError(f"override {key!r}: {'.'.join(parts[:i]) or key} has no item {part}")
                index: Any = int(part)
            elif isinstance(target, dict):
                index = part
            else:
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])} is not a mapping or list")
            if last:
                try:
                    target[index] = yaml.safe_load(raw)
                except yaml.YAMLError as error:
                    problem = getattr(error, "problem", None) or _first_line(error)
                    raise ConfigError(f"override {item!r}: malformed YAML value: {problem}") from None
            else:
                if isinstance(target, dict) and target.get(index) is None:
                    target[index] = {}
                target = target[index]
    return data


def _duplicate_key(node) -> tuple[str, int, int] | None:
    """The first key written twice in one mapping of the composed YAML: (key, line, first line)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key, value in node.value:
            name = getattr(key, "value", None)
            if isinstance(name, str) and name in seen:
                return name, key.start_mark.line + 1, seen[name]
            seen[name] = key.start_mark.line + 1
            found = _duplicate_key(value)
            if found is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item)
            if found is not None:
                return found
    return None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]


def parse_recipe(text: str, source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    """Validate recipe YAML ``text``; errors name ``source``, the line and the field."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as error:
        mark, context = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or _first_line(error)
        if context is not None and mark is not None and context.line != mark.line:
            problem += f" ({getattr(error, 'context', '') or 'in the block'} from line {context.line + 1})"
        raise ConfigError(f"{source}{where}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a YAML mapping (name:, task:, student:, ...)")
    duplicate = _duplicate_key(root)
    if duplicate is not None:
        key, line, first = duplicate
        raise ConfigError(f"{source} line {line}: duplicate key {key!r} (first at line {first}); YAML would keep "
                          "only the last")
    data = apply_overrides(data, overrides or [])
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_validation_message(error, root, source, overrides or [])) from None
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def _validation_message(error: ValidationError, root, source: str, overrides: list[str]) -> str:
    """``<source> line N, <field>: <message>``, or ``override 'k=v', <field>: ...`` when an override set it."""
    # an unknown field is usually a misspelt known one: report it before the "missing" it causes
    first = sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    loc = tuple(first["loc"])
    field = ".".join(str(p) for p in loc) or "recipe"
    message = first["msg"].removeprefix("Value error, ")
    named = re.match(r"([a-z_]+(?:\.[a-z_0-9]+)+) (.*)", message, re.DOTALL) if not loc else None
    if named:  # a check across fields whose message starts with the field at fault: point at that field
        field, message = named.groups()
        loc = tuple(int(p) if p.isdigit() else p for p in field.split("."))
    if first["type"] == "missing":
        message = "required field is missing"
    elif first["type"] == "extra_forbidden":
        message = "unknown field"
    # the last override that set this field or one above or below it, else the recipe's line
    for item in reversed(overrides):
        key = tuple(item.split("=", 1)[0].split("."))
        if key and [str(p) for p in loc[:len(key)]] == list(key[:len(loc)]):
            return f"override {item!r}, {field}: {message}"
    line = _yaml_line(root, loc)
    where = f" line {line}" if line is not None else ""
    return f"{source}{where}, {field}: {message}"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate the recipe at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read recipe {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
    return parse_recipe(text, str(path), overrides)


def dump_recipe(recipe: Recipe) -> str:
    """The validated recipe as YAML (every default written out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
