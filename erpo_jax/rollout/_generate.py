"""Prompts -> G completions each -> decoded text: the sampling half of a rollout.

:func:`generate` is what the trainer and :func:`erpo_jax.rollout.evaluate`
both call. It encodes the task's prompts, left-pads them to a power-of-two
bucket (so the sampler and the train step see a handful of shapes over a
run), repeats each prompt ``G`` times (prompt-major rows ``b = p * G + g``),
samples with :func:`erpo_jax.sampling.sample`, and decodes the completions.
Row keys are ``split(problem_key[p], G)``, so a completion depends on its
problem's key only, not on the batch it was sampled in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from erpo_jax.sampling import bucket_length, sample
from erpo_jax.sampling._hosts import local_rows, multihost
from erpo_jax.tasks import Task
from erpo_jax.typing import Array

__all__ = [
    "LongPromptWarning",
    "Rollout",
    "SamplingOptions",
    "decode",
    "encode_prompts",
    "generate",
    "problem_keys",
    "prompt_budget",
    "split_long_prompts",
]


class LongPromptWarning(UserWarning):
    """Prompts longer than the prompt budget were skipped (and counted)."""


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How completions are drawn (the ``rollout`` part of a run's config).

    Attributes:
      max_new_tokens: T, completion budget.
      temperature: ``>= 0``; 0 is greedy.
      top_k, top_p, min_p: truncations (None: off).
      reft: REFT first-token diversification (arXiv 2605.28295): ``reft_k``
        distinct openers from the top ``reft_top_n`` per group, each on
        ``G / reft_k`` rows.
      reft_top_n, reft_k: REFT's N and K.
      reft_marker: ids forced before the REFT opener (e.g. ``<think>``).
      stop_check_every: decode steps between host checks of stop strings.
      decode_phases: the sampler's decode loop in this many parts over a
        growing KV cache (``sample(decode_phases=)``), with or without stop
        strings; None: the sampler's auto rule (``resolve_decode_phases``).
      gather_params: on a mesh with ``fsdp > 1``, gather the parameters over
        it once per call (``sample(gather_params=)``); None: when they take
        at most ``GATHER_FRACTION`` of a device's memory.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    reft: bool = False
    reft_top_n: int = 20
    reft_k: int = 4
    reft_marker: tuple[int, ...] = ()
    stop_check_every: int = 16
    decode_phases: int | None = None
    gather_params: bool | None = None


class Rollout(NamedTuple):
    """``P`` prompts times ``G`` completions, prompt-major (``B = P * G`` rows).

    Attributes:
      prompt_tokens, prompt_mask: ``[B, S]`` left-padded prompts (device).
      tokens, logp, entropy, mask: ``[B, T]`` the sampler's outputs (device):
        ids, full-distribution log-prob and entropy, valid tokens.
      lengths: ``[B]`` host int array of completion lengths.
      texts: ``B`` decoded completions (special tokens skipped).
      truncated: ``[B]`` host bool, the completion used all ``max_new_tokens``
        without an EOS id or a stop string.
      prompts: ``P`` prompt texts.
    """

    prompt_tokens: Array
    prompt_mask: Array
    tokens: Array
    logp: Array
    entropy: Array
    mask: Array
    lengths: np.ndarray
    texts: list[str]
    truncated: np.ndarray
    prompts: list[str]

    @property
    def group_size(self) -> int:
        return self.tokens.shape[0] // len(self.prompts)


def _encode(tokenizer: Any, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text, for a ``transformers`` or a raw ``tokenizers`` tokenizer."""
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        encoded = tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [list(e.ids) for e in encoded]
    out = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [list(ids) for ids in out]


