"""Vocabulary trimming: a student keeping only the tokens a training corpus uses.

:func:`plan_vocabulary` tokenizes the corpus with the original tokenizer and chooses the kept ids:
every id used, the special / added tokens, the byte-fallback tokens ``<0x00>``..``<0xFF>``, and for
BPE the merge intermediates of the kept tokens (without them the trimmed tokenizer could not reach
them). :func:`trim_tokenizer` rebuilds ``tokenizer.json`` with the kept tokens renumbered densely
(old order kept), :func:`trim_model` slices the embedding and output-head rows, and
:func:`map_teacher_ids` maps teacher ids (top-k targets) to the student's, ``-1`` for dropped ones.

Why tokenization is unchanged on the corpus: BPE applies, at each step, the lowest-ranked merge among
adjacent symbols. Symbols never straddle a final token, so the merges applied inside a final token
``t`` are those of BPE run on ``t``'s characters alone: keeping those intermediates keeps every
merge the original applied, and a dropped merge was never the one chosen. WordPiece (longest match)
and Unigram (best segmentation) choose among candidates that all stay or were not chosen.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from kdistill.errors import ConfigError, DataError, ModelError
from kdistill.models.layers import text_config
from kdistill.models.student import _check_reloadable

logger = logging.getLogger(__name__)

BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
"""SentencePiece byte-fallback tokens: always kept when the vocabulary has them."""

SUPPORTED_MODELS = ("BPE", "WordPiece", "WordLevel", "Unigram")

_BATCH = 512
_TOKENIZER_KWARGS = ("model_max_length", "padding_side", "truncation_side", "clean_up_tokenization_spaces",
                     "model_input_names", "split_special_tokens", "chat_template")
"""Wrapper settings copied from the original tokenizer to the trimmed one."""


@dataclass(frozen=True)
class VocabCoverage:
    """How much of the vocabulary and of the corpus a plan keeps."""

    old_size: int
    new_size: int
    used: int  # distinct ids in the corpus
    used_kept: int  # of those, kept (all unless max_size cut)
    special: int  # special / added tokens kept
    byte_fallback: int  # <0xNN> tokens kept
    closure: int  # kept only as BPE merge intermediates
    corpus_tokens: int
    covered_tokens: int  # corpus tokens whose id is kept

    @property
    def token_coverage(self) -> float:
        """Fraction of the corpus tokens whose id is kept."""
        return self.covered_tokens / self.corpus_tokens if self.corpus_tokens else 1.0


@dataclass(frozen=True, eq=False)
class VocabPlan:
    """The kept token ids and the old ↔ new id maps.

    ``kept_ids``: sorted old ids; new id ``i`` is old id ``kept_ids[i]``. ``old_to_new``: (old V,)
    int64, ``-1`` for dropped ids. ``new_to_old``: (new V,) int64.
    """

    kept_ids: tuple[int, ...]
    old_to_new: Tensor
    new_to_old: Tensor
    coverage: VocabCoverage

    @property
    def old_size(self) -> int:
        return int(self.old_to_new.numel())

    def __repr__(self) -> str:
        return f"VocabPlan(old_size={self.old_size}, new_size={self.new_size}, coverage={self.coverage})"

    @property
    def new_size(self) -> int:
        return len(self.kept_ids)


# ---------------------------------------------------------------------------------------------- plan


def plan_vocabulary(
    tokenizer: PreTrainedTokenizerFast,
    texts: Iterable[str | Sequence[int]],
    *,
    max_size: int | None = None,
    keep_special: bool = True,
) -> VocabPlan:
    """Choose the ids to keep for ``texts`` (tokenized with the original ``tokenizer``; items that
    are lists of token ids are taken as already tokenized).

    Kept: special tokens (``keep_special``: every added token; otherwise only the named special
    tokens and added tokens the chat template mentions), byte-fallback tokens, the unknown token,
    every id the corpus uses (most frequent first when ``max_size`` cuts) and, for BPE, their merge
    intermediates. A token that does not fit ``max_size`` with its intermediates is dropped whole.
    """
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
        raise ConfigError(f"max_size must be a positive integer, not {max_size!r}")
    spec = _TokenizerSpec(tokenizer)
    counts: Counter[int] = Counter()
    for ids in _encode(tokenizer, texts):
        counts.update(ids)
    if not counts:
        raise DataError("the corpus for vocabulary trimming has no tokens")
    bad = [i for i in counts if not 0 <= i < spec.size]
    if bad:
        raise ModelError(f"tokenizer produced id {bad[0]} outside its vocabulary of {spec.size}")

    special = spec.special_ids(tokenizer, keep_special)
    byte_ids = {spec.vocab[t] for t in BYTE_TOKENS if t in spec.vocab}
    kept = set(special) | byte_ids | spec.structural_ids()
    if max_size is not None and len(kept) > max_size:
        raise ConfigError(
            f"max_size {max_size} is smaller than the {len(kept)} tokens that must be kept "
            f"({len(special)} special, {len(byte_ids)} byte-fallback)"
        )
    must = set(kept)
    used_kept: set[int] = set()
    for token_id, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if token_id not in kept:
            new = spec.closure(token_id) - kept
            if max_size is not None and len(kept) + len(new) > max_size:
                continue
            kept |= new
        used_kept.add(token_id)

    kept_ids = tuple(sorted(kept))
    old_to_new = torch.full((spec.size,), -1, dtype=torch.long)
    new_to_old = torch.tensor(kept_ids, dtype=torch.long)
    old_to_new[new_to_old] = torch.arange(len(kept_ids))
    coverage = VocabCoverage(
        old_size=spec.size,
        new_size=len(kept_ids),
        used=len(counts),
        used_kept=len(used_kept),
        special=len(special),
        byte_fallback=len(byte_ids),
        closure=len(kept - must - used_kept),
        corpus_tokens=sum(counts.values()),
        covered_tokens=sum(c for i, c in counts.items() if i in kept),
    )
    logger.info("vocabulary plan: %d of %d tokens kept (%d used, %d special, %d byte, %d merge intermediates)",
                coverage.new_size, coverage.old_size, coverage.used_kept, coverage.special,
                coverage.byte_fallback, coverage.closure)
    return VocabPlan(kept_ids, old_to_new, new_to_old, coverage)


class _TokenizerSpec:
    """The parts of a tokenizer's ``tokenizer.json`` that planning and trimming need."""

    def __init__(self, tokenizer) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelError(f"vocabulary trimming needs a fast tokenizer, not {type(tokenizer).__name__}")
        self.data: dict = json.loads(backend.to_str())
        model = self.data.get("model") or {}
        self.kind = _model_kind(model)
        if self.kind not in SUPPORTED_MODELS:
            supported = ", ".join(SUPPORTED_MODELS)
            raise ModelError(f"vocabulary trimming supports {supported} tokenizers, not {self.kind}")
        self.model = model
        if self.kind == "Unigram":
            self.vocab = {}
            for i, (piece, _) in enumerate(model["vocab"]):
                self.vocab.setdefault(piece, i)
        else:
            self.vocab = dict(model["vocab"])
        self.added = {t["content"]: t["id"] for t in self.data.get("added_tokens") or []}
        ids = list(self.vocab.values()) + list(self.added.values())
        self.size = max(ids) + 1 if ids else 0
        self._closure: dict[str, frozenset[str]] = {}
        self._ranks: dict[tuple[str, str], int] | None = None
        self._id_to_token: dict[int, str] | None = None

    def special_ids(self, tokenizer, keep_special: bool) -> set[int]:
        ids = {int(i) for i in tokenizer.all_special_ids if i is not None and 0 <= i < self.size}
        if keep_special:
            ids |= set(self.added.values())
        else:
            template = tokenizer.chat_template
            text = " ".join(template.values()) if isinstance(template, dict) else (template or "")
            ids |= {i for content, i in self.added.items() if content and content in text}
        return ids

    def structural_ids(self) -> set[int]:
        """Ids the tokenizer itself refers to: unknown token, post-processor tokens, padding."""
        ids: set[int] = set()
        model = self.model
        if self.kind == "Unigram":
            if model.get("unk_id") is not None:
                ids.add(int(model["unk_id"]))
            if model["vocab"]:  # the lowest score sets the unknown-token penalty: keep it unchanged
                ids.add(min(range(len(model["vocab"])), key=lambda i: model["vocab"][i][1]))
        elif model.get("unk_token") in self.vocab:
            ids.add(self.vocab[model["unk_token"]])
        ids |= set(_processor_ids(self.data.get("post_processor")))
        padding = self.data.get("padding")
        if padding and padding.get("pad_id") is not None:
            ids.add(int(padding["pad_id"]))
        return {i for i in ids if 0 <= i < self.size}

    def closure(self, token_id: int) -> set[int]:
        """``token_id`` and, for BPE vocabulary tokens, the ids of its merge intermediates."""
        if self.kind != "BPE":
            return {token_id}
        token = self.id_to_token.get(token_id)
        if token is None or token in self.added:
            return {token_id}
        symbols = self._intermediates(token)
        if token not in symbols:  # not reachable by merges (e.g. found whole with ignore_merges)
            logger.debug("BPE token %r is not produced by merges of its characters", token)
        return {token_id} | {self.vocab[s] for s in symbols if s in self.vocab}

    @property
    def id_to_token(self) -> dict[int, str]:
        if self._id_to_token is None:
            self._id_to_token = {i: t for t, i in self.vocab.items()}
        return self._id_to_token

    def _intermediates(self, token: str) -> frozenset[str]:
        """Every symbol BPE builds when merging ``token``'s characters alone (the characters included)."""
        cached = self._closure.get(token)
        if cached is not None:
            return cached
        if self._ranks is None:
            self._ranks = {pair: rank for rank, pair in enumerate(_merge_pairs(self.model))}
        prefix = self.model.get("continuing_subword_prefix") or ""
        suffix = self.model.get("end_of_word_suffix") or ""
        body, starts_inside, ends_word = token, False, False
        if prefix and body.startswith(prefix) and len(body) > len(prefix):
            body, starts_inside = body[len(prefix):], True
        if suffix and body.endswith(suffix) and len(body) > len(suffix):
            body, ends_word = body[: -len(suffix)], True
        last = len(body) - 1
        symbols = [
            (prefix if prefix and (i > 0 or starts_inside) else "") + c + (suffix if ends_word and i == last else "")
            for i, c in enumerate(body)
        ]
        seen = set(symbols)
        cut = len(prefix)
        ranks = self._ranks
        while len(symbols) > 1:
            best, at = None, -1
            for i in range(len(symbols) - 1):
                rank = ranks.get((symbols[i], symbols[i + 1]))
                if rank is not None and (best is None or rank < best):
                    best, at = rank, i
            if best is None:
                break
            merged = symbols[at] + symbols[at + 1][cut:]
            symbols[at: at + 2] = [merged]
            seen.add(merged)
        result = frozenset(seen)
        self._closure[token] = result
        return result


