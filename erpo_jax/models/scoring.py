"""Recompute per-token log-probs and entropies of completions: the trainer's policy head.

The sampler returns, with every token, its log-probability and entropy under
the rollout policy. The trainer needs the same two numbers under other
parameters (the policy being optimized, the frozen reference) for the same
prompt + completion tokens. :func:`score_completions` runs one cache-free
forward pass over ``concat(prompt, completion)`` and feeds the hidden states
that predict each completion token to the chunked
``erpo_jax.ops.token_logp_and_entropy`` head, whose memory does not grow
with the vocabulary when ``vocab_chunk_size`` is set.
"""

from __future__ import annotations

import jax.numpy as jnp

from erpo_jax.models.decoder import Decoder
from erpo_jax.ops import token_logp_and_entropy
from erpo_jax.typing import Array, ArrayLike, Bool, Float, Int

__all__ = ["completion_hidden_states", "score_completions"]


def completion_hidden_states(
    model: Decoder,
    prompt_tokens: Int[ArrayLike, "B S"],
    prompt_mask: Bool[ArrayLike, "B S"],
    tokens: Int[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    use_lora: bool = True,
    group_size: int = 1,
) -> Float[Array, "B T D"]:
    """Final hidden states at the positions that predict each completion token.

    The prompt is left-padded and the completion right-padded (the sampler's
    layout), so ``concat(prompt, completion)`` holds each row's real tokens
    contiguously and positions come from the mask exactly as in sampling.
    The last completion token predicts nothing and is not fed.

    ``group_size`` G > 1: rows come in groups of G contiguous rows with the
    same prompt (a GRPO batch as the trainer lays it out). Each group's
    prompt then runs once (:meth:`Decoder.shared_prefix_hidden_states`), the
    training forward's counterpart of the sampler's prefix sharing; the
    result is the same up to float rounding. Only the first row of each
    group's prompt is read.
    """
    prompt_tokens = jnp.asarray(prompt_tokens)
    b, s = prompt_tokens.shape
    if group_size > 1:
        if b % group_size:
            raise ValueError(
                f"completion_hidden_states: group_size={group_size} does not divide the {b} rows"
            )
        if jnp.shape(tokens)[1] == 1:
            # Nothing follows the prompt: its last position predicts the only token.
            first = model.hidden_states(
                prompt_tokens[::group_size],
                jnp.asarray(prompt_mask, bool)[::group_size],
                use_lora=use_lora,
            )
            return jnp.repeat(first[:, -1:], group_size, axis=0)
        first, last = model.shared_prefix_hidden_states(
            prompt_tokens[::group_size],
            jnp.asarray(prompt_mask, bool)[::group_size],
            jnp.asarray(tokens)[:, :-1],
            jnp.asarray(mask, bool)[:, :-1],
            use_lora=use_lora,
        )
        # The last prompt position (prompts are left-padded) predicts token 0.
        start = jnp.repeat(first[:, -1:], group_size, axis=0)
        return jnp.concatenate([start, last], axis=1)
    full = jnp.concatenate([prompt_tokens, jnp.asarray(tokens)], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(prompt_mask, bool), jnp.asarray(mask, bool)], axis=1)
    hidden = model.hidden_states(full[:, :-1], full_mask[:, :-1], use_lora=use_lora)
    return hidden[:, s - 1 :]


def score_completions(
    model: Decoder,
    prompt_tokens: Int[ArrayLike, "B S"],
    prompt_mask: Bool[ArrayLike, "B S"],
    tokens: Int[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    temperature: float | Float[ArrayLike, ""] = 1.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    use_lora: bool = True,
    row_shards: int = 1,
    group_size: int = 1,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """``(logp, entropy)`` of each completion token under ``model``, float32 ``[B, T]``.

    The quantities the sampler recorded (:class:`erpo_jax.sampling.SampleOutput`
    ``logp`` / ``entropy``): the temperature-scaled full-vocabulary
    distribution at each position. Differentiable with respect to the
    model's parameters (call it inside ``jax.grad`` on ``nnx.merge``-d
    parameters).

    Args:
      model: the policy or reference :class:`Decoder`.
      prompt_tokens, prompt_mask: ``[B, S]`` left-padded prompts (every row
        has at least one real token).
      tokens, mask: ``[B, T]`` right-padded completions; ids must lie in
        ``[0, V)`` (padding positions hold ``pad_id``).
      temperature: the sampling temperature (greedy sampling records the
        temperature-1 statistics; pass 1.0 then).
      chunk_size, vocab_chunk_size, row_shards: see ``token_logp_and_entropy``.
      use_lora: apply LoRA adapters (``False`` scores the base model).
      group_size: rows per shared prompt (see :func:`completion_hidden_states`).

    Returns:
      ``(logp, entropy)``, ``[B, T]`` float32; values at masked positions are
      finite but meaningless.
    """
    hidden = completion_hidden_states(
        model, prompt_tokens, prompt_mask, tokens, mask, use_lora=use_lora, group_size=group_size
    )
    return token_logp_and_entropy(
        hidden,
        model.unembedding(),
        jnp.asarray(tokens),
        temperature=temperature,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        row_shards=row_shards,
    )
