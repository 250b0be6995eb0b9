"""The prompt pipeline: load a prompt source, then stream shuffled batches with grain.

``load_prompt_source(kind, ...)`` turns a data config into an in-memory tuple
of problems (``CountdownProblem`` or ``MathProblem``): the Countdown
generator, a local JSONL/JSON/Parquet file or directory, a Hugging Face
dataset or a TFDS dataset.

``PromptStream(source, batch_size=..., seed=...)`` is an endless,
checkpointable iterator of prompt batches built from grain ``MapDataset``
transformations::

    source --shuffle(seed; new order each epoch)--> --repeat()-->
           --[process :: processes]--> --batch(batch_fn=list)--> iterator (get/set_state)

Each epoch is a fresh permutation of the whole source, and the global stream
is sliced *after* shuffling, one item in ``shard_count`` per process. So at
every step the processes hold disjoint prompts, together they consume one
global permutation per epoch, and the union of their batches at step ``t``
holds exactly the prompts of batch ``t`` of a single-process stream with
``batch_size * shard_count`` prompts: a run draws the same prompts whatever
the number of hosts. Its state is one grain iterator index, the same on
every process, so the copy saved by process 0 restores every process.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grain
import jax

from erpo_jax.tasks import (
    CountdownProblem,
    MathProblem,
    generate_countdown,
    load_hf_dataset,
    load_math_file,
    load_tfds_dataset,
)

__all__ = ["PROMPT_SOURCE_KINDS", "PromptStream", "load_prompt_source"]

T = TypeVar("T")

PROMPT_SOURCE_KINDS: tuple[str, ...] = ("countdown", "file", "jsonl", "parquet", "hf", "tfds")
"""``kind`` values of ``load_prompt_source``."""

_FILE_KINDS = ("file", "jsonl", "parquet")
# The file suffixes each specific file kind accepts; "file" takes any that
# load_math_file reads. A mismatch is almost always a config slip.
_KIND_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}

_STATE_FORMAT = "erpo_jax.PromptStream/1"


class CappedSourceWarning(UserWarning):
    """``num_problems`` kept only the first rows of a larger dataset."""


def _cap(problems: Iterable[T], num_problems: int | None) -> tuple[T, ...]:
    """The first ``num_problems`` items (all when None), as a tuple.

    Dropping rows is announced (:class:`CappedSourceWarning`): the train
    config's default ``data.num_problems=2000`` would otherwise cut a real
    dataset silently.
    """
    items = tuple(problems)
    if num_problems is not None and len(items) > num_problems:
        warnings.warn(
            f"data.num_problems={num_problems} keeps the first {num_problems} of the "
            f"{len(items)} problems of this source; set data.num_problems=null to use them all",
            CappedSourceWarning,
            stacklevel=3,
        )
        items = items[:num_problems]
    return items


def _load_file(kind: str, path: str | None, num_problems: int | None) -> tuple[MathProblem, ...]:
    """Problems of a local file or directory for the file kinds."""
    if path is None:
        raise ValueError(
            f"load_prompt_source: kind={kind!r} needs path= (a JSONL/JSON/Parquet file "
            "or a directory of them), got path=None"
        )
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"load_prompt_source: path={str(path)!r} does not exist")
    if kind in _KIND_SUFFIXES and file.is_file() and file.suffix not in _KIND_SUFFIXES[kind]:
        raise ValueError(
            f"load_prompt_source: kind={kind!r} expects a {' or '.join(_KIND_SUFFIXES[kind])} "
            f"file, got path={str(path)!r}; use kind='file' to pick the reader by extension"
        )
    return _cap(load_math_file(file), num_problems)


def load_prompt_source(
    kind: str,
    *,
    path: str | None = None,
    name: str | None = None,
    split: str = "train",
    level: str = "easy",
    num_problems: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[CountdownProblem | MathProblem, ...]:
    """Load every problem of one prompt source into memory.

    The same arguments are accepted for every kind (so a data config maps onto
    one call); each kind uses the ones that concern it and ignores the rest.

    Args:
      kind: one of ``PROMPT_SOURCE_KINDS``:

        - ``"countdown"``: ``num_problems`` generated Countdown problems of
          ``split`` and ``level``, deterministic in ``seed``
          (``generate_countdown``; train and test never overlap).
        - ``"file"``: a local ``.jsonl`` / ``.json`` / ``.parquet`` file, or a
          directory of them (``load_math_file``); malformed rows are skipped
          with a ``MalformedRowWarning`` naming file and row.
        - ``"jsonl"`` / ``"parquet"``: as ``"file"``, but a file must have
          that format's extension.
        - ``"hf"``: a Hugging Face ``datasets`` dataset ``name`` (extra ``hf``).
        - ``"tfds"``: a TensorFlow Datasets dataset ``name`` (extra ``tfds``).
      path: the file or directory of the file kinds.
      name: the dataset name of ``"hf"`` / ``"tfds"``.
      split: the split to load (``"countdown"``, ``"hf"``, ``"tfds"``).
      level: Countdown difficulty, a key of ``COUNTDOWN_LEVELS``.
      num_problems: how many problems to generate (``"countdown"``, required),
        or a cap on the rows loaded, keeping the first ones (other kinds;
        None loads all).
      seed: the Countdown generator's seed. Shuffling is ``PromptStream``'s job.
      **kwargs: passed on to ``generate_countdown`` (e.g. ``test_fraction``),
        ``load_hf_dataset`` (e.g. ``config``) or ``load_tfds_dataset``; the
        file kinds take none.

    Returns:
      The problems, in source order: ``CountdownProblem`` for ``"countdown"``,
      ``MathProblem`` otherwise.

    Raises:
      ValueError: an unknown ``kind``, a missing ``path`` / ``name`` /
        ``num_problems``, unexpected ``kwargs``, or a source with no usable problem.
      FileNotFoundError: ``path`` does not exist.
      ImportError: the optional library of ``"hf"`` / ``"tfds"`` is not
        installed; the message names the extra to install.
    """
    if kind not in PROMPT_SOURCE_KINDS:
        raise ValueError(
            f"load_prompt_source: unknown kind={kind!r}; choose one of {PROMPT_SOURCE_KINDS}"
        )
    if num_problems is not None and (isinstance(num_problems, bool) or num_problems < 1):
        raise ValueError(
            f"load_prompt_source: num_problems must be None or an int >= 1, got {num_problems!r}"
        )
    problems: tuple[CountdownProblem | MathProblem, ...]
    if kind == "countdown":
        if num_problems is None:
            raise ValueError(
                "load_prompt_source: kind='countdown' needs num_problems= (how many "
                "problems to generate), got num_problems=None"
            )
        problems = tuple(
            generate_countdown(num_problems, seed=seed, split=split, level=level, **kwargs)
        )
        where = f"countdown split={split!r} level={level!r}"
    elif kind in _FILE_KINDS:
        if kwargs:
            raise ValueError(
                f"load_prompt_source: kind={kind!r} takes no extra arguments, got {sorted(kwargs)}"
            )
        problems = _load_file(kind, path, num_problems)
        where = f"path={str(path)!r}"
    else:
        if not name:
            raise ValueError(
                f"load_prompt_source: kind={kind!r} needs name= (the dataset name), got {name!r}"
            )
        load = load_hf_dataset if kind == "hf" else load_tfds_dataset
        problems = _cap(load(name, split=split, **kwargs), num_problems)
        where = f"name={name!r} split={split!r}"
    if not problems:
        # An empty source would otherwise fail much later, inside the stream or
        # the first rollout, far from its cause.
        raise ValueError(
            f"load_prompt_source: the {kind} source {where} is empty: it holds no usable "
            "problem (malformed rows are skipped with a MalformedRowWarning)"
        )
    return problems


def _grain_seed(seed: int) -> int:
    """A 32-bit shuffle seed derived from any int ``seed``.

    grain needs a seed in ``[0, 2**32)`` and reseeds epoch ``e`` with
    ``seed + e``, so run seeds 0 and 1 would share their epoch orders, shifted
    by one. Hashing the run seed first makes neighbouring seeds unrelated.
    """
    digest = hashlib.sha256(f"erpo_jax.PromptStream/{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """``(shard_index, shard_count)``, by default this JAX process's index and the process count."""
    if (shard_index is None) != (shard_count is None):
        raise ValueError(
            "PromptStream: give both shard_index and shard_count or neither (then they are "
            f"jax.process_index() and jax.process_count()), got shard_index={shard_index!r}, "
            f"shard_count={shard_count!r}"
        )
    if shard_index is None or shard_count is None:
        return jax.process_index(), jax.process_count()
    if shard_count < 1:
        raise ValueError(f"PromptStream: shard_count must be an int >= 1, got {shard_count!r}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(
            f"PromptStream: shard_index must be in 0..{shard_count - 1} "
            f"(shard_count={shard_count}), got {shard_index!r}"
        )
    return shard_index, shard_count


