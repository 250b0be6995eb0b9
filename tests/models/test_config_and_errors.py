"""ModelConfig parsing/validation and checkpoint error messages (no torch needed)."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from flax import nnx

from erpo_jax.models import (
    PRESETS,
    Decoder,
    ModelConfig,
    RopeScaling,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from erpo_jax.models._safetensors import SafetensorsFile, write_safetensors

CONFIG = ModelConfig("llama", 50, 16, 24, 2, 4, 2, 4, rope_scaling=RopeScaling("llama3", 8.0))

QWEN25_MATH_1_5B = {  # config.json of Qwen/Qwen2.5-Math-1.5B (transformers 4 layout)
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 4096, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 10000, "sliding_window": 4096,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.37.0",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip

LLAMA_3_2_1B_ROPE = {  # the rope fields of meta-llama/Llama-3.2-1B (transformers 4 layout)
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
}  # fmt: skip


def test_transformers4_config_json_matches_the_preset():
    assert ModelConfig.from_hf(QWEN25_MATH_1_5B) == PRESETS["qwen2.5-math-1.5b"]


def test_llama3_rope_scaling_in_both_layouts():
    llama = dataclasses.asdict(PRESETS["llama3.2-1b"])
    hf = PRESETS["llama3.2-1b"].to_hf()
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"} | LLAMA_3_2_1B_ROPE
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(hf) == PRESETS["llama3.2-1b"]
    assert llama["rope_scaling"]["factor"] == 32.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_config_json(name):
    config = PRESETS[name]
    assert ModelConfig.from_hf(config.to_hf()) == config
    assert ModelConfig.preset(name) == config


def test_preset_parameter_counts():
    # Published totals (embeddings counted once when tied).
    assert round(PRESETS["qwen3-0.6b"].num_params / 1e6) == 596
    assert round(PRESETS["llama3.2-1b"].num_params / 1e6) == 1236
    assert round(PRESETS["qwen2.5-math-1.5b"].num_params / 1e6) == 1544


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "gpt2"}, "model_type='gpt2'.*'llama', 'qwen2', 'qwen3'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"use_sliding_window": True, "sliding_window": 0}, "positive sliding_window"),
        ({"num_key_value_heads": 5}, "num_kv_heads=5"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing"),
    ],
)
def test_unsupported_configs_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(QWEN25_MATH_1_5B | change)


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="hidden_size"):
        dataclasses.replace(CONFIG, hidden_size=0)
    with pytest.raises(ValueError, match="rope_type"):
        RopeScaling("dynamic", 2.0)
    with pytest.raises(ValueError, match="unknown model preset 'qwen9'"):
        ModelConfig.preset("qwen9")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_hf_checkpoint(Decoder(CONFIG, rngs=nnx.Rngs(0)), CONFIG, path)
    return path


def _copy(src, dst, *, drop=(), reshape=None, config_change=None):
    """A copy of a checkpoint with tensors dropped/reshaped or config.json edited."""
    os.makedirs(dst, exist_ok=True)
    st = SafetensorsFile(os.path.join(src, "model.safetensors"))
    tensors = {k: np.array(st.tensor(k)) for k in st.keys() if k not in drop}
    for name, shape in (reshape or {}).items():
        tensors[name] = np.zeros(shape, np.float32)
    write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f) | (config_change or {})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf, f)
    return dst


def test_saved_checkpoint_loads(checkpoint):
    model, config = load_hf_checkpoint(checkpoint)
    assert config == CONFIG
    np.testing.assert_array_equal(model.layers.q_proj[...].shape, (2, 16, 16))


def test_missing_directory_and_files(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf_checkpoint(tmp_path)
    os.makedirs(tmp_path / "no_weights")
    with open(tmp_path / "no_weights" / "config.json", "w") as f:
        json.dump(CONFIG.to_hf(), f)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_hf_checkpoint(tmp_path / "no_weights")


def test_missing_shard_is_named(checkpoint, tmp_path):
    model, config = load_hf_checkpoint(checkpoint)
    save_hf_checkpoint(model, config, tmp_path, max_shard_bytes=2_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=re.escape(shard)):
        load_hf_checkpoint(tmp_path)


def test_missing_tensor_is_named_with_its_shape(checkpoint, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    _copy(checkpoint, tmp_path, drop=(name,))
    with pytest.raises(KeyError, match=re.escape(f"'{name}' (expected shape (16, 24))")):
        load_hf_checkpoint(tmp_path)


def test_shape_mismatch_names_the_tensor_and_both_shapes(checkpoint, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    _copy(checkpoint, tmp_path, reshape={name: (12, 16)})
    with pytest.raises(ValueError, match=re.escape(f"'{name}'") + r".*\(12, 16\).*\(8, 16\)"):
        load_hf_checkpoint(tmp_path)


def test_config_that_disagrees_with_the_weights(checkpoint, tmp_path):
    _copy(checkpoint, tmp_path, config_change={"intermediate_size": 32})
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight.*\(24, 16\).*\(32, 16\)"):
        load_hf_checkpoint(tmp_path)


def test_unsupported_model_type_on_disk(checkpoint, tmp_path):
    _copy(checkpoint, tmp_path, config_change={"model_type": "mistral"})
    with pytest.raises(ValueError, match="model_type='mistral'"):
        load_hf_checkpoint(tmp_path)


def test_save_rejects_a_config_that_does_not_fit_the_model(checkpoint, tmp_path):
    model, _ = load_hf_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"layers.gate_proj has shape \(2, 16, 24\)"):
        save_hf_checkpoint(model, dataclasses.replace(CONFIG, intermediate_size=20), tmp_path)


def test_load_tokenizer_errors_name_the_directory(tmp_path):
    from erpo_jax.models import load_tokenizer

    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_tokenizer(tmp_path / "missing")
    # A checkpoint directory with config files but no vocabulary (AutoTokenizer
    # alone would build an empty tokenizer from tokenizer_config.json).
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast"}'
    )
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files .*tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(
        FileNotFoundError, match=r"no usable tokenizer in .*expected tokenizer.json"
    ):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "vocab_size"])
def test_config_json_without_a_required_key_names_file_and_key(checkpoint, tmp_path, key):
    _copy(checkpoint, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf[key]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=rf"config\.json is missing the key '{key}'.*llama"):
        load_hf_checkpoint(tmp_path)


def test_config_json_that_is_not_json_names_the_file(checkpoint, tmp_path):
    _copy(checkpoint, tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object"):
        load_hf_checkpoint(tmp_path)


def test_quantized_tensors_and_dtypes_are_refused(checkpoint, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    st = SafetensorsFile(os.path.join(checkpoint, "model.safetensors"))
    _copy(checkpoint, tmp_path)
    tensors = {k: np.array(st.tensor(k)) for k in st.keys()}
    tensors[name] = np.zeros(tensors[name].shape, np.int8)
    write_safetensors(os.path.join(tmp_path, "model.safetensors"), tensors)
    with pytest.raises(ValueError, match=re.escape(f"'{name}'") + r".*dtype I8.*unquantized"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"dtype=float8_e4m3fn is not supported"):
        load_hf_checkpoint(checkpoint, dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match=r"param_dtype=int8 is not supported"):
        load_hf_checkpoint(checkpoint, param_dtype="int8")


def test_out_of_vocabulary_ids_and_a_full_cache_are_named():
    import jax.numpy as jnp

    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    tokens = np.array([[1, 2, 50], [3, -1, 4]], np.int32)
    with pytest.raises(
        ValueError, match=r"token ids must lie in \[0, vocab_size=50\), got \[-1, 50\]"
    ):
        model(jnp.asarray(tokens))
    ok = jnp.asarray(np.abs(tokens) % 50)
    _, cache = model.prefill(ok, jnp.ones((2, 3), bool), max_length=4)
    _, cache = model.decode_step(jnp.array([1, 2], jnp.int32), cache)  # fills slot 3 of 0..3
    with pytest.raises(
        ValueError, match=r"cache index 4 run past the end of the cache \(max_length=4\)"
    ):
        model.decode_step(jnp.array([1, 2], jnp.int32), cache)


def test_load_tokenizer_reads_a_local_tokenizer(tmp_path):
    from erpo_jax.models import load_tokenizer
    from erpo_jax.tasks import build_countdown_tokenizer

    build_countdown_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok("Numbers: 3 5\n")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "Numbers: 3 5\n"
