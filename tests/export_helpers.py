"""What the export/import tests (GPTQ, AWQ, compressed-tensors) share: a quantized tiny Llama,
its logits, and the check that two models hold the very same quantized layers."""

from __future__ import annotations

import torch
from tiny_models import tiny_llama

import lowbit
from lowbit.nn import QuantLinear


def quantized(scheme, **kw):
    m = tiny_llama(**kw)
    lowbit.quantize(m, scheme, progress=False)
    return m


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def assert_same_layers(a, b):
    """Same QuantLinear names, schemes, stored codes, scales (dtype included) and zero points."""
    qa = {n: m for n, m in a.named_modules() if isinstance(m, QuantLinear)}
    qb = {n: m for n, m in b.named_modules() if isinstance(m, QuantLinear)}
    assert qa.keys() == qb.keys()
    for n, la in qa.items():
        lb = qb[n]
        assert lb.scheme == la.scheme, n
        assert torch.equal(lb.qweight, la.qweight), n
        assert lb.scale.dtype == la.scale.dtype and torch.equal(lb.scale, la.scale), n
        assert (la.zero is None) == (lb.zero is None) and (la.zero is None or torch.equal(la.zero, lb.zero)), n