def _model_kind(model: dict) -> str:
    kind = model.get("type")
    if kind:
        return kind
    if "merges" in model:
        return "BPE"
    if "max_input_chars_per_word" in model:
        return "WordPiece"
    if isinstance(model.get("vocab"), list):
        return "Unigram"
    return "WordLevel"


def _merge_pairs(model: dict) -> Iterator[tuple[str, str]]:
    for merge in model.get("merges") or []:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(parts) != 2:
            raise ModelError(f"tokenizer.json has a malformed BPE merge {merge!r}")
        yield parts[0], parts[1]


def _processor_ids(processor: dict | None) -> Iterator[int]:
    if not processor:
        return
    kind = processor.get("type")
    if kind == "Sequence":
        for inner in processor.get("processors") or []:
            yield from _processor_ids(inner)
    elif kind == "TemplateProcessing":
        for entry in (processor.get("special_tokens") or {}).values():
            yield from (int(i) for i in entry.get("ids") or [])
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            if processor.get(key):
                yield int(processor[key][1])


def _encode(tokenizer, texts: Iterable[str | Sequence[int]]) -> Iterator[list[int]]:
    """Token ids of each text (special tokens added, no truncation or padding), in batches.

    An item that is already a sequence of token ids (e.g. a tokenized training example) is used as is.
    """
    batch: list[str] = []
    for n, text in enumerate(texts):
        if isinstance(text, (list, tuple)) and all(isinstance(i, int) for i in text):
            yield list(text)
            continue
        if not isinstance(text, str):
            raise DataError(f"corpus text {n} is a {type(text).__name__}, not a string")
        batch.append(text)
        if len(batch) == _BATCH:
            yield from _encode_batch(tokenizer, batch)
            batch = []
    if batch:
        yield from _encode_batch(tokenizer, batch)


