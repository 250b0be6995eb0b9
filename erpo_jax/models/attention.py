"""Grouped-query softmax attention, by implementation: ``xla``, ``chunked``, ``cudnn``, ``auto``.

Every implementation computes the same function. Queries ``q [B, S, N, H]``
attend to keys and values ``k, v [B, K, C, H]`` (heads before slots; K
divides N). A KV cache stores its keys with slots minor, ``[B, K, H, C]``
(``keys_transposed=True``; see :class:`~erpo_jax.models.KVCache`), which
``xla`` reads as stored; the other implementations transpose them back
first, a copy of the layer's keys (they serve multi-token calls; a decode
step forced onto one of them pays it at every step). Which keys a query may
see is given by two small
arrays instead of a ``[B, S, C]`` mask, so long sequences never materialize
one:

- ``q_slots [S]`` int32: the slot of each query in the key axis. A query sees
  the keys at slots ``<= q_slot`` (causal). A cache-free forward has
  ``q_slots = arange(S)``; a cached extend has ``cache.index + arange(S)``.
  A sliding window passes the pair ``(q_slots, first)`` instead (see
  :func:`window_slots`): a query also sees no key before slot ``first``.
  ``cudnn`` and ``splash`` then run as ``chunked``, and a shared ``prefix``
  is refused.
- ``kv_mask [B, C]`` bool: which slots hold real tokens (left padding,
  unwritten cache slots are False).
- ``prefix`` (optional): a shared prefix ``(k [P, K, H, S_p], v [P, K,
  S_p, H], mask [P, S_p])`` of ``P`` prompts (a
  :class:`~erpo_jax.models.kv_cache.SharedPrefix` layer) that row ``b``
  sees before its ``C`` slots, every real prefix slot visible to every
  query; row ``b`` belongs to prompt ``b // (B / P)``. Each prompt's keys
  and values are read once for its ``B / P`` rows, whatever ``impl``
  (:func:`_shared_prefix_attention`; a decode step is memory-bound, so
  this reads ``G`` times fewer prefix bytes than a copied prompt would).

A query with no visible key (a padding position) attends uniformly over all
``C`` slots (``chunked`` with a ``causal_offset``: over its query block's
keys); its output is finite and meaningless, as the reference's is.
Scores, the softmax and its statistics are float32 whatever the input dtype,
and float32 inputs get full-precision matmuls (:func:`matmul_precision`).

Implementations:

- ``xla``: scores for all ``S x C`` pairs at once (``[B, N, S, C]`` float32).
  Fastest for short sequences on accelerators, and for single-token decode
  steps everywhere (on CPU, a decode step's own multiply-reduce loops).
- ``chunked``: blockwise over keys with an online softmax (pure JAX), and a
  hand-written backward (``jax.custom_vjp``) that recomputes each block's
  probabilities from the saved log-sum-exp instead of storing them, so
  memory is ``O(S * block)`` in the forward and the backward. The keys are
  split into equal blocks of at most ``block_size``. Works on every
  backend.
- ``cudnn``: ``jax.nn.dot_product_attention(..., implementation="cudnn")``,
  the fused cuDNN kernel (GPU; float16 or bfloat16 inputs). Its masked
  kernel refuses odd lengths under ``grad``, so odd query or key lengths are
  padded by one (a masked key, a dropped query). Outputs at queries with no
  visible key differ from ``xla``'s (finite; never used). Checked against
  ``xla`` on an H200 by ``tests/models/test_attention_gpu.py``.
- ``splash``: the Pallas TPU splash-attention kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``), forward and
  backward, for self-attention over the new tokens (``S == C``: the
  training forward and the prefill; other calls use ``chunked``, or ``xla``
  for a decode step). Left padding becomes segment ids (a padding query
  sees the padding before it, finite and meaningless as in the other
  paths), the sequence is padded to whole 128-blocks, and with ``mesh`` the
  kernel runs per device under ``shard_map`` (rows over ``(data, fsdp)``,
  heads over ``tensor`` when both head counts divide). Off TPU it runs in
  Pallas interpret mode: the same results, very slowly (for tests).
- ``auto``: ``cudnn`` on GPU for half-precision inputs; on TPU ``splash``
  for long self-attention (``S == C``, ``S * C >= 2**20``, head dim a
  multiple of 128); on CPU ``chunked`` for every multi-token call (its
  own backward beats autodiff through ``xla``'s softmax there: about 8%
  of a tiny-Qwen3 GRPO update on the 2-core Xeon, and its forward is up to
  1.6x faster); elsewhere ``chunked`` where the score matrix would be large
  (``S * C >= 2**20``) and ``xla`` otherwise. A decode step (``S == 1``)
  is always ``xla``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from erpo_jax.ops import matmul_precision
from erpo_jax.typing import Array, Bool, Float, Int

__all__ = ["ATTENTION_IMPLS", "attention", "resolve_attention_impl", "window_slots"]

ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash")
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


def resolve_attention_impl(
    impl: str, *, s: int, c: int, dtype: jnp.dtype, head_dim: int | None = None
) -> str:
    """The concrete implementation ``impl`` means for ``S`` queries over ``C`` slots."""
    if check_attention_impl(impl) == "splash" and s != c:
        # Splash covers self-attention over new tokens; cached steps fall back.
        impl = "xla" if s == 1 else "chunked"
    if impl != "auto":
        return impl
    if s == 1:
        return "xla"  # a decode step: the scores are [B, N, 1, C], nothing to save
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    backend = jax.default_backend()
    if backend == "gpu" and half:
        return "cudnn"
    if backend == "cpu":
        return "chunked"
    by_length = auto_by_length(s, c)
    if backend == "tpu" and by_length == "chunked" and s == c and head_dim is not None:
        if head_dim % 128 == 0:
            return "splash"
    return by_length


def auto_by_length(s: int, c: int) -> str:
    """``auto``'s rule where no fused kernel applies on an accelerator: ``chunked``
    from ``2**20`` (query, key) pairs per row and head, ``xla`` below."""
    return "chunked" if s * c >= _AUTO_CHUNK_PAIRS else "xla"


def attention(
    q: Float[Array, "B S N H"],
    k: Float[Array, "B K _ _"],
    v: Float[Array, "B K C H"],
    q_slots: Int[Array, " S"],
    kv_mask: Bool[Array, "B C"],
    prefix: tuple[Array, Array, Array] | None = None,
    *,
    impl: str = "xla",
    block_size: int = 512,
    mesh: Any = None,
    keys_transposed: bool = False,
    causal_offset: int | None = None,
) -> Float[Array, "B S NH"]:
    """Softmax attention of ``q`` over ``k, v``; returns ``[B, S, N * H]`` in ``v``'s dtype.

    Args:
      q, k, v, q_slots, kv_mask: see the module docstring (``k`` is
        ``[B, K, C, H]``, or ``[B, K, H, C]`` with ``keys_transposed``). With ``S == C``
        the ``splash`` path takes ``q_slots`` to be ``arange(S)`` (how
        ``Decoder`` calls it for new tokens).
      impl: one of :data:`ATTENTION_IMPLS`.
      block_size: at most this many keys per block of ``chunked`` (equal blocks).
      mesh: the ``(data, fsdp, tensor)`` mesh the activations are sharded
        over; ``splash`` runs per device under ``shard_map`` on it.
      keys_transposed: ``k`` is ``[B, K, H, C]``, a KV cache's layout.
      prefix: see the module docstring; ``impl`` is then not used.
      causal_offset: the caller's static promise that ``q_slots`` is
        ``causal_offset + arange(S)`` (a cache-free forward: 0; continuations
        after ``P`` prompt keys: ``P``). ``chunked`` then runs the queries
        in equal blocks of at most ``block_size``, each over the keys up to
        its last query's slot only, since every later key is masked for the
        whole block: about half the work and the score memory of a long
        causal self-attention. None: no such promise, every query block sees
        every key. A wrong promise drops visible keys.
    """
    s, n, h = q.shape[1], q.shape[2], q.shape[3]
    kh, c = v.shape[1], v.shape[2]
    if n % kh:
        raise ValueError(f"attention: {n} query heads are not a multiple of {kh} key heads")
    want = (v.shape[0], kh, h, c) if keys_transposed else v.shape
    if k.shape != want:
        raise ValueError(
            f"attention: keys of shape {k.shape} do not match values {v.shape} "
            f"(keys_transposed={keys_transposed}: expected {want})"
        )
    windowed = isinstance(q_slots, tuple)
    if prefix is not None:
        if windowed:
            raise ValueError("attention: a sliding window with a shared prefix is not supported")
        return _shared_prefix_attention(q, k, v, q_slots, kv_mask, prefix, keys_transposed)
    impl = resolve_attention_impl(impl, s=s, c=c, dtype=q.dtype, head_dim=h)
    if windowed and impl in ("cudnn", "splash"):
        impl = "chunked"  # their masks take no per-layer traced window
    if impl == "xla":
        return _xla(q, k, v, q_slots, kv_mask, keys_transposed)
    if keys_transposed:
        k = jnp.swapaxes(k, 2, 3)
    if impl == "chunked":
        return _chunked_attention(
            q, k, v, q_slots, kv_mask, block_size=block_size, causal_offset=causal_offset
        )
    if impl == "splash":
        return _splash_attention(q, k, v, kv_mask, mesh=mesh)
    return _dot_product_attention(q, k, v, q_slots, kv_mask, implementation=impl)


def window_slots(q_slots: Array, window: Any) -> tuple[Array, Array]:
    """``q_slots`` for a sliding window of ``window`` keys: ``(q_slots, q_slots - window + 1)``.

    A query then sees the keys at slots ``q_slot - window < slot <= q_slot``
    (its own and the ``window - 1`` before it; Hugging Face's
    ``sliding_window``). ``window`` may be traced (one value per scanned
    layer; a full-attention layer among sliding ones passes a window longer
    than any sequence).
    """
    q_slots = jnp.asarray(q_slots, jnp.int32)
    return q_slots, q_slots - jnp.asarray(window, jnp.int32) + 1


def _split_slots(q_slots):
    """``(q_slots, first)``: ``first`` is None without a sliding window."""
    if isinstance(q_slots, tuple):
        return q_slots
    return q_slots, None


def _allowed(q_slots, kv_mask, slots):
    """``[B, S, c]`` bool: causal by slot (within the window, with one), and only real keys."""
    q_slots, first = _split_slots(q_slots)
    allowed = (slots[None, None, :] <= q_slots[None, :, None]) & kv_mask[:, None, :]
    if first is not None:
        allowed = allowed & (slots[None, None, :] >= first[None, :, None])
    return allowed


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


def _xla(q, k, v, q_slots, kv_mask, keys_transposed=False):
    b, s, n, h = q.shape
    if s == 1 and jax.default_backend() == "cpu":
        return _xla_decode_cpu(q, k, v, q_slots, kv_mask, keys_transposed)
    kh, c = v.shape[1], v.shape[2]
    g = n // kh
    # Batched [batch, kv-head] matmuls against k and v as stored: no transpose
    # of the keys or values, which for a KV cache would copy the whole cache
    # at every decode step.
    qg = _group(q, kh)
    prec = matmul_precision(q.dtype)
    spec = "bkqh,bkhc->bkqc" if keys_transposed else "bkqh,bkch->bkqc"
    scores = jnp.einsum(spec, qg, k, preferred_element_type=jnp.float32, precision=prec)
    scores = scores * (1.0 / math.sqrt(h))
    allowed = _allowed(q_slots, kv_mask, jnp.arange(c))
    allowed = jnp.broadcast_to(allowed[:, None, None], (b, 1, g, s, c)).reshape(b, 1, g * s, c)
    scores = jnp.where(allowed, scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return _ungroup(jnp.einsum("bkqc,bkch->bkqh", probs, v, precision=prec), s)


def _xla_decode_cpu(q, k, v, q_slots, kv_mask, keys_transposed=False):
    """One query per row (a decode step): scores by a fused multiply-reduce loop.

    On XLA:CPU the ``[B, K]``-batched dot products of a decode step are
    ``B * K`` tiny ``[G, H] x [H, C]`` matmuls, each paying the batched-dot
    overhead; for the scores, one fused elementwise product and reduction
    over ``H`` streams the cache once and is about 1.5x faster at
    ``B = 128, C = 160`` (measured on the 2-core CPU). The values' pass
    stays a batched dot: as a multiply-reduce XLA fused it into the output
    projection's matmul, which ran no faster (within noise without a
    shared prefix, 3-8% slower with one). With the cache's
    ``[B, K, H, C]`` keys the reduction over ``H`` is over a major axis and
    vectorizes along the slots: the scores took 0.55 instead of 0.95 ms
    per layer and step in the sampler's loop at that size (2-core Xeon),
    where a reduction over a minor ``H`` of 32 is horizontal adds. Same
    function, float32 scores and softmax.
    """
    b, _, n, h = q.shape
    kh, c = v.shape[1], v.shape[2]
    qg = q.reshape(b, kh, n // kh, h).astype(jnp.float32)  # [B, K, G, H]
    kf = k[:, :, None].astype(jnp.float32)
    if keys_transposed:  # [B, K, 1, H, C]
        scores = jnp.sum(qg[..., None] * kf, axis=-2)
    else:  # [B, K, 1, C, H]
        scores = jnp.sum(qg[:, :, :, None, :] * kf, axis=-1)
    scores = scores * (1.0 / math.sqrt(h))  # [B, K, G, C]
    allowed = _allowed(q_slots, kv_mask, jnp.arange(c))[:, 0]  # [B, C]
    scores = jnp.where(allowed[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    # The values as a batched dot, as in _shared_prefix_attention.
    out = jnp.einsum("bkgc,bkch->bkgh", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32,
                     precision=matmul_precision(v.dtype))  # fmt: skip  # [B, K, G, H]
    return out.astype(v.dtype).reshape(b, 1, n * h)


def _shared_prefix_attention(q, k, v, q_slots, kv_mask, prefix, keys_transposed):
    """Attention over a shared prefix (once per prompt) and each row's own slots.

    One softmax over both parts, computed in two: each part's float32
    scores, one maximum and denominator over their union, and the two
    probability-weighted sums of values added. The prefix part batches a
    prompt's ``G`` rows (times the query heads of a key head) into one
    ``[G * N/K * S, H] x [H, S_p]`` product per prompt and key head, so its
    keys and values are read once per prompt. The own part is as ``_xla``
    (on CPU a decode step's fused multiply-reduce loops).
    """
    pk, pv, pmask = prefix
    b, s, n, h = q.shape
    kh, c = v.shape[1], v.shape[2]
    p, sp = pv.shape[0], pv.shape[2]
    if b % p or pk.shape != (p, kh, h, sp) or pmask.shape != (p, sp):
        raise ValueError(
            f"attention: a shared prefix of keys {pk.shape}, values {pv.shape} and mask "
            f"{pmask.shape} does not fit {b} rows of {kh} key heads of width {h} (expected "
            f"keys [P, {kh}, {h}, S], values [P, {kh}, S, {h}], mask [P, S], P dividing {b})"
        )
    g = b // p
    rows = (n // kh) * s  # query rows per key head of one row
    scale = 1.0 / math.sqrt(h)
    prec = matmul_precision(q.dtype)
    if not keys_transposed:
        k = jnp.swapaxes(k, 2, 3)
    qg = _group(q, kh)  # [B, K, R, H]
    if s == 1 and jax.default_backend() == "cpu":  # as _xla_decode_cpu
        own = jnp.sum(qg.astype(jnp.float32)[..., None] * k[:, :, None].astype(jnp.float32), -2)
    else:
        own = jnp.einsum("bkrh,bkhc->bkrc", qg, k, preferred_element_type=jnp.float32,
                         precision=prec)  # fmt: skip
    allowed = _allowed(q_slots, kv_mask, jnp.arange(c))  # [B, S, C]
    allowed = jnp.broadcast_to(allowed[:, None, None], (b, 1, n // kh, s, c)).reshape(b, 1, rows, c)
    own = jnp.where(allowed, own * scale, _NEG)  # [B, K, R, C]

    def to_prompts(x):  # [B, K, R, ...] -> [P, K, G * R, ...]
        x = x.reshape(p, g, kh, rows, *x.shape[3:])
        return jnp.swapaxes(x, 1, 2).reshape(p, kh, g * rows, *x.shape[4:])

    def to_rows(x):  # [P, K, G * R, ...] -> [B, K, R, ...]
        x = x.reshape(p, kh, g, rows, *x.shape[3:])
        return jnp.swapaxes(x, 1, 2).reshape(b, kh, rows, *x.shape[4:])

    pre = jnp.einsum("pkrh,pkhs->pkrs", to_prompts(qg), pk, preferred_element_type=jnp.float32,
                     precision=prec)  # fmt: skip
    pre = jnp.where(pmask[:, None, None, :], pre * scale, _NEG)  # [P, K, G * R, S_p]
    top = jnp.maximum(jnp.max(own, axis=-1), to_rows(jnp.max(pre, axis=-1)))  # [B, K, R]
    e_own = jnp.exp(own - top[..., None])
    e_pre = jnp.exp(pre - to_prompts(top)[..., None])
    denom = jnp.sum(e_own, axis=-1) + to_rows(jnp.sum(e_pre, axis=-1))
    # A batched dot for the values on every backend: on XLA:CPU a decode
    # step's multiply-reduce here was fused into the output projection's
    # matmul, and that fusion ran slower than the dot and the projection
    # apart (the rollout benchmark's decode, 2-core Xeon: +3-8% tokens/s in
    # five alternating pairs).
    out = jnp.einsum("bkrc,bkch->bkrh", e_own.astype(v.dtype), v,
                     preferred_element_type=jnp.float32, precision=prec)  # fmt: skip
    out_pre = jnp.einsum("pkrs,pksh->pkrh", e_pre.astype(pv.dtype), pv,
                         preferred_element_type=jnp.float32, precision=prec)  # fmt: skip
    out = (out + to_rows(out_pre)) / denom[..., None]
    return _ungroup(out.astype(v.dtype), s)


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
    s = _split_slots(q_slots)[0].shape[0]
    prec = matmul_precision(qg.dtype)
    scores = jnp.einsum("bkqh,bkch->bkqc", qg, kb, preferred_element_type=jnp.float32,
                        precision=prec) * scale  # fmt: skip
    allowed = _allowed(q_slots, mask_b, slots_b)  # [B, S, c]
    allowed = jnp.broadcast_to(allowed[:, None, None], (b, 1, g, s, slots_b.shape[0]))
    allowed = allowed.reshape(b, 1, g * s, -1)
    scores = jnp.where(allowed, scores, _MASKED)
    return jnp.where(slots_b < c, scores, _PADDED), allowed


def _first_blocks(xs, nkb):
    """The scan input over the first ``nkb`` key blocks of ``xs`` (all: ``xs`` itself).

    Fewer blocks are read by index from the whole block-major arrays inside
    the loop, not sliced off first: a slice would copy them, once per query
    block of a causal attention (and keep the copies for the backward).
    """
    nb = xs[-1].shape[0]
    if nkb is None or nkb >= nb:
        return xs, lambda x: x
    return jnp.arange(nkb), lambda j: jax.tree.map(lambda x: x[j], xs)


def _chunked_forward(qg, xs, q_slots, g, c, nkb=None):
    """``(out [B, K, G*S, H] float32, (m, denom))`` by an online softmax over key blocks.

    ``xs``: the ``C`` keys' :func:`_key_blocks`. ``m`` is each row's running
    maximum score and ``denom`` its softmax denominator at ``m``; the
    backward recomputes ``p = exp(s - m) / denom``. ``nkb``: only the first
    ``nkb`` key blocks (the later ones are masked for every query; None: all).
    """
    h = qg.shape[-1]
    scale = 1.0 / math.sqrt(h)
    scan_xs, take = _first_blocks(xs, nkb)
    rows = qg.shape[:3]

    def body(carry, x):
        m, denom, acc = carry
        kb, vb, mask_b, slots_b = take(x)
        scores, _ = _block_scores(qg, kb, q_slots, mask_b, slots_b, g, scale, c)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[..., None])
        denom = denom * correction + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkqc,bkch->bkqh", p.astype(vb.dtype), vb,
                        preferred_element_type=jnp.float32,
                        precision=matmul_precision(vb.dtype))  # fmt: skip
        acc = acc * correction[..., None] + pv
        return (m_new, denom, acc), None

    init = (
        jnp.full(rows, -jnp.inf, jnp.float32),
        jnp.zeros(rows, jnp.float32),
        jnp.zeros((*rows, h), jnp.float32),
    )
    (m, denom, acc), _ = jax.lax.scan(body, init, scan_xs)
    return acc / denom[..., None], (m, denom)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _chunked_core(qg, k, v, q_slots, kv_mask, g, block, nkb=None):
    xs, _ = _key_blocks(k, v, kv_mask, block)
    out, _ = _chunked_forward(qg, xs, q_slots, g, k.shape[2], nkb)
    return out


def _chunked_core_fwd(qg, k, v, q_slots, kv_mask, g, block, nkb=None):
    xs, _ = _key_blocks(k, v, kv_mask, block)
    out, (m, denom) = _chunked_forward(qg, xs, q_slots, g, k.shape[2], nkb)
    return out, (qg, k, v, q_slots, kv_mask, out, m, denom)


def _chunked_core_bwd(g, block, nkb, res, d_out):
    qg, k, v, q_slots, kv_mask, out, m, denom = res
    c = k.shape[2]
    xs, nb = _key_blocks(k, v, kv_mask, block)
    dq, dk, dv = _block_backward(qg, xs, q_slots, out, m, denom, d_out, g, c, nkb)
    return (
        dq.astype(qg.dtype),
        _unblock(dk, nb, block, c).astype(k.dtype),
        _unblock(dv, nb, block, c).astype(v.dtype),
        None,
        None,
    )


def _unblock(x, nb, block, c):
    """``[n, B, K, block, H]`` gradients of the first ``n`` key blocks -> ``[B, K, C, H]``."""
    x = jnp.pad(x, ((0, nb - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(*x.shape[:2], nb * block, x.shape[-1])[:, :, :c]


def _block_backward(qg, xs, q_slots, out, m, denom, d_out, g, c, nkb):
    """``(dq, dk, dv)`` of the grouped queries ``qg`` over the first ``nkb`` key
    blocks of ``xs`` (all: None); ``dk``, ``dv`` block-major ``[nkb, B, K, block, H]``."""
    h = qg.shape[-1]
    scale = 1.0 / math.sqrt(h)
    scan_xs, take = _first_blocks(xs, nkb)
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)  # [B, K, G*S]
    prec = matmul_precision(qg.dtype)

    def body(dq, x):
        kb, vb, mask_b, slots_b = take(x)
        scores, allowed = _block_scores(qg, kb, q_slots, mask_b, slots_b, g, scale, c)
        p = jnp.exp(scores - m[..., None]) / denom[..., None]  # the forward's, recomputed
        dv = jnp.einsum("bkqc,bkqh->bkch", p, d_out, precision=prec)
        dp = jnp.einsum("bkqh,bkch->bkqc", d_out, vb.astype(jnp.float32), precision=prec)
        # Masked scores are constants (as jnp.where makes them in ``xla``).
        ds = jnp.where(allowed, p * (dp - delta[..., None]) * scale, 0.0)
        dq = dq + jnp.einsum("bkqc,bkch->bkqh", ds, kb.astype(jnp.float32), precision=prec)
        dk = jnp.einsum("bkqc,bkqh->bkch", ds, qg.astype(jnp.float32), precision=prec)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(qg.shape, jnp.float32), scan_xs)
    return dq, dk, dv


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def _causal_forward(q, k, v, q_slots, kv_mask, g, block, spans):
    """Each query span ``(i0, i1, nkb)`` over its first ``nkb`` key blocks:
    ``(outs [B, K, G*(i1-i0), H] float32, stats (m, denom))`` per span."""
    kh, c = k.shape[1], k.shape[2]
    xs, _ = _key_blocks(k, v, kv_mask, block)  # once, read by every span
    outs, stats = [], []
    for i0, i1, nkb in spans:
        span = jax.tree.map(lambda x: x[i0:i1], q_slots)  # noqa: B023
        out, st = _chunked_forward(_group(q[:, i0:i1], kh), xs, span, g, c, nkb)
        outs.append(out)
        stats.append(st)
    return tuple(outs), tuple(stats)


def _join(outs, spans):
    """The spans' grouped outputs as one ``[B, S, N * H]`` float32 array."""
    parts = [_ungroup(o, i1 - i0) for o, (i0, i1, _) in zip(outs, spans, strict=True)]
    return jnp.concatenate(parts, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _causal_core(q, k, v, q_slots, kv_mask, g, block, spans):
    """Causal chunked attention in query spans, ``q [B, S, N, H]`` -> ``[B, S, N * H]``
    float32; one custom VJP over all spans, so the key and value gradients
    accumulate in one buffer (each span adds its first ``nkb`` blocks)."""
    return _join(_causal_forward(q, k, v, q_slots, kv_mask, g, block, spans)[0], spans)


def _causal_core_fwd(q, k, v, q_slots, kv_mask, g, block, spans):
    outs, stats = _causal_forward(q, k, v, q_slots, kv_mask, g, block, spans)
    return _join(outs, spans), (q, k, v, q_slots, kv_mask, outs, stats)


def _causal_core_bwd(g, block, spans, res, d_out):
    q, k, v, q_slots, kv_mask, outs, stats = res
    b, s, n, h = q.shape
    kh, c = k.shape[1], k.shape[2]
    xs, nb = _key_blocks(k, v, kv_mask, block)
    dk = jnp.zeros((nb, b, kh, block, h), jnp.float32)
    dv = jnp.zeros((nb, b, kh, block, h), jnp.float32)
    d_out = d_out.reshape(b, s, n, h)
    dqs = []
    for (i0, i1, nkb), out, (m, denom) in zip(spans, outs, stats, strict=True):
        dq_i, dk_i, dv_i = _block_backward(
            _group(q[:, i0:i1], kh), xs, jax.tree.map(lambda x: x[i0:i1], q_slots),  # noqa: B023
            out, m, denom,
            _group(d_out[:, i0:i1], kh), g, c, nkb,
        )  # fmt: skip
        dk = dk.at[:nkb].add(dk_i)
        dv = dv.at[:nkb].add(dv_i)
        dqs.append(_ungroup(dq_i, i1 - i0).reshape(b, i1 - i0, n, h))
    return (
        jnp.concatenate(dqs, axis=1).astype(q.dtype),
        _unblock(dk, nb, block, c).astype(k.dtype),
        _unblock(dv, nb, block, c).astype(v.dtype),
        None,
        None,
    )


_causal_core.defvjp(_causal_core_fwd, _causal_core_bwd)


def _chunked_attention(q, k, v, q_slots, kv_mask, *, block_size, causal_offset=None):
    s = q.shape[1]
    kh, c = k.shape[1], k.shape[2]
    g = q.shape[2] // kh
    q_slots = jax.tree.map(lambda x: jnp.asarray(x, jnp.int32), q_slots)
    kv_mask = jnp.asarray(kv_mask, bool)

    # Equal blocks of at most block_size keys: c = 520 runs as 2 x 260, not
    # 512 + 8 padded to 2 x 512 (which made it 1.7x slower than xla).
    nb = -(-c // max(1, block_size))
    block = max(1, -(-c // nb))

    if causal_offset is None or s <= block_size:
        out = _chunked_core(_group(q, kh), k, v, q_slots, kv_mask, g, block)
        return _ungroup(out.astype(v.dtype), s)
    # Causal blocks: equal query blocks, each over the key blocks up to its
    # last query's slot (causal_offset + its end); the rest are masked for it.
    nq = -(-s // max(1, block_size))
    qb = -(-s // nq)
    spans = tuple(
        (i0, min(s, i0 + qb), -(-min(c, causal_offset + min(s, i0 + qb)) // block))
        for i0 in range(0, s, qb)
    )
    return _causal_core(q, k, v, q_slots, kv_mask, g, block, spans).astype(v.dtype)


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
    # Queries with no visible key (padding) may see every slot, so that no
    # softmax row is empty. Their outputs are finite but, unlike the other
    # paths', not the plain mean over the slots (measured on CPU and on an
    # H200); they never reach a loss, and the tests exclude them.
    allowed = allowed | ~jnp.any(allowed, axis=-1, keepdims=True)
    # cuDNN's fused kernel with a mask (a bias) under grad needs even query and
    # key lengths: pad one masked key and one query whose output is dropped.
    ps, pc = s % 2, c % 2
    if ps or pc:
        q = jnp.pad(q, ((0, 0), (0, ps), (0, 0), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pc), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pc), (0, 0)))
        allowed = jnp.pad(allowed, ((0, 0), (0, 0), (0, 0), (0, pc)), constant_values=False)
        allowed = jnp.pad(allowed, ((0, 0), (0, 0), (0, ps), (0, 0)), constant_values=True)
    out = jax.nn.dot_product_attention(
        q,
        k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3),
        mask=allowed,
        implementation=None if implementation == "jax_nn" else implementation,
    )
    return out[:, :s].reshape(q.shape[0], s, -1)


# ---------------------------------------------------------------- splash

_SPLASH_BLOCK = 128  # the kernel's tile (TPU lanes); the sequence is padded to whole tiles


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, length: int, interpret: bool):
    """The causal splash kernel for ``heads`` query heads over ``length`` (padded) tokens."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    block = _SPLASH_BLOCK
    sizes = kernel.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(heads)])
    # Concrete mask tables even when first built inside a trace: the kernel is cached.
    with jax.ensure_compile_time_eval():
        return kernel.make_splash_mha(
            mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
        )


_warned_interpret = False


def _splash_attention(q, k, v, kv_mask, *, mesh):
    """Causal self-attention of ``q [B, S, N, H]`` over ``k, v [B, K, S, H]`` by splash."""
    global _warned_interpret
    b, s, n, h = q.shape
    kh = k.shape[1]
    interpret = jax.default_backend() != "tpu"
    if interpret and not _warned_interpret:
        _warned_interpret = True
        warnings.warn(
            "attention_impl='splash' off TPU runs the Pallas kernel in interpret mode: "
            "correct but very slow (use 'chunked' or 'auto')",
            stacklevel=3,
        )
    length = -(-s // _SPLASH_BLOCK) * _SPLASH_BLOCK
    pad = length - s
    # The kernel does not scale the scores; it takes [heads, S, H] per row.
    qt = (q * (1.0 / math.sqrt(h))).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, N, S, H]
    # Segments: real tokens 1, left padding 0, the tile fill 2 (after the real
    # tokens: causality already hides it from them).
    seg = jnp.where(jnp.asarray(kv_mask, bool), 1, 0).astype(jnp.int32)
    if pad:
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, pad), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=2)

    def local(qt, k, v, seg):
        from jax.experimental.pallas.ops.tpu.splash_attention import (
            splash_attention_kernel as kernel,
        )

        run = _splash_kernel(qt.shape[1], length, interpret)
        return jax.vmap(
            lambda q1, k1, v1, s1: run(q1, k1, v1, segment_ids=kernel.SegmentIds(s1, s1))
        )(qt, k, v, seg)

    rows_axes = () if mesh is None else tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in rows_axes) if mesh is not None else 1
    tensor = mesh.shape["tensor"] if mesh is not None and "tensor" in mesh.axis_names else 1
    if mesh is not None and mesh.size > 1 and b % shards == 0:
        from jax.sharding import PartitionSpec

        heads = "tensor" if tensor > 1 and n % tensor == 0 and kh % tensor == 0 else None
        rows = rows_axes or None
        spec = PartitionSpec(rows, heads, None, None)
        local = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(spec, spec, spec, PartitionSpec(rows, None)),
            out_specs=spec,
            check_vma=False,
        )
    out = local(qt, k, v, seg)[:, :, :s]  # [B, N, S, H]
    return out.astype(v.dtype).transpose(0, 2, 1, 3).reshape(b, s, n * h)
