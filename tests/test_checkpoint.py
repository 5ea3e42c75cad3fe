"""The native checkpoint (``lowbit.io.checkpoint``) through real files.

What is pinned here:

* save -> load is lossless: the loaded model's logits equal the in-memory
  quantized model's logits *exactly* (``torch.equal``), under kernel "auto"
  and under ``use_kernel("reference")``; every ``QuantLinear`` buffer and every
  full-precision tensor comes back bit-identical; tied embedding / lm_head are
  one ``Parameter`` again; re-saving a loaded model gives the same bytes.
* the manifest records the recipe, each quantized layer's scheme, the layers
  kept in full precision (with reasons), the lowbit version and the shape and
  dtype of every tensor.
* the compressed-tensors invariant through a file:
  ``dequantize(unpack(qweight from file)) == fake_quantize(original weight)``.
* GPT-2 ``Conv1D`` models and arbitrary ``nn.Module`` s (with a skeleton).
* every kind of bad file raises one specific ``CheckpointError`` subclass,
  never a raw torch / safetensors / json / KeyError traceback.
* saves are atomic: a failed save leaves the previous file byte-identical and
  no temporary files behind.

All models are tiny and built from configs in this file (no downloads).
"""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn
from tiny_models import LLAMA_LINEARS, LLAMA_NORMS, tiny_gpt2, tiny_llama
from transformers import GPT2LMHeadModel, LlamaForCausalLM

import lowbit
import lowbit.io
import lowbit.io.checkpoint as ckpt
from lowbit import Recipe, Rule, formats, packing
from lowbit.errors import CheckpointError, ManifestError, TensorMismatchError, TruncatedCheckpointError
from lowbit.io.digest import bytes_digest, tensor_digest
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme

# ----------------------------------------------------------------------------- helpers

def input_ids(batch: int = 2, length: int = 12, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def header_and_data(path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path, header: dict, data: bytes) -> Path:
    h = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + data)
    return Path(path)


W4G32 = QuantScheme(bits=4, group_size=32)
W4G64A = QuantScheme(bits=4, group_size=64, symmetric=False)
W8C = QuantScheme(bits=8, granularity="channel")
W3G32A = QuantScheme(bits=3, group_size=32, symmetric=False)
W2G32A = QuantScheme(bits=2, group_size=32, symmetric=False)

MIXED = Recipe(
    rules=(
        Rule(r"lm_head", None),
        Rule(r"model\.layers\.1\.mlp\.down_proj", None),  # an explicit skip rule
        Rule(r"model\.layers\.0\.self_attn\.[qk]_proj", QuantScheme(bits=8, granularity="channel", scale_dtype="bfloat16")),
        Rule(r".*\.self_attn\..*", QuantScheme(bits=4, group_size=64, symmetric=False, scale_dtype="float16")),
        Rule(r".*\.mlp\.(gate|up)_proj", QuantScheme(bits=2, group_size=32, symmetric=False)),
        Rule(r".*", QuantScheme(bits=3, group_size=32, symmetric=True)),
    )
)

RECIPES = {
    "w4g32-sym": Recipe.uniform(W4G32),
    "w4g64-asym": Recipe.uniform(W4G64A),
    "w8-channel": Recipe.uniform(W8C),
    "w3g32-asym": Recipe.uniform(W3G32A),
    "w2g32-asym": Recipe.uniform(W2G32A),
    "w4-tensor-sym": Recipe.uniform(QuantScheme(bits=4, granularity="tensor")),
    "w4g32-sym-f16": Recipe.uniform(QuantScheme(bits=4, group_size=32, scale_dtype="float16")),
    "w4g32-asym-bf16": Recipe.uniform(QuantScheme(bits=4, group_size=32, symmetric=False, scale_dtype="bfloat16")),
    "w8-channel-bf16": Recipe.uniform(QuantScheme(bits=8, granularity="channel", scale_dtype="bfloat16")),
    "w5g32-asym-f16": Recipe.uniform(QuantScheme(bits=5, group_size=32, symmetric=False, scale_dtype="float16")),
    "mixed": MIXED,
}


