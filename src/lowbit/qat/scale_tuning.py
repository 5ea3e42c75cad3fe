"""End-to-end tuning of a quantized model's scales by distillation, the integer codes fixed.

After a rounding method (RTN, GPTQ, AWQ+GPTQ, ...) has chosen every layer's codes, each group's
scale ``s`` is replaced by ``s * exp(r)`` with one trainable ``r`` per stored scale, and all ``r``
are trained together (Adam, cosine decay) to lower the KL divergence from the full-precision
model's next-token distribution to the quantized model's on calibration windows: EfficientQAT's
E2E-QP (Chen et al. 2024) and PEQA (Kim et al. 2023) with a distillation loss, as in LLM-QAT's
data-free setting (Liu et al. 2023). The stored layout does not change: the tuned scales are
written back in the scheme's scale dtype. Optionally the normalisation weights train too.

The last ``E2ETuning.holdout`` calibration windows never enter training; the tuned scales are
kept only if they lower the KL on those windows (measured with the scales as stored), otherwise
every scale and norm weight is restored bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import formats
from lowbit.errors import CalibrationError, SchemeError
from lowbit.kernels.registry import use_kernel
from lowbit.nn import QuantLinear
from lowbit.qat.config import E2ETuning

__all__ = ["TunableScales", "TuningResult", "distillation_kl", "heldout_kl", "tune_scales"]


class TunableScales(nn.Module):
    """A ``QuantLinear``'s weights as ``dequantize(codes, scale * exp(log_ratio))`` with the codes
    and zero points fixed and ``log_ratio`` (one per stored scale, starting at 0) trainable."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        check_tunable(layer)
        qt = layer.quantized_tensor()
        qp = qt.qparams
        self.scheme = qt.scheme
        self.register_buffer("codes", qt.codes())
        self.register_buffer("scale0", qp.scale.float())
        self.register_buffer("zero", qp.zero)
        self.log_ratio = nn.Parameter(torch.zeros_like(self.scale0))
        self.bias = layer.bias

    def scales(self) -> torch.Tensor:
        return self.scale0 * torch.exp(self.log_ratio)

    def weight(self) -> torch.Tensor:
        return formats.dequantize(self.codes, formats.QParams(self.scales(), self.zero), self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def write_back(self, layer: QuantLinear) -> None:
        """Store the tuned scales in ``layer`` (in its scale dtype)."""
        layer.scale = self.scales().detach().to(layer.scale.dtype).contiguous()


def check_tunable(layer: QuantLinear) -> None:
    s = layer.scheme
    if s.double_quant or s.activations is not None or layer.n_outliers:
        raise SchemeError(
            f"scale tuning trains plain stored scales; a {s.short_name} layer"
            f"{' with outlier columns' if layer.n_outliers else ''} has double-quantized scales, quantized "
            "activations or outliers: quantize it without E2ETuning"
        )


@dataclass
class TuningResult:
    steps: int
    layers: int
    norm_parameters: int
    train_windows: int
    heldout_windows: int
    heldout_kl_before: float
    heldout_kl_after: float
    kept: bool
    first_loss: float
    last_loss: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def note(self) -> str:
        verdict = "kept" if self.kept else "not kept (no lower than before; the rounding's scales stay)"
        return (
            f"e2e scale tuning: {self.steps} steps on {self.train_windows} windows, {self.layers} layers"
            f"{f', {self.norm_parameters} norm parameters' if self.norm_parameters else ''}; KL on "
            f"{self.heldout_windows} held-out windows {self.heldout_kl_before:.4f} -> "
            f"{self.heldout_kl_after:.4f}: {verdict} ({self.seconds:.0f} s)"
        )


def distillation_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(reference || candidate) in nats, from ``[..., vocab]`` logits."""
    ref = F.log_softmax(reference_logits.float(), dim=-1)
    cand = F.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - cand)).sum(-1).mean()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def heldout_kl(model: nn.Module, reference: nn.Module, windows: torch.Tensor) -> float:
    """Mean KL(reference || model) per token over ``windows``, one window at a time, every
    quantized layer through the reference (dequantize) kernel."""
    total = 0.0
    with torch.inference_mode(), use_kernel("dequantized"):
        for i in range(windows.shape[0]):
            ids = windows[i : i + 1]
            total += float(distillation_kl(_logits(reference, ids), _logits(model, ids)))
    return total / windows.shape[0]


def _norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """1-D floating parameters outside quantized layers and embeddings: norm weights, biases."""
    out = []
    for module in model.modules():
        if isinstance(module, (QuantLinear, TunableScales, nn.Embedding)):
            continue
        out += [p for p in module.parameters(recurse=False) if p.dim() == 1 and p.is_floating_point()]
    return out


def _quant_layers(model: nn.Module) -> list[tuple[nn.Module, str, QuantLinear]]:
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, QuantLinear)
    ]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def tune_scales(
    model: nn.Module,
    reference: nn.Module,
    token_ids: torch.Tensor,
    spec: E2ETuning = E2ETuning(),
    *,
    progress: bool = True,
) -> TuningResult:
    """Tune the scales of every ``QuantLinear`` in ``model`` (in place) towards ``reference``'s
    outputs on ``token_ids`` (``[n, seqlen]``; the last ``spec.holdout`` windows are held out)."""
    from tqdm.auto import tqdm

    ids = torch.as_tensor(token_ids)
    if ids.dim() != 2 or ids.dtype != torch.long or ids.shape[1] < 2:
        raise CalibrationError(f"scale tuning needs int64 token ids of shape [n, seqlen >= 2], got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[0] <= spec.holdout:
        raise CalibrationError(
            f"scale tuning holds out {spec.holdout} of the {ids.shape[0]} calibration windows and needs at "
            "least one more to train on: pass more windows or lower E2ETuning.holdout"
        )
    layers = _quant_layers(model)
    if not layers:
        raise SchemeError("the model has no QuantLinear layers: quantize it before tuning its scales")
    for _, _, layer in layers:
        check_tunable(layer)
    device = _device(model)
    ids = ids.to(device)
    train, held = ids[: -spec.holdout], ids[-spec.holdout :]
    t0 = time.perf_counter()
    reference.eval()
    was_training = model.training
    model.eval()  # no dropout; autograd works in eval mode
    before = heldout_kl(model, reference, held)

    norms = _norm_parameters(model) if spec.norms else []
    saved_scales = [layer.scale for _, _, layer in layers]
    saved_norms = [p.detach().clone() for p in norms]
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    wrappers = [TunableScales(layer) for _, _, layer in layers]
    losses: list[float] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for (parent, name, _), w in zip(layers, wrappers):
            setattr(parent, name, w)
        for p in norms:
            p.requires_grad_(True)
        trained = [w.log_ratio for w in wrappers] + norms
        opt = torch.optim.Adam(trained, lr=spec.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / spec.steps)))
        gen = torch.Generator().manual_seed(spec.seed)
        order: list[int] = []
        bar = tqdm(range(spec.steps), desc="tuning scales", unit="step", disable=not progress)
        for _ in bar:
            if len(order) < spec.batch_size:
                order += torch.randperm(train.shape[0], generator=gen).tolist()
            batch = train[order[: spec.batch_size]]
            del order[: spec.batch_size]
            with torch.no_grad():
                target = _logits(reference, batch)
            loss = distillation_kl(target, _logits(model, batch))
            if not torch.isfinite(loss):
                raise CalibrationError(f"scale tuning diverged (loss {float(loss.detach())}); lower E2ETuning.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
    finally:
        for (parent, name, layer), w in zip(layers, wrappers):
            setattr(parent, name, layer)
        for p, flag in grad_flags.items():
            p.grad = None
            p.requires_grad_(flag)
    for (_, _, layer), w in zip(layers, wrappers):
        w.write_back(layer)
    after = heldout_kl(model, reference, held)
    kept = after < before
    if not kept:
        for (_, _, layer), s in zip(layers, saved_scales):
            layer.scale = s
        with torch.no_grad():
            for p, v in zip(norms, saved_norms):
                p.copy_(v)
    model.train(was_training)
    return TuningResult(
        steps=spec.steps, layers=len(layers), norm_parameters=sum(p.numel() for p in norms),
        train_windows=int(train.shape[0]), heldout_windows=int(held.shape[0]),
        heldout_kl_before=before, heldout_kl_after=after, kept=kept,
        first_loss=losses[0], last_loss=losses[-1], seconds=time.perf_counter() - t0,
    )
