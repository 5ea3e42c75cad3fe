"""The sequential block walker, the generic adapter and calibration data, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import lowbit
from lowbit import AWQ, GPTQ, HQQ, Recipe, SignRound, SmoothQuant
from lowbit.calibration import CalibrationData, from_texts, load_texts, sample_from_model
from lowbit.errors import CalibrationError, DataError, UnsupportedModelError
from lowbit.model.adapters import InputGroup, find_blocks, trace_block
from lowbit.model.walker import WalkOptions, capture_block_inputs
from lowbit.scheme import QuantScheme
from tiny_models import random_ids, save_load_generate, tiny_gpt2, tiny_llama

W4 = QuantScheme(bits=4, group_size=32)
W3A = QuantScheme(bits=3, symmetric=False, group_size=32)


def calib(n=8, length=32, seed=1):
    return CalibrationData(random_ids(n, length, seed=seed), {"source": "random ids (test)"})


def tiny_opt(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(
        vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64,
    )
    return transformers.OPTForCausalLM(cfg).eval()


def tiny_neox(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    )
    return transformers.GPTNeoXForCausalLM(cfg).eval()


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )
    return transformers.Qwen2ForCausalLM(cfg).eval()


def llama_with_outliers(seed=0):
    """tiny_llama whose norms give a few input channels 20x the magnitude of the rest, as in
    trained LLMs (the salient channels AWQ protects); random tiny models have none."""
    model = tiny_llama(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 20
            layer.post_attention_layernorm.weight[:4] *= 20
    return model


def logits_mse(a, b, ids):
    with torch.no_grad():
        return float((a(ids).logits - b(ids).logits).pow(2).mean())


# -- capture and propagation ------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_opt, tiny_neox])
def test_captured_inputs_reproduce_hidden_states_exactly(make):
    model = make()
    data = calib(n=4, length=16)
    blocks = model.get_submodule(find_blocks(model))
    inputs = capture_block_inputs(model, blocks, data, WalkOptions(batch_size=4))
    with torch.no_grad():
        ref = model(data.ids, output_hidden_states=True, use_cache=False).hidden_states
        h = inputs.hidden[0]
        assert torch.equal(h, ref[0])
        for i, block in enumerate(blocks[:-1]):
            h = inputs.call(block, 0) if i == 0 else type(inputs)(_store(h), inputs.extras).call(block, 0)
            assert torch.equal(h, ref[i + 1]), f"block {i} output differs from the model's hidden state"


def _store(t):
    from lowbit.model.walker import ActivationStore

    s = ActivationStore()
    s.append(t)
    return s


# -- the generic adapter ---------------------------------------------------------------------
def test_llama_structure_is_traced():
    model = tiny_llama()
    data = calib(n=1, length=8)
    blocks = model.model.layers
    inputs = capture_block_inputs(model, blocks, data, WalkOptions())
    args, kwargs = inputs.extras[0]
    s = trace_block(blocks[0], (inputs.hidden[0], *args), kwargs)
    assert s.groups == (
        InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "self_attn"),
        # grouped-query attention (2 kv heads of 4): v_proj's rows do not line up with o_proj's columns
        InputGroup(("self_attn.o_proj",), None, "self_attn.o_proj"),
        InputGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp"),
        InputGroup(("mlp.down_proj",), "mlp.up_proj", "mlp.down_proj"),
    )


def test_value_output_pair_folds_without_gqa():
    model = tiny_qwen2()
    blocks = model.model.layers
    inputs = capture_block_inputs(model, blocks, calib(1, 8), WalkOptions())
    args, kwargs = inputs.extras[0]
    s = trace_block(blocks[0], (inputs.hidden[0], *args), kwargs)
    assert InputGroup(("self_attn.o_proj",), "self_attn.v_proj", "self_attn.o_proj") in s.groups


def test_gpt2_structure_is_traced():
    model = tiny_gpt2()
    blocks = model.transformer.h
    inputs = capture_block_inputs(model, blocks, calib(1, 8), WalkOptions())
    args, kwargs = inputs.extras[0]
    s = trace_block(blocks[0], (inputs.hidden[0], *args), kwargs)
    assert [g.linears for g in s.groups] == [("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)]
    assert [g.fold_into for g in s.groups] == ["ln_1", None, "ln_2", None]


def test_unsupported_models_say_what_an_adapter_needs():
    seq = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(UnsupportedModelError, match="ModuleList"):
        find_blocks(seq)
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    )
    with pytest.raises(UnsupportedModelError, match="several stacks"):
        lowbit.quantize(t5, Recipe.uniform(W4, method="gptq"), calibration=calib(2, 8))


# -- end to end through the walker ------------------------------------------------------------
@pytest.mark.parametrize("make", [llama_with_outliers, tiny_gpt2, tiny_opt, tiny_neox])
@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_walker_quantizes_every_architecture(make, method):
    ref, model = make(), make()
    heldout = random_ids(2, 32, seed=7)
    rtn = make()
    lowbit.quantize(rtn, Recipe.uniform(W3A), progress=False)
    report = lowbit.quantize(model, Recipe.uniform(W3A, method=method), calibration=calib(16, 32), progress=False)
    n_linear = sum(1 for n, _ in model.named_modules() if isinstance(_, lowbit.QuantLinear))
    assert n_linear == len(report.layers) > 0
    err, err_rtn = logits_mse(ref, model, heldout), logits_mse(ref, rtn, heldout)
    assert err < err_rtn, f"{method}: output error {err:.3g} not below RTN's {err_rtn:.3g}"


def test_gptq_tiny_model_saves_loads_and_generates(tmp_path):
    model = tiny_llama()
    lowbit.quantize(model, Recipe.uniform(W4, method=GPTQ(damp=0.02)), calibration=calib(8, 32), progress=False)
    manifest = save_load_generate(model, tmp_path / "gptq.lowbit.safetensors", new_tokens=5)
    assert manifest["recipe"]["method"] == "gptq"
    assert manifest["recipe"]["method_options"][0]["damp"] == 0.02
    assert manifest["calibration"]["n_samples"] == 8 and manifest["calibration"]["seqlen"] == 32


def test_propagation_modes_and_disk_offload_agree(tmp_path):
    data = calib(8, 32)
    mem, disk, fp = tiny_llama(), tiny_llama(), tiny_llama()
    recipe = Recipe.uniform(W4, method="gptq")
    lowbit.quantize(mem, recipe, calibration=data, options=WalkOptions(batch_size=3), progress=False)
    lowbit.quantize(
        disk, recipe, calibration=data, progress=False,
        options=WalkOptions(batch_size=3, offload="disk", offload_dir=str(tmp_path)),
    )
    lowbit.quantize(fp, recipe, calibration=data, options=WalkOptions(propagate="full_precision"), progress=False)
    for (n, a), (_, b) in zip(mem.state_dict().items(), disk.state_dict().items()):
        assert torch.equal(a, b), n
    assert not list(tmp_path.iterdir()), "spilled activations must be removed"
    # block 0 sees the same (full-precision) inputs either way; later blocks differ
    sd_mem, sd_fp = mem.state_dict(), fp.state_dict()
    assert torch.equal(sd_mem["model.layers.0.self_attn.q_proj.qweight"], sd_fp["model.layers.0.self_attn.q_proj.qweight"])
    assert not torch.equal(sd_mem["model.layers.1.mlp.down_proj.qweight"], sd_fp["model.layers.1.mlp.down_proj.qweight"])


@pytest.mark.parametrize("offload", ["memory", "disk"])
def test_fp_targets_fit_the_full_precision_outputs(offload, tmp_path):
    """GPTAQ-style targets: block 0's q/k/v see identical inputs in both streams (so identical
    codes); the whole model's outputs on the calibration windows, the objective, get much closer
    to the full-precision model's than plain GPTQ's. (Held-out windows are not asserted: on this
    tiny random model with 256 calibration tokens the closer fit does not carry over.)"""
    data = calib(8, 32)
    fp = tiny_llama()
    plain, fpt = tiny_llama(), tiny_llama()
    opts = WalkOptions(batch_size=3, offload=offload, offload_dir=str(tmp_path))
    lowbit.quantize(plain, Recipe.uniform(W3A, method=GPTQ()), calibration=data, options=opts, progress=False)
    lowbit.quantize(fpt, Recipe.uniform(W3A, method=GPTQ(fp_targets=True)), calibration=data, options=opts, progress=False)
    sp, sf = plain.state_dict(), fpt.state_dict()
    for rel in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(sp[f"model.layers.0.self_attn.{rel}.qweight"], sf[f"model.layers.0.self_attn.{rel}.qweight"])
    assert not torch.equal(sp["model.layers.1.mlp.down_proj.qweight"], sf["model.layers.1.mlp.down_proj.qweight"])
    with torch.no_grad():
        ref = fp(data.ids).logits
        err_plain = float((plain(data.ids).logits - ref).pow(2).mean())
        err_fpt = float((fpt(data.ids).logits - ref).pow(2).mean())
    assert err_fpt < 0.5 * err_plain, (err_fpt, err_plain)
    assert not list(tmp_path.iterdir()), "spilled activations of both streams must be removed"


def test_true_sequential_changes_later_stages_only():
    data = calib(8, 32)
    a, b = tiny_llama(), tiny_llama()
    lowbit.quantize(a, Recipe.uniform(W4, method=GPTQ(true_sequential=True)), calibration=data, progress=False)
    lowbit.quantize(b, Recipe.uniform(W4, method=GPTQ(true_sequential=False)), calibration=data, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert torch.equal(sa["model.layers.0.self_attn.q_proj.qweight"], sb["model.layers.0.self_attn.q_proj.qweight"])
    assert not torch.equal(sa["model.layers.0.mlp.down_proj.qweight"], sb["model.layers.0.mlp.down_proj.qweight"])


def test_awq_folds_into_norms_and_records_its_search():
    model = tiny_llama()
    before = model.model.layers[0].input_layernorm.weight.detach().clone()
    report = lowbit.quantize(model, Recipe.uniform(W3A, method=AWQ(n_grid=10, clip=False)), calibration=calib(8, 32), progress=False)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, before)
    notes = [n for n in report.notes if "AWQ" in n and "input_layernorm" in n]
    assert len(notes) == 2  # one per block
    assert any("o_proj" in n and "skips" in n for n in report.notes)  # GQA: nothing to fold into


def test_smoothquant_w8a8_walk():
    ref, model = tiny_llama(), tiny_llama()
    scheme = QuantScheme(bits=8, granularity="channel", activations="int8")
    report = lowbit.quantize(model, Recipe.uniform(scheme, method=SmoothQuant(alpha=0.5)), calibration=calib(8, 32), progress=False)
    assert all(r.scheme["activations"] == "int8" for r in report.layers)
    assert logits_mse(ref, model, random_ids(2, 16, seed=5)) < 1e-3


def test_head_outside_blocks_is_rounded_and_noted():
    model = tiny_llama(tie=False)
    recipe = Recipe.uniform(W4, method="gptq", skip=())
    report = lowbit.quantize(model, recipe, calibration=calib(4, 16), progress=False)
    assert "lm_head" in {r.name for r in report.layers}
    assert any(n.startswith("lm_head: lies outside") and "gptq not applied" in n for n in report.notes)


def test_hqq_and_rtn_need_no_calibration():
    model = tiny_llama()
    report = lowbit.quantize(model, Recipe.uniform(QuantScheme(4, symmetric=False, zero_point="float"), method=HQQ()), progress=False)
    assert report.calibration is None and len(report.layers) == 14


def test_calibration_methods_refuse_to_run_without_data():
    with pytest.raises(CalibrationError, match="calibration"):
        lowbit.quantize(tiny_llama(), Recipe.uniform(W4, method="gptq"))


def test_nan_activations_are_a_typed_error():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("nan")
    with pytest.raises(CalibrationError, match="NaN"):
        lowbit.quantize(model, Recipe.uniform(W4, method="gptq"), calibration=calib(2, 8), progress=False)


# -- streaming from shards --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gptq", SignRound(iters=4)], ids=["gptq", "signround"])
def test_quantize_from_disk_matches_in_memory(tmp_path, method):
    model = tiny_llama(tie=False)
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB", safe_serialization=True)
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    tok_dir = tmp_path / "src"
    _write_byte_tokenizer(tok_dir)
    data = calib(8, 32)
    recipe = Recipe.uniform(W4, method=method)
    report = lowbit.quantize_from_disk(tok_dir, recipe, tmp_path / "out.safetensors", calibration=data, progress=False)
    assert len(report.layers) == 14
    lowbit.quantize(model, recipe, calibration=data, progress=False)
    loaded = lowbit.load(tmp_path / "out.safetensors")
    ids = random_ids(1, 16, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("method", ["gptq", "rtn", SignRound(iters=2)], ids=["gptq", "rtn", "signround"])
def test_walk_frees_each_block_it_replaced(method):
    """By the time the walker releases block i, nothing it keeps (its plan, its results) holds
    block i's replaced nn.Linear layers: a streamed model would otherwise accumulate every
    block's full-precision weights during the walk."""
    import gc
    import weakref

    from lowbit.model.walker import quantize_sequential

    model = tiny_llama(tie=False)
    blocks = model.model.layers
    originals = {i: [weakref.ref(m) for m in b.modules() if isinstance(m, torch.nn.Linear)] for i, b in enumerate(blocks)}
    alive_at_release = {}

    class CheckingSource:
        def load(self, index, block):
            pass

        def release(self, index, block):
            gc.collect()
            alive_at_release[index] = sum(r() is not None for r in originals[index])

    quantize_sequential(model, Recipe.uniform(W4, method=method), calib(4, 16), source=CheckingSource(), progress=False)
    assert alive_at_release == {i: 0 for i in range(len(blocks))}


