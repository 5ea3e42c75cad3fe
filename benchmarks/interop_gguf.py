"""GGUF interop: lowbit's exports run in llama.cpp, side by side with llama.cpp's own quantization.

For each type (default Q8_0, Q4_0, Q4_K_M) the default model (SmolLM2-135M-Instruct,
fp32 as dequantized from its Q4_1 GGUF) is

* exported by lowbit (``export_gguf``, llama.cpp's type mix, our block encoders);
* quantized by llama.cpp (``llama_model_quantize``) from lowbit's F32 export;

and each file is scored in llama.cpp (``llama_cpp.Llama``, ``logits_all``) and in
lowbit (``import_gguf`` -> transformers) by the project's perplexity protocol
(``lowbit.eval.perplexity``: WikiText-2 test joined, tokenized once without special
tokens, non-overlapping windows scored from an empty context, ppl = exp(mean NLL)).
It also reports file size, bits per weight, whether the two files' tensors are
byte-identical, and the largest logit difference between llama.cpp and lowbit on
the same file.

    .venv/bin/python benchmarks/interop_gguf.py --windows 8 --window-len 512 --json out.json

Needs ``pip install llama-cpp-python`` (builds llama.cpp from source).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def llama_cpp_nll(llama_cpp, path: pathlib.Path, windows: torch.Tensor, threads: int) -> tuple[float, list[np.ndarray]]:
    """Sum of NLL over the windows' predicted tokens in llama.cpp, and the first window's logits."""
    n, length = windows.shape
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=length, n_batch=length, n_ubatch=length,
                          logits_all=True, verbose=False, n_threads=threads)
    total, first = 0.0, []
    try:
        for w in windows:
            llm.reset()
            llm.eval(w.tolist())
            logits = torch.from_numpy(np.array(llm.scores[:length], dtype=np.float32))
            if not first:
                first.append(logits.numpy())
            total += float(F.cross_entropy(logits[:-1], w[1:], reduction="sum").double())
    finally:
        llm.close()
    return total, first


def q8_0_activations(x: torch.Tensor) -> torch.Tensor:
    """Round a linear's input as llama.cpp's CPU backend does before a Q8_0/Q4_0/Q5_0 matmul:
    blocks of 32 along the last axis, d = amax/127 (stored fp16), q = round(x/d) (ggml quantize_row_q8_0).
    K-quant weights use Q8_K blocks of 256 instead, so for them this is an approximation."""
    b = x.float().reshape(-1, 32)
    d = b.abs().amax(1, keepdim=True) / 127
    q = torch.round(b * torch.where(d == 0, torch.zeros_like(d), 1 / d))
    return (q * d.half().float()).reshape(x.shape).to(x.dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="*", default=["Q8_0", "Q4_0", "Q4_K_M"])
    ap.add_argument("--lowbit-rtn", action="store_true",
                    help="also quantize with lowbit RTN w4 g32 symmetric (fp16 scales) and export it as Q4_0 "
                         "through the lossless path (codes copied), scored in llama.cpp and in lowbit")
    ap.add_argument("--no-f32-score", action="store_true", help="do not score the F32 file")
    ap.add_argument("--simulate-act-q8", action="store_true",
                    help="also score lowbit with every linear input rounded to Q8_0 blocks (what llama.cpp does)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default="/tmp/lowbit-gguf-interop")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import llama_cpp

    from lowbit.eval.data import load_wikitext2_test_text, tokenize_once
    from lowbit.eval.perplexity import make_windows, perplexity, forward_logits
    from lowbit.io.gguf import export_gguf, import_gguf, mix
    from lowbit.model.loading import default_model_path, load_pretrained
    from gguf import GGUFReader

    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = default_model_path()
    model, tok = load_pretrained("default")
    windows = make_windows(tokenize_once(tok, load_wikitext2_test_text()), args.window_len, args.windows)
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    n_params = sum(p.numel() for n, p in model.named_parameters())

    t = time.time()
    f32 = out / "smollm2-F32.gguf"
    export_gguf(model, f32, "F32", source_gguf=src)
    print(f"F32 export {time.time() - t:.1f}s, {f32.stat().st_size / 1e6:.1f} MB", flush=True)

    rows = []

    def score(label: str, path: pathlib.Path, maker: str, seconds: float, lowbit_too: bool) -> dict:
        nll, first = llama_cpp_nll(llama_cpp, path, windows, args.threads)
        row = {"type": label, "maker": maker, "file": path.name, "bytes": path.stat().st_size,
               "bpw": path.stat().st_size * 8 / n_params, "quantize_s": round(seconds, 1),
               "ppl_llama_cpp": math.exp(nll / n_pred)}
        if lowbit_too:
            m = import_gguf(path)
            row["ppl_lowbit"] = perplexity(m, windows, progress=False).ppl
            with torch.inference_mode():
                ours = forward_logits(m, windows[:1])[0].numpy()
            row["max_abs_logit_diff"] = float(np.abs(ours - first[0]).max())
            if args.simulate_act_q8:
                hooks = [mod.register_forward_pre_hook(lambda _m, a: (q8_0_activations(a[0]),))
                         for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
                row["ppl_lowbit_act_q8_0"] = perplexity(m, windows, progress=False).ppl
                for h in hooks:
                    h.remove()
            del m
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    if not args.no_f32_score:
        score("F32", f32, "lowbit", 0.0, lowbit_too=True)
    if args.lowbit_rtn:
        import copy

        import lowbit
        from lowbit import Recipe
        from lowbit.scheme import QuantScheme

        qmodel = copy.deepcopy(model)
        t = time.time()
        lowbit.quantize(qmodel, Recipe.uniform(QuantScheme(bits=4, group_size=32, scale_dtype="float16")), progress=False)
        path = out / "smollm2-lowbit-w4g32.Q4_0.gguf"
        report = export_gguf(qmodel, path, "Q4_0", source_gguf=src)
        row = score("Q4_0", path, "lowbit RTN w4g32", time.time() - t, lowbit_too=True)
        row["lossless_tensors"] = len(report.lossless)
        row["ppl_lowbit_in_memory"] = perplexity(qmodel, windows, progress=False).ppl
        print(json.dumps(row), flush=True)
        del qmodel
    for q in args.types:
        ours = out / f"smollm2-{q}.lowbit.gguf"
        t = time.time()
        report = export_gguf(model, ours, q, source_gguf=src)
        t_ours = time.time() - t
        theirs = out / f"smollm2-{q}.llama-quantize.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(mix.FTYPES[q][1])
        params.nthread = args.threads
        t = time.time()
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params))
        t_theirs = time.time() - t
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed for {q} (rc={rc})")
        a = {x.name: x for x in GGUFReader(str(ours)).tensors}
        b = {x.name: x for x in GGUFReader(str(theirs)).tensors}
        same = sum(a[n].tensor_type == b[n].tensor_type and np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data))
                   for n in a if n in b)
        r1 = score(q, ours, "lowbit", t_ours, lowbit_too=True)
        r1["types"] = report.type_counts()
        r1["tensors_identical_to_llama_quantize"] = f"{same}/{len(a)}"
        score(q, theirs, "llama-quantize", t_theirs, lowbit_too=False)

    print(f"\nSmolLM2-135M-Instruct (fp32 from GGUF Q4_1), WikiText-2 test, {args.windows} windows x "
          f"{args.window_len} tokens ({n_pred} predicted tokens); llama-cpp-python {llama_cpp.__version__}")
    print(f"{'type':8} {'made by':15} {'MB':>7} {'bpw':>5} {'s':>6} {'ppl llama.cpp':>14} {'ppl lowbit':>11} "
          f"{'max|dlogit|':>11}  identical")
    for r in rows:
        print(f"{r['type']:8} {r['maker']:15} {r['bytes'] / 1e6:7.1f} {r['bpw']:5.2f} {r['quantize_s']:6.1f} "
              f"{r['ppl_llama_cpp']:14.4f} {r.get('ppl_lowbit', float('nan')):11.4f} "
              f"{r.get('max_abs_logit_diff', float('nan')):11.4f}  {r.get('tensors_identical_to_llama_quantize', '')}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"windows": args.windows, "window_len": args.window_len,
                                                       "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
