"""Worker process for math answer verification, run as ``python _verify_worker.py``.

The parent (``MathVerifier``) starts this file as a script in a fresh
interpreter, not through ``multiprocessing``: a spawned or forked child would
re-import the user's ``__main__`` or inherit JAX's threads, and running the
file directly keeps the worker from importing the rest of erpo_jax. Protocol, one JSON object per
line: the worker writes ``{"ready": true}`` once ``math_verify`` is imported,
then answers each ``{"id": i, "gold": str, "pred": str}`` with
``{"id": i, "ok": bool, "error": str | null}``. Answers are already extracted
(the bare content of a box). The parent enforces the time limit by killing
the worker, so ``math_verify``'s own ``signal.alarm`` timeouts are turned off.
"""

from __future__ import annotations

import json
import logging
import os
import sys

__all__ = ["check_equivalent", "main"]


def check_equivalent(gold: str, pred: str) -> bool:
    """Whether ``pred`` is equivalent to ``gold`` according to ``math-verify``.

    Both are bare answers; each is parsed as the content of a ``\\boxed{}``.
    No time limit: callers run this in a process they can kill.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=config, parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _set_memory_limit(limit_mb: int) -> None:
    """Cap this process's address space so a runaway big-integer dies quickly."""
    if limit_mb <= 0:
        return
    try:
        import resource

        limit = limit_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass  # not available on this platform; the parent's deadline still holds


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent dies (PR_SET_PDEATHSIG).

    A worker stuck in C code (a huge integer power) never reads the closed
    stdin that would otherwise end it, so without this an orphan could burn
    a core after the trainer crashed.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call above
            os._exit(0)
    except (OSError, AttributeError):
        pass


def main() -> None:
    """Serve verification requests on stdin until it closes."""
    _die_with_parent()
    # Keep the protocol channel private: anything a library prints goes to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401  (import before "ready" so startup is not billed to an answer)

    check_equivalent("1", "1")  # warm the parsers' caches
    _set_memory_limit(int(os.environ.get("ERPO_VERIFY_MEMORY_MB", "0")))
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            ok, error = check_equivalent(request["gold"], request["pred"]), None
        except (Exception, RecursionError, MemoryError) as e:
            # Only the type: str() of a sympy-laden exception can itself hang.
            ok, error = False, type(e).__name__
        protocol.write(json.dumps({"id": request["id"], "ok": ok, "error": error}) + "\n")


if __name__ == "__main__":
    main()
