"""Perplexity, by one documented protocol (the GPTQ reference's).

Protocol:

1. the evaluation text is joined (see ``lowbit.eval.data``) and tokenized
   once, without special tokens;
2. the token ids are cut into non-overlapping windows of ``window`` tokens
   (``make_windows``); the incomplete tail is dropped;
3. each window is scored on its own, from an empty context: the logits at
   positions ``0..L-2`` predict the tokens at positions ``1..L-1`` (the
   shift Hugging Face applies for ``labels=input_ids``), so each window
   contributes ``L-1`` predicted tokens;
4. ``ppl = exp(mean NLL over all predicted tokens)``, natural log.

Since every window has the same ``L-1`` predicted tokens this equals the
GPTQ reference's ``exp(sum_i(loss_i * L) / (n * L))`` where ``loss_i`` is
the mean NLL of window ``i``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowbit.errors import DataError


@dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(mean_nll); mean_nll in nats per predicted token.

    n_tokens = n_windows * (window - 1) predicted tokens.
    """

    ppl: float
    mean_nll: float
    n_tokens: int
    n_windows: int
    window: int

    def to_dict(self) -> dict:
        return asdict(self)


def make_windows(token_ids: torch.Tensor, window: int, n_windows: int | None = None) -> torch.Tensor:
    """Cut a 1-D token sequence into non-overlapping windows: LongTensor ``[n, window]``.

    Window ``i`` is ``token_ids[i*window:(i+1)*window]``. The incomplete tail
    is dropped. ``n_windows`` (if given) takes the first ``n_windows``
    windows. Raises DataError when the sequence is shorter than one window
    or fewer than ``n_windows`` windows are available.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() != 1:
        raise DataError(f"token_ids must be 1-D, got shape {tuple(ids.shape)}; flatten it first")
    if window < 2:
        raise DataError(f"window must be at least 2 tokens (one context, one target), got {window}")
    available = ids.numel() // window
    if available == 0:
        raise DataError(
            f"the text has {ids.numel()} tokens, shorter than one window of {window}; "
            f"use a smaller window or a longer text"
        )
    if n_windows is None:
        n_windows = available
    elif n_windows < 1:
        raise DataError(f"n_windows must be >= 1, got {n_windows}")
    elif n_windows > available:
        raise DataError(
            f"asked for {n_windows} windows of {window} tokens but the text ({ids.numel()} "
            f"tokens) has only {available} available; ask for at most {available}"
        )
    return ids[: n_windows * window].reshape(n_windows, window).clone()


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def forward_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[B, L, V]`` of ``model`` on ``input_ids`` ``[B, L]``.

    Accepts Hugging Face causal LMs (called with ``use_cache=False``; the
    ``.logits`` of the output is used) and any module returning logits.
    """
    kwargs = {}
    try:
        if "use_cache" in inspect.signature(model.forward).parameters:
            kwargs["use_cache"] = False
    except (TypeError, ValueError):  # pragma: no cover - exotic callables
        pass
    out = model(input_ids.to(_model_device(model)), **kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.float()


def token_nll(logits: torch.Tensor, window_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``[B, L-1]`` (float32, nats): logits at t predict the token at t+1."""
    b, length, vocab = logits.shape
    targets = window_ids[:, 1:].to(logits.device)
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), targets.reshape(-1), reduction="none"
    )
    return nll.reshape(b, length - 1)


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` ``[n, L]`` (see the module docstring).

    Measures exp(mean NLL) over the ``n*(L-1)`` predicted tokens, each
    window scored independently; NLL is computed in float32 from
    ``cross_entropy`` (log-softmax) and summed in float64.
    """
    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise DataError(
            f"windows must be [n >= 1, L >= 2] token ids (use make_windows), got {tuple(windows.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, length = windows.shape
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.inference_mode():
        for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = windows[start : start + batch_size]
            logits = forward_logits(model, batch)
            nll = token_nll(logits, batch)
            del logits
            total += nll.double().sum().cpu()
            count += nll.numel()
    mean_nll = float(total / count)
    return PerplexityResult(
        ppl=math.exp(mean_nll), mean_nll=mean_nll, n_tokens=count, n_windows=n, window=length
    )