def decode(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    """Texts of token-id rows, special tokens skipped."""
    if hasattr(tokenizer, "decode_batch"):  # tokenizers.Tokenizer
        return list(tokenizer.decode_batch(rows, skip_special_tokens=True))
    return list(tokenizer.batch_decode(rows, skip_special_tokens=True))


def encode_prompts(
    task: Task,
    tokenizer: Any,
    problems: Sequence[Any],
    *,
    pad_id: int,
    bucket: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Left-padded prompt ids ``[P, S]``, their mask, and the prompt texts.

    ``S`` is the longest prompt, rounded up to ``bucket_length`` when
    ``bucket`` (powers of two from 8), so shapes repeat across steps.

    Raises:
      ValueError: a prompt encodes to no tokens (names the problem's index).
    """
    texts = [task.prompt(p, tokenizer) for p in problems]
    ids = _encode(tokenizer, texts, add_special_tokens=task.add_special_tokens(tokenizer))
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"the prompt of problems[{i}] encodes to no tokens")
    width = max(len(row) for row in ids)
    if bucket:
        width = bucket_length(width)
    tokens = np.full((len(ids), width), pad_id, np.int32)
    mask = np.zeros((len(ids), width), bool)
    for i, row in enumerate(ids):
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = True
    return tokens, mask, texts


def prompt_budget(max_position_embeddings: int, max_new_tokens: int, limit: int | None) -> int:
    """The longest prompt (tokens) a rollout accepts.

    ``limit`` when given, else the model's context minus the completion budget,
    so that prompt plus completion fit the positions the model was trained for.

    Raises:
      ValueError: nothing fits (``max_new_tokens`` alone fills the context).
    """
    room = max_position_embeddings - max_new_tokens
    budget = room if limit is None else min(limit, room)
    if budget < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"max_position_embeddings={max_position_embeddings}"
        )
    return budget


def split_long_prompts(
    task: Task, tokenizer: Any, problems: Sequence[Any], max_tokens: int
) -> tuple[list[int], list[int]]:
    """``(kept, skipped)`` indices of ``problems`` by whether the prompt fits ``max_tokens``.

    A prompt that encodes to no tokens is skipped too (it cannot be sampled).
    """
    texts = [task.prompt(p, tokenizer) for p in problems]
    ids = _encode(tokenizer, texts, add_special_tokens=task.add_special_tokens(tokenizer))
    kept = [i for i, row in enumerate(ids) if 0 < len(row) <= max_tokens]
    skipped = [i for i, row in enumerate(ids) if not 0 < len(row) <= max_tokens]
    return kept, skipped


def problem_keys(key: Any, indices: Sequence[int] | np.ndarray) -> Array:
    """One key per problem, ``fold_in(key, index)``: completions do not depend on batching."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))


def generate(
    model: Any,
    tokenizer: Any,
    task: Task,
    problems: Sequence[Any],
    keys: Array,
    *,
    group_size: int,
    options: SamplingOptions,
    eos_ids: Sequence[int],
    pad_id: int,
    greedy: bool = False,
    use_lora: bool = True,
    mesh: Any = None,
) -> Rollout:
    """Samples ``group_size`` completions for each problem and decodes them.

    Args:
      model: a ``Decoder`` or its ``(graphdef, state)`` pair.
      tokenizer: encodes prompts and decodes completions.
      task: the :class:`erpo_jax.tasks.Task` (prompt text, stop strings).
      problems: ``P`` problems.
      keys: ``[P]`` per-problem keys (:func:`problem_keys`).
      group_size: G.
      options: :class:`SamplingOptions`.
      eos_ids: ids that end a completion.
      pad_id: id of padding.
      greedy: argmax decoding (``temperature`` ignored; REFT off).
      use_lora: sample with the LoRA adapters applied.
      mesh: shard the rows (and KV cache) over this mesh's ``(data, fsdp)``
        axes (see :func:`erpo_jax.sampling.sample`); the rows must divide.
        Multi-host: ``problems`` and ``keys`` are this process's, every
        process passes as many, and the returned arrays are this process's
        rows (NumPy).

    Returns:
      A :class:`Rollout`.
    """
    tokens, mask, prompts = encode_prompts(task, tokenizer, problems, pad_id=pad_id)
    prompt_tokens = jnp.asarray(np.repeat(tokens, group_size, axis=0))
    prompt_mask = jnp.asarray(np.repeat(mask, group_size, axis=0))
    row_keys = jax.vmap(lambda k: jax.random.split(k, group_size))(keys).reshape(-1)
    stops = tuple(task.stop_strings)
    reft = options.reft and not greedy
    out = sample(
        model,
        prompt_tokens,
        prompt_mask,
        row_keys,
        max_new_tokens=options.max_new_tokens,
        temperature=0.0 if greedy else options.temperature,
        top_k=None if greedy else options.top_k,
        top_p=None if greedy else options.top_p,
        min_p=None if greedy else options.min_p,
        eos_ids=tuple(eos_ids),
        stop_strings=stops or None,
        tokenizer=tokenizer if stops else None,
        stop_check_every=options.stop_check_every,
        pad_id=pad_id,
        first_token="reft" if reft else None,
        group_size=group_size,
        reft_top_n=options.reft_top_n,
        reft_k=options.reft_k,
        reft_marker=options.reft_marker,
        use_lora=use_lora,
        mesh=mesh,
        decode_phases=options.decode_phases,
        gather_params=options.gather_params,
    )
    if multihost(mesh):
        # This process's rows only (the outputs are global arrays).
        out = jax.tree.map(local_rows, out)
    host_tokens, lengths = jax.device_get((out.tokens, out.lengths))
    lengths = np.asarray(lengths)
    texts = decode(tokenizer, [host_tokens[r, : lengths[r]].tolist() for r in range(len(lengths))])
    eos_set = {int(e) for e in eos_ids}
    ended = np.array(
        [
            n > 0
            and (
                int(host_tokens[r, n - 1]) in eos_set
                or (bool(stops) and any(s in texts[r] for s in stops))
            )
            for r, n in enumerate(lengths)
        ],
        bool,
    )
    truncated = (lengths >= options.max_new_tokens) & ~ended
    return Rollout(
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        tokens=out.tokens,
        logp=out.logp,
        entropy=out.entropy,
        mask=out.mask,
        lengths=lengths,
        texts=texts,
        truncated=truncated,
        prompts=prompts,
    )
