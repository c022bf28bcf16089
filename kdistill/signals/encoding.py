"""Compact per-token encoding of a teacher's top-k distribution (``topk-ef-v1``).

One token's record is a bit string (least significant bit first) of ``bytes_per_token(k, V)``
bytes holding the k entries sorted by descending log-probability:

| field | bits | content |
|---|---|---|
| ids | k · ⌈log₂ V⌉ | token ids, fixed width (unused slots: 0) |
| mass | 16 | top-k mass as a logit, s = log P − log(1 − P), P = Σ_k p, on [−32, 32]; code 0 = no entry |
| gap low bits | (k − 1) · l | low l bits of each gap code |
| gap high parts | (k − 1) + H | high parts (code >> l), non-decreasing, in unary |

**Gaps.** The top log-probability is not stored; the k − 1 others are stored as gaps
r_i = log p_1 − log p_i ≥ 0, companded ``u = log1p(r/a) / log1p(R/a)`` (a = ``GAP_KNEE`` = 1 nat,
R = ``GAP_MAX`` = 64 nats; larger gaps are clamped) and rounded to codes 0 … U − 2 (U − 1 marks an
unused slot). The step is ≈ (r + a)·log1p(R/a)/U: fine at the head, coarser in the tail where an
entry weighs e^(−r) less in any divergence. Sorted gaps give non-decreasing codes, stored
Elias–Fano style: l low bits verbatim, the high part c >> l of gap i as bit (c >> l) + i of a
stream of k − 1 ones and H zeros. The log-probabilities get 7 bits per entry on average (16 for
the mass, the rest for the gaps); l and H are chosen to maximise U = (H + 1)·2^l and H absorbs
the last byte's padding.

**Normalisation.** Decoding restores ``log p̂_1 = log σ(ŝ) − log Σ_i exp(−r̂_i)`` and
``log p̂_i = log p̂_1 − r̂_i``: the decoded top-k mass and tail 1 − P̂ carry only the 16-bit mass
error (relative ≤ 4.9e-4 · (1 − P)), so the tail bucket that the sparse losses compare stays
accurate for peaked distributions too (1 − P ≪ 1e-3, where fp32 ``1 − Σ p`` would cancel).
:func:`error_bound` gives the per-entry bound that the tests check.

**Size** (k = 64, V = 262,144, Gemma 3): 144 B of ids (18 bits) + 56 B of log-probs
= **200 B per token** (l = 4, U = 1,888 gap levels ≈ 11 bits of resolution); on disk with the
per-example index 201–202 B. Other sizes: :func:`bytes_per_token` (k = 64, V = 151,936: 200 B;
V = 128,256: 192 B).

**Error** (``benchmarks/cache_size.py``: 1,024 tokens each, V = 262,144, k = 64, fp64
reference and exact tails; *flat*: softmax of σ·N(0, 1) logits, σ ~ U(1, 4); *peaked*: + U(2, 16)
on one logit; *very peaked*: + U(20, 30) (p₁ > 0.99); *zipf*: a 10-token head of decreasing
boosts; *model*: the benchmark's random Llama teacher through ``write_cache``):

| distribution | top-k mass | max abs err log p̂: top-1 | p ≥ 0.01 | all 64 | KL(p‖p̂) mean | max |
|---|---|---|---|---|---|---|
| flat        | 0.23 | 1.0e-3 | 5.3e-3 | 9.4e-3 | 3.9e-7 | 1.7e-6 |
| peaked      | 0.32 | 1.2e-3 | 5.3e-3 | 1.6e-2 | 4.4e-7 | 1.8e-6 |
| very peaked | 0.98 | 6.3e-4 | 5.5e-3 | 3.1e-2 | 9.7e-8 | 1.8e-6 |
| zipf        | 0.24 | 1.2e-3 | 5.0e-3 | 1.0e-2 | 4.1e-7 | 1.7e-6 |
| model       | 0.03 | 9.9e-4 | —      | 4.8e-3 | 3.2e-8 | 9.2e-8 |

KL(p‖p̂) is over the k + 1 categories (top-k and the tail bucket), in nats: four orders of
magnitude below typical KD losses, and the log-prob errors are below a bf16 teacher's own
rounding of its logits (≈ 0.03–0.1 at |z| ≈ 8–30). Ids round-trip exactly; entries come back in
descending order of log-probability (ties keep their input order); an entry with id −1 or
log p = −inf is an unused slot (it decodes as id −1, −inf). Encoding and decoding are torch
tensor programs (no per-token Python) and run on the records' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.errors import ConfigError, DataError, ShapeError

ENCODING = "topk-ef-v1"
GAP_KNEE = 1.0  # a: companding is linear below a nats, logarithmic above
GAP_MAX = 64.0  # R: gaps above this many nats are clamped (entries ≤ e^-64 · p_1)
MASS_BITS = 16
MASS_MAX = 32.0  # S: the top-k mass logit is clamped to [-S, S] (tail ≥ e^-32 ≈ 1.3e-14)


@dataclass(frozen=True)
class TopKFormat:
    """Field widths of one record for ``k`` entries over a vocabulary of ``vocab_size``."""

    k: int
    vocab_size: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k: must be ≥ 1, got {self.k}")
        if self.vocab_size < 1:
            raise ConfigError(f"vocab_size: must be ≥ 1, got {self.vocab_size}")

    @property
    def id_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.vocab_size)))

    @property
    def gap_budget(self) -> int:
        """Bits for the k − 1 gaps: 7 bits per entry in all (with the mass), at least 16."""
        return max(7 * self.k - MASS_BITS, MASS_BITS)

    @property
    def gap_low_bits(self) -> int:
        """l: low bits stored verbatim per gap; the high part (code >> l) is stored in unary."""
        if self.k == 1:
            return 0
        n = self.k - 1
        fits = (low for low in range(31) if self.gap_budget - n * (low + 1) >= 0)
        return max(fits, key=lambda low: (self.gap_budget - n * (low + 1) + 1) << low)  # max U

    @property
    def gap_high_max(self) -> int:
        """H: largest high part; the unary stream has k − 1 ones and H zeros."""
        if self.k == 1:
            return 0
        n, low = self.k - 1, self.gap_low_bits
        high = self.gap_budget - n * (low + 1)
        used = self.k * self.id_bits + MASS_BITS + n * low + n + high
        return high + (-used) % 8  # spend the padding of the last byte on finer gaps

    @property
    def gap_levels(self) -> int:
        """U: gap codes 0 … U − 2, plus U − 1 for an unused slot (0 when k = 1: no gaps)."""
        return 0 if self.k == 1 else (self.gap_high_max + 1) << self.gap_low_bits

    @property
    def unary_bits(self) -> int:
        return 0 if self.k == 1 else (self.k - 1) + self.gap_high_max

    @property
    def bits(self) -> int:
        return self.k * self.id_bits + MASS_BITS + (self.k - 1) * self.gap_low_bits + self.unary_bits

    @property
    def bytes_per_token(self) -> int:
        return -(-self.bits // 8)

    def describe(self) -> dict:
        """The parameters a manifest records (enough to decode with this module's version)."""
        return {
            "name": ENCODING,
            "id_bits": self.id_bits,
            "mass_bits": MASS_BITS,
            "mass_max": MASS_MAX,
            "gap_levels": self.gap_levels,
            "gap_low_bits": self.gap_low_bits,
            "gap_knee": GAP_KNEE,
            "gap_max": GAP_MAX,
        }


def bytes_per_token(k: int, vocab_size: int) -> int:
    """Bytes of one token's record: 200 for k = 64, V = 262,144."""
    return TopKFormat(k, vocab_size).bytes_per_token


def _compand(r: Tensor, levels: int) -> Tensor:
    """Gap (nats, ≥ 0, float64) → code in [0, levels − 1]."""
    u = torch.log1p(r.clamp(0.0, GAP_MAX) / GAP_KNEE) / math.log1p(GAP_MAX / GAP_KNEE)
    return torch.round(u * (levels - 1)).long()


def _expand(code: Tensor, levels: int) -> Tensor:
    return GAP_KNEE * torch.expm1(code.double() / (levels - 1) * math.log1p(GAP_MAX / GAP_KNEE))


def _to_bits(values: Tensor, width: int) -> Tensor:
    """(N, m) non-negative int64 → (N, m · width) uint8 bits, least significant first."""
    values = values.int() if width < 32 else values  # half the memory traffic of int64
    shifts = torch.arange(width, device=values.device, dtype=values.dtype)
    return ((values.unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(values.shape[0], -1)


def _from_bits(bits: Tensor, width: int) -> Tensor:
    """(N, m · width) bits → (N, m) int64."""
    shifts = torch.arange(width, device=bits.device)
    return (bits.reshape(bits.shape[0], -1, width).long() << shifts).sum(-1)


_BYTE_WEIGHTS = [1, 2, 4, 8, 16, 32, 64, 128]


def _pack(bits: Tensor) -> Tensor:
    """(N, 8·B) bits → (N, B) uint8, bit j of a byte = bits[8·byte + j] (numpy's ``bitorder="little"``)."""
    weights = torch.tensor(_BYTE_WEIGHTS, dtype=torch.int32, device=bits.device)
    return (bits.reshape(bits.shape[0], -1, 8).int() * weights).sum(-1).to(torch.uint8)


def _unpack(packed: Tensor) -> Tensor:
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], -1)


def error_bound(logprobs: Tensor, k: int, vocab_size: int) -> Tensor:
    """Upper bound of |log p̂ − log p| per entry after a round trip, in nats.

    logprobs: (N, k) sorted descending (−inf = unused). The bound adds the gap's rounding,
    ``(r + a)·expm1(L / (2(U − 2)))`` with L = log1p(R/a) (plus r − R above R), the change of the
    normaliser log Σ exp(−r) (its p-weighted mean, widened by exp(2·max)), and the mass code's
    half step times the tail, ``(1 − P)·S/(2^16 − 2)`` (plus |s| − S when clamped).
    """
    fmt = TopKFormat(k, vocab_size)
    lp = logprobs.detach().to("cpu", torch.float64)
    used = lp > -math.inf
    top = lp[:, :1]
    r = torch.where(used, top - lp, torch.zeros_like(lp))
    if k > 1:
        half = math.expm1(math.log1p(GAP_MAX / GAP_KNEE) / (2 * (fmt.gap_levels - 2)))
        gap_err = (r.clamp(max=GAP_MAX) + GAP_KNEE) * half + (r - GAP_MAX).clamp(min=0)
        gap_err[:, 0] = 0.0
    else:
        gap_err = torch.zeros_like(r)
    gap_err = torch.where(used, gap_err, torch.zeros_like(gap_err))
    weights = torch.where(used, (-r).exp(), torch.zeros_like(r))
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-300)
    worst = gap_err.max(-1, keepdim=True).values
    norm_err = (weights * gap_err).sum(-1, keepdim=True) * (2 * worst).exp()
    log_mass = torch.where(used, lp, torch.full_like(lp, -math.inf)).logsumexp(-1, keepdim=True)
    tail = -torch.expm1(log_mass.clamp(max=0.0))
    s = log_mass - tail.log()
    mass_err = tail * MASS_MAX / (2**MASS_BITS - 2) + (s.abs() - MASS_MAX).clamp(min=0)
    return torch.where(used, gap_err + norm_err + mass_err, torch.zeros_like(lp))


