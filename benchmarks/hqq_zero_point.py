"""Why HQQ at 3 bits loses to RTN on SmolLM2: float zero points against integer ones.

Every linear in the blocks is replaced by its dequantized weight (fake quantization, W3,
group 128 where it divides the layer and 64 on the 576-wide ones, as in calibration.py), and
perplexity is measured on the first ``--windows`` WikiText-2 test windows of 2048 tokens:

1. ``variants``: RTN with integer zero points, RTN with float zero points, RTN with float zero
   points over a range widened to hold 0, lowbit's HQQ (float and integer zero points) and,
   when the ``hqq`` package imports (``pip install --no-deps --target DIR hqq termcolor`` and
   ``--hqq-path DIR``), the reference ``hqq.core.quantize.Quantizer`` at axis 1 (groups along
   the input, lowbit's layout) and axis 0 (groups along the output);
2. ``swap``: integer-zero RTN everywhere except one kind of layer, which gets float zero points;
3. ``channels``: for v_proj of a few layers, with real inputs (one 512-token window through the
   fp32 model), the output error of each grid and the part of it that comes from the three
   input channels with the largest activations.

    .venv/bin/python benchmarks/hqq_zero_point.py [--windows 4] [--hqq-path /tmp/hqqpkg]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import lowbit
from lowbit import formats
from lowbit.eval.data import load_wikitext2_test_text, tokenize_once
from lowbit.eval.perplexity import make_windows, perplexity
from lowbit.methods.hqq import hqq
from lowbit.scheme import QuantScheme

BITS = 3


def group_size(w: torch.Tensor) -> int:
    return 64 if w.shape[1] % 128 else 128


def _scheme(w: torch.Tensor, zero_point: str) -> QuantScheme:
    return QuantScheme(bits=BITS, group_size=group_size(w), symmetric=False, zero_point=zero_point)


def rtn(w: torch.Tensor, zero_point: str) -> torch.Tensor:
    return formats.fake_quantize(w, _scheme(w, zero_point))


def rtn_float_holding_range_of_zero(w: torch.Tensor) -> torch.Tensor:
    """Float zero points over [min(lo, 0), max(hi, 0)]: the range holds 0, the grid need not."""
    qmax = 2**BITS - 1
    g = w.reshape(w.shape[0], -1, group_size(w))
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / qmax
    z = -lo / s
    return ((torch.round(g / s + z).clamp(0, qmax) - z) * s).reshape(w.shape)


def lowbit_hqq(w: torch.Tensor, zero_point: str) -> torch.Tensor:
    return hqq(w, _scheme(w, zero_point)).dequantize().float()


def reference_hqq(axis: int):
    from hqq.core.quantize import Quantizer

    def run(w: torch.Tensor) -> torch.Tensor:
        q, meta = Quantizer.quantize(w, nbits=BITS, group_size=group_size(w), axis=axis, optimize=True,
                                     round_zero=False, bitpack=False, device="cpu")
        return ((q.float() - meta["zero"].float()) * meta["scale"].float()).reshape(w.shape)

    return run


def _set(modules, weights) -> None:
    with torch.no_grad():
        for n, w in weights.items():
            modules[n].weight.copy_(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--hqq-path", help="directory holding the hqq package (reference rows)")
    args = ap.parse_args()
    torch.manual_seed(0)

    model, tok = lowbit.load_pretrained("default")
    ids = tokenize_once(tok, load_wikitext2_test_text())
    windows = make_windows(ids, 2048, args.windows)
    modules = dict(model.named_modules())
    orig = {n: m.weight.detach().clone() for n, m in modules.items()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}

    variants = {
        "rtn, integer zero": lambda w: rtn(w, "int"),
        "rtn, float zero": lambda w: rtn(w, "float"),
        "rtn, float zero, range holding 0": rtn_float_holding_range_of_zero,
        "lowbit hqq, float zero": lambda w: lowbit_hqq(w, "float"),
        "lowbit hqq, integer zero": lambda w: lowbit_hqq(w, "int"),
    }
    if args.hqq_path:
        sys.path.insert(0, args.hqq_path)
        import hqq as hqq_package

        version = getattr(hqq_package, "__version__", "?")
        variants[f"hqq {version} reference, axis 1 (lowbit's groups)"] = reference_hqq(1)
        variants[f"hqq {version} reference, axis 0 (groups along the output)"] = reference_hqq(0)

    print(f"# W{BITS} fake quantization, {args.windows} x 2048 WikiText-2 test windows")
    print(f"fp32: ppl {perplexity(model, windows, progress=False).ppl:.3f}", flush=True)
    dequantized = {}
    for name, fn in variants.items():
        t = time.perf_counter()
        dequantized[name] = {n: fn(w) for n, w in orig.items()}
        seconds = time.perf_counter() - t
        rel = sum(float((d - orig[n]).abs().mean() / orig[n].abs().mean()) for n, d in dequantized[name].items())
        _set(modules, dequantized[name])
        ppl = perplexity(model, windows, progress=False).ppl
        print(f"{name}: ppl {ppl:.3f}, mean relative L1 weight error {rel / len(orig):.4f}, {seconds:.1f} s", flush=True)

    print("\n# integer-zero RTN everywhere, float-zero RTN on one kind of layer")
    q_int, q_float = dequantized["rtn, integer zero"], dequantized["rtn, float zero"]
    for kinds in ([], ["q_proj", "k_proj"], ["v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]):
        _set(modules, {n: (q_float if any(k in n for k in kinds) else q_int)[n] for n in orig})
        print(f"float zero on {','.join(kinds) or 'none'}: ppl {perplexity(model, windows, progress=False).ppl:.3f}",
              flush=True)
    _set(modules, orig)

    print("\n# v_proj output error with real inputs (one 512-token window), median over tokens")
    layers = [4, 12, 20]
    inputs = {}
    hooks = [model.model.layers[i].self_attn.v_proj.register_forward_hook(
        lambda m, a, o, i=i: inputs.__setitem__(i, a[0].detach()[0])) for i in layers]
    with torch.no_grad():
        model(make_windows(ids, 512, 1))
    for h in hooks:
        h.remove()
    for i in layers:
        x, name = inputs[i], f"model.layers.{i}.self_attn.v_proj"
        w = orig[name]
        top = x.abs().amax(0).topk(3).indices
        x_top = torch.zeros_like(x)
        x_top[:, top] = x[:, top]
        print(f"layer {i}: largest input channels {top.tolist()} (max |x| {[round(float(v), 1) for v in x.abs().amax(0)[top]]}); "
              f"mean |w| in their columns {float(w[:, top].abs().mean()):.4f}, all {float(w.abs().mean()):.4f}")
        for label, q in (("integer zero", q_int[name]), ("float zero", q_float[name])):
            err = q - w
            print(f"    {label}: |output error| {float((x @ err.T).norm(dim=1).median()):.3f}, from those 3 channels "
                  f"{float((x_top @ err.T).norm(dim=1).median()):.3f}; mean |weight error| in their columns "
                  f"{float(err[:, top].abs().mean()):.4f}")


if __name__ == "__main__":
    main()
