"""Peak memory of layer-by-layer quantization against the model's size.

Quantizes SmolLM2-135M-Instruct (written once as an fp32 Hugging Face safetensors directory
from the GGUF) two ways, each in its own child process so that its peak RSS is its own:

* ``in-memory``: ``lowbit.load_pretrained(dir)`` then ``lowbit.quantize`` (walker over the
  whole model held in RAM) then ``lowbit.save``;
* ``streamed``: ``lowbit.quantize_from_disk(dir, ...)``: the model is built on ``meta``, only
  the non-block tensors are read, and each block is read from the shards when its turn comes.

Same recipe and calibration for both (GPTQ, W4 g128 asym, shrink; state_union windows), and
the two checkpoints must be identical tensor for tensor (checked).

    .venv/bin/python benchmarks/streaming.py --work /tmp/stream --calib-samples 8 --calib-seqlen 512
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def _recipe():
    from lowbit import Recipe
    from lowbit.scheme import QuantScheme

    return Recipe.uniform(QuantScheme(bits=4, group_size=128, symmetric=False), method="gptq", indivisible_groups="shrink")


def child(mode: str, work: pathlib.Path, n: int, seqlen: int) -> None:
    import resource as _r

    import lowbit
    from lowbit.calibration import from_texts
    from lowbit.eval.data import find_data_dir

    hf = work / "smollm2-hf"
    out = work / f"{mode}.safetensors"
    t0 = time.perf_counter()
    if mode == "in-memory":
        model, tok = lowbit.load_pretrained(str(hf))
        calib = from_texts(find_data_dir() / "state_union", tok, n_samples=n, seqlen=seqlen, seed=0)
        lowbit.quantize(model, _recipe(), calibration=calib, progress=False)
        lowbit.save(model, out)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf)
        calib = from_texts(find_data_dir() / "state_union", tok, n_samples=n, seqlen=seqlen, seed=0)
        lowbit.quantize_from_disk(hf, _recipe(), out, calibration=calib, progress=False)
    wall = time.perf_counter() - t0
    peak = _r.getrusage(_r.RUSAGE_SELF).ru_maxrss * 1024
    (work / f"{mode}.json").write_text(json.dumps({"mode": mode, "wall_s": wall, "peak_rss_bytes": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--child", choices=["in-memory", "streamed"])
    args = ap.parse_args()
    work = pathlib.Path(args.work)
    if args.child:
        child(args.child, work, args.calib_samples, args.calib_seqlen)
        return
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    from calibration import export_hf

    export_hf(work / "smollm2-hf")
    rows = {}
    for mode in ("streamed", "in-memory"):
        subprocess.run([sys.executable, __file__, "--work", str(work), "--child", mode,
                        "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen)], check=True)
        rows[mode] = json.loads((work / f"{mode}.json").read_text())
    from safetensors.torch import load_file

    a, b = load_file(str(work / "streamed.safetensors")), load_file(str(work / "in-memory.safetensors"))
    same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    model_bytes = (work / "smollm2-hf" / "model.safetensors").stat().st_size
    print(f"SmolLM2-135M-Instruct fp32 safetensors: {model_bytes / 2**20:.0f} MiB; GPTQ W4 g128 asym, "
          f"calibration {args.calib_samples} x {args.calib_seqlen}; {platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print("| mode | wall s | peak RSS MiB | peak RSS / model size |")
    print("|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['wall_s']:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['peak_rss_bytes'] / model_bytes:.2f} |")
    print(f"checkpoints identical: {same}")
    if not same:
        raise SystemExit("streamed and in-memory checkpoints differ")


if __name__ == "__main__":
    main()
