"""Sampling parameters of a request and the batched sampler that turns logits into tokens.

`SamplingParams` is shaped like vLLM's so its users feel at home; it is validated once, when it is
built, so the engine never meets a bad value mid-step. Normalised forms: `stop` and
`stop_token_ids` are tuples (empty when not given), `top_k` is 0 when off.

`Sampler` invariants, for every call:
- a greedy row (temperature 0) gets `argmax` of its logits, lowest index on ties;
- a sampled row's token depends only on its own logits, its params and its own generator, never on
  which other rows share the batch (so a seeded request is reproducible however it is batched);
- a sampled token always lies inside the row's top-k and top-p set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_LOGPROBS = 20  # the most top logprobs a request may ask for per generated token
_SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes a 64-bit seed


class SamplingParamsError(ValueError):
    """A sampling parameter is invalid or unsupported (the server answers HTTP 400)."""


def _check_int(name: str, value: object) -> int:
    # bool is an int subclass; `max_tokens=True` is a caller's mistake, not the number 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(f"{name} must be an int, got {value!r}")
    return value


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SamplingParamsError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SamplingParamsError(f"{name} must be a bool, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the tokens of one request; immutable, validated and normalised on creation.

    After construction `stop` is a `tuple[str, ...]` and `stop_token_ids` a `tuple[int, ...]`
    (both empty when not given), `temperature`/`top_p` are floats and `top_k` is 0 when off.
    `max_tokens=None` means "up to the model's max length"; the engine resolves it.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    max_tokens: int | None = 16
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if _check_int("n", self.n) != 1:
            raise SamplingParamsError(f"n must be 1 (only one sequence per request), got {self.n}")
        temperature = _check_float("temperature", self.temperature)
        if temperature < 0:
            raise SamplingParamsError(f"temperature must be >= 0, got {temperature}")
        top_p = _check_float("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {top_p}")
        top_k = _check_int("top_k", self.top_k)
        if top_k < -1:
            raise SamplingParamsError(f"top_k must be -1 or 0 (off) or >= 1, got {top_k}")
        if self.seed is not None and not 0 <= _check_int("seed", self.seed) < _SEED_LIMIT:
            raise SamplingParamsError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.max_tokens is not None and _check_int("max_tokens", self.max_tokens) < 1:
            raise SamplingParamsError(f"max_tokens must be >= 1, got {self.max_tokens}")
        logprobs = self.logprobs
        if logprobs is not None and not 0 <= _check_int("logprobs", logprobs) <= MAX_LOGPROBS:
            raise SamplingParamsError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check_bool(name, getattr(self, name))
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "top_k", max(top_k, 0))
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalise_stop_token_ids(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        """True when the request takes the most likely token at every step (temperature 0)."""
        return self.temperature == 0


def _normalise_stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise SamplingParamsError(f"stop must be a str or a list of str, got {stop!r}")
    for s in items:
        if not isinstance(s, str) or not s:
            raise SamplingParamsError(f"stop must hold non-empty strings, got {s!r}")
    return tuple(items)


def _normalise_stop_token_ids(ids: object) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, (list, tuple)):
        raise SamplingParamsError(f"stop_token_ids must be a list of int, got {ids!r}")
    for t in ids:
        if _check_int("stop_token_ids", t) < 0:
            raise SamplingParamsError(f"stop_token_ids must be >= 0, got {t}")
    return tuple(ids)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The request's own RNG when it has a seed, so its draws never depend on other requests."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass(slots=True)
class SampleResult:
    """What the sampler picked for each row of the batch."""

    token_ids: list[int]  # one per row
    # per row: {token_id: logprob} for the top-n and the sampled token; None if not asked for
    logprobs: list[dict[int, float] | None]


class Sampler:
    """Turns a batch of logits into one token per row, each row under its own SamplingParams."""

    def __call__(
        self,
        logits: Tensor,  # [B, V] any float dtype; rows that sample or want logprobs go to float32
        params: Sequence[SamplingParams],  # [B]
        generators: Sequence[torch.Generator | None],  # [B]; None: the default torch RNG
    ) -> SampleResult:
        return self.result(logits, self.pick(logits, params, generators).tolist(), params)

    def pick(
        self,
        logits: Tensor,  # [B, V] any float dtype; rows that sample or want logprobs go to float32
        params: Sequence[SamplingParams],  # [B]
        generators: Sequence[torch.Generator | None],  # [B]; None: the default torch RNG
    ) -> Tensor:  # [B] token ids, on the logits' device
        """The tokens, left on the device: on a GPU the caller decides when to wait for them
        (the engine queues the next decode step first)."""
        if logits.dim() != 2 or not len(params) == len(generators) == logits.shape[0]:
            raise ValueError(
                f"logits {tuple(logits.shape)} need one params and one generator per row, "
                f"got {len(params)} params and {len(generators)} generators"
            )
        # Greedy rows, ties to the lowest index; an all-greedy batch ends here.
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = [params[i] for i in sampled_rows]
            gens = [generators[i] for i in sampled_rows]
            tokens[sampled_rows] = _sample(logits[sampled_rows].float(), rows, gens)
        return tokens

    def result(
        self,
        logits: Tensor,  # [B, V] any float dtype; rows that sample or want logprobs go to float32
        token_ids: list[int],  # [B] what `pick` chose
        params: Sequence[SamplingParams],  # [B]
    ) -> SampleResult:
        """The picked tokens with the logprobs the rows asked for."""
        if not any(p.logprobs is not None for p in params):
            return SampleResult(token_ids, [None] * len(params))
        return SampleResult(token_ids, _logprobs(logits, token_ids, params))


def _sample(
    logits: Tensor,  # [S, V] float32, the rows that sample
    params: Sequence[SamplingParams],  # [S]
    generators: Sequence[torch.Generator | None],  # [S]
) -> Tensor:  # [S] token ids
    """Temperature, then top-k, then top-p, then a draw from the softmax of what is left."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    # Subtract the row max first: dividing by a tiny temperature then underflows to -inf (prob 0)
    # instead of overflowing to inf (NaN in softmax). Softmax does not see the shift.
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature[:, None]
    filter_rows = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1]
    if filter_rows:
        filtered = [params[i] for i in filter_rows]
        scaled[filter_rows] = _top_k_top_p(
            scaled[filter_rows],
            torch.tensor([p.top_k for p in filtered], device=device),
            torch.tensor([p.top_p for p in filtered], device=device),
        )
    probs = torch.softmax(scaled, dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. draws token t with probability p_t.
    # Seeded rows draw their own noise so their tokens never depend on batch neighbours.
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_()
    for i, generator in enumerate(generators):
        if generator is not None:
            noise[i].exponential_(generator=generator)
    # Exp draws of exactly 0 would turn masked tokens into 0/0 = NaN, which argmax would pick.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _top_k_top_p(
    logits: Tensor,  # [R, V] temperature-scaled
    top_k: Tensor,  # [R] int, 0 = off
    top_p: Tensor,  # [R] float in (0, 1], 1 = off
) -> Tensor:  # [R, V] with the tokens outside the top-k/top-p set at -inf
    """One sort serves both filters. Stable, so ties keep index order and a row's set is its own."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)
    drop = rank >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep a token while the mass strictly above it is below top_p: the smallest set reaching
    # top_p, the top token always kept. top_p == 1 rows skip this, rounding must not trim them.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    return logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)


def _logprobs(
    logits: Tensor,  # [B, V]
    token_ids: list[int],  # [B] the chosen tokens
    params: Sequence[SamplingParams],  # [B]
) -> list[dict[int, float] | None]:
    """Log-softmax of the raw logits (before temperature and filters), as vLLM reports them."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)  # [R, V]
    chosen = torch.tensor([token_ids[i] for i in rows], device=logits.device)
    chosen_values = logprobs.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    max_n = min(max(params[i].logprobs or 0 for i in rows), logprobs.shape[1])
    top_values, top_ids = (t.tolist() for t in logprobs.topk(max_n, dim=-1))
    out: list[dict[int, float] | None] = [None] * len(params)
    for r, i in enumerate(rows):
        n = params[i].logprobs
        entry = dict(zip(top_ids[r][:n], top_values[r][:n], strict=True))
        entry.setdefault(token_ids[i], chosen_values[r])
        out[i] = entry
    return out
