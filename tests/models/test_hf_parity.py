"""Parity of the JAX decoder with the ``transformers`` PyTorch implementation.

Tiny random models of each family are built with torch, saved with
``save_pretrained`` and loaded with ``load_hf_checkpoint``; logits must agree
at real (non-padding) positions of a left-padded batch.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from erpo_jax.models import ModelConfig, load_hf_checkpoint, save_hf_checkpoint

torch = pytest.importorskip("torch", reason="parity tests need torch (CPU), a test-only dependency")

FAMILIES = ("qwen3", "qwen2", "llama")


@nnx.jit
def _forward(model, tokens, mask):
    return model(tokens, mask)


def _close(ours, ref, mask, atol=1e-4, rtol=1e-4):
    np.testing.assert_allclose(np.asarray(ours)[mask], ref[mask], atol=atol, rtol=rtol)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_with_left_padding(hf, hf_checkpoint, family, scan_layers):
    path, torch_model = hf_checkpoint(family)
    model, config = load_hf_checkpoint(path, scan_layers=scan_layers)
    assert config.model_type == family
    tokens, mask = hf.padded_batch()
    logits = _forward(model, jnp.asarray(tokens), jnp.asarray(mask))
    assert logits.dtype == jnp.float32
    assert logits.shape == (*tokens.shape, config.vocab_size)
    _close(logits, hf.torch_logits(torch_model, tokens, mask), mask)
    assert np.isfinite(np.asarray(logits)).all()  # padding rows too


@pytest.mark.parametrize("family", FAMILIES)
def test_config_and_param_count_match_transformers(hf_checkpoint, family):
    path, torch_model = hf_checkpoint(family)
    config = ModelConfig.from_hf(path)
    assert config == ModelConfig.from_hf(torch_model.config)
    assert config.num_params == sum(p.numel() for p in torch_model.parameters())
    assert ModelConfig.from_hf(config.to_hf()) == config


def test_hidden_states_times_unembedding_are_the_logits(hf, hf_checkpoint):
    path, _ = hf_checkpoint("qwen2")  # tied embeddings
    model, _ = load_hf_checkpoint(path)
    tokens, mask = hf.padded_batch(seed=1)
    hidden = model.hidden_states(jnp.asarray(tokens), jnp.asarray(mask))
    unembed = model.unembedding()
    assert unembed.shape == (model.config.hidden_size, model.config.vocab_size)
    np.testing.assert_allclose(
        np.asarray(hidden @ unembed),
        np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(mask))),
        atol=1e-5,
    )


def test_explicit_positions_override_the_mask(hf, hf_checkpoint):
    path, torch_model = hf_checkpoint("qwen3")
    model, _ = load_hf_checkpoint(path)
    tokens, _ = hf.padded_batch(seed=2)
    mask = np.ones_like(tokens, bool)
    positions = np.broadcast_to(np.arange(tokens.shape[1]) + 5, tokens.shape).astype(np.int32)
    ours = model(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions))
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor(tokens), position_ids=torch.tensor(positions)
        ).logits.numpy()
    _close(ours, ref, mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_transformers(hf, hf_checkpoint, tmp_path, family):
    from transformers import AutoModelForCausalLM

    path, torch_model = hf_checkpoint(family)
    model, config = load_hf_checkpoint(path)
    save_hf_checkpoint(model, config, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens, mask = hf.padded_batch(seed=3)
    # Bitwise: the same float32 weights go back into the same torch code.
    np.testing.assert_array_equal(
        hf.torch_logits(reloaded, tokens, mask), hf.torch_logits(torch_model, tokens, mask)
    )
    again, config_again = load_hf_checkpoint(tmp_path)
    assert config_again == config
    np.testing.assert_array_equal(
        np.asarray(_forward(again, jnp.asarray(tokens), jnp.asarray(mask))),
        np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(mask))),
    )


def test_sharded_checkpoints_load_and_save(hf, hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    _, torch_model = hf_checkpoint("llama")
    torch_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
    model, config = load_hf_checkpoint(tmp_path / "hf")
    tokens, mask = hf.padded_batch(seed=4)
    ref = hf.torch_logits(torch_model, tokens, mask)
    _close(_forward(model, jnp.asarray(tokens), jnp.asarray(mask)), ref, mask)

    save_hf_checkpoint(model, config, tmp_path / "ours", max_shard_bytes=40_000)
    with open(tmp_path / "ours" / "model.safetensors.index.json") as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    np.testing.assert_array_equal(hf.torch_logits(reloaded.eval(), tokens, mask), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_error_is_within_torchs_own_bfloat16_error(hf, hf_checkpoint, family):
    """bf16 parity with a justified tolerance.

    The yardstick is torch's own rounding: the same checkpoint run by
    ``transformers`` in bfloat16 differs from its float32 logits by e_torch.
    Our bfloat16 forward must stay within 2 x e_torch of the float32 logits at
    the worst position and 1.5 x on average. Measured on these tiny models:
    e_torch max 0.0035-0.0053, ours 0.0043-0.0048 (ratio 0.8-1.25); a real
    bug (RoPE, a norm, a mask) gives errors of order 0.1-1.
    """
    import copy

    path, torch_model = hf_checkpoint(family)
    model, _ = load_hf_checkpoint(path, dtype=jnp.bfloat16)
    assert model.embed[...].dtype == jnp.bfloat16
    tokens, mask = hf.padded_batch(seed=5)
    hidden = model.hidden_states(jnp.asarray(tokens), jnp.asarray(mask))
    assert hidden.dtype == jnp.bfloat16
    logits = _forward(model, jnp.asarray(tokens), jnp.asarray(mask))
    assert logits.dtype == jnp.float32
    ref32 = hf.torch_logits(torch_model, tokens, mask)[mask]
    ref16 = hf.torch_logits(copy.deepcopy(torch_model).to(torch.bfloat16), tokens, mask)[mask]
    e_torch = np.abs(ref16 - ref32)
    e_ours = np.abs(np.asarray(logits)[mask] - ref32)
    assert e_torch.max() > 1e-3 and e_ours.max() > 1e-4  # both really ran in bfloat16
    assert e_ours.max() <= 2.0 * e_torch.max(), (e_ours.max(), e_torch.max())
    assert e_ours.mean() <= 1.5 * e_torch.mean(), (e_ours.mean(), e_torch.mean())


def test_mesh_placement_gives_the_same_logits(hf, hf_checkpoint):
    path, torch_model = hf_checkpoint("qwen3")
    devices = np.array(jax.devices()[:1]).reshape(1, 1)
    mesh = jax.sharding.Mesh(devices, ("fsdp", "tensor"))
    model, _ = load_hf_checkpoint(path, mesh=mesh)
    sharding = model.layers.q_proj[...].sharding
    assert isinstance(sharding, jax.sharding.NamedSharding)
    assert sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    tokens, mask = hf.padded_batch(seed=6)
    _close(
        _forward(model, jnp.asarray(tokens), jnp.asarray(mask)),
        hf.torch_logits(torch_model, tokens, mask),
        mask,
    )
