"""cpu_fp8 against fp32 ``F.linear``, the reference kernel and the memory bandwidth, in one run.

    .venv/bin/python benchmarks/bench_fp8.py [--shapes 4096x4096,11008x4096] [--batches 1,8,32]

Formats: ``fp8_e4m3`` and ``fp8_e5m2`` weights with one fp32 scale per output row (random
finite codes; speed does not depend on their values). Method as in ``bench_lut.py`` (and
with its helpers): read bandwidth measured in the same run; every timed call streams its
weights from DRAM (copies that together exceed 4x the last-level cache); best / median of
``--iters`` calls; ``GB/s`` is weight bytes (codes + scales) per second of the best call;
``bytes ratio / 2`` is (fp32 bytes / fp8 bytes) / 2, the issue's target for the speedup.
The reference kernel (``F.linear`` on the weight converted to fp32 by torch on every call)
is timed on one copy, median of ``--twin-iters`` calls.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from bench_lut import fp32_linear_timings, machine_header, timings
from lowbit.kernels import cpu_fp8

DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def random_codes(fmt: str, N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    w = (torch.randn(N, K, generator=gen) * 8).to(DTYPES[fmt])
    return w.view(torch.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--formats", default="fp8_e4m3,fp8_e5m2")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--twin-iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ok, why = cpu_fp8.available()
    if not ok:
        raise SystemExit(f"cpu_fp8 unavailable: {why}")
    threads, llc, load0, bw = machine_header(args.iters)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.lower().split("x"))
        fp32_bytes = N * K * 4
        ws = [torch.randn(N, K, generator=gen) for _ in range(max(1, -(-4 * llc // fp32_bytes)))]
        preps = {}
        for fmt in args.formats.split(","):
            scale = torch.rand(N, 1, generator=gen) * 0.01 + 1e-3
            codes = random_codes(fmt, N, K, gen)
            n_copies = max(1, -(-4 * llc // (N * K)))
            preps[fmt] = ([cpu_fp8.prepare(codes.clone(), scale, fmt) for _ in range(n_copies)], codes, scale)
        for B in (int(b) for b in args.batches.split(",")):
            x = torch.randn(B, K, generator=gen)
            f_best, f_med, f_threads = fp32_linear_timings(x, ws, args.iters, threads)
            for fmt, (ps, codes, scale) in preps.items():
                it = iter(range(1 << 62))
                best, med = timings(lambda: cpu_fp8.fp8_linear(x, ps[next(it) % len(ps)]), args.iters)
                _, ref = timings(
                    lambda: F.linear(x, codes.view(DTYPES[fmt]).to(torch.float32) * scale), args.twin_iters, warmup=1
                )
                nb = N * K + N * 4
                rows.append((shape, B, fmt, best, med, nb / best / 1e9, f_best, f_med, f_threads, fp32_bytes / nb / 2, ref))
    load1 = os.getloadavg()
    print("| weight NxK | batch | format | cpu_fp8 best / median us | GB/s | % of BW "
          "| F.linear fp32 best / median us (threads) | speedup | bytes ratio / 2 | reference ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape, B, fmt, best, med, gbs, f_best, f_med, f_threads, half_ratio, ref in rows:
        print(f"| {shape} | {B} | {fmt} | {best * 1e6:.0f} / {med * 1e6:.0f} | {gbs:.1f} | {100 * gbs / bw:.0f}% | "
              f"{f_best * 1e6:.0f} / {f_med * 1e6:.0f} ({f_threads}) | {f_best / best:.1f}x | {half_ratio:.1f}x | "
              f"{ref * 1e3:.1f} |")
    print(f"\nload average before/after: {load0[0]:.2f} / {load1[0]:.2f} "
          f"(> {threads} means other processes shared the cores)")


if __name__ == "__main__":
    main()
