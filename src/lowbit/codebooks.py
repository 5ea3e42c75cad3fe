"""Code tables of the codebook formats, as data (no tensors are quantized here).

The tables are bitsandbytes' definitions (``bitsandbytes.functional.get_4bit_type``
and ``create_dynamic_map``, read in bitsandbytes 0.50.2); ``tests/test_codebooks.py``
checks them value for value against bitsandbytes itself.

* ``NF4``: NormalFloat4 (QLoRA), 16 values in ascending order; code ``i`` means
  ``NF4[i] * absmax``. Quantiles of N(0, 1) normalised to [-1, 1], with an exact 0
  (code 7) and 8 positive / 7 negative values.
* ``FP4``: bitsandbytes' FP4, code ``0bSEEM`` (sign, two exponent bits, one mantissa
  bit, exponent bias 2; ``0b001`` is the subnormal 0.0625). The raw values of codes
  ``0..7`` are ``0, 0.0625, 8, 12, 4, 6, 2, 3``; codes ``8..15`` are their negatives
  (code 8 is -0). The table is normalised by its largest magnitude, 12, so code 3 is 1.
* ``dynamic_map()``: the signed 8-bit "dynamic tree" map used for double
  quantization of the 4-bit formats' absmax values: for ``i = 0..6`` the
  ``2**i`` midpoints of ``linspace(0.1, 1, 2**i + 1)`` scaled by ``10**(i - 6)`` (all in
  float32), and
  their negatives, plus 0 and 1; 256 values sorted ascending.
"""

from __future__ import annotations

from functools import lru_cache

import torch

NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)  # codes 0b000 .. 0b111
FP4 = tuple(m / 12.0 for m in _FP4_MAGNITUDES) + tuple(-m / 12.0 for m in _FP4_MAGNITUDES)

_TABLES = {"nf4": NF4, "fp4": FP4}


@lru_cache(maxsize=None)
def _table(name: str) -> torch.Tensor:
    return torch.tensor(_TABLES[name], dtype=torch.float32)


def table(name: str) -> torch.Tensor:
    """The 16 float32 values of ``"nf4"`` or ``"fp4"``, indexed by code (a fresh copy)."""
    return _table(name).clone()


@lru_cache(maxsize=None)
def _sorted_bounds(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    values = _table(name) if name in _TABLES else _dynamic_map()
    order = torch.argsort(values, stable=True)  # FP4's +0 (code 0) sorts before its -0 (code 8)
    ordered = values[order]
    return (ordered[:-1] + ordered[1:]) / 2, order


def nearest_codes(scaled: torch.Tensor, name: str) -> torch.Tensor:
    """Codes (int64) of the table values nearest to ``scaled`` (already in [-1, 1]).

    A value exactly half-way between two neighbours takes the lower one (the
    midpoints are float32; ``torch.bucketize`` with ``right=False``), as bitsandbytes does.
    """
    bounds, order = _sorted_bounds(name)
    return order[torch.bucketize(scaled, bounds)]


@lru_cache(maxsize=None)
def _dynamic_map() -> torch.Tensor:
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        step = 10.0 ** (i - 6)
        values += (step * mids).tolist() + (-step * mids).tolist()  # products in float32
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 float32 values, ascending; a copy)."""
    return _dynamic_map().clone()
