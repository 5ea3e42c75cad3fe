"""Non-integer formats next to integers at the same bits, on SmolLM2-135M-Instruct.

``quality``: every configuration is quantized (RTN; LLM.int8 with calibration on
``../shared/data/state_union``, 32 x 512 tokens, seed 0, to choose its outlier columns),
saved as a lowbit checkpoint, and compared with the fp32 model on the same WikiText-2 test
windows (lowbit's perplexity protocol): perplexity, KL divergence, top-1 agreement, bits
per weight (scales included, from the stored tensors) and checkpoint size. Quantized models
run on the ``dequantized`` kernel (reference arithmetic; W8A8 / LLM.int8 layers round their
activations per token as the scheme says), so only the numerics of the format differ.

``speed``: each checkpoint is loaded in a fresh child process, which reports the resident
memory the load added (RSS after - RSS before, with the fp32 model never built) next to the
bytes the model's tensors should take (``lowbit.eval.memory.model_bytes``), and greedy-decode
tokens/s at batch 1 with the ``auto`` kernels (the kernel each layer ran is listed).

The baseline is the GGUF's Q4_1 weights dequantized to fp32.

    .venv/bin/python benchmarks/formats.py quality --out /tmp/fmt --windows 40 --window-len 2048
    .venv/bin/python benchmarks/formats.py speed --out /tmp/fmt
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent

# name -> (scheme kwargs, method)
CONFIGS = {
    "INT4 g64 sym": (dict(bits=4, group_size=64), "rtn"),
    "NF4 g64": (dict(format="nf4"), "rtn"),
    "NF4 g64 + double quant": (dict(format="nf4", double_quant=True), "rtn"),
    "FP4 g64": (dict(format="fp4"), "rtn"),
    "INT8 channel sym": (dict(bits=8, granularity="channel"), "rtn"),
    "FP8 E4M3 channel": (dict(format="fp8_e4m3"), "rtn"),
    "FP8 E5M2 channel": (dict(format="fp8_e5m2"), "rtn"),
    "W8A8 (int8 channel, int8 per token)": (dict(bits=8, granularity="channel", activations="int8"), "rtn"),
    "LLM.int8 (W8A8, outliers > 6 in fp16)": (dict(bits=8, granularity="channel", activations="int8"), "llm_int8"),
    "INT2 g64 asym": (dict(bits=2, group_size=64, symmetric=False), "rtn"),
    "ternary channel": (dict(format="ternary", granularity="channel"), "rtn"),
}


def _stem(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def cmd_quality(args) -> None:
    import lowbit
    from lowbit import Recipe
    from lowbit.calibration import from_texts
    from lowbit.eval.compare import compare_many
    from lowbit.eval.data import find_data_dir, load_wikitext2_test_text, tokenize_once
    from lowbit.eval.memory import file_size_bytes
    from lowbit.eval.perplexity import make_windows
    from lowbit.kernels.registry import use_kernel
    from lowbit.scheme import QuantScheme

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    infos = {}
    for name in args.configs:
        kw, method = CONFIGS[name]
        path = out / f"{_stem(name)}.safetensors"
        meta = out / f"{_stem(name)}.json"
        if not meta.is_file():
            model, tok = lowbit.load_pretrained("default")
            calibration = None
            if method != "rtn":
                calibration = from_texts(find_data_dir() / "state_union", tok, n_samples=32, seqlen=512, seed=0)
            t0 = time.perf_counter()
            report = lowbit.quantize(model, Recipe.uniform(QuantScheme(**kw), method=method), calibration=calibration,
                                     progress=False)
            wall = time.perf_counter() - t0
            lowbit.save(model, path)
            n_w = sum(r.in_features * r.out_features for r in report.layers)
            json.dump({"name": name, "scheme": QuantScheme(**kw).to_dict(), "method": method, "quantize_s": wall,
                       "bits_per_weight": 8 * report.quantized_bytes / n_w,
                       "outlier_fraction": report.outlier_fraction, "file_bytes": file_size_bytes(path)},
                      open(meta, "w"), indent=1)
            del model
        infos[name] = json.load(open(meta))
        print(f"[quantized] {name}: {infos[name]['bits_per_weight']:.3f} bits/weight", flush=True)
    model, tok = lowbit.load_pretrained("default")
    windows = make_windows(tokenize_once(tok, load_wikitext2_test_text()), args.window_len, args.windows)
    results = {}
    for i in range(0, len(args.configs), args.chunk):
        names = args.configs[i : i + args.chunk]
        cands = {n: lowbit.load(out / f"{_stem(n)}.safetensors") for n in names}
        with use_kernel("dequantized"):
            results.update(compare_many(model, cands, windows, progress=True))
        del cands
        _write_quality(args, out, t_start, results, infos)


def _write_quality(args, out, t_start, results, infos) -> None:
    first = next(iter(results.values()))
    fp32 = first.reference_ppl
    lines = [
        f"SmolLM2-135M-Instruct (fp32 = GGUF Q4_1 dequantized), WikiText-2 test, {args.windows} windows x "
        f"{args.window_len} tokens ({first.n_tokens} predicted tokens); RTN except LLM.int8 (outlier columns "
        "from state_union, 32 x 512 tokens, seed 0); lm_head and embeddings stay fp32",
        f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; total {time.time() - t_start:.0f} s",
        "",
        "| config | bits/weight | ppl | Δppl vs fp32 | KL (nats) | top-1 | outlier columns | checkpoint MiB |",
        "|---|---|---|---|---|---|---|---|",
        f"| fp32 | 32 | {fp32:.3f} | - | - | - | - | - |",
    ]
    for n, r in results.items():
        info = infos[n]
        frac = f"{100 * info['outlier_fraction']:.2f}%" if info["method"] == "llm_int8" else "-"
        lines.append(
            f"| {n} | {info['bits_per_weight']:.3f} | {r.candidate_ppl:.3f} | {r.candidate_ppl - fp32:+.3f} | "
            f"{r.mean_kl:.4f} | {r.top1_agreement:.3f} | {frac} | {info['file_bytes'] / 2**20:.1f} |"
        )
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    (out / "quality.md").write_text(text + "\n")
    json.dump({"args": vars(args), "fp32_ppl": fp32, "results": {n: {**r.to_dict(), **infos[n]} for n, r in results.items()}},
              open(out / "quality.json", "w"), indent=1, default=str)


def _scheme_bytes(model) -> int:
    """Bytes the model should hold by the schemes' own formula (``QuantScheme.storage_bytes``) for
    the quantized layers, plus the other parameters and buffers as they are."""
    from lowbit.eval.memory import model_bytes
    from lowbit.nn.quant_linear import QuantLinear

    total = model_bytes(model)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.scheme.storage_bytes(m.out_features, m.in_features, m.n_outliers) - m.nbytes
    return total


def _warm_up_model_code(path: str) -> None:
    """Build and drop a one-layer, 64-wide model of the checkpoint's architecture: transformers
    imports modeling code and sets up per-class state lazily on the first build (7.7 MiB of RSS
    for Llama, measured), which is code, not model memory."""
    import gc

    from lowbit.io import checkpoint

    manifest = checkpoint.read_manifest(pathlib.Path(path))
    tiny = dict(manifest, model=dict(manifest["model"]))
    tiny["model"]["config"] = dict(
        manifest["model"]["config"], num_hidden_layers=1, hidden_size=64, intermediate_size=128, vocab_size=128,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    )
    checkpoint._build_skeleton(tiny, path)  # built and dropped at once
    gc.collect()


def cmd_child(args) -> None:
    """Load one checkpoint (or build the fp32 model) in this fresh process: the RSS the load
    added, the bytes the schemes say it should take, decode speed."""
    import lowbit
    from lowbit.eval.memory import current_rss_bytes
    from lowbit.eval.speed import measure_decode
    from lowbit.nn.quant_linear import QuantLinear

    torch.set_num_threads(args.threads)
    # code is not model memory: import everything a load touches before the baseline
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import lowbit.io.checkpoint  # noqa: F401
    from lowbit.kernels import cpu_lut, registry  # noqa: F401

    cpu_lut.available()
    if args.path != "fp32":
        _warm_up_model_code(args.path)
    rss0 = current_rss_bytes()
    model = lowbit.load_pretrained("default")[0] if args.path == "fp32" else lowbit.load(args.path)
    # tensors read from a safetensors file may be backed by its memory map, resident only once
    # touched: read every byte once so that RSS counts all of the model
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.view(-1)[::max(1, 4096 // t.element_size())].float().sum() if t.numel() else None
    rss1 = current_rss_bytes()
    kernels = sorted({m.kernel_name for m in model.modules() if isinstance(m, QuantLinear)}) or ["torch fp32"]
    tok_s = None
    if args.new_tokens > 0:
        tok_s = measure_decode(model, batch=1, prompt_len=64, new_tokens=args.new_tokens, warmup=1, repeats=3).tokens_per_s
    print(json.dumps({"rss_load_bytes": rss1 - rss0, "expected_bytes": _scheme_bytes(model),
                      "decode_tok_s": tok_s, "kernels": kernels}))


def cmd_speed(args) -> None:
    out = pathlib.Path(args.out)
    rows = {}
    for name in ["fp32"] + list(args.configs):
        path = "fp32" if name == "fp32" else str(out / f"{_stem(name)}.safetensors")
        res = subprocess.run([sys.executable, __file__, "child", path, "--threads", str(args.threads),
                              "--new-tokens", str(args.new_tokens)], capture_output=True, text=True, check=True)
        rows[name] = r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{name}: load RSS {r['rss_load_bytes'] / 2**20:.1f} MiB vs schemes {r['expected_bytes'] / 2**20:.1f} MiB, "
              f"decode {r['decode_tok_s']} tok/s {r['kernels']}", flush=True)
    lines = [
        f"Each checkpoint loaded with lowbit.load in a fresh process, RSS measured from after the imports and a "
        f"warm-up build of a one-layer model of the same architecture (lazy code set-up) to after the load with every tensor's pages touched once (fp32: the GGUF read and dequantized, so its "
        f"load RSS includes transient copies); decode: batch 1, prompt 64, {args.new_tokens} new tokens greedy, "
        f"median of 3, {args.threads} threads, auto kernels; {platform.machine()} {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        "",
        "| config | RSS added by load MiB | size by the schemes MiB | RSS / schemes | decode tok/s | vs fp32 | kernels |",
        "|---|---|---|---|---|---|---|",
    ]
    base = rows["fp32"]["decode_tok_s"]
    for n, r in rows.items():
        tok = "not measured" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
        rel = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s'] / base:.2f}x"
        lines.append(f"| {n} | {r['rss_load_bytes'] / 2**20:.1f} | {r['expected_bytes'] / 2**20:.1f} | "
                     f"{r['rss_load_bytes'] / r['expected_bytes']:.3f} | {tok} | {rel} | {', '.join(r['kernels'])} |")
    text = "\n".join(lines)
    print("\n" + text)
    (out / "speed.md").write_text(text + "\n")
    json.dump(rows, open(out / "speed.json", "w"), indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--out", required=True)
    q.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME")
    q.add_argument("--windows", type=int, default=40)
    q.add_argument("--window-len", type=int, default=2048)
    q.add_argument("--chunk", type=int, default=6, help="models held in memory at once")
    s = sub.add_parser("speed")
    s.add_argument("--out", required=True)
    s.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--new-tokens", type=int, default=32, help="0: measure memory only")
    c = sub.add_parser("child")
    c.add_argument("path")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    {"quality": cmd_quality, "speed": cmd_speed, "child": cmd_child}[args.cmd](args)


if __name__ == "__main__":
    main()
