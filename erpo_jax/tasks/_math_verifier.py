"""Math answer rewards: extraction, string fallback, ``math-verify`` under a deadline.

``math_verify`` hands answers to SymPy, and some strings send it into
unbounded work (``9^{9^{9^{9}}}`` is a big-integer power that never returns;
a few thousand nested braces take tens of seconds to parse). Its own timeout
uses ``signal.alarm``, which cannot interrupt C code and only works on the
main thread. So every symbolic check runs in a worker process with a
deadline; a worker past its deadline is killed and replaced, and the answer
scores 0.0. Timeouts and worker errors are counted and warned about, never
raised.

Scoring one (completion, reference) pair:

1. extract the completion's final answer (last ``\\boxed{}``, else ``####``);
   none gives 0.0;
2. extract the reference answer (a solution's box, GSM8K ``####``, or the
   bare string);
3. equal after strict normalization (``normalize_answer``) gives 1.0 at once;
4. an answer longer than ``max_answer_chars`` gives 0.0 without a symbolic check;
5. otherwise ``math_verify.verify`` in a worker: 1.0 if equivalent. Identical
   pairs within a call are checked once, and recent results are cached.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import selectors
import subprocess
import sys
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from erpo_jax.tasks._answers import (
    extract_completion_answer,
    extract_reference_answer,
    normalize_answer,
)

__all__ = [
    "MathVerifier",
    "VerifierStats",
    "VerifierTimeoutWarning",
    "math_reward",
    "math_rewards",
]

_WORKER_SCRIPT = Path(__file__).with_name("_verify_worker.py")


class VerifierTimeoutWarning(RuntimeWarning):
    """Some answers hit the verifier's time limit (or crashed it) and scored 0.0."""


@dataclasses.dataclass
class VerifierStats:
    """Running counts of a ``MathVerifier`` (cumulative over its lifetime).

    Attributes:
      num_scored: pairs scored.
      num_no_answer: completions without an extractable final answer.
      num_string_match: pairs settled by the strict string fallback.
      num_symbolic: distinct (reference, answer) pairs sent to ``math-verify`` in a worker.
      num_cached: pairs answered from the cache of recent symbolic checks.
      num_too_long: pairs with an answer over ``max_answer_chars`` (scored by string only).
      num_timeouts: symbolic checks killed at the time limit (scored 0.0).
      num_errors: symbolic checks that raised or crashed their worker (scored 0.0).
    """

    num_scored: int = 0
    num_no_answer: int = 0
    num_string_match: int = 0
    num_symbolic: int = 0
    num_too_long: int = 0
    num_cached: int = 0
    num_timeouts: int = 0
    num_errors: int = 0


