"""The KV-cache sampler: one jitted prefill, then a jitted ``lax.while_loop`` of decode steps.

Layout: prompts are left-padded ``[B, S]`` (row ``b = p * G + g``,
prompt-major); completions are right-padded ``[B, T]`` with ``T =
max_new_tokens``. Concatenating ``prompt_tokens`` and ``tokens`` (and their
masks) gives a batch whose real tokens are contiguous, so the trainer's full
forward pass on it sees exactly the positions and attention the sampler saw.

Compilation: the prefill and the decode loop are jitted once per (model
structure, B, bucketed S, T, static options). Prompt lengths are bucketed to
powers of two (at least 8), so a training run with varying prompt lengths
compiles a handful of times, not every step. ``temperature``, ``top_p``,
``min_p``, ``eos_ids`` and the key are traced values: changing them does not
recompile; ``top_k``, greedy-or-not and which truncations are active do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from erpo_jax.models import Decoder, KVCache, share_kv_prefix
from erpo_jax.sampling._groups import REFT_STREAM, as_row_keys, reft_first_tokens
from erpo_jax.sampling._hosts import (
    check_row_hosts,
    global_max,
    global_rows,
    local_rows,
    multihost,
)
from erpo_jax.sampling._hosts import row_axes as _row_axes
from erpo_jax.sampling._hosts import row_shards as _row_shards
from erpo_jax.sampling._logits import StepSample, sample_from_logits, score_tokens
from erpo_jax.sampling._stop import StopStringMatcher
from erpo_jax.typing import Array, ArrayLike, Bool, Float, Int

__all__ = [
    "GATHER_FRACTION",
    "SampleOutput",
    "bucket_length",
    "compiled_cache_sizes",
    "gathered_layout",
    "sample",
]

_MIN_BUCKET = 8


class SampleOutput(NamedTuple):
    """Completions and their per-token statistics, right-padded to ``T = max_new_tokens``.

    Attributes:
      tokens: ``[B, T]`` int32 sampled ids; ``pad_id`` where ``mask`` is False.
      logp: ``[B, T]`` float32 log-probability of each token under the
        temperature-scaled FULL-vocabulary distribution ``softmax(logits /
        temperature)``: the quantity the trainer recomputes with
        ``erpo_jax.ops.token_logp_and_entropy(..., temperature=temperature)``
        (``old_logp``), whatever top-k/top-p/min-p did. 0 where masked.
      entropy: ``[B, T]`` float32 entropy of that same full distribution
        (``sampler_entropy`` in the losses). 0 where masked.
      mask: ``[B, T]`` bool, True on sampled tokens up to and including the EOS
        token or the token that completes a stop string.
      lengths: ``[B]`` int32, ``mask.sum(-1)``.
      truncated_entropy: ``[B, T]`` float32 entropy of the distribution each
        token was actually drawn from: after top-k/top-p/min-p, equal to
        ``entropy`` when none is active, 0 under greedy decoding. 0 where masked.
    """

    tokens: Int[Array, "B T"]
    logp: Float[Array, "B T"]
    entropy: Float[Array, "B T"]
    mask: Bool[Array, "B T"]
    lengths: Int[Array, " B"]
    truncated_entropy: Float[Array, "B T"]


class _Static(NamedTuple):
    """Hashable options fixed at compile time."""

    greedy: bool
    top_k: int | None
    use_top_p: bool
    use_min_p: bool
    max_new_tokens: int
    cache_length: int
    pad_id: int
    use_lora: bool
    group_size: int  # REFT group size; 0 when REFT is off
    prefix_group: int  # rows that share each prompt's prefill (1: no sharing)
    reft_top_n: int
    reft_k: int
    mesh: Any = None  # jax.sharding.Mesh: rows over (data, fsdp), KV heads over tensor
    decode_phases: int = 1  # decode loops over a cache grown between them (_phases)
    phase: int = -1  # run only this phase's loop (the stop-string chunks), or all (-1)


def _phases(static: _Static, markers: int) -> list[tuple[int, int]]:
    """``[(end step, cache slots)]``: the decode loop in ``static.decode_phases`` parts.

    The decode steps ``markers + 1 .. T - 1`` split into equal ranges; the
    phase ending before step ``end`` needs the prompt's ``S`` slots and
    ``end - 1`` more (step ``t`` writes slot ``S + t - 1``), so its cache
    has ``S + end - 1`` of the ``S + T - 1`` slots and attention reads no
    slot the phase cannot have filled. One phase is one loop over the
    whole cache.
    """
    t_max, c = static.max_new_tokens, static.cache_length
    s = c - t_max + 1
    ends = phase_ends(t_max, static.decode_phases, markers)
    return [(end, min(c, s + end - 1)) for end in ends]


def phase_ends(max_new_tokens: int, decode_phases: int, markers: int = 0) -> list[int]:
    """The steps before which each of the ``decode_phases`` loops ends: the decode
    steps ``markers + 1 .. max_new_tokens - 1`` in equal ranges (at least one
    step each). The phase ending before step ``end`` has ``end - 1`` own slots."""
    first = markers + 1
    n = max(1, min(decode_phases, max_new_tokens - first))
    return [first + -(-(max_new_tokens - first) * (i + 1) // n) for i in range(n)]


def _grow(cache: KVCache, slots: int) -> KVCache:
    """``cache`` with ``slots`` slots in all, counting a shared prefix's: new empty
    ones appended to each row's own (none if it has them)."""
    slots -= cache.prefix_length
    have = cache.max_length
    if slots <= have:
        return cache

    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, slots - have)
        return jnp.pad(x, widths)

    return cache._replace(
        k=tuple(pad(x, 3) for x in cache.k),
        v=tuple(pad(x, 2) for x in cache.v),
        mask=pad(cache.mask, 1),
    )


