"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) for the decoder.

A targeted projection ``y = x W`` becomes ``y = x W + (alpha / r) (x A) B``
with ``A [in, r]`` (uniform in ``±1/sqrt(in)``, as PEFT does) and ``B [r, out]``
initialised to zero, so a freshly adapted model computes exactly the base
logits. Adapters are stored stacked per layer beside the base weights, as
:class:`flax.nnx.LoRAParam` variables: ``nnx.state(model, nnx.LoRAParam)``
selects exactly the trainable adapters (pass ``wrt=nnx.LoRAParam`` to
``nnx.Optimizer``, or ``nnx.DiffState(0, nnx.LoRAParam)`` to ``nnx.grad``).
Every forward method takes ``use_lora``: ``False`` runs the base model in the
same traced call (ARCA needs the last hidden state with adapters on and off).

Why a small wrapper rather than ``qwix``: qwix adds LoRA by intercepting the
``dot_general``/``einsum`` calls of Flax layers matched by module path, which
does not see our stacked ``[L, in, out]`` weights used through plain
``einsum`` in a scanned block, and offers no per-call switch to turn adapters
off; it is also not a dependency of this project. The wrapper here is ~100
lines and keeps the adapters in the checkpoint-independent parameter layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from erpo_jax.models.decoder import _LINEARS, Decoder, DecoderLayers

__all__ = ["LORA_TARGETS", "add_lora", "merge_lora", "merged_layer_arrays"]

LORA_TARGETS: tuple[str, ...] = _LINEARS
"""Projections that can carry an adapter."""


def add_lora(
    model: Decoder,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    rngs: nnx.Rngs,
) -> Decoder:
    """Adds LoRA adapters to ``model`` in place (and returns it).

    Args:
      model: a :class:`Decoder` without adapters.
      rank: r, the adapter rank (positive).
      alpha: scale numerator; the update is multiplied by ``alpha / rank``.
      targets: projections to adapt, a subset of :data:`LORA_TARGETS`.
      rngs: randomness for ``A``.
    """
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"add_lora: rank must be a positive int, got {rank!r}")
    if isinstance(targets, str):
        raise ValueError(
            f"add_lora: targets must be a sequence of names, got the string {targets!r}"
        )
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(
            f"add_lora: targets={list(targets)} has unknown entries {unknown}; "
            f"expected a non-empty subset of {LORA_TARGETS}"
        )
    layers = model.layers
    present = [t for t in LORA_TARGETS if hasattr(layers, t + "_lora_a")]
    if present:
        raise ValueError(f"add_lora: model already has adapters on {present}; merge_lora first")
    for name in targets:
        w = getattr(layers, name)[...]
        num_layers, d_in, d_out = w.shape
        bound = 1.0 / float(d_in) ** 0.5
        a = jax.random.uniform(
            rngs.params(), (num_layers, d_in, rank), w.dtype, minval=-bound, maxval=bound
        )
        setattr(layers, name + "_lora_a", nnx.LoRAParam(a))
        setattr(
            layers, name + "_lora_b", nnx.LoRAParam(jnp.zeros((num_layers, rank, d_out), w.dtype))
        )
    layers.lora_scale = float(alpha) / rank
    return model


def merged_layer_arrays(layers: DecoderLayers) -> dict[str, jax.Array]:
    """The stacked base weights with every adapter folded in (``W + s A B``), adapters dropped.

    The product is taken in float32 and cast back to the weight's dtype.
    """
    arrays = layers.arrays()
    merged = {k: v for k, v in arrays.items() if "_lora_" not in k}
    for name in LORA_TARGETS:
        if name + "_lora_a" in arrays:
            a = arrays[name + "_lora_a"].astype(jnp.float32)
            b = arrays[name + "_lora_b"].astype(jnp.float32)
            w = merged[name]
            delta = layers.lora_scale * jnp.einsum(
                "lir,lro->lio", a, b, precision=jax.lax.Precision.HIGHEST
            )
            merged[name] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return merged


def merge_lora(model: Decoder) -> Decoder:
    """Folds the adapters into the base weights in place and removes them (returns ``model``)."""
    layers = model.layers
    merged = merged_layer_arrays(layers)
    for name in LORA_TARGETS:
        if hasattr(layers, name + "_lora_a"):
            getattr(layers, name).set_value(merged[name])
            delattr(layers, name + "_lora_a")
            delattr(layers, name + "_lora_b")
    layers.lora_scale = 0.0
    return model
