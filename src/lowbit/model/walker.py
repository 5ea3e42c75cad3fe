"""The sequential block walker: calibration-based quantization one block at a time.

1. Capture the inputs of the first block (hidden states plus every other positional and
   keyword argument: attention mask, position ids, rotary embeddings, ...) by running the
   model on the calibration windows and stopping at the first block.
2. For each block: apply the recipe's transforms (AWQ, SmoothQuant: scales folded into the
   preceding norm or linear), then the rounding (GPTQ collects one Hessian per group of
   linears that share an input; with ``true_sequential`` each group's statistics are collected
   after the earlier groups are quantized, stopping the forward pass as soon as they are in);
   then run the block to produce the next block's inputs, from the quantized block
   (``propagate="quantized"``, the GPTQ reference) or the full-precision one
   (``propagate="full_precision"``, computed before anything changes). ``GPTQ(fp_targets=True)``
   also keeps a full-precision stream of block inputs and a full-precision copy of the block,
   so that each linear is fitted to its full-precision outputs (GPTAQ). ``SignRound`` instead
   tunes all of the block's linears at once against the block's full-precision outputs on the
   same inputs, differentiating through the block (``torch.func.functional_call``).
3. Swap the block's linears for QuantLinear; a ``BlockSource`` may then drop the block's
   full-precision tensors (see ``lowbit.model.streaming``).

Linears outside the blocks (an LM head a rule quantizes) get the rounding without statistics
(GPTQ falls back to RTN there) and the report says so.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.data import CalibrationData
from lowbit.calibration.stats import ChannelStats, CrossAccumulator, HessianAccumulator
from lowbit.errors import CalibrationError, DataError
from lowbit.methods import round_weight
from lowbit.methods import awq as awq_m
from lowbit.methods import signround as signround_m
from lowbit.methods.gptq import fp_target_weight, order_group_size, prepare_hessian
from lowbit.methods.smoothquant import smoothquant_scales
from lowbit.model.adapters import InputGroup, ModelAdapter, find_blocks, trace_block
from lowbit.model.swap import (
    PlannedLayer,
    QuantizationReport,
    install_quantized,
    linear_kind,
    plan_layers,
    shared_parameter_owners,
    start_report,
    weight_as_linear,
)
from lowbit.scheme import AWQ, GPTQ, OFFLOAD, PROPAGATE, RTN, LLMInt8, Recipe, SignRound, SmoothQuant


@dataclass(frozen=True)
class WalkOptions:
    """How the walker runs (not what it computes, except ``propagate``).

    batch_size:  calibration windows per forward call.
    propagate:   "quantized" (next block sees the quantized block's outputs) or "full_precision".
    offload:     "memory" or "disk" (block inputs/outputs spill to ``offload_dir`` or a temp dir).
    """

    batch_size: int = 8
    propagate: str = "quantized"
    offload: str = "memory"
    offload_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise CalibrationError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.propagate not in PROPAGATE:
            raise CalibrationError(f"propagate={self.propagate!r}; use one of {PROPAGATE}")
        if self.offload not in OFFLOAD:
            raise CalibrationError(f"offload={self.offload!r}; use one of {OFFLOAD}")


class BlockSource(Protocol):
    """Materialises a block's full-precision weights before it is processed and drops them after."""

    def load(self, index: int, block: nn.Module) -> None: ...

    def release(self, index: int, block: nn.Module) -> None: ...


class ActivationStore:
    """Per-batch hidden states, in memory or spilled to disk (one file per batch)."""

    def __init__(self, offload: str = "memory", directory: Optional[str] = None) -> None:
        self._items: list[Any] = []
        self._dir = tempfile.mkdtemp(prefix="lowbit-acts-", dir=directory) if offload == "disk" else None

    def append(self, t: torch.Tensor) -> None:
        if self._dir is None:
            self._items.append(t)
        else:
            path = f"{self._dir}/{len(self._items)}.pt"
            torch.save(t.contiguous(), path)
            self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        return item if self._dir is None else torch.load(item, weights_only=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        self._items.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


# -- weights as [out, in], whatever the module stores ---------------------------------------
def get_weight(mod: nn.Module) -> torch.Tensor:
    """A float32 copy of the weight as ``[out, in]``."""
    return weight_as_linear(mod, linear_kind(mod)).detach().to(torch.float32).clone()


def set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    mod.weight.data = _stored_form(mod, w).contiguous()


def _stored_form(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """``w [out, in]`` as the module stores its weight (transposed for GPT-2's Conv1D), in its
    dtype; differentiable (SignRound passes it to ``functional_call``)."""
    return (w if isinstance(mod, nn.Linear) else w.t()).to(mod.weight.dtype)


def _block_out(res: Any) -> torch.Tensor:
    return res[0] if isinstance(res, (tuple, list)) else res


@contextmanager
def _hooks(pre: dict[nn.Module, Callable[[torch.Tensor], None]], stop: Optional[nn.Module] = None):
    """Forward pre-hooks that see each module's first input; ``stop`` ends the pass after its hook."""
    handles = []

    def make(fn, is_stop):
        def hook(mod, args):
            fn(args[0])
            if is_stop:
                raise _Stop

        return hook

    try:
        for mod, fn in pre.items():
            handles.append(mod.register_forward_pre_hook(make(fn, mod is stop)))
        if stop is not None and stop not in pre:
            handles.append(stop.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(_Stop())))
        yield
    finally:
        for h in handles:
            h.remove()


class _Inputs:
    """The first block's inputs: hidden states per batch plus the other call arguments."""

    def __init__(self, hidden: ActivationStore, extras: list[tuple[tuple, dict]]) -> None:
        self.hidden = hidden
        self.extras = extras

    def call(self, block: nn.Module, i: int) -> torch.Tensor:
        args, kwargs = self.extras[i]
        return _block_out(block(self.hidden[i], *args, **kwargs))


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calibration: CalibrationData, options: WalkOptions
) -> _Inputs:
    """Run ``model`` on the calibration windows up to the first block and keep what it received."""
    hidden = ActivationStore(options.offload, options.offload_dir)
    extras: list[tuple[tuple, dict]] = []

    def grab(mod, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            h, rest = args[0], tuple(args[1:])
        elif "hidden_states" in kwargs:
            h, rest = kwargs.pop("hidden_states"), ()
        else:
            raise CalibrationError("the first block was called without hidden states; pass a ModelAdapter")
        hidden.append(h.detach())
        extras.append((rest, kwargs))
        raise _Stop

    forward_kw = {}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        forward_kw["use_cache"] = False
    device = _input_device(model)
    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in calibration.ids.split(options.batch_size):
            try:
                model(input_ids=ids.to(device), **forward_kw)
            except _Stop:
                pass
            else:
                raise CalibrationError("the model finished a forward pass without calling its first block")
    finally:
        handle.remove()
    for i, (args, kwargs) in enumerate(extras):
        if kwargs.get("past_key_values") is not None or kwargs.get("past_key_value") is not None:
            kwargs.pop("past_key_values", None)
            kwargs.pop("past_key_value", None)
    return _Inputs(hidden, extras)


def _input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the input embedding's device (streamed blocks may still be on meta)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise CalibrationError(
            f"{name}: the calibration activations contain NaN/Inf; run calibration in float32 "
            "and check the model produces finite outputs on the calibration text"
        )


class BlockWalker:
    """State for one walk: the model, its plan, the report and the running block inputs."""

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        calibration: CalibrationData,
        *,
        adapter: Optional[ModelAdapter],
        options: WalkOptions,
        source: Optional[BlockSource],
        progress: bool,
    ) -> None:
        self.model, self.recipe, self.calibration = model, recipe, calibration
        self.options, self.source, self.progress = options, source, progress
        self.plan = {p.name: p for p in plan_layers(model, recipe)}
        self.report = start_report(model, recipe, list(self.plan.values()))
        self.report.calibration = dict(calibration.description)
        self.adapter = adapter or ModelAdapter(find_blocks(model))
        self.blocks = self.adapter.block_list(model)
        self.owners = shared_parameter_owners(model)

    # -- passes over the calibration batches ------------------------------------------------
    def _pass(self, block: nn.Module, inputs: _Inputs, pre=None, stop=None, batches=None, keep=False) -> Optional[ActivationStore]:
        out = ActivationStore(self.options.offload, self.options.offload_dir) if keep else None
        with _hooks(pre or {}, stop):
            for i in range(len(inputs.hidden)) if batches is None else batches:
                try:
                    y = inputs.call(block, i)
                except _Stop:
                    continue
                if out is not None:
                    out.append(y.detach())
        return out

    # -- the walk -------------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> QuantizationReport:
        was_training = self.model.training
        self.model.eval()  # no dropout in the statistics or in SignRound's objective
        try:
            return self._run()
        finally:
            self.model.train(was_training)

    def _run(self) -> QuantizationReport:
        inputs = capture_block_inputs(self.model, self.blocks, self.calibration, self.options)
        structure = self.adapter.structure
        prefix = self.adapter.blocks
        done: set[str] = set()
        rounding = self.recipe.rounding
        fp_stream = isinstance(rounding, (GPTQ, SignRound)) and rounding.fp_targets
        fp_inputs = _copy_inputs(inputs, self.options) if fp_stream else None
        try:
            for i, block in enumerate(tqdm(self.blocks, desc=f"quantizing ({self.recipe.method_name})", disable=not self.progress, unit="block")):
                if self.source is not None:
                    self.source.load(i, block)
                if structure is None or i == 0:
                    args, kwargs = inputs.extras[0]
                    h0 = inputs.hidden[0]
                    b = h0.shape[0]
                    traced = trace_block(
                        block, (h0[:1], *(_first_sample(a, b) for a in args)), {k: _first_sample(v, b) for k, v in kwargs.items()}
                    )
                    structure = self.adapter.structure or traced
                layers = {
                    rel: self.plan[f"{prefix}.{i}.{rel}"]
                    for rel in structure.linears
                    if f"{prefix}.{i}.{rel}" in self.plan
                }
                fp_out, fp_pair = None, None
                try:
                    fp_out = self._pass(block, inputs, keep=True) if self.options.propagate == "full_precision" else None
                    # GPTAQ: the block as it is now, and its outputs on the full-precision stream
                    # (SignRound needs only the outputs: it runs before anything changes the block)
                    if fp_inputs is not None:
                        fp_block = copy.deepcopy(block) if isinstance(rounding, GPTQ) else block
                        fp_pair = (fp_block, fp_inputs, self._pass(fp_block, fp_inputs, keep=True))
                    for spec in self.recipe.transforms:
                        if isinstance(spec, AWQ):
                            self._awq(block, structure, layers, inputs, spec, f"{prefix}.{i}")
                        elif isinstance(spec, SmoothQuant):
                            self._smooth(block, structure, layers, inputs, spec, f"{prefix}.{i}")
                    results = self._round(block, structure, layers, inputs, fp_pair, f"{prefix}.{i}", fp_out)
                    outputs = fp_out if fp_out is not None else self._pass(block, inputs, keep=True)
                except BaseException:  # this block's own spills; the streams are closed below
                    for store in (fp_out, None if fp_pair is None else fp_pair[2]):
                        if store is not None:
                            store.close()
                    raise
                inputs.hidden.close()
                inputs = _Inputs(outputs, inputs.extras)
                if fp_pair is not None:
                    fp_inputs.hidden.close()
                    fp_inputs = _Inputs(fp_pair[2], inputs.extras)
                    del fp_pair
                for rel, (qt, ref) in results.items():
                    install_quantized(self.model, layers[rel], qt, ref, self.report, self.owners)
                    done.add(layers[rel].name)
                    # the plan must not keep the replaced full-precision module alive (streamed
                    # models would otherwise accumulate every block's weights)
                    self.plan[layers[rel].name] = dataclasses.replace(layers[rel], module=None)
                del results, layers
                self._round_uncalibrated(
                    [p for n, p in self.plan.items() if n.startswith(f"{prefix}.{i}.") and n not in done],
                    "saw no calibration tokens (never called in the traced forward pass)",
                )
                if self.source is not None:
                    self.source.release(i, block)
        finally:
            inputs.hidden.close()
            if fp_inputs is not None:
                fp_inputs.hidden.close()
        outside = [p for n, p in self.plan.items() if not n.startswith(prefix + ".")]
        self._round_uncalibrated(outside, "lies outside the transformer blocks")
        return self.report

    def _round_uncalibrated(self, layers: list[PlannedLayer], why: str) -> None:
        rounding = self.recipe.rounding
        for p in layers:
            if p.scheme is None or not isinstance(p.module, nn.Module) or p.name in {r.name for r in self.report.layers}:
                continue
            w = get_weight(p.module)
            used = rounding if not rounding.needs_calibration else RTN()
            qt = round_weight(w, p.scheme, used)
            install_quantized(self.model, p, qt, w, self.report, self.owners)
            skipped = [t.name for t in self.recipe.transforms] + ([rounding.name] if used is not rounding else [])
            if skipped:
                self.report.notes.append(
                    f"{p.name}: {why}; rounded with {used.name}, without calibration ({'+'.join(skipped)} not applied)"
                )

    # -- transforms ---------------------------------------------------------------------
    def _foldable(self, group: InputGroup, layers: dict[str, PlannedLayer], block_name: str, what: str) -> bool:
        mine = [rel for rel in group.linears if rel in layers and layers[rel].scheme is not None]
        if not mine:
            return False
        if group.fold_into is None:
            self.report.notes.append(
                f"{block_name}: {what} skips {list(group.linears)}: their input comes from no norm or linear "
                "a scale can fold into"
            )
            return False
        if len(mine) != len(group.linears):
            self.report.notes.append(
                f"{block_name}: {what} skips {list(group.linears)}: some of them stay in full precision"
            )
            return False
        return True

    def _fold(self, block: nn.Module, group: InputGroup, s: torch.Tensor) -> None:
        prev = block.get_submodule(group.fold_into)
        if hasattr(prev, "weight") and prev.weight.dim() == 1:
            w, b = awq_m.fold_into_norm(prev.weight.detach().float(), None if getattr(prev, "bias", None) is None else prev.bias.detach().float(), s)
            prev.weight.data = w.to(prev.weight.dtype)
            if b is not None:
                prev.bias.data = b.to(prev.bias.dtype)
        else:
            w, b = awq_m.fold_into_linear_rows(get_weight(prev), None if prev.bias is None else prev.bias.detach().float(), s)
            set_weight(prev, w)
            if b is not None:
                prev.bias.data = b.to(prev.bias.dtype)
        for rel in group.linears:
            mod = block.get_submodule(rel)
            set_weight(mod, awq_m.scale_input_channels(get_weight(mod), s))

    def _subset(self, inputs: _Inputs, max_tokens: int) -> list[int]:
        chosen, tokens = [], 0
        for i in range(len(inputs.hidden)):
            chosen.append(i)
            tokens += inputs.hidden[i].shape[:-1].numel()
            if tokens >= max_tokens:
                break
        return chosen

    def _awq(self, block, structure, layers, inputs, spec: AWQ, block_name: str) -> None:
        groups = [g for g in structure.groups if self._foldable(g, layers, block_name, "AWQ")]
        batches = self._subset(inputs, spec.max_tokens)
        stats = {g: ChannelStats(get_weight(block.get_submodule(g.linears[0])).shape[1]) for g in groups}
        captured: dict[InputGroup, list] = {g: [] for g in groups}
        handles = []
        try:
            for g in groups:
                target = block.get_submodule(g.inspect) if g.inspect else block

                def pre(mod, args, kwargs, g=g):
                    captured[g].append([args, kwargs, None])

                def post(mod, args, kwargs, out, g=g):
                    captured[g][-1][2] = _block_out(out).detach()

                handles.append(target.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(target.register_forward_hook(post, with_kwargs=True))
            self._pass(block, inputs, pre={block.get_submodule(g.linears[0]): stats[g].add_batch for g in groups}, batches=batches)
        finally:
            for h in handles:
                h.remove()
        scales = {}
        for g in groups:
            mods = [block.get_submodule(rel) for rel in g.linears]
            originals = [get_weight(m) for m in mods]
            target = block.get_submodule(g.inspect) if g.inspect else block

            def loss_fn(candidates, mods=mods, target=target, calls=captured[g]):
                for m, w in zip(mods, candidates):
                    set_weight(m, w)
                total, count = 0.0, 0
                for args, kwargs, ref in calls:
                    y = _block_out(target(*args, **kwargs))
                    total += float((y.float() - ref.float()).pow(2).sum())
                    count += ref.numel()
                return total / max(count, 1)

            schemes = [layers[rel].scheme for rel in g.linears]
            try:
                found = awq_m.search_scales(stats[g].abs_mean, originals, schemes[0], spec, loss_fn)
            finally:
                for m, w in zip(mods, originals):
                    set_weight(m, w)
            scales[g] = found.scales
            ratio = "none better than unscaled, kept s=1" if found.ratio is None else f"ratio {found.ratio:.2f}"
            self.report.notes.append(
                f"{block_name}: AWQ {list(g.linears)} -> fold into {g.fold_into}, {ratio}, "
                f"output error {found.loss:.3g} vs {found.loss_at_one:.3g} unscaled"
            )
        del captured
        for g in groups:
            self._fold(block, g, scales[g])
        if spec.clip:
            self._awq_clip(block, structure, layers, inputs, spec, batches)

    def _awq_clip(self, block, structure, layers, inputs, spec, batches) -> None:
        targets = [
            g for g in structure.groups
            if any(rel in layers and layers[rel].scheme is not None and not _no_clip(rel, self.adapter) for rel in g.linears)
        ]
        xs: dict[InputGroup, list[torch.Tensor]] = {g: [] for g in targets}
        self._pass(
            block, inputs,
            pre={block.get_submodule(g.linears[0]): (lambda x, g=g: xs[g].append(x.reshape(-1, x.shape[-1]).detach())) for g in targets},
            batches=batches,
        )
        for g in targets:
            x = torch.cat(xs.pop(g))[: spec.max_tokens].float()
            for rel in g.linears:
                if rel not in layers or layers[rel].scheme is None or _no_clip(rel, self.adapter):
                    continue
                mod = block.get_submodule(rel)
                w = get_weight(mod)
                max_val = awq_m.search_clip(w, x, layers[rel].scheme, spec)
                set_weight(mod, awq_m.apply_clip(w, max_val, layers[rel].scheme))

    def _smooth(self, block, structure, layers, inputs, spec: SmoothQuant, block_name: str) -> None:
        groups = [g for g in structure.groups if self._foldable(g, layers, block_name, "SmoothQuant")]
        stats = {g: ChannelStats(get_weight(block.get_submodule(g.linears[0])).shape[1]) for g in groups}
        self._pass(block, inputs, pre={block.get_submodule(g.linears[0]): stats[g].add_batch for g in groups})
        for g in groups:
            weights = [get_weight(block.get_submodule(rel)) for rel in g.linears]
            self._fold(block, g, smoothquant_scales(stats[g].abs_max, weights, spec.alpha))

    # -- rounding -----------------------------------------------------------------------
    def _paired_pass(self, block, inputs, fp_block, fp_inputs, stage, accs, crosses) -> None:
        """For each batch: the full-precision block on the full-precision stream, then the block
        on the quantized stream, pairing each stage input token for token (H and C for GPTAQ)."""
        firsts = {g: block.get_submodule(g.linears[0]) for g in stage}
        fp_firsts = {g: fp_block.get_submodule(g.linears[0]) for g in stage}
        for i in range(len(inputs.hidden)):
            seen: dict = {}
            with _hooks({fp_firsts[g]: (lambda x, g=g: seen.__setitem__(g, x.detach())) for g in stage}, fp_firsts[stage[-1]]):
                try:
                    fp_inputs.call(fp_block, i)
                except _Stop:
                    pass

            def take(x, g):
                accs[g].add_batch(x)
                crosses[g].add_batch(seen[g], x)

            with _hooks({firsts[g]: (lambda x, g=g: take(x, g)) for g in stage}, firsts[stage[-1]]):
                try:
                    inputs.call(block, i)
                except _Stop:
                    pass

    def _signround(self, block, groups, layers, inputs, spec: SignRound, block_name: str, fp_out=None) -> dict[str, tuple]:
        """Tune the block's planned linears jointly against the block's full-precision outputs on
        the same inputs (``lowbit.methods.signround``), one calibration batch per step.
        ``fp_out``: the targets when the walker already has them: the same outputs
        (``propagate="full_precision"``), or, with ``SignRound(fp_targets=True)`` (AutoRound's
        choice), the full-precision block's outputs on the full-precision stream, so that a block
        also makes up for the error of the blocks before it."""
        rels = [rel for g in groups for rel in g.linears if rel in layers and layers[rel].scheme is not None]
        if not rels:
            return {}
        mods = {rel: block.get_submodule(rel) for rel in rels}
        weights = {rel: get_weight(m) for rel, m in mods.items()}
        schemes = {rel: layers[rel].scheme for rel in rels}
        for rel in rels:
            signround_m.check_scheme(schemes[rel], layers[rel].name)
        own_targets = fp_out is None
        targets = None

        def loss_fn(dq: dict[str, torch.Tensor], b: int) -> torch.Tensor:
            overrides = {f"{rel}.weight": _stored_form(mods[rel], w) for rel, w in dq.items()}
            args, kwargs = inputs.extras[b]
            y = _block_out(torch.func.functional_call(block, overrides, (inputs.hidden[b], *args), kwargs))
            return torch.nn.functional.mse_loss(y.float(), targets[b].float())

        try:
            targets = self._pass(block, inputs, keep=True) if own_targets else fp_out
            starts = None
            if spec.start is not None:
                # GPTQ's result as the start; it leaves the modules holding GPTQ's weights, which
                # does not matter: the loss overrides every planned weight
                found_gptq = self._gptq(block, groups, layers, inputs, spec.start)
                starts = {rel: signround_m.start_from(weights[rel], qt) for rel, (qt, _) in found_gptq.items()}
                del found_gptq
            with _frozen(block):
                found = signround_m.tune(weights, schemes, loss_fn, len(inputs.hidden), spec, starts, block_name)
        finally:
            if own_targets and targets is not None:
                targets.close()
        losses = ", ".join(f"{k} {v / len(inputs.hidden):.4g}" for k, v in found.losses.items())
        start = "gptq" if spec.start is not None else "rtn"
        self.report.notes.append(
            f"{block_name}: signround from {start} kept the {found.chosen!r} parameters (block output MSE: {losses})"
        )
        results = {}
        for rel in rels:
            qt = signround_m.finalize(weights[rel], found.params[rel], schemes[rel], found.starts[rel])
            set_weight(mods[rel], qt.dequantize())
            results[rel] = (qt, weights[rel])
        return results

    def _round(self, block, structure, layers, inputs, fp_pair=None, block_name: str = "block", fp_out=None) -> dict[str, tuple]:
        """Round the block's planned linears; ``fp_pair`` = (full-precision block copy, its input
        stream, its outputs) makes GPTQ fit the full-precision outputs (``GPTQ.fp_targets``)."""
        rounding = self.recipe.rounding
        results: dict[str, tuple] = {}
        groups = [g for g in structure.groups if any(rel in layers and layers[rel].scheme is not None for rel in g.linears)]
        if isinstance(rounding, LLMInt8):
            stats = {g: ChannelStats(get_weight(block.get_submodule(g.linears[0])).shape[1]) for g in groups}
            self._pass(block, inputs, pre={block.get_submodule(g.linears[0]): stats[g].add_batch for g in groups})
            for g in groups:
                for rel in g.linears:
                    if rel in layers and layers[rel].scheme is not None:
                        w = get_weight(block.get_submodule(rel))
                        qt = round_weight(w, layers[rel].scheme, rounding, act_absmax=stats[g].abs_max)
                        results[rel] = (qt, w)
            return results
        if isinstance(rounding, SignRound):
            if rounding.fp_targets:  # AutoRound's targets: the full-precision stream's outputs
                fp_out = fp_pair[2]
            return self._signround(block, groups, layers, inputs, rounding, block_name, fp_out)
        if not isinstance(rounding, GPTQ):
            for g in groups:
                for rel in g.linears:
                    if rel in layers and layers[rel].scheme is not None:
                        w = get_weight(block.get_submodule(rel))
                        results[rel] = (round_weight(w, layers[rel].scheme, rounding), w)
            return results
        return self._gptq(block, groups, layers, inputs, rounding, fp_pair)

    def _gptq(self, block, groups, layers, inputs, rounding: GPTQ, fp_pair=None) -> dict[str, tuple]:
        """GPTQ on the block's planned linears, stage by stage; each linear's module is left
        holding its dequantized result."""
        results: dict[str, tuple] = {}
        stages = [[g] for g in groups] if rounding.true_sequential else [groups]
        # the fp targets are computed here; the rounding itself is plain GPTQ on them
        per_layer = dataclasses.replace(rounding, fp_targets=False)
        for stage in stages:
            firsts = {g: block.get_submodule(g.linears[0]) for g in stage}
            accs = {g: HessianAccumulator(get_weight(firsts[g]).shape[1], token_cap=rounding.token_cap) for g in stage}
            # stop right after the stage's last input is seen (forward order = structure order)
            stop = firsts[stage[-1]]
            crosses = None
            if fp_pair is None:
                self._pass(block, inputs, pre={firsts[g]: accs[g].add_batch for g in stage}, stop=stop)
            else:
                crosses = {g: CrossAccumulator(get_weight(firsts[g]).shape[1]) for g in stage}
                self._paired_pass(block, inputs, fp_pair[0], fp_pair[1], stage, accs, crosses)
            for g in stage:
                hessian = accs.pop(g).hessian
                prepared: dict = {}  # factored once per shared input and column order
                for rel in g.linears:
                    if rel not in layers or layers[rel].scheme is None:
                        continue
                    key = order_group_size(rounding, layers[rel].scheme)
                    if key not in prepared:
                        try:
                            prepared[key] = prepare_hessian(hessian, rounding, layers[rel].scheme)
                        except CalibrationError as e:
                            raise CalibrationError(f"GPTQ on {list(g.linears)} of this block: {e}") from None
                    h = prepared[key]
                    mod = block.get_submodule(rel)
                    w = get_weight(mod)
                    target = w
                    if crosses is not None:  # the full-precision copy's weight pairs with its inputs
                        target = fp_target_weight(get_weight(fp_pair[0].get_submodule(rel)), crosses[g].cross, h)
                    qt = round_weight(target, layers[rel].scheme, per_layer, hessian=h)
                    set_weight(mod, qt.dequantize())
                    results[rel] = (qt, w)
                if crosses is not None:
                    del crosses[g]
                del hessian, prepared
        return results


@contextmanager
def _frozen(block: nn.Module):
    """The block's own parameters take no gradient while SignRound differentiates through it."""
    saved = [(p, p.requires_grad) for p in block.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _copy_inputs(inputs: _Inputs, options: WalkOptions) -> _Inputs:
    """A second store holding the same block inputs (the full-precision stream starts equal)."""
    store = ActivationStore(options.offload, options.offload_dir)
    for t in inputs.hidden:
        store.append(t)
    return _Inputs(store, inputs.extras)


def _no_clip(rel: str, adapter: ModelAdapter) -> bool:
    return rel.rsplit(".", 1)[-1] in adapter.no_clip


def _first_sample(v: Any, batch: int) -> Any:
    """The first sample of a batched call argument (tensors of >= 2 dims whose first dim is the
    batch size, also inside tuples); anything else as it is."""
    if batch > 1 and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == batch:
        return v[:1]
    if isinstance(v, tuple):
        return tuple(_first_sample(x, batch) for x in v)
    return v


def quantize_sequential(
    model: nn.Module,
    recipe: Recipe,
    calibration: CalibrationData,
    *,
    adapter: Optional[ModelAdapter] = None,
    options: WalkOptions = WalkOptions(),
    source: Optional[BlockSource] = None,
    progress: bool = True,
) -> QuantizationReport:
    """Quantize ``model`` in place block by block with calibration statistics."""
    if not isinstance(calibration, CalibrationData):
        raise DataError("calibration must be CalibrationData (see lowbit.calibration)")
    walker = BlockWalker(model, recipe, calibration, adapter=adapter, options=options, source=source, progress=progress)
    return walker.run()