def test_block_source_reads_owned_copies(tmp_path):
    """Tensors read from the shards are copies: once read, no file mapping stays behind."""
    from lowbit.model.streaming import _Reader, shard_index

    model = tiny_llama(tie=False)
    model.save_pretrained(tmp_path, safe_serialization=True)
    reader = _Reader(shard_index(tmp_path))
    name = "model.layers.0.mlp.up_proj.weight"
    t = reader.get(name)
    assert torch.equal(t, model.state_dict()[name])
    maps = [line for line in open("/proc/self/maps") if str(tmp_path) in line]
    assert maps == []


def _write_byte_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i + 33): i for i in range(200)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=chr(33)))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(33))
    fast.save_pretrained(path)


# -- calibration data -----------------------------------------------------------------------
class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return {"input_ids": torch.tensor([[ord(c) % 256 for c in text]])}


def test_from_texts_reads_files_folders_jsonl_and_lists(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"body": "jsonl text " * 40}) + "\n")
    texts, origins = load_texts(tmp_path, text_field="body")
    assert len(texts) == 2 and len(origins) == 2
    d1 = from_texts(tmp_path, _CharTokenizer(), n_samples=4, seqlen=64, seed=3, text_field="body")
    d2 = from_texts(tmp_path, _CharTokenizer(), n_samples=4, seqlen=64, seed=3, text_field="body")
    assert d1.ids.shape == (4, 64) and torch.equal(d1.ids, d2.ids)
    assert d1.description["seed"] == 3 and d1.description["n_samples"] == 4
    d3 = from_texts(["some text " * 30], _CharTokenizer(), n_samples=2, seqlen=32)
    assert d3.ids.shape == (2, 32)


