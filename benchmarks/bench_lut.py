"""cpu_lut against fp32 ``F.linear``, the reference twin and the memory bandwidth, in one run.

    .venv/bin/python benchmarks/bench_lut.py [--shapes 4096x4096,11008x4096] [--batches 1,8,32]

Shapes are ``NxK`` (out x in features; ``11008x4096`` is ``nn.Linear(4096, 11008)``).
Formats (random codes; speed does not depend on their values):

* ``w2-g128``  2-bit integer codes, affine (scale + integer zero point per group of 128);
* ``w3-g128``  3-bit integer codes, affine (scale + integer zero point per group of 128);
* ``nf4-g64``  4-bit codebook (NF4's 16 values, rounded to the kernel's 8-bit
  grid), one absmax scale per block of 64;
* ``ternary``  2-bit codes of {-1, 0, +1}, one scale per tensor.

Method: the machine's read bandwidth is measured in the same run, the same
way the kernels are timed: the best call reading an 8 MiB slice of a buffer 8x
the last-level cache, cycling through the slices, with ``torch.sum`` and with a
plain AVX-512 streaming read through the kernel's thread pool
(``cpu_lut.read_probe``); BW is the larger of the two. Every timed call
streams its weights from DRAM, not the cache: each kernel cycles through
copies of its weight that together exceed 4x the last-level cache (F.linear
likewise). Times are over ``--iters`` calls after warm-up, reported as best /
median: on a shared machine the best call is the one that had the cores, so
``GB/s``, ``% of BW`` and ``speedup`` use the best times (of both sides), and
the medians show the spread. F.linear is timed at the run's threads and at 1
thread, and the better is used (its threads are named in the table).
``GB/s`` is the kernel's weight bytes (codes + scales + offsets or zero
points) per second; ``bytes ratio / 2`` is (fp32 weight bytes / our bytes) / 2,
the target for the speedup over F.linear. The reference twin (dequantize +
fake-quantized activations + F.linear) is timed on one copy, median of
``--twin-iters`` calls.

Prints a markdown table, and the load average: on a shared machine say so
with the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit import codebooks
from lowbit.kernels import cpu_lut

# NF4 code values: the bitsandbytes table (lowbit.codebooks)
NF4 = codebooks.table("nf4").tolist()


def llc_bytes() -> int:
    best = 0
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        s = p.read_text().strip()
        mult = {"K": 1024, "M": 1024**2}.get(s[-1], 1)
        best = max(best, int(s.rstrip("KM")) * mult)
    return best or 32 * 1024**2


def timings(fn, iters: int, warmup: int = 3) -> tuple[float, float]:
    """(best, median) seconds of ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def bandwidth_gbs(llc: int, iters: int) -> tuple[float, float]:
    """Best read bandwidth (GB/s) of (torch.sum, cpu_lut.read_probe) over 8 MiB slices of a
    buffer 8x the last-level cache, cycled as the kernels cycle their weights (same call
    size and cache state as a kernel call)."""
    slice_elems = 8 * 2**20 // 4
    n = max(8, -(-8 * llc // (slice_elems * 4)))
    buf = torch.ones(n, slice_elems)
    it = iter(range(1 << 62))
    t_sum, _ = timings(lambda: buf[next(it) % n].sum(), iters)
    it = iter(range(1 << 62))
    t_probe, _ = timings(lambda: cpu_lut.read_probe(buf[next(it) % n]), iters)
    return slice_elems * 4 / t_sum / 1e9, slice_elems * 4 / t_probe / 1e9


def machine_header(iters: int) -> tuple[int, int, tuple, float]:
    """Measure and print threads, last-level cache, load average and read bandwidth (the
    header of every kernel benchmark); returns ``(threads, llc bytes, load average, BW GB/s)``."""
    threads = torch.get_num_threads()
    llc = llc_bytes()
    load0 = os.getloadavg()
    bw_sum, bw_probe = bandwidth_gbs(llc, 4 * iters)
    bw = max(bw_sum, bw_probe)
    print(f"threads {threads}, last-level cache {llc / 2**20:.0f} MiB, load average {load0[0]:.2f}")
    print(f"read bandwidth, best 8 MiB slice from DRAM: torch.sum {bw_sum:.1f} GB/s, "
          f"streaming read through the kernel's thread pool {bw_probe:.1f} GB/s; BW = {bw:.1f} GB/s\n")
    return threads, llc, load0, bw


def fp32_linear_timings(x: torch.Tensor, ws: list[torch.Tensor], iters: int, threads: int):
    """(best, median, threads) of F.linear at ``threads`` and at 1 thread, whichever has the
    better best: on a loaded machine torch's multi-threaded ops can lose whole scheduler
    slices, and a slow baseline would flatter the speedup."""
    out = []
    for t in sorted({threads, 1}):
        torch.set_num_threads(t)
        it = iter(range(1 << 62))
        out.append((*timings(lambda: F.linear(x, ws[next(it) % len(ws)]), iters), t))
    torch.set_num_threads(threads)
    return min(out)


def make_format(name: str, N: int, K: int, gen: torch.Generator):
    if name == "w2-g128":
        bits, lut, G, off = 2, torch.arange(4.0), 128, True
    elif name == "w3-g128":
        bits, lut, G, off = 3, torch.arange(8.0), 128, True
    elif name == "nf4-g64":
        bits, lut, G, off = 4, torch.tensor(NF4), 64, False
    elif name == "ternary":
        bits, lut, G, off = 2, torch.tensor([-1.0, 0.0, 1.0, 0.0]), None, False
    else:
        raise SystemExit(f"unknown format {name!r}")
    ng = 1 if G is None else K // G
    codes = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.uint8)
    if name == "ternary":
        codes = torch.randint(0, 3, (N, K), generator=gen, dtype=torch.uint8)
    rows = 1 if G is None else N
    scale = torch.rand(rows, ng, generator=gen) * 0.01 + 1e-3
    # affine integer formats: offset = -z * s with integer zero points, as lowbit stores them
    zero = torch.randint(0, 1 << bits, (rows, ng), generator=gen).to(torch.float32)
    offset = -(zero * scale) if off else None
    return codes, lut, scale, offset, G


def copies(p: cpu_lut.LutPrepared, n: int) -> list[cpu_lut.LutPrepared]:
    out = [p]
    for _ in range(n - 1):
        out.append(dataclasses.replace(
            p, weights=p.weights.clone(), scales=p.scales.clone(),
            offsets=None if p.offsets is None else p.offsets.clone(),
        ))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--formats", default="w2-g128,w3-g128,nf4-g64,ternary")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--twin-iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ok, why = cpu_lut.available()
    if not ok:
        raise SystemExit(f"cpu_lut unavailable: {why}")
    threads, llc, load0, bw = machine_header(args.iters)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.lower().split("x"))
        fp32_bytes = N * K * 4
        ws = [torch.randn(N, K, generator=gen) for _ in range(max(1, -(-4 * llc // fp32_bytes)))]
        preps = {}
        for fmt in args.formats.split(","):
            codes, lut, scale, offset, G = make_format(fmt, N, K, gen)
            p = cpu_lut.prepare(codes, lut, scale, offset, G)
            preps[fmt] = (copies(p, max(1, -(-4 * llc // p.nbytes))), (codes, lut, scale, offset, G))
        for B in (int(b) for b in args.batches.split(",")):
            x = torch.randn(B, K, generator=gen)
            f_best, f_med, f_threads = fp32_linear_timings(x, ws, args.iters, threads)
            for fmt, (ps, (codes, lut, scale, offset, G)) in preps.items():
                it = iter(range(1 << 62))
                best, med = timings(lambda: cpu_lut.lut_linear(x, ps[next(it) % len(ps)]), args.iters)
                _, twin = timings(
                    lambda: cpu_lut.reference_twin(x, codes, lut, scale, offset, G), args.twin_iters, warmup=1
                )
                nb = ps[0].nbytes
                rows.append((f"{N}x{K}", B, fmt, nb * 8 / (N * K), best, med, nb / best / 1e9, f_best, f_med,
                             f_threads, fp32_bytes / nb / 2, twin))
    load1 = os.getloadavg()
    print("| weight NxK | batch | format | bits/w | cpu_lut best / median us | GB/s | % of BW "
          "| F.linear fp32 best / median us (threads) | speedup | bytes ratio / 2 | twin ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, B, fmt, bpw, best, med, gbs, f_best, f_med, f_threads, half_ratio, twin in rows:
        print(f"| {shape} | {B} | {fmt} | {bpw:.2f} | {best * 1e6:.0f} / {med * 1e6:.0f} | {gbs:.1f} | "
              f"{100 * gbs / bw:.0f}% | {f_best * 1e6:.0f} / {f_med * 1e6:.0f} ({f_threads}) | "
              f"{f_best / best:.1f}x | {half_ratio:.1f}x | {twin * 1e3:.0f} |")
    print(f"\nload average before/after: {load0[0]:.2f} / {load1[0]:.2f} "
          f"(> {threads} means other processes shared the cores)")


if __name__ == "__main__":
    main()