def _encode_batch(tokenizer, batch: list[str]) -> list[list[int]]:
    return tokenizer(batch, add_special_tokens=True, truncation=False, padding=False, verbose=False)["input_ids"]


# ----------------------------------------------------------------------------------------- tokenizer


def trim_tokenizer(tokenizer: PreTrainedTokenizerFast, plan: VocabPlan) -> PreTrainedTokenizerFast:
    """A fast tokenizer with only the kept tokens, renumbered ``old_to_new``.

    The model vocabulary (BPE: with the merges whose parts and result are kept, ``byte_fallback``
    as it was), added tokens, post-processor and padding ids are remapped; normalizer,
    pre-tokenizer and decoder are unchanged. Saved, it reloads with ``AutoTokenizer``.
    """
    spec = _TokenizerSpec(tokenizer)
    if spec.size != plan.old_size:
        raise ConfigError(f"the vocabulary plan is for {plan.old_size} tokens, the tokenizer has {spec.size}")
    old_to_new = plan.old_to_new.tolist()

    def new_id(old: int, what: str) -> int:
        new = old_to_new[old] if 0 <= old < len(old_to_new) else -1
        if new < 0:
            raise ModelError(f"{what} (id {old}) is not kept by the vocabulary plan")
        return new

    data = copy.deepcopy({k: v for k, v in spec.data.items() if k != "model"})
    model = {k: v for k, v in spec.model.items() if k not in ("vocab", "merges")}
    if spec.kind == "Unigram":
        kept_pieces = [i for i in range(len(spec.model["vocab"])) if old_to_new[i] >= 0]
        if [old_to_new[i] for i in kept_pieces] != list(range(len(kept_pieces))):
            raise ModelError("the Unigram pieces are not the first ids of the vocabulary: cannot renumber them")
        model["vocab"] = [list(spec.model["vocab"][i]) for i in kept_pieces]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id(int(model["unk_id"]), "the unknown token")
    else:
        vocab = {token: old_to_new[i] for token, i in spec.vocab.items() if old_to_new[i] >= 0}
        model["vocab"] = vocab
        if spec.kind == "BPE":
            cut = len(spec.model.get("continuing_subword_prefix") or "")
            raw = spec.model.get("merges") or []
            model["merges"] = [
                merge for merge, (a, b) in zip(raw, _merge_pairs(spec.model))
                if a in vocab and b in vocab and a + b[cut:] in vocab
            ]
        if model.get("unk_token") is not None and model["unk_token"] in spec.vocab and model["unk_token"] not in vocab:
            raise ModelError(f"the unknown token {model['unk_token']!r} is not kept by the vocabulary plan")
    data["model"] = model
    data["added_tokens"] = [
        {**token, "id": old_to_new[token["id"]]} for token in data.get("added_tokens") or []
        if old_to_new[token["id"]] >= 0
    ]
    data["post_processor"] = _remap_processor(data.get("post_processor"), new_id)
    if data.get("padding") and data["padding"].get("pad_id") is not None:
        data["padding"]["pad_id"] = new_id(int(data["padding"]["pad_id"]), "the padding token")

    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_str(json.dumps(data))
    except Exception as exc:
        raise ModelError(f"the trimmed tokenizer.json does not load: {exc}") from exc
    if backend.get_vocab_size(with_added_tokens=True) != plan.new_size:
        raise ModelError(
            f"the trimmed tokenizer has {backend.get_vocab_size(with_added_tokens=True)} tokens, "
            f"the plan keeps {plan.new_size}"
        )
    trimmed = PreTrainedTokenizerFast(tokenizer_object=backend, **_wrapper_kwargs(tokenizer, backend))
    logger.info("trimmed %s tokenizer: %d -> %d tokens", spec.kind, plan.old_size, plan.new_size)
    return trimmed


