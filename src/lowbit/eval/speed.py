"""Throughput of prefill and decode, with plain ``time.perf_counter`` timings.

Inputs are random token ids drawn from a ``torch.Generator`` with a fixed
seed, so runs are repeatable. Everything runs under ``torch.inference_mode``.
Decode uses the model's own KV cache through repeated forward calls
(``past_key_values``, ``use_cache=True``), greedy, one token per step; no
``generate()`` machinery (logits processors, stopping criteria) is timed.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class PrefillResult:
    """tokens_per_s = batch * seqlen / median_s over ``repeats`` timed forwards."""

    tokens_per_s: float
    median_s: float
    batch: int
    seqlen: int
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DecodeResult:
    """tokens_per_s = batch * new_tokens / median_s; median_s excludes the prompt's prefill."""

    tokens_per_s: float
    median_s: float
    ms_per_step: float
    prefill_s: float
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def time_fn(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _vocab_size(model) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        size = model.get_input_embeddings().num_embeddings
    return int(size)


def _device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def random_token_ids(model, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """LongTensor ``[batch, length]`` of uniform random ids below the model's vocab size."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, _vocab_size(model), (batch, length), generator=g).to(_device(model))


def _last_logits_kwargs(model) -> dict:
    # Like generate(): compute the lm_head only for the last position when the
    # model supports it (HF ``logits_to_keep``), so prefill is not dominated
    # by a [B, L, V] vocabulary projection no generation ever uses.
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def measure_prefill(model, batch: int = 1, seqlen: int = 128, repeats: int = 3, warmup: int = 1,
                    seed: int = 0) -> PrefillResult:
    """Prefill throughput: prompt tokens processed per second.

    Times one forward of ``[batch, seqlen]`` random ids with ``use_cache=True``
    (the cache is built, as in generation, then discarded) and logits for the
    last position only when supported; median over ``repeats``.
    """
    ids = random_token_ids(model, batch, seqlen, seed)
    kwargs = {"use_cache": True, **_last_logits_kwargs(model)}

    def run():
        with torch.inference_mode():
            model(ids, **kwargs)

    median = time_fn(run, repeats=repeats, warmup=warmup)
    return PrefillResult(batch * seqlen / median, median, batch, seqlen, repeats)


def _greedy_decode(model, ids: torch.Tensor, new_tokens: int, extra: dict) -> tuple[float, float]:
    """Prefill ``ids``, then ``new_tokens`` greedy single-token steps; returns (prefill_s, decode_s)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, **extra)
        past = out.past_key_values
        next_ids = out.logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(next_ids, past_key_values=past, use_cache=True, **extra)
            past = out.past_key_values
            next_ids = out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def measure_decode(model, batch: int = 1, prompt_len: int = 64, new_tokens: int = 32, warmup: int = 1,
                   repeats: int = 1, seed: int = 0) -> DecodeResult:
    """Decode throughput: generated tokens per second, using the model's KV cache.

    A random prompt ``[batch, prompt_len]`` is prefilled (timed separately,
    reported as ``prefill_s``), then ``new_tokens`` greedy steps each feed one
    token per sequence with ``past_key_values``. ``tokens_per_s`` is
    ``batch * new_tokens`` over the median decode time of ``repeats`` runs,
    after ``warmup`` untimed runs. Needs a Hugging Face-style causal LM.
    """
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"new_tokens and repeats must be >= 1, got {new_tokens} and {repeats}")
    ids = random_token_ids(model, batch, prompt_len, seed)
    extra = _last_logits_kwargs(model)
    for _ in range(warmup):
        _greedy_decode(model, ids, new_tokens, extra)
    prefills, decodes = [], []
    for _ in range(repeats):
        p, d = _greedy_decode(model, ids, new_tokens, extra)
        prefills.append(p)
        decodes.append(d)
    median = statistics.median(decodes)
    return DecodeResult(
        tokens_per_s=batch * new_tokens / median,
        median_s=median,
        ms_per_step=1000.0 * median / new_tokens,
        prefill_s=statistics.median(prefills),
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        repeats=repeats,
    )
