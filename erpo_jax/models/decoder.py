"""One Flax NNX decoder for Llama 3, Qwen2/2.5 and Qwen3.

Pre-norm blocks: ``x += attn(rmsnorm(x)); x += mlp(rmsnorm(x))`` with
grouped-query attention, rotary position embeddings (optionally Llama 3.1
scaled), optional q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3) and a
SwiGLU MLP. The families differ only in :class:`ModelConfig` fields.

The per-layer weights are stored stacked, ``[L, ...]``, in one
:class:`DecoderLayers` module, so the forward pass can either ``lax.scan``
over layers (``scan_layers=True``: one compiled block, fast compiles for deep
models) or unroll them (``False``) from the same parameters; checkpoints and
LoRA adapters do not depend on that choice. Linear weights are ``[in, out]``
(the transpose of PyTorch's layout).

Precision: parameters are kept in ``param_dtype`` and cast to the compute
``dtype`` at use; RMSNorm statistics, RoPE and the attention softmax are
float32 whatever ``dtype`` is, and logits are returned in float32.

Letters beyond ``erpo_jax.typing``: C cache slots, F MLP width.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Shaped

from erpo_jax.models.attention import attention, check_attention_impl, window_slots
from erpo_jax.models.config import ModelConfig
from erpo_jax.models.kv_cache import KVCache, init_kv_cache
from erpo_jax.ops import matmul_precision
from erpo_jax.typing import Array, Float, Int

__all__ = [
    "COMPUTE_DTYPES",
    "Decoder",
    "DecoderLayers",
    "check_dtype",
    "layer_param_shapes",
    "positions_from_mask",
    "rope_inv_freq",
]

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes a :class:`Decoder` computes and stores parameters in."""