def _remap_processor(processor: dict | None, new_id) -> dict | None:
    if not processor:
        return processor
    kind = processor.get("type")
    if kind == "Sequence":
        processor["processors"] = [_remap_processor(p, new_id) for p in processor.get("processors") or []]
    elif kind == "TemplateProcessing":
        for name, entry in (processor.get("special_tokens") or {}).items():
            entry["ids"] = [new_id(int(i), f"post-processor token {name!r}") for i in entry.get("ids") or []]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            if processor.get(key):
                token, old = processor[key]
                processor[key] = [token, new_id(int(old), f"post-processor token {token!r}")]
    return processor


def _wrapper_kwargs(tokenizer, backend) -> dict:
    """Named special tokens (kept ones) and wrapper settings of ``tokenizer``."""
    vocab = backend.get_vocab(with_added_tokens=True)
    kwargs: dict = {}
    for name, token in tokenizer.special_tokens_map.items():
        if isinstance(token, str) and token in vocab:
            kwargs[name] = token
        elif token is not None:
            logger.warning("special token %s=%r is not kept: dropped from the trimmed tokenizer", name, token)
    extra = [str(t) for t in getattr(tokenizer, "extra_special_tokens", None) or []]
    if extra:
        kwargs["extra_special_tokens"] = [t for t in extra if t in vocab]
    for name in _TOKENIZER_KWARGS:
        value = getattr(tokenizer, name, None)
        if value is not None:
            kwargs[name] = copy.deepcopy(value)
    return kwargs


