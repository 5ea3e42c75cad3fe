"""Loading never accepts a bad lowbit checkpoint (``lowbit.io.checkpoint_validation``).

Pinned here, one test per check (each fails without its check):

* integrity (``verify=True``, the default): every tensor and the manifest carry a SHA-256
  digest; a flipped bit anywhere in the data, or any edit of the manifest, is an
  ``IntegrityError``; files written before digests existed (format_version 1) are refused with
  a message saying how to proceed, load with ``verify=False`` and save again as version 2;
* meaning (with ``verify=False`` too, and on files whose digests were recomputed after the
  edit): zero points inside the code range, finite scales (positive where lowbit chose them),
  valid codes (ternary, fp8), zero padding bits, sorted in-range outlier columns, known
  layouts, aliases that never shadow a stored tensor, bounded dimensions (no loop over a
  corrupted ``in_features``), the transformers config (types, dimensions, layer count, shapes
  via a meta-device build) before any skeleton is built, bounded JSON (depth, integer size);
* every file lowbit itself writes loads, edge cases included (all-zero groups, scales that
  underflow float16, double quantization, float zero points, imported layers' negative scales).

Every failure is one line, of a ``CheckpointError`` subclass, naming the file.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import random_ids, tiny_gpt2, tiny_llama
from torch import nn

import lowbit
from lowbit import HQQ, LLMInt8, Recipe
from lowbit.errors import CheckpointError, IntegrityError, ManifestError, TensorMismatchError
from lowbit.io import bounded_json
from lowbit.io.checkpoint import load_checkpoint, read_manifest
from lowbit.io.checkpoint_validation import MANIFEST_DIGEST_KEY
from lowbit.io.digest import bytes_digest, is_digest, tensor_digest
from lowbit.methods.llm_int8 import llm_int8
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme, valid_group_sizes

W4 = QuantScheme(bits=4, group_size=32)
W4A = QuantScheme(bits=4, group_size=32, symmetric=False)
LAYER = "model.layers.0.mlp.up_proj"


# ----------------------------------------------------------------------------- helpers
def quantized_llama(scheme=W4, seed: int = 0, **kw):
    model = tiny_llama(seed)
    lowbit.quantize(model, scheme, progress=False, **kw)
    return model


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(random_ids(1, 8, seed=3)).logits


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (path, logits) of a few saved tiny Llamas."""
    d = tmp_path_factory.mktemp("files")
    out = {}
    for name, scheme in {"w4": W4, "w4a": W4A, "nf4": QuantScheme(format="nf4")}.items():
        model = quantized_llama(scheme)
        lowbit.save(model, d / f"{name}.safetensors")
        out[name] = (d / f"{name}.safetensors", logits(model))
    return out


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def rewrite(src, dst, *, tensors=None, manifest=None, resign: bool = True) -> Path:
    """``src`` with its tensors (``tensors(dict)``) and manifest (``manifest(dict)``) edited in
    place; ``resign`` recomputes every digest, so that only the checks of meaning can object."""
    meta = metadata(src)
    state = load_file(str(src))
    m = json.loads(meta["lowbit_manifest"])
    if tensors is not None:
        tensors(state)
    if manifest is not None:
        manifest(m)
    if resign:
        for k, v in state.items():
            if k in m.get("tensors", {}) and isinstance(m["tensors"][k], dict):
                m["tensors"][k]["digest"] = tensor_digest(v)
    text = json.dumps(m)
    meta["lowbit_manifest"] = text
    if resign:
        meta[MANIFEST_DIGEST_KEY] = bytes_digest(text.encode())
    save_file(state, str(dst), metadata=meta)
    return Path(dst)


