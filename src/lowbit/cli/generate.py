"""``lowbit generate``: a continuation of a prompt from a checkpoint or a model source."""

from __future__ import annotations

import argparse
from typing import Any

from lowbit.cli.common import add_command, add_kernel_argument, add_model_argument, echo, kernel_context
from lowbit.cli.sources import load_model, load_tokenizer, model_manifest, recorded_source
from lowbit.errors import ModelSourceError


def add_parser(subparsers) -> None:
    g = add_command(
        subparsers, "generate", "generate text from a prompt",
        "Generate a continuation of --prompt (greedy unless --temperature > 0) and print it.",
        run,
    )
    add_model_argument(g)
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the tokenizer's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 means greedy decoding")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (--temperature > 0)")
    g.add_argument("--tokenizer", metavar="SOURCE", default=None,
                   help="tokenizer source. Default: the model's own; for a checkpoint, its recorded source, else 'default'")
    add_kernel_argument(g)


def run(args: argparse.Namespace) -> int:
    import torch

    manifest = model_manifest(args, "generate")
    model, tokenizer = load_model(args, manifest)
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
    elif tokenizer is None:  # a checkpoint: the tokenizer of the source it was quantized from
        tokenizer = load_tokenizer(recorded_source(manifest) or "default")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelSourceError("--chat needs a tokenizer with a chat template; this one has none (drop --chat)")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt"
        )
    else:
        ids = tokenizer(args.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ModelSourceError("the prompt tokenizes to nothing; pass a non-empty --prompt")
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "attention_mask": torch.ones_like(ids)}
    if args.temperature and args.temperature > 0:
        torch.manual_seed(args.seed)
        kw.update(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kw["pad_token_id"] = pad
    with kernel_context(args.kernel), torch.inference_mode():
        out = model.generate(ids, **kw)
    echo(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0