def encode_topk(
    ids: Tensor, logprobs: Tensor, vocab_size: int, *, log_tail: Tensor | None = None, validate: bool = True
) -> Tensor:
    """Pack top-k entries: ids (N, k) int, logprobs (N, k) float (log p over the full vocabulary).

    ``log_tail`` (N,): log of the mass outside the k entries, when the caller has it more exactly
    than ``log(1 − Σ_k p)`` (which loses precision below ≈ 1e-7 in fp32). Returns a (N, B) uint8
    tensor on the inputs' device, B = :func:`bytes_per_token`. Entries need not be sorted.
    ``validate=False`` skips the id range check (a device synchronisation) for trusted ids.
    """
    if ids.ndim != 2 or ids.shape != logprobs.shape:
        raise ShapeError(f"encode_topk: ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} must be (N, k)")
    n, k = ids.shape
    fmt = TopKFormat(k, vocab_size)
    ids = ids.detach().long()
    lp = logprobs.detach().to(ids.device, torch.float64)
    if validate and n and (int(ids.min()) < -1 or int(ids.max()) >= vocab_size):
        raise ShapeError(f"encode_topk: ids must be in [-1, {vocab_size}) (vocab_size {vocab_size})")
    unused = (ids < 0) | ~(lp > -math.inf)  # also NaN
    key = lp.masked_fill(unused, -math.inf)
    key, order = key.sort(dim=-1, descending=True, stable=True)
    unused = unused.gather(1, order)
    ids = ids.gather(1, order).masked_fill(unused, 0)

    # Top-k mass as a logit: s = log P − log(1 − P).
    top = key[:, :1]
    log_mass = (top + (key - top).exp().sum(1, keepdim=True).log())[:, 0]
    log_mass = log_mass.masked_fill(unused[:, 0], -math.inf)
    if log_tail is None:
        tail = torch.log(-torch.expm1(log_mass.clamp(max=0.0)))
    else:
        tail = log_tail.detach().to(ids.device, torch.float64).reshape(n)
    s = torch.nan_to_num(log_mass - tail, nan=MASS_MAX).clamp(-MASS_MAX, MASS_MAX)
    mass_code = 1 + torch.round((s + MASS_MAX) / (2 * MASS_MAX) * (2**MASS_BITS - 2)).long()
    mass_code = mass_code.masked_fill(unused[:, 0], 0)

    parts = [_to_bits(ids, fmt.id_bits), _to_bits(mass_code[:, None], MASS_BITS)]
    if k > 1:
        levels = fmt.gap_levels
        gaps = torch.nan_to_num(top - key[:, 1:], nan=0.0, posinf=GAP_MAX)
        codes = _compand(gaps, levels - 1).masked_fill(unused[:, 1:], levels - 1)
        codes = codes.cummax(1).values  # non-decreasing (rounding keeps it; be sure)
        low = fmt.gap_low_bits
        unary = torch.zeros((n, fmt.unary_bits), dtype=torch.uint8, device=ids.device)
        unary.scatter_(1, (codes >> low) + torch.arange(k - 1, device=ids.device), 1)
        if low:
            parts.append(_to_bits(codes & ((1 << low) - 1), low))
        parts.append(unary)
    pad = fmt.bytes_per_token * 8 - fmt.bits
    if pad:
        parts.append(torch.zeros((n, pad), dtype=torch.uint8, device=ids.device))
    return _pack(torch.cat(parts, 1))


