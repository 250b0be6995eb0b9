"""LoRA adapters: zero-init identity, per-call switch, adapter-only training, merging."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from erpo_jax.models import (
    Decoder,
    ModelConfig,
    add_lora,
    load_hf_checkpoint,
    merge_lora,
    save_hf_checkpoint,
)

CONFIG = ModelConfig("qwen3", 61, 32, 48, 2, 4, 2, 16, qk_norm=True)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.cache
def _base():
    return Decoder(CONFIG, rngs=nnx.Rngs(0))


def _inputs():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 61, (2, 7)), jnp.int32)
    mask = jnp.asarray(np.arange(7)[None] >= np.array([[0], [3]]))
    return tokens, mask


@nnx.jit
def _on_and_off(model, tokens, mask):
    """Adapters on and off in one traced call (what ARCA needs)."""
    return model(tokens, mask), model(tokens, mask, use_lora=False)


def _adapted(targets=ALL, scan_layers=False, perturb=True):
    model = nnx.clone(_base())
    model.scan_layers = scan_layers
    add_lora(model, rank=4, alpha=8.0, targets=targets, rngs=nnx.Rngs(1))
    if perturb:
        # Trained adapters: give B non-zero values so the adapters matter.
        for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
            if path[-1].endswith("_lora_b"):
                var.set_value(0.1 * jax.random.normal(jax.random.key(i), var[...].shape))
    return model


def test_zero_initialised_adapters_leave_logits_unchanged():
    tokens, mask = _inputs()
    base_logits = _on_and_off(_base(), tokens, mask)[0]
    on, off = _on_and_off(_adapted(perturb=False), tokens, mask)
    np.testing.assert_array_equal(on, base_logits)
    np.testing.assert_array_equal(off, base_logits)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_adapter_off_forward_is_the_base_model_in_the_same_call(scan_layers):
    tokens, mask = _inputs()
    base_logits = _on_and_off(_base(), tokens, mask)[0]
    on, off = _on_and_off(_adapted(scan_layers=scan_layers), tokens, mask)
    np.testing.assert_allclose(off, base_logits, atol=1e-6)
    assert np.abs(np.asarray(on - off)).max() > 1e-3


def test_lora_state_holds_only_adapters_with_the_right_shapes():
    model = _adapted(targets=("q_proj", "down_proj"), perturb=False)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    assert sorted(p[-1] for p in flat) == [
        "down_proj_lora_a", "down_proj_lora_b", "q_proj_lora_a", "q_proj_lora_b",
    ]  # fmt: skip
    assert flat[("layers", "q_proj_lora_a")][...].shape == (2, 32, 4)
    assert flat[("layers", "q_proj_lora_b")][...].shape == (2, 4, 64)
    assert flat[("layers", "down_proj_lora_a")][...].shape == (2, 48, 4)
    assert model.layers.lora_scale == 2.0


def test_only_lora_params_get_gradients_and_updates():
    model = _adapted()
    tokens, mask = _inputs()
    base_before = nnx.clone(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    lora_before = nnx.clone(nnx.state(model, nnx.LoRAParam))

    def loss(model):
        return jnp.mean(model(tokens, mask) ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
    grad_paths = [p for p, _ in nnx.to_flat_state(grads)]
    assert grad_paths and all(p[-1].split("_lora_")[-1] in ("a", "b") for p in grad_paths)
    assert all(np.abs(np.asarray(g[...])).max() > 0 for _, g in nnx.to_flat_state(grads))

    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)

    step(model, optimizer)
    for (_, before), (_, after) in zip(
        nnx.to_flat_state(base_before),
        nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam))),
        strict=True,
    ):
        np.testing.assert_array_equal(before[...], after[...])
    changed = [
        np.abs(np.asarray(a[...] - b[...])).max() > 0
        for (_, a), (_, b) in zip(
            nnx.to_flat_state(lora_before),
            nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)),
            strict=True,
        )
    ]
    assert all(changed)


def test_merge_and_save_keep_the_adapted_logits(tmp_path):
    model = _adapted()
    tokens, mask = _inputs()
    adapted = _on_and_off(model, tokens, mask)[0]

    save_hf_checkpoint(model, CONFIG, tmp_path)  # merges on the fly, model untouched
    assert nnx.state(model, nnx.LoRAParam)
    loaded, _ = load_hf_checkpoint(tmp_path)
    np.testing.assert_allclose(_on_and_off(loaded, tokens, mask)[0], adapted, atol=1e-5)

    merge_lora(model)
    assert not nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    np.testing.assert_allclose(_on_and_off(model, tokens, mask)[0], adapted, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank"),
        ({"targets": ("q_proj", "wq")}, "wq"),
        ({"targets": "q_proj"}, "targets"),
    ],
)
def test_bad_lora_arguments_are_named(kwargs, match):
    model = nnx.clone(_base())
    kw = {"rank": 2, "alpha": 4.0, "rngs": nnx.Rngs(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        add_lora(model, **kw)


def test_adding_adapters_twice_is_an_error():
    model = _adapted(perturb=False)
    with pytest.raises(ValueError, match="already has adapters"):
        add_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(0))
