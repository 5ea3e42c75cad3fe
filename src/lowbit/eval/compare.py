"""Compare a candidate (e.g. quantized) model with its reference on the same tokens.

Perplexity alone hides damage, so one pass over the windows reports, for
both models, perplexity under the protocol of ``lowbit.eval.perplexity``,
and, between them:

* ``mean_kl``: mean over predicted positions of
  ``KL(P_ref || P_cand) = sum_v P_ref(v) * (log P_ref(v) - log P_cand(v))``,
  natural log (nats), where ``P`` is the softmax next-token distribution;
* ``max_kl``: the largest per-position KL;
* ``top1_agreement``: fraction of positions where both argmaxes agree.

Positions: the same ``L-1`` positions per window that perplexity scores
(``0..L-2``; the last position of a window, whose next token is not in the
window, is left out), so every number covers exactly ``n_tokens`` positions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowbit.errors import DataError
from lowbit.eval.perplexity import forward_logits

_ROW_CHUNK = 256  # positions per log-softmax chunk: bounds temporaries to a few [256, V] tensors


@dataclass(frozen=True)
class ComparisonResult:
    """Reference vs candidate on the same ``n_tokens`` predicted positions (nats)."""

    reference_ppl: float
    candidate_ppl: float
    reference_mean_nll: float
    candidate_mean_nll: float
    mean_kl: float
    max_kl: float
    top1_agreement: float
    n_tokens: int
    n_windows: int
    window: int

    @property
    def delta_ppl(self) -> float:
        """candidate_ppl - reference_ppl."""
        return self.candidate_ppl - self.reference_ppl

    def to_dict(self) -> dict:
        d = asdict(self)
        d["delta_ppl"] = self.delta_ppl
        return d


def compare_models(reference, candidate, windows: torch.Tensor, progress: bool = True) -> ComparisonResult:
    """One pass over ``windows`` ``[n, L]``, one window at a time (see the module docstring).

    Both models see identical token ids; logits are taken in float32, the
    statistics are accumulated in float64.
    """
    return compare_many(reference, {"candidate": candidate}, windows, progress=progress)["candidate"]


class _Accumulator:
    def __init__(self) -> None:
        self.nll_ref = torch.zeros((), dtype=torch.float64)
        self.nll_cand = torch.zeros((), dtype=torch.float64)
        self.kl_sum = torch.zeros((), dtype=torch.float64)
        self.kl_max = 0.0
        self.agree = 0

    def add(self, ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor) -> None:
        for s in range(0, ref_logits.shape[0], _ROW_CHUNK):
            r = F.log_softmax(ref_logits[s : s + _ROW_CHUNK], dim=-1)
            c = F.log_softmax(cand_logits[s : s + _ROW_CHUNK], dim=-1)
            t = targets[s : s + _ROW_CHUNK]
            self.nll_ref += -r.gather(1, t[:, None]).double().sum().cpu()
            self.nll_cand += -c.gather(1, t[:, None]).double().sum().cpu()
            kl = torch.einsum("ij,ij->i", r.exp(), r - c)  # sum_v p_ref * (log p_ref - log p_cand)
            self.kl_sum += kl.double().sum().cpu()
            self.kl_max = max(self.kl_max, float(kl.max()))
            self.agree += int((r.argmax(-1) == c.argmax(-1)).sum())
            del r, c, kl

    def result(self, count: int, n: int, length: int) -> ComparisonResult:
        ref_mean = float(self.nll_ref / count)
        cand_mean = float(self.nll_cand / count)
        return ComparisonResult(
            reference_ppl=math.exp(ref_mean),
            candidate_ppl=math.exp(cand_mean),
            reference_mean_nll=ref_mean,
            candidate_mean_nll=cand_mean,
            mean_kl=float(self.kl_sum / count),
            max_kl=self.kl_max,
            top1_agreement=self.agree / count,
            n_tokens=count,
            n_windows=n,
            window=length,
        )


def compare_many(reference, candidates: dict, windows: torch.Tensor, progress: bool = True) -> dict:
    """``compare_models`` for several candidates at once: the reference runs once per
    window and every candidate is compared with those logits. Returns ``{name: ComparisonResult}``."""
    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise DataError(
            f"windows must be [n >= 1, L >= 2] token ids (use make_windows), got {tuple(windows.shape)}"
        )
    if not candidates:
        raise DataError("compare_many needs at least one candidate model")
    n, length = windows.shape
    acc = {name: _Accumulator() for name in candidates}
    with torch.inference_mode():
        for i in tqdm(range(n), desc="compare", unit="window", disable=not progress):
            ids = windows[i : i + 1]
            ref_logits = forward_logits(reference, ids)[0, :-1]
            targets = ids[0, 1:].to(ref_logits.device)
            for name, cand in candidates.items():
                cand_logits = forward_logits(cand, ids)[0, :-1]
                if ref_logits.shape != cand_logits.shape:
                    raise DataError(
                        f"reference logits {tuple(ref_logits.shape)} and candidate {name!r} logits "
                        f"{tuple(cand_logits.shape)} differ; the models must share a vocabulary"
                    )
                acc[name].add(ref_logits, cand_logits, targets)
                del cand_logits
            del ref_logits
    count = n * (length - 1)
    return {name: a.result(count, n, length) for name, a in acc.items()}