def decode_topk(packed: Tensor | np.ndarray, k: int, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Unpack (N, B) uint8 records → ids (N, k) int64 (−1 unused), logprobs (N, k) float32 (−inf unused).

    On the records' device. Entries come out in descending order of log-probability. A record
    that is not a valid encoding (wrong width, broken gap stream, id ≥ V) raises
    :class:`~kdistill.errors.DataError`.
    """
    fmt = TopKFormat(k, vocab_size)
    data = packed.detach() if isinstance(packed, Tensor) else torch.from_numpy(np.asarray(packed))
    if data.ndim != 2 or data.shape[1] != fmt.bytes_per_token or data.dtype != torch.uint8:
        raise DataError(
            f"top-k records: expected (N, {fmt.bytes_per_token}) uint8 for k={k}, V={vocab_size}, "
            f"got {tuple(data.shape)} {data.dtype}"
        )
    n, device = data.shape[0], data.device
    bits = _unpack(data)
    id_end = k * fmt.id_bits
    ids = _from_bits(bits[:, :id_end], fmt.id_bits)
    mass_code = _from_bits(bits[:, id_end : id_end + MASS_BITS], MASS_BITS)[:, 0]
    s = (mass_code.double() - 1) / (2**MASS_BITS - 2) * (2 * MASS_MAX) - MASS_MAX
    log_mass = F.logsigmoid(s)
    empty = mass_code == 0

    gaps = torch.zeros((n, k), dtype=torch.float64, device=device)
    unused = torch.zeros((n, k), dtype=torch.bool, device=device)
    if k > 1:
        levels, low = fmt.gap_levels, fmt.gap_low_bits
        start = id_end + MASS_BITS + (k - 1) * low
        unary = bits[:, start : start + fmt.unary_bits]
        if n and not bool((unary.sum(1) == k - 1).all()):
            raise DataError("top-k records: corrupt gap stream (wrong number of entries)")
        cols = unary.nonzero()[:, 1].reshape(n, k - 1)  # row-major: each row's positions in order
        codes = (cols - torch.arange(k - 1, device=device)) << low
        if low:
            codes |= _from_bits(bits[:, id_end + MASS_BITS : start], low)
        unused[:, 1:] = codes == levels - 1
        gaps[:, 1:] = _expand(codes.clamp(max=levels - 2), levels - 1)
    unused |= empty[:, None]
    if n and bool((ids.masked_fill(unused, 0) >= vocab_size).any()):
        raise DataError(f"top-k records: id ≥ vocab_size {vocab_size} (corrupt record or wrong vocabulary)")
    neg = (-gaps).masked_fill(unused, -math.inf)
    norm = neg.logsumexp(1, keepdim=True)  # ≥ 0: the top entry has gap 0 (−inf for empty rows)
    logprobs = (log_mass[:, None] - norm.masked_fill(empty[:, None], 0.0) + neg).masked_fill(unused, -math.inf)
    return ids.masked_fill(unused, -1), logprobs.float()
