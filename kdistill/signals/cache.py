"""Offline teacher-signal cache for causal-LM distillation: run the teacher once, train from disk.

Layout of ``cache_dir``::

    manifest.json                 what the signal is and where it came from (rewritten atomically
                                  after every shard; see :class:`Manifest`)
    shard-00000.safetensors       examples 0 … shard_size − 1 of the data, in the given order
    shard-00001.safetensors       …

Each shard holds, for its E examples and their R valid positions (``attention_mask`` = 1):

| tensor | shape, dtype | content |
|---|---|---|
| ``example_ids`` | (E,) int64 | the examples' ``example_id`` |
| ``lengths`` | (E,) int64 | ``len(input_ids)`` |
| ``offsets`` | (E,) int64 | first row of each example in the row tensors |
| ``valid`` | (Σ lengths,) uint8 | the examples' attention masks, concatenated (1 = has a row) |
| ``topk`` | (R, bytes_per_token) uint8 | top-k ids and log p_T at ``temperature``, normalised over the full vocabulary (:mod:`kdistill.signals.encoding`) |
| ``sampled_n`` | (R,) int32 | number of distinct sampled ids per row (``sampled`` > 0) |
| ``sampled_ids``, ``sampled_counts`` | (Σ sampled_n,) int32 | distinct ids drawn from p_T and how often |
| ``hidden.<l>`` | (R, H) float16 | ``hidden_states[l]`` of the teacher (0 = embeddings) |

Rows are position-aligned with the example: row j of an example is the teacher's distribution at
position j (the prediction of token j + 1; the trainer shifts as for logits). Rows are keyed by
``example_id``, never by step, so any order or batching of the data reads the same targets.

**Sampled targets** (``sampled`` = s > 0) follow RS-KD / Gemma 3: s token ids drawn from p_T with
replacement per position, kept as distinct ids with counts c. ``Σ_i (c_i / s) f(x_i)`` is an
unbiased estimate of ``E_{p_T} f``; in particular ``−Σ_i (c_i/s) log q(x_i)`` estimates the full
cross-entropy. :meth:`TeacherCache.sampled` returns them as :class:`SparseTargets` with
``logprobs = log(c_i / s)`` (they sum to 1: use them with ``soft_ce`` and ``missing_mass="ignore"``).
Draws come from a generator seeded by ``(seed, example_id)``: the same whatever the batching, up
to a rare draw that lands on another token where the teacher's last bits differ between batch
compositions (the same shards, as when resuming, give the same bytes).

**Resume**: a shard is written to ``*.tmp`` and renamed, then the manifest lists it with its
sha256. Rerunning :func:`write_cache` on the same directory skips the examples of listed shards
(by id) and writes the rest in shards of the same composition, so an interrupted cache finished
later equals an uninterrupted one. A directory holding another signal (teacher, tokenizer, data,
k, temperature, … differ) is refused with :class:`~kdistill.errors.ConfigError`.

Cost: one teacher forward per example; the head is applied to valid positions only, in chunks of
``chunk_rows`` rows written into reused buffers (the head GEMM vocabulary-blocked on a CPU, and
with an fp32 head the top-k and tail mass taken block by block while the block is in cache,
:meth:`_ShardWriter._top_streamed`), so no (B × L × V) tensor is built. For the packaged Gemma 3
270M on 2 CPU cores, writing took 1.13× the plain forward (``model(**batch).logits``), 0.99×
without hashing the weights once (0.8 s), where the in-place softmax it replaces took 1.20× and
1.05× in the same session (medians of 5 alternating rounds), and 1.6× on an H200 for a
Gemma-3-270M-sized teacher (``benchmarks/cache_size.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from kdistill.errors import ConfigError, DataError, ShapeError
from kdistill.hashing import sha256_file
from kdistill.losses.projection import head_blocks, is_blocked, project_into
from kdistill.losses.response import SparseTargets
from kdistill.models.heads import lm_head_of
from kdistill.models.layers import config_layer_count, text_config
from kdistill.models.outputs import forward_outputs
from kdistill.signals.encoding import TopKFormat, decode_topk, encode_topk

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK_LOGITS = {"cpu": 2**28, "cuda": 2**29}  # logits per head call: 1,024 / 2,048 rows at V = 262,144
MANIFEST = "manifest.json"

# Manifest fields that define the signal: all must agree to resume a cache or to use it.
_SIGNAL_FIELDS = (
    "format_version", "teacher_sha256", "tokenizer_sha256", "chat_template_sha256", "data_sha256",
    "k", "temperature", "vocab_size", "sampled", "seed", "hidden_layers", "encoding",
)
_FIELD_NAMES = {
    "teacher_name": "teacher", "teacher_sha256": "hash of the teacher's weights", "tokenizer_sha256": "tokenizer",
    "chat_template_sha256": "chat template", "data_sha256": "data", "vocab_size": "vocabulary size",
    "sampled": "number of sampled targets", "hidden_layers": "cached hidden layers",
}


@dataclass
class Manifest:
    """Contents of ``manifest.json``.

    Hashes are sha256 hex digests (:func:`hash_model`, :func:`hash_tokenizer`,
    :func:`hash_chat_template`, :func:`hash_examples`). ``n_examples`` / ``n_tokens`` count the
    whole data (all shards when complete); ``shards`` lists the complete shards in order, each
    ``{file, sha256, bytes, n_examples, n_tokens, min_example_id, max_example_id}``.
    ``extra``: the caller's ``manifest_fields`` (e.g. the recipe), not checked.
    """

    format_version: int
    teacher_name: str
    teacher_sha256: str
    tokenizer_sha256: str | None
    chat_template_sha256: str | None
    data_sha256: str
    k: int
    temperature: float
    vocab_size: int
    sampled: int
    seed: int
    hidden_layers: list[int]
    hidden_size: int | None
    encoding: dict
    bytes_per_token: int
    n_examples: int
    n_tokens: int
    shards: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return sum(s["n_examples"] for s in self.shards) == self.n_examples

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(data, dict):
            raise DataError(f"{where}: not a cache manifest (expected a JSON object)")
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{where}: format_version {data.get('format_version')!r} is not supported "
                f"(this kdistill reads {FORMAT_VERSION})"
            )
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data) - {"shards", "extra"})
        if missing:
            raise DataError(f"{where}: missing field {missing[0]!r}")
        for f in fields(cls):  # a hand-edited value of the wrong type is named, not a TypeError later
            if f.name in data and not _has_type(data[f.name], f.type):
                raise DataError(f"{where}: field {f.name!r} should be {f.type}, got {data[f.name]!r}")
        for i, shard in enumerate(data.get("shards", [])):
            for key, kind in _SHARD_FIELDS.items():
                if not _has_type(shard.get(key), kind):
                    raise DataError(f"{where}: shards[{i}].{key} should be {kind}, got {shard.get(key)!r}")
        return cls(**{key: value for key, value in data.items() if key in names})


_SHARD_FIELDS = {"file": "str", "sha256": "str", "bytes": "int", "n_examples": "int", "n_tokens": "int",
                 "min_example_id": "int", "max_example_id": "int"}


def _has_type(value: Any, kind: str) -> bool:
    """Whether a JSON ``value`` fits the annotation ``kind`` (``int``, ``str | None``, ``list[dict]``, ...)."""
    if " | " in kind:
        return any(_has_type(value, part) for part in kind.split(" | "))
    if kind == "None":
        return value is None
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind.startswith("list[") and isinstance(value, list):
        return all(_has_type(item, kind[5:-1]) for item in value)
    return type(value).__name__ == kind


# --------------------------------------------------------------------------------------------
# Fingerprints.
# --------------------------------------------------------------------------------------------


def hash_model(model: nn.Module) -> str:
    """sha256 of the weights: state_dict entries in name order (name, dtype, shape, raw bytes).

    Independent of file layout, device and sharding; the config is not included.
    """
    digest = hashlib.sha256()
    seen: dict[tuple, str] = {}  # tied weights (same storage, shape, strides) are hashed once
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        digest.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            digest.update(f"={seen[key]}\n".encode())
            continue
        seen[key] = name
        digest.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def hash_tokenizer(tokenizer: Any) -> str:
    """sha256 of the tokenizer's content: ``tokenizer.json`` (vocab, merges, normaliser, added
    tokens…; not the truncation/padding state) with sorted keys for fast tokenizers; the sorted
    vocabulary for slow ones."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # truncation / padding are call-time settings the last encode left behind, not content
        state.pop("truncation", None)
        state.pop("padding", None)
        content = json.dumps(state, sort_keys=True, separators=(",", ":"))
    else:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
        content = json.dumps({"vocab": vocab, "class": type(tokenizer).__name__}, separators=(",", ":"))
    return hashlib.sha256(content.encode()).hexdigest()


