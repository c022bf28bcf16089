"""Black-box teachers: text generators behind one interface, local (a HF causal LM) or remote (HTTP).

Every teacher implements :class:`TextTeacher`: ``complete(prompts, params, n, logprobs)`` returns,
per prompt, ``n`` :class:`Completion` objects with the generated text, its tokens, each token's
log-probability and, with ``logprobs=k``, the top-k alternatives per generated position.

- :class:`LocalTeacher` runs any Hugging Face causal LM (batched, left-padded ``generate``).
- :class:`OpenAITeacher` calls an OpenAI-compatible server (OpenAI, vLLM, llama.cpp, or
  ``kdistill serve``) through the ``openai`` client, with its own retry policy, bounded
  concurrency and a hard :class:`Budget` of requests and tokens.

Log-probabilities are natural logs. Token strings are the text each token adds to the text
generated before it, so ``"".join(tokens)`` is the completion text (before stop truncation).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import StoppingCriteria

from kdistill.errors import ConfigError, KdistillError, ModelError

logger = logging.getLogger(__name__)

FinishReason = str  # "stop" (end of sequence or a stop string) or "length" (max_tokens reached)


class BlackBoxError(KdistillError):
    """A black-box teacher failed: bad request, unreachable or misbehaving server, missing record.

    ``partial``: when raised by ``complete``, the results obtained before the failure, one entry
    per prompt (``None`` where a prompt has no result); ``None`` when there is nothing to keep.
    """

    def __init__(self, message: str, partial: list[list[Completion] | None] | None = None) -> None:
        super().__init__(message)
        self.partial = partial


class BudgetExhausted(BlackBoxError):
    """The request or token budget does not allow the next request; ``partial`` holds what was obtained."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy decoding; ``stop`` strings end a completion
    (the text is cut before the first one); ``seed`` makes sampling reproducible where the backend
    supports it (always for :class:`LocalTeacher`)."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, not {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            raise ConfigError(f"temperature must be a number ≥ 0, not {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop must be non-empty strings, not {self.stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be an integer or None, not {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": float(self.temperature), "top_p": float(self.top_p),
                "stop": list(self.stop), "seed": self.seed}


@dataclass
class Completion:
    """One generated sample.

    text: the completion (without the prompt, cut before a stop string).
    tokens: (L,) the generated tokens as text pieces; empty when the backend was asked for no logprobs
        and returns none (remote teachers).
    token_logprobs: (L,) natural-log probability of each token.
    top_logprobs: (L,) per position, the top-k alternatives token → log-prob in descending order;
        ``None`` unless ``logprobs=k`` (k ≥ 1) was asked for.
    finish_reason: ``"stop"`` or ``"length"``.
    """

    text: str
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    finish_reason: FinishReason = "length"

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": list(self.tokens), "token_logprobs": list(self.token_logprobs),
                "top_logprobs": None if self.top_logprobs is None else [dict(d) for d in self.top_logprobs],
                "finish_reason": self.finish_reason}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        top = data.get("top_logprobs")
        return cls(text=data["text"], tokens=list(data.get("tokens") or []),
                   token_logprobs=[float(x) for x in data.get("token_logprobs") or []],
                   top_logprobs=None if top is None else [dict(d) for d in top],
                   finish_reason=data.get("finish_reason") or "length")


@runtime_checkable
class TextTeacher(Protocol):
    """A teacher that only generates text. ``name`` identifies it (and keys replay records)."""

    name: str

    def complete(
        self, prompts: list[str], params: SamplingParams, n: int = 1, logprobs: int | None = None
    ) -> list[list[Completion]]:
        """Per prompt, ``n`` samples; ``logprobs=k`` adds the top-k alternatives per position."""
        ...


def _check_request(prompts: Sequence[str], n: int, logprobs: int | None, max_logprobs: int = 20) -> None:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be a list of strings")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, not {n!r}")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= max_logprobs):
        raise ConfigError(f"logprobs must be an integer in [0, {max_logprobs}] or None, not {logprobs!r}")


def _cut_at_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the first occurrence of any stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


# --------------------------------------------------------------------------------------------
# Local teacher: a Hugging Face causal LM.
# --------------------------------------------------------------------------------------------