def refused(path, err: type, match: str, *, skeleton=None, modes=(True, False)) -> None:
    """Loading raises exactly ``err`` (one line naming the file) with and without ``verify``."""
    for verify in modes:
        with pytest.raises(err, match=match) as info:
            load_checkpoint(path, None if skeleton is None else skeleton(), verify=verify)
        assert type(info.value) is err, (verify, info.value)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def header_and_data(path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path, header: dict, data: bytes, header_text: str | None = None) -> Path:
    h = (header_text if header_text is not None else json.dumps(header)).encode()
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + data)
    return Path(path)


# ----------------------------------------------------------------------------- integrity
def test_save_records_a_digest_per_tensor_and_for_the_manifest(files):
    path = files["w4"][0]
    meta = metadata(path)
    assert meta[MANIFEST_DIGEST_KEY] == bytes_digest(meta["lowbit_manifest"].encode())
    m = read_manifest(path)
    assert m["format_version"] == 2
    stored = load_file(str(path))
    assert all(m["tensors"][k]["digest"] == tensor_digest(v) and is_digest(m["tensors"][k]["digest"]) for k, v in stored.items())


@pytest.mark.parametrize(
    "tensor",
    [f"{LAYER}.qweight", f"{LAYER}.scale", f"{LAYER}.zero", "model.norm.weight", "model.embed_tokens.weight"],
)
def test_a_flipped_data_bit_is_an_integrity_error(files, tmp_path, tensor):
    header, data = header_and_data(files["w4a"][0])
    start, end = header[tensor]["data_offsets"]
    buf = bytearray(data)
    buf[(start + end) // 2] ^= 0x01  # the lowest bit: a finite, valid value
    bad = write_raw(tmp_path / "flip.safetensors", header, bytes(buf))
    with pytest.raises(IntegrityError, match=rf"tensor '{tensor}' does not match the digest .* verify=False"):
        load_checkpoint(bad)
    # the opt-out is explicit: the data is still valid, so an unverified load goes through
    assert torch.isfinite(logits(load_checkpoint(bad, verify=False))).all()


def test_lowbit_load_passes_verify_through(files, tmp_path):
    path, ref = files["w4"]
    header, data = header_and_data(path)
    start, end = header[f"{LAYER}.scale"]["data_offsets"]
    buf = bytearray(data)
    buf[(start + end) // 2] ^= 0x01
    bad = write_raw(tmp_path / "flip.safetensors", header, bytes(buf))
    with pytest.raises(IntegrityError, match=rf"'{LAYER}.scale' does not match the digest .* verify=False"):
        lowbit.load(bad)
    with pytest.raises(IntegrityError):
        lowbit.load(bad, verify=True)
    model = lowbit.load(bad, verify=False)
    assert torch.isfinite(logits(model)).all()
    assert torch.equal(logits(lowbit.load(path, verify=False)), ref)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["layers"][LAYER]["scheme"].update(format="nf4"),  # same shapes: only the digest sees it
        lambda m: m["model"]["config"].update(rms_norm_eps=1e-3),  # a valid, different config
        lambda m: m["notes"].append("harmless"),
    ],
    ids=["format-int-to-nf4", "rms-norm-eps", "notes"],
)
def test_any_manifest_edit_is_an_integrity_error(files, tmp_path, edit):
    bad = rewrite(files["w4"][0], tmp_path / "edited.safetensors", manifest=edit, resign=False)
    for fn in (read_manifest, load_checkpoint):
        with pytest.raises(IntegrityError, match="manifest does not match the digest"):
            fn(bad)
    read_manifest(bad, verify=False)  # the meaning of these edits is valid