class RoundTrip:
    """One recipe: the fp32 model, the quantized model in memory, its file, the loaded model."""

    def __init__(self, recipe: Recipe, directory: Path):
        self.recipe = recipe
        self.fp = tiny_llama(0)
        self.fp_state = {k: v.clone() for k, v in self.fp.state_dict().items()}
        self.model = copy.deepcopy(self.fp)
        self.report = lowbit.quantize(self.model, recipe, progress=False)
        self.path = directory / "model.lowbit.safetensors"
        lowbit.save(self.model, self.path)
        self.loaded = lowbit.load(self.path)
        self.ids = input_ids()


@pytest.fixture(scope="module", params=list(RECIPES))
def rt(request, tmp_path_factory) -> RoundTrip:
    return RoundTrip(RECIPES[request.param], tmp_path_factory.mktemp(request.param))


# ----------------------------------------------------------------------------- Llama round trip


def test_loaded_logits_equal_in_memory_logits_exactly(rt):
    a, b = logits(rt.model, rt.ids), logits(rt.loaded, rt.ids)
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, b)
    # the same kernels were chosen for the same layers
    orig, new = quant_layers(rt.model), quant_layers(rt.loaded)
    assert {n: m.kernel_name for n, m in orig.items()} == {n: m.kernel_name for n, m in new.items()}


def test_loaded_logits_equal_under_reference_kernel(rt):
    with lowbit.use_kernel("reference"):
        a, b = logits(rt.model, rt.ids), logits(rt.loaded, rt.ids)
        assert all(m.kernel_name == "reference" for m in quant_layers(rt.loaded).values())
    assert torch.equal(a, b)


def test_loaded_buffers_equal_originals(rt):
    orig, new = quant_layers(rt.model), quant_layers(rt.loaded)
    assert set(orig) == set(new) and orig
    for name, a in orig.items():
        b = new[name]
        assert b.scheme == a.scheme, name
        assert (b.in_features, b.out_features) == (a.in_features, a.out_features)
        for buf in ("qweight", "scale", "zero", "bias"):
            x, y = getattr(a, buf), getattr(b, buf)
            if x is None:
                assert y is None, f"{name}.{buf}"
                continue
            assert y.dtype == x.dtype and y.device.type == "cpu", f"{name}.{buf}"
            assert torch.equal(x, y), f"{name}.{buf}"
    # full-precision tensors (embedding, norms, skipped linears) too; nothing left on meta
    sa, sb = rt.model.state_dict(), rt.loaded.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sb[k].device.type == "cpu" and sb[k].dtype == sa[k].dtype and torch.equal(sa[k], sb[k]), k


def test_tied_embedding_and_lm_head_are_one_parameter(rt):
    assert rt.model.lm_head.weight is rt.model.model.embed_tokens.weight  # lm_head is skipped by every recipe
    assert isinstance(rt.loaded.lm_head.weight, nn.Parameter)
    assert rt.loaded.lm_head.weight is rt.loaded.model.embed_tokens.weight
    assert torch.equal(rt.loaded.lm_head.weight, rt.fp_state["lm_head.weight"])
    # stored once, named as an alias
    manifest = lowbit.io.read_manifest(rt.path)
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in load_file(str(rt.path))


