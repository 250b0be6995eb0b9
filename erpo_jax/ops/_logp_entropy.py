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

import jax
import jax.numpy as jnp

from erpo_jax.typing import Array, ArrayLike, Float, Int

__all__ = ["token_logp_and_entropy"]


def token_logp_and_entropy(
    hidden: Float[ArrayLike, "B T D"],
    unembed: Float[ArrayLike, "D V"],
    tokens: Int[ArrayLike, "B T"],
    *,
    temperature: float | Float[ArrayLike, ""] = 1.0,
    chunk_size: int | None = None,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Log-probability of ``tokens`` and entropy under ``softmax(hidden @ unembed / temperature)``.

    Both are float32 whatever the input dtype: the matmul accumulates in
    float32 (``preferred_element_type``), then ``logp = z[token] -
    logsumexp(z)`` and ``entropy = logsumexp(z) - sum(softmax(z) * z)`` with
    ``z`` the scaled logits. Gradients flow to ``hidden`` and ``unembed`` from
    both outputs.

    Args:
      hidden: ``[B, T, D]`` final hidden states (after the last norm), e.g.
        ``Decoder.hidden_states`` at the positions that predict ``tokens``.
      unembed: ``[D, V]`` unembedding matrix (``Decoder.unembedding()``).
      tokens: ``[B, T]`` ids in ``[0, V)`` whose log-probability is returned.
        An id outside that range (e.g. a padding sentinel) selects no logit:
        its ``logp`` is ``-logsumexp(z)``, finite but meaningless; mask it.
      temperature: positive scalar dividing the logits (a Python number or a
        traced scalar; it gets no gradient in the chunked path).
      chunk_size: ``None`` computes all ``[B, T, V]`` logits at once
        (autodiff). A positive int processes ``chunk_size`` tokens (of the
        flattened ``B * T``) at a time with a custom VJP that recomputes each
        chunk in the backward pass, never materialising ``[B, T, V]``.

    Returns:
      ``(logp [B, T], entropy [B, T])``, float32.
    """
    hidden, unembed, tokens = jnp.asarray(hidden), jnp.asarray(unembed), jnp.asarray(tokens)
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0
    ):
        raise ValueError(
            f"token_logp_and_entropy: chunk_size must be None or a positive int, got {chunk_size!r}"
        )
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"token_logp_and_entropy: temperature must be > 0, got {temperature!r}")
    if hidden.shape[-1] != unembed.shape[0]:
        raise ValueError(
            f"token_logp_and_entropy: hidden has width D={hidden.shape[-1]} but unembed "
            f"has shape {tuple(unembed.shape)}; expected [D, V]"
        )
    inv_temp = 1.0 / jnp.asarray(temperature, jnp.float32)
    tokens = tokens.astype(jnp.int32)
    if chunk_size is None:
        z = jnp.einsum("btd,dv->btv", hidden, unembed, preferred_element_type=jnp.float32)
        logp, entropy, _ = _stats(z * inv_temp, tokens)
        return logp, entropy

    b, t, d = hidden.shape
    n = b * t
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(num_chunks, chunk_size, d)
    tok = jnp.pad(tokens.reshape(n), (0, pad)).reshape(num_chunks, chunk_size)
    logp, entropy = _chunked(h, unembed, tok, inv_temp)
    return logp.reshape(-1)[:n].reshape(b, t), entropy.reshape(-1)[:n].reshape(b, t)


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
    return jnp.einsum("cd,dv->cv", h_c, w, preferred_element_type=jnp.float32) * inv_temp


@jax.custom_vjp
def _chunked(h, w, tok, inv_temp):
    """``(logp, entropy)``, each ``[num_chunks, chunk]``, of ``h [num_chunks, chunk, D]``."""
    (logp, entropy), _ = _chunked_fwd(h, w, tok, inv_temp)
    return logp, entropy


def _chunked_fwd(h, w, tok, inv_temp):
    def body(_, xs):
        h_c, tok_c = xs
        return None, _stats(_chunk_logits(h_c, w, inv_temp), tok_c)

    _, (logp, entropy, lse) = jax.lax.scan(body, None, (h, tok))
    # Residuals are the inputs plus two floats per token; logits are recomputed.
    return (logp, entropy), (h, w, tok, inv_temp, entropy, lse)


def _chunked_bwd(res, cotangents):
    h, w, tok, inv_temp, entropy, lse = res
    g_logp, g_entropy = cotangents
    vocab = w.shape[1]

    def body(g_w, xs):
        h_c, tok_c, ent_c, lse_c, gl_c, ge_c = xs
        z = _chunk_logits(h_c, w, inv_temp)
        logp_all = (z - jnp.max(z, axis=-1, keepdims=True)) - lse_c[:, None]
        p = jnp.exp(logp_all)
        onehot = tok_c[:, None] == jnp.arange(vocab, dtype=jnp.int32)
        g_z = gl_c[:, None] * (jnp.where(onehot, 1.0, 0.0) - p)
        g_z = g_z - ge_c[:, None] * p * (logp_all + ent_c[:, None])
        # z = (h @ w) * inv_temp; matmuls in the input dtype, accumulated in float32.
        g_raw = (g_z * inv_temp).astype(w.dtype)
        g_h_c = jnp.einsum("cv,dv->cd", g_raw, w, preferred_element_type=jnp.float32)
        g_w = g_w + jnp.einsum("cd,cv->dv", h_c, g_raw, preferred_element_type=jnp.float32)
        return g_w, g_h_c.astype(h.dtype)

    g_w, g_h = jax.lax.scan(
        body, jnp.zeros(w.shape, jnp.float32), (h, tok, entropy, lse, g_logp, g_entropy)
    )
    return g_h, g_w.astype(w.dtype), None, jnp.zeros_like(inv_temp)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
