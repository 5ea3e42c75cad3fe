"""End to end: lowbit.quantize -> lowbit.save -> lowbit.load -> generate, and quality.

* Greedy generation (with a left-padded batch and its attention mask) from the
  loaded checkpoint gives exactly the tokens of the in-memory quantized model.
* The quantized model's logits stay close to the fp32 model's, with bounds
  measured on this tiny random Llama (seed 0) and set with a margin of about
  3x; they hold for the fast kernels ("auto", bf16 activations) and for the
  reference kernel, so a kernel with wrong numerics fails here. More bits
  must mean less error (W8 << W4 < W2).

Measured (reference kernel; "auto" within a few percent when the kernels are
correct), relative Frobenius error / max |delta logit| / KL(fp || q) / top-1:
W8 channel 0.010 / 0.011 / 3e-6 / 1.00; W4 g32 sym 0.158 / 0.14 / 7e-4 / 1.00;
W4 g32 asym 0.122 / 0.115 / 4e-4 / 1.00; W2 g32 asym 0.64 / 0.64 / 1e-2 / 0.94.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama
from transformers import LlamaForCausalLM

import lowbit
from lowbit.scheme import QuantScheme

W8C = QuantScheme(bits=8, granularity="channel")
W4G32 = QuantScheme(bits=4, group_size=32)
W4G32A = QuantScheme(bits=4, group_size=32, symmetric=False)
W2G32A = QuantScheme(bits=2, group_size=32, symmetric=False)


@pytest.fixture(scope="module")
def fp_model() -> LlamaForCausalLM:
    return tiny_llama(0)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


_CACHE: dict = {}


def quantized_and_loaded(fp_model, scheme, tmp_path_factory):
    """(in-memory quantized model, the model loaded back from its file), cached per scheme."""
    if scheme not in _CACHE:
        model = copy.deepcopy(fp_model)
        lowbit.quantize(model, scheme, progress=False)
        path = tmp_path_factory.mktemp("e2e") / f"{scheme.short_name}.lowbit.safetensors"
        lowbit.save(model, path)
        _CACHE[scheme] = (model, lowbit.load(path))
    return _CACHE[scheme]


@pytest.mark.parametrize("scheme", [W4G32, W8C], ids=lambda s: s.short_name)
def test_generate_from_loaded_checkpoint_matches_in_memory_model(fp_model, scheme, tmp_path_factory):
    model, loaded = quantized_and_loaded(fp_model, scheme, tmp_path_factory)
    prompt = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)
    prompt[1, :3] = 0  # row 1 is left-padded
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(prompt, **kw)
        got = loaded.generate(prompt, **kw)
    assert want.shape == (2, 18)
    assert torch.equal(want[:, :10], prompt)
    assert torch.equal(got, want)
    # the same with the reference kernel (a different, slower path through the same weights)
    with torch.no_grad(), lowbit.use_kernel("reference"):
        assert torch.equal(loaded.generate(prompt, **kw), model.generate(prompt, **kw))


def _quality(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    logp_ref, logp = F.log_softmax(ref, -1), F.log_softmax(out, -1)
    return {
        "rel": float((out - ref).norm() / ref.norm()),
        "maxabs": float((out - ref).abs().max()),
        "kl": float((logp_ref.exp() * (logp_ref - logp)).sum(-1).mean()),
        "top1": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


# scheme -> upper bounds on rel / maxabs / kl, lower bound on top-1 agreement
BOUNDS = {
    W8C: dict(rel=0.03, maxabs=0.04, kl=2e-5, top1=0.95),
    W4G32: dict(rel=0.30, maxabs=0.40, kl=2.5e-3, top1=0.90),
    W4G32A: dict(rel=0.30, maxabs=0.40, kl=2.5e-3, top1=0.90),
}


@pytest.mark.parametrize("kernel", ["auto", "reference"])
@pytest.mark.parametrize("scheme", list(BOUNDS), ids=lambda s: s.short_name)
def test_loaded_model_stays_close_to_fp32(fp_model, ids, scheme, kernel, tmp_path_factory):
    _, loaded = quantized_and_loaded(fp_model, scheme, tmp_path_factory)
    with torch.no_grad():
        ref = fp_model(ids).logits
        with lowbit.use_kernel(kernel):
            out = loaded(ids).logits
    q = _quality(ref, out)
    b = BOUNDS[scheme]
    msg = f"{scheme.short_name} kernel={kernel}: {q}"
    assert q["rel"] > 1e-4, msg  # quantization did change the weights
    assert q["rel"] < b["rel"], msg
    assert q["maxabs"] < b["maxabs"], msg
    assert q["kl"] < b["kl"], msg
    assert q["top1"] >= b["top1"], msg


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_more_bits_means_less_error(fp_model, ids, kernel, tmp_path_factory):
    errs = {}
    with torch.no_grad():
        ref = fp_model(ids).logits
        for scheme in (W8C, W4G32, W2G32A):
            _, loaded = quantized_and_loaded(fp_model, scheme, tmp_path_factory)
            with lowbit.use_kernel(kernel):
                errs[scheme.short_name] = _quality(ref, loaded(ids).logits)["rel"]
    assert 5 * errs["w8c-sym"] < errs["w4g32-sym"] < errs["w2g32-asym"], errs


def test_fp32_model_is_untouched_by_quantizing_a_copy(fp_model, ids, tmp_path_factory):
    quantized_and_loaded(fp_model, W4G32, tmp_path_factory)
    assert not any(isinstance(m, lowbit.QuantLinear) for m in fp_model.modules())
    assert fp_model.lm_head.weight is fp_model.model.embed_tokens.weight