def test_manifest_records_everything(rt):
    m = lowbit.io.read_manifest(rt.path)
    assert m["format_version"] == 2
    assert m["lowbit_version"] == lowbit.__version__
    assert m["recipe"] == rt.recipe.to_dict()
    assert Recipe.from_dict(m["recipe"]) == rt.recipe
    assert m["model"]["kind"] == "transformers"
    assert m["model"]["architecture"] == "LlamaForCausalLM"
    assert m["model"]["config"]["hidden_size"] == 128

    # every quantized layer, with the scheme its rule gives it
    quantized = [n for n in LLAMA_LINEARS if rt.recipe.scheme_for(n, 256 if "down_proj" in n else 128) is not None]
    assert sorted(m["layers"]) == sorted(quantized) == sorted(quant_layers(rt.model))
    for name, layer in m["layers"].items():
        in_f = 256 if "down_proj" in name else 128
        assert layer["scheme"] == rt.recipe.scheme_for(name, in_f).to_dict(), name
        assert QuantScheme.from_dict(layer["scheme"]) == quant_layers(rt.model)[name].scheme
        assert layer["layout"] == packing.NATIVE_LAYOUT
        assert layer["in_features"] == in_f
        assert layer["out_features"] == {"k_proj": 64, "v_proj": 64, "gate_proj": 256, "up_proj": 256}.get(
            name.rsplit(".", 1)[1], 128
        )
        assert layer["bias"] is False
        assert layer["source"] == "Linear"

    # skipped layers with reasons
    skipped = {s["name"]: s["reason"] for s in m["skipped"]}
    assert "embedding" in skipped["model.embed_tokens"]
    assert "rule 0" in skipped["lm_head"] and "full precision" in skipped["lm_head"]
    for norm in LLAMA_NORMS:
        assert skipped[norm] == "LlamaRMSNorm: kept in full precision (not a linear layer)"
    skipped_linears = sorted(n for n in skipped if n not in ("model.embed_tokens", "lm_head", *LLAMA_NORMS))
    assert skipped_linears == sorted(set(LLAMA_LINEARS) - set(quantized))
    if rt.recipe is MIXED:
        assert skipped_linears == ["model.layers.1.mlp.down_proj"]
        assert "rule 1" in skipped["model.layers.1.mlp.down_proj"]
    assert m["notes"] == []

    # expected shape and dtype of every stored tensor, and nothing else
    stored = load_file(str(rt.path))
    assert set(m["tensors"]) == set(stored)
    dt = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}
    for k, t in stored.items():
        assert m["tensors"][k] == {"shape": list(t.shape), "dtype": dt[t.dtype], "digest": tensor_digest(t)}, k
    # every tensor of the model is either stored or an alias of a stored one
    assert set(rt.model.state_dict()) == set(stored) | set(m["aliases"])

    # the loaded model carries the report and the manifest
    assert rt.loaded.lowbit_manifest == m
    assert rt.loaded.lowbit_report.recipe == rt.recipe
    assert [(s.name, s.reason) for s in rt.loaded.lowbit_report.skipped] == list(skipped.items())


def test_resaving_a_loaded_model_gives_the_same_checkpoint(rt, tmp_path):
    # (not compared byte for byte: safetensors writes its metadata map in hash order)
    again = tmp_path / "again.safetensors"
    lowbit.save(rt.loaded, again)
    assert lowbit.io.read_manifest(again) == lowbit.io.read_manifest(rt.path)
    a, b = load_file(str(again)), load_file(str(rt.path))
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert header_and_data(again)[1] == header_and_data(rt.path)[1]  # the data section is identical


