"""Per-token log-probability and entropy from final hidden states, optionally chunked.

The policy head of an RL step needs, for every completion token, the
log-probability of the sampled token and the entropy of the distribution it
was drawn from, both of ``softmax(h W / temperature)``. Materialising the
logits ``[B, T, V]`` costs ``4 B T V`` bytes in float32 (2.5 GB at 4,096 tokens
and Qwen's V = 151,936), several times over once autodiff keeps softmax
intermediates. The chunked path scans over chunks of tokens and keeps only
per-token scalars; a ``jax.custom_vjp`` recomputes each chunk's logits in the
backward pass and applies the analytic gradients

    d logp / dz = onehot(token) - p
    d H / dz    = -p * (log p + H)

(``z`` the temperature-scaled logits, ``p = softmax(z)``, ``H = -sum p log p``),
so peak memory is ``O(chunk_size * V)`` regardless of ``B * T``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from erpo_jax.ops._precision import matmul_precision
from erpo_jax.typing import Array, ArrayLike, Float, Int

__all__ = ["AUTO_LOGITS_BYTES", "auto_chunk_size", "token_logp_and_entropy"]

AUTO_LOGITS_BYTES = 256 * 2**20
"""``chunk_size="auto"``'s bound on one float32 logits buffer of a device (256 MiB).