def test_files_written_before_digests_need_verify_false_then_a_resave(files, tmp_path):
    path, ref = files["w4"]

    def as_version_1(m):
        m["format_version"] = 1
        for info in m["tensors"].values():
            del info["digest"]

    old = rewrite(path, tmp_path / "v1.safetensors", manifest=as_version_1, resign=False)
    meta = metadata(old)
    del meta[MANIFEST_DIGEST_KEY]
    save_file(load_file(str(old)), str(old), metadata=meta)
    for fn in (read_manifest, load_checkpoint):
        with pytest.raises(IntegrityError, match=r"written before .* digests \(format_version 1\).*verify=False.*lowbit.save"):
            fn(old)
    model = load_checkpoint(old, verify=False)
    assert torch.equal(logits(model), ref)
    lowbit.save(model, tmp_path / "v2.safetensors")
    assert read_manifest(tmp_path / "v2.safetensors")["format_version"] == 2
    assert torch.equal(logits(load_checkpoint(tmp_path / "v2.safetensors")), ref)


def test_version_2_without_its_manifest_digest(files, tmp_path):
    path = files["w4"][0]
    meta = metadata(path)
    del meta[MANIFEST_DIGEST_KEY]
    save_file(load_file(str(path)), str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(IntegrityError, match="lacks the manifest digest"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_a_tensor_without_a_recorded_digest(files, tmp_path):
    header, data = header_and_data(files["w4"][0])
    m = json.loads(header["__metadata__"]["lowbit_manifest"])
    del m["tensors"]["model.norm.weight"]["digest"]
    text = json.dumps(m)
    header["__metadata__"]["lowbit_manifest"] = text
    header["__metadata__"][MANIFEST_DIGEST_KEY] = bytes_digest(text.encode())
    bad = write_raw(tmp_path / "m.safetensors", header, data)
    with pytest.raises(IntegrityError, match="no valid digest for tensor 'model.norm.weight'"):
        load_checkpoint(bad)


def test_from_pretrained_verifies_the_weights_file(tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.integrations.transformers import save_pretrained

    save_pretrained(quantized_llama(), tmp_path / "dir")
    weights = tmp_path / "dir" / "model.safetensors"
    header, data = header_and_data(weights)
    start, _ = header[f"{LAYER}.qweight"]["data_offsets"]
    raw = bytearray(weights.read_bytes())
    raw[len(raw) - len(data) + start] ^= 0x10
    weights.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=f"'{LAYER}.qweight' does not match the digest"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dir")


# ----------------------------------------------------------------------------- tensor values
def _set(name: str, index: tuple, value):
    def edit(state):
        state[name][index] = value

    return edit


@pytest.mark.parametrize("zero", [16, 100, 255])
def test_zero_points_outside_the_code_range(files, tmp_path, zero):
    bad = rewrite(files["w4a"][0], tmp_path / "z.safetensors", tensors=_set(f"{LAYER}.zero", (3, 1), zero))
    refused(bad, TensorMismatchError, rf"{LAYER}.zero .* holds zero point {zero} at \[3, 1\], outside the 4-bit code range 0..15")


@pytest.mark.parametrize("value,what", [(float("nan"), "non-finite"), (float("inf"), "non-finite"), (0.0, "must be > 0"), (-0.5, "must be > 0")])
def test_integer_scales_lowbit_chose_are_finite_and_positive(files, tmp_path, value, what):
    bad = rewrite(files["w4"][0], tmp_path / "s.safetensors", tensors=_set(f"{LAYER}.scale", (5, 2), value))
    refused(bad, TensorMismatchError, rf"{LAYER}.scale .*{what}")


@pytest.mark.parametrize("value,what", [(float("nan"), "non-finite"), (-1.0, "must be >= 0")])
def test_codebook_scales_are_finite_and_not_negative(files, tmp_path, value, what):
    bad = rewrite(files["nf4"][0], tmp_path / "s.safetensors", tensors=_set(f"{LAYER}.scale", (0, 0), value))
    refused(bad, TensorMismatchError, rf"{LAYER}.scale .*nf4.*{what}")


def test_imported_integer_layers_may_hold_zero_and_negative_scales(files, tmp_path):
    """GGUF Q4_0 stores d = max / -8 (negative for half the blocks, 0 for an all-zero block); a
    layer lowbit imported and saved has no 'source', and its scales are taken as they are."""
    path, _ = files["w4"]

    def negate(state):
        state[f"{LAYER}.scale"][0] = -state[f"{LAYER}.scale"][0]
        state[f"{LAYER}.scale"][1, 0] = 0.0

    def imported(m):
        del m["layers"][LAYER]["source"]

    ok = rewrite(path, tmp_path / "imported.safetensors", tensors=negate, manifest=imported)
    assert isinstance(load_checkpoint(ok).get_submodule(LAYER), QuantLinear)
    refused(rewrite(path, tmp_path / "chosen.safetensors", tensors=negate), TensorMismatchError, "must be > 0")


def test_float_zero_points_are_finite(tmp_path):
    model = quantized_llama(QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="float"))
    lowbit.save(model, tmp_path / "f.safetensors")
    bad = rewrite(tmp_path / "f.safetensors", tmp_path / "bad.safetensors", tensors=_set(f"{LAYER}.zero", (0, 0), float("nan")))
    refused(bad, TensorMismatchError, rf"{LAYER}.zero .*non-finite zero point at \[0, 0\]")


@pytest.mark.parametrize("name,value", [("scale_absmax", -1.0), ("scale_absmax", float("nan")), ("scale_offset", float("inf"))])
def test_double_quant_block_absmax_and_offset(tmp_path, name, value):
    lowbit.save(quantized_llama(QuantScheme(format="nf4", double_quant=True)), tmp_path / "dq.safetensors")
    bad = rewrite(tmp_path / "dq.safetensors", tmp_path / "bad.safetensors", tensors=_set(f"{LAYER}.{name}", (0,), value))
    refused(bad, TensorMismatchError, rf"{LAYER}.{name} .* must be finite and >= 0")


def test_ternary_codes_are_0_1_2(tmp_path):
    lowbit.save(quantized_llama(QuantScheme(format="ternary")), tmp_path / "t.safetensors")
    bad = rewrite(tmp_path / "t.safetensors", tmp_path / "bad.safetensors", tensors=_set(f"{LAYER}.qweight", (2, 1), 0xC0))
    refused(bad, TensorMismatchError, rf"{LAYER}.qweight .* ternary code 3 at \[2, 7\]")


@pytest.mark.parametrize("fmt,code", [("fp8_e4m3", 0x7F), ("fp8_e4m3", 0xFF), ("fp8_e5m2", 0x7C), ("fp8_e5m2", 0xFE)])
def test_fp8_codes_are_finite(tmp_path, fmt, code):
    lowbit.save(quantized_llama(QuantScheme(format=fmt)), tmp_path / "f.safetensors")
    bad = rewrite(tmp_path / "f.safetensors", tmp_path / "bad.safetensors", tensors=_set(f"{LAYER}.qweight", (1, 9), code))
    refused(bad, TensorMismatchError, rf"NaN/Inf {fmt} code \({code}\) at \[1, 9\]")


class Odd(nn.Module):
    """A layer whose input size (36) is not a multiple of 8: packed rows end in padding codes."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(36, 16)


def test_padding_bits_are_zero(tmp_path):
    torch.manual_seed(0)
    model = Odd()
    lowbit.quantize(model, Recipe.uniform(QuantScheme(bits=4, granularity="channel"), skip=()), progress=False)
    lowbit.save(model, tmp_path / "odd.safetensors")
    assert isinstance(load_checkpoint(tmp_path / "odd.safetensors", Odd()).up, QuantLinear)
    bad = rewrite(tmp_path / "odd.safetensors", tmp_path / "bad.safetensors", tensors=_set("up.qweight", (4, -1), 0xF0))
    refused(bad, TensorMismatchError, r"up.qweight .* padding bits set in row 4 \(codes past column 36 must be 0\)", skeleton=Odd)


class Int8MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)


def _llm_int8_file(tmp_path) -> Path:
    torch.manual_seed(0)
    model = Int8MLP()
    scheme = QuantScheme(bits=8, granularity="channel", activations="int8")
    act = torch.ones(64)
    act[[3, 17, 40]] = 100.0
    qt = llm_int8(model.fc.weight.detach(), scheme, act, LLMInt8())
    assert qt.n_outliers == 3
    model.fc = QuantLinear.from_quantized(qt, model.fc.bias)
    lowbit.save(model, tmp_path / "int8.safetensors")
    return tmp_path / "int8.safetensors"


@pytest.mark.parametrize("idx", [[17, 3, 40], [3, 3, 40], [3, 17, 64], [-1, 17, 40]])
def test_outlier_columns_are_sorted_and_in_range(tmp_path, idx):
    path = _llm_int8_file(tmp_path)
    assert isinstance(load_checkpoint(path, Int8MLP()).fc, QuantLinear)

    def edit(state):
        state["fc.outlier_idx"] = torch.tensor(idx, dtype=torch.int32)

    bad = rewrite(path, tmp_path / "bad.safetensors", tensors=edit)
    refused(bad, TensorMismatchError, r"fc.outlier_idx .* distinct ascending input columns in 0..63", skeleton=Int8MLP)


# ----------------------------------------------------------------------------- manifest meaning
@pytest.mark.parametrize("layout", ["lowbit.bitstream.v2", "", None, 7])
def test_unknown_layouts_are_refused(files, tmp_path, layout):
    bad = rewrite(files["w4"][0], tmp_path / "l.safetensors", manifest=lambda m: m["layers"][LAYER].update(layout=layout))
    refused(bad, ManifestError, rf"layer '{LAYER}' has layout .*; this lowbit knows \['lowbit.bitstream.v1'\]")


def test_an_alias_may_not_shadow_a_stored_tensor(files, tmp_path):
    def shadow(m):
        m["aliases"]["model.norm.weight"] = "model.layers.0.input_layernorm.weight"

    bad = rewrite(files["w4"][0], tmp_path / "a.safetensors", manifest=shadow)
    refused(bad, TensorMismatchError, "alias 'model.norm.weight' has the name of a stored tensor")


@pytest.mark.parametrize("value", [10**20, 10**20 + 1, 1e20, 0, -1, "128", 2**31])
def test_layer_dimensions_are_bounded_before_anything_iterates_on_them(files, tmp_path, value):
    bad = rewrite(files["w4"][0], tmp_path / "d.safetensors", manifest=lambda m: m["layers"][LAYER].update(in_features=value))
    t0 = time.perf_counter()
    refused(bad, ManifestError, rf"layer '{LAYER}' has an invalid scheme entry: 'in_features' must be an integer from 1 to")
    assert time.perf_counter() - t0 < 10


def test_group_sizes_for_an_error_message_take_sqrt_steps():
    assert valid_group_sizes(576) == [g for g in range(8, 576) if 576 % g == 0]
    t0 = time.perf_counter()
    assert valid_group_sizes(2**31 - 1) == []  # a prime
    assert time.perf_counter() - t0 < 1


def test_a_recipe_of_the_wrong_types_is_a_manifest_error(files, tmp_path):
    bad = rewrite(files["w4"][0], tmp_path / "r.safetensors", manifest=lambda m: m["recipe"]["rules"][0].update(pattern=5))
    refused(bad, ManifestError, "invalid 'recipe'")


def test_granularity_of_the_wrong_type_is_a_scheme_error(files, tmp_path):
    bad = rewrite(files["w4"][0], tmp_path / "g.safetensors", manifest=lambda m: m["layers"][LAYER]["scheme"].update(granularity=3))
    refused(bad, ManifestError, "invalid scheme entry: granularity must be one of")


# ----------------------------------------------------------------------------- the model config
def _config_edit(**fields):
    return lambda m: m["model"]["config"].update(fields)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"num_hidden_layers": 10**9}, r"num_hidden_layers=1000000000, which must be an integer from 1 to"),
        ({"num_hidden_layers": 3}, r"num_hidden_layers=3, but the tensors hold .*model.layers.0..1 \(2 indices\)"),
        ({"num_hidden_layers": 1}, r"num_hidden_layers=1, but the tensors hold"),
        ({"hidden_size": 0}, "hidden_size=0, which must be an integer from 1"),
        ({"hidden_size": -1}, "hidden_size=-1, which must be an integer from 1"),
        ({"num_attention_heads": 0}, "num_attention_heads=0"),
        ({"intermediate_size": 1e20}, "intermediate_size=1e\\+20"),
        ({"rms_norm_eps": "1e-06"}, r"rms_norm_eps='1e-06', which must be a finite number"),
        ({"rms_norm_eps": float("nan")}, r"rms_norm_eps=nan, which must be a finite number"),
        ({"hidden_act": 3}, "hidden_act=3, which must be a string"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes', which must be true or false"),
        ({"to_dict": 1}, "field 'to_dict', which names a method"),
        ({"model_type": ["llama"]}, "model_type=\\['llama'\\], which must be a string"),
    ],
)
def test_config_fields_are_checked_before_a_skeleton_is_built(files, tmp_path, fields, match):
    bad = rewrite(files["w4"][0], tmp_path / "c.safetensors", manifest=_config_edit(**fields))
    t0 = time.perf_counter()
    refused(bad, ManifestError, match)
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("fields", [{"hidden_size": 160}, {"num_key_value_heads": 4}, {"vocab_size": 300}, {"head_dim": 16}])
def test_config_dimensions_must_fit_the_tensors(files, tmp_path, fields):
    """A config whose (valid) dimensions disagree with the stored tensors is caught by the
    meta-device probe build, before the real skeleton allocates anything."""
    bad = rewrite(files["w4"][0], tmp_path / "c.safetensors", manifest=_config_edit(**fields))
    refused(bad, TensorMismatchError, "in the file|is \\[out, in\\]")


def test_gpt2_position_count_is_checked_on_the_meta_device(tmp_path):
    """GPT-2 allocates an n_positions^2 mask buffer: 2**24 positions would be 2**48 bytes."""
    model = tiny_gpt2(0)
    lowbit.quantize(model, QuantScheme(bits=8, granularity="channel"), progress=False)
    lowbit.save(model, tmp_path / "g.safetensors")
    bad = rewrite(tmp_path / "g.safetensors", tmp_path / "bad.safetensors", manifest=_config_edit(n_positions=2**24))
    refused(bad, TensorMismatchError, r"'transformer.wpe.weight' is \(64, 64\) in the file, the model expects \(16777216, 64\)")
    bad = rewrite(tmp_path / "g.safetensors", tmp_path / "bad0.safetensors", manifest=_config_edit(n_embd=0))
    refused(bad, ManifestError, r"n_embd \(hidden_size\)=0")


def test_an_architecture_must_be_a_model_class(files, tmp_path):
    bad = rewrite(files["w4"][0], tmp_path / "a.safetensors", manifest=lambda m: m["model"].update(architecture="AutoConfig"))
    refused(bad, CheckpointError, "transformers has no model architecture 'AutoConfig'")


# ----------------------------------------------------------------------------- bounded JSON
@pytest.mark.parametrize("depth", [65, 100_000])
def test_deeply_nested_manifest(files, tmp_path, depth):
    path = files["w4"][0]
    header, data = header_and_data(path)
    m = json.loads(header["__metadata__"]["lowbit_manifest"])
    m["notes"] = "__deep__"
    text = json.dumps(m).replace('"__deep__"', "[" * depth + "]" * depth)
    header["__metadata__"]["lowbit_manifest"] = text
    header["__metadata__"][MANIFEST_DIGEST_KEY] = bytes_digest(text.encode())
    bad = write_raw(tmp_path / "deep.safetensors", header, data)
    refused(bad, ManifestError, "the lowbit manifest nests lists/objects deeper than 64 levels")


def test_deeply_nested_safetensors_header(files, tmp_path):
    header, data = header_and_data(files["w4"][0])
    text = json.dumps(header)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    refused(write_raw(tmp_path / "deep.safetensors", header, data, text), ManifestError, "the safetensors header nests")


@pytest.mark.parametrize("digits", [41, 4301, 100_000])
def test_huge_integers(files, tmp_path, digits):
    header, data = header_and_data(files["w4"][0])
    text = header["__metadata__"]["lowbit_manifest"].replace('"in_features": 128', '"in_features": ' + "9" * digits, 1)
    header["__metadata__"]["lowbit_manifest"] = text
    header["__metadata__"][MANIFEST_DIGEST_KEY] = bytes_digest(text.encode())
    bad = write_raw(tmp_path / "huge.safetensors", header, data)
    refused(bad, ManifestError, f"holds an integer of {digits} digits")


def test_bounded_json_loads():
    assert bounded_json.loads('{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}
    assert bounded_json.depth({"a": [1, {"b": 2}]}) == 3
    assert bounded_json.loads("-" + "9" * 40) == -int("9" * 40)
    for bad in ["[" * 65 + "]" * 65, "[" * 10**6, "1" * 41, "{", b"\xff"]:
        with pytest.raises(bounded_json.JSONLimitError):
            bounded_json.loads(bad)


# ----------------------------------------------------------------------------- what lowbit writes, loads
def _edge_weights(model) -> None:
    """Zero the first row and one group of every linear, and make another group tiny
    (all-zero groups get scale 1 / absmax 0; tiny ones underflow float16 scales)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and mod.weight.shape[1] >= 128:
                mod.weight[0] = 0.0
                mod.weight[1, :64] = 0.0
                mod.weight[2, :64] = 1e-9


EDGE_SCHEMES = {
    "w4g32-sym": (W4, {}),
    "w4g32-asym-f16": (QuantScheme(bits=4, group_size=32, symmetric=False, scale_dtype="float16"), {}),
    "w3g32-asym-floatzero": (QuantScheme(bits=3, group_size=32, symmetric=False, zero_point="float"), {}),
    "w4g64-hqq": (Recipe.uniform(QuantScheme(bits=4, group_size=64, symmetric=False, zero_point="float"), method=HQQ(iters=2)), {}),
    "w8-channel-bf16": (QuantScheme(bits=8, granularity="channel", scale_dtype="bfloat16"), {}),
    "nf4": (QuantScheme(format="nf4"), {}),
    "nf4-dq": (QuantScheme(format="nf4", double_quant=True), {}),
    "fp4-f16": (QuantScheme(format="fp4", scale_dtype="float16"), {}),
    "fp8-e4m3-f16": (QuantScheme(format="fp8_e4m3", scale_dtype="float16"), {}),
    "fp8-e5m2": (QuantScheme(format="fp8_e5m2"), {}),
    "ternary-f16": (QuantScheme(format="ternary", scale_dtype="float16"), {}),
    "w8a8-llm-int8": (
        Recipe.uniform(QuantScheme(bits=8, granularity="channel", activations="int8"), method=LLMInt8(threshold=1.0)),
        {"calibration": random_ids(2, 16, seed=1)},
    ),
}


@pytest.mark.parametrize("name", list(EDGE_SCHEMES))
def test_every_file_lowbit_writes_loads_verified(tmp_path, name):
    recipe, kw = EDGE_SCHEMES[name]
    model = tiny_llama(1)
    _edge_weights(model)
    lowbit.quantize(model, recipe, progress=False, **kw)
    lowbit.save(model, tmp_path / "m.safetensors")
    for verify in (True, False):
        assert torch.equal(logits(load_checkpoint(tmp_path / "m.safetensors", verify=verify)), logits(model))
