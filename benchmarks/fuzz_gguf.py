"""Fuzz ``lowbit.io.gguf.import_gguf`` with seeded mutations of small GGUF files.

Base files: tiny random Llama models exported by ``export_gguf`` (Q8_0, Q4_K_M untied, F16,
BF16, Q4_0, Q5_1, and Q8_0 rewritten by gguf-py at alignment 64). Each case mutates one base
(classes in tests/gguf_fuzz.py: bit flips in header / metadata / tensor infos / data, huge
counts and lengths, value types, bad metadata values, offsets moved to overlap or leave gaps,
type ids, dims, truncation, trailing garbage, ...) and imports it in a forked child under a
time and an address-space limit. Each case is classified as typed-error / identical /
silently-different / non-typed-exception / hang / memory-blow-up; silently-different is
acceptable only in the documented known-undetectable classes.

    .venv/bin/python benchmarks/fuzz_gguf.py --count 10000 --seed 0

Prints a Markdown table (per class and total) and the run time; exits 1 when any case failed.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10000, help="number of cases (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=30.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--mem-mib", type=int, default=1024, help="address space a case may add (MiB)")
    ap.add_argument("--show", type=int, default=20, help="failed cases to print")
    args = ap.parse_args(argv)

    import torch

    import gguf_fuzz as fz

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        bases = fz.make_bases(tmp / "bases")
        setup = time.perf_counter() - t0
        done = [0]

        def progress(_res) -> None:
            done[0] += 1
            if done[0] % 500 == 0:
                print(f"  {done[0]}/{args.count} cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

        results = fz.run_cases(fz.generate(bases, args.count, args.seed), tmp, args.time_limit,
                               args.mem_mib << 20, on_result=progress)
    total = time.perf_counter() - t0
    failed = [r for r in results if r.failed]
    slowest = max(results, key=lambda r: r.seconds)
    peak = max((r.peak_rss_growth or 0) for r in results)

    print(f"GGUF import fuzz: {args.count} cases, seed {args.seed}, {len(bases)} base files "
          f"({', '.join(b.name for b in bases)}); torch {torch.__version__}, {platform.machine()}, 1 thread")
    print()
    print(fz.markdown_table(results))
    print()
    print(f"failed cases: {len(failed)} (non-typed / hang / memory, multi-line or last-resort messages, "
          "or silently different outside the known classes)")
    print(f"time: {total:.1f} s in all ({setup:.1f} s to build the bases), {1000 * (total - setup) / len(results):.1f} ms "
          f"per case, slowest case {slowest.seconds:.2f} s; largest peak-RSS growth of a case {peak / 2**20:.0f} MiB "
          f"(limit {args.mem_mib} MiB)")
    print("known-undetectable classes (silently-different allowed):")
    for cls, why in fz.KNOWN_UNDETECTABLE.items():
        print(f"  {cls}: {why}")
    for r in failed[: args.show]:
        print("FAILED", r.describe())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