class PromptStream(Generic[T]):
    """An endless, shuffled, sharded, checkpointable stream of prompt batches.

    Each epoch is a new permutation of the source (from ``seed`` and the epoch
    number): every item is drawn once per epoch before any is drawn again.
    Batches run on across epoch boundaries, so no item is ever dropped; the
    one batch that straddles a boundary can hold the same item twice only in
    the rare case that an item ends one permutation and starts the next.

    With several processes (hosts), process ``shard_index`` takes items
    ``shard_index, shard_index + shard_count, ...`` of the global shuffled
    stream: at each step the processes' batches are disjoint and together are
    the step's global batch of ``batch_size * shard_count`` prompts.

    The stream is a plain iterator: ``next(stream)`` or ``stream.next_batch()``
    returns a ``list`` of ``batch_size`` source items (never stacked into
    arrays). ``state()`` is a small JSON-serializable dict, identical on
    every process; ``restore(state)`` makes the stream continue exactly as the
    one that produced the state would have.

    Cost: grain's index shuffle takes roughly constant CPU time per epoch
    whatever the source size, so per item it is dear only on tiny sources
    (grain 0.2.18 on a busy 2-core CPU: about 20 ms per item on 10 items,
    0.5 ms on 2,000; 0.2 to 1 s per epoch), far below the cost of the
    rollouts that consume an epoch.

    Args:
      source: the problems, any sequence with ``len`` and integer indexing
        (e.g. what ``load_prompt_source`` returns); not copied, so do not
        change it while the stream is in use.
      batch_size: prompts per process per step, ``1 .. len(source) // shard_count``.
      seed: any int; the same seed gives the same stream.
      shuffle: False keeps source order (still repeating forever).
      shard_index: this process's shard, ``0 .. shard_count - 1``;
        default ``jax.process_index()``.
      shard_count: the number of shards (processes); default ``jax.process_count()``.
    """

    def __init__(
        self,
        source: Sequence[T],
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        shard_index: int | None = None,
        shard_count: int | None = None,
    ):
        self.shard_index, self.shard_count = _resolve_shard(shard_index, shard_count)
        self.source_size = len(source)
        if self.source_size == 0:
            raise ValueError("PromptStream: source is empty; it needs at least one problem")
        if self.shard_count > self.source_size:
            raise ValueError(
                f"PromptStream: shard_count={self.shard_count} leaves shards empty: the source "
                f"has {self.source_size} items, so shard_count must be in 1..{self.source_size}"
            )
        shard_size = self.source_size // self.shard_count
        if isinstance(batch_size, bool) or not 1 <= batch_size <= shard_size:
            # A batch larger than a shard's share of an epoch would hold repeats of
            # the same prompt, and GRPO-style groups would then be duplicated.
            raise ValueError(
                f"PromptStream: batch_size must be in 1..{shard_size} (the shard size: "
                f"{self.source_size} items over shard_count={self.shard_count}), got {batch_size!r}"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._batches = 0

        dataset = grain.MapDataset.source(source)
        if shuffle:
            # Shuffle before repeat: grain then reseeds the shuffle per epoch.
            dataset = dataset.shuffle(seed=_grain_seed(seed))
        dataset = dataset.repeat()[self.shard_index :: self.shard_count]
        # batch_fn=list: the items are Python objects, which grain's default
        # batch_fn would try to stack into arrays.
        dataset = dataset.batch(batch_size, batch_fn=list)
        # The source is in memory: reader threads and a prefetch buffer would
        # only add GIL contention, and reading synchronously keeps the
        # iterator's state exactly at the last batch returned.
        self._dataset = dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        )
        self._iterator = iter(self._dataset)

    @property
    def batches(self) -> int:
        """How many batches this stream has returned (including before a restore)."""
        return self._batches

    @property
    def epoch(self) -> int:
        """Completed passes over the source by all processes together (the global stream)."""
        consumed = self._batches * self.batch_size * self.shard_count
        return consumed // self.source_size

    def next_batch(self) -> list[T]:
        """The next ``batch_size`` items of this process's shard, as a list."""
        batch = next(self._iterator)
        self._batches += 1
        return batch

    def __iter__(self) -> Iterator[list[T]]:
        return self

    def __next__(self) -> list[T]:
        return self.next_batch()

    def _fingerprint(self) -> dict[str, Any]:
        """The settings a saved state is only valid for (the shard index is not one)."""
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "shard_count": self.shard_count,
            "source_size": self.source_size,
        }

    def state(self) -> dict[str, Any]:
        """The stream's position as a JSON-serializable dict.

        Keys: ``format``; ``grain``, the grain iterator's own state;
        ``batches`` and ``epoch`` (see the properties, handy as metrics); and
        the settings the state is only valid for (``seed``, ``shuffle``,
        ``batch_size``, ``shard_count``, ``source_size``). It is the same on
        every process.
        """
        return {
            "format": _STATE_FORMAT,
            "grain": self._iterator.get_state(),
            "batches": self._batches,
            "epoch": self.epoch,
            **self._fingerprint(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a ``state()``, possibly through JSON).

        Raises:
          ValueError: the state is not a ``PromptStream`` state, or was saved
            by a stream with other settings (the message names the setting);
            such a state would silently replay different prompts.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"PromptStream.restore: state is not a {_STATE_FORMAT!r} state (format={found!r})"
            )
        for key, value in self._fingerprint().items():
            if state.get(key) != value:
                raise ValueError(
                    f"PromptStream.restore: the state was saved with {key}={state.get(key)!r} "
                    f"but this stream has {key}={value!r}; build the stream with the "
                    "settings of the run being resumed"
                )
        self._iterator.set_state(state["grain"])
        self._batches = int(state["batches"])