def hash_chat_template(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's chat template (JSON of a dict of templates), or None without one."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def hash_examples(examples: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the examples in ``example_id`` order: id and ``input_ids`` (int64 LE), and the
    ``attention_mask`` of examples whose mask is not all ones."""
    digest = hashlib.sha256()
    for ex in sorted(examples, key=lambda e: int(e["example_id"])):
        ids = np.asarray(ex["input_ids"], dtype="<i8").reshape(-1)
        digest.update(struct.pack("<qq", int(ex["example_id"]), ids.size))
        digest.update(ids.tobytes())
        mask = ex.get("attention_mask")
        if mask is not None:
            mask = np.asarray(mask, dtype=np.uint8).reshape(-1)
            if not mask.all():
                digest.update(b"mask" + mask.tobytes())
    return digest.hexdigest()


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "…"
    return json.dumps(value) if not isinstance(value, str) else value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _check_fields(cache_dir: Path, manifest: Manifest, expect: Mapping[str, Any], whose: str, hint: str = "") -> None:
    names = {f.name for f in fields(Manifest)}
    for key, expected in expect.items():
        if key not in names:
            raise ConfigError(f"expect: {key!r} is not a cache manifest field (choose from {', '.join(sorted(names))})")
        actual = getattr(manifest, key)
        if not _same(actual, expected):
            what = _FIELD_NAMES.get(key, key)
            raise ConfigError(
                f"cache {cache_dir}: {what} differs from {whose} (manifest {key} {_short(actual)}, "
                f"expected {_short(expected)}){hint}"
            )


# --------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------


@dataclass
class _Example:
    example_id: int
    input_ids: Tensor  # (n,) int64
    mask: Tensor  # (n,) bool


def _check_examples(examples: Sequence[Mapping[str, Any]]) -> list[_Example]:
    out, seen = [], set()
    for i, ex in enumerate(examples):
        if "example_id" not in ex or "input_ids" not in ex:
            raise DataError(f"examples[{i}]: needs 'example_id' and 'input_ids'")
        eid = int(ex["example_id"])
        if eid in seen:
            raise DataError(f"examples[{i}]: example_id {eid} appears twice")
        seen.add(eid)
        ids = torch.as_tensor(ex["input_ids"], dtype=torch.long).reshape(-1)
        mask = ex.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).reshape(-1).bool()
        if mask.numel() != ids.numel():
            raise DataError(
                f"example {eid}: attention_mask has length {mask.numel()}, input_ids has {ids.numel()}"
            )
        out.append(_Example(eid, ids, mask))
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _example_seed(seed: int, example_id: int) -> int:
    digest = hashlib.sha256(f"kdistill-sampled:{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _unique_counts(draws: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(n, s) ids → distinct per row: n_unique (n,), ids (U,), counts (U,), rows in order."""
    n, s = draws.shape
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=draws.device)
        return empty, empty, empty
    srt = draws.sort(-1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    flat_new = new.reshape(-1)
    starts = flat_new.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([n * s], device=starts.device)])
    return new.sum(-1).int(), srt.reshape(-1)[flat_new].int(), (ends - starts).int()


