"""GPTQ and SignRound variants at W4 (or ``--bits 3``) g128 asym on SmolLM2-135M-Instruct, quantized
and scored in one process.

A sweep for the question "what closes the rest of the gap to fp32 at W4": calibration set
(state_union text or data-free samples, 32 x 512 up to 128 x 2048), dampening, act-order, the
GPTAQ-style full-precision targets (``GPTQ(fp_targets=True)``), the least-squares scale
refinement (``GPTQ(refine_scales=True)``) and block-wise SignRound (AutoRound's method, from
round-to-nearest or from GPTQ's codes). Every variant is quantized from the same fp32 model
and compared with it on the same WikiText-2 test windows (lowbit's protocol: perplexity, KL,
top-1), on ``--device`` (a GPU makes the whole sweep take minutes; the numerics are the same
float32 math, so CPU reruns of a row agree to rounding).

The baseline is the GGUF's Q4_1 weights dequantized to fp32; "g128" is group 128 where it
divides the layer and group 64 on the 576-wide layers (``indivisible_groups="shrink"``), as in
``benchmarks/calibration.py``.

    .venv/bin/python benchmarks/gptq_variants.py inputs --out /tmp/gv/inputs.pt   # token ids, once
    .venv/bin/python benchmarks/gptq_variants.py run --inputs /tmp/gv/inputs.pt --device cuda \\
        --variants "rtn" "clip df32x512" "clip+fpt df128x2048 damp=0.1" --out /tmp/gv/results.jsonl

``inputs`` tokenizes the evaluation windows and the state_union calibration windows and loads
the cached data-free samples (``--data-free`` files written by ``benchmarks/calibration.py``), so
``run`` needs neither the data directory nor a tokenizer pass (a GPU machine may have neither).
Data-free sets not in the inputs file are sampled on ``--device`` with seed 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import platform
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent

SCHEME = dict(bits=4, group_size=128, symmetric=False)
# flags a variant name may carry after its method and calibration set
FLAGS = {"noact": ("act_order", False), "gar": ("group_aware", True)}
NUMERIC = {"damp": "damp", "norm": "clip_norm", "shrink": "max_shrink", "grid": "clip_grid", "cap": "token_cap"}
# SignRound options: iters=N, lr=X, norange
SR_NUMERIC = {"iters": "iters", "lr": "lr"}
# end-to-end scale tuning after the rounding (E2ETuning), any method: tune=STEPS, tlr=X, tbs=N, tnorms
TUNE_NUMERIC = {"tune": "steps", "tlr": "lr", "tbs": "batch_size"}
EXAMPLES = ["rtn", "clip df32x512", "clip+fpt df32x512", "clip+refine df128x2048 damp=0.1", "gptq text32x512 noact fpprop",
            "sr df32x512 iters=200", "sr df32x512 iters=100 lr=0.01 norange", "srclip df32x512 iters=100",
            "clip df64x256 tune=32 tlr=0.002"]


def parse_variant(name: str) -> tuple[str, dict | None, str | None, str, dict | None]:
    """``"<method> [<calibration>] [options]"`` -> (method kind ``"rtn"``/``"gptq"``/``"signround"``,
    its keyword arguments, calibration key, propagate, E2ETuning keyword arguments or None).

    method: ``rtn``, ``gptq`` or ``clip`` (``GPTQ(clip_search=True)``), with ``+fpt``
    (``fp_targets``) and/or ``+refine`` (``refine_scales``), or ``sr`` (``SignRound`` from RTN) or
    ``srclip`` (``SignRound(start=GPTQ(clip_search=True))``), either with ``+fpt`` (``fp_targets``);
    calibration: ``textNxL`` (state_union), ``dfNxL`` (data-free; ``dfNxLtT``: sampled at temperature T) or ``wikidiagNxL`` (diagnostic only:
    WikiText-2 test text after the evaluation windows); GPTQ options: ``damp=X``,
    ``norm=X``, ``shrink=X``, ``grid=N``, ``cap=X`` (``token_cap``), ``noact`` (no act-order), ``gar`` (group-aware act-order); SignRound options:
    ``iters=N``, ``lr=X``, ``norange`` (round only, no range factors); any method: ``fpprop``
    (next block sees full-precision outputs), ``tune=STEPS`` (then ``E2ETuning``: end-to-end scale
    tuning by distillation on the same calibration windows) with ``tlr=X``, ``tbs=N`` (windows
    per step), ``tnorms`` (norm weights too).
    """
    words = name.split()
    head = words[0].split("+")
    if head[0] == "rtn" and len(words) == 1 and len(head) == 1:
        return "rtn", None, None, "quantized", None
    if head[0] not in ("gptq", "clip", "sr", "srclip") or len(words) < 2 or not words[1].startswith(CALIBRATION_PREFIXES):
        raise SystemExit(f"bad variant {name!r}; examples: {EXAMPLES}")
    kind = "signround" if head[0].startswith("sr") else "gptq"
    opts: dict = {} if kind == "signround" else {"clip_search": head[0] == "clip"}
    if head[0] == "srclip":
        opts["start"] = {"clip_search": True}
    for extra in head[1:]:
        if extra not in (("fpt",) if kind == "signround" else ("fpt", "refine")):
            raise SystemExit(f"bad method {words[0]!r} in variant {name!r}; examples: {EXAMPLES}")
        opts[{"fpt": "fp_targets", "refine": "refine_scales"}[extra]] = True
    _size(words[1])
    propagate = "quantized"
    numeric = SR_NUMERIC if kind == "signround" else NUMERIC
    tune: dict = {}
    for w in words[2:]:
        if w == "fpprop":
            propagate = "full_precision"
        elif w == "tnorms":
            tune["norms"] = True
        elif "=" in w and w.split("=")[0] in TUNE_NUMERIC:
            k, v = w.split("=")
            tune[TUNE_NUMERIC[k]] = float(v) if k == "tlr" else int(v)
        elif kind == "gptq" and w in FLAGS:
            opts[FLAGS[w][0]] = FLAGS[w][1]
        elif kind == "signround" and w == "norange":
            opts["tune_range"] = False
        elif "=" in w and w.split("=")[0] in numeric:
            k, v = w.split("=")
            opts[numeric[k]] = int(v) if k in ("grid", "iters") else float(v)
        else:
            raise SystemExit(f"bad option {w!r} in variant {name!r}; examples: {EXAMPLES}")
    if tune and "steps" not in tune:
        raise SystemExit(f"variant {name!r}: tlr/tbs/tnorms need tune=STEPS")
    return kind, opts, words[1], propagate, (tune or None)


CALIBRATION_PREFIXES = ("text", "df", "wikidiag")


def _size(key: str) -> tuple[int, int]:
    """``"text32x512"`` / ``"df128x2048"`` / ``"df32x512t0.8"`` / ``"wikidiag32x512"`` -> (windows,
    tokens per window)."""
    prefix = next(p for p in CALIBRATION_PREFIXES if key.startswith(p))
    n, length = key[len(prefix) :].split("t")[0].split("x")
    return int(n), int(length)


def _temperature(key: str) -> float:
    """The sampling temperature of a data-free key: ``"df32x512t0.8"`` -> 0.8, ``"df32x512"`` -> 1.0."""
    return float(key.split("t", 1)[1]) if key.startswith("df") and "t" in key else 1.0


def cmd_inputs(args) -> None:
    """Token ids for ``run``: evaluation windows, state_union windows, cached data-free samples."""
    import lowbit
    from lowbit.calibration import from_texts
    from lowbit.eval.data import find_data_dir, load_wikitext2_test_text, tokenize_once
    from lowbit.eval.perplexity import make_windows

    _, tok = lowbit.load_pretrained("default")
    test_ids = tokenize_once(tok, load_wikitext2_test_text())
    saved = {"windows": make_windows(test_ids, args.window_len, args.windows)}
    for key in args.wiki_diagnostic or []:
        # DIAGNOSTIC ONLY (in-domain calibration): windows of WikiText-2 test text that lie after
        # the evaluation windows, at seeded offsets; never a benchmark row of a method
        n, length = _size(key)
        tail = test_ids[args.windows * args.window_len :]
        starts = torch.randint(0, tail.numel() - length, (n,), generator=torch.Generator().manual_seed(0))
        saved[key] = torch.stack([tail[i : i + length] for i in starts.tolist()])
    for key in args.text:
        n, length = _size(key)
        saved[key] = from_texts(find_data_dir() / "state_union", tok, n_samples=n, seqlen=length, seed=0).ids
    for path in args.data_free or []:
        d = torch.load(path, weights_only=False)
        n, length = d["ids"].shape
        temperature = d["description"].get("temperature", 1.0)
        saved[f"df{n}x{length}" + ("" if temperature == 1.0 else f"t{temperature:g}")] = d["ids"]
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, args.out)
    print({k: tuple(v.shape) for k, v in saved.items()})


def _calibration(key: str, inputs: dict, model, device, save_dir) -> torch.Tensor:
    from lowbit.calibration import sample_from_model

    if key not in inputs:
        if not key.startswith("df"):
            raise SystemExit(f"{key} is not in the inputs file; rerun `inputs`")
        n, length = _size(key)
        t = time.perf_counter()
        temperature = _temperature(key)
        inputs[key] = sample_from_model(model, bos_token_id=model.config.bos_token_id, n_samples=n, seqlen=length,
                                        seed=0, batch_size=min(n, 128) if device.type == "cuda" else 16,
                                        temperature=temperature).ids
        print(f"[sampled {key} in {time.perf_counter() - t:.0f} s]", flush=True)
        if save_dir:  # so that a CPU rerun can use the very same samples (`inputs --data-free`)
            desc = {"source": "data-free", "seed": 0, "device": str(device), "temperature": temperature}
            torch.save({"ids": inputs[key], "description": desc}, pathlib.Path(save_dir) / f"data-free-{key[2:]}.pt")
    return inputs[key]


def cmd_run(args) -> None:
    import lowbit
    from lowbit import GPTQ, E2ETuning, Recipe, SignRound
    from lowbit.calibration import CalibrationData
    from lowbit.eval.compare import compare_many
    from lowbit.kernels.registry import use_kernel
    from lowbit.model.walker import WalkOptions
    from lowbit.scheme import QuantScheme

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on a GPU too
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    inputs = torch.load(args.inputs, weights_only=False)
    windows = inputs["windows"][: args.max_windows]
    fp32, _ = lowbit.load_pretrained(args.model)
    if args.blocks:  # a smoke test on the first blocks only
        fp32.model.layers = fp32.model.layers[: args.blocks]
        fp32.config.num_hidden_layers = args.blocks
    fp32 = fp32.to(device).eval()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}), "
          f"torch {torch.__version__}, {windows.shape[0]} x {windows.shape[1]} windows", flush=True)
    for name in args.variants:
        parse_variant(name)  # every name checked before any work
    rtn_delta = None
    for name in args.variants:
        kind, opts, key, propagate, tune = parse_variant(name)
        model = copy.deepcopy(fp32)
        method = {"rtn": lambda: "rtn", "gptq": lambda: GPTQ(**opts), "signround": lambda: SignRound(**opts)}[kind]()  # start: dict -> GPTQ
        recipe = Recipe.uniform(QuantScheme(**{**SCHEME, "bits": args.bits}), method=method, indivisible_groups="shrink",
                                tune=None if tune is None else E2ETuning(**tune))
        calib = None if key is None else CalibrationData(_calibration(key, inputs, fp32, device, args.save_sampled), {"source": key})
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        report = lowbit.quantize(model, recipe, calibration=calib, progress=args.progress,
                                 options=WalkOptions(batch_size=args.batch_size, propagate=propagate))
        if device.type == "cuda":
            torch.cuda.synchronize()
        q_s = time.perf_counter() - t
        with use_kernel("dequantized"):
            r = compare_many(fp32, {name: model}, windows, progress=False)[name]
        delta = r.candidate_ppl - r.reference_ppl
        if name == "rtn":
            rtn_delta = delta
        row = {"variant": name, "bits": args.bits, "signround" if kind == "signround" else "gptq": opts, "batch_size": args.batch_size, "calibration": key, "propagate": propagate, "ppl": r.candidate_ppl, "fp32_ppl": r.reference_ppl,
               "delta": delta, "share_of_rtn": None if rtn_delta is None else delta / rtn_delta,
               "kl": r.mean_kl, "top1": r.top1_agreement, "quantize_s": q_s, "device": str(device),
               "windows": list(windows.shape), "date": time.strftime("%Y-%m-%d"),
               "notes": [n for n in report.notes if "signround" in n or "e2e" in n], "tune": tune, "tuning": report.tuning}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        share = "-" if row["share_of_rtn"] is None else f"{row['share_of_rtn']:.3f}"
        print(f"{name:34s} ppl {r.candidate_ppl:8.3f} (fp32 {r.reference_ppl:.3f}, d {delta:+.3f}, "
              f"share {share}) KL {r.mean_kl:.4f} top1 {r.top1_agreement:.3f} quant {q_s:6.1f} s", flush=True)
        del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inputs")
    p.add_argument("--out", required=True)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--window-len", type=int, default=2048)
    p.add_argument("--text", nargs="*", default=["text32x512", "text128x2048"], help="state_union sets to tokenize")
    p.add_argument("--data-free", nargs="*", help="data-free-NxL.pt files from benchmarks/calibration.py")
    p.add_argument("--wiki-diagnostic", nargs="*", metavar="wikidiagNxL",
                   help="diagnostic only: N x L windows of WikiText-2 test text after the evaluation windows "
                        "(in-domain calibration, to bound what calibration can reach; not a method result)")
    p.set_defaults(fn=cmd_inputs)
    p = sub.add_parser("run")
    p.add_argument("--inputs", required=True)
    p.add_argument("--model", default="default", help='"default" or a .gguf path')
    p.add_argument("--device", default="cpu")
    p.add_argument("--bits", type=int, default=4, help="4 (W4 g128 asym) or 3 (W3 g128 asym)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per block call")
    p.add_argument("--variants", nargs="+", required=True, metavar="NAME", help=f"e.g. {EXAMPLES}")
    p.add_argument("--out", required=True, help="JSON lines, appended")
    p.add_argument("--save-sampled", default=None, help="directory for the data-free samples drawn here")
    p.add_argument("--max-windows", type=int, default=None, help="score the first N windows only")
    p.add_argument("--blocks", type=int, default=0, help="keep the first N blocks only (smoke tests)")
    p.add_argument("--progress", action="store_true", help="show the walker's per-block progress bar")
    p.set_defaults(fn=cmd_run)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