def test_quantized_tied_lm_head_round_trip(tmp_path):
    """Quantizing the tied lm_head unties it (the embedding keeps full precision)."""
    model = tiny_llama(1)
    emb = model.model.embed_tokens.weight.detach().clone()
    lowbit.quantize(model, Recipe(rules=(Rule(".*", W4G32),)), progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    path = tmp_path / "m.safetensors"
    lowbit.save(model, path)
    assert lowbit.io.read_manifest(path)["aliases"] == {}
    loaded = lowbit.load(path)
    assert isinstance(loaded.lm_head, QuantLinear)
    assert loaded.config.tie_word_embeddings is False
    assert torch.equal(loaded.model.embed_tokens.weight, emb)
    ids = input_ids()
    assert torch.equal(logits(model, ids), logits(loaded, ids))


# ----------------------------------------------------------------------------- the invariant, through a file

SCHEMES = st.builds(
    lambda bits, symmetric, gran, sdt: QuantScheme(
        bits=bits,
        symmetric=symmetric,
        granularity="group" if gran.startswith("g") else gran,
        group_size=int(gran[1:]) if gran.startswith("g") else None,
        scale_dtype=sdt,
    ),
    bits=st.sampled_from([2, 3, 4, 5, 6, 8]),
    symmetric=st.booleans(),
    gran=st.sampled_from(["g16", "g32", "g64", "channel", "tensor"]),
    sdt=st.sampled_from(["float32", "float16", "bfloat16"]),
)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=SCHEMES, seed=st.integers(0, 1000))
def test_file_codes_dequantize_to_fake_quantize_of_original(scheme, seed, tmp_path):
    model = tiny_llama(seed)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in LLAMA_LINEARS}
    lm_head = model.lm_head.weight.detach().clone()
    lowbit.quantize(model, scheme, progress=False)
    path = tmp_path / f"inv-{seed}.safetensors"
    lowbit.save(model, path)
    stored = load_file(str(path))
    manifest = lowbit.io.read_manifest(path)
    for name, w in originals.items():
        assert QuantScheme.from_dict(manifest["layers"][name]["scheme"]) == scheme
        codes = packing.unpack(stored[f"{name}.qweight"], scheme.bits, w.shape[1])
        qp = formats.QParams(stored[f"{name}.scale"], stored.get(f"{name}.zero"))
        assert (qp.zero is None) == scheme.symmetric
        got = formats.dequantize(codes, qp, scheme)
        want = formats.fake_quantize(w, scheme)
        assert torch.equal(got, want), name
    assert torch.equal(stored["model.embed_tokens.weight"], lm_head)


def test_gpt2_conv1d_round_trip(tmp_path):
    model = tiny_gpt2()
    conv = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    assert len(conv) == 8
    lowbit.quantize(model, W4G64A, progress=False)
    path = tmp_path / "gpt2.safetensors"
    lowbit.save(model, path)
    loaded = lowbit.load(path)
    assert type(loaded) is GPT2LMHeadModel
    ids = input_ids()
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    with lowbit.use_kernel("reference"):
        assert torch.equal(logits(model, ids), logits(loaded, ids))
    m = lowbit.io.read_manifest(path)
    assert sorted(m["layers"]) == sorted(conv)
    stored = load_file(str(path))
    for name, w in conv.items():  # Conv1D stores [in, out]: the layer holds the transpose
        assert m["layers"][name]["source"] == "Conv1D"
        assert m["layers"][name]["bias"] is True
        assert (m["layers"][name]["in_features"], m["layers"][name]["out_features"]) == tuple(w.shape)
        assert torch.equal(loaded.get_submodule(name).dequantize_weight(), formats.fake_quantize(w.t(), W4G64A))
        assert torch.equal(stored[f"{name}.bias"], model.get_submodule(name).bias)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


# ----------------------------------------------------------------------------- custom modules


class TinyMLP(nn.Module):
    def __init__(self, hidden: int = 128, drop_down: bool = False):
        super().__init__()
        self.up = nn.Linear(64, hidden)
        self.act = nn.GELU()
        if not drop_down:
            self.down = nn.Linear(hidden, 64, bias=False)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.norm(x + self.down(self.act(self.up(x)))))


MLP_RECIPE = Recipe(rules=(Rule("head", None), Rule("up", W4G32), Rule(".*", W3G32A)))


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    torch.manual_seed(5)
    model = TinyMLP().eval()
    lowbit.quantize(model, MLP_RECIPE, progress=False)
    path = tmp_path_factory.mktemp("mlp") / "mlp.safetensors"
    lowbit.save(model, path)
    return model, path