class _Worker:
    """One verification subprocess and the request it is working on."""

    def __init__(self, memory_limit_mb: int):
        env = dict(os.environ)
        env["ERPO_VERIFY_MEMORY_MB"] = str(memory_limit_mb)
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(_WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=env,
            bufsize=0,
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.started_at = time.monotonic()
        self.ready = False
        self.buffer = b""
        self.task: int | None = None
        self.deadline = 0.0

    @property
    def fd(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def send(self, task: int, gold: str, pred: str, timeout_s: float) -> None:
        assert self.proc.stdin is not None
        line = json.dumps({"id": task, "gold": gold, "pred": pred}) + "\n"
        self.proc.stdin.write(line.encode("utf-8"))
        self.proc.stdin.flush()
        self.task = task
        self.deadline = time.monotonic() + timeout_s

    def read_messages(self) -> tuple[list[dict], bool]:
        """Complete messages available now, and whether the pipe hit end of file."""
        eof = False
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        messages = []
        for line in lines:
            if line.strip():
                try:
                    messages.append(json.loads(line))
                except json.JSONDecodeError:
                    eof = True  # a corrupted channel: treat the worker as dead
        return messages, eof

    def kill(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class MathVerifier:
    """Scores math completions against references with a per-answer time limit.

    Owns a small pool of worker processes (started lazily, reused across
    calls, replaced when one is killed at its deadline). Use it as a context
    manager or call ``close()``; the module-level ``math_reward`` and
    ``math_rewards`` share one default instance.

    Args:
      num_workers: worker processes for symbolic checks; default
        ``min(4, os.cpu_count())``.
      timeout_s: time limit of one symbolic check, in seconds, measured from
        when a ready worker receives it (worker start-up is not billed).
      max_answer_chars: answers longer than this skip the symbolic check
        (string fallback only).
      memory_limit_mb: address-space cap of each worker (POSIX only; 0 for none).
      startup_timeout_s: how long a worker may take to import ``math_verify``.
      cache_size: how many recent symbolic results (timeouts included, as
        0.0) to remember, keyed by the extracted (reference, answer) pair.

    Example:
      >>> with MathVerifier(num_workers=1, timeout_s=2.0) as verifier:
      ...     verifier.score(["so \\\\boxed{0.5}"], ["\\\\frac{1}{2}"]).tolist()
      [1.0]
    """

    def __init__(
        self,
        *,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        max_answer_chars: int = 1000,
        memory_limit_mb: int = 4096,
        startup_timeout_s: float = 60.0,
        cache_size: int = 65536,
    ):
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"MathVerifier: num_workers must be an int >= 1, got {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"MathVerifier: timeout_s must be > 0 seconds, got {timeout_s!r}")
        if max_answer_chars < 1:
            raise ValueError(
                f"MathVerifier: max_answer_chars must be >= 1, got {max_answer_chars!r}"
            )
        if cache_size < 0:
            raise ValueError(f"MathVerifier: cache_size must be >= 0, got {cache_size!r}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.max_answer_chars = max_answer_chars
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self.stats = VerifierStats()
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop all worker processes. A later call starts fresh ones."""
        with self._lock:
            for worker in self._workers:
                worker.kill()
            self._workers = []

    def __del__(self):
        try:
            for worker in self._workers:
                worker.kill()
        except Exception:  # interpreter shutdown: best effort only
            pass

    def __call__(self, completion: str, reference: str) -> float:
        """Reward of one completion: 1.0 if its final answer matches the reference."""
        return float(self.score([completion], [reference])[0])

    def score(self, completions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """Rewards of many completions, symbolic checks spread over the workers.

        Args:
          completions: model outputs, ``N`` strings.
          references: reference solutions or bare answers, ``N`` strings
            (for a group of completions per prompt, repeat the reference).

        Returns:
          ``[N]`` float32 array of 0.0 / 1.0. Checks that time out or crash
          score 0.0; they are counted in ``stats`` and warned about with a
          ``VerifierTimeoutWarning``.
        """
        if isinstance(completions, str) or isinstance(references, str):
            raise TypeError(
                "MathVerifier.score: completions and references must be sequences of str, "
                "not a single str (use math_reward for one pair)"
            )
        if len(completions) != len(references):
            raise ValueError(
                f"MathVerifier.score: got {len(completions)} completions "
                f"but {len(references)} references"
            )
        rewards = np.zeros(len(completions), np.float32)
        waiting: dict[tuple[str, str], list[int]] = {}
        with self._lock:
            stats = self.stats
            for i, (completion, reference) in enumerate(zip(completions, references, strict=True)):
                stats.num_scored += 1
                pred = extract_completion_answer(str(completion))
                gold = extract_reference_answer(str(reference))
                if pred is None or gold is None:
                    stats.num_no_answer += pred is None
                    continue
                if normalize_answer(pred) == normalize_answer(gold):
                    stats.num_string_match += 1
                    rewards[i] = 1.0
                elif len(pred) > self.max_answer_chars or len(gold) > self.max_answer_chars:
                    stats.num_too_long += 1
                elif (gold, pred) in self._cache:
                    stats.num_cached += 1
                    self._cache.move_to_end((gold, pred))
                    rewards[i] = self._cache[(gold, pred)]
                else:
                    # Identical pairs (a group often repeats an answer) are checked once.
                    waiting.setdefault((gold, pred), []).append(i)
            pairs = list(waiting)
            pending = deque((j, gold, pred) for j, (gold, pred) in enumerate(pairs))
            results = np.zeros(len(pairs), np.float32)
            timeouts, errors = self._run_symbolic(pending, results) if pairs else (0, 0)
            for pair, result in zip(pairs, results, strict=True):
                rewards[waiting[pair]] = result
                # Timeouts are cached as 0.0 too: a repeated hanging answer costs one limit.
                self._cache[pair] = float(result)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if timeouts or errors:
            warnings.warn(
                f"MathVerifier: scoring {len(rewards)} completions, {timeouts} distinct "
                f"answers hit the {self.timeout_s:g} s time limit and {errors} failed in the "
                f"checker; they scored 0.0 (totals so far: {stats.num_timeouts} timeouts, "
                f"{stats.num_errors} errors)",
                VerifierTimeoutWarning,
                stacklevel=2,
            )
        return rewards

    def _run_symbolic(
        self, pending: deque[tuple[int, str, str]], rewards: np.ndarray
    ) -> tuple[int, int]:
        """Run the queued symbolic checks; write 1.0 into ``rewards`` where equivalent.

        Returns the number of checks that timed out and that errored in this call.
        """
        stats = self.stats
        timeouts = errors = failed_starts = 0
        while len(self._workers) < min(self.num_workers, len(pending)):
            self._workers.append(_Worker(self.memory_limit_mb))
        outstanding = len(pending)
        while outstanding:
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    task, gold, pred = pending.popleft()
                    stats.num_symbolic += 1
                    try:
                        worker.send(task, gold, pred, self.timeout_s)
                    except OSError:
                        # A dead pipe: the end-of-file below reports it as a crash.
                        worker.task, worker.deadline = task, 0.0
            deadlines = [
                w.deadline if w.ready else w.started_at + self.startup_timeout_s
                for w in self._workers
                if w.task is not None or not w.ready
            ]
            wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.0
            with selectors.DefaultSelector() as selector:
                for worker in self._workers:
                    selector.register(worker.fd, selectors.EVENT_READ, worker)
                readable = {key.data for key, _ in selector.select(timeout=wait)}
            now = time.monotonic()
            for index, worker in enumerate(self._workers):
                dead = False
                if worker in readable:
                    messages, dead = worker.read_messages()
                    for message in messages:
                        if message.get("ready"):
                            worker.ready, failed_starts = True, 0
                        elif worker.task is not None and message.get("id") == worker.task:
                            task, worker.task = worker.task, None
                            outstanding -= 1
                            if message.get("error"):
                                errors += 1
                                stats.num_errors += 1
                            elif message.get("ok"):
                                rewards[task] = 1.0
                if worker.task is not None and (dead or now >= worker.deadline):
                    # Killed at its deadline, or crashed mid-check: the answer scores 0.0.
                    if dead:
                        errors += 1
                        stats.num_errors += 1
                    else:
                        timeouts += 1
                        stats.num_timeouts += 1
                    outstanding -= 1
                elif not dead and (
                    worker.ready or now < worker.started_at + self.startup_timeout_s
                ):
                    continue
                elif not worker.ready:
                    failed_starts += 1
                    if failed_starts > 2 * self.num_workers + 2:
                        worker.kill()
                        code = worker.proc.returncode
                        raise RuntimeError(
                            "MathVerifier: verification workers keep failing to start "
                            f"(exit code {code}); check that math-verify imports in "
                            f"{sys.executable} (the worker's stderr is above)"
                        )
                worker.kill()
                self._workers[index] = _Worker(self.memory_limit_mb)
        return timeouts, errors


_DEFAULT_VERIFIER: MathVerifier | None = None
_DEFAULT_LOCK = threading.Lock()


def _default_verifier() -> MathVerifier:
    global _DEFAULT_VERIFIER
    with _DEFAULT_LOCK:
        if _DEFAULT_VERIFIER is None:
            _DEFAULT_VERIFIER = MathVerifier()
            atexit.register(_DEFAULT_VERIFIER.close)
        return _DEFAULT_VERIFIER


def math_reward(completion: str, reference: str) -> float:
    """1.0 if the completion's final answer is equivalent to the reference, else 0.0.

    The completion's answer is its last ``\\boxed{...}`` (nested braces
    matched), else the text after its last GSM8K ``####``; a completion with
    neither scores 0.0. ``reference`` may be a bare answer (``"\\frac{1}{2}"``,
    ``"42"``) or a full solution containing ``\\boxed{}`` or ``####``.
    Equivalence is strict normalized string equality or ``math-verify``
    (so ``0.5``, ``\\dfrac{1}{2}`` and ``1/2`` agree, as do ``10\\text{ cm}``
    and ``10``). The symbolic check runs in a worker process with a 5 s limit;
    past it the answer scores 0.0 with a ``VerifierTimeoutWarning``.

    Uses a shared default ``MathVerifier``; build your own for other limits
    or worker counts.

    Example:
      >>> math_reward("... so the answer is \\\\boxed{\\\\dfrac{1}{2}}.", "0.5")
      1.0
    """
    return _default_verifier()(completion, reference)


def math_rewards(completions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """``math_reward`` over many pairs in parallel: a ``[N]`` float32 array.

    Uses the shared default ``MathVerifier`` (see ``MathVerifier.score``).
    """
    return _default_verifier().score(completions, references)
