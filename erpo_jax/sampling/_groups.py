"""Group sampling (P prompts -> P*G prompt-major rows) and REFT first-token diversification."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from erpo_jax.typing import Array, ArrayLike, Bool, Float, Int

__all__ = ["GroupedPrompts", "as_row_keys", "reft_first_tokens", "repeat_for_groups"]

# fold_in stream of the REFT candidate choice; completion step t uses stream t,
# and no completion reaches 2**31 - 1 tokens, so the streams never collide.
REFT_STREAM = 2**31 - 1


class GroupedPrompts(NamedTuple):
    """Prompts repeated for group sampling; row ``b = p * G + g``.

    Attributes:
      tokens: ``[B, S]`` int32, left-padded.
      mask: ``[B, S]`` bool.
      keys: ``[B]`` typed PRNG keys, one per row.
    """

    tokens: Int[Array, "B S"]
    mask: Bool[Array, "B S"]
    keys: Array


def as_row_keys(key: ArrayLike, batch_size: int, *, name: str = "key") -> Array:
    """``[B]`` typed keys from one key (split) or from ``B`` keys, typed or raw ``uint32``.

    Raises:
      ValueError: ``key`` has another shape; the message names ``name``.
    """
    arr: Array = key if isinstance(key, jax.Array) else jnp.asarray(key)
    if not jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
        if arr.dtype != jnp.uint32 or arr.ndim == 0 or arr.shape[-1] != 2:
            raise ValueError(
                f"{name} must be a typed PRNG key (jax.random.key) or a raw uint32 key of "
                f"shape [2], optionally batched [B]; got dtype {arr.dtype}, shape {arr.shape}"
            )
        arr = jax.random.wrap_key_data(arr)
    if arr.shape == ():
        return jax.random.split(arr, batch_size)
    if arr.shape == (batch_size,):
        return arr
    raise ValueError(
        f"{name} must be one PRNG key or {batch_size} keys (one per row), got key shape {arr.shape}"
    )


def repeat_for_groups(
    prompt_tokens: Int[ArrayLike, "P S"],
    prompt_mask: Bool[ArrayLike, "P S"],
    key: ArrayLike,
    *,
    group_size: int,
) -> GroupedPrompts:
    """Repeats each of ``P`` prompts ``G`` times, prompt-major, with one key per row.

    Args:
      prompt_tokens: ``[P, S]`` left-padded prompt ids.
      prompt_mask: ``[P, S]`` True on real prompt tokens.
      key: one PRNG key; it is split into ``B = P * G`` row keys.
      group_size: G, completions per prompt (positive int).

    Returns:
      :class:`GroupedPrompts` ``(tokens [B, S], mask [B, S], keys [B])`` with row
      ``b = p * G + g`` holding prompt ``p``; pass all three to
      :func:`erpo_jax.sampling.sample` (with ``group_size=G`` for REFT).
    """
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(
            f"repeat_for_groups: group_size must be a positive int, got {group_size!r}"
        )
    tokens = np.asarray(prompt_tokens)
    mask = np.asarray(prompt_mask)
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise ValueError(
            "repeat_for_groups: prompt_tokens and prompt_mask must both be [P, S], got "
            f"{tokens.shape} and {mask.shape}"
        )
    b = tokens.shape[0] * group_size
    return GroupedPrompts(
        tokens=jnp.asarray(np.repeat(tokens, group_size, axis=0), jnp.int32),
        mask=jnp.asarray(np.repeat(mask, group_size, axis=0), bool),
        keys=jax.random.split(_one_key(key), b),
    )


def _one_key(key: ArrayLike) -> Array:
    if jnp.shape(key) not in ((), (2,)):
        raise ValueError(
            f"repeat_for_groups: key must be one PRNG key (it is split per row), got shape "
            f"{jnp.shape(key)}"
        )
    return as_row_keys(key, 1)[0]


def reft_first_tokens(
    first_logits: Float[ArrayLike, "P V"],
    keys: Array,
    *,
    group_size: int,
    top_n: int = 20,
    k: int = 4,
) -> Int[Array, " B"]:
    """REFT first tokens: per prompt, K distinct draws from the policy's top-N, G/K rows each.

    REFT (arXiv 2605.28295; METHOD.md section 3) diversifies the opening of a
    group: take the top-``N`` candidates of the first completion token, choose
    ``K`` distinct ones uniformly at random, and force ``G / K`` consecutive rows
    of the group to each. No importance correction is applied.

    Args:
      first_logits: ``[P, V]`` next-token logits of each prompt (any temperature:
        the top-N set does not depend on it).
      keys: ``[P]`` typed PRNG keys, one per prompt.
      group_size: G; must be a multiple of ``k``.
      top_n: N, size of the candidate set (``k <= N <= V``).
      k: K, distinct openers per group.

    Returns:
      ``[P * G]`` int32, prompt-major: row ``p * G + g`` gets candidate number
      ``g // (G / K)`` of prompt ``p``.
    """
    first_logits = jnp.asarray(first_logits, jnp.float32)
    vocab = first_logits.shape[-1]
    if k < 1 or group_size % k:
        raise ValueError(
            f"reft_k={k} must be a positive divisor of group_size={group_size} "
            "(each opener gets group_size / reft_k rows)"
        )
    if not k <= top_n <= vocab:
        raise ValueError(f"reft_top_n={top_n} must satisfy reft_k={k} <= reft_top_n <= V={vocab}")
    candidates = jax.lax.top_k(first_logits, top_n)[1]  # [P, N]
    picks = jax.vmap(lambda key: jax.random.permutation(key, top_n)[:k])(keys)  # [P, K]
    chosen = jnp.take_along_axis(candidates, picks, axis=-1)  # [P, K], distinct
    return jnp.repeat(chosen, group_size // k, axis=-1).reshape(-1).astype(jnp.int32)