def test_bad_calibration_input_is_a_typed_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        from_texts(tmp_path / "empty.txt", _CharTokenizer(), n_samples=1, seqlen=8)
    with pytest.raises(DataError, match="shorter than one window"):
        from_texts(["short"], _CharTokenizer(), n_samples=1, seqlen=64)
    with pytest.raises(DataError, match="does not exist"):
        from_texts(tmp_path / "missing.txt", _CharTokenizer())
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"other": 1}\n')
    with pytest.raises(DataError, match="no field 'text'"):
        load_texts(tmp_path / "x.jsonl")
    with pytest.raises(DataError, match="int64"):
        CalibrationData(torch.zeros(2, 8))


def test_data_free_sampling_is_seeded_and_full_length():
    model = tiny_llama()
    a = sample_from_model(model, bos_token_id=1, n_samples=3, seqlen=12, seed=5, batch_size=2)
    b = sample_from_model(model, bos_token_id=1, n_samples=3, seqlen=12, seed=5, batch_size=2)
    assert a.ids.shape == (3, 12) and torch.equal(a.ids, b.ids)
    assert bool((a.ids[:, 0] == 1).all()) and int(a.ids.max()) < 256
    assert "data-free" in a.description["source"]


def test_group_aware_gptq_walks_mixed_group_sizes_sharing_an_input():
    """q/k/v share one Hessian; with group-aware act-order their column order depends on the
    group size, so k_proj (g16) needs its own factoring next to q/v (g32). The walk must give
    each linear the order of its own scheme (a shared wrong one raises), beat RTN, and differ
    from static act-order."""
    from lowbit import Rule

    w4g16 = QuantScheme(bits=4, group_size=16)
    rules = (Rule(r".*\.k_proj", w4g16), Rule(r".*", W4))
    data, held = calib(8, 32), random_ids(4, 32, seed=9)
    ref = tiny_llama()
    models = {}
    for name, method in [("gar", GPTQ(group_aware=True)), ("static", GPTQ()), ("rtn", "rtn")]:
        models[name] = tiny_llama()
        rules_with_head = (Rule(r"lm_head", None),) + rules
        lowbit.quantize(models[name], Recipe(rules=rules_with_head, method=method), calibration=data, progress=False)
    k = models["gar"].model.layers[0].self_attn.k_proj
    assert k.scheme == w4g16
    gar, static = models["gar"].state_dict(), models["static"].state_dict()
    for rel in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        key = f"model.layers.0.{rel}.qweight"
        assert not torch.equal(gar[key], static[key]), rel
    assert logits_mse(models["gar"], ref, held) < logits_mse(models["rtn"], ref, held)
    assert logits_mse(models["gar"], ref, data.ids) < logits_mse(models["rtn"], ref, data.ids)
    assert Recipe.from_json(Recipe(rules=rules, method=GPTQ(group_aware=True)).to_json()).method == (
        GPTQ(group_aware=True),
    )


def test_token_cap_reaches_every_hessian_the_walk_collects():
    """A cap no token reaches changes nothing, bit for bit; a cap at the median norm (every
    token above the median scaled down) changes the codes of every stage."""
    data = calib(8, 32)
    states = {}
    for cap in (None, 1e9, 1.0):
        model = tiny_llama()
        lowbit.quantize(model, Recipe.uniform(W4, method=GPTQ(token_cap=cap)), calibration=data, progress=False)
        states[cap] = model.state_dict()
    keys = [k for k in states[None] if k.endswith(".qweight")]
    assert keys and all(torch.equal(states[None][k], states[1e9][k]) for k in keys)
    for rel in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        key = f"model.layers.1.{rel}.qweight"
        assert not torch.equal(states[None][key], states[1.0][key]), rel
