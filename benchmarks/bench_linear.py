"""Batch-1 linear layers on CPU: fast kernels vs dense vs reference, against memory bandwidth.

    .venv/bin/python benchmarks/bench_linear.py [--threads 2] [--min-time 1.0]

For each layer shape (4096x4096 and N=11008 x K=4096) it times, at batch 1
(median of many runs after warm-up): fp32 and bf16 ``F.linear``, the int8 and
int4 (group 128 and 32) fast kernels, and their reference twins (dequantize,
then ``F.linear``). In the same run it measures the machine's read bandwidth
(``sum`` over a 1 GiB tensor, and a copy for comparison). Each row prints the
time, the bytes of weight the kernel has to stream, the effective GB/s
(weight bytes / time), that as a fraction of the measured read bandwidth, and
the speed-up over fp32 ``F.linear``. Output is a markdown table.

Fast kernels and dense layers are timed "cold": each call uses the next of
several distinct weight copies (>= 3x the L3 size in all), as in decoding,
where every weight is streamed from memory once per token. Reference kernels
(dequantize + dense, compute-bound) use one copy. "weight bytes" counts what
the kernel reads for the weight: packed codes + scales (+ zeros); for the
reference rows, the unpacked uint8 codes + fp32 scales (+ zeros).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lowbit.kernels.cpu_int4 import int4_linear, prepack_int4
from lowbit.kernels.cpu_int8 import int8_linear, prepack_int8
from lowbit.kernels.reference import reference_linear


def bench(fn, min_time: float, min_runs: int = 20, warmup: int = 5) -> tuple[float, float]:
    """(median, min) seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 5 and time.perf_counter() - start > 10 * min_time:
            break
    return statistics.median(times), min(times)


def bandwidth(min_time: float) -> tuple[float, float]:
    """(read GB/s from a 1 GiB sum, copy GB/s counting read + write) ."""
    n = (1 << 30) // 4
    a = torch.rand(n)
    b = torch.empty_like(a)
    t_sum = bench(lambda: a.sum(), min_time, min_runs=10, warmup=2)[0]
    t_copy = bench(lambda: b.copy_(a), min_time, min_runs=10, warmup=2)[0]
    read = a.numel() * 4 / t_sum / 1e9
    copy = 2 * a.numel() * 4 / t_copy / 1e9
    del a, b
    return read, copy


# Repeated calls on one weight would measure the L3 cache (32 MiB here), not memory:
# each row cycles through enough distinct copies of its weight to span >= 3x L3,
# as in LLM decoding where every layer's weight is read once per token.
COLD_BYTES = 96 * 2**20


def cycling(make, nbytes: int):
    """A no-argument callable that runs ``make(i)``-built closures round-robin."""
    n = max(2, -(-COLD_BYTES // nbytes))
    fns = [make(i) for i in range(n)]
    it = itertools.cycle(fns)
    return (lambda: next(it)()), n


def rows_for(N: int, K: int, min_time: float, extra: bool):
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(1, K, generator=g)
    xbf = x32.bfloat16()
    w32 = torch.randn(N, K, generator=g) * 0.02
    q4 = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    q8 = torch.randint(0, 256, (N, K), generator=g, dtype=torch.uint8)
    s8 = torch.rand(N, 1, generator=g) * 1e-3

    out = []  # (name, (median, min) seconds, weight bytes, copies)

    def add(name, make, nbytes, min_runs=20, cold=True):
        fn, n = cycling(make, nbytes) if cold else (make(0), 1)
        out.append((name, bench(fn, min_time, min_runs=min_runs, warmup=max(5, n)), nbytes, n))

    def dense(w, x):
        return lambda i: (lambda wi=w.clone(): lambda: F.linear(x, wi))()

    add("fp32 F.linear", dense(w32, x32), N * K * 4)
    add("bf16 F.linear", dense(w32.bfloat16(), xbf), N * K * 2)

    p8 = prepack_int8(q8, s8)

    def int8(x):
        return lambda i: (lambda pi=prepack_int8(q8, s8): lambda: int8_linear(x, pi))()

    add("int8 fast (bf16 act)", int8(xbf), p8.nbytes)
    if extra:
        add("int8 fast (fp32 act, cast to bf16 inside)", int8(x32), p8.nbytes)
        s32 = p8.scales.float()
        add("int8 raw op, fp32 act + fp32 scales", lambda i: (
            lambda wi=p8.weight.clone(): lambda: torch.ops.aten._weight_int8pack_mm(x32, wi, s32))(), p8.nbytes)

    for gs in (128, 32):
        s4 = torch.rand(N, K // gs, generator=g) * 1e-2
        z4 = torch.randint(0, 16, (N, K // gs), generator=g, dtype=torch.uint8)
        p4 = prepack_int4(q4, s4, z4, gs)
        add(f"int4 fast g{gs} (bf16 act)", lambda i: (
            lambda pi=prepack_int4(q4, s4, z4, gs): lambda: int4_linear(xbf, pi))(), p4.nbytes)
        if extra and gs == 128:
            sz32 = p4.scales_and_zeros.float()
            add(f"int4 raw op g{gs}, fp32 act + fp32 scales", lambda i: (
                lambda pk=p4.packed.clone(): lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x32, pk, p4.group_size, sz32))(), p4.nbytes, min_runs=5)
        if gs == 128:
            add(f"int4 reference g{gs} (dequant + F.linear)", lambda i: (
                lambda: reference_linear(x32, q4, s4, z4, 4, gs)), N * K + 2 * s4.numel() * 4,
                min_runs=5, cold=False)

    add("int8 reference (dequant + F.linear)", lambda i: (
        lambda: reference_linear(x32, q8, s8, None, 8, K)), N * K + N * 4, min_runs=5, cold=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per row (at least)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    load0 = os.getloadavg()[0]
    read_bw, copy_bw = bandwidth(args.min_time)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"measured bandwidth: read (1 GiB fp32 sum) {read_bw:.1f} GB/s; "
          f"copy (read+write) {copy_bw:.1f} GB/s; fractions below are of the read figure\n")

    print("| layer (N x K), M=1 | kernel | median (us) | min (us) | weight MB | eff. GB/s | of bandwidth | vs fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for N, K in ((4096, 4096), (11008, 4096)):
        rows = rows_for(N, K, args.min_time, extra=(N, K) == (4096, 4096))
        t_fp32 = rows[0][1][0]
        for name, (t, tmin), nbytes, _copies in rows:
            gbs = nbytes / t / 1e9
            print(f"| {N}x{K} | {name} | {t * 1e6:,.0f} | {tmin * 1e6:,.0f} | {nbytes / 1e6:.1f} | {gbs:.1f} | "
                  f"{gbs / read_bw:.0%} | {t_fp32 / t:.2f}x |")
    load1 = os.getloadavg()[0]
    print(f"\n1-minute load average {load0:.1f} before, {load1:.1f} after, on {os.cpu_count()} CPUs; GB/s, "
          "fractions and speed-ups use the median")
    if max(load0, load1) > 0.5 * (os.cpu_count() or 1) + 1:
        print("WARNING: other processes were using the CPUs; timings are inflated and noisy. Rerun on an idle machine.")


if __name__ == "__main__":
    main()