def _constrain(state: _LoopState, mesh: Any) -> _LoopState:
    """The loop state pinned to the mesh: every ``[B, ...]`` array sharded by rows
    over ``(data, fsdp)``, and the KV cache also by KV heads over ``tensor``
    when they divide (a split never cuts a head). No-op without a mesh."""
    if mesh is None:
        return state
    from jax.sharding import NamedSharding, PartitionSpec

    b = state.done.shape[0]
    rows = _row_axes(mesh) or None
    tensor = mesh.shape["tensor"] if "tensor" in mesh.axis_names else 1

    def pin(x, kv=False, n=b):  # n: the leading rows ([P, ...] for a shared prefix)
        if x.ndim == 0:
            return x
        lead = 1 if x.shape[0] != n else 0  # stacked [L, B, ...] caches
        if x.shape[lead] != n:
            return x
        spec: list[Any] = [None] * x.ndim
        spec[lead] = rows
        heads = lead + 1
        if kv and tensor > 1 and x.ndim - lead == 4 and x.shape[heads] % tensor == 0:
            spec[heads] = "tensor"
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))

    cache = state.cache

    def pin_kv(x: Any, n: int = b) -> Any:  # one array per layer, or one stacked [L, ...]
        return tuple(pin(y, True, n) for y in x) if isinstance(x, tuple) else pin(x, True, n)

    cache = cache._replace(
        k=pin_kv(cache.k), v=pin_kv(cache.v), mask=pin(cache.mask), positions=pin(cache.positions)
    )
    if cache.prefix is not None:  # [P, ...] by prompts: sample() shares only when P divides
        pre, p = cache.prefix, cache.prefix.mask.shape[0]
        pre = pre._replace(k=pin_kv(pre.k, p), v=pin_kv(pre.v, p), mask=pin(pre.mask, n=p))
        cache = cache._replace(prefix=pre)
    return state._replace(
        cache=cache,
        prev=pin(state.prev),
        tokens=pin(state.tokens),
        logp=pin(state.logp),
        entropy=pin(state.entropy),
        truncated_entropy=pin(state.truncated_entropy),
        mask=pin(state.mask),
        done=pin(state.done),
    )


class _Dynamic(NamedTuple):
    """Traced options: changing them does not recompile."""

    temperature: Float[Array, ""]
    top_p: Float[Array, ""]
    min_p: Float[Array, ""]
    eos_ids: Int[Array, " E"]
    marker: Int[Array, " M"]


class _LoopState(NamedTuple):
    step: Int[Array, ""]  # next completion index to fill
    prev: Int[Array, " B"]  # last token, fed to the next decode step
    cache: KVCache
    tokens: Int[Array, "B T"]
    logp: Float[Array, "B T"]
    entropy: Float[Array, "B T"]
    truncated_entropy: Float[Array, "B T"]
    mask: Bool[Array, "B T"]
    done: Bool[Array, " B"]


def bucket_length(n: int) -> int:
    """The prompt-length bucket of ``n`` tokens: the next power of two, at least 8."""
    return max(_MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _truncation(static: _Static, dyn: _Dynamic) -> dict[str, Any]:
    return dict(
        temperature=dyn.temperature,
        greedy=static.greedy,
        top_k=static.top_k,
        top_p=dyn.top_p if static.use_top_p else None,
        min_p=dyn.min_p if static.use_min_p else None,
    )


def _write(state: _LoopState, t, s: StepSample, alive, eos_ids, pad_id: int) -> _LoopState:
    """Stores step ``t``'s draws in column ``t``; finished rows get padding."""
    tokens = jnp.where(alive, s.tokens, pad_id)

    def put(buf, col):
        return jax.lax.dynamic_update_slice(buf, col[:, None].astype(buf.dtype), (0, t))

    def zero(x):
        return jnp.where(alive, x, 0.0)

    is_eos = jnp.any(tokens[:, None] == eos_ids[None, :], axis=-1)
    return state._replace(
        step=jnp.asarray(t + 1, jnp.int32),
        prev=tokens,
        tokens=put(state.tokens, tokens),
        logp=put(state.logp, zero(s.logp)),
        entropy=put(state.entropy, zero(s.entropy)),
        truncated_entropy=put(state.truncated_entropy, zero(s.truncated_entropy)),
        mask=put(state.mask, alive),
        done=state.done | (alive & is_eos),
    )


def _draw(logits, keys, t, static: _Static, dyn: _Dynamic) -> StepSample:
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)
    return sample_from_logits(logits, step_keys, **_truncation(static, dyn))