@pytest.mark.parametrize("on_meta", [False, True])
def test_custom_module_round_trip_with_skeleton(mlp_file, on_meta):
    model, path = mlp_file
    if on_meta:
        with torch.device("meta"):
            skeleton = TinyMLP()
    else:
        torch.manual_seed(99)  # different random weights: all must be overwritten
        skeleton = TinyMLP()
    loaded = lowbit.load(path, model=skeleton)
    assert loaded is skeleton and not loaded.training
    assert sorted(quant_layers(loaded)) == ["down", "up"]
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        with lowbit.use_kernel("reference"):
            assert torch.equal(model(x), loaded(x))
    m = lowbit.io.read_manifest(path)
    assert m["model"] == {"kind": "module", "class": f"{__name__}.TinyMLP"}
    assert m["layers"]["up"]["bias"] is True and m["layers"]["down"]["bias"] is False
    assert {s["name"] for s in m["skipped"]} == {"head", "norm"}


def test_custom_module_without_skeleton_says_to_pass_one(mlp_file):
    _, path = mlp_file
    with pytest.raises(CheckpointError, match=r"custom module .*TinyMLP.*lowbit\.load\(path, model="):
        lowbit.load(path)


def test_skeleton_lacking_a_layer(mlp_file):
    _, path = mlp_file
    with pytest.raises(TensorMismatchError, match="'down', which the model lacks"):
        lowbit.load(path, model=TinyMLP(drop_down=True))


def test_skeleton_with_a_non_linear_in_place_of_a_layer(mlp_file):
    _, path = mlp_file
    skeleton = TinyMLP()
    skeleton.down = nn.Identity()
    with pytest.raises(TensorMismatchError, match="'down' is a Identity in the model, not a linear layer"):
        lowbit.load(path, model=skeleton)


def test_skeleton_with_a_differently_sized_layer(mlp_file):
    _, path = mlp_file
    skeleton = TinyMLP(hidden=96)  # up: 64 -> 96, down: 96 -> 64
    with pytest.raises(TensorMismatchError, match=r"layer 'up' is \[out, in\] = \[96, 64\] in the model but \[128, 64\]"):
        lowbit.load(path, model=skeleton)


def test_skeleton_with_wrong_full_precision_shape(mlp_file):
    _, path = mlp_file
    skeleton = TinyMLP()
    skeleton.norm = nn.LayerNorm(32)
    with pytest.raises(TensorMismatchError, match=r"'norm\.(weight|bias)' is \(64,\) in the file, the model expects \(32,\)"):
        lowbit.load(path, model=skeleton)


# ----------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid W4 g32 asym Llama checkpoint: (path, bytes, header, data, manifest)."""
    model = tiny_llama(2)
    lowbit.quantize(model, QuantScheme(bits=4, group_size=32, symmetric=False), progress=False)
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    lowbit.save(model, path)
    header, data = header_and_data(path)
    manifest = json.loads(header["__metadata__"]["lowbit_manifest"])
    return path, path.read_bytes(), header, data, manifest


def expect(err: type, path, match: str):
    """Both read_manifest and load raise exactly ``err`` (a CheckpointError) naming the file."""
    for fn in (lowbit.io.read_manifest, lowbit.load):
        with pytest.raises(err, match=match) as info:
            fn(path)
        assert type(info.value) is err
        assert str(path) in str(info.value)


def with_manifest(good, tmp_path, edit) -> Path:
    """The good file with its manifest edited and its manifest digest recomputed, so that the
    checks of the manifest's meaning (not the digest check) must catch the edit."""
    _, _, header, data, manifest = good
    header, manifest = copy.deepcopy(header), copy.deepcopy(manifest)
    edit(manifest)
    text = json.dumps(manifest)
    header["__metadata__"]["lowbit_manifest"] = text
    header["__metadata__"]["lowbit_manifest_digest"] = bytes_digest(text.encode())
    return write_raw(tmp_path / "edited.safetensors", header, data)


