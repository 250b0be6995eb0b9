"""Grouped-query softmax attention, by implementation: ``xla``, ``chunked``, ``cudnn``, ``auto``.

Every implementation computes the same function. Queries ``q [B, S, N, H]``
attend to keys and values ``k, v [B, K, C, H]`` (heads before slots: the KV
cache layout; K divides N). Which keys a query may see is given by two small
arrays instead of a ``[B, S, C]`` mask, so long sequences never materialize
one:

- ``q_slots [S]`` int32: the slot of each query in the key axis. A query sees
  the keys at slots ``<= q_slot`` (causal). A cache-free forward has
  ``q_slots = arange(S)``; a cached extend has ``cache.index + arange(S)``.
- ``kv_mask [B, C]`` bool: which slots hold real tokens (left padding,
  unwritten cache slots are False).

A query with no visible key (a padding position) attends uniformly over all
``C`` slots; its output is finite and meaningless, as the reference's is.
Scores, the softmax and its statistics are float32 whatever the input dtype.

Implementations:

- ``xla``: scores for all ``S x C`` pairs at once (``[B, N, S, C]`` float32).
  Fastest for short sequences and single-token decode steps.
- ``chunked``: blockwise over keys with an online softmax (pure JAX), and a
  hand-written backward (``jax.custom_vjp``) that recomputes each block's
  probabilities from the saved log-sum-exp instead of storing them, so
  memory is ``O(S * block)`` in the forward and the backward. Works on every
  backend.
- ``cudnn``: ``jax.nn.dot_product_attention(..., implementation="cudnn")``,
  the fused cuDNN kernel (GPU; float16 or bfloat16 inputs).
- ``auto``: ``cudnn`` on GPU for half-precision inputs, ``chunked`` where
  the score matrix would be large (``S * C >= 2**20``), ``xla`` otherwise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from erpo_jax.typing import Array, Bool, Float, Int

__all__ = ["ATTENTION_IMPLS", "attention", "resolve_attention_impl"]

ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn")
"""Accepted values of ``attention_impl`` (``Decoder``, ``load_hf_checkpoint``)."""

# Above this many (query, key) pairs per row and head, ``auto`` uses ``chunked``.
_AUTO_CHUNK_PAIRS = 1 << 20
_NEG = float(jnp.finfo(jnp.float32).min)
# The chunked path pads the key axis to whole blocks. Masked keys score
# _MASKED and padded slots _PADDED, so exp(_PADDED - _MASKED) == 0: a query
# with no visible key averages over the C real slots exactly as ``xla`` does.
_MASKED = -1e38
_PADDED = _NEG


def check_attention_impl(impl: str) -> str:
    """``impl`` if it is one of :data:`ATTENTION_IMPLS`, else a ``ValueError`` naming them."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    return impl


def resolve_attention_impl(impl: str, *, s: int, c: int, dtype: jnp.dtype) -> str:
    """The concrete implementation ``impl`` means for ``S`` queries over ``C`` slots."""
    if check_attention_impl(impl) != "auto":
        return impl
    if s == 1:
        return "xla"  # a decode step: the scores are [B, N, 1, C], nothing to save
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and half:
        return "cudnn"
    return "chunked" if s * c >= _AUTO_CHUNK_PAIRS else "xla"


def attention(
    q: Float[Array, "B S N H"],
    k: Float[Array, "B K C H"],
    v: Float[Array, "B K C H"],
    q_slots: Int[Array, " S"],
    kv_mask: Bool[Array, "B C"],
    *,
    impl: str = "xla",
    block_size: int = 512,
) -> Float[Array, "B S NH"]:
    """Softmax attention of ``q`` over ``k, v``; returns ``[B, S, N * H]`` in ``v``'s dtype.

    Args:
      q, k, v, q_slots, kv_mask: see the module docstring.
      impl: one of :data:`ATTENTION_IMPLS`.
      block_size: keys per block of the ``chunked`` implementation.
    """
    s, n = q.shape[1], q.shape[2]
    kh, c = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"attention: {n} query heads are not a multiple of {kh} key heads")
    impl = resolve_attention_impl(impl, s=s, c=c, dtype=q.dtype)
    if impl == "xla":
        return _xla(q, k, v, q_slots, kv_mask)
    if impl == "chunked":
        return _chunked_attention(q, k, v, q_slots, kv_mask, block_size=block_size)
    return _dot_product_attention(q, k, v, q_slots, kv_mask, implementation=impl)


