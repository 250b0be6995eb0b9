"""Host-side reward scoring in worker processes, with a per-sample time limit.

A verifier is arbitrary Python (SymPy through ``math-verify``, a user's
checker), and some inputs make it hang in C code that no signal can
interrupt, or raise. The trainer must not stall or die on them, so
:class:`RewardPool` runs ``reward_fn(completion, problem)`` in worker
processes and gives every sample its own deadline, counted from when a worker
starts it. A worker past its deadline is killed and replaced; the sample
scores 0.0 and is counted as a timeout, and the samples queued behind it go
to the other workers. A ``reward_fn`` that raises, returns something that is
not a finite number, or kills its worker scores 0.0 and is counted as an
error. Either way :meth:`RewardPool.score` returns normally, with the counts
in :class:`RewardScores` and one :class:`RewardTimeoutWarning`.

Workers are started with the ``spawn`` method: the parent runs JAX threads,
and forking a multi-threaded process can deadlock the child. They start when
the pool is built (in the background, while the caller compiles) and are
reused for every call, so a training step pays only the messaging: samples
travel in chunks, results come back one message per chunk, and a word of
shared memory per worker tells the parent which sample is running and since
when. A worker runs this file as a script, so it imports NumPy and whatever
``reward_fn`` needs, not JAX or the rest of ``erpo_jax.rollout``; like every
spawned process it also imports the parent's ``__main__`` module, so a script
that builds a pool must guard its entry point with ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import numbers
import os
import pickle
import runpy
import signal
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["RewardPool", "RewardScores", "RewardTimeoutWarning"]

# Samples per message to a worker: at most this many, and few enough that
# every worker gets about four chunks of a call, so one slow sample does not
# hold up a long tail of others queued behind it.
_MAX_CHUNK = 64  # at most 256: a sample's position in its chunk is 8 bits of ``_progress``
_CHUNKS_PER_WORKER = 4
# Workers (per worker slot) that may die or hang before they are ready within
# one call before the pool gives up: something in the environment is broken,
# and retrying forever would stall the run.
_MAX_FAILED_STARTS = 3
_MAX_ERROR_CHARS = 500
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# The module name this file runs under in a worker process (see ``_Worker``).
_WORKER_RUN_NAME = "__erpo_jax_reward_worker__"


class RewardTimeoutWarning(RuntimeWarning):
    """Some samples hit the reward time limit or their reward function failed; they scored 0.0."""


class RewardScores(NamedTuple):
    """The result of :meth:`RewardPool.score`.

    Attributes:
      rewards: ``[N]`` float32, one reward per completion; 0.0 where the
        sample timed out or errored.
      timeouts: samples whose ``reward_fn`` ran past the time limit.
      errors: samples whose ``reward_fn`` raised, returned a non-numeric or
        non-finite value, or whose worker process died.
      seconds: wall-clock time of the call.
      first_error: the message of the lowest-indexed erroring sample
        (``"sample 3: ValueError: ..."``), or None.
    """

    rewards: np.ndarray
    timeouts: int
    errors: int
    seconds: float
    first_error: str | None = None


def _as_reward(value: Any) -> float:
    """``value`` as a finite float32-representable float; TypeError/ValueError otherwise."""
    # bool and NumPy/JAX scalars count as numbers; strings do not, even "1.0".
    if isinstance(value, numbers.Real):
        reward = float(value)
    elif getattr(value, "shape", None) == () and getattr(value, "dtype", None) is not None:
        if np.dtype(value.dtype).kind not in "biuf":
            raise TypeError(f"reward_fn returned an array of dtype {value.dtype}, not a number")
        reward = float(value)
    else:
        raise TypeError(f"reward_fn returned {type(value).__name__}, not a number")
    if not math.isfinite(reward) or abs(reward) > _FLOAT32_MAX:
        raise ValueError(f"reward_fn returned {reward!r}, not a finite float32 number")
    return reward


def _evaluate(
    reward_fn: Callable[[str, Any], float], completion: str, problem: Any
) -> tuple[float, str | None]:
    """``(reward, None)``, or ``(0.0, message)`` when ``reward_fn`` fails on this sample."""
    try:
        return _as_reward(reward_fn(completion, problem)), None
    except Exception as e:  # any failure of user code scores 0.0; it is reported, not raised
        message = f"{type(e).__name__}: {e}"
        return 0.0, message[:_MAX_ERROR_CHARS]


def _exit_when_orphaned(parent_pid: int) -> None:
    # A worker outlives its parent only if the parent was killed (no clean-up
    # ran). One idle in ``recv`` sees end-of-file and exits; this thread also
    # ends one busy in a long ``reward_fn``.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _progress(start_ns: int, position: int) -> int:
    """One int64 word: a sample's position in its chunk and its start time in microseconds.

    Packed into one word so that the parent never reads a position with the
    start time of another sample (an aligned 8-byte store is atomic). 55 bits
    of microseconds cover a monotonic clock for a thousand years.
    """
    return (start_ns // 1000) << 8 | position


def _worker_main(
    conn: multiprocessing.connection.Connection,
    payload: bytes,
    progress: Any,
    parent_pid: int,
) -> None:
    """A worker process: load ``reward_fn``, then score chunks until the pipe closes.

    Messages in: a pickled list of ``(completion, problem)``. Messages out:
    ``("ready",)`` once, ``("startup_error", text)`` if ``reward_fn`` does not
    load, ``("batch_error", text)`` if a chunk does not unpickle, and
    ``("done", [(reward, error_or_None), ...])`` after each chunk. Before each
    sample the worker writes ``_progress(now, position)`` into the shared
    ``progress`` word, which is how the parent knows which sample is running
    and since when, without a message per sample.
    """
    # Ctrl-C reaches the whole process group; the parent handles it and ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    try:
        try:
            reward_fn = pickle.loads(payload)
        except BaseException:
            conn.send(("startup_error", traceback.format_exc()))
            return
        conn.send(("ready",))
        while True:
            data = conn.recv_bytes()
            try:
                chunk = pickle.loads(data)
            except Exception as e:
                conn.send(("batch_error", f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]))
                continue
            results = []
            for position, (completion, problem) in enumerate(chunk):
                progress.value = _progress(time.monotonic_ns(), position)
                results.append(_evaluate(reward_fn, completion, problem))
            conn.send(("done", results))
    except (EOFError, OSError):
        return  # the pool was closed (or the parent is gone): leave quietly


class _Worker:
    """One worker process, its pipe, its progress word, and the chunk of samples it holds."""

    def __init__(self, ctx: Any, payload: bytes):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.progress = ctx.RawValue("q", 0)
        # The worker runs this file as a script (the end of it calls
        # ``_worker_main``) instead of unpickling ``_worker_main`` by reference:
        # that would import the ``erpo_jax.rollout`` package, whose sampling
        # modules pull in JAX, seconds of start-up and a hundred MB per worker
        # that scoring never uses. daemon: multiprocessing's own exit handler
        # then ends workers the pool did not (it would wait on non-daemon ones).
        worker_args = (child_conn, payload, self.progress, os.getpid())
        self.process = ctx.Process(
            target=runpy.run_path,
            args=(__file__,),
            kwargs={"init_globals": {"_worker_args": worker_args}, "run_name": _WORKER_RUN_NAME},
            name="erpo-reward-worker",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        self.spawned_at = time.monotonic_ns()
        self.ready = False
        self.dead = False
        self.items: list[int] = []  # sample indices of the chunk in progress

    def running(self) -> tuple[int, int]:
        """``(position in the chunk, start time in ns)`` of the sample the worker is on."""
        word = self.progress.value
        return word & 0xFF, (word >> 8) * 1000

    def kill(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.process.exitcode is None:
            self.process.kill()
        self.process.join(timeout=5.0)

    def stop(self, deadline: float) -> None:
        """End the worker (closing the pipe ends its loop); kill it at ``deadline``, monotonic s."""
        try:
            self.conn.close()
        except OSError:
            pass
        self.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(timeout=5.0)


def _shutdown(workers: list[_Worker]) -> None:
    """Stop every worker in ``workers`` (emptied in place); at most ~1 s for idle ones."""
    stopping, workers[:] = list(workers), []
    for worker in stopping:
        if worker.items:
            worker.kill()  # busy with a sample nobody will collect
        else:
            try:
                worker.conn.close()
            except OSError:
                pass
    deadline = time.monotonic() + 1.0
    for worker in stopping:
        worker.stop(deadline)


class RewardPool:
    """Scores completions with ``reward_fn`` in worker processes, each sample under a time limit.

    Built once per run and reused every step; its workers start at
    construction, in the background. ``score`` never raises for a verifier
    that hangs or fails: such samples score 0.0, are counted in the returned
    :class:`RewardScores`, and a :class:`RewardTimeoutWarning` names the
    counts and the first error. Close it with :meth:`close` or use it as a
    context manager; a pool that is garbage-collected or alive at interpreter
    exit stops its workers too.

    Args:
      reward_fn: ``reward_fn(completion, problem) -> float``. It must pickle
        by reference (a top-level function, or a bound method of a picklable
        object such as ``CountdownTask().reward``) so the workers can load it;
        problems must pickle too.
      timeout_s: time limit of one sample, in seconds, counted from when a
        worker starts it (worker start-up is not billed).
      num_workers: worker processes.
      inline: score in this process, one sample after another, with no time
        limit (for debugging and tests); failures still score 0.0 and count.
      startup_timeout_s: how long a worker may take to start and load
        ``reward_fn`` before it is replaced.

    Raises:
      ValueError: ``timeout_s``, ``num_workers`` or ``startup_timeout_s`` out
        of range (the message names the argument).
      TypeError: ``reward_fn`` is not callable, or does not pickle (unless ``inline``).

    Example (a training loop; ``CountdownTask().reward`` pickles by reference):

      pool = RewardPool(task.reward, timeout_s=10.0, num_workers=4)
      for step in ...:
          scores = pool.score(texts, [problems[i // G] for i in range(len(texts))])
          rewards = scores.rewards.reshape(P, G)   # and log scores.timeouts, scores.errors
      pool.close()
    """

    def __init__(
        self,
        reward_fn: Callable[[str, Any], float],
        *,
        timeout_s: float = 10.0,
        num_workers: int = 2,
        inline: bool = False,
        startup_timeout_s: float = 120.0,
    ):
        if not callable(reward_fn):
            raise TypeError(f"RewardPool: reward_fn must be callable, got {reward_fn!r}")
        if not (isinstance(timeout_s, int | float) and 0 < timeout_s < math.inf):
            raise ValueError(
                f"RewardPool: timeout_s must be a finite number of seconds > 0, got {timeout_s!r}"
            )
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"RewardPool: num_workers must be an int >= 1, got {num_workers!r}")
        if not (isinstance(startup_timeout_s, int | float) and 0 < startup_timeout_s < math.inf):
            raise ValueError(
                "RewardPool: startup_timeout_s must be a finite number of seconds > 0, "
                f"got {startup_timeout_s!r}"
            )
        self.reward_fn = reward_fn
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers
        self.inline = bool(inline)
        self.startup_timeout_s = float(startup_timeout_s)
        self._closed = False
        self._lock = threading.Lock()
        # Mutated in place, never rebound: the finalizer holds this list, not self.
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        if self.inline:
            self._payload = b""
            return
        try:
            self._payload = pickle.dumps(reward_fn, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            raise TypeError(
                f"RewardPool: reward_fn must pickle to run in worker processes (a top-level "
                f"function or a method of a picklable object), got {reward_fn!r}: "
                f"{type(e).__name__}: {e}; pass inline=True to score in this process"
            ) from e
        self._ctx = multiprocessing.get_context("spawn")
        self._fill()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "inline" if self.inline else f"num_workers={self.num_workers}"
        return f"RewardPool({self.reward_fn!r}, timeout_s={self.timeout_s:g}, {mode})"

    def close(self) -> None:
        """Stop the workers. Idempotent; ``score`` on a closed pool raises RuntimeError."""
        with self._lock:
            self._closed = True
            _shutdown(self._workers)

    def score(self, completions: Sequence[str], problems: Sequence[Any]) -> RewardScores:
        """Rewards of ``completions[i]`` for ``problems[i]``, spread over the workers.

        Args:
          completions: ``N`` decoded completions.
          problems: ``N`` problems, passed to ``reward_fn`` as they are (for a
            group of ``G`` completions per prompt, repeat each problem ``G`` times).

        Returns:
          :class:`RewardScores`: ``rewards [N]`` float32 (0.0 for samples that
          timed out or errored) with the counts; one
          :class:`RewardTimeoutWarning` if any sample timed out or errored.

        Raises:
          ValueError: ``completions`` and ``problems`` differ in length.
          TypeError: ``completions`` is a single ``str``.
          RuntimeError: the pool is closed, or its workers cannot start (the
            reward function does not load in a fresh process, or the
            processes die at start-up); never for a sample that hangs or fails.
        """
        if isinstance(completions, str | bytes):
            raise TypeError(
                "RewardPool.score: completions must be a sequence of str, not a single str"
            )
        if len(completions) != len(problems):
            raise ValueError(
                f"RewardPool.score: completions and problems must have the same length, "
                f"got {len(completions)} completions and {len(problems)} problems"
            )
        start = time.perf_counter()
        n = len(completions)
        rewards = np.zeros(n, np.float32)
        failures: dict[int, str] = {}
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool.score: the pool is closed")
            if n == 0:
                timeouts = 0
            elif self.inline:
                timeouts = 0
                for i, (completion, problem) in enumerate(zip(completions, problems, strict=True)):
                    reward, error = _evaluate(self.reward_fn, completion, problem)
                    rewards[i] = reward
                    if error is not None:
                        failures[i] = error
            else:
                timeouts = self._score_in_workers(completions, problems, rewards, failures)
        errors = len(failures)
        first_error = f"sample {min(failures)}: {failures[min(failures)]}" if failures else None
        if timeouts or errors:
            warnings.warn(
                f"RewardPool: of {n} samples, {timeouts} hit the {self.timeout_s:g} s time "
                f"limit and {errors} failed in the reward function; they scored 0.0"
                + (f" (first error: {first_error})" if first_error else ""),
                RewardTimeoutWarning,
                stacklevel=2,
            )
        return RewardScores(rewards, timeouts, errors, time.perf_counter() - start, first_error)

    def _fill(self) -> None:
        """Replace workers that exited while idle; start more until there are ``num_workers``."""
        for k, worker in enumerate(self._workers):
            if worker.process.exitcode is not None:
                worker.kill()
                self._workers[k] = _Worker(self._ctx, self._payload)
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self._payload))

    def _score_in_workers(
        self,
        completions: Sequence[str],
        problems: Sequence[Any],
        rewards: np.ndarray,
        failures: dict[int, str],
    ) -> int:
        """Fill ``rewards`` and ``failures`` from the workers; return the number of timeouts."""
        n = len(completions)
        chunk_size = max(1, min(_MAX_CHUNK, -(-n // (_CHUNKS_PER_WORKER * self.num_workers))))
        timeout_ns = int(self.timeout_s * 1e9)
        startup_ns = int(self.startup_timeout_s * 1e9)
        pending = deque(range(n))
        remaining = n
        timeouts = 0
        failed_starts = 0
        self._fill()
        try:
            while remaining:
                for worker in self._workers:
                    # One chunk at a time per worker: a worker busy in a chunk
                    # is not reading its pipe, and a second large chunk would
                    # block this send for as long as the worker's sample runs.
                    if worker.ready and not worker.dead and not worker.items and pending:
                        take = [pending.popleft() for _ in range(min(chunk_size, len(pending)))]
                        try:
                            data = pickle.dumps(
                                [(completions[i], problems[i]) for i in take],
                                protocol=pickle.HIGHEST_PROTOCOL,
                            )
                        except Exception as e:
                            message = f"the problem or completion does not pickle: {e!r}"
                            for i in take:
                                failures[i] = message[:_MAX_ERROR_CHARS]
                            remaining -= len(take)
                            continue
                        # Written before the send, while the worker waits in
                        # recv: the first sample's clock starts no later than now.
                        worker.progress.value = _progress(time.monotonic_ns(), 0)
                        try:
                            worker.conn.send_bytes(data)
                        except OSError:
                            worker.dead = True  # replaced below; the chunk goes back to the queue
                            pending.extendleft(reversed(take))
                            continue
                        worker.items = take
                if not remaining:
                    break
                # Wait for a message, a death, or the earliest deadline. A
                # deadline computed from the progress word is never later than
                # the true one (the word only moves forward), so waking at it
                # and re-reading the word is enough.
                now = time.monotonic_ns()
                deadlines = [
                    w.running()[1] + timeout_ns if w.ready else w.spawned_at + startup_ns
                    for w in self._workers
                    if w.items or not w.ready
                ]
                # Every sample is either queued or held by a worker with a
                # deadline; the cap only bounds the wait should that ever fail.
                wait_s = min(max(0, min(deadlines, default=now) - now) / 1e9, 1.0)
                if not any(w.dead for w in self._workers):
                    multiprocessing.connection.wait(
                        [w.conn for w in self._workers]
                        + [w.process.sentinel for w in self._workers],
                        timeout=wait_s,
                    )
                now = time.monotonic_ns()
                for k, worker in enumerate(self._workers):
                    remaining -= self._drain(worker, rewards, failures)
                    if worker.process.exitcode is not None:
                        worker.dead = True
                    position, started = worker.running()
                    if worker.dead:
                        if worker.items:
                            # Its pipe can close before the process is reaped:
                            # wait for that (briefly), so the exit code is known.
                            worker.process.join(timeout=1.0)
                            # The sample it was on killed it; the ones before it
                            # finished, but their results died with the worker.
                            failures[worker.items[position]] = (
                                f"the worker process died (exit code {worker.process.exitcode})"
                            )
                            remaining -= 1
                    elif worker.ready and worker.items and now >= started + timeout_ns:
                        timeouts += 1
                        remaining -= 1
                    elif not worker.ready and now >= worker.spawned_at + startup_ns:
                        pass  # a start-up that hangs: replaced below like one that died
                    else:
                        continue
                    if not worker.ready:
                        failed_starts += 1
                        if failed_starts >= _MAX_FAILED_STARTS * self.num_workers:
                            raise RuntimeError(
                                f"RewardPool: {failed_starts} worker processes died or hung "
                                f"before loading reward_fn (last exit code "
                                f"{worker.process.exitcode}); see their output above"
                            )
                    # Every other sample of its chunk goes back to the front of the queue.
                    if worker.items:
                        del worker.items[position]
                    pending.extendleft(reversed(worker.items))
                    worker.items = []
                    worker.kill()
                    self._workers[k] = _Worker(self._ctx, self._payload)
        except BaseException:
            # An interrupted call (or a start-up failure): workers still busy
            # would send results nobody collects into the next call; end them.
            for worker in [w for w in self._workers if w.items or w.dead]:
                self._workers.remove(worker)
                worker.kill()
            raise
        return timeouts

    def _drain(self, worker: _Worker, rewards: np.ndarray, failures: dict[int, str]) -> int:
        """Read every message ``worker`` has sent; return how many samples it finished."""
        finished = 0
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == "done":
                    for index, (reward, error) in zip(worker.items, message[1], strict=True):
                        rewards[index] = reward
                        if error is not None:
                            failures[index] = error
                elif message[0] == "batch_error":
                    for index in worker.items:
                        failures[index] = f"the chunk did not unpickle in the worker: {message[1]}"
                elif message[0] == "ready":
                    worker.ready = True
                    continue
                elif message[0] == "startup_error":
                    raise RuntimeError(
                        "RewardPool: reward_fn does not load in a fresh worker process "
                        "(it must be importable there: defined at the top level of an "
                        f"importable module); the worker said:\n{message[1]}"
                    )
                finished += len(worker.items)
                worker.items = []
        except (EOFError, OSError):
            worker.dead = True
        return finished


if __name__ == _WORKER_RUN_NAME:
    _worker_main(*globals()["_worker_args"])