def test_good_file_loads(good):
    assert isinstance(lowbit.load(good[0]), LlamaForCausalLM)


def test_truncated_files(good, tmp_path):
    path, raw, header, data, _ = good
    n = len(raw) - len(data) - 8
    cuts = {
        "empty": 0,
        "inside the length": 5,
        "just after the length": 8,
        "inside the header": 8 + n // 2,
        "header without data": 8 + n,
        "inside the data": 8 + n + len(data) // 2,
        "last byte missing": len(raw) - 1,
    }
    for where, cut in cuts.items():
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(raw[:cut])
        match = "too short" if cut < 8 else "truncated"
        expect(TruncatedCheckpointError, p, match)


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frac=st.floats(0, 1, exclude_max=True))
def test_truncated_anywhere(good, tmp_path, frac):
    raw = good[1]
    p = tmp_path / "cut.safetensors"
    p.write_bytes(raw[: int(frac * len(raw))])
    with pytest.raises(TruncatedCheckpointError):
        lowbit.io.read_manifest(p)


def test_random_bytes(tmp_path):
    g = torch.Generator().manual_seed(7)
    p = tmp_path / "random.safetensors"
    p.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    expect(TruncatedCheckpointError, p, "header length .* does not fit")
    # a plausible length prefix followed by garbage
    garbage = bytes(torch.randint(128, 256, (200,), generator=g, dtype=torch.uint8).tolist())
    p.write_bytes(struct.pack("<Q", 100) + garbage)
    expect(ManifestError, p, "header is not valid JSON")
    p.write_bytes(struct.pack("<Q", 2) + b"[]")
    expect(ManifestError, p, "not a JSON object")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        lowbit.load(tmp_path / "nope.safetensors")


def test_plain_safetensors_without_lowbit_metadata(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(p))
    expect(ManifestError, p, "not a lowbit checkpoint .*lowbit.save")
    save_file({"w": torch.zeros(4, 4)}, str(p), metadata={"format": "pt"})
    expect(ManifestError, p, "not a lowbit checkpoint")


def test_wrong_format_version(good, tmp_path):
    p = with_manifest(good, tmp_path, lambda m: m.update(format_version=3))
    expect(ManifestError, p, "format_version 3; .* reads versions 1, 2 .*upgrade lowbit")
    p = with_manifest(good, tmp_path, lambda m: m.pop("format_version"))
    expect(ManifestError, p, "format_version None")


def test_corrupted_manifest_json(good, tmp_path):
    _, _, header, data, _ = good
    header = copy.deepcopy(header)
    header["__metadata__"]["lowbit_manifest"] = header["__metadata__"]["lowbit_manifest"][:-7]
    p = write_raw(tmp_path / "m.safetensors", header, data)
    expect(ManifestError, p, "the lowbit manifest is not valid JSON")


@pytest.mark.parametrize(
    "field,edit,match",
    [
        ("layers", lambda m: m.pop("layers"), "lacks the 'layers' field"),
        ("layers", lambda m: m.update(layers=[]), "'layers' must map layer names to objects"),
        ("tensors", lambda m: m["tensors"]["lm_head.weight" if False else "model.norm.weight"].pop("shape"), "'tensors' must map"),
        ("aliases", lambda m: m.update(aliases=["x"]), "'aliases' must map"),
        ("model", lambda m: m.update(model="llama"), "'model' must be an object"),
        ("model", lambda m: m["model"].pop("config"), "needs a string 'architecture' and an object 'config'"),
        ("skipped", lambda m: m.update(skipped=[{"layer": "x"}]), "'skipped' must be a list"),
        ("recipe", lambda m: m.update(recipe={"version": 1}), "invalid 'recipe'"),
        ("scheme", lambda m: m["layers"]["model.layers.0.mlp.up_proj"]["scheme"].update(bits=9), "invalid scheme entry"),
        ("layer", lambda m: m["layers"]["model.layers.0.mlp.up_proj"].pop("out_features"), "invalid scheme entry"),
    ],
)
def test_structurally_malformed_manifest(good, tmp_path, field, edit, match):
    expect(ManifestError, with_manifest(good, tmp_path, edit), match)