def _allowed(q_slots, kv_mask, slots):
    """``[B, S, c]`` bool: causal by slot, and only real keys."""
    return (slots[None, None, :] <= q_slots[None, :, None]) & kv_mask[:, None, :]


def _group(q, kh):
    """``[B, S, N, H] -> [B, K, G*S, H]``: the G query heads of a key head stacked into rows."""
    b, s, n, h = q.shape
    g = n // kh
    return q.reshape(b, s, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * s, h)


def _ungroup(out, s):
    """``[B, K, G*S, H] -> [B, S, K*G*H]``."""
    b, kh, gs, h = out.shape
    g = gs // s
    return out.reshape(b, kh, g, s, h).transpose(0, 3, 1, 2, 4).reshape(b, s, kh * g * h)


def _xla(q, k, v, q_slots, kv_mask):
    b, s, n, h = q.shape
    kh, c = k.shape[1], k.shape[2]
    g = n // kh
    # Batched [batch, kv-head] matmuls against k and v as stored: no transpose
    # of the keys or values, which for a KV cache would copy the whole cache
    # at every decode step.
    qg = _group(q, kh)
    scores = jnp.einsum("bkqh,bkch->bkqc", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(h))
    allowed = _allowed(q_slots, kv_mask, jnp.arange(c))
    allowed = jnp.broadcast_to(allowed[:, None, None], (b, 1, g, s, c)).reshape(b, 1, g * s, c)
    scores = jnp.where(allowed, scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return _ungroup(jnp.einsum("bkqc,bkch->bkqh", probs, v), s)


# ---------------------------------------------------------------- chunked


def _key_blocks(k, v, kv_mask, block):
    """``(xs, nb)``: keys, values, mask and slot ids padded to ``nb`` whole blocks, block-major.

    ``xs`` is ``(k [nb, B, K, block, H], v [same], kv_mask [nb, B, block],
    slots [nb, block])``, the ``lax.scan`` input of the forward and backward.
    """
    c = k.shape[2]
    nb = -(-c // block)
    pad = nb * block - c
    if pad:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        kv_mask = jnp.pad(kv_mask, ((0, 0), (0, pad)))

    def blocks(x, axis):  # split ``axis`` into nb blocks, block index first
        x = x.reshape(*x.shape[:axis], nb, block, *x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    slots = jnp.arange(nb * block, dtype=jnp.int32).reshape(nb, block)
    return (blocks(k, 2), blocks(v, 2), blocks(kv_mask, 1), slots), nb


def _block_scores(qg, kb, q_slots, mask_b, slots_b, g, scale, c):
    """Masked float32 scores ``[B, K, G*S, c]`` of the grouped queries against one key block."""
    b = qg.shape[0]
    s = q_slots.shape[0]
    scores = jnp.einsum("bkqh,bkch->bkqc", qg, kb, preferred_element_type=jnp.float32) * scale
    allowed = _allowed(q_slots, mask_b, slots_b)  # [B, S, c]
    allowed = jnp.broadcast_to(allowed[:, None, None], (b, 1, g, s, slots_b.shape[0]))
    allowed = allowed.reshape(b, 1, g * s, -1)
    scores = jnp.where(allowed, scores, _MASKED)
    return jnp.where(slots_b < c, scores, _PADDED), allowed


def _chunked_forward(qg, k, v, q_slots, kv_mask, g, block):
    """``(out [B, K, G*S, H] float32, (m, denom))`` by an online softmax over key blocks.

    ``m`` is each row's running maximum score and ``denom`` its softmax
    denominator at ``m``; the backward recomputes ``p = exp(s - m) / denom``.
    """
    h, c = qg.shape[-1], k.shape[2]
    scale = 1.0 / math.sqrt(h)
    xs, _ = _key_blocks(k, v, kv_mask, block)
    rows = qg.shape[:3]

    def body(carry, x):
        m, denom, acc = carry
        kb, vb, mask_b, slots_b = x
        scores, _ = _block_scores(qg, kb, q_slots, mask_b, slots_b, g, scale, c)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[..., None])
        denom = denom * correction + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkqc,bkch->bkqh", p.astype(vb.dtype), vb,
                        preferred_element_type=jnp.float32)  # fmt: skip
        acc = acc * correction[..., None] + pv
        return (m_new, denom, acc), None

    init = (
        jnp.full(rows, -jnp.inf, jnp.float32),
        jnp.zeros(rows, jnp.float32),
        jnp.zeros((*rows, h), jnp.float32),
    )
    (m, denom, acc), _ = jax.lax.scan(body, init, xs)
    return acc / denom[..., None], (m, denom)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunked_core(qg, k, v, q_slots, kv_mask, g, block):
    out, _ = _chunked_forward(qg, k, v, q_slots, kv_mask, g, block)
    return out


def _chunked_core_fwd(qg, k, v, q_slots, kv_mask, g, block):
    out, (m, denom) = _chunked_forward(qg, k, v, q_slots, kv_mask, g, block)
    return out, (qg, k, v, q_slots, kv_mask, out, m, denom)


def _chunked_core_bwd(g, block, res, d_out):
    qg, k, v, q_slots, kv_mask, out, m, denom = res
    h = qg.shape[-1]
    c = k.shape[2]
    scale = 1.0 / math.sqrt(h)
    xs, nb = _key_blocks(k, v, kv_mask, block)
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)  # [B, K, G*S]

    def body(dq, x):
        kb, vb, mask_b, slots_b = x
        scores, allowed = _block_scores(qg, kb, q_slots, mask_b, slots_b, g, scale, c)
        p = jnp.exp(scores - m[..., None]) / denom[..., None]  # the forward's, recomputed
        dv = jnp.einsum("bkqc,bkqh->bkch", p, d_out)
        dp = jnp.einsum("bkqh,bkch->bkqc", d_out, vb.astype(jnp.float32))
        # Masked scores are constants (as jnp.where makes them in ``xla``).
        ds = jnp.where(allowed, p * (dp - delta[..., None]) * scale, 0.0)
        dq = dq + jnp.einsum("bkqc,bkch->bkqh", ds, kb.astype(jnp.float32))
        dk = jnp.einsum("bkqc,bkqh->bkch", ds, qg.astype(jnp.float32))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(qg.shape, jnp.float32), xs)

    def unblock(x):  # [nb, B, K, block, H] -> [B, K, C, H]
        x = jnp.moveaxis(x, 0, 2)
        return x.reshape(*x.shape[:2], nb * block, h)[:, :, :c]

    return (
        dq.astype(qg.dtype),
        unblock(dk).astype(k.dtype),
        unblock(dv).astype(v.dtype),
        None,
        None,
    )


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def _chunked_attention(q, k, v, q_slots, kv_mask, *, block_size):
    s = q.shape[1]
    kh, c = k.shape[1], k.shape[2]
    g = q.shape[2] // kh
    block = max(1, min(block_size, c))
    q_slots = jnp.asarray(q_slots, jnp.int32)
    kv_mask = jnp.asarray(kv_mask, bool)
    out = _chunked_core(_group(q, kh), k, v, q_slots, kv_mask, g, block)
    return _ungroup(out.astype(v.dtype), s)


# ---------------------------------------------------------------- jax.nn


def _dot_product_attention(q, k, v, q_slots, kv_mask, *, implementation):
    """``jax.nn.dot_product_attention`` (``[B, T, N, H]`` layout, GQA by head count)."""
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(
            f"attention_impl='cudnn' needs a GPU; the default backend is "
            f"{jax.default_backend()!r} (use 'chunked', 'xla' or 'auto')"
        )
    s, c = q.shape[1], k.shape[2]
    allowed = _allowed(q_slots, kv_mask, jnp.arange(c))[:, None]  # [B, 1, S, C]
    # Queries with no visible key attend uniformly, as in the other paths.
    allowed = allowed | ~jnp.any(allowed, axis=-1, keepdims=True)
    out = jax.nn.dot_product_attention(
        q,
        k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3),
        mask=allowed,
        implementation=None if implementation == "jax_nn" else implementation,
    )
    return out.reshape(q.shape[0], s, -1)
