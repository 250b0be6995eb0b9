"""Orbax checkpoints of a run: params, optimizer state, step, data iterator state, RNG, config.

One ``orbax.checkpoint.CheckpointManager`` under ``<out>/checkpoints/``,
keeping the last ``keep`` steps. Orbax writes each step into a temporary
directory and renames it when complete, so a crash during a save leaves the
previous checkpoint the latest loadable one. The array state is a pytree
(``StandardSave``); the data iterator state, the RNG key data and the
resolved config are JSON (``JsonSave``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["RunCheckpointer"]


class RunCheckpointer:
    """Saves and restores a run's state under ``<out>/checkpoints``."""

    def __init__(self, out_dir: str | os.PathLike, *, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(out_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        """The latest complete checkpoint's step (the number of RL steps done), or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) as checkpoint ``step``."""
        ocp = self._ocp
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of checkpoint ``step``; ``target`` gives the state's structure,
        shapes, dtypes and shardings."""
        ocp = self._ocp
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)
            ),
            target,
        )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"checkpoint {self.directory / str(step)} is missing files: {err}"
            ) from err
        return restored.state, restored.meta

    def read_meta(self, step: int) -> dict[str, Any]:
        """Only the JSON part of checkpoint ``step`` (to check a config before building)."""
        ocp = self._ocp
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored.meta

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
