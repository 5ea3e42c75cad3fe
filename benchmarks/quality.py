"""RTN quality on SmolLM2-135M-Instruct, WikiText-2 test (lowbit's perplexity protocol).

For every configuration: perplexity, KL divergence and top-1 agreement
against the fp32 model on the same tokens, bits per weight (scales and zero
points included), and the size of the saved checkpoint. The fp32 model runs
once per window; every quantized model is compared with those logits
(``lowbit.eval.compare.compare_many``). Quantized models use the ``dequantized``
kernel (the reference arithmetic, dequantize + F.linear in fp32, with the
dequantized weight cached), so only the weights differ from fp32.

The baseline is the GGUF's Q4_1 weights dequantized to fp32 (its linears lie
on a 4-bit, 32-wide grid with a float offset per block; lowbit's integer zero
point cannot hold that offset exactly, so even W4 g32 asym is not lossless).

    .venv/bin/python benchmarks/quality.py --windows 40 --window-len 2048 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time

import torch

import lowbit
from lowbit import Recipe
from lowbit.eval.compare import compare_many
from lowbit.eval.data import load_wikitext2_test_text, tokenize_once
from lowbit.eval.memory import file_size_bytes, peak_rss_bytes
from lowbit.eval.perplexity import make_windows
from lowbit.kernels.registry import use_kernel
from lowbit.scheme import Granularity, QuantScheme

CONFIGS = {
    "W8 channel sym": QuantScheme(bits=8, granularity=Granularity.CHANNEL),
    "W4 g32 sym": QuantScheme(bits=4, group_size=32),
    "W4 g32 asym": QuantScheme(bits=4, group_size=32, symmetric=False),
    "W4 g128 sym": QuantScheme(bits=4, group_size=128),
    "W4 g128 asym": QuantScheme(bits=4, group_size=128, symmetric=False),
    "W3 g128 asym": QuantScheme(bits=3, group_size=128, symmetric=False),
    "W2 g64 asym": QuantScheme(bits=2, group_size=64, symmetric=False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--window-len", type=int, default=2048)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), help="subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    t0 = time.time()
    model, tok = lowbit.load_pretrained("default")
    windows = make_windows(tokenize_once(tok, load_wikitext2_test_text()), args.window_len, args.windows)
    candidates, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            q = copy.deepcopy(model)
            # group 128 does not divide the 576-wide layers: they take group 64 (recorded in notes)
            recipe = Recipe.uniform(CONFIGS[name], indivisible_groups="shrink")
            t = time.time()
            report = lowbit.quantize(q, recipe, progress=False)
            qtime = time.time() - t
            path = os.path.join(tmp, "ckpt.safetensors")
            lowbit.save(q, path)
            n_w = sum(r.in_features * r.out_features for r in report.layers)
            rows[name] = {
                "bits_per_weight": 8 * report.quantized_bytes / n_w,
                "checkpoint_mb": file_size_bytes(path) / 1e6,
                "quantize_s": qtime,
                "groups": sorted({r.scheme.get("group_size") or 0 for r in report.layers}),
            }
            candidates[name] = q
        with use_kernel("dequantized"):
            results = compare_many(model, candidates, windows, progress=True)
    fp32_ppl = next(iter(results.values())).reference_ppl
    n_lin = sum(p.numel() for n, p in model.named_parameters() if "layers." in n and p.dim() == 2)
    print(f"\nSmolLM2-135M-Instruct (fp32 from GGUF Q4_1), WikiText-2 test, {args.windows} windows x "
          f"{args.window_len} tokens ({results[args.configs[0]].n_tokens} predicted tokens), RTN, dequantized (reference) kernel")
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"total {time.time() - t0:.0f} s; peak RSS {peak_rss_bytes() / 2**30:.2f} GiB\n")
    print("| scheme | groups used | bits/weight | checkpoint MB | ppl | Δppl | KL (nats) | top-1 agree |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| fp32 | - | 32 | {4 * sum(p.numel() for p in model.parameters()) / 1e6:.1f} (params) | {fp32_ppl:.3f} | - | - | - |")
    for name in args.configs:
        r, row = results[name], rows[name]
        g = ",".join(str(x) for x in row["groups"] if x) or "-"
        print(f"| {name} | {g} | {row['bits_per_weight']:.3f} | {row['checkpoint_mb']:.1f} | {r.candidate_ppl:.3f} | "
              f"{r.candidate_ppl - fp32_ppl:+.3f} | {r.mean_kl:.4f} | {r.top1_agreement:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "fp32_ppl": fp32_ppl, "linear_params": n_lin,
                       "results": {k: {**results[k].to_dict(), **rows[k]} for k in args.configs}}, f, indent=1)


if __name__ == "__main__":
    main()