def test_header_metadata_not_strings(good, tmp_path):
    _, _, header, data, manifest = good
    header = copy.deepcopy(header)
    header["__metadata__"]["lowbit_manifest"] = manifest  # an object, not a JSON string
    expect(ManifestError, write_raw(tmp_path / "m.safetensors", header, data), "must map strings to strings")


def _retyped_file(good, tmp_path, name, new_tensor) -> Path:
    """The good file with tensor ``name`` replaced by hand (manifest unchanged)."""
    path, _, header, _, _ = good
    tensors = load_file(str(path))
    tensors[name] = new_tensor(tensors[name])
    p = tmp_path / "retyped.safetensors"
    save_file(tensors, str(p), metadata=header["__metadata__"])
    return p


def test_tensor_dtype_differs_from_manifest(good, tmp_path):
    name = "model.layers.0.self_attn.q_proj.scale"
    p = _retyped_file(good, tmp_path, name, lambda t: t.half())
    expect(TensorMismatchError, p, rf"'{name}' is F16 \[128, 4\] in the file but the manifest expects F32 \[128, 4\]")


def test_tensor_shape_differs_from_manifest(good, tmp_path):
    name = "model.layers.1.mlp.down_proj.qweight"
    p = _retyped_file(good, tmp_path, name, lambda t: t[:-1])
    expect(TensorMismatchError, p, rf"'{name}' is U8 \[127, 128\] in the file but the manifest expects U8 \[128, 128\]")


def test_full_precision_tensor_dtype_differs(good, tmp_path):
    p = _retyped_file(good, tmp_path, "model.norm.weight", lambda t: t.bfloat16())
    expect(TensorMismatchError, p, "'model.norm.weight' is BF16")


def test_tensor_missing_or_extra(good, tmp_path):
    path, _, header, _, _ = good
    tensors = load_file(str(path))
    tensors["extra"] = torch.zeros(2)
    p = tmp_path / "extra.safetensors"
    save_file(tensors, str(p), metadata=header["__metadata__"])
    expect(TensorMismatchError, p, r"present but unlisted: \['extra'\]")
    tensors.pop("extra")
    tensors.pop("model.layers.0.mlp.up_proj.zero")
    save_file(tensors, str(p), metadata=header["__metadata__"])
    expect(TensorMismatchError, p, r"absent: \['model.layers.0.mlp.up_proj.zero'\]")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"bits": 3}, r"'model.layers.0.mlp.up_proj.qweight' is U8 \[256, 64\], but layer .* needs U8 \[256, 48\]"),
        ({"bits": 8}, r"needs U8 \[256, 128\]"),
        ({"group_size": 64}, r"'model.layers.0.mlp.up_proj.scale' is F32 \[256, 4\], but layer .* needs F32 \[256, 2\]"),
        ({"scale_dtype": "float16"}, r"scale' is F32 \[256, 4\], but layer .* needs F16"),
        ({"symmetric": True}, r"does not use tensor 'model.layers.0.mlp.up_proj.zero', but the file holds it"),
        ({"granularity": "channel", "group_size": None}, r"needs F32 \[256, 1\]"),
    ],
)
def test_layer_scheme_does_not_match_its_tensors(good, tmp_path, change, match):
    def edit(m):
        m["layers"]["model.layers.0.mlp.up_proj"]["scheme"].update(change)

    expect(TensorMismatchError, with_manifest(good, tmp_path, edit), match)


def test_layer_bias_flag_does_not_match(good, tmp_path):
    def edit(m):
        m["layers"]["model.layers.0.mlp.up_proj"]["bias"] = True

    expect(TensorMismatchError, with_manifest(good, tmp_path, edit), "needs tensor 'model.layers.0.mlp.up_proj.bias'")


