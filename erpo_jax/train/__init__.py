"""The RL trainer: config, data pipeline, train state and jitted step, loop, checkpoints, metrics.

- :func:`load_config` / :class:`RunConfig`: typed frozen dataclasses per
  concern (model, data, rollout, loss, optimizer, train, eval, mesh), merged
  from YAML and ``key=value`` overrides by OmegaConf; errors name the key.
- :func:`train`: the loop behind ``erpo-jax train`` (see ``_loop.py``).
- :class:`PromptStream` / :func:`load_prompt_source`: the grain prompt
  pipeline (shuffled by seed per epoch, per-process shards, checkpointable).
- :func:`make_loss_fn`: ``loss.name`` -> the pure loss the step differentiates.
- :func:`make_update_fn` / :func:`make_score_fn` / :func:`make_optimizer`:
  the jitted pieces.
- :func:`make_mesh`, :func:`place_params`, :func:`global_batch`,
  :func:`residual_sharding`: the mesh and the sharding rules.
- :func:`build_toy_base_model`: the toy Countdown base model (supervised
  warm-up with the trainer's optimizer and metrics writer).
"""

from erpo_jax.train._checkpoint import RunCheckpointer
from erpo_jax.train._config import (
    LOSS_NAMES,
    ConfigError,
    DataConfig,
    EvalConfig,
    LossConfig,
    MeshConfig,
    ModelSpec,
    OptimizerConfig,
    RolloutConfig,
    RunConfig,
    TrainLoopConfig,
    config_diff,
    config_to_dict,
    config_to_yaml,
    load_config,
)
from erpo_jax.train._data import PromptStream, load_prompt_source
from erpo_jax.train._loop import TIMING_KEYS, train
from erpo_jax.train._losses import DEFAULT_AGG, loss_agg, loss_denominator, make_loss_fn
from erpo_jax.train._mesh import (
    AXES,
    batch_sharding,
    global_batch,
    make_mesh,
    place_params,
    place_state,
    residual_sharding,
)
from erpo_jax.train._metrics import MetricsWriter, read_metrics
from erpo_jax.train._step import (
    AUTO_MICRO_TOKENS,
    make_optimizer,
    make_schedule,
    make_score_fn,
    make_update_fn,
    resolve_micro_batches,
    split_policy,
)
from erpo_jax.train._toy_model import ToyModelRecipe, build_toy_base_model, toy_base_model_dir

__all__ = [
    "AUTO_MICRO_TOKENS",
    "AXES",
    "DEFAULT_AGG",
    "LOSS_NAMES",
    "TIMING_KEYS",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "MeshConfig",
    "MetricsWriter",
    "ModelSpec",
    "OptimizerConfig",
    "PromptStream",
    "RolloutConfig",
    "RunCheckpointer",
    "RunConfig",
    "ToyModelRecipe",
    "TrainLoopConfig",
    "batch_sharding",
    "build_toy_base_model",
    "config_diff",
    "config_to_dict",
    "config_to_yaml",
    "global_batch",
    "load_config",
    "load_prompt_source",
    "loss_agg",
    "loss_denominator",
    "make_loss_fn",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_score_fn",
    "make_update_fn",
    "place_params",
    "place_state",
    "read_metrics",
    "residual_sharding",
    "resolve_micro_batches",
    "split_policy",
    "toy_base_model_dir",
    "train",
]
