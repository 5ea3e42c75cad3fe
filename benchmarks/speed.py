"""Prefill and decode throughput of SmolLM2-135M-Instruct: fp32, bf16, W8 and W4 with the
fast CPU kernels, measured side by side in one run (models interleaved per measurement,
so machine drift hits all of them alike), plus where decode time goes.

    .venv/bin/python benchmarks/speed.py            # prints markdown tables

Decode: greedy one-token steps with the KV cache (lowbit.eval.speed.measure_decode),
prompt 64 tokens, 32 new tokens; prefill: one forward of [batch, 128] tokens.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from torch.profiler import ProfilerActivity, profile

import lowbit
from lowbit import Recipe
from lowbit.eval.memory import model_bytes
from lowbit.eval.speed import measure_decode, measure_prefill, random_token_ids
from lowbit.nn import QuantLinear
from lowbit.scheme import Granularity, QuantScheme

MATMUL_OPS = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
    "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm",
}


def build_models(base):
    models = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    w8 = copy.deepcopy(base)
    lowbit.quantize(w8, Recipe.uniform(QuantScheme(bits=8, granularity=Granularity.CHANNEL)), progress=False)
    models["W8 channel (cpu_int8)"] = w8
    w4 = copy.deepcopy(base)
    lowbit.quantize(w4, Recipe.uniform(QuantScheme(bits=4, group_size=128, symmetric=False),
                                       indivisible_groups="shrink"), progress=False)
    models["W4 g128 asym (cpu_int4)"] = w4
    w4h = copy.deepcopy(base)
    rules = Recipe.uniform(QuantScheme(bits=4, group_size=128, symmetric=False), skip=())
    lowbit.quantize(w4h, Recipe(rules=(lowbit.Rule(r"lm_head", QuantScheme(bits=8, granularity=Granularity.CHANNEL)),)
                                + rules.rules, indivisible_groups="shrink"), progress=False)
    models["W4 g128 asym + lm_head W8"] = w4h
    for m in models.values():
        m.eval()
    return models


def kernels_used(model) -> str:
    names = sorted({m.kernel_name for m in model.modules() if isinstance(m, QuantLinear)})
    return ",".join(names) or "torch"


def decode_breakdown(model, steps: int = 8) -> tuple[float, float]:
    """(ms per decode step, fraction of it inside matmul ops) from torch.profiler."""
    ids = random_token_ids(model, 1, 64, 0)
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            wall = time.perf_counter() - t0
    mm_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS)
    all_ops_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    return 1000 * wall / steps, mm_us / 1e6 / wall, all_ops_us / 1e6 / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    base, _ = lowbit.load_pretrained("default")
    models = build_models(base)
    rows = {name: {"MB": model_bytes(m) / 1e6, "kernels": kernels_used(m)} for name, m in models.items()}
    for batch in (1, 8):
        for name, m in models.items():
            rows[name][f"prefill_b{batch}"] = measure_prefill(m, batch=batch, seqlen=128, repeats=args.repeats).tokens_per_s
        for name, m in models.items():
            rows[name][f"decode_b{batch}"] = measure_decode(m, batch=batch, prompt_len=64, new_tokens=32,
                                                            repeats=args.repeats).tokens_per_s
    print(f"\nSmolLM2-135M-Instruct, {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; prefill [b, 128]; decode prompt 64 + 32 new tokens; "
          f"median of {args.repeats}\n")
    print("| model | kernels | weights MB (resident) | prefill tok/s b1 | prefill tok/s b8 | decode tok/s b1 | decode tok/s b8 | decode b1 vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    f = rows["fp32"]["decode_b1"]
    for name, r in rows.items():
        print(f"| {name} | {r['kernels']} | {r['MB']:.0f} | {r['prefill_b1']:.0f} | {r['prefill_b8']:.0f} | "
              f"{r['decode_b1']:.1f} | {r['decode_b8']:.1f} | {r['decode_b1'] / f:.2f}x |")
    print("\nWhere decode time goes (batch 1, 8 steps under torch.profiler; the profiler adds overhead):\n")
    print("| model | ms/step | in matmul ops | in all aten ops (self time) | outside ops (Python, dispatch) |")
    print("|---|---|---|---|---|")
    for name, m in models.items():
        ms, mm, ops = decode_breakdown(m)
        print(f"| {name} | {ms:.1f} | {100 * mm:.0f}% | {100 * ops:.0f}% | {100 * (1 - ops):.0f}% |")


if __name__ == "__main__":
    main()