def test_alias_to_missing_tensor(good, tmp_path):
    expect(
        TensorMismatchError,
        with_manifest(good, tmp_path, lambda m: m.update(aliases={"lm_head.weight": "nope"})),
        "alias 'lm_head.weight' points at 'nope'",
    )


def test_trailing_bytes_and_overlapping_offsets(good, tmp_path):
    path, raw, header, data, _ = good
    p = tmp_path / "trailing.safetensors"
    p.write_bytes(raw + b"\0" * 16)
    expect(ManifestError, p, "trailing bytes")

    h = copy.deepcopy(header)  # two same-sized tensors pointing at the same bytes
    h["model.layers.0.self_attn.o_proj.qweight"]["data_offsets"] = h["model.layers.0.self_attn.q_proj.qweight"]["data_offsets"]
    expect(ManifestError, write_raw(tmp_path / "overlap.safetensors", h, data), "overlapping or gapped")

    h = copy.deepcopy(header)
    h["model.norm.weight"]["data_offsets"] = ["0", "512"]
    expect(ManifestError, write_raw(tmp_path / "str.safetensors", h, data), "'model.norm.weight' is malformed")

    h = copy.deepcopy(header)
    h["model.norm.weight"]["shape"] = [-128]
    expect(ManifestError, write_raw(tmp_path / "neg.safetensors", h, data), "'model.norm.weight' is malformed")


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_header_bytes_never_leak_raw_errors(good, tmp_path, data):
    """Flipping bytes of the header either still loads or raises a CheckpointError."""
    _, raw, _, body, _ = good
    n = len(raw) - len(body)
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, n - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(bytes(buf))
    try:
        lowbit.load(p)
    except CheckpointError:
        pass


# ----------------------------------------------------------------------------- atomic save


def _quantized_llama(seed: int, scheme: QuantScheme = W4G32) -> LlamaForCausalLM:
    model = tiny_llama(seed)
    lowbit.quantize(model, scheme, progress=False)
    return model


@pytest.mark.parametrize("exc", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_save_leaves_previous_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "m.safetensors"
    first = _quantized_llama(0)
    lowbit.save(first, path)
    before = path.read_bytes()

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 1000)  # a partial write ...
        raise exc  # ... then the disk fills up (or the user hits Ctrl-C)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(type(exc)):
        lowbit.save(_quantized_llama(1, W8C), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]
    monkeypatch.undo()
    ids = input_ids()
    assert torch.equal(logits(lowbit.load(path), ids), logits(first, ids))


def test_save_over_existing_replaces_it(tmp_path):
    path = tmp_path / "m.safetensors"
    lowbit.save(_quantized_llama(0), path)
    second = _quantized_llama(1, W8C)
    lowbit.save(second, path)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    loaded = lowbit.load(path)
    assert QuantScheme.from_dict(loaded.lowbit_manifest["layers"]["model.layers.0.mlp.up_proj"]["scheme"]) == W8C
    ids = input_ids()
    assert torch.equal(logits(loaded, ids), logits(second, ids))


def test_saving_an_unquantized_model_raises_and_writes_nothing(tmp_path):
    path = tmp_path / "sub" / "m.safetensors"
    with pytest.raises(CheckpointError, match=r"no QuantLinear layers; call lowbit.quantize\(model, recipe\)"):
        lowbit.save(tiny_llama(0), path)
    assert not path.exists()
    assert list(tmp_path.rglob("*")) in ([], [tmp_path / "sub"])
    assert not any(tmp_path.rglob("*.tmp"))


def test_saving_a_model_with_meta_tensors_raises(tmp_path):
    model = _quantized_llama(0)
    model.model.norm.weight = nn.Parameter(torch.empty(128, device="meta"))
    with pytest.raises(CheckpointError, match="'model.norm.weight' is on the meta device"):
        lowbit.save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