def check_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """``jnp.dtype(dtype)`` if in :data:`COMPUTE_DTYPES`, else a ``ValueError`` naming ``name``."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(
            f"{name}={dtype!r} is not a dtype; use one of {', '.join(COMPUTE_DTYPES)}"
        ) from e
    if resolved.name not in COMPUTE_DTYPES:
        raise ValueError(
            f"{name}={resolved.name} is not supported; use one of {', '.join(COMPUTE_DTYPES)}"
            " (quantized and float8 weights are not supported)"
        )
    return resolved


_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of one layer's slice of every stacked parameter, by name.

    Linear weights are ``[in, out]``; a bias is ``<linear>_bias``.
    """
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "attn_norm": (d,),
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "mlp_norm": (d,),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    if config.qkv_bias:
        shapes.update(q_proj_bias=(q,), k_proj_bias=(kv,), v_proj_bias=(kv,))
    if config.o_bias:
        shapes["o_proj_bias"] = (d,)
    if config.mlp_bias:
        shapes.update(gate_proj_bias=(f,), up_proj_bias=(f,), down_proj_bias=(d,))
    if config.qk_norm:
        shapes.update(q_norm=(hd,), k_norm=(hd,))
    return shapes


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse rotary frequencies ``[head_dim // 2]`` (float32), scaling applied.

    ``llama3`` scaling follows Meta's Llama 3.1 reference: wavelengths longer
    than ``original_max_position_embeddings / low_freq_factor`` are stretched
    by ``factor``, shorter than ``.../high_freq_factor`` kept, a linear ramp in
    between.
    """
    dim = config.head_dim
    # float32 like the reference implementations, so positions agree bit for bit
    # in the exponent.
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.power(np.float32(config.rope_theta), exponent)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope_angles(config: ModelConfig, positions: Int[Array, "..."]) -> tuple[Array, Array]:
    """``(cos, sin)`` of the RoPE angles at ``positions``, each ``[..., H/2]`` float32."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(config))
    return jnp.cos(angles), jnp.sin(angles)


def _layer_slices(stacked: dict[str, Array], num_layers: int) -> tuple[dict[str, Array], ...]:
    """The stacked ``[L, ...]`` block parameters as one dict per block."""
    return tuple({name: a[i] for name, a in stacked.items()} for i in range(num_layers))


class DecodeConsts(NamedTuple):
    """Per-call constants of a decode loop (:meth:`Decoder.decode_consts`).

    Attributes:
      layers: one dict of parameters (LoRA included) per block, by name.
      cos, sin: ``[C, H/2]`` float32 RoPE tables for positions ``0 .. C - 1``.
    """

    layers: tuple[dict[str, jax.Array], ...]
    cos: Float[Array, "C H2"]
    sin: Float[Array, "C H2"]


def positions_from_mask(mask: Shaped[Array, "B S"]) -> Int[Array, "B S"]:
    """RoPE positions of a left-padded batch: real tokens count 0, 1, ...; padding gets 0."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


_FULL_WINDOW = 2**30  # a "window" no sequence reaches: full attention


def _layer_xs(params, windows):
    """The scan input over layers: the stacked parameters, with each layer's
    window when there are windows; :func:`_layer_x` splits one step's back out."""
    return params if windows is None else (params, jnp.asarray(windows, jnp.int32))


def _layer_x(xs, windows):
    """``(params, window)`` of one scan step over :func:`_layer_xs`."""
    return (xs, None) if windows is None else xs


def _windowed(visible, window):
    """``visible`` ``(q_slots, kv_mask, ...)`` with ``q_slots`` limited to a sliding window."""
    if window is None:
        return visible
    return (window_slots(visible[0], window), *visible[1:])


def _check_ids(tokens, vocab_size: int) -> None:
    """Out-of-vocabulary ids embed as NaN under ``jnp.take``: refuse them when they are concrete.

    Under ``jit`` the ids are traced and cannot be checked here; the sampler
    and trainer validate their inputs on the host before they are traced. A
    global array spread over several processes is checked through its
    replicated min and max (every process runs the same eager call).
    """
    if isinstance(tokens, jax.core.Tracer):
        return
    if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
        lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
        if tokens.size and (lo < 0 or hi >= vocab_size):
            raise ValueError(
                f"Decoder: token ids must lie in [0, vocab_size={vocab_size}), got ids "
                f"from {lo} to {hi} (padding positions too need an in-vocabulary id such "
                "as the pad id)"
            )
        return
    ids = np.asarray(tokens)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = np.unique(ids[(ids < 0) | (ids >= vocab_size)])[:5].tolist()
        raise ValueError(
            f"Decoder: token ids must lie in [0, vocab_size={vocab_size}), got {bad} "
            "(padding positions too need an in-vocabulary id such as the pad id)"
        )


def _rms_norm(x, weight, eps, dtype):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(dtype)


def _rope(x, cos, sin):
    """Rotates ``x [B, S, N, H]`` by angles given as ``cos``/``sin [B, S, 1, H/2]``."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x, w, precision):
    """``x [..., in] @ w [in, out]``, whose weight gradient takes the narrower operand first.

    The weight gradient contracts over every token: ``x^T dy``. Autodiff
    always emits it as ``dot(dy, x)`` (then transposes the ``[out, in]``
    result), and XLA:CPU lays the left operand out again for that
    contraction: for the MLP's gate and up projections that copies the
    ``[tokens, intermediate]`` gradient, the widest array of the backward
    pass (about a sixth of a tiny-Qwen3 update, measured on the 2-core
    Xeon). Here, when ``x`` has fewer features than ``dy``, the gradient is
    ``dot(x, dy)``, ``[in, out]`` directly; otherwise it is autodiff's. The
    input gradient is autodiff's too.

    A ``jax.custom_vjp``: reverse mode only, so ``jax.jvp`` / ``jacfwd``
    through the decoder are not supported (nothing here uses them).
    """
    return jnp.einsum("...i,io->...o", x, w, precision=precision)


def _project_fwd(x, w, precision):
    return _project(x, w, precision), (x, w)


def _project_bwd(precision, res, dy):
    x, w = res
    dx = jnp.einsum("...o,io->...i", dy, w, precision=precision).astype(x.dtype)
    tokens = tuple(range(x.ndim - 1))
    contract = ((tokens, tokens), ((), ()))
    if x.shape[-1] <= dy.shape[-1]:
        dw = jax.lax.dot_general(x, dy, contract, precision=precision)
    else:
        dw = jax.lax.dot_general(dy, x, contract, precision=precision).T
    return dx, dw.astype(w.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def _linear(x, p, name, *, dtype, use_lora, lora_scale):
    prec = matmul_precision(dtype)
    y = _project(x, p[name].astype(dtype), prec)
    if name + "_bias" in p:
        y = y + p[name + "_bias"].astype(dtype)
    if use_lora and name + "_lora_a" in p:
        a = p[name + "_lora_a"].astype(dtype)
        b = p[name + "_lora_b"].astype(dtype)
        xa = jnp.einsum("bsi,ir->bsr", x, a, precision=prec)
        y = y + lora_scale * jnp.einsum("bsr,ro->bso", xa, b, precision=prec)
    return y


def _block(p, x, cos, sin, visible, kv, *, config, dtype, use_lora, lora_scale, attend,
           gather=None):  # fmt: skip
    """One decoder block on ``x [B, S, D]``.

    ``visible`` is ``(q_slots [S], kv_mask [B, C])``, plus a shared
    prefix's ``(k, v, mask)`` for a cache that has one (see
    :mod:`erpo_jax.models.attention`). ``kv`` is ``None`` (attend within
    ``x``) or a function ``kv(k, v)`` that stores this block's new keys and
    values in the cache and returns the ``(k, v)`` to attend to. ``gather``
    (sequence parallelism) makes the normalized inputs of attention and the
    MLP whole along the sequence, so the tensor axis splits heads and hidden
    units there, not the sequence.
    """
    gather = gather or (lambda h: h)
    b, s, _ = x.shape
    hd = config.head_dim
    lin = functools.partial(_linear, p=p, dtype=dtype, use_lora=use_lora, lora_scale=lora_scale)

    h = gather(_rms_norm(x, p["attn_norm"], config.rms_norm_eps, dtype))
    q = lin(h, name="q_proj").reshape(b, s, config.num_heads, hd)
    k = lin(h, name="k_proj").reshape(b, s, config.num_kv_heads, hd)
    v = lin(h, name="v_proj").reshape(b, s, config.num_kv_heads, hd)
    if config.qk_norm:
        q = _rms_norm(q, p["q_norm"], config.rms_norm_eps, dtype)
        k = _rms_norm(k, p["k_norm"], config.rms_norm_eps, dtype)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    if kv is not None:
        k, v = kv(k, v)
    x = x + lin(attend(q, k, v, *visible), name="o_proj")

    h = gather(_rms_norm(x, p["mlp_norm"], config.rms_norm_eps, dtype))
    gate = lin(h, name="gate_proj")
    up = lin(h, name="up_proj")
    return x + lin(jax.nn.silu(gate) * up, name="down_proj")


class DecoderLayers(nnx.Module):
    """The stacked ``[L, ...]`` parameters of all decoder blocks.

    Attributes are :func:`layer_param_shapes` names with a leading L axis;
    LoRA adds ``<linear>_lora_a [L, in, r]`` and ``<linear>_lora_b [L, r, out]``
    (:class:`flax.nnx.LoRAParam`) and sets ``lora_scale``.
    """

    def __init__(self, config: ModelConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        for name, shape in layer_param_shapes(config).items():
            full = (config.num_layers, *shape)
            if name.endswith("norm"):
                value = jnp.ones(full, param_dtype)
            elif name.endswith("_bias"):
                value = jnp.zeros(full, param_dtype)
            else:
                value = init(rngs.params(), full, param_dtype)
            setattr(self, name, nnx.Param(value))
        self.lora_scale = 0.0

    def arrays(self) -> dict[str, jax.Array]:
        """Every stacked parameter (LoRA included) by name, as plain arrays."""
        return {
            name: value[...]
            for name, value in vars(self).items()
            if isinstance(value, nnx.Variable)
        }


class Decoder(nnx.Module):
    """Decoder-only language model (Llama 3, Qwen2/2.5, Qwen3).

    Args:
      config: the architecture.
      dtype: compute dtype of activations and matmuls (e.g. ``jnp.bfloat16``).
      param_dtype: storage dtype of parameters.
      scan_layers: ``lax.scan`` over the blocks instead of unrolling them, for
        the cache-free forward (training, reference log-probs): one compiled
        block, fast compiles for deep models. Cached prefill/decode always
        unroll, since the KV cache is per layer.
      remat: recompute each block's activations in the backward pass
        (``jax.checkpoint``), trading compute for memory.
      attention_impl: one of ``erpo_jax.models.attention.ATTENTION_IMPLS``:
        ``"xla"`` (all scores at once), ``"chunked"`` (blockwise online
        softmax, ``O(S * attention_block)`` memory forward and backward),
        ``"cudnn"`` (GPU), ``"splash"`` (the Pallas TPU kernel) or
        ``"auto"`` (picks by backend and length).
      attention_block: at most this many keys per block of the chunked
        implementation (the keys split into equal blocks).
      attention_mesh: the ``jax.sharding.Mesh`` activations are sharded over
        (the trainer's), or None; the ``splash`` kernel runs per device under
        ``shard_map`` on it (the other implementations need no mesh). Not a
        parameter: it is not saved with the weights.
      residual_sharding: a sharding for the ``[B, S, D]`` residual stream
        between blocks in the cache-free forward (training, scoring), or
        None. ``NamedSharding(mesh, P(("data", "fsdp"), "tensor"))`` splits
        the sequence over the tensor axis (sequence parallelism): the block
        inputs that ``remat`` keeps for the backward pass then take
        ``1 / tensor`` of the memory, and the compiler gathers the sequence
        for attention and the MLP; ``P(("data", "fsdp"), None)`` pins only
        the rows, which keeps an ``fsdp`` mesh data-parallel (weights
        gathered, not activations; ``erpo_jax.train.residual_sharding``
        gives the trainer's choice). Cached prefill and decoding ignore it.
        Not a parameter: it is not saved with the weights.
      rngs: initialization randomness (weights ~ N(0, 0.02), norms 1, biases 0).

    Use ``model(tokens, mask)`` for logits, :meth:`hidden_states` plus
    :meth:`unembedding` with ``erpo_jax.ops.token_logp_and_entropy`` for a
    memory-bounded training head, and :meth:`init_cache` / :meth:`prefill` /
    :meth:`decode_step` (or :meth:`extend`) for sampling.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        scan_layers: bool = False,
        remat: bool = False,
        attention_impl: str = "auto",
        attention_block: int = 512,
        residual_sharding: jax.sharding.Sharding | None = None,
        attention_mesh: jax.sharding.Mesh | None = None,
        rngs: nnx.Rngs,
    ):
        check_attention_impl(attention_impl)
        if attention_block < 1:
            raise ValueError(f"attention_block={attention_block} must be >= 1")
        self.config = config
        self.dtype = check_dtype(dtype, "dtype")
        self.param_dtype = check_dtype(param_dtype, "param_dtype")
        self.scan_layers = scan_layers
        self.remat = remat
        self.attention_impl = attention_impl
        self.attention_block = attention_block
        self.residual_sharding = residual_sharding
        self.attention_mesh = attention_mesh
        init = nnx.initializers.normal(0.02)
        v, d = config.vocab_size, config.hidden_size
        self.embed = nnx.Param(init(rngs.params(), (v, d), param_dtype))
        self.layers = DecoderLayers(config, param_dtype=param_dtype, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((d,), param_dtype))
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nnx.Param(init(rngs.params(), (d, v), param_dtype))
        )

    # ---------------------------------------------------------------- forward

    def __call__(
        self,
        tokens: Int[Array, "B S"],
        mask: Shaped[Array, "B S"] | None = None,
        positions: Int[Array, "B S"] | None = None,
        *,
        use_lora: bool = True,
    ) -> Float[Array, "B S V"]:
        """Next-token logits, float32.

        Args:
          tokens: ``[B, S]`` token ids.
          mask: ``[B, S]`` bool or 0/1, True on real tokens (padding is never
            attended to). Default: all real.
          positions: ``[B, S]`` RoPE positions. Default: from ``mask``
            (:func:`positions_from_mask`), so left padding is handled.
          use_lora: apply LoRA adapters if the model has them; ``False`` gives
            the base model in the same call.

        Returns:
          ``[B, S, V]`` float32 logits; rows at padding positions are finite
          but meaningless.
        """
        hidden = self.hidden_states(tokens, mask, positions, use_lora=use_lora)
        return self._logits(hidden)

    def hidden_states(
        self,
        tokens: Int[Array, "B S"],
        mask: Shaped[Array, "B S"] | None = None,
        positions: Int[Array, "B S"] | None = None,
        *,
        use_lora: bool = True,
    ) -> Float[Array, "B S D"]:
        """Final hidden states (after the last RMSNorm, before unembedding), in ``dtype``.

        Arguments as in :meth:`__call__`. ``hidden @ unembedding()`` are the logits.
        """
        b, s = tokens.shape
        mask = jnp.ones((b, s), bool) if mask is None else mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(mask)
        x = self._embed(tokens)
        visible = (jnp.arange(s, dtype=jnp.int32), mask)
        x, _ = self._run_layers(x, positions, visible, None, use_lora=use_lora)
        return _rms_norm(x, self.final_norm[...], self.config.rms_norm_eps, self.dtype)

    def shared_prefix_hidden_states(
        self,
        prompt_tokens: Int[Array, "P S"],
        prompt_mask: Shaped[Array, "P S"],
        tokens: Int[Array, "B T"],
        mask: Shaped[Array, "B T"],
        *,
        use_lora: bool = True,
    ) -> tuple[Float[Array, "P S D"], Float[Array, "B T D"]]:
        """Hidden states of ``P`` prompts and ``B = P * G`` continuations, each prompt run once.

        Row ``b`` of ``tokens`` continues prompt ``b // G`` (a group's rows are
        contiguous, as the trainer lays them out). The result equals
        :meth:`hidden_states` on ``concat(prompt repeated G times, tokens)``
        split at ``S``, up to float rounding, while the prompt's positions
        are computed ``P`` times instead of ``B``: the training forward of a
        GRPO group shares its prompt as the sampler's prefill does.

        Args:
          prompt_tokens, prompt_mask: ``[P, S]`` left-padded prompts, each with
            at least one real token.
          tokens, mask: ``[B, T]`` continuations; positions continue from the
            prompt's real tokens counting only ``mask``-True tokens, and
            padding is never attended to (as in :meth:`hidden_states`).
          use_lora: as in :meth:`__call__`.

        Returns:
          ``(prompt_hidden [P, S, D], hidden [B, T, D])`` in ``dtype``.
        """
        p, s = prompt_tokens.shape
        b, t = tokens.shape
        if p == 0 or b % p:
            raise ValueError(
                f"shared_prefix_hidden_states: {b} continuation rows do not split evenly over "
                f"{p} prompts"
            )
        group = b // p
        prompt_mask = prompt_mask.astype(bool)
        mask = mask.astype(bool)
        count = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)
        # As positions_from_mask over the concatenated row: real tokens count on
        # from the prompt's; every prompt has a real token, so these are >= 0.
        positions = jnp.repeat(count, group)[:, None] + jnp.cumsum(mask, -1, dtype=jnp.int32) - 1
        vis_p = (jnp.arange(s, dtype=jnp.int32), prompt_mask)
        vis_c = (
            s + jnp.arange(t, dtype=jnp.int32),
            jnp.concatenate([jnp.repeat(prompt_mask, group, axis=0), mask], axis=1),
        )
        xp, xc = self._run_layers_shared(
            self._embed(prompt_tokens),
            self._embed(tokens),
            self._rope_tables(positions_from_mask(prompt_mask)),
            self._rope_tables(jnp.maximum(positions, 0)),
            vis_p,
            vis_c,
            group,
            use_lora=use_lora,
        )
        eps = self.config.rms_norm_eps
        return (
            _rms_norm(xp, self.final_norm[...], eps, self.dtype),
            _rms_norm(xc, self.final_norm[...], eps, self.dtype),
        )

    def unembedding(self) -> Float[Array, "D V"]:
        """The ``[D, V]`` unembedding matrix in ``dtype`` (the transposed embedding when tied)."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return w.astype(self.dtype)

    # --------------------------------------------------------------- KV cache

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty :class:`KVCache` of ``max_length`` slots in the compute dtype."""
        c = self.config
        return init_kv_cache(
            num_layers=c.num_layers,
            batch_size=batch_size,
            max_length=max_length,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            dtype=self.dtype,
        )

    def extend(
        self,
        tokens: Int[Array, "B S"],
        mask: Shaped[Array, "B S"],
        cache: KVCache,
        *,
        use_lora: bool = True,
        fresh: bool = False,
        consts: DecodeConsts | None = None,
    ) -> tuple[Float[Array, "B S D"], KVCache]:
        """Runs ``S`` new tokens against the cache and appends them to it.

        The tokens go to slots ``cache.index .. cache.index + S - 1`` of every
        row; each attends to the valid cached slots and to the new tokens up to
        itself (and first to a shared prefix's real slots, for a cache made
        by :func:`~erpo_jax.models.share_kv_prefix`). Positions continue from
        ``cache.positions`` counting only tokens with ``mask`` True. The caller
        keeps ``cache.index + S <= cache.max_length`` (``dynamic_update_slice``
        would clamp silently).

        Args:
          tokens: ``[B, S]`` ids (a left-padded prompt, or one new token per row).
          mask: ``[B, S]``, True on real tokens.
          cache: from :meth:`init_cache` or a previous call.
          use_lora: as in :meth:`__call__`.
          fresh: the cache is empty (``index == 0``; a prefill). The new
            tokens then attend only to each other, ``[S, S]`` scores instead
            of ``[S, C]`` against the empty future slots.
          consts: this model's :meth:`decode_consts` for this cache (or a
            longer one, e.g. a cache that grows between decode loops), made
            once by the caller outside its decode loop, or None to derive
            them here. XLA does not hoist them out of a ``while_loop``:
            derived inside, every step copies each layer's weights out of
            the stacked arrays and recomputes the RoPE sines and cosines
            per use.

        Returns:
          ``(hidden [B, S, D], cache)``: final hidden states of the new tokens
          and the updated cache.
        """
        s = tokens.shape[1]
        if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + s > cache.max_length:
            raise ValueError(
                f"extend/decode_step: {s} new token(s) at cache index {int(cache.index)} run past "
                f"the end of the cache (max_length={cache.max_length}); allocate a longer cache "
                "with init_cache / prefill(max_length=...)"
            )
        mask = mask.astype(bool)
        positions = cache.positions[:, None] + positions_from_mask(mask)
        positions = jnp.where(mask, positions, 0)
        total = cache.prefix_length + cache.max_length
        if consts is not None and consts.cos.shape[0] < total:
            raise ValueError(
                f"extend: consts are for a cache of {consts.cos.shape[0]} slots, the cache has "
                f"{total}; make them with decode_consts(max_length={total}) (or longer)"
            )
        if fresh and cache.prefix is not None:
            raise ValueError(
                "extend: fresh=True is for an empty cache, and this one has a shared prefix "
                "(share_kv_prefix); extend it with fresh=False"
            )
        slot_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
        if fresh:
            visible = (jnp.arange(s, dtype=jnp.int32), mask)
        else:
            visible = (cache.index + jnp.arange(s, dtype=jnp.int32), slot_mask)
        x = self._embed(tokens)
        x, (k, v) = self._run_layers(
            x,
            positions,
            visible,
            (cache.k, cache.v, cache.index, cache.prefix),
            use_lora=use_lora,
            fresh=fresh,
            consts=consts,
        )
        hidden = _rms_norm(x, self.final_norm[...], self.config.rms_norm_eps, self.dtype)
        new_cache = KVCache(
            k=k,
            v=v,
            mask=slot_mask,
            positions=cache.positions + jnp.sum(mask, axis=-1, dtype=jnp.int32),
            index=cache.index + s,
            prefix=cache.prefix,
        )
        return hidden, new_cache

    def prefill(
        self,
        tokens: Int[Array, "B S"],
        mask: Shaped[Array, "B S"],
        *,
        max_length: int,
        use_lora: bool = True,
    ) -> tuple[Float[Array, "B V"], KVCache]:
        """Fills a fresh cache of ``max_length`` slots with a left-padded prompt batch.

        Returns:
          ``(logits [B, V] float32 of the next token after each prompt, cache)``.
        """
        b, s = tokens.shape
        if s > max_length:
            raise ValueError(f"prefill: prompt length {s} exceeds max_length={max_length}")
        cache = self.init_cache(b, max_length)
        hidden, cache = self.extend(tokens, mask, cache, use_lora=use_lora, fresh=True)
        return self._logits(hidden[:, -1]), cache

    def decode_step(
        self,
        tokens: Int[Array, " B"],
        cache: KVCache,
        *,
        use_lora: bool = True,
        consts: DecodeConsts | None = None,
    ) -> tuple[Float[Array, "B V"], KVCache]:
        """Appends one token per row; returns ``(next-token logits [B, V] float32, cache)``.

        ``consts``: see :meth:`extend`; a decode loop makes them once, outside
        the loop, with :meth:`decode_consts`.
        """
        hidden, cache = self.extend(
            tokens[:, None],
            jnp.ones((tokens.shape[0], 1), bool),
            cache,
            use_lora=use_lora,
            consts=consts,
        )
        return self._logits(hidden[:, 0]), cache

    def decode_consts(self, max_length: int) -> DecodeConsts:
        """What every decode step against a ``max_length``-slot cache reuses:
        each block's parameters sliced out of the stacked arrays, and the RoPE
        table of positions ``0 .. max_length - 1`` (a row's position never
        reaches its cache length). Make them once, outside a decode loop, and
        pass them to :meth:`decode_step` / :meth:`extend`."""
        layers = _layer_slices(self.layers.arrays(), self.config.num_layers)
        cos, sin = _rope_angles(self.config, jnp.arange(max_length, dtype=jnp.int32))
        return DecodeConsts(layers=layers, cos=cos, sin=sin)

    # ---------------------------------------------------------------- helpers

    def _logits(self, hidden):
        return jnp.einsum("...d,dv->...v", hidden, self.unembedding(),
                          preferred_element_type=jnp.float32,
                          precision=matmul_precision(hidden.dtype))  # fmt: skip

    def _embed(self, tokens):
        _check_ids(tokens, self.config.vocab_size)
        return jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)

    def _rope_tables(self, positions):
        """``(cos, sin)``, each ``[B, S, 1, H/2]`` float32, for RoPE at ``positions [B, S]``."""
        cos, sin = _rope_angles(self.config, positions)
        return cos[:, :, None], sin[:, :, None]

    def _windows(self) -> tuple[int, ...] | None:
        """Each layer's sliding window in keys, or None when every layer attends fully.

        A full-attention layer among sliding ones gets :data:`_FULL_WINDOW`,
        longer than any sequence (the layers may be scanned, one program).
        """
        c = self.config
        if not c.sliding_layers:
            return None
        assert c.sliding_window is not None  # ModelConfig checks it
        return tuple(
            c.sliding_window if i in c.sliding_layers else _FULL_WINDOW for i in range(c.num_layers)
        )

    def _pins(self, sharding, rows):
        """``(pin, unpin)`` for a residual stream of ``rows`` rows under ``sharding``.

        ``pin`` fixes the ``[B, S, D]`` residual's sharding between blocks;
        ``unpin`` makes the sequence whole (rows keep their sharding) for block
        internals and the head. Both are the identity without a sharding, or
        when ``rows`` does not divide over the row axes (a shared-prefix
        forward's prompt rows): the compiler then places those rows.
        """
        if sharding is None:
            return (lambda x: x), (lambda x: x)
        axes = sharding.spec[0] if len(sharding.spec) else None
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if rows % math.prod(sharding.mesh.shape[a] for a in names):
            return (lambda x: x), (lambda x: x)
        row_only = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(axes))

        def pin(x):
            # Outside the checkpoint, so the block inputs remat saves are pinned.
            return jax.lax.with_sharding_constraint(x, sharding)

        def unpin(x):
            return jax.lax.with_sharding_constraint(x, row_only)

        return pin, unpin

    def _block_fn(self, *, use_lora, gather, keys_transposed=False, causal_offset=None):
        """``causal_offset``: see :func:`~erpo_jax.models.attention.attention` (the
        block's queries sit at slots ``causal_offset + arange(S)`` of its keys)."""
        return functools.partial(
            _block,
            config=self.config,
            dtype=self.dtype,
            use_lora=use_lora,
            lora_scale=self.layers.lora_scale,
            attend=functools.partial(
                attention,
                impl=self.attention_impl,
                block_size=self.attention_block,
                mesh=self.attention_mesh,
                keys_transposed=keys_transposed,
                causal_offset=causal_offset,
            ),
            gather=gather,
        )

    def _run_layers(self, x, positions, visible, cache, *, use_lora, fresh=False, consts=None):
        """All blocks; ``cache`` is None or ``(k, v, index, prefix)`` with per-layer tuples
        ``k``, ``v`` and a :class:`SharedPrefix` or None.

        ``fresh``: attend to the new keys only (the cache is empty before them).
        ``consts``: :meth:`decode_consts` for the cache, or None.

        Returns ``(x, (k, v))`` with the updated per-layer cache tuples (or ``(x, None)``).
        """
        if consts is None:
            cos, sin = self._rope_tables(positions)
        else:  # table lookups: no sines or cosines in the loop
            cos = jnp.take(consts.cos, positions, axis=0, mode="clip")[:, :, None]
            sin = jnp.take(consts.sin, positions, axis=0, mode="clip")[:, :, None]
        params = self.layers.arrays()
        sharding = self.residual_sharding if cache is None else None
        pin, unpin = self._pins(sharding, x.shape[0])
        # A cached step attends to the cache's keys as stored, slots minor.
        # Cache-free and fresh (prefill) calls attend their own keys from
        # slot 0: queries at slots arange(S) (causal_offset 0).
        block = self._block_fn(
            use_lora=use_lora,
            gather=unpin,
            keys_transposed=cache is not None and not fresh,
            causal_offset=0 if cache is None or fresh else None,
        )

        def layer(p, x, cache_k, cache_v, prefix=None, window=None):
            """A block; this layer's ``cache_k [B, K, H, C]``, ``cache_v [B, K, C, H]``; or None.

            ``prefix``: this layer's shared-prefix ``(k, v, mask)``, or None.
            ``window``: this layer's sliding window (see :meth:`_windows`), or None."""
            kv = None
            if cache_k is not None:
                index = cache[2]

                def kv(k, v):
                    nonlocal cache_k, cache_v
                    zero = jnp.zeros((), jnp.int32)
                    kt = jnp.swapaxes(k, 2, 3).astype(cache_k.dtype)
                    cache_k = jax.lax.dynamic_update_slice(cache_k, kt, (zero, zero, zero, index))
                    start = (zero, zero, index, zero)
                    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
                    if fresh:
                        return k.astype(cache_k.dtype), v.astype(cache_v.dtype)
                    return cache_k, cache_v

            vis = _windowed(visible, window)
            vis = vis if prefix is None else (*vis, prefix)
            x = block(p, x, cos, sin, vis, kv)
            return x, cache_k, cache_v

        if self.remat:
            layer = jax.checkpoint(layer)
        num_layers = self.config.num_layers
        windows = self._windows()
        x = pin(x)
        if self.scan_layers and cache is None:

            def step(x, xs):
                p, window = _layer_x(xs, windows)
                return pin(layer(p, x, None, None, window=window)[0]), None

            x, _ = jax.lax.scan(step, x, _layer_xs(params, windows))
            return unpin(x), None
        # With a KV cache the layers are always unrolled: scanning would stack
        # and split the per-layer caches (a full copy) at every decode step.
        layers = _layer_slices(params, num_layers) if consts is None else consts.layers
        new_k, new_v = [], []
        shared = None if cache is None else cache[3]
        for i, p in enumerate(layers):
            ck, cv = (None, None) if cache is None else (cache[0][i], cache[1][i])
            pre = None if shared is None else (shared.k[i], shared.v[i], shared.mask)
            x, ck, cv = layer(p, x, ck, cv, pre, None if windows is None else windows[i])
            x = pin(x)
            new_k.append(ck)
            new_v.append(cv)
        return unpin(x), (None if cache is None else (tuple(new_k), tuple(new_v)))

    def _run_layers_shared(self, xp, xc, rope_p, rope_c, vis_p, vis_c, group, *, use_lora):
        """All blocks over ``P`` prompts ``xp`` and their ``P * group`` continuations ``xc``.

        Each block runs the prompts on their own (causal among themselves),
        then the continuations against ``concat(their prompt's keys, their
        own)``, the prompt keys repeated to the ``group`` rows of each prompt.
        """
        params = self.layers.arrays()
        sharding = self.residual_sharding
        pin_p, unpin_p = self._pins(sharding, xp.shape[0])
        pin_c, unpin_c = self._pins(sharding, xc.shape[0])
        # The prompts attend their own keys from slot 0; the continuations
        # sit after their prompt's S keys (q_slots S + arange(T)).
        block_p = self._block_fn(use_lora=use_lora, gather=unpin_p, causal_offset=0)
        block_c = self._block_fn(use_lora=use_lora, gather=unpin_c, causal_offset=xp.shape[1])

        def layer(p, xp, xc, window=None):
            prefix = []

            def keep(k, v):
                prefix.append((k, v))
                return k, v

            xp = block_p(p, xp, *rope_p, _windowed(vis_p, window), keep)
            kp, vp = prefix[0]

            def after_prompt(k, v):
                # [P, K, S, H] -> [B, K, S, H], then the new keys: [B, K, S + T, H].
                def join(a, b):
                    return jnp.concatenate([jnp.repeat(a, group, axis=0), b], axis=2)

                return join(kp, k), join(vp, v)

            return xp, block_c(p, xc, *rope_c, _windowed(vis_c, window), after_prompt)

        if self.remat:
            layer = jax.checkpoint(layer)

        def pinned(p, xp, xc, window=None):
            # Pinned outside the checkpoint, as in _run_layers.
            xp, xc = layer(p, xp, xc, window)
            return pin_p(xp), pin_c(xc)

        windows = self._windows()
        xp, xc = pin_p(xp), pin_c(xc)
        if self.scan_layers:

            def step(carry, xs):
                p, window = _layer_x(xs, windows)
                return pinned(p, *carry, window), None

            (xp, xc), _ = jax.lax.scan(step, (xp, xc), _layer_xs(params, windows))
        else:
            for i in range(self.config.num_layers):
                w = None if windows is None else windows[i]
                xp, xc = pinned(jax.tree.map(lambda a, i=i: a[i], params), xp, xc, w)
        return unpin_p(xp), unpin_c(xc)