def _prefill(graphdef, params, tokens, mask, keys, dyn: _Dynamic, *, static: _Static):
    """Prompt (+ forced marker) through the model, then the first free completion token."""
    model = nnx.merge(graphdef, params)
    b, s = tokens.shape
    m = dyn.marker.shape[0]
    t_max = static.max_new_tokens
    if m:
        tokens = jnp.concatenate([tokens, jnp.broadcast_to(dyn.marker, (b, m))], axis=1)
        mask = jnp.concatenate([mask, jnp.ones((b, m), bool)], axis=1)
    share = static.prefix_group
    slots = _phases(static, m)[0][1]  # the first decode phase's cache
    if share > 1:
        # Each prompt is prefilled once into a cache of its S + m slots, which
        # becomes the rows' shared prefix: stored and attended once per group.
        # Rows are prompt-major: [P * G] -> [P, G] and take member 0 (a slice
        # of the minor axis, so a row-sharded batch stays sharded by prompt).
        def one_per_prompt(x):
            return x.reshape(b // share, share, *x.shape[1:])[:, 0]

        prompt_slots = tokens.shape[1]
        hidden, cache = model.extend(
            one_per_prompt(tokens),
            one_per_prompt(mask),
            model.init_cache(b // share, prompt_slots),
            use_lora=static.use_lora,
            fresh=True,
        )
        hidden = hidden[:, s - 1 :]
        hidden = jnp.broadcast_to(hidden[:, None], (b // share, share, *hidden.shape[1:]))
        hidden = hidden.reshape(b, *hidden.shape[2:])
        cache = share_kv_prefix(cache, share, max(1, slots - prompt_slots))
    else:
        hidden, cache = model.extend(
            tokens,
            mask,
            model.init_cache(b, slots),
            use_lora=static.use_lora,
            fresh=True,
        )
        hidden = hidden[:, s - 1 :]
    # The last m + 1 positions predict the marker tokens and the first free token.
    logits = jnp.einsum(
        "bsd,dv->bsv", hidden, model.unembedding(), preferred_element_type=jnp.float32
    )
    zeros = jnp.zeros((b, t_max), jnp.float32)
    state = _LoopState(
        step=jnp.zeros((), jnp.int32),
        prev=jnp.zeros((b,), jnp.int32),
        cache=cache,
        tokens=jnp.full((b, t_max), static.pad_id, jnp.int32),
        logp=zeros,
        entropy=zeros,
        truncated_entropy=zeros,
        mask=jnp.zeros((b, t_max), bool),
        done=jnp.zeros((b,), bool),
    )
    alive = jnp.ones((b,), bool)
    no_eos = jnp.zeros((0,), jnp.int32)
    for i in range(m):  # forced marker tokens: the policy's true statistics
        forced = jnp.broadcast_to(dyn.marker[i], (b,))
        stats = score_tokens(logits[:, i], forced, **_truncation(static, dyn))
        state = _write(state, i, stats, alive, no_eos, static.pad_id)
    first = logits[:, m]
    if static.group_size:
        g = static.group_size
        group_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys[::g], REFT_STREAM)
        openers = reft_first_tokens(
            first[::g], group_keys, group_size=g, top_n=static.reft_top_n, k=static.reft_k
        )
        stats = score_tokens(first, openers, **_truncation(static, dyn))
    else:
        stats = _draw(first, keys, m, static, dyn)
    return _constrain(_write(state, m, stats, alive, dyn.eos_ids, static.pad_id), static.mesh)


def _decode(graphdef, params, state: _LoopState, keys, stop_at, dyn: _Dynamic, *, static: _Static):
    """Decode steps until ``stop_at`` or until every row is done.

    ``keys`` are the ``[B]`` row keys (step ``t`` draws with ``fold_in(key, t)``);
    they stay outside the donated loop state so a caller's key array is never donated.
    """
    model = nnx.merge(graphdef, params)
    # Made once, outside the loop: inside it XLA would copy every layer's
    # weights out of the stacked arrays and recompute RoPE's sines and
    # cosines per use, at every step. The RoPE table covers the whole cache
    # (a row's position never reaches its slot count).
    consts = model.decode_consts(static.cache_length)

    def body(st: _LoopState):
        logits, cache = model.decode_step(
            st.prev, st.cache, use_lora=static.use_lora, consts=consts
        )
        stats = _draw(logits, keys, st.step, static, dyn)
        st = st._replace(cache=cache)
        return _constrain(
            _write(st, st.step, stats, ~st.done, dyn.eos_ids, static.pad_id), static.mesh
        )

    # With decode_phases > 1, one loop per phase over a cache grown between
    # them, so that early steps attend to fewer empty slots. The stop-string
    # chunks run one phase per call (static.phase), each compiled once.
    phases = _phases(static, dyn.marker.shape[0])
    if static.phase >= 0:
        phases = phases[static.phase : static.phase + 1]
    for end, slots in phases:
        state = _constrain(state._replace(cache=_grow(state.cache, slots)), static.mesh)
        until = jnp.minimum(stop_at, end)

        def cond(st: _LoopState, until=until):
            return (st.step < until) & ~jnp.all(st.done)

        state = jax.lax.while_loop(cond, body, state)
    return state


def _finish(state: _LoopState, cut, *, pad_id: int) -> SampleOutput:
    """Masks everything after each row's stop-string cut (``cut < 0``: none)."""
    t_max = state.tokens.shape[1]
    last = jnp.where(cut < 0, t_max, cut)
    mask = state.mask & (jnp.arange(t_max)[None, :] <= last[:, None])

    def zero(x):
        return jnp.where(mask, x, 0.0)

    return SampleOutput(
        tokens=jnp.where(mask, state.tokens, pad_id),
        logp=zero(state.logp),
        entropy=zero(state.entropy),
        mask=mask,
        lengths=jnp.sum(mask, axis=-1, dtype=jnp.int32),
        truncated_entropy=zero(state.truncated_entropy),
    )


# The sampler is one of the library's jitted pieces (DESIGN.md): it owns its
# jit so that the host loop between chunks (stop strings) reuses one compiled
# prefill and one compiled decode loop. The loop state is donated: the KV cache
# is updated in place across chunks.
_prefill_jit = jax.jit(_prefill, static_argnums=0, static_argnames="static")
_decode_jit = jax.jit(_decode, static_argnums=0, static_argnames="static", donate_argnums=2)
_finish_jit = jax.jit(_finish, static_argnames="pad_id")


def compiled_cache_sizes() -> dict[str, int]:
    """Number of compiled variants of the sampler's jitted pieces (for recompile checks)."""
    return {
        "prefill": _prefill_jit._cache_size(),  # type: ignore[attr-defined]
        "decode": _decode_jit._cache_size(),  # type: ignore[attr-defined]
        "finish": _finish_jit._cache_size(),  # type: ignore[attr-defined]
    }


_all_done = jax.jit(jnp.all)


def _stop_window(tokens, mask, offset, *, width: int):
    """``(tokens[:, offset : offset + width], lengths [B])`` for the stop-string check."""
    window = jax.lax.dynamic_slice_in_dim(tokens, offset, width, axis=1)
    return window, jnp.sum(mask, axis=1, dtype=jnp.int32)


_stop_window_jit = jax.jit(_stop_window, static_argnames="width")


def _local_keys(key: Any, b_local: int, b: int) -> Array:
    """This process's ``[B_local]`` row keys: its own ``[B_local]`` keys, or its
    slice of one key split over all ``B`` rows."""
    arr = key if isinstance(key, jax.Array) else jnp.asarray(key)
    typed = jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key)
    if arr.shape == (() if typed else (2,)):
        start = jax.process_index() * b_local
        return as_row_keys(key, b)[start : start + b_local]
    return as_row_keys(key, b_local)


def _spans_devices(params: Any) -> bool:
    """Whether the parameters are placed over several devices (a mesh).

    Prefix sharing prefills ``P`` rows and broadcasts them to ``B``; without
    explicit output shardings for the cache (not yet) the compiler may
    replicate it on a mesh, so it is used on one device only.
    """
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and len(sharding.device_set) > 1:
            return True
    return False


def prefix_group(group: int, rows: int, row_shards: int, config: Any) -> int:
    """Rows that share each prompt's prefill and KV cache (1: none), as :func:`sample` runs it.

    ``group`` rows a prompt share it when the ``rows // group`` prompts divide
    over the ``row_shards`` (a shared prefill's rows are sharded too), and
    never for a sliding-window model: its mask reads the cache by slot, and
    the shared prefix's own slots do not carry that mask.
    """
    if group <= 1 or config.sliding_layers or (rows // group) % row_shards:
        return 1
    return group


GATHER_FRACTION = 1 / 8
"""``gather_params=None`` gathers when the gathered parameters take at most this
fraction of a device's memory (``memory_stats()["bytes_limit"]``)."""


def _without_fsdp(spec: Any) -> Any:
    """``spec`` with the ``fsdp`` axis dropped (its other axes, e.g. ``tensor``, kept)."""

    def drop(entry):
        if entry == "fsdp":
            return None
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a != "fsdp")
            return kept[0] if len(kept) == 1 else (kept or None)
        return entry

    return type(spec)(*(drop(e) for e in spec))


def _device_bytes_limit() -> int | None:
    """This process's first device's memory limit in bytes, or None where unknown (CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # some backends do not implement it
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def _keeps_its_dtype(path: Any) -> bool:
    """Whether a parameter is read in its own dtype: the RMSNorm weights
    (``*_norm``), which ``Decoder`` upcasts to float32; every other weight it
    casts to the compute dtype where it is used."""
    return any(str(getattr(k, "key", "")).endswith("norm") for k in path)


def gathered_layout(
    params: Any,
    mesh: Any,
    gather: bool | None = None,
    *,
    dtype: Any = None,
    bytes_limit: int | None = None,
) -> Any:
    """What :func:`sample` gathers ``params`` into over ``fsdp``, or None (no gather).

    On a mesh with ``fsdp > 1`` the weights' input side is split over the
    same axis as the rows. Left so, every prefill and decode step either
    gathers every weight or (XLA's choice) splits each matmul's contraction
    and all-reduces its activations and the ``[B, V]`` logits: on
    Qwen3-1.7B over fsdp=8 (512 rows), about 230 collectives per decode
    step, every device running all 512 rows, and a 0.3 GB all-reduce of the
    float32 logits among them. Gathered once for the whole rollout (each
    device then holds every weight, still split over ``tensor``), prefill
    and decode run each device's rows with no collective but the tensor
    axis's.

    With a narrower compute ``dtype`` (the model's, e.g. bfloat16 for
    float32 parameters), every weight but the norms is gathered already cast
    to it: the values ``Decoder`` computes with anyway, in half the bytes.

    ``gather``: True gathers whenever the mesh has ``fsdp > 1`` and every
    parameter is placed on it; False never; None (auto) also requires the
    gathered parameters to take at most :data:`GATHER_FRACTION` of
    ``bytes_limit`` (the device's memory; unknown, e.g. on CPU, counts as
    room enough).

    Returns:
      None, or ``params``' tree of ``jax.ShapeDtypeStruct`` (shape, gathered
      dtype, gathered sharding).
    """
    if gather is False or mesh is None or dict(mesh.shape).get("fsdp", 1) == 1:
        return None
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    shardings = [getattr(x, "sharding", None) for _, x in flat]
    named = [sh for sh in shardings if isinstance(sh, jax.sharding.NamedSharding)]
    if not flat or len(named) < len(flat) or any(sh.mesh != mesh for sh in named):
        return None
    narrow = None if dtype is None else jnp.dtype(dtype)
    layout = []
    for (path, x), sh in zip(flat, named, strict=True):
        dt = jnp.dtype(x.dtype)
        if (
            narrow is not None
            and jnp.issubdtype(dt, jnp.floating)
            and narrow.itemsize < dt.itemsize
            and not _keeps_its_dtype(path)
        ):
            dt = narrow
        target = jax.sharding.NamedSharding(mesh, _without_fsdp(sh.spec))
        layout.append(jax.ShapeDtypeStruct(x.shape, dt, sharding=target))
    if gather is None and bytes_limit is not None:
        gathered = sum(
            math.prod(t.sharding.shard_shape(t.shape)) * t.dtype.itemsize for t in layout
        )
        if gathered > GATHER_FRACTION * bytes_limit:
            return None
    return jax.tree_util.tree_unflatten(treedef, layout)


# ``decode_phases=None``: this many phases on the CPU backend from this many new
# tokens (see resolve_decode_phases).
AUTO_DECODE_PHASES = 8
AUTO_DECODE_PHASES_MIN_TOKENS = 128


def resolve_decode_phases(
    decode_phases: int | None, max_new_tokens: int, backend: str | None = None
) -> int:
    """The number of decode loops ``sample(decode_phases=...)`` runs.

    An int is checked (``>= 1``) and kept. ``None`` (the default, "auto")
    means :data:`AUTO_DECODE_PHASES` (8) phases on the CPU backend when
    ``max_new_tokens >= 128``, and one loop otherwise. The rule is what was
    measured (docs/benchmarks.md, "Decode phases by default"): on the 2-core
    Xeon the grouped tiny-Qwen3 rollout decoded 18-32% more tokens/s with 8
    phases at 128 and 256 new tokens, for about 5 s more compile time; at 64
    new tokens 4 phases gained 2.5%, less than their compile time is worth.
    On GPU and TPU the KV cache is what bounds the batch, and a phase
    change holds the old and the new cache at once (the compiled decode's
    arguments, outputs and temporaries came to 1.5x the one-loop program's
    with 8 phases at 1,024 new tokens), and the speed there is unmeasured,
    so auto keeps one loop; pass an int to choose.
    """
    if decode_phases is not None:
        return _positive_int("decode_phases", decode_phases, "None (auto) or a positive int")
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu" and max_new_tokens >= AUTO_DECODE_PHASES_MIN_TOKENS:
        return AUTO_DECODE_PHASES
    return 1


def _positive_int(name: str, value: Any, allowed: str = "a positive int") -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"sample: {name} must be {allowed}, got {value!r}")
    return int(value)


def _ids(name: str, values: Sequence[int], vocab: int) -> np.ndarray:
    ids = np.asarray(list(values), np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"sample: {name} must be token ids in [0, V={vocab}), got {list(values)}")
    return ids.astype(np.int32)


def _prepare_prompts(
    tokens, mask, *, vocab: int, max_new_tokens: int, max_length: int, pad_id, bucket
):
    """Validates left-padded prompts, trims shared padding, left-pads to the bucket length."""
    tokens = np.asarray(tokens)
    mask = np.asarray(mask)
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise ValueError(
            f"sample: prompt_tokens must be a non-empty [B, S] array, got shape {tokens.shape}"
        )
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"sample: prompt_tokens must hold integer ids, got dtype {tokens.dtype}")
    if mask.shape != tokens.shape:
        raise ValueError(
            f"sample: prompt_mask must have prompt_tokens' shape {tokens.shape}, got {mask.shape}"
        )
    if mask.dtype != bool:
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError("sample: prompt_mask must be bool or 0/1")
        mask = mask.astype(bool)
    lengths = mask.sum(axis=1)
    if np.any(lengths == 0):
        rows = np.flatnonzero(lengths == 0)[:5].tolist()
        raise ValueError(f"sample: prompt_mask has empty prompts (no real token) in rows {rows}")
    if np.any(mask[:, :-1] & ~mask[:, 1:]):
        raise ValueError(
            "sample: prompt_mask must be left-padded (False... then True...), so that "
            "prompt + completion is contiguous"
        )
    real = np.where(mask, tokens, 0)
    if real.min() < 0 or real.max() >= vocab:
        bad = real[(real < 0) | (real >= vocab)][:5].tolist()
        raise ValueError(f"sample: prompt_tokens has ids outside the vocab [0, V={vocab}): {bad}")
    longest = int(lengths.max())
    if longest + max_new_tokens > max_length:
        raise ValueError(
            f"sample: the longest prompt ({longest} tokens, prompt_tokens) plus "
            f"max_new_tokens={max_new_tokens} exceeds max_length={max_length} (the cache "
            "size limit); shorten the prompt or lower max_new_tokens"
        )
    width = min(bucket_length(longest), max_length - max_new_tokens) if bucket else longest
    out_tokens = np.full((tokens.shape[0], width), pad_id, np.int32)
    out_mask = np.zeros((tokens.shape[0], width), bool)
    n = min(width, tokens.shape[1])
    # Padding columns hold pad_id (an in-vocabulary id): out-of-range ids would
    # embed as NaN, and NaN values leak through masked attention (0 * NaN).
    out_tokens[:, width - n :] = np.where(mask[:, -n:], tokens[:, -n:], pad_id)
    out_mask[:, width - n :] = mask[:, -n:]
    return out_tokens, out_mask


def sample(
    model: Decoder | tuple[Any, Any],
    prompt_tokens: Int[ArrayLike, "B S"],
    prompt_mask: Bool[ArrayLike, "B S"],
    key: ArrayLike,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    eos_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer: Any = None,
    stop_check_every: int = 16,
    pad_id: int | None = None,
    max_length: int | None = None,
    bucket_prompts: bool = True,
    first_token: str | None = None,
    group_size: int | None = None,
    reft_top_n: int = 20,
    reft_k: int = 4,
    reft_marker: Sequence[int] = (),
    use_lora: bool = True,
    share_prefix: bool = True,
    mesh: Any = None,
    decode_phases: int | None = None,
    gather_params: bool | None = None,
) -> SampleOutput:
    """Samples ``max_new_tokens`` per row with a KV cache; returns tokens, logp, entropy, mask.

    One jitted prefill runs the prompts; a jitted ``lax.while_loop`` then
    decodes one token per row per step on fixed-size buffers and stops as
    soon as every row has finished (EOS or a stop string). Each step computes,
    in float32 from that step's logits, the log-probability and entropy of
    the temperature-scaled full-vocabulary distribution (what the trainer
    recomputes; see :class:`SampleOutput`), so no second pass is needed.

    Randomness: row ``b`` draws its step-``t`` token with
    ``fold_in(row_key[b], t)``, so the same key gives the same output, and a
    row's draws do not depend on the other rows or on stop strings.

    Stop strings (``stop_strings`` with ``tokenizer``) are checked on the host
    every ``stop_check_every`` steps by decoding each live row's recent
    tokens (see ``erpo_jax/sampling/_stop.py``): exact for any tokenizer,
    at the cost of one small device-to-host copy per chunk. Without stop
    strings the whole decode is one device call.

    REFT (arXiv 2605.28295; METHOD.md section 3), ``first_token="reft"``:
    rows are ``P`` groups of ``group_size`` (prompt-major, as built by
    :func:`repeat_for_groups`; the rows of a group must share a prompt). For
    each group the policy's top-``reft_top_n`` first-token candidates are
    taken, ``reft_k`` distinct ones are chosen uniformly, and each is forced on
    ``group_size / reft_k`` consecutive rows; the rest of each completion is
    sampled normally. The forced token's ``logp``/``entropy`` are the
    policy's true values (no importance correction). With ``reft_marker``
    (e.g. the ids of ``"<think>"``), every completion starts with those forced
    tokens (counted in ``max_new_tokens``, masked True, true statistics) and
    the diversified token is the one right after them.

    Args:
      model: a :class:`erpo_jax.models.Decoder`, or its ``nnx.split`` pair
        ``(graphdef, state)`` (e.g. the policy parameters of a train state).
      prompt_tokens: ``[B, S]`` left-padded prompt ids, ``B = P * G``
        prompt-major for group sampling.
      prompt_mask: ``[B, S]`` bool (or 0/1), True on real prompt tokens;
        every row needs at least one.
      key: one PRNG key (split into ``B`` row keys) or ``[B]`` row keys;
        typed (``jax.random.key``) or raw ``uint32``.
      max_new_tokens: T, completion length (buffer width).
      temperature: ``>= 0``. 0 is greedy (argmax); then ``logp``/``entropy``
        are those of the temperature-1 distribution.
      top_k: keep the k most likely tokens (``1 <= top_k <= V``), or None.
      top_p: nucleus mass in ``(0, 1]``, or None.
      min_p: keep tokens with probability ``>= min_p * max prob``; ``[0, 1]``, or None.
      eos_ids: ids that end a completion (included in ``mask``). None: the
        model config's ``eos_token_ids``; ``()``: never stop on an id.
      stop_strings: strings that end a completion when the decoded completion
        contains them; needs ``tokenizer``. The mask ends at the token that
        completes the string.
      tokenizer: anything with ``decode(list[int]) -> str``.
      stop_check_every: decode steps between stop-string checks.
      pad_id: id written where ``mask`` is False (and fed to finished rows).
        None: the config's ``pad_token_id``, else 0.
      max_length: the most tokens (prompt + completion) a row may hold, i.e.
        the cache size limit. None: the config's ``max_position_embeddings``.
      bucket_prompts: left-pad prompts to a power-of-two length (at least 8)
        so varying prompt lengths reuse compiled code.
      first_token: None or ``"reft"``.
      group_size: G, rows per prompt (prompt-major, the rows of a group
        holding the same prompt); required for REFT. With it each prompt is
        prefilled once and its KV cache copied to its G rows.
      reft_top_n: N, REFT candidate pool (``reft_k <= N <= V``).
      reft_k: K, distinct openers per group; ``group_size % reft_k == 0``.
      reft_marker: ids forced at the start of every completion before the
        REFT opener (only with ``first_token="reft"``).
      use_lora: apply the model's LoRA adapters, if any.
      share_prefix: with ``group_size``, prefill each prompt once and keep
        its keys and values once for its ``G`` rows, as a shared prefix that
        decode steps attend to once per group
        (:func:`~erpo_jax.models.share_kv_prefix`): ``G`` times less memory
        for the prompt's cache, and ``G`` times fewer of its bytes read per
        step (on the 2-core Xeon, the tiny-Qwen3 rollout of 32 + 128 tokens,
        G = 8, decoded about 15% faster than with the prompt copied into
        every row). ``False`` prefills every row into its own cache; the
        outputs are the same to float rounding. With a ``mesh``, shared
        only when the prompts divide over the row shards.
      mesh: a ``jax.sharding.Mesh`` with (some of) the axes ``data``,
        ``fsdp``, ``tensor`` (``erpo_jax.train.make_mesh``), e.g. the one the
        parameters are placed on. The rows are sharded over ``(data, fsdp)``
        (their number must divide), the loop state and KV cache stay sharded
        by rows (and the cache by KV heads over ``tensor`` where they divide)
        through prefill and decode, and the outputs come back sharded by
        rows. None: one device, or whatever the inputs' placement implies.
        Multi-host (``jax.distributed``, several processes): each process
        passes only its own ``B_local`` rows (the same number on every
        process; prompt widths may differ), and the mesh's row axes must be
        split across the processes. The rows of process ``i`` are global
        rows ``[i * B_local, (i + 1) * B_local)``; one ``key`` is split over
        all ``B`` rows. Every process must call ``sample`` together.
      decode_phases: run the decode loop in this many parts over a KV cache
        grown between them, each part's cache holding only the slots its
        steps can fill, so early steps attend to fewer empty slots. The
        outputs are the same to float rounding. It costs compile time
        (one loop per part) and, at each change, the old and the new cache
        at once. None (the default): :func:`resolve_decode_phases`'s rule,
        8 parts on CPU from 128 new tokens (18-32% more tokens/s measured
        there for about 5 s more compile time) and one loop otherwise.
        1: one loop over the whole cache. With ``stop_strings``, each
        check's chunk of steps runs the parts it overlaps, each part's loop
        compiled once.
      gather_params: with a ``mesh`` whose ``fsdp`` axis is > 1, gather the
        parameters over it once before the prefill (every weight but the
        norms in the model's compute dtype), so prefill and decode
        need no collectives over ``fsdp`` (see :func:`gathered_layout`;
        the gathered copy lives until ``sample`` returns). None (the
        default): when they take at most :data:`GATHER_FRACTION` of the
        device's memory. The outputs are the same to float rounding.

    Returns:
      :class:`SampleOutput` with ``[B, T]`` arrays and ``lengths [B]``;
      multi-host, global arrays of every process's rows (read this process's
      own rows with :func:`local_rows`).

    Raises:
      ValueError: a bad argument, named in the message: an empty prompt
        (``prompt_tokens``/``prompt_mask``), a prompt that does not fit the
        cache with ``max_new_tokens`` (``max_length``), ids outside the vocab
        (``prompt_tokens``, ``eos_ids``, ``reft_marker``), ``temperature < 0``,
        ``top_p`` outside (0, 1], ``top_k`` outside [1, V], ``min_p`` outside
        [0, 1], ``stop_strings`` without ``tokenizer``, ``group_size % reft_k``.
    """
    if isinstance(model, tuple):
        if len(model) != 2:
            raise ValueError("sample: model must be a Decoder or a (graphdef, state) pair")
        graphdef, params = model
        merged = nnx.merge(graphdef, params)
        config, compute_dtype = merged.config, merged.dtype
    elif isinstance(model, Decoder):
        graphdef, params = nnx.split(model)
        config, compute_dtype = model.config, model.dtype
    else:
        raise ValueError(
            f"sample: model must be an erpo_jax.models.Decoder or a (graphdef, state) pair, "
            f"got {type(model).__name__}"
        )
    vocab = config.vocab_size

    t_max = _positive_int("max_new_tokens", max_new_tokens)
    if not isinstance(temperature, (int, float, np.floating)) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"sample: temperature must be a finite number >= 0, got {temperature!r}")
    greedy = temperature == 0
    if top_k is not None and (
        not isinstance(top_k, (int, np.integer))
        or isinstance(top_k, bool)
        or not 1 <= top_k <= vocab
    ):
        raise ValueError(f"sample: top_k must be None or an int in [1, V={vocab}], got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"sample: top_p must be None or in (0, 1], got {top_p!r}")
    if min_p is not None and not (isinstance(min_p, (int, float)) and 0 <= min_p <= 1):
        raise ValueError(f"sample: min_p must be None or in [0, 1], got {min_p!r}")
    eos = _ids("eos_ids", config.eos_token_ids if eos_ids is None else eos_ids, vocab)
    if pad_id is None:
        pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    if not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < vocab:
        raise ValueError(f"sample: pad_id must be an id in [0, V={vocab}), got {pad_id!r}")
    if max_length is None:
        max_length = config.max_position_embeddings
    max_length = _positive_int("max_length", max_length)

    if stop_strings is not None:
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        if not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(
                f"sample: stop_strings must be non-empty strings, got {stop_strings!r}"
            )
        if tokenizer is None:
            raise ValueError("sample: stop_strings need a tokenizer (tokenizer=None was given)")
        stop_check_every = _positive_int("stop_check_every", stop_check_every)
        if not stop_strings:
            stop_strings = None

    decode_phases = resolve_decode_phases(decode_phases, t_max)

    if first_token not in (None, "reft"):
        raise ValueError(f"sample: first_token must be None or 'reft', got {first_token!r}")
    marker = _ids("reft_marker", reft_marker, vocab)
    reft_group = 0
    rows_per_prompt = 1 if group_size is None else _positive_int("group_size", group_size)
    if first_token == "reft":
        reft_group = _positive_int("group_size", group_size)
        reft_k = _positive_int("reft_k", reft_k)
        reft_top_n = _positive_int("reft_top_n", reft_top_n)
        if reft_group % reft_k:
            raise ValueError(
                f"sample: group_size={reft_group} must be a multiple of reft_k={reft_k} "
                "(G % K != 0): each REFT opener gets G / K rows"
            )
        if not reft_k <= reft_top_n <= vocab:
            raise ValueError(
                f"sample: reft_top_n={reft_top_n} must satisfy reft_k={reft_k} <= reft_top_n "
                f"<= V={vocab}"
            )
        if marker.size >= t_max:
            raise ValueError(
                f"sample: max_new_tokens={t_max} must exceed len(reft_marker)={marker.size}"
            )
    elif marker.size:
        raise ValueError("sample: reft_marker is only used with first_token='reft'")

    tokens, mask = _prepare_prompts(
        prompt_tokens,
        prompt_mask,
        vocab=vocab,
        max_new_tokens=t_max,
        max_length=max_length,
        pad_id=pad_id,
        bucket=bucket_prompts,
    )
    b = tokens.shape[0]
    if b % rows_per_prompt:
        raise ValueError(
            f"sample: prompt_tokens has {b} rows, not a multiple of group_size={rows_per_prompt}"
        )
    if rows_per_prompt > 1:
        grouped = np.where(mask, tokens, -1).reshape(b // rows_per_prompt, rows_per_prompt, -1)
        if not np.all(grouped == grouped[:, :1]):
            raise ValueError(
                "sample: with group_size the rows of each group must hold the same prompt "
                "(prompt_tokens prompt-major, see repeat_for_groups)"
            )
    hosts = multihost(mesh)
    if hosts:
        # Each process feeds its own rows: B counts every process's rows, the
        # prompt width is the widest process's, one key splits over all rows.
        check_row_hosts(mesh, who="sample")
        width = global_max(tokens.shape[1])
        if width > tokens.shape[1]:
            extra = width - tokens.shape[1]
            tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_id)
            mask = np.pad(mask, ((0, 0), (extra, 0)), constant_values=False)
        b_local, b = b, b * jax.process_count()
        keys = _local_keys(key, b_local, b)
    else:
        b_local = b
        keys = as_row_keys(key, b)
    share = rows_per_prompt if share_prefix else 1
    if mesh is not None:
        shards = _row_shards(mesh)
        if b % shards:
            raise ValueError(
                f"sample: prompt_tokens has {b} rows, which do not divide over the mesh's "
                f"{shards} row shards ({' x '.join(_row_axes(mesh))}); use a multiple of {shards}"
            )
        # Rows over (data, fsdp); with several processes, each process's own.
        tokens, mask, keys = (global_rows(mesh, x) for x in (tokens, mask, keys))
        layout = gathered_layout(
            params, mesh, gather_params, dtype=compute_dtype, bytes_limit=_device_bytes_limit()
        )
        if layout is not None:  # cast where sharded, then gathered: half the traffic in bf16
            params = jax.tree.map(
                lambda x, t: jax.device_put(x.astype(t.dtype), t.sharding), params, layout
            )
        share = prefix_group(share, b, shards, config)
    elif _spans_devices(params):
        share = 1  # no mesh to pin the broadcast cache to: prefill every row
    else:
        share = prefix_group(share, b, 1, config)
    # -1 never matches a token; padding the EOS list to a multiple of 8 keeps its
    # shape, and so the compiled code, when the number of EOS ids changes.
    eos_width = max(8, -(-eos.size // 8) * 8)
    eos = np.pad(eos, (0, eos_width - eos.size), constant_values=-1)

    static = _Static(
        greedy=greedy,
        top_k=None if top_k is None else int(top_k),
        use_top_p=top_p is not None and top_p < 1,
        use_min_p=min_p is not None and min_p > 0,
        max_new_tokens=t_max,
        cache_length=tokens.shape[1] + t_max - 1,
        pad_id=int(pad_id),
        use_lora=bool(use_lora),
        group_size=reft_group,
        prefix_group=share,
        reft_top_n=int(reft_top_n) if reft_group else 0,
        reft_k=int(reft_k) if reft_group else 0,
        mesh=mesh,
        decode_phases=decode_phases,
    )
    dyn = _Dynamic(
        temperature=jnp.asarray(1.0 if greedy else temperature, jnp.float32),
        top_p=jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
        min_p=jnp.asarray(0.0 if min_p is None else min_p, jnp.float32),
        eos_ids=jnp.asarray(eos, jnp.int32),
        marker=jnp.asarray(marker),
    )
    state = _prefill_jit(graphdef, params, tokens, mask, keys, dyn, static=static)
    cut = np.full(b_local, -1, np.int32)  # this process's rows
    phase_ends = [end for end, _ in _phases(static, marker.size)]

    def decode(state, stop: int, phase: int = -1):
        """The decode loop up to step ``stop``: every phase (-1) or only ``phase``."""
        with warnings.catch_warnings():
            if len(phase_ends) > 1:  # a later phase's larger cache cannot reuse the donated one
                warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            return _decode_jit(graphdef, params, state, keys, np.int32(stop), dyn,
                               static=static._replace(phase=phase))  # fmt: skip

    def decode_chunk(state, start: int, stop: int):
        """Decode steps ``start .. stop - 1`` (fewer once every row is done)."""
        if len(phase_ends) == 1:
            return decode(state, stop)
        # A chunk of the stop-string loop runs the phases it overlaps, each
        # phase's loop compiled once; phase k decodes the steps before its end.
        for k, end in enumerate(phase_ends):
            if end > start:
                state = decode(state, stop, k)
                if end >= stop:
                    break
        return state

    if stop_strings is None:
        state = decode(state, t_max)
    else:
        # Each process matches its own rows; the loop goes on until every row
        # of every process is done (one replicated flag), in lockstep.
        matcher = StopStringMatcher(stop_strings, tokenizer, b_local)
        step = int(state.step)
        # Each check copies a window of the new tokens (and the lookback a
        # stop string can start in) and the lengths, not the whole buffer.
        # Rows that grew since the last check were checked to its step.
        width = min(t_max, max(step, stop_check_every) + matcher.lookback)
        previous = 0
        while True:
            offset = min(max(0, previous - matcher.lookback), t_max - width)
            window, lengths = _stop_window_jit(state.tokens, state.mask, offset, width=width)
            hit = matcher.update(local_rows(window), local_rows(lengths), offset)
            previous = step
            if hosts:
                state = state._replace(done=state.done | global_rows(mesh, hit))
            elif hit.any():
                state = state._replace(done=state.done | jnp.asarray(hit))
            if step >= t_max or bool(_all_done(state.done)):
                break
            start, step = step, min(step + stop_check_every, t_max)
            state = decode_chunk(state, start, step)
        cut = matcher.cut.astype(np.int32)
    if hosts:
        return _finish_jit(state, global_rows(mesh, cut), pad_id=static.pad_id)
    return _finish_jit(state, jnp.asarray(cut), pad_id=static.pad_id)