The head's value-and-gradient holds a few buffers of that size (about four
all at once, two or three per chunk), so its working memory stays near
1 GiB whichever way it runs, and grows with neither ``B * T`` nor ``V``
once the chunks are that size. Chunking costs a second logits matmul in
the backward pass (about 4% of a tiny-Qwen3 GRPO update on the 2-core
Xeon, whose 256 MiB head runs at once), so small heads stay whole.
"""


def auto_chunk_size(rows: int, length: int, vocab: int, *, row_shards: int = 1) -> int | None:
    """The ``chunk_size`` that ``"auto"`` means for ``[rows, length]`` tokens over ``vocab``.

    ``None`` (all logits at once) while one device's float32 logits, its
    ``ceil(rows / row_shards)`` rows times ``length`` times ``vocab`` times 4
    bytes, fit in :data:`AUTO_LOGITS_BYTES`; else the fewest equal chunks of
    positions whose logits fit there (at least one position each; equal, so
    the last chunk is not mostly padding), given as tokens over all
    ``rows`` (``token_logp_and_entropy``'s unit). With vocabulary tiles,
    pass the tile width as ``vocab``.

    The bound keeps the head from running a device out of memory on a real
    vocabulary (Qwen's 151,936 ids at 4,096 tokens are 2.5 GB of logits per
    row) and leaves small heads whole (the toy task's).
    """
    for name, value in (("rows", rows), ("length", length), ("vocab", vocab)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"auto_chunk_size: {name} must be an int >= 0, got {value!r}")
    if not isinstance(row_shards, int) or isinstance(row_shards, bool) or row_shards < 1:
        raise ValueError(f"auto_chunk_size: row_shards must be an int >= 1, got {row_shards!r}")
    per_position = -(-rows // row_shards) * vocab * 4
    if per_position * length <= AUTO_LOGITS_BYTES:
        return None
    fit = max(1, AUTO_LOGITS_BYTES // per_position)
    chunks = -(-length // fit)
    return -(-length // chunks) * rows


def token_logp_and_entropy(
    hidden: Float[ArrayLike, "B T D"],
    unembed: Float[ArrayLike, "D V"],
    tokens: Int[ArrayLike, "B T"],
    *,
    temperature: float | Float[ArrayLike, ""] = 1.0,
    chunk_size: int | str | None = None,
    vocab_chunk_size: int | None = None,
    row_shards: int = 1,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Log-probability of ``tokens`` and entropy under ``softmax(hidden @ unembed / temperature)``.

    Both are float32 whatever the input dtype: the matmul accumulates in
    float32 (``preferred_element_type``), then ``logp = z[token] -
    logsumexp(z)`` and ``entropy = logsumexp(z) - sum(softmax(z) * z)`` with
    ``z`` the scaled logits. Gradients flow to ``hidden``, ``unembed`` and
    ``temperature`` from both outputs. In the backward pass the float32
    logit gradient is never rounded to the input dtype: both gradient
    matmuls take float32 operands and accumulate in float32, and only their
    results are cast to the dtypes of ``hidden`` and ``unembed`` (so float16
    weights do not flush small per-token gradients to zero).

    Args:
      hidden: ``[B, T, D]`` final hidden states (after the last norm), e.g.
        ``Decoder.hidden_states`` at the positions that predict ``tokens``.
      unembed: ``[D, V]`` unembedding matrix (``Decoder.unembedding()``).
      tokens: ``[B, T]`` ids in ``[0, V)`` whose log-probability is returned.
        An id outside that range (e.g. a padding sentinel) selects no logit:
        its ``logp`` is 0 with no gradient, meaningless; mask it.
      temperature: positive scalar dividing the logits (a Python number or a
        traced scalar, differentiable in every path).
      chunk_size: ``None`` computes all ``[B, T, V]`` logits at once
        (autodiff). A positive int processes about ``chunk_size`` tokens at
        a time (``ceil(chunk_size / B)`` positions of every row: chunks run
        along time, so a batch sharded over rows needs no all-gather) with a
        custom VJP that recomputes each chunk in the backward pass, never
        materialising ``[B, T, V]``. ``"auto"`` picks one of the two from
        the shapes (:func:`auto_chunk_size`): at once while a device's
        float32 logits fit in :data:`AUTO_LOGITS_BYTES`, else in chunks
        that fit.
      row_shards: with a chunked head (``chunk_size`` an int or ``"auto"``),
        the number of devices the rows of
        ``hidden`` are sharded over (``data * fsdp`` of the trainer's mesh).
        The backward pass keeps that many weight-gradient partial sums, one
        per row group, and adds them once after the loop, so under data
        parallelism the ``[D, V]`` gradient is all-reduced once per call, not
        once per chunk. 1 (the default) keeps one accumulator; a value that
        does not divide ``B`` is reduced to their gcd.
      vocab_chunk_size: with ``chunk_size`` (an int, or ``"auto"``, which
        then sizes its chunks by the tile, and runs one tiled chunk where
        the logits would fit at once), also split the vocabulary into
        tiles of this many columns and combine them with an online
        (running-max) logsumexp and entropy, so that peak memory is
        ``O(chunk_size * vocab_chunk_size)``: independent of ``V`` as well as
        of ``B * T`` (the weight gradient ``[D, V]`` aside). ``None`` takes
        each token chunk's whole vocabulary at once.

    Returns:
      ``(logp [B, T], entropy [B, T])``, float32.
    """
    hidden, unembed, tokens = jnp.asarray(hidden), jnp.asarray(unembed), jnp.asarray(tokens)
    if (
        chunk_size is not None
        and chunk_size != "auto"
        and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0)
    ):
        raise ValueError(
            "token_logp_and_entropy: chunk_size must be None, 'auto' or a positive int, "
            f"got {chunk_size!r}"
        )
    if not isinstance(row_shards, int) or isinstance(row_shards, bool) or row_shards < 1:
        raise ValueError(
            f"token_logp_and_entropy: row_shards must be a positive int, got {row_shards!r}"
        )
    if chunk_size == "auto":
        if hidden.ndim != 3 or unembed.ndim != 2:
            raise ValueError(
                f"token_logp_and_entropy: hidden {tuple(hidden.shape)} and unembed "
                f"{tuple(unembed.shape)} must be [B, T, D] and [D, V]"
            )
        b, t = hidden.shape[:2]
        width = min(unembed.shape[1], vocab_chunk_size or unembed.shape[1])
        chunk_size = auto_chunk_size(b, t, width, row_shards=row_shards)
        if chunk_size is None and vocab_chunk_size is not None:
            chunk_size = max(1, b * t)  # one chunk, its vocabulary in tiles as asked
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"token_logp_and_entropy: temperature must be > 0, got {temperature!r}")
    if hidden.shape[-1] != unembed.shape[0]:
        raise ValueError(
            f"token_logp_and_entropy: hidden has width D={hidden.shape[-1]} but unembed "
            f"has shape {tuple(unembed.shape)}; expected [D, V]"
        )
    if vocab_chunk_size is not None:
        if chunk_size is None:
            raise ValueError(
                "token_logp_and_entropy: vocab_chunk_size needs chunk_size (tokens are "
                "chunked first, then each chunk's vocabulary)"
            )
        if (
            not isinstance(vocab_chunk_size, int)
            or isinstance(vocab_chunk_size, bool)
            or not 0 < vocab_chunk_size
        ):
            raise ValueError(
                "token_logp_and_entropy: vocab_chunk_size must be None or a positive int, "
                f"got {vocab_chunk_size!r}"
            )
    inv_temp = 1.0 / jnp.asarray(temperature, jnp.float32)
    tokens = tokens.astype(jnp.int32)
    if chunk_size is None:
        z = jnp.einsum("btd,dv->btv", hidden, unembed, preferred_element_type=jnp.float32,
                       precision=matmul_precision(hidden.dtype))  # fmt: skip
        logp, entropy, _ = _stats(z * inv_temp, tokens)
        return _materialized_cotangent(logp), _materialized_cotangent(entropy)

    # Chunks run along time within the rows: each holds ct positions of every
    # row ([B, ct] tokens, about chunk_size), so the row axis is never sliced
    # and a batch sharded over rows stays sharded (no all-gather under data
    # parallelism).
    assert isinstance(chunk_size, int)  # "auto" is resolved above
    b, t, d = hidden.shape
    slots = math.gcd(b, row_shards) if b else 1
    ct = max(1, min(t, -(-chunk_size // max(b, 1))))
    nt = -(-t // ct)
    pad = nt * ct - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, nt, ct, d).transpose(1, 0, 2, 3)
    tok = jnp.pad(tokens, ((0, 0), (0, pad))).reshape(b, nt, ct).transpose(1, 0, 2)
    vocab = unembed.shape[1]
    if vocab_chunk_size is not None and vocab_chunk_size < vocab:
        logp, entropy = _tiled(h, unembed, tok, inv_temp, vocab_chunk_size, slots)
    else:
        logp, entropy = _chunked(h, unembed, tok, inv_temp, slots)

    def rows(x):  # [nt, B, ct] -> [B, T]
        return x.transpose(1, 0, 2).reshape(b, nt * ct)[:, :t]

    return rows(logp), rows(entropy)


@jax.custom_vjp
def _materialized_cotangent(x):
    """Identity whose backward computes the incoming ``[B, T]`` cotangent on its own.

    Without it XLA:CPU may fuse the loss's whole per-token backward (ERPO's
    gates, buckets and group statistics: about 300 instructions) into the
    ``[T, V]`` logit gradient's loop and evaluate it once per vocabulary
    entry: ERPO's update in 8 micro-batches of the tiny Qwen3 (V = 4,096)
    spent 1.6-1.8 s of op time there on the 2-core Xeon, 0.26 s with it.
    The cotangent passes through bit for bit, except that subnormals flush to
    a zero of their sign, as in every XLA:CPU float op.
    """
    return x


def _materialized_cotangent_fwd(x):
    return x, None


def _materialized_cotangent_bwd(_, g):
    # XLA:CPU drops optimization barriers before fusion, and fuses chains of
    # cheap elementwise ops into a broadcasting consumer, but not an
    # "expensive" op such as a divide: dividing by a 1 that it cannot fold
    # (1 + min(|x|, 0), with x = 0 when NaN: exactly 1.0) computes g once per
    # token.
    if g.size == 0:
        return (g,)
    first = jnp.ravel(g)[0].astype(jnp.float32)
    one = 1.0 + jnp.minimum(jnp.abs(jnp.where(jnp.isnan(first), 0.0, first)), 0.0)
    return ((g / one).astype(g.dtype),)


_materialized_cotangent.defvjp(_materialized_cotangent_fwd, _materialized_cotangent_bwd)


def _stats(z, tokens):
    """(logp of tokens, entropy, shifted logsumexp) of float32 logits ``z [..., V]``.

    Everything is computed on ``z - max(z)``: with temperature-scaled logits in
    the tens, ``log p = z - logsumexp(z)`` and ``H`` would otherwise each lose
    digits to cancellation between large numbers. The third output,
    ``logsumexp(z - max(z))``, is what the backward pass stores.
    """
    zs = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    lse = jnp.log(jnp.sum(jnp.exp(zs), axis=-1))
    logp_all = zs - lse[..., None]
    p = jnp.exp(logp_all)
    entropy = lse - jnp.sum(p * zs, axis=-1)
    # A one-hot select rather than a gather: out-of-range ids pick no logit
    # instead of a clamped or NaN one, and it fuses with the reductions.
    onehot = tokens[..., None] == jnp.arange(z.shape[-1], dtype=jnp.int32)
    logp = jnp.sum(jnp.where(onehot, logp_all, 0.0), axis=-1)
    return logp, entropy, lse


def _chunk_logits(h_c, w, inv_temp):
    prec = matmul_precision(h_c.dtype)
    z = jnp.einsum("...d,dv->...v", h_c, w, preferred_element_type=jnp.float32, precision=prec)
    return z * inv_temp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked(h, w, tok, inv_temp, slots):
    """``(logp, entropy)``, each ``[num_chunks, B, ct]``, of ``h [num_chunks, B, ct, D]``.

    ``slots`` row groups keep separate weight-gradient accumulators, summed
    once after the loop (see ``row_shards``).
    """
    (logp, entropy), _ = _chunked_fwd(h, w, tok, inv_temp, slots)
    return logp, entropy


def _chunked_fwd(h, w, tok, inv_temp, slots):
    def body(_, xs):
        h_c, tok_c = xs
        return None, _stats(_chunk_logits(h_c, w, inv_temp), tok_c)

    _, (logp, entropy, lse) = jax.lax.scan(body, None, (h, tok))
    # Residuals are the inputs plus two floats per token; logits are recomputed.
    return (logp, entropy), (h, w, tok, inv_temp, entropy, lse)


def _grad_matmuls(g_raw, h_c, w_f32, slots=1):
    """``(d h_c, d w)`` of ``z_raw = h_c @ w`` given ``g_raw = dL/dz_raw``, all float32.

    The logit gradient ``g_raw`` stays float32 as a matmul operand: one
    token's entries are often far below float16's smallest normal (6e-5;
    e.g. a loss averaged over a million tokens), and casting them to the
    weight dtype first would flush them to zero or to a few bits. Operands
    are float32 and so is the accumulation (``preferred_element_type``);
    callers cast only the results to the input dtypes.

    ``d w`` comes back as ``[slots, D, V]``: the chunk's rows ``[B, ...]``
    split into ``slots`` groups, one partial sum each.
    """
    # float32 models get full precision; for half-precision ones the
    # backend's float32 default (TF32, one bf16 pass) keeps g_raw's exponent
    # range, so nothing flushes to zero.
    prec = matmul_precision(h_c.dtype)
    g_h_c = jnp.einsum("...v,dv->...d", g_raw, w_f32, preferred_element_type=jnp.float32,
                       precision=prec)  # fmt: skip
    b = h_c.shape[0]
    g_w = jnp.einsum(
        "kb...d,kb...v->kdv",
        h_c.astype(jnp.float32).reshape(slots, b // slots, *h_c.shape[1:]),
        g_raw.reshape(slots, b // slots, *g_raw.shape[1:]),
        preferred_element_type=jnp.float32,
        precision=prec,
    )
    return g_h_c, g_w


def _chunked_bwd(slots, res, cotangents):
    h, w, tok, inv_temp, entropy, lse = res
    g_logp, g_entropy = cotangents
    vocab = w.shape[1]
    # One float32 copy of the weight for the backward pass (the size of the
    # float32 gradient accumulator); vocabulary tiles (_tiled) avoid it.
    w_f32 = w.astype(jnp.float32)

    def body(carry, xs):
        g_w, g_inv = carry
        h_c, tok_c, ent_c, lse_c, gl_c, ge_c = xs
        z = _chunk_logits(h_c, w, inv_temp)
        logp_all = (z - jnp.max(z, axis=-1, keepdims=True)) - lse_c[..., None]
        p = jnp.exp(logp_all)
        onehot = tok_c[..., None] == jnp.arange(vocab, dtype=jnp.int32)
        # An id outside the vocabulary has logp 0 (a constant): no gradient.
        gl_c = jnp.where((tok_c >= 0) & (tok_c < vocab), gl_c, 0.0)
        g_z = gl_c[..., None] * (jnp.where(onehot, 1.0, 0.0) - p)
        g_z = g_z - ge_c[..., None] * p * (logp_all + ent_c[..., None])
        # z = (h @ w) * inv_temp: d/d inv_temp = sum(g_z * z) / inv_temp.
        g_inv = g_inv + jnp.sum(g_z * z) / inv_temp
        g_h_c, g_w_c = _grad_matmuls(g_z * inv_temp, h_c, w_f32, slots)
        return (g_w + g_w_c, g_inv), g_h_c.astype(h.dtype)

    init = (jnp.zeros((slots, *w.shape), jnp.float32), jnp.zeros((), jnp.float32))
    (g_w, g_inv), g_h = jax.lax.scan(body, init, (h, tok, entropy, lse, g_logp, g_entropy))
    # One reduction over the slots (one all-reduce when they are sharded).
    return g_h, g_w.sum(0).astype(w.dtype), None, g_inv.astype(inv_temp.dtype)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ----------------------------------------------------------- vocabulary tiles


def _tile(w, j, tile):
    """Columns ``[start, start + tile)`` of ``w`` for tile ``j`` and a mask of the new ones.

    The last tile is shifted left to stay inside ``V`` (no padded copy of
    ``w``); the columns it shares with the previous tile are masked out.
    """
    vocab = w.shape[1]
    start = jnp.minimum(j * tile, vocab - tile)
    cols = start + jnp.arange(tile, dtype=jnp.int32)
    fresh = cols >= j * tile
    return jax.lax.dynamic_slice_in_dim(w, start, tile, axis=1), cols, fresh, start


def _tiled_stats(h_c, w, tok_c, inv_temp, tile):
    """``(logp, entropy, lse)`` of one token chunk by an online pass over vocabulary tiles.

    Running max ``m``, ``s = sum exp(z - m)`` and ``a = sum exp(z - m) (z - m)``
    (relative to the running max, so the entropy ``log s - a / s`` suffers
    no cancellation between large logits), rescaled when ``m`` grows.
    """
    c = h_c.shape[:-1]  # the chunk's token axes
    num_tiles = -(-w.shape[1] // tile)

    def body(carry, j):
        m, s, a, z_tok = carry
        w_t, cols, fresh, _ = _tile(w, j, tile)
        z = _chunk_logits(h_c, w_t, inv_temp)
        z = jnp.where(fresh, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[..., None])
        zr = jnp.where(fresh, z - m_new[..., None], 0.0)
        s_new = s * scale + jnp.sum(e, axis=-1)
        # Before the first tile m is -inf and s is 0: no rescaling term.
        shift = jnp.where(jnp.isfinite(m), m - m_new, 0.0)
        a_new = scale * (a + s * shift) + jnp.sum(e * zr, axis=-1)
        hit = (tok_c[..., None] == cols) & fresh
        z_tok = z_tok + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
        return (m_new, s_new, a_new, z_tok), None

    init = (
        jnp.full(c, -jnp.inf, jnp.float32),
        jnp.zeros(c, jnp.float32),
        jnp.zeros(c, jnp.float32),
        jnp.zeros(c, jnp.float32),
    )
    # The first tile always holds a finite logit, so m is finite after it and
    # exp(m - m_new) never sees inf - inf.
    (m, s, a, z_tok), _ = jax.lax.scan(body, init, jnp.arange(num_tiles, dtype=jnp.int32))
    lse = m + jnp.log(s)
    in_vocab = (tok_c >= 0) & (tok_c < w.shape[1])
    return jnp.where(in_vocab, z_tok - lse, 0.0), jnp.log(s) - a / s, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _tiled(h, w, tok, inv_temp, tile, slots):
    """As :func:`_chunked`, with each chunk's vocabulary in tiles of ``tile`` columns."""
    (logp, entropy), _ = _tiled_fwd(h, w, tok, inv_temp, tile, slots)
    return logp, entropy


def _tiled_fwd(h, w, tok, inv_temp, tile, slots):
    def body(_, xs):
        h_c, tok_c = xs
        return None, _tiled_stats(h_c, w, tok_c, inv_temp, tile)

    _, (logp, entropy, lse) = jax.lax.scan(body, None, (h, tok))
    return (logp, entropy), (h, w, tok, inv_temp, entropy, lse)


def _tiled_bwd(tile, slots, res, cotangents):
    h, w, tok, inv_temp, entropy, lse = res
    g_logp, g_entropy = cotangents
    num_tiles = -(-w.shape[1] // tile)

    def chunk(carry, xs):
        g_w, g_inv = carry
        h_c, tok_c, ent_c, lse_c, gl_c, ge_c = xs
        # An id outside the vocabulary has logp 0 (a constant): no gradient.
        gl_in = jnp.where((tok_c >= 0) & (tok_c < w.shape[1]), gl_c, 0.0)

        def tile_body(carry, j):
            g_w, g_h_c, g_inv = carry
            w_t, cols, fresh, start = _tile(w, j, tile)
            z = _chunk_logits(h_c, w_t, inv_temp)
            logp_all = z - lse_c[..., None]
            p = jnp.where(fresh, jnp.exp(logp_all), 0.0)
            onehot = (tok_c[..., None] == cols) & fresh
            g_z = gl_in[..., None] * (jnp.where(onehot, 1.0, 0.0) - p)
            g_z = g_z - ge_c[..., None] * p * (jnp.where(fresh, logp_all, 0.0) + ent_c[..., None])
            g_inv = g_inv + jnp.sum(g_z * z) / inv_temp
            # The float32 matmuls of _grad_matmuls, on one tile of the weight.
            g_h_t, g_w_t = _grad_matmuls(g_z * inv_temp, h_c, w_t.astype(jnp.float32), slots)
            old = jax.lax.dynamic_slice_in_dim(g_w, start, tile, axis=2)
            g_w = jax.lax.dynamic_update_slice_in_dim(g_w, old + g_w_t, start, axis=2)
            return (g_w, g_h_c + g_h_t, g_inv), None

        g_h_c = jnp.zeros(h_c.shape, jnp.float32)
        (g_w, g_h_c, g_inv), _ = jax.lax.scan(
            tile_body, (g_w, g_h_c, g_inv), jnp.arange(num_tiles, dtype=jnp.int32)
        )
        return (g_w, g_inv), g_h_c.astype(h.dtype)

    init = (jnp.zeros((slots, *w.shape), jnp.float32), jnp.zeros((), jnp.float32))
    (g_w, g_inv), g_h = jax.lax.scan(chunk, init, (h, tok, entropy, lse, g_logp, g_entropy))
    # One reduction over the slots (one all-reduce when they are sharded).
    return g_h, g_w.sum(0).astype(w.dtype), None, g_inv.astype(inv_temp.dtype)


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
