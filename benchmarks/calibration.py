"""Calibration-based methods on SmolLM2-135M-Instruct: quality, quantization time, peak RSS.

Every configuration is quantized in its own child process (so that its wall time and peak
RSS are its own), saved as a lowbit checkpoint, and then all checkpoints are compared with the
fp32 model on the same WikiText-2 test windows (lowbit's perplexity protocol): perplexity, KL
divergence and top-1 agreement. Quantized models run on the ``dequantized`` kernel (reference
arithmetic), so only the weights (and, for W8A8, the activation rounding) differ from fp32.

Calibration: ``../shared/data/state_union`` (public-domain speeches; never WikiText-2), sampled
into ``--calib-samples`` windows of ``--calib-seqlen`` tokens with seed 0, or data-free windows
sampled from the fp32 model itself (``[data-free]`` rows).

The baseline is the GGUF's Q4_1 weights dequantized to fp32. "g128" means group 128 where it
divides the layer (down_proj, 1536 wide) and group 64 on the 576-wide layers
(``indivisible_groups="shrink"``; every method gets the same groups).

    .venv/bin/python benchmarks/calibration.py run --out benchmarks/results/calibration \
        --windows 40 --window-len 2048 --calib-samples 32 --calib-seqlen 512 [--configs ...] \
        [--reference-python /tmp/refvenv/bin/python]

``--reference-python /tmp/refvenv/bin/python`` (made by ``benchmarks/setup_reference_venv.sh``)
also runs llm-compressor's GPTQ (``benchmarks/reference_gptq.py``) in the same run, on the same
calibration windows and schemes (``--reference-schemes``), and scores its dequantized output the
same way; its time and RSS come from the JSON it writes. The fp32 Hugging Face directory it
reads is written once from the GGUF (``export_hf``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

SCHEMES = {
    "W4 g128 sym": dict(bits=4, group_size=128),
    "W4 g128 asym": dict(bits=4, group_size=128, symmetric=False),
    "W4 g128 asymf": dict(bits=4, group_size=128, symmetric=False, zero_point="float"),
    "W3 g128 sym": dict(bits=3, group_size=128),
    "W3 g128 asym": dict(bits=3, group_size=128, symmetric=False),
    "W3 g128 asymf": dict(bits=3, group_size=128, symmetric=False, zero_point="float"),
    "W2 g64 asym": dict(bits=2, group_size=64, symmetric=False),
    "W2 g64 asymf": dict(bits=2, group_size=64, symmetric=False, zero_point="float"),
    "W8A8": dict(bits=8, granularity="channel", activations="int8"),
}

# AWQ's searches run on 4096 calibration tokens here (the default is 8192) to fit the
# benchmark into a session on 2 cores; GPTQ uses all calibration windows.
AWQ_BENCH = "awq(max_tokens=4096)"


# GPTQ with the clipping search of each group's range (weighted by diag(H))
GPTQ_CLIP = "gptq(clip)"


def _method(name: str):
    from lowbit import AWQ, GPTQ
    from lowbit.recipe import parse_method

    steps = []
    for part in name.split("+"):
        if part == AWQ_BENCH:
            steps.append(AWQ(max_tokens=4096))
        elif part == GPTQ_CLIP:
            steps.append(GPTQ(clip_search=True))
        else:
            steps.append(parse_method(part)[0])
    return tuple(steps)


# name -> (method, scheme, calibration kind); the default run is the first block (in order)
CONFIGS = {}
for _s in ("W4 g128 asym", "W3 g128 asym"):
    CONFIGS[f"rtn {_s}"] = ("rtn", _s, "text")
    CONFIGS[f"gptq {_s}"] = ("gptq", _s, "text")
    CONFIGS[f"awq {_s}"] = (AWQ_BENCH, _s, "text")
    if _s.startswith("W4"):
        CONFIGS[f"awq+gptq {_s}"] = (f"{AWQ_BENCH}+gptq", _s, "text")
    CONFIGS[f"hqq {_s}f"] = ("hqq", _s + "f", "text")
    if _s.startswith("W4"):
        CONFIGS["gptq W4 g128 asym [data-free]"] = ("gptq", "W4 g128 asym", "data-free")
DEFAULT_CONFIGS = list(CONFIGS)
# further configurations (run them with --configs)
CONFIGS["awq+gptq W3 g128 asym"] = (f"{AWQ_BENCH}+gptq", "W3 g128 asym", "text")
for _s in ("W4 g128 sym", "W2 g64 asym"):
    for _m in ("rtn", "gptq", AWQ_BENCH, f"{AWQ_BENCH}+gptq"):
        CONFIGS[f"{_m.replace(AWQ_BENCH, 'awq')} {_s}"] = (_m, _s, "text")
for _s in ("W4 g128 asymf", "W3 g128 asymf", "W2 g64 asymf"):
    CONFIGS[f"rtn {_s}"] = ("rtn", _s, "text")
CONFIGS["hqq W2 g64 asymf"] = ("hqq", "W2 g64 asymf", "text")
CONFIGS["gptq W3 g128 asym [data-free]"] = ("gptq", "W3 g128 asym", "data-free")
for _s in ("W4 g128 asym", "W3 g128 asym"):
    CONFIGS[f"{GPTQ_CLIP} {_s}"] = (GPTQ_CLIP, _s, "text")
    CONFIGS[f"awq+{GPTQ_CLIP} {_s}"] = (f"{AWQ_BENCH}+{GPTQ_CLIP}", _s, "text")
    CONFIGS[f"awq+{GPTQ_CLIP} {_s} [data-free]"] = (f"{AWQ_BENCH}+{GPTQ_CLIP}", _s, "data-free")
CONFIGS[f"{GPTQ_CLIP} W2 g64 asym"] = (GPTQ_CLIP, "W2 g64 asym", "text")
CONFIGS[f"{GPTQ_CLIP} W4 g128 asym [data-free]"] = (GPTQ_CLIP, "W4 g128 asym", "data-free")
for _s in ("W4 g128 sym", "W3 g128 sym"):
    CONFIGS[f"{GPTQ_CLIP} {_s}"] = (GPTQ_CLIP, _s, "text")
CONFIGS["rtn W3 g128 sym"] = ("rtn", "W3 g128 sym", "text")
# four times the default calibration text
CONFIGS[f"{GPTQ_CLIP} W4 g128 asym [state_union 128x512]"] = (GPTQ_CLIP, "W4 g128 asym", "text@128x512")
CONFIGS["rtn W8A8"] = ("rtn", "W8A8", "text")
CONFIGS["smoothquant W8A8"] = ("smoothquant", "W8A8", "text")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _calibration(kind: str, model, tok, args, out: pathlib.Path):
    """``kind``: "text" (state_union, ``--calib-samples`` x ``--calib-seqlen``), "text@NxL" (state_union,
    N windows of L tokens whatever the flags say) or "data-free"."""
    from lowbit.calibration import CalibrationData, from_texts, sample_from_model
    from lowbit.eval.data import find_data_dir

    if kind.startswith("text"):
        n, seqlen = args.calib_samples, args.calib_seqlen
        if "@" in kind:
            n, seqlen = (int(v) for v in kind.split("@", 1)[1].split("x"))
        return from_texts(find_data_dir() / "state_union", tok, n_samples=n, seqlen=seqlen, seed=0)
    cache = out / f"data-free-{args.calib_samples}x{args.calib_seqlen}.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        return CalibrationData(saved["ids"], saved["description"])
    t = time.perf_counter()
    data = sample_from_model(model, bos_token_id=model.config.bos_token_id, n_samples=args.calib_samples,
                             seqlen=args.calib_seqlen, seed=0)
    data.description["sampling_s"] = round(time.perf_counter() - t, 1)
    torch.save({"ids": data.ids, "description": data.description}, cache)
    return data


def cmd_quantize(args) -> None:
    """Child: quantize one configuration, save it, write its timing JSON."""
    import lowbit
    from lowbit import Recipe
    from lowbit.scheme import QuantScheme

    method, scheme_name, calib_kind = CONFIGS[args.config]
    out = pathlib.Path(args.out)
    model, tok = lowbit.load_pretrained("default")
    rss_loaded = _peak_rss()
    recipe = Recipe.uniform(QuantScheme(**SCHEMES[scheme_name]), method=_method(method), indivisible_groups="shrink")
    t_cal = time.perf_counter()
    calibration = _calibration(calib_kind, model, tok, args, out) if recipe.needs_calibration else None
    t0 = time.perf_counter()
    report = lowbit.quantize(model, recipe, calibration=calibration, progress=False)
    wall = time.perf_counter() - t0
    stem = _stem(args.config)
    lowbit.save(model, out / f"{stem}.safetensors")
    n_w = sum(r.in_features * r.out_features for r in report.layers)
    json.dump(
        {
            "config": args.config, "method": recipe.method_name,
            "method_options": recipe.to_dict()["method_options"], "scheme": SCHEMES[scheme_name],
            "quantize_s": wall, "calibration_prep_s": t0 - t_cal,
            "peak_rss_bytes": _peak_rss(), "rss_after_load_bytes": rss_loaded,
            "bits_per_weight": 8 * report.quantized_bytes / n_w,
            "calibration": report.calibration, "n_notes": len(report.notes),
            "groups": sorted({r.scheme.get("group_size") or 0 for r in report.layers}),
        },
        open(out / f"{stem}.json", "w"), indent=1,
    )


def _stem(config: str) -> str:
    return config.replace(" ", "_").replace("+", "-").replace("[", "").replace("]", "").replace("(", "-").replace(")", "")


def cmd_run(args) -> None:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    for name in args.configs:
        stem = _stem(name)
        if (out / f"{stem}.json").is_file() and not args.force:
            print(f"[have] {name}", flush=True)
            continue
        print(f"[quantize] {name}", flush=True)
        cmd = [sys.executable, __file__, "quantize", name, "--out", str(out),
               "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen)]
        subprocess.run(cmd, check=True)
        info = json.load(open(out / f"{stem}.json"))
        print(f"    {info['quantize_s']:.1f} s, peak RSS {info['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    if args.no_eval:
        return
    args.reference_dirs = run_reference(args, out) if args.reference_python else []
    if not args.reference_python:
        args.reference_schemes = []
    evaluate(args, out, t_start)


# reference-tool scheme name -> reference_gptq.py flags
REFERENCE_SCHEMES = {
    "W4 g128 sym": ["--bits", "4", "--group-size", "128"],
    "W4 g128 asym": ["--bits", "4", "--group-size", "128", "--no-sym"],
    "W3 g128 asym": ["--bits", "3", "--group-size", "128", "--no-sym"],
}


def export_hf(path: pathlib.Path) -> None:
    """The default model (GGUF Q4_1, dequantized) as an fp32 Hugging Face safetensors directory."""
    import lowbit

    if (path / "config.json").is_file():
        return
    model, tok = lowbit.load_pretrained("default")
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def run_reference(args, out: pathlib.Path) -> list[pathlib.Path]:
    from lowbit.eval.data import find_data_dir

    hf = out / "smollm2-hf"
    export_hf(hf)
    dirs = []
    for scheme in args.reference_schemes:
        d = out / f"llmcompressor_gptq_{_stem(scheme)}"
        if not (d / "reference_gptq.json").is_file() or args.force:
            print(f"[reference] llm-compressor GPTQ {scheme}", flush=True)
            cmd = [args.reference_python, str(HERE / "reference_gptq.py"), "--model", str(hf),
                   "--calib", str(find_data_dir() / "state_union"), *REFERENCE_SCHEMES[scheme],
                   "--act-order", "static", "--n-samples", str(args.calib_samples),
                   "--seqlen", str(args.calib_seqlen), "--seed", "0", "--out", str(d)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        dirs.append(d)
    return dirs


def evaluate(args, out: pathlib.Path, t_start: float) -> None:
    import lowbit
    from lowbit.eval.compare import compare_many
    from lowbit.eval.data import load_wikitext2_test_text, tokenize_once
    from lowbit.eval.perplexity import make_windows
    from lowbit.kernels.registry import use_kernel

    model, tok = lowbit.load_pretrained("default")
    windows = make_windows(tokenize_once(tok, load_wikitext2_test_text()), args.window_len, args.windows)
    names = list(args.configs)
    infos = {n: json.load(open(out / f"{_stem(n)}.json")) for n in names}
    refs = {}
    for d, scheme in zip(getattr(args, "reference_dirs", []), args.reference_schemes):
        raw = json.load(open(d / "reference_gptq.json"))
        info = {**raw, "quantize_s": raw["wall_seconds"], "peak_rss_bytes": raw["peak_rss_mib"] * 2**20,
                "bits_per_weight": None}
        refs[f"{raw['tool']} {raw['version']} gptq {scheme}"] = (d, info)
    results = {}
    # the reference tool first: its row and the lowbit rows it is compared with come out first
    todo = [(k, v[0]) for k, v in refs.items()] + [(n, out / f"{_stem(n)}.safetensors") for n in names]
    for i in range(0, len(todo), args.chunk):
        chunk = todo[i : i + args.chunk]
        cands = {}
        for n, path in chunk:
            cands[n] = lowbit.load(path) if str(path).endswith(".safetensors") else _load_reference(path)
        with use_kernel("dequantized"):
            results.update(compare_many(model, cands, windows, progress=True))
        del cands
        _write_table(args, out, t_start, results, [n for n in names if n in results], refs, infos)


def _write_table(args, out, t_start, results, names, refs, infos) -> None:
    """The table of what has been evaluated so far (rewritten after every chunk)."""
    fp32 = next(iter(results.values())).reference_ppl
    lines = [
        f"SmolLM2-135M-Instruct (fp32 = GGUF Q4_1 dequantized), WikiText-2 test, {args.windows} windows x "
        f"{args.window_len} tokens ({next(iter(results.values())).n_tokens} predicted tokens); calibration "
        f"state_union {args.calib_samples} x {args.calib_seqlen} tokens, seed 0 (data-free rows: sampled from the model)",
        f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; total {time.time() - t_start:.0f} s (includes quantization runs)",
        "",
        "| config | bits/weight | ppl | Δppl vs fp32 | share of RTN's Δppl | KL (nats) | top-1 | quantize s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| fp32 | 32 | {fp32:.3f} | - | - | - | - | - | - |",
    ]
    for n in [k for k in refs if k in results] + names:
        r = results[n]
        info = infos.get(n) or refs[n][1]
        scheme_part = n.split(" gptq ", 1)[1] if n in refs else n.split(" ", 1)[1]
        rtn_key = "rtn " + scheme_part.split(" [", 1)[0]  # "[data-free]", "[state_union 128x512]" rows too
        if rtn_key not in results and rtn_key.endswith("f"):
            rtn_key = rtn_key[:-1]  # float-zero rows against RTN with integer zeros
        share = "-"
        if rtn_key in results and rtn_key != n:
            base = results[rtn_key].candidate_ppl - fp32
            share = f"{(r.candidate_ppl - fp32) / base:.2f}" if base > 0 else "-"
        bpw = info.get("bits_per_weight")
        lines.append(
            f"| {n} | {bpw:.2f} | {r.candidate_ppl:.3f} | {r.candidate_ppl - fp32:+.3f} | {share} | {r.mean_kl:.4f} | "
            f"{r.top1_agreement:.3f} | {info['quantize_s']:.1f} | {info['peak_rss_bytes'] / 2**30:.2f} |"
            if bpw is not None else
            f"| {n} | - | {r.candidate_ppl:.3f} | {r.candidate_ppl - fp32:+.3f} | {share} | {r.mean_kl:.4f} | "
            f"{r.top1_agreement:.3f} | {info['quantize_s']:.1f} | {info['peak_rss_bytes'] / 2**30:.2f} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    (out / "table.md").write_text(text + "\n")
    json.dump(
        {"args": vars(args), "fp32_ppl": fp32,
         "results": {n: {**results[n].to_dict(), **(infos.get(n) or refs[n][1])} for n in results}},
        open(out / "results.json", "w"), indent=1, default=str,
    )


def _load_reference(path: pathlib.Path):
    """A reference tool's dequantized fp32 weights, put into a copy of the default model (the
    reference directory's config was written by another transformers version)."""
    import lowbit
    from safetensors.torch import load_file

    model, _ = lowbit.load_pretrained("default")
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"{path}: reference weights do not match the model ({missing[:3]}, {unexpected[:3]})")
    model.tie_weights()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "quantize"):
        p = sub.add_parser(name)
        if name == "quantize":
            p.add_argument("config", choices=list(CONFIGS))
        else:
            p.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, metavar="NAME",
                           help="subset of: " + "; ".join(CONFIGS))
            p.add_argument("--windows", type=int, default=40)
            p.add_argument("--window-len", type=int, default=2048)
            p.add_argument("--chunk", type=int, default=6, help="models held in memory at once during evaluation")
            p.add_argument("--reference-python", help="python of the llm-compressor venv (setup_reference_venv.sh)")
            p.add_argument("--reference-schemes", nargs="*", default=["W4 g128 asym"], choices=list(REFERENCE_SCHEMES))
            p.add_argument("--force", action="store_true", help="re-quantize configs that already have results")
            p.add_argument("--no-eval", action="store_true", help="quantize the configs and stop (evaluate them in a later run)")
        p.add_argument("--out", required=True)
        p.add_argument("--calib-samples", type=int, default=128)
        p.add_argument("--calib-seqlen", type=int, default=512)
    args = ap.parse_args()
    (cmd_quantize if args.cmd == "quantize" else cmd_run)(args)


if __name__ == "__main__":
    main()
