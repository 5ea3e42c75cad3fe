"""Fuzz lowbit checkpoint loading, and measure what digest verification costs at load.

    python benchmarks/fuzz_checkpoint.py --cases 10000 --seed 0      # the fuzz table
    python benchmarks/fuzz_checkpoint.py --digest-cost               # SmolLM2-135M-sized load cost

Fuzz: ``--cases`` seeded mutations of tiny Llama checkpoints (W4 g32 sym / asym, W8 per
channel, NF4), every (mutation class, mode) pair equally often, each loaded in a forked child
under a wall-clock limit (``--time-limit``) and an address-space limit; the table counts
outcomes per class and mode (tests/checkpoint_fuzz.py documents the classes and modes,
tests/fuzz_runner.py the outcomes). Only ``typed-error`` and ``identical`` are acceptable; the
exit code is 1 if any case is something else, and those cases are listed.

Digest cost: a random Llama with SmolLM2-135M's shapes (no download), quantized W4 g64 asym
with RTN, saved once; then ``load_checkpoint`` with ``verify=True`` and ``verify=False``,
alternated ``--repeats`` times (median), plus the hashing alone, and the throughput of other
candidate hashes on this CPU for comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import checkpoint_fuzz as cf  # noqa: E402


def run_fuzz(n: int, seed: int, time_limit: float) -> int:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bases = cf.make_bases(Path(tmp))
        setup = time.perf_counter() - t0
        done = [0]

        def progress(res: cf.Result) -> None:
            done[0] += 1
            if res.failed:
                print("FAIL", res.line(), flush=True)
            if done[0] % 1000 == 0:
                print(f"... {done[0]} / {n} cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

        results = cf.run_cases(cf.generate(bases, n, seed), time_limit=time_limit, on_result=progress)
    total = time.perf_counter() - t0
    import torch
    import transformers

    import lowbit

    print(
        f"\nlowbit {lowbit.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{n} cases, seed {seed}, {len(cf.CLASSES)} (class, mode) pairs, time limit {time_limit:g} s a case\n"
    )
    print(cf.markdown_table(results))
    failed = [r for r in results if r.failed]
    slowest = max(results, key=lambda r: r.seconds)
    print(
        f"\ntotal time {total:.1f} s (bases {setup:.1f} s; cases mean {statistics.mean(r.seconds for r in results) * 1000:.0f} ms, "
        f"slowest {slowest.seconds:.2f} s: {slowest.case.cls}/{slowest.case.mode}); "
        f"{len(failed)} unacceptable outcome(s)"
    )
    return 1 if failed else 0


# ---------------------------------------------------------------------------
# digest cost
# ---------------------------------------------------------------------------
def smollm2_sized_llama():
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def hash_throughput(data: bytes) -> dict[str, float]:
    """GB/s of candidate hashes over ``data`` (best of 3)."""
    from lowbit.eval.speed import time_fn

    candidates = {
        "sha256": lambda b: hashlib.sha256(b).digest(),
        "blake2b": lambda b: hashlib.blake2b(b).digest(),
        "sha1": lambda b: hashlib.sha1(b).digest(),
        "crc32": lambda b: zlib.crc32(b),
    }
    out = {}
    for name, fn in candidates.items():
        t = min(time_fn(lambda: fn(data), repeats=1, warmup=0) for _ in range(3))
        out[name] = len(data) / t / 1e9
    return out


def digest_cost(repeats: int) -> None:
    import torch

    import lowbit
    from lowbit.io.checkpoint import _read_tensors, load_checkpoint, read_manifest
    from lowbit.eval.speed import time_fn
    from lowbit.io.checkpoint_validation import check_tensor_digests
    from lowbit.scheme import QuantScheme

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = smollm2_sized_llama()
    lowbit.quantize(model, QuantScheme(bits=4, group_size=64, symmetric=False), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "smollm2-sized.safetensors"
        t0 = time.perf_counter()
        lowbit.save(model, path)
        save_s = time.perf_counter() - t0
        size = path.stat().st_size
        load_checkpoint(path)  # warm the page cache and the imports
        on, off = [], []
        for _ in range(repeats):
            for verify, bucket in ((True, on), (False, off)):
                t0 = time.perf_counter()
                load_checkpoint(path, verify=verify)
                bucket.append(time.perf_counter() - t0)
        manifest, state = read_manifest(path), _read_tensors(path)
        hash_s = time_fn(lambda: check_tensor_digests(path, manifest, state), repeats=repeats, warmup=0)
        rates = hash_throughput(path.read_bytes())
    on_s, off_s = statistics.median(on), statistics.median(off)
    print(f"\nDigest verification at load: random Llama with SmolLM2-135M's shapes, W4 g64 asym RTN, {size / 1e6:.1f} MB file")
    print(f"(median of {repeats}, page cache warm, {torch.get_num_threads()} threads)\n")
    print("| | seconds |")
    print("|---|---|")
    print(f"| load_checkpoint(verify=False) | {off_s:.3f} |")
    print(f"| load_checkpoint(verify=True) | {on_s:.3f} |")
    print(f"| difference | {on_s - off_s:+.3f} ({(on_s - off_s) / off_s * 100:+.0f} %) |")
    print(f"| hashing every tensor (sha256) alone | {hash_s:.3f} ({size / hash_s / 1e9:.2f} GB/s) |")
    print(f"| lowbit.save (digests included) | {save_s:.3f} |")
    print("\nHash throughput on this CPU over the same bytes (GB/s): " + ", ".join(f"{k} {v:.2f}" for k, v in rates.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="number of fuzz cases (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=30.0, help="seconds a case may take before it counts as a hang")
    ap.add_argument("--digest-cost", action="store_true", help="measure digest verification at load instead of fuzzing")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of each load for --digest-cost")
    args = ap.parse_args(argv)
    if args.digest_cost:
        digest_cost(args.repeats)
        return 0
    return run_fuzz(args.cases, args.seed, args.time_limit)


if __name__ == "__main__":
    sys.exit(main())
