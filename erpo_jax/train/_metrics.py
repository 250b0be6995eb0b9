"""Per-step metrics: one JSON object per line in ``<out>/metrics.jsonl`` and TensorBoard events.

Values are converted to Python floats at this boundary (one host transfer
per step). On resume, records at or after the resumed step (written by the
interrupted run after its last checkpoint) are dropped, so the file holds
each step once.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax

__all__ = ["MetricsWriter", "read_metrics"]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, bool | int | str) or value is None:
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line is skipped)."""
    out: list[dict[str, Any]] = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class MetricsWriter:
    """Appends step records to ``metrics.jsonl`` and scalars to TensorBoard (process 0 only).

    Args:
      out_dir: the run directory.
      resume_step: drop existing records with ``step >= resume_step`` (None:
        start a fresh file).
      tensorboard: also write event files under ``<out>/tensorboard``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ):
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        # Multi-host: the records hold global values; process 0 writes them.
        self._primary = jax.process_index() == 0
        if not self._primary:
            return
        kept = []
        if resume_step is not None:
            kept = [r for r in read_metrics(self.path) if r.get("step", -1) < resume_step]
        with self.path.open("w") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step)

    def write(self, step: int, metrics: dict[str, Any], *, prefix: str = "") -> dict[str, Any]:
        """Appends one record (``{"step": step, **metrics}``); returns it as plain JSON values."""
        record = {"step": int(step), **{f"{prefix}{k}": _plain(v) for k, v in metrics.items()}}
        if not self._primary:
            return record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, int(step))
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