def _topk_block(vocab: int, k: int) -> int | None:
    """The block size :func:`_topk` takes its maxima over (None: a plain ``topk``)."""
    return next((b for b in (256, 128, 64) if vocab % b == 0 and vocab // b >= 4 * k), None)


def _topk(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``z.topk(k, -1)`` for (n, V) rows through block maxima: the k largest values lie in the k
    blocks with the largest maxima (a block holding a top-k value has a maximum ≥ the k-th
    value), so the selection runs over k · b candidates instead of V (3–4× faster on a GPU).
    Same values as ``topk``; among exact ties the ids chosen may differ.
    """
    n, vocab = z.shape
    block = _topk_block(vocab, k)
    if block is None:
        return z.topk(k, -1)
    blocks = z.view(n, vocab // block, block)
    _, best = blocks.amax(-1).topk(k, -1)  # (n, k) block indices
    candidates = blocks.gather(1, best.unsqueeze(-1).expand(n, k, block)).view(n, k * block)
    values, where = candidates.topk(k, -1)
    ids = best.gather(1, where // block) * block + where % block
    return values, ids


class _ShardWriter:
    """Runs the teacher on one shard's examples and returns the shard's tensors."""

    def __init__(self, model: nn.Module, k: int, temperature: float, batch_size: int, sampled: int,
                 seed: int, hidden_layers: list[int], pad_id: int, chunk_rows: int,
                 on_batch: Callable[[int], None]) -> None:
        self.model, self.head = model, lm_head_of(model)
        self.vocab = self.head.vocab
        self.k, self.temperature, self.batch_size = k, temperature, batch_size
        self.sampled, self.seed, self.hidden_layers = sampled, seed, hidden_layers
        self.pad_id, self.on_batch = pad_id, on_batch
        self.device = next(model.parameters()).device
        self.chunk_rows = chunk_rows
        self._logits: Tensor | None = None
        self._probs: Tensor | None = None

    def __call__(self, examples: list[_Example]) -> dict[str, Tensor]:
        per_example: dict[int, dict[str, Tensor]] = {}
        # Batch by length within the shard (less padding); the result is stored in the given order.
        order = sorted(range(len(examples)), key=lambda i: examples[i].input_ids.numel())
        for start in range(0, len(order), self.batch_size):
            batch = [examples[i] for i in order[start : start + self.batch_size]]
            per_example.update(self._batch(batch))
            self.on_batch(len(batch))
        exs = [per_example[ex.example_id] for ex in examples]
        lengths = torch.tensor([ex.input_ids.numel() for ex in examples], dtype=torch.long)
        n_rows = torch.tensor([int(ex.mask.sum()) for ex in examples], dtype=torch.long)
        tensors = {
            "example_ids": torch.tensor([ex.example_id for ex in examples], dtype=torch.long),
            "lengths": lengths,
            "offsets": torch.cumsum(n_rows, 0) - n_rows,
            "valid": torch.cat([ex.mask for ex in examples]).to(torch.uint8),
            "topk": torch.cat([e["topk"] for e in exs]),
        }
        if self.sampled:
            for key in ("sampled_n", "sampled_ids", "sampled_counts"):
                tensors[key] = torch.cat([e[key] for e in exs])
        for layer in self.hidden_layers:
            tensors[f"hidden.{layer}"] = torch.cat([e[f"hidden.{layer}"] for e in exs])
        return tensors

    @torch.no_grad()
    def _batch(self, batch: list[_Example]) -> dict[int, dict[str, Tensor]]:
        length = max(ex.input_ids.numel() for ex in batch)
        input_ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.bool)
        for b, ex in enumerate(batch):
            input_ids[b, : ex.input_ids.numel()] = ex.input_ids
            mask[b, : ex.mask.numel()] = ex.mask
        rows_per_example = mask.sum(1).tolist()
        if sum(rows_per_example) == 0:  # nothing to predict: no forward
            hidden_rows, layer_rows = torch.zeros(0, self.head.weight.shape[1]), {}
        else:
            inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.long().to(self.device)}
            out = forward_outputs(self.model, "causal", inputs, bool(self.hidden_layers), [])
            valid = mask.to(self.device)
            hidden_rows = out["final_hidden"][valid]  # (R, H): valid positions only, batch-major
            layer_rows = {
                layer: out["hidden_states"][layer][valid].to("cpu", torch.float16) for layer in self.hidden_layers
            }
        example_of_row = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(rows_per_example))
        generators: dict[int, torch.Generator] = {}
        topk_parts, draw_parts = [], []
        for c in range(0, hidden_rows.shape[0], self.chunk_rows):  # everything stays on the device
            hidden = hidden_rows[c : c + self.chunk_rows]
            if not self.sampled and self._streams(hidden):
                ids, vals, log_tail = self._top_streamed(hidden)
            else:
                ids, vals, probs = self._top(hidden)
                if self.sampled:
                    draw_parts.append(self._draw(probs, example_of_row[c : c + probs.shape[0]], batch, generators))
                # Tail mass Σ_{outside top-k} p: a sum of positive terms, exact to fp32 precision even
                # where 1 − Σ_k p would cancel (peaked rows).
                log_tail = probs.scatter_(-1, ids, 0.0).sum(-1).double().log()
            topk_parts.append(encode_topk(ids, vals, self.vocab, log_tail=log_tail, validate=False))
        width = TopKFormat(self.k, self.vocab).bytes_per_token
        packed = torch.cat(topk_parts).cpu() if topk_parts else torch.zeros((0, width), dtype=torch.uint8)
        result = {}
        row = 0
        for ex, n in zip(batch, rows_per_example):
            entry = {"topk": packed[row : row + n]}
            for layer in self.hidden_layers:
                entry[f"hidden.{layer}"] = layer_rows[layer][row : row + n] if layer_rows else torch.zeros(
                    (0, hidden_rows.shape[-1]), dtype=torch.float16)
            result[ex.example_id] = entry
            row += n
        if self.sampled:
            draws = torch.cat(draw_parts) if draw_parts else torch.zeros((0, self.sampled), dtype=torch.long)
            self._split_sampled([t.cpu() for t in _unique_counts(draws)], batch, rows_per_example, result)
        return result

    def _top(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(n, H) final hidden states → top-k ids (n, k), their log p_T (n, k) at the temperature,
        and p_T (n, V) fp32 (a buffer reused by the next call).

        The head (with its scale and soft-cap) and the softmax write into buffers reused across
        chunks: a fresh (n, V) allocation per chunk costs page faults comparable to the softmax.
        On a CPU with an fp32 head the softmax overwrites the logits in place (bit-identical), so
        one (n, V) buffer serves both. The top-k is taken on the logits and normalised with
        log Σ exp z = z_1 − log p_1 (p_1 ≥ 1/V, exact in fp32), so entries whose probability
        underflows fp32 keep exact ids and log-probs.
        """
        head, n = self.head, hidden.shape[0]
        hidden = hidden.to(head.weight.dtype)
        in_place = hidden.device.type == "cpu" and head.weight.dtype == torch.float32
        if self._logits is None or self._logits.device != hidden.device:
            shape = (self.chunk_rows, self.vocab)
            self._logits = torch.empty(shape, dtype=head.weight.dtype, device=hidden.device)
            self._probs = None if in_place else torch.empty(shape, dtype=torch.float32, device=hidden.device)
        z = self._logits[:n]
        project_into(hidden, head.weight, head.bias, z)  # vocabulary-blocked on a CPU
        head.transform_(z)
        z = z if z.dtype == torch.float32 else z.float()
        if self.temperature != 1.0:
            z.div_(self.temperature)
        top_z, ids = _topk(z, self.k)  # sorted, descending
        probs = torch.softmax(z, -1, out=z if in_place else self._probs[:n])
        log_norm = top_z[:, :1] - probs.gather(-1, ids[:, :1]).log()
        return ids, top_z - log_norm, probs

    def _streams(self, hidden: Tensor) -> bool:
        """Whether :meth:`_top_streamed` serves these rows: a CPU, an fp32 head blocked over the
        vocabulary (V > 2 blocks) and block maxima for the top-k (see :func:`_topk`)."""
        weight = self.head.weight
        return (hidden.device.type == "cpu" and weight.dtype == torch.float32
                and is_blocked(hidden.shape[0], self.vocab) and _topk_block(self.vocab, self.k) is not None)

    def _top_streamed(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(n, H) → top-k ids (n, k), their log p_T (n, k) and log Σ_{outside top-k} p_T (n,) fp64,
        with every pass after the head GEMM on a cache-sized block of the vocabulary.

        Per head block (n, b), in cache: the logits z are copied into the (n, V) buffer, and per
        sub-block β of s entries (s = :func:`_topk` block) M_β = max z and S_β = Σ exp(z − M_β).
        Then, with m = max_β M_β: log Σ_V exp z = m + log Σ_β S_β e^{M_β − m}; the top-k lie in the
        k sub-blocks of largest M_β (read back from the buffer), and the tail is
        Σ_{β not among them} S_β e^{M_β − m} + Σ_{their other entries} e^{z − m}: sums of positive
        terms only, as in :meth:`_top`. Over the whole (n, V) logits this does one write instead
        of the softmax's passes (max, exp, normalise, tail sum) through memory.
        """
        head, n, vocab, k = self.head, hidden.shape[0], self.vocab, self.k
        hidden, sub = hidden.float(), _topk_block(vocab, k)
        if self._logits is None or self._logits.device != hidden.device:
            self._logits = torch.empty((self.chunk_rows, vocab), dtype=torch.float32, device=hidden.device)
        z = self._logits[:n]
        maxima = torch.empty((n, vocab // sub), dtype=torch.float32)
        sums = torch.empty_like(maxima)
        for v0, v1, part in head_blocks(hidden, head.weight, head.bias):
            head.transform_(part)
            if self.temperature != 1.0:
                part.div_(self.temperature)
            z[:, v0:v1].copy_(part)
            blocks = part.view(n, -1, sub)
            block_max = blocks.amax(-1).clamp_(min=torch.finfo(torch.float32).min)  # (n, b / s); all −inf → S_β = 0
            maxima[:, v0 // sub : v1 // sub] = block_max
            torch.sum(blocks.sub_(block_max.unsqueeze(-1)).exp_(), -1, out=sums[:, v0 // sub : v1 // sub])
        m = maxima.amax(-1, keepdim=True)  # (n, 1): the row maximum
        weighted = sums.mul_(maxima.sub(m).exp_())  # S_β e^{M_β − m}
        log_total = weighted.sum(-1, keepdim=True).log()  # log Σ_V exp(z − m)
        _, best = maxima.topk(k, -1)  # (n, k) sub-blocks holding the top-k
        candidates = z.view(n, -1, sub).gather(1, best.unsqueeze(-1).expand(n, k, sub)).view(n, k * sub)
        top_z, where = candidates.topk(k, -1)  # sorted, descending
        ids = best.gather(1, where // sub) * sub + where % sub
        rest = candidates.sub_(m).exp_().scatter_(-1, where, 0.0).sum(-1)  # the k sub-blocks' other entries
        tail = weighted.scatter_(-1, best, 0.0).sum(-1) + rest
        return ids, top_z - m - log_total, tail.double().log() - log_total.squeeze(-1).double()

    def _draw(self, probs: Tensor, example_of_row: Tensor, batch: list[_Example], generators: dict) -> Tensor:
        """(n, sampled) ids drawn from ``probs`` (n, V) with replacement, each example's rows
        from that example's generator."""
        parts = []
        bounds = torch.cat([torch.tensor([0]), torch.nonzero(example_of_row[1:] != example_of_row[:-1]).squeeze(1) + 1,
                            torch.tensor([example_of_row.numel()])]).tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            b = int(example_of_row[lo])
            gen = generators.get(b)
            if gen is None:
                gen = generators[b] = torch.Generator(device=probs.device)
                gen.manual_seed(_example_seed(self.seed, batch[b].example_id))
            parts.append(torch.multinomial(probs[lo:hi], self.sampled, replacement=True, generator=gen))
        return torch.cat(parts)

    @staticmethod
    def _split_sampled(flat: list[Tensor], batch: list[_Example], rows_per_example: list[int], result: dict) -> None:
        n_unique, ids, counts = flat
        row = flat_pos = 0
        for ex, n in zip(batch, rows_per_example):
            used = int(n_unique[row : row + n].sum())
            result[ex.example_id].update(
                sampled_n=n_unique[row : row + n], sampled_ids=ids[flat_pos : flat_pos + used],
                sampled_counts=counts[flat_pos : flat_pos + used],
            )
            row += n
            flat_pos += used


def _check_settings(k: int, temperature: float, batch_size: int, shard_size: int, sampled: int) -> None:
    for name, value, low in (("k", k, 1), ("batch_size", batch_size, 1), ("shard_size", shard_size, 1),
                             ("sampled", sampled, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}: must be an integer ≥ {low}, got {value!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature: must be a finite number > 0, got {temperature!r}")


def _hidden_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Normalise layer indices into ``hidden_states`` (0 = embeddings, n = last; −1 = last)."""
    n = config_layer_count(text_config(model))
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ConfigError(f"hidden_layers: {layer!r} is not a layer index")
        if n is not None:
            if not -(n + 1) <= layer <= n:
                raise ConfigError(f"hidden_layers: {layer} is out of range for a teacher with {n} layers (0 … {n})")
            layer %= n + 1
        elif layer < 0:
            raise ConfigError(f"hidden_layers: {layer}: negative indices need a known layer count")
        out.append(layer)
    if len(set(out)) != len(out):
        raise ConfigError(f"hidden_layers: {list(layers)} names a layer twice")
    return out


def write_cache(
    cache_dir: str | os.PathLike,
    teacher_model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    k: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_size: int = 1024,
    sampled: int = 0,
    hidden_layers: Sequence[int] = (),
    manifest_fields: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
    teacher_name: str | None = None,
    teacher_sha256: str | None = None,
    chunk_rows: int | None = None,
) -> Manifest:
    """Run ``teacher_model`` (a ``*ForCausalLM``) over ``examples`` and store its signal in ``cache_dir``.

    examples: dicts with ``example_id`` (unique int), ``input_ids`` and optionally
    ``attention_mask`` (rows are kept where it is 1; ``labels`` and other keys are ignored).
    Stores per valid position the top-``k`` ids and log p_T at ``temperature`` (normalised over the
    full vocabulary), ``sampled`` draws from p_T (with replacement; 0 = none), and
    ``hidden_states[l]`` in fp16 for l in ``hidden_layers``. ``progress(done, total)`` is called in
    examples. Resumes an interrupted cache of the same signal (see the module docstring).
    ``teacher_sha256``: :func:`hash_model` of the teacher when the caller has it already (hashing
    reads every weight once: ≈ 1 s per GB). ``chunk_rows``: valid positions per head call; default ``CHUNK_LOGITS[device] / V`` (1,024 on
    a CPU, 2,048 on a GPU at V = 262,144), which holds one (rows, V) buffer on a CPU with an fp32
    head (1 GiB; the softmax overwrites the logits) and two otherwise, but reads the head's weight less often than
    small chunks (on 2 CPU cores the blocked head took 1.8–1.9 s per 1,024 rows in 1,024-row
    calls, 2.1–2.3 s in 256-row ones) and launches fewer kernels. Returns the final :class:`Manifest`.
    """
    _check_settings(k, temperature, batch_size, shard_size, sampled)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ConfigError(f"chunk_rows: must be a positive integer, got {chunk_rows!r}")
    cache_dir = Path(cache_dir)
    rows = _check_examples(examples)
    head = lm_head_of(teacher_model)
    vocab = head.vocab
    if k > vocab:
        raise ConfigError(f"k: {k} exceeds the teacher's vocabulary size {vocab}")
    layers = _hidden_layers(teacher_model, hidden_layers)
    fmt = TopKFormat(k, vocab)
    extra = json.loads(json.dumps(dict(manifest_fields or {}), default=str))
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        teacher_name=teacher_name or getattr(teacher_model.config, "_name_or_path", "") or type(teacher_model).__name__,
        teacher_sha256=teacher_sha256 or hash_model(teacher_model),
        tokenizer_sha256=None if tokenizer is None else hash_tokenizer(tokenizer),
        chat_template_sha256=None if tokenizer is None else hash_chat_template(tokenizer),
        data_sha256=hash_examples(examples),
        k=k, temperature=float(temperature), vocab_size=vocab, sampled=sampled, seed=seed if sampled else 0,
        hidden_layers=layers, hidden_size=int(head.weight.shape[1]) if layers else None,
        encoding=fmt.describe(), bytes_per_token=fmt.bytes_per_token,
        n_examples=len(rows), n_tokens=int(sum(int(ex.mask.sum()) for ex in rows)), extra=extra,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    done = _resume(cache_dir, manifest)
    manifest_path = cache_dir / MANIFEST
    todo = [ex for ex in rows if ex.example_id not in done]
    total, count = len(rows), len(rows) - len(todo)
    if done:
        logger.info("cache %s: resuming, %d of %d examples already in %d shards", cache_dir, count, total,
                    len(manifest.shards))
    if progress is not None:
        progress(count, total)

    def on_batch(n: int) -> None:
        nonlocal count
        count += n
        if progress is not None:
            progress(count, total)

    pad_id = getattr(tokenizer, "pad_token_id", None)
    was_training = teacher_model.training
    teacher_model.eval()
    try:
        device_type = next(teacher_model.parameters()).device.type
        per_call = chunk_rows or max(16, min(8192, CHUNK_LOGITS.get(device_type, 2**27) // vocab))
        writer = _ShardWriter(teacher_model, k, float(temperature), batch_size, sampled, seed, layers,
                              int(pad_id) if pad_id is not None else 0, per_call, on_batch)
        for start in range(0, len(todo), shard_size):
            part = todo[start : start + shard_size]
            tensors = writer(part)
            name = f"shard-{len(manifest.shards):05d}.safetensors"
            # One metadata key: safetensors writes metadata from a hash map, whose order varies.
            data = save_safetensors(tensors, metadata={"format": f"kdistill-teacher-cache-v{FORMAT_VERSION}"})
            _atomic_write(cache_dir / name, data)
            ids = tensors["example_ids"]
            manifest.shards.append({
                "file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "n_examples": len(part), "n_tokens": int(tensors["topk"].shape[0]),
                "min_example_id": int(ids.min()), "max_example_id": int(ids.max()),
            })
            _atomic_write(manifest_path, manifest.to_json().encode())
            logger.debug("cache %s: wrote %s (%d examples)", cache_dir, name, len(part))
    finally:
        teacher_model.train(was_training)
    if not manifest_path.exists():  # no examples at all
        _atomic_write(manifest_path, manifest.to_json().encode())
    return manifest


def _resume(cache_dir: Path, manifest: Manifest) -> set[int]:
    """Adopt the complete shards of an earlier run of the same signal; return their example ids."""
    for tmp in cache_dir.glob("*.tmp"):
        tmp.unlink()
    path = cache_dir / MANIFEST
    if not path.exists():
        stale = sorted(cache_dir.glob("shard-*.safetensors"))
        if stale:
            raise ConfigError(f"cache {cache_dir}: has shard files but no {MANIFEST}; use a new directory or empty it")
        return set()
    old = Manifest.from_json(path.read_text(), str(path))
    hint = "; write to a new directory or delete this one"
    _check_fields(cache_dir, old, {key: getattr(manifest, key) for key in _SIGNAL_FIELDS}, "this run's", hint)
    done: set[int] = set()
    for shard in old.shards:
        file = cache_dir / shard["file"]
        _verify_shard(file, shard)
        with _open_shard(file) as f:
            done.update(f.get_tensor("example_ids").tolist())
    manifest.shards = old.shards
    return done


# --------------------------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------------------------


def _verify_shard(file: Path, shard: Mapping[str, Any], full: bool = True) -> None:
    if not file.exists():
        raise DataError(f"cache shard {file}: missing")
    size = file.stat().st_size
    if size != shard["bytes"]:
        raise DataError(f"cache shard {file}: {size} bytes, manifest says {shard['bytes']} (truncated or rewritten)")
    if full and sha256_file(file) != shard["sha256"]:
        raise DataError(f"cache shard {file}: sha256 differs from the manifest (corrupt)")


class _open_shard:
    """``safe_open`` whose failures name the file."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def __enter__(self):
        try:
            self.handle = safe_open(str(self.file), framework="pt")
            return self.handle.__enter__()
        except Exception as err:  # safetensors raises its own error types
            raise DataError(f"cache shard {self.file}: unreadable ({err})") from None

    def __exit__(self, *exc) -> None:
        self.handle.__exit__(*exc)


class TeacherCache:
    """Read access to a complete cache: targets for a batch by example id.

    Shards are read on first use and kept in memory (at most ``max_loaded_shards``, least
    recently used dropped first; None = all). Outputs are on the CPU.
    """

    def __init__(self, cache_dir: Path, manifest: Manifest, verify: bool, max_loaded_shards: int | None) -> None:
        self.cache_dir, self.manifest, self.verify = cache_dir, manifest, verify
        self.max_loaded_shards = max_loaded_shards
        self._loaded: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        ids, shard_of, local = [], [], []
        for s, shard in enumerate(manifest.shards):
            file = cache_dir / shard["file"]
            _verify_shard(file, shard, full=verify)
            with _open_shard(file) as f:
                shard_ids = f.get_tensor("example_ids")
            if shard_ids.numel() != shard["n_examples"]:
                raise DataError(f"cache shard {file}: {shard_ids.numel()} examples, manifest says {shard['n_examples']}")
            ids.append(shard_ids)
            shard_of.append(torch.full_like(shard_ids, s))
            local.append(torch.arange(shard_ids.numel()))
        all_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        self._ids, order = all_ids.sort()
        if self._ids.numel() > 1 and (self._ids[1:] == self._ids[:-1]).any():
            raise DataError(f"cache {cache_dir}: an example_id appears in two shards")
        self._shard = (torch.cat(shard_of) if ids else all_ids)[order]
        self._local = (torch.cat(local) if ids else all_ids)[order]

    @property
    def temperature(self) -> float:
        return self.manifest.temperature

    @property
    def k(self) -> int:
        return self.manifest.k

    def __len__(self) -> int:
        return self._ids.numel()

    def __contains__(self, example_id: int) -> bool:
        i = int(torch.searchsorted(self._ids, torch.tensor(int(example_id))))
        return i < len(self) and int(self._ids[i]) == int(example_id)

    # ------------------------------------------------------------------------------------------

    def _shard_tensors(self, s: int) -> dict[str, Tensor]:
        if s in self._loaded:
            self._loaded.move_to_end(s)
            return self._loaded[s]
        shard = self.manifest.shards[s]
        file = self.cache_dir / shard["file"]
        try:
            data = file.read_bytes()
        except OSError as err:
            raise DataError(f"cache shard {file}: unreadable ({err.strerror})") from None
        if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise DataError(f"cache shard {file}: sha256 differs from the manifest (corrupt or truncated)")
        try:
            tensors = load_safetensors(data)
        except Exception as err:
            raise DataError(f"cache shard {file}: unreadable ({err})") from None
        tensors["valid_offsets"] = torch.cumsum(tensors["lengths"], 0) - tensors["lengths"]
        if "sampled_n" in tensors:
            n = tensors["sampled_n"].long()
            tensors["sampled_offsets"] = torch.cumsum(n, 0) - n
        self._loaded[s] = tensors
        if self.max_loaded_shards is not None and len(self._loaded) > self.max_loaded_shards:
            self._loaded.popitem(last=False)
        return tensors

    def _locate(self, example_ids: Tensor, seq_len: int) -> tuple[Tensor, list[tuple[int, Tensor]]]:
        """Valid-position mask (B, seq_len) and, in batch-major order, (shard, row indices) runs."""
        ids = torch.as_tensor(example_ids, dtype=torch.long).reshape(-1).cpu()
        pos = torch.searchsorted(self._ids, ids).clamp(max=max(len(self) - 1, 0))
        if len(self) == 0 or not torch.equal(self._ids[pos], ids):
            missing = ids[(self._ids[pos] != ids)] if len(self) else ids
            raise DataError(f"cache {self.cache_dir}: example_id {int(missing[0])} is not in the cache")
        mask = torch.zeros((ids.numel(), seq_len), dtype=torch.bool)
        runs: list[tuple[int, Tensor]] = []
        for b, (s, j) in enumerate(zip(self._shard[pos].tolist(), self._local[pos].tolist())):
            t = self._shard_tensors(s)
            length = int(t["lengths"][j])
            if length > seq_len:
                raise ShapeError(
                    f"cache {self.cache_dir}: example {int(ids[b])} has {length} positions, the batch only {seq_len}"
                )
            start = int(t["valid_offsets"][j])
            valid = t["valid"][start : start + length].bool()
            mask[b, :length] = valid
            first = int(t["offsets"][j])
            runs.append((s, torch.arange(first, first + int(valid.sum()))))
        return mask, runs

    def _rows(self, runs: list[tuple[int, Tensor]], fetch: Callable[[dict[str, Tensor], Tensor], Tensor]) -> Tensor:
        """fetch(shard tensors, rows) per shard, reassembled in batch-major order."""
        by_shard: dict[int, list[int]] = {}
        for i, (s, _) in enumerate(runs):
            by_shard.setdefault(s, []).append(i)
        pieces: list[Tensor | None] = [None] * len(runs)
        for s, members in by_shard.items():
            rows = torch.cat([runs[i][1] for i in members])
            got = fetch(self._shard_tensors(s), rows)
            sizes = [runs[i][1].numel() for i in members]
            for i, piece in zip(members, got.split(sizes)):
                pieces[i] = piece
        return torch.cat(pieces)  # type: ignore[arg-type]

    def targets(self, example_ids: Tensor, seq_len: int) -> SparseTargets:
        """Top-k targets for a right-padded batch: ids (B, seq_len, k) int64 (−1 on padding),
        logprobs (B, seq_len, k) float32 (−inf on padding), at the cache's temperature."""
        mask, runs = self._locate(example_ids, seq_len)
        k, vocab = self.manifest.k, self.manifest.vocab_size
        packed = self._rows(runs, lambda t, rows: t["topk"][rows])
        ids, logprobs = decode_topk(packed, k, vocab)
        out_ids = torch.full((*mask.shape, k), -1, dtype=torch.long)
        out_lp = torch.full((*mask.shape, k), -math.inf, dtype=torch.float32)
        out_ids[mask], out_lp[mask] = ids, logprobs
        return SparseTargets(out_ids, out_lp, self.manifest.temperature)

    def sampled(self, example_ids: Tensor, seq_len: int) -> SparseTargets:
        """Sampled targets: ids (B, seq_len, s) int64 of the distinct draws (−1 unused and on
        padding), logprobs = log(count / s) (−inf unused): Σ exp = 1 per valid position."""
        s_count = self.manifest.sampled
        if not s_count:
            raise ConfigError(f"cache {self.cache_dir}: holds no sampled targets (written with sampled=0)")
        mask, runs = self._locate(example_ids, seq_len)

        def fetch(t: dict[str, Tensor], rows: Tensor) -> Tensor:
            n = t["sampled_n"][rows].long()
            starts = t["sampled_offsets"][rows]
            row_idx = torch.repeat_interleave(torch.arange(rows.numel()), n)
            col = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            flat = starts[row_idx] + col
            out = torch.zeros((rows.numel(), s_count, 2), dtype=torch.long)
            out[..., 0] = -1
            out[row_idx, col, 0] = t["sampled_ids"][flat].long()
            out[row_idx, col, 1] = t["sampled_counts"][flat].long()
            return out

        got = self._rows(runs, fetch)
        out_ids = torch.full((*mask.shape, s_count), -1, dtype=torch.long)
        out_lp = torch.full((*mask.shape, s_count), -math.inf, dtype=torch.float32)
        out_ids[mask] = got[..., 0]
        counts = got[..., 1].float()
        out_lp[mask] = torch.where(counts > 0, (counts / s_count).log(), -math.inf)
        return SparseTargets(out_ids, out_lp, self.manifest.temperature)

    def hidden(self, example_ids: Tensor, seq_len: int, layer: int) -> Tensor:
        """``hidden_states[layer]`` of the teacher: (B, seq_len, H) float16, 0 on padding."""
        if layer not in self.manifest.hidden_layers:
            raise ConfigError(
                f"cache {self.cache_dir}: hidden layer {layer} not cached (cached: {self.manifest.hidden_layers})"
            )
        mask, runs = self._locate(example_ids, seq_len)
        rows = self._rows(runs, lambda t, r: t[f"hidden.{layer}"][r])
        out = torch.zeros((*mask.shape, self.manifest.hidden_size or rows.shape[-1]), dtype=torch.float16)
        out[mask] = rows
        return out


def open_cache(
    cache_dir: str | os.PathLike,
    *,
    expect: Mapping[str, Any] | None = None,
    verify: bool = True,
    max_loaded_shards: int | None = None,
) -> TeacherCache:
    """Open a complete cache, checking its manifest against ``expect`` (manifest field → value,
    e.g. ``{"teacher_sha256": hash_model(t), "tokenizer_sha256": …, "data_sha256": …, "k": 64,
    "temperature": 1.0}``) and every shard's size; ``verify`` also checks every shard's sha256.

    Raises :class:`ConfigError` naming the first field that differs, :class:`DataError` for a
    missing, incomplete or corrupt cache (naming the file).
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"cache {cache_dir}: no {MANIFEST} (not a teacher cache, or `kdistill cache` never finished a shard)") from None
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err.strerror})") from None
    manifest = Manifest.from_json(text, str(path))
    _check_fields(cache_dir, manifest, dict(expect or {}), "the recipe's")
    if not manifest.complete:
        done = sum(s["n_examples"] for s in manifest.shards)
        raise DataError(
            f"cache {cache_dir}: incomplete ({done} of {manifest.n_examples} examples); rerun `kdistill cache` on the recipe to finish it"
        )
    return TeacherCache(cache_dir, manifest, verify, max_loaded_shards)