_CONTEXT_TOKENS = 4  # prompt tokens decoded before each piece, so leading spaces come out right
_ALT_WINDOW = 8  # tokens decoded before each top-k alternative


class _MaskAdviceFilter(logging.Filter):
    """Drops transformers' "pass an `attention_mask`" advice. ``generate`` drops an all-ones mask
    before the forward, which then gives that advice whenever a prompt starts or ends with a pad id
    that is also the bos/eos id (GPT-2): a false alarm, since :class:`LocalTeacher` passes the mask."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask`" not in record.getMessage()


@contextlib.contextmanager
def _mask_advice_hidden():
    log = logging.getLogger("transformers.modeling_utils")
    advice = _MaskAdviceFilter()
    log.addFilter(advice)
    try:
        yield
    finally:
        log.removeFilter(advice)


class _StopOnStrings(StoppingCriteria):
    """Generation stopping criterion: a sequence is done once its generated text holds a stop string.

    Only the last ``window`` generated tokens are decoded each step (enough for any stop string);
    (B,) booleans per step, so finished sequences stop while the others go on.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stops, self.prompt_length = tokenizer, list(stops), prompt_length
        self.window = max(16, 4 * max(len(stop) for stop in stops))

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        done = []
        for row in input_ids:
            start = max(self.prompt_length, row.shape[0] - self.window)
            tail = self.tokenizer.decode(row[start:], skip_special_tokens=False)
            done.append(any(stop in tail for stop in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class LocalTeacher:
    """A Hugging Face causal LM as a black-box teacher.

    ``model_ref_or_model``: a model reference (alias, directory, cached hub id; see
    :mod:`kdistill.models.resolve`) or a loaded ``PreTrainedModel`` (then ``tokenizer`` is required).
    Prompts are generated in batches of ``batch_size`` with left padding (the caller's tokenizer is
    copied, never modified; a tokenizer without a pad token pads with its eos token).

    Log-probabilities are ``log_softmax(logits / T)`` of the model's raw logits at the sampling
    temperature T (T = 1 for greedy decoding), before top-p truncation: the teacher's tempered
    distribution, not the truncated one it sampled from. A ``seed`` makes a call reproducible for the
    same prompts, parameters and ``batch_size`` (the global torch RNG is restored afterwards).
    Calls are serialised by a lock, so one teacher can serve several threads. ``dtype`` (e.g.
    ``torch.bfloat16``) loads a model reference in that precision: about 3× faster generation on
    CPUs with AVX512-BF16, at bf16-precision log-probabilities.
    """

    def __init__(
        self,
        model_ref_or_model: Any,
        tokenizer: Any = None,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        *,
        name: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, not {batch_size!r}")
        if isinstance(model_ref_or_model, (str, os.PathLike)):
            from kdistill.models.resolve import load_model, load_tokenizer

            ref = str(model_ref_or_model)
            model = load_model(ref, "causal", dtype=dtype, trained=True)  # a teacher: its LM head must be real
            if tokenizer is None:
                tokenizer = load_tokenizer(ref)
            default_name = f"local:{ref}"
        else:
            model = model_ref_or_model
            if tokenizer is None:
                raise ConfigError("LocalTeacher needs a tokenizer when given a model object")
            default_name = f"local:{getattr(model.config, '_name_or_path', '') or type(model).__name__}"
        if isinstance(tokenizer, (str, os.PathLike)):
            from kdistill.models.resolve import load_tokenizer

            tokenizer = load_tokenizer(str(tokenizer))
        self.name = name or default_name
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer.padding_side = "left"
        eos = self._eos_ids(self.model, self.tokenizer)
        if not eos:
            raise ModelError(f"model {self.name!r}: the tokenizer has no eos token, so generation cannot stop")
        self._eos_ids_set = set(eos)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(eos[0])
        self._lock = threading.Lock()
        self.max_positions: int | None = getattr(self.model.config, "max_position_embeddings", None)

    def __repr__(self) -> str:
        return f"LocalTeacher(name={self.name!r}, batch_size={self.batch_size}, device={str(self.device)!r})"

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
        """The tokenizer's eos id and the model's generation eos ids that exist in the vocabulary."""
        ids: list[int] = []
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for i in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
            if int(i) not in ids:
                ids.append(int(i))
        vocab = getattr(model.config, "vocab_size", None)
        return [i for i in ids if vocab is None or 0 <= i < vocab]

    # ---- prompts -----------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat: the tokenizer's chat template with the generation prompt if it
        has one, else ``role: content`` lines followed by ``assistant:``."""
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                    or not isinstance(message.get("role"), str):
                raise BlackBoxError(f"message {i} must have string 'role' and 'content'")
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def count_tokens(self, prompt: str, *, chat: bool = False) -> int:
        """Number of prompt tokens the model sees for ``prompt``."""
        return len(self._encode(prompt, chat))

    def _encode(self, prompt: str, chat: bool) -> list[int]:
        # a chat template already holds its special tokens: adding them again would double a BOS
        ids = self.tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        if not ids:  # an empty prompt: condition on BOS (or EOS, GPT-2's document separator)
            start = self.tokenizer.bos_token_id
            ids = [int(start if start is not None else min(self._eos_ids_set))]
        return list(ids)

    # ---- generation --------------------------------------------------------------------------

    def complete(
        self, prompts: list[str], params: SamplingParams, n: int = 1, logprobs: int | None = None
    ) -> list[list[Completion]]:
        """Per prompt, ``n`` samples (see the class docstring for log-probabilities and seeds)."""
        return self._complete(prompts, params, n, logprobs, chat=False)

    def complete_chat(
        self, conversations: list[list[dict[str, str]]], params: SamplingParams, n: int = 1,
        logprobs: int | None = None,
    ) -> list[list[Completion]]:
        """Like :meth:`complete` for chats (lists of ``{"role", "content"}``), through :meth:`chat_prompt`."""
        prompts = [self.chat_prompt(messages) for messages in conversations]
        return self._complete(prompts, params, n, logprobs, chat=True)

    def _complete(
        self, prompts: list[str], params: SamplingParams, n: int, logprobs: int | None, chat: bool
    ) -> list[list[Completion]]:
        _check_request(prompts, n, logprobs, max_logprobs=max(20, int(self.model.config.vocab_size)))
        encoded = [self._encode(p, chat) for p in prompts]
        if self.max_positions is not None:
            for i, ids in enumerate(encoded):
                if len(ids) + params.max_tokens > self.max_positions:
                    raise BlackBoxError(
                        f"prompt {i} has {len(ids)} tokens; with max_tokens {params.max_tokens} it exceeds "
                        f"the model's {self.max_positions} positions"
                    )
        results: list[list[Completion]] = []
        with self._lock, torch.random.fork_rng(devices=self._rng_devices()):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(encoded), self.batch_size):
                results.extend(self._generate_batch(encoded[start:start + self.batch_size], params, n, logprobs))
        return results

    def _rng_devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    @torch.no_grad()
    def _generate_batch(
        self, encoded: list[list[int]], params: SamplingParams, n: int, logprobs: int | None
    ) -> list[list[Completion]]:
        batch = self.tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        sample = params.temperature > 0
        draws = n if sample else 1  # greedy samples are all the same: decode once, copy
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_tokens, do_sample=sample, num_return_sequences=draws,
            output_logits=True, return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self._eos_ids_set),
            repetition_penalty=1.0,  # OpenAI semantics: override a checkpoint's generation defaults
        )
        if sample:
            kwargs.update(temperature=float(params.temperature), top_p=float(params.top_p), top_k=0)
        if params.stop:  # stop each sequence at its first stop string instead of generating max_tokens
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [_StopOnStrings(self.tokenizer, params.stop, input_ids.shape[1])])
        with _mask_advice_hidden():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        generated = out.sequences[:, input_ids.shape[1]:]  # (B·n, L)
        temperature = float(params.temperature) if sample else 1.0
        # per step, log-probabilities of the raw logits at the sampling temperature, reduced at once to
        # the chosen token's (B·n, L) and the top-k alternatives' (B·n, L, k): no (B·n, L, V) tensor
        k = min(max(logprobs or 0, 1), int(out.logits[0].shape[-1]))
        chosen, top_values, top_indices = [], [], []
        for step, step_logits in enumerate(out.logits):
            logp = torch.log_softmax(step_logits.float() / temperature, dim=-1)  # (B·n, V)
            chosen.append(logp.gather(-1, generated[:, step : step + 1]).squeeze(-1))
            values, indices = logp.topk(k, dim=-1)
            top_values.append(values)
            top_indices.append(indices)
        chosen_t = torch.stack(chosen, 1) if chosen else torch.empty(generated.shape[0], 0)
        values_t = torch.stack(top_values, 1) if top_values else torch.empty(generated.shape[0], 0, k)
        indices_t = torch.stack(top_indices, 1) if top_indices else torch.empty(generated.shape[0], 0, k, dtype=torch.long)
        results: list[list[Completion]] = []
        for b, prompt_ids in enumerate(encoded):
            samples = []
            for j in range(draws):
                row = b * draws + j
                samples.append(self._completion(prompt_ids, generated[row], chosen_t[row],
                                                (values_t[row], indices_t[row]), params, logprobs))
            results.append(samples + [copy.deepcopy(samples[0]) for _ in range(n - draws)])
        return results

    def _completion(
        self, prompt_ids: list[int], gen: torch.Tensor, chosen_logp: torch.Tensor,
        top: tuple[torch.Tensor, torch.Tensor], params: SamplingParams, logprobs: int | None,
    ) -> Completion:
        ids = gen.tolist()
        finish = "length"
        for i, tok in enumerate(ids):
            if tok in self._eos_ids_set:
                ids, finish = ids[:i], "stop"
                break
        context = prompt_ids[-_CONTEXT_TOKENS:]
        decode = self._decoder(context)
        pieces = self._pieces(decode, ids)
        text = "".join(pieces)
        cut = _cut_at_stop(text, params.stop)
        if cut is not None:
            keep, offset = 0, 0
            while keep < len(pieces) and offset < cut:  # keep the tokens that add text before the stop
                offset += len(pieces[keep])
                keep += 1
            text, finish, ids, pieces = text[:cut], "stop", ids[:keep], pieces[:keep]
        chosen = chosen_logp[: len(ids)]
        alternatives = self._alternatives(context, ids, pieces, top, logprobs) if logprobs else None
        return Completion(text=text, tokens=pieces, token_logprobs=chosen.tolist(), top_logprobs=alternatives,
                          finish_reason=finish)

    def _alternatives(
        self, context: list[int], ids: list[int], pieces: list[str], top: tuple[torch.Tensor, torch.Tensor], k: int
    ) -> list[dict[str, float]]:
        """Per position, the top-k tokens → log-prob (descending); each alternative's text is decoded
        after the last ``_ALT_WINDOW`` tokens before it, the chosen token keeps its piece."""
        values, indices = top[0][: len(ids), :k], top[1][: len(ids), :k]  # sorted, descending
        history = context + ids
        top = []
        for i in range(len(ids)):
            window = history[max(0, len(context) + i - _ALT_WINDOW): len(context) + i]
            base = self.tokenizer.decode(window, skip_special_tokens=False)
            texts = self.tokenizer.batch_decode([window + [j] for j in indices[i].tolist()], skip_special_tokens=False)
            alternatives: dict[str, float] = {}
            for value, index, full in zip(values[i].tolist(), indices[i].tolist(), texts):
                if index == ids[i]:
                    piece = pieces[i]
                else:
                    piece = full[len(base):] if full.startswith(base) else full[len(os.path.commonprefix([full, base])):]
                alternatives.setdefault(piece, value)
            top.append(alternatives)
        return top

    def _decoder(self, context: list[int]):
        """``decode(ids)`` → the text ``ids`` add after the prompt tail ``context``."""
        tok = self.tokenizer
        base = tok.decode(context, skip_special_tokens=False)

        def decode(ids: list[int]) -> str:
            text = tok.decode(context + ids, skip_special_tokens=False)
            return text[len(base):] if text.startswith(base) else text[len(os.path.commonprefix([text, base])):]

        return decode

    @staticmethod
    def _pieces(decode, ids: list[int]) -> list[str]:
        """Per token, the text it adds; an incomplete UTF-8 sequence is attributed to the token completing it."""
        pieces, emitted = [], ""
        for i in range(len(ids)):
            text = decode(ids[: i + 1])
            if text.endswith("\ufffd") and i + 1 < len(ids):
                pieces.append("")
                continue
            common = emitted if text.startswith(emitted) else os.path.commonprefix([text, emitted])
            pieces.append(text[len(common):])
            emitted = text
        return pieces


# --------------------------------------------------------------------------------------------
# Budget: a hard cap on requests and tokens, shared by threads.
# --------------------------------------------------------------------------------------------


class Budget:
    """A hard cap on requests sent and tokens used (prompt + completion, from each response's ``usage``).

    A request is sent only if it fits: one request, and the most tokens it could use,
    ``n · max_tokens`` plus its prompt's UTF-8 bytes (every token of a byte-level or byte-fallback
    tokenizer covers at least one byte) plus an allowance for special tokens and chat templates:
    the largest ``prompt_tokens − bytes`` seen so far, ``PROMPT_OVERHEAD`` before the first response.
    In-flight requests hold their reservation, so concurrent requests cannot overshoot together; a
    response then settles its real usage. Every attempt (retries too) counts as a request; an
    attempt that timed out or returned a malformed body is charged its whole reservation (the
    server may have run it). A response without ``usage`` is charged its reservation. Share one
    budget between teachers to cap them together.
    """

    PROMPT_OVERHEAD = 16

    def __init__(self, max_requests: int | None = None, max_tokens: int | None = None) -> None:
        for label, value in (("max_requests", max_requests), ("max_tokens", max_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"budget {label} must be a non-negative integer or None, not {value!r}")
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.requests = 0  # requests sent (or reserved to be sent)
        self.tokens = 0  # tokens used by settled requests
        self._reserved = 0
        self._overhead: int | None = None  # largest prompt_tokens − prompt bytes seen; None before any
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"Budget(max_requests={self.max_requests}, max_tokens={self.max_tokens}, "
                f"requests={self.requests}, tokens={self.tokens})")

    def estimate(self, prompt: str, params: SamplingParams, n: int) -> int:
        """Most tokens a request could use (see the class docstring)."""
        with self._lock:
            overhead = self.PROMPT_OVERHEAD if self._overhead is None else self._overhead
        return n * params.max_tokens + len(prompt.encode("utf-8")) + overhead

    def reserve(self, tokens: int) -> int:
        """Reserve one request and ``tokens`` tokens, or raise :class:`BudgetExhausted`."""
        with self._lock:
            if self.max_requests is not None and self.requests + 1 > self.max_requests:
                raise BudgetExhausted(f"request budget exhausted: {self.requests} of max_requests "
                                      f"{self.max_requests} used")
            if self.max_tokens is not None and self.tokens + self._reserved + tokens > self.max_tokens:
                raise BudgetExhausted(
                    f"token budget exhausted: {self.tokens} used + {self._reserved} in flight + up to {tokens} "
                    f"for the next request > max_tokens {self.max_tokens}"
                )
            self.requests += 1
            self._reserved += tokens
            return tokens

    def settle(self, reserved: int, used: int, prompt: str | None = None, prompt_tokens: int | None = None
               ) -> None:
        """Replace a reservation by the tokens actually used (and learn the prompt overhead)."""
        with self._lock:
            self._reserved -= reserved
            self.tokens += used
            if prompt is not None and prompt_tokens is not None:
                overhead = max(0, prompt_tokens - len(prompt.encode("utf-8")))
                self._overhead = max(self._overhead or 0, overhead)

    def release(self, reserved: int) -> None:
        """Give back the tokens of a reservation whose request used none (the request still counts)."""
        with self._lock:
            self._reserved -= reserved


# --------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP teacher.
# --------------------------------------------------------------------------------------------

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class _Retryable(Exception):
    """One failed attempt that may succeed when retried."""

    def __init__(self, reason: str, retry_after: float | None = None, charged: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.charged = charged  # the server may have used tokens for it


class OpenAITeacher:
    """A teacher behind an OpenAI-compatible API (OpenAI, vLLM, llama.cpp, ``kdistill serve``).

    One request per prompt (``n`` samples each) to ``{base_url}/completions`` (``logprobs=k``) or,
    with ``chat=True``, ``{base_url}/chat/completions`` with the prompt as one user message
    (``logprobs=True, top_logprobs=k``). Without ``logprobs`` no log-probabilities are asked for and
    ``tokens``/``token_logprobs`` are empty.

    At most ``max_concurrency`` requests are in flight; prompts are sent in order. An attempt that
    fails with 408/409/429/5xx, a connection error, a timeout (``timeout`` seconds) or a malformed
    body is retried up to ``max_retries`` times after ``min(backoff_max, backoff · 2^attempt)``
    seconds with full jitter (at least the server's ``Retry-After``); the client's own retries are
    off. Other statuses fail at once. The :class:`Budget` is checked before every attempt.

    ``complete`` raises :class:`BudgetExhausted` (budget) or :class:`BlackBoxError` (anything else)
    carrying ``.partial``: the per-prompt results obtained (``None`` where missing). After a
    failure no further prompts are sent.

    The API key is read from the environment variable ``api_key_env`` when the client is built; it
    never appears in ``repr``, logs or error messages. An unset variable sends the placeholder key
    ``EMPTY`` (local servers need none). ``jitter_seed`` makes the retry delays reproducible.
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key_env: str = "OPENAI_API_KEY",
        chat: bool = False,
        max_concurrency: int = 4,
        max_retries: int = 5,
        timeout: float = 60,
        budget: Budget | None = None,
        *,
        backoff: float = 0.5,
        backoff_max: float = 30.0,
        name: str | None = None,
        jitter_seed: int | None = None,
    ) -> None:
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError("OpenAITeacher needs the openai package: pip install openai") from exc
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be a positive integer, not {max_concurrency!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be a non-negative integer, not {max_retries!r}")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must be an http(s) URL, not {base_url!r}")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.chat = chat
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout = float(timeout)
        self.budget = budget if budget is not None else Budget()
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.name = name or f"openai:{model}{':chat' if chat else ''}"  # the host does not change answers
        self.attempts = 0  # HTTP attempts made by this teacher (retries included)
        self._rng = random.Random(jitter_seed)
        self._lock = threading.Lock()
        self._openai = openai
        key = os.environ.get(api_key_env) or ""
        # the key lives only in the client (it sends it); messages are scrubbed of it, see _scrub
        self._client = openai.OpenAI(api_key=key or "EMPTY", base_url=self.base_url, max_retries=0,
                                     timeout=self.timeout)
        if not key:
            logger.info("no API key in $%s: sending requests to %s without one", api_key_env, self.base_url)

    def __repr__(self) -> str:
        return (f"OpenAITeacher(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r}, "
                f"chat={self.chat}, max_concurrency={self.max_concurrency}, max_retries={self.max_retries}, "
                f"timeout={self.timeout}, budget={self.budget!r})")

    def __getstate__(self) -> dict:  # never pickle the key or the client
        raise TypeError("OpenAITeacher cannot be pickled (it holds a live client and credentials)")

    @property
    def url(self) -> str:
        """The endpoint requests go to."""
        return f"{self.base_url}/{'chat/completions' if self.chat else 'completions'}"

    def close(self) -> None:
        self._client.close()

    # ---- public API --------------------------------------------------------------------------

    def complete(
        self, prompts: list[str], params: SamplingParams, n: int = 1, logprobs: int | None = None
    ) -> list[list[Completion]]:
        """Per prompt, ``n`` samples (see the class docstring for retries, budget and partial results)."""
        _check_request(prompts, n, logprobs)
        results: list[list[Completion] | None] = [None] * len(prompts)
        futures: dict[int, Future] = {}
        slots = threading.BoundedSemaphore(self.max_concurrency)
        failed = threading.Event()
        stopped: BudgetExhausted | None = None
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="kdistill-openai") as pool:
            for i, prompt in enumerate(prompts):
                slots.acquire()  # prompts go out in order, at most max_concurrency in flight
                if failed.is_set():
                    slots.release()
                    break
                estimate = self.budget.estimate(prompt, params, n)
                try:
                    reserved = self.budget.reserve(estimate)
                except BudgetExhausted as exc:
                    slots.release()
                    stopped = exc
                    break
                future = pool.submit(self._one_prompt, prompt, params, n, logprobs, reserved, estimate)

                def done(f: Future, slots=slots, failed=failed) -> None:
                    if f.exception() is not None:
                        failed.set()
                    slots.release()

                future.add_done_callback(done)
                futures[i] = future
        errors: dict[int, BaseException] = {}
        for i, future in futures.items():
            exc = future.exception()
            if exc is None:
                results[i] = future.result()
            else:
                errors[i] = exc
        hard = {i: e for i, e in errors.items() if not isinstance(e, BudgetExhausted)}
        if hard:
            first = hard[min(hard)]
            if not isinstance(first, BlackBoxError):
                raise first
            raise type(first)(str(first), partial=results) from first
        if errors or stopped is not None:
            exc = errors[min(errors)] if errors else stopped
            done_count = sum(r is not None for r in results)
            logger.info("%s: %s; returning %d of %d results as partial", self.name, exc, done_count, len(prompts))
            raise BudgetExhausted(f"{exc} ({done_count} of {len(prompts)} prompts done)", partial=results) from exc
        return results  # type: ignore[return-value]

    # ---- one prompt, with retries ----------------------------------------------------------

    def _one_prompt(
        self, prompt: str, params: SamplingParams, n: int, logprobs: int | None, reserved: int, estimate: int
    ) -> list[Completion]:
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                try:
                    reserved = self.budget.reserve(estimate)
                except BudgetExhausted as exc:  # the budget went on retries: say why they were needed
                    raise BudgetExhausted(self._scrub(f"{exc}, {attempt} by failed attempts at this prompt "
                                                      f"(the last: {last})")) from None
            with self._lock:
                self.attempts += 1
            try:
                body, usage = self._request(prompt, params, n, logprobs)
            except _Retryable as failure:
                if failure.charged:
                    self.budget.settle(reserved, reserved)
                else:
                    self.budget.release(reserved)
                last = failure.reason
                if attempt == self.max_retries:
                    break
                delay = min(self.backoff_max, self.backoff * 2 ** attempt)
                with self._lock:
                    delay = self._rng.uniform(0, delay)
                if failure.retry_after is not None:
                    delay = max(delay, min(failure.retry_after, self.backoff_max))
                logger.info("%s: attempt %d of %d failed (%s); retrying in %.2f s", self.url, attempt + 1,
                            self.max_retries + 1, failure.reason, delay)
                time.sleep(delay)
                continue
            except BaseException:
                self.budget.release(reserved)
                raise
            used = usage.get("total") if usage else None
            self.budget.settle(reserved, used if used is not None else reserved, prompt,
                               usage.get("prompt") if usage else None)
            return body
        raise BlackBoxError(self._scrub(f"{self.url}: failed after {self.max_retries + 1} attempts: {last}"))

    def _request(
        self, prompt: str, params: SamplingParams, n: int, logprobs: int | None
    ) -> tuple[list[Completion], dict[str, int] | None]:
        """One HTTP attempt: completions parsed, plus token usage; raises _Retryable or BlackBoxError."""
        openai = self._openai
        common: dict[str, Any] = dict(model=self.model, max_tokens=params.max_tokens, temperature=params.temperature,
                                      top_p=params.top_p, n=n)
        if params.stop:
            common["stop"] = list(params.stop)
        if params.seed is not None:
            common["seed"] = params.seed
        try:
            if self.chat:
                if logprobs is not None:
                    common.update(logprobs=True, top_logprobs=logprobs)
                raw = self._client.chat.completions.with_raw_response.create(
                    messages=[{"role": "user", "content": prompt}], **common)
            else:
                if logprobs is not None:
                    common["logprobs"] = logprobs
                raw = self._client.completions.with_raw_response.create(prompt=prompt, **common)
            content = raw.content
        except openai.APITimeoutError as exc:
            raise _Retryable(f"timed out after {self.timeout:g} s", charged=True) from exc
        except openai.APIConnectionError as exc:
            raise _Retryable(f"cannot connect ({self._one_line(exc.__cause__ or exc)})") from exc
        except openai.APIStatusError as exc:
            status = exc.status_code
            detail = self._error_detail(exc)
            if status in RETRY_STATUS:
                raise _Retryable(f"HTTP {status}{detail}", retry_after=self._retry_after(exc)) from exc
            hint = f" (is ${self.api_key_env} set?)" if status in (401, 403) else ""
            raise BlackBoxError(self._scrub(f"{self.url}: HTTP {status}{detail}{hint}")) from exc
        try:
            data = json.loads(content)
            completions, usage = (self._parse_chat if self.chat else self._parse_completions)(data, n)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            snippet = content[:80].decode("utf-8", "replace") if isinstance(content, bytes) else str(content)[:80]
            raise _Retryable(f"malformed response body ({type(exc).__name__}: {self._one_line(exc)}; "
                             f"body starts {' '.join(snippet.split())!r})", charged=True) from exc
        return completions, usage

    # ---- response parsing --------------------------------------------------------------------

    @staticmethod
    def _usage(data: dict) -> dict[str, int] | None:
        usage = data.get("usage")
        if not isinstance(usage, dict):
            return None
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        total = usage.get("total_tokens")
        if total is None and prompt is not None and completion is not None:
            total = prompt + completion
        return {"prompt": int(prompt) if prompt is not None else None, "total": int(total) if total is not None else None}

    def _parse_completions(self, data: Any, n: int) -> tuple[list[Completion], dict | None]:
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise ValueError(f"{len(choices)} choices for n={n}")
        out = []
        for choice in choices:
            text = choice["text"]
            if not isinstance(text, str):
                raise TypeError("choice text is not a string")
            lp = choice.get("logprobs")
            tokens, token_logprobs, top = [], [], None
            if lp:
                tokens = [str(t) for t in lp.get("tokens") or []]
                token_logprobs = [float(x) if x is not None else -math.inf for x in lp.get("token_logprobs") or []]
                if len(tokens) != len(token_logprobs):
                    raise ValueError("tokens and token_logprobs differ in length")
                raw_top = lp.get("top_logprobs")
                if raw_top is not None:
                    top = [{str(k): float(v) for k, v in sorted((d or {}).items(), key=lambda kv: -kv[1])}
                           for d in raw_top]
            out.append(Completion(text=text, tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top,
                                  finish_reason=choice.get("finish_reason") or "length"))
        return out, self._usage(data)

    def _parse_chat(self, data: Any, n: int) -> tuple[list[Completion], dict | None]:
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise ValueError(f"{len(choices)} choices for n={n}")
        out = []
        for choice in choices:
            text = choice["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError("message content is not a string")
            lp = choice.get("logprobs")
            tokens, token_logprobs, top = [], [], None
            if lp and lp.get("content") is not None:
                entries = lp["content"]
                tokens = [str(e["token"]) for e in entries]
                token_logprobs = [float(e["logprob"]) for e in entries]
                if any(e.get("top_logprobs") for e in entries):
                    top = [{str(a["token"]): float(a["logprob"])
                            for a in sorted(e.get("top_logprobs") or [], key=lambda a: -a["logprob"])}
                           for e in entries]
            out.append(Completion(text=text, tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top,
                                  finish_reason=choice.get("finish_reason") or "length"))
        return out, self._usage(data)

    # ---- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _retry_after(exc: Any) -> float | None:
        try:
            value = exc.response.headers.get("retry-after")
            return float(value) if value is not None else None
        except (AttributeError, ValueError):
            return None

    def _error_detail(self, exc: Any) -> str:
        body = getattr(exc, "body", None)  # the client's parsed error body: {"message": ...} or {"error": {...}}
        message = None
        if isinstance(body, dict):
            inner = body.get("error")
            message = body.get("message") or (inner.get("message") if isinstance(inner, dict) else inner)
        if not message:
            try:
                message = exc.response.text[:200]
            except Exception:  # a response without a readable body
                message = ""
        message = self._one_line(message) if message else ""
        return f": {message}" if message else ""

    def _scrub(self, text: str) -> str:
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key else text

    def _one_line(self, exc: Any) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        text = self._scrub(text)
        return text if len(text) <= 200 else text[:197] + "..."