# --------------------------------------------------------------------------------------------- model


def vocabulary_parameters(model: PreTrainedModel) -> list[Tensor]:
    """The parameters :func:`trim_model` replaces: input embeddings' weight, output head's weight
    and bias (a tied weight once). Empty where the model has no ``nn.Embedding`` input embeddings."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    if not isinstance(embeddings, nn.Embedding):
        return []
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    found = [embeddings.weight] + ([head.weight, head.bias] if isinstance(head, nn.Linear) else [])
    return list({id(p): p for p in found if p is not None}.values())


def trim_model(model: PreTrainedModel, plan: VocabPlan) -> PreTrainedModel:
    """Keep only the rows of ``plan.kept_ids`` in ``model``'s embeddings and output head (in place).

    Slices the input embeddings, the output embeddings and their bias (tied or not: tying is
    kept), ``final_logits_bias`` if any; sets ``vocab_size`` and remaps the config's and the
    generation config's token ids (``pad_token_id``, ``eos_token_id``, ...). Kept ids beyond the
    model's rows (tokens the tokenizer has and the model lacks) get the mean row, as
    ``resize_token_embeddings`` does. Returns ``model``.
    """
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    if not isinstance(embeddings, nn.Embedding):
        raise ModelError(f"{type(model).__name__} has no nn.Embedding input embeddings to trim")
    rows = embeddings.num_embeddings
    kept = plan.new_to_old
    beyond = int((kept >= rows).sum())
    if beyond:
        logger.warning("%d kept token ids are beyond the %d embedding rows of %s: initialised to the mean row",
                       beyond, rows, type(model).__name__)
    if rows > plan.old_size:
        logger.info("%s has %d embedding rows for a tokenizer of %d: the extra rows are dropped",
                    type(model).__name__, rows, plan.old_size)

    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is not None and not isinstance(head, nn.Linear):
        raise ModelError(f"{type(model).__name__}'s output head is a {type(head).__name__}, not nn.Linear")
    if head is not None and head.out_features != rows:
        raise ModelError(f"{type(model).__name__}'s output head has {head.out_features} rows, "
                         f"its embeddings {rows}: cannot trim")

    targets = [embeddings.weight] + ([head.weight, head.bias] if head is not None else [])
    _slice_parameters(model, [p for p in targets if p is not None], kept, rows)
    embeddings.num_embeddings = plan.new_size
    if embeddings.padding_idx is not None:
        pad = _map_id(embeddings.padding_idx, plan)
        embeddings.padding_idx = pad if pad >= 0 else None
    if head is not None:
        head.out_features = plan.new_size
    final_bias = getattr(model, "final_logits_bias", None)
    if isinstance(final_bias, Tensor) and final_bias.shape[-1] == rows:
        model.final_logits_bias = _take_rows(final_bias.transpose(0, -1), kept, rows).transpose(0, -1).contiguous()

    config = text_config(model)
    config.vocab_size = plan.new_size
    if model.config is not config and getattr(model.config, "vocab_size", None) == rows:
        model.config.vocab_size = plan.new_size
    for cfg in {id(c): c for c in (model.config, config, getattr(model, "generation_config", None)) if c}.values():
        _remap_token_ids(cfg, plan)
    _check_reloadable(model)
    logger.info("trimmed %s vocabulary: %d -> %d rows", type(model).__name__, rows, plan.new_size)
    return model


def _take_rows(tensor: Tensor, kept: Tensor, rows: int) -> Tensor:
    kept = kept.to(tensor.device)
    inside = kept < rows
    if bool(inside.all()):
        return tensor.detach()[kept].clone()
    out = tensor.detach().new_empty((kept.numel(), *tensor.shape[1:]))
    out[inside] = tensor.detach()[kept[inside]]
    out[~inside] = tensor.detach()[:rows].float().mean(0).to(tensor.dtype)
    return out


def _slice_parameters(model: nn.Module, params: list[Tensor], kept: Tensor, rows: int) -> None:
    """Replace each parameter by its kept rows wherever the model holds it (tied copies stay tied)."""
    new: dict[int, nn.Parameter] = {}
    for param in params:
        if id(param) not in new:
            new[id(param)] = nn.Parameter(_take_rows(param, kept, rows), requires_grad=param.requires_grad)
    for module in model.modules():
        for name, value in list(module._parameters.items()):
            if value is not None and id(value) in new:
                module._parameters[name] = new[id(value)]


def _map_id(old: int, plan: VocabPlan) -> int:
    return int(plan.old_to_new[old]) if 0 <= old < plan.old_size else -1


def _remap_token_ids(config, plan: VocabPlan) -> None:
    """Remap every ``*_token_id(s)`` / ``*_token_index`` field; dropped ids become None (with a warning)."""
    fields = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    for name in fields:
        if not name.endswith(("_token_id", "_token_ids", "_token_index")):
            continue
        value = getattr(config, name, None)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            new = _map_id(value, plan)
            if new < 0:
                logger.warning("%s %s=%d is not kept by the vocabulary plan: set to None",
                               type(config).__name__, name, value)
            setattr(config, name, new if new >= 0 else None)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            mapped = [_map_id(v, plan) for v in value]
            if any(v < 0 for v in mapped):
                logger.warning("%s %s=%s has ids not kept by the vocabulary plan: dropped",
                               type(config).__name__, name, value)
            setattr(config, name, type(value)(v for v in mapped if v >= 0))


# ------------------------------------------------------------------------------------------- helpers


def map_teacher_ids(ids: Tensor, plan: VocabPlan) -> Tensor:
    """Teacher token ids → student ids; dropped, negative (unused slots) or out-of-range ids → ``-1``.

    Applied to sparse top-k targets, the teacher mass on dropped tokens falls into the tail bucket.
    """
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ConfigError(f"teacher ids must be an integer tensor, not {ids.dtype}")
    ids = ids.long()
    table = plan.old_to_new.to(ids.device)
    valid = (ids >= 0) & (ids < table.numel())
    return torch.where(valid, table[ids.clamp(0, table.numel() - 1)], torch.full_like(ids, -1))


def tokenization_agreement(
    original: PreTrainedTokenizerFast, trimmed: PreTrainedTokenizerFast, plan: VocabPlan, texts: Iterable[str]
) -> float:
    """Fraction of tokens where ``trimmed`` reproduces ``original``'s ids mapped through ``old_to_new``.

    Per text, the tokens in matching blocks of the two id sequences (``difflib``) count as agreeing;
    the denominator is the longer sequence's length, summed over texts.
    """
    old_to_new = plan.old_to_new.tolist()
    texts = list(texts)
    agree = total = 0
    for want_old, have in zip(_encode(original, texts), _encode(trimmed, texts)):
        want = [old_to_new[i] if 0 <= i < len(old_to_new) else -1 for i in want_old]
        total += max(len(want), len(have))
        if want == have:
            agree += len(want)
        else:
            matcher = difflib.SequenceMatcher(None, want, have, autojunk=False)
            agree += sum(block.size for block in matcher.get_matching_blocks())
    return agree / total if total else 1.0
