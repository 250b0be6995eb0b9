"""The run configuration: typed frozen dataclasses per concern, merged by OmegaConf.

``load_config(path, overrides)`` starts from the dataclass defaults (the
embedded default job: ERPO on the toy Countdown task on CPU), merges a YAML
file and dotted ``key=value`` overrides with OmegaConf (which checks key names
and types against the dataclasses), and returns a :class:`RunConfig` whose
``__post_init__`` checks values and combinations. Every error is a
:class:`ConfigError` raised before anything compiles, naming the key and the
allowed values (with a close-match hint for a mistyped key).

Configs stop at the script boundary: jitted code receives arrays and Python
scalars, never these objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Optional

from erpo_jax._defaults import DEFAULT_COMPILATION_CACHE_DIR
from erpo_jax.models.attention import ATTENTION_IMPLS
from erpo_jax.models.decoder import COMPUTE_DTYPES

__all__ = [
    "LOSS_NAMES",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "MeshConfig",
    "ModelSpec",
    "OptimizerConfig",
    "RolloutConfig",
    "RunConfig",
    "TrainLoopConfig",
    "config_diff",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
]


LOSS_NAMES: tuple[str, ...] = (
    "grpo",
    "dr_grpo",
    "dapo",
    "erpo",
    "holder",
    "gspo",
    "entropy_top20",
    "arca",
)
"""``loss.name`` values."""

_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


class ConfigError(ValueError):
    """A bad configuration; the message names the key and the allowed values."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config key {key}={value!r} is invalid: {allowed}")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(key, value, f"allowed values are {', '.join(allowed)}")


def _positive(key: str, value: Any, *, minimum: float = 1, kind: str = "int") -> None:
    if value is None or value < minimum:
        _fail(key, value, f"must be an {kind} >= {minimum}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The policy model.

    Attributes:
      checkpoint: a local Hugging Face checkpoint directory, or ``"toy"`` for
        the toy Countdown base model (built under ``toy_data_dir`` on first use).
      toy_data_dir: cache root of the toy base model.
      dtype: compute dtype (``float32``, ``bfloat16``, ``float16``); parameters
        stay float32 for training.
      lora_rank: > 0 trains only LoRA adapters of this rank (``nnx.LoRAParam``).
      lora_alpha: LoRA scale numerator (scale = alpha / rank).
      remat: recompute block activations in the backward pass.
      scan_layers: ``lax.scan`` over blocks in the cache-free forward.
      logp_chunk_size: tokens per chunk of the log-prob/entropy head. None
        (the default) picks from the shapes: all at once while one device's
        float32 logits fit in 256 MiB, else chunks that fit
        (``erpo_jax.ops.auto_chunk_size``).
      vocab_chunk_size: vocabulary tile of that head (None: the full vocabulary).
      attention_impl: ``auto``, ``xla``, ``chunked`` (blockwise, memory linear
        in length), ``cudnn`` (GPU) or ``splash`` (the Pallas TPU kernel); see
        ``erpo_jax.models.attention``.
      attention_block: at most this many keys per block of the chunked attention.
      sequence_parallel: when ``mesh.tensor > 1``, split the training
        forward's residual stream along the sequence over the tensor axis
        (``Decoder(residual_sharding=...)``), so the block inputs that remat
        keeps take ``1 / tensor`` of the memory. Values are unchanged. The
        stream's rows are pinned over ``(data, fsdp)`` either way (see
        ``erpo_jax.train.residual_sharding``).
    """

    checkpoint: str = "toy"
    toy_data_dir: str = "runs/toy_models"
    dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    remat: bool = False
    scan_layers: bool = False
    logp_chunk_size: Optional[int] = None  # noqa: UP045 (OmegaConf needs typing.Optional)
    vocab_chunk_size: Optional[int] = None  # noqa: UP045
    attention_impl: str = "auto"
    attention_block: int = 512
    sequence_parallel: bool = True

    def __post_init__(self):
        _choice("model.dtype", self.dtype, COMPUTE_DTYPES)
        _choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _positive("model.attention_block", self.attention_block)
        if self.lora_rank < 0:
            _fail("model.lora_rank", self.lora_rank, "must be >= 0 (0: full fine-tuning)")
        if self.lora_rank and not self.lora_alpha > 0:
            _fail("model.lora_alpha", self.lora_alpha, "must be > 0")
        for key in ("logp_chunk_size", "vocab_chunk_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                _fail(f"model.{key}", value, "must be null or an int >= 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where prompts come from.

    Attributes:
      task: ``countdown`` or ``math`` (the reward and prompt format).
      source: ``countdown`` (generated), ``file`` (local JSONL/JSON/Parquet
        file or directory), ``hf`` (Hugging Face ``datasets``, extra ``hf``),
        ``tfds`` (extra ``tfds``).
      path: the file or directory for ``source=file``.
      name: the dataset name for ``hf`` / ``tfds``.
      split: the split to train on.
      level: Countdown difficulty (``easy``, ``medium``, ``hard``).
      num_problems: generated Countdown problems, or a cap on loaded rows (null: all).
      eval_path: held-out problems file for ``source=file`` / ``hf`` (null:
        Countdown's test split, or ``eval_split`` of the same source).
      eval_split: held-out split.
      template: math prompt template (``auto``, ``chat``, ``qwen_math``, ``plain``).
      think: open a ``<think>`` block in math prompts.
      shuffle: shuffle prompts (by ``seed``, a new order each epoch).
    """

    task: str = "countdown"
    source: str = "countdown"
    path: Optional[str] = None  # noqa: UP045
    name: Optional[str] = None  # noqa: UP045
    split: str = "train"
    level: str = "easy"
    num_problems: Optional[int] = 2000  # noqa: UP045
    eval_path: Optional[str] = None  # noqa: UP045
    eval_split: str = "test"
    template: str = "auto"
    think: bool = False
    shuffle: bool = True

    def __post_init__(self):
        _choice("data.task", self.task, ("countdown", "math"))
        _choice("data.source", self.source, ("countdown", "file", "hf", "tfds"))
        _choice("data.template", self.template, ("auto", "chat", "qwen_math", "plain"))
        if self.source == "countdown" and self.task != "countdown":
            _fail("data.source", self.source, "the countdown generator needs data.task=countdown")
        if self.source == "file" and not self.path:
            _fail("data.path", self.path, "data.source=file needs a file or directory path")
        if self.source in ("hf", "tfds") and not self.name:
            _fail("data.name", self.name, f"data.source={self.source} needs a dataset name")
        if self.num_problems is not None and self.num_problems < 1:
            _fail("data.num_problems", self.num_problems, "must be null or an int >= 1")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling G completions per prompt.

    Attributes:
      prompts_per_step: P, prompts per RL step (over all processes).
      group_size: G, completions per prompt (>= 2).
      max_new_tokens: T, completion budget.
      temperature, top_k, top_p, min_p: sampling (null: off).
      reft: REFT first-token diversification (arXiv 2605.28295).
      reft_top_n, reft_k: REFT's N and K (``group_size % reft_k == 0``).
      reft_marker: text whose tokens are forced before the REFT opener (e.g. ``<think>``).
      stop_strings: strings that end a completion, besides EOS ids.
      stop_check_every: decode steps between the sampler's host checks of
        the stop strings (smaller: less decoding past a stop, more host
        round trips; see docs/benchmarks.md, "Stop strings").
      decode_phases: the training rollouts' decode loop in this many parts over a KV
        cache grown between them, so early steps attend to fewer empty
        slots (``erpo_jax.sampling.sample``): faster decoding for more
        compile time and, at each change, the old and the new cache at
        once. null (the default): auto, 8 parts on CPU from 128 new tokens
        and one loop otherwise (``erpo_jax.sampling.resolve_decode_phases``).
        1: one loop. With stop strings (these or a task's own), each host
        check's chunk runs the parts it overlaps.
      gather_params: on a mesh with ``mesh.fsdp > 1``, gather the policy's
        parameters over fsdp once per rollout, so its prefill and decode
        steps run each device's rows without collectives
        (``erpo_jax.sampling.sample(gather_params=)``). null (the default):
        when the gathered parameters take at most 1/8 of a device's memory;
        true: always; false: never (the rollout then runs on the sharded
        parameters). Values are the same to float rounding.
      max_prompt_tokens: prompts longer than this are skipped (with a warning,
        counted in ``skipped_long_prompts``) and replaced by the next ones from
        the data stream; null: the model's context minus ``max_new_tokens``.
      dynamic_sampling: DAPO dynamic sampling: drop groups whose rewards are
        all equal and sample more prompts until the batch is full.
      max_sampling_tries: rollouts per step at most under dynamic sampling;
        after that the batch is filled with dropped groups (counted).
      reward_timeout_s: per-sample verifier time limit.
      reward_workers: verifier worker processes (0: score in-process, no limit).
    """

    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: Optional[int] = None  # noqa: UP045
    top_p: Optional[float] = None  # noqa: UP045
    min_p: Optional[float] = None  # noqa: UP045
    reft: bool = False
    reft_top_n: int = 20
    reft_k: int = 4
    reft_marker: Optional[str] = None  # noqa: UP045
    stop_strings: tuple[str, ...] = ()
    stop_check_every: int = 16
    decode_phases: Optional[int] = None  # noqa: UP045
    gather_params: Optional[bool] = None  # noqa: UP045
    max_prompt_tokens: Optional[int] = None  # noqa: UP045
    dynamic_sampling: bool = False
    max_sampling_tries: int = 4
    reward_timeout_s: float = 10.0
    reward_workers: int = 2

    def __post_init__(self):
        _positive("rollout.prompts_per_step", self.prompts_per_step)
        if self.group_size < 2:
            _fail("rollout.group_size", self.group_size, "must be an int >= 2 (GRPO needs a group)")
        _positive("rollout.max_new_tokens", self.max_new_tokens)
        if not self.temperature > 0:
            _fail("rollout.temperature", self.temperature, "must be > 0 for RL sampling")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            _fail("rollout.top_p", self.top_p, "must be null or in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            _fail("rollout.min_p", self.min_p, "must be null or in [0, 1]")
        if self.top_k is not None and self.top_k < 1:
            _fail("rollout.top_k", self.top_k, "must be null or an int >= 1")
        if self.reft:
            _positive("rollout.reft_k", self.reft_k)
            if self.group_size % self.reft_k:
                _fail(
                    "rollout.reft_k",
                    self.reft_k,
                    f"must divide rollout.group_size={self.group_size} (G % reft_k == 0)",
                )
            if self.reft_top_n < self.reft_k:
                _fail("rollout.reft_top_n", self.reft_top_n, f"must be >= reft_k={self.reft_k}")
        _positive("rollout.max_sampling_tries", self.max_sampling_tries)
        _positive("rollout.stop_check_every", self.stop_check_every)
        if self.decode_phases is not None and self.decode_phases < 1:
            _fail("rollout.decode_phases", self.decode_phases, "must be null (auto) or an int >= 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            _fail("rollout.max_prompt_tokens", self.max_prompt_tokens, "must be null or >= 1")
        if not self.reward_timeout_s > 0:
            _fail("rollout.reward_timeout_s", self.reward_timeout_s, "must be > 0")
        if self.reward_workers < 0:
            _fail("rollout.reward_workers", self.reward_workers, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The loss, by name, and every hyperparameter of the family (METHOD.md).

    Attributes:
      name: one of :data:`LOSS_NAMES`.
      agg: aggregation; null takes the method's own (GRPO:
        ``seq_mean_token_mean``; Dr. GRPO: ``seq_mean_token_sum_norm``; DAPO,
        ERPO, 80/20: ``token_mean``; ARCA: ``seq_mean_token_mean``).
      clip_eps, clip_eps_high, clip_c: PPO clip, clip-higher, dual clip
        (null: off / the method's default; DAPO's clip-higher is 0.28).
      kl_coef, kl_estimator: KL to the reference (0: no reference for GRPO).
      max_len: Dr. GRPO's constant normalizer (null: max_new_tokens).
      normalize_std: divide group advantages by their std (null: the
        method's default; Dr. GRPO: false).
      gamma, num_buckets, beta, eta, gate_mode, psi_gate, progress_std_floor,
        progress_source: ERPO (METHOD.md section 2).
      holder_p_start, holder_p_end: HolderPO's linear p schedule over the run.
      gspo_clip_low, gspo_clip_high: GSPO's sequence-level clip (GSPO paper's 3e-4 / 4e-4).
      top_fraction: the 80/20 high-entropy token fraction.
      arca_power: ARCA's exponent k.
    """

    name: str = "erpo"
    agg: Optional[str] = None  # noqa: UP045
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None  # noqa: UP045
    clip_c: Optional[float] = None  # noqa: UP045
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    max_len: Optional[int] = None  # noqa: UP045
    normalize_std: Optional[bool] = None  # noqa: UP045
    gamma: float = 5.0
    num_buckets: int = 10
    beta: float = 0.1
    eta: float = 0.2
    gate_mode: str = "redistribute"
    psi_gate: bool = True
    progress_std_floor: float = 0.0
    progress_source: str = "old"
    holder_p_start: float = 2.0
    holder_p_end: float = -2.0
    gspo_clip_low: float = 3e-4
    gspo_clip_high: float = 4e-4
    top_fraction: float = 0.2
    arca_power: float = 2.0

    def __post_init__(self):
        _choice("loss.name", self.name, LOSS_NAMES)
        if self.agg is not None:
            _choice("loss.agg", self.agg, _AGG_MODES)
        _choice("loss.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        _choice("loss.gate_mode", self.gate_mode, ("redistribute", "amplify", "none"))
        _choice("loss.progress_source", self.progress_source, ("old", "current"))
        if not 0 < self.clip_eps < 1:
            _fail("loss.clip_eps", self.clip_eps, "must be in (0, 1)")
        if self.clip_eps_high is not None and not self.clip_eps_high > 0:
            _fail("loss.clip_eps_high", self.clip_eps_high, "must be null or > 0")
        if self.clip_c is not None and not self.clip_c > 1:
            _fail("loss.clip_c", self.clip_c, "must be null or > 1 (dual clip)")
        if self.kl_coef < 0:
            _fail("loss.kl_coef", self.kl_coef, "must be >= 0")
        _positive("loss.num_buckets", self.num_buckets)
        if self.eta < 0:
            _fail("loss.eta", self.eta, "must be >= 0")
        if not 0 < self.top_fraction <= 1:
            _fail("loss.top_fraction", self.top_fraction, "must be in (0, 1]")

    @property
    def needs_reference(self) -> bool:
        """A frozen reference forward is needed: KL > 0, or ERPO's progress term (eta > 0)."""
        return self.kl_coef > 0 or (self.name == "erpo" and self.eta > 0)

    @property
    def needs_old_ref_pair(self) -> bool:
        """``old_logp`` and ``ref_logp`` must come from one compiled function.

        ERPO's progress signal ``s = beta (old - ref)`` (``eta > 0``,
        ``progress_source=old``) is exactly 0 at step 0 only then: float noise
        of about 1e-7 in ``old - ref`` would be scaled to unit size by the
        bucket normalization. Everywhere else the update's own detached
        forward may serve as ``old_logp`` (a KL term compares the update's
        ``logp`` with ``ref_logp`` anyway).
        """
        return self.name == "erpo" and self.eta > 0 and self.progress_source == "old"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optax AdamW with warmup and a constant or cosine schedule, and global-norm clipping."""

    learning_rate: float = 3e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0  # noqa: UP045

    def __post_init__(self):
        if not self.learning_rate > 0:
            _fail("optimizer.learning_rate", self.learning_rate, "must be > 0")
        _choice("optimizer.schedule", self.schedule, ("constant", "cosine"))
        if self.warmup_steps < 0:
            _fail("optimizer.warmup_steps", self.warmup_steps, "must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail("optimizer.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if self.weight_decay < 0:
            _fail("optimizer.weight_decay", self.weight_decay, "must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            _fail("optimizer.max_grad_norm", self.max_grad_norm, "must be null or > 0")


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    """The update: mu passes over each batch, mini-batch updates, micro-batch accumulation.

    Attributes:
      num_iterations: mu, passes over each rollout batch.
      mini_batches: optimizer updates per pass (each on 1/mini_batches of the groups).
      micro_batches: gradient-accumulation chunks per update; the sum of
        their gradients equals the full mini-batch gradient exactly. The
        scoring passes (old and reference log-probs) run the whole batch in
        ``mini_batches * micro_batches`` chunks of the same size. null
        (auto): one on GPU and TPU; on CPU the fewest chunks of whole groups
        that hold at most 4,096 tokens each per device
        (``erpo_jax.train.resolve_micro_batches``: the tiny-Qwen3 update ran
        15-20% faster in 8 micro-batches than in one on a 2-core CPU). It
        may change on resume (float rounding only, as ``length_buckets``).
      recompute_old_logp: recompute ``old_logp`` with the trainer's forward
        (the same function as the reference's, so ERPO's progress signal is
        exactly 0 at step 0); false uses the sampler's ``logp``. With one
        update per batch, the recomputed ``old_logp`` is the update's own
        forward, detached, and no separate pass runs for it, unless ERPO's
        progress signal needs it from the reference's function
        (``LossConfig.needs_old_ref_pair``).
      length_buckets: the scoring and update passes run on the step's
        completions cut to the smallest multiple of
        ``ceil(rollout.max_new_tokens / length_buckets)`` columns that holds
        the longest one (over all processes), not on the whole budget: at
        most ``length_buckets`` completion widths are compiled (for each
        prompt-width bucket). 1: always the full
        ``max_new_tokens``. The cut columns are padding of every row, so the
        losses are unchanged (Dr. GRPO's normalizer stays ``max_new_tokens``).
        It may change on resume; the run then continues equal up to float
        rounding to the uninterrupted one, not bit for bit (a checkpoint
        written before this key existed ran at the full width, 1).
        Each new width costs one compilation of the passes (on the toy about
        13 s on a 2-core CPU, against 0.2 s saved per step at width 36 of
        48), hence few, coarse widths; ``compilation_cache_dir`` keeps them
        for later runs.
    """

    num_iterations: int = 1
    mini_batches: int = 1
    micro_batches: Optional[int] = None  # noqa: UP045
    recompute_old_logp: bool = True
    length_buckets: int = 4

    def __post_init__(self):
        _positive("train.num_iterations", self.num_iterations)
        _positive("train.mini_batches", self.mini_batches)
        if self.micro_batches is not None and self.micro_batches < 1:
            _fail("train.micro_batches", self.micro_batches, "must be null (auto) or an int >= 1")
        _positive("train.length_buckets", self.length_buckets)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation (before the first step, every ``eval_every`` steps, after the last).

    Attributes:
      num_problems: held-out problems.
      num_samples: sampled completions per problem (pass@k for k up to it).
      temperature: sampling temperature of the sampled completions.
      batch_size: prompts per sampler call.
      greedy: also a greedy completion per problem.
    """

    num_problems: int = 128
    num_samples: int = 8
    temperature: float = 1.0
    batch_size: int = 64
    greedy: bool = True

    def __post_init__(self):
        _positive("eval.num_problems", self.num_problems)
        if self.num_samples < 0:
            _fail("eval.num_samples", self.num_samples, "must be >= 0")
        _positive("eval.batch_size", self.batch_size)
        if self.temperature < 0:
            _fail("eval.temperature", self.temperature, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes (data, fsdp, tensor); their product must equal the device count.

    ``-1`` on one axis takes the devices the others leave. ``distributed``
    calls ``jax.distributed.initialize()`` first (multi-host; the coordinator
    comes from the environment on TPU pods and SLURM, or from
    ``coordinator_address`` / ``num_processes`` / ``process_id``).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    distributed: bool = False
    coordinator_address: Optional[str] = None  # noqa: UP045
    num_processes: Optional[int] = None  # noqa: UP045
    process_id: Optional[int] = None  # noqa: UP045

    def __post_init__(self):
        sizes = {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor}
        for key, value in sizes.items():
            if value == 0 or value < -1:
                _fail(key, value, "must be a positive int, or -1 for the remaining devices")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError("config: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """``(data, fsdp, tensor)`` for ``num_devices`` devices.

        Raises:
          ConfigError: the axes do not divide (or multiply to) the device count.
        """
        sizes = [self.data, self.fsdp, self.tensor]
        known = 1
        for s in sizes:
            if s != -1:
                known *= s
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(
                    f"config: mesh {self.data}x{self.fsdp}x{self.tensor} (data x fsdp x tensor) "
                    f"does not divide the {num_devices} devices"
                )
            sizes[sizes.index(-1)] = num_devices // known
        elif known != num_devices:
            raise ConfigError(
                f"config: mesh.data*mesh.fsdp*mesh.tensor = {known} but there are "
                f"{num_devices} devices; the product must equal the device count (or use -1)"
            )
        return sizes[0], sizes[1], sizes[2]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One run: the top-level keys and one section per concern.

    Attributes:
      steps: RL steps.
      seed: seeds data order, sampling and initialization.
      checkpoint_every: steps between Orbax checkpoints (0: only the last step).
      keep_checkpoints: checkpoints kept.
      eval_every: steps between held-out evaluations (0: only before and after).
      profile_step: write a ``jax.profiler`` trace of this step (null: none).
      out: output directory (null: ``runs/train-<time>``; ``--out`` overrides).
      progress: show a tqdm progress bar.
      compilation_cache_dir: JAX's persistent compilation cache, so a later
        run (another seed, a resume, the next grid cell) loads the programs
        this one compiled instead of compiling them again; programs that took
        under a second to compile are not stored. null: off. A cache set
        through ``JAX_COMPILATION_CACHE_DIR`` or ``jax.config`` is used as it is.
        JAX writes entries from process 0 only: on several hosts, give a
        path on a filesystem they share, or only process 0 gains.
    """

    steps: int = 100
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 0
    profile_step: Optional[int] = None  # noqa: UP045
    out: Optional[str] = None  # noqa: UP045
    progress: bool = True
    compilation_cache_dir: Optional[str] = DEFAULT_COMPILATION_CACHE_DIR  # noqa: UP045
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self):
        _positive("steps", self.steps)
        if self.checkpoint_every < 0:
            _fail("checkpoint_every", self.checkpoint_every, "must be >= 0 (0: last step only)")
        _positive("keep_checkpoints", self.keep_checkpoints)
        if self.eval_every < 0:
            _fail("eval_every", self.eval_every, "must be >= 0 (0: before and after only)")
        if self.profile_step is not None and not 0 <= self.profile_step < self.steps:
            _fail("profile_step", self.profile_step, f"must be null or in [0, steps={self.steps})")
        loss, rollout, train = self.loss, self.rollout, self.train
        if loss.name == "arca" and self.model.lora_rank == 0:
            raise ConfigError(
                "config: loss.name=arca needs LoRA (ARCA's credit is the adapter's effect on "
                "the last hidden state); set model.lora_rank > 0, e.g. model.lora_rank=16"
            )
        if train.length_buckets > rollout.max_new_tokens:
            _fail(
                "train.length_buckets",
                train.length_buckets,
                f"must be in 1..rollout.max_new_tokens={rollout.max_new_tokens}",
            )
        groups = rollout.prompts_per_step
        if groups % train.mini_batches:
            _fail(
                "train.mini_batches",
                train.mini_batches,
                f"must divide rollout.prompts_per_step={groups} (mini-batches hold whole groups)",
            )
        micro = train.micro_batches
        if micro is not None and (groups // train.mini_batches) % micro:
            _fail(
                "train.micro_batches",
                train.micro_batches,
                f"must divide the {groups // train.mini_batches} groups of a mini-batch "
                "(micro-batches hold whole groups, which ERPO's statistics need)",
            )


# ------------------------------------------------------------------ loading


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    for field in dataclasses.fields(node):
        key = f"{prefix}{field.name}"
        out.append(key)
        default = getattr(node, field.name)
        if dataclasses.is_dataclass(default):
            out.extend(_all_keys(default, key + "."))
    return out


def _friendly(err: Exception) -> ConfigError:
    """An OmegaConf error as one line naming the key, with a close-match hint."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    full_key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError):
        keys = _all_keys(RunConfig())
        hint = difflib.get_close_matches(full_key, keys, n=1, cutoff=0.6)
        section = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
        siblings = (
            [
                k[len(section) :]
                for k in keys
                if k.startswith(section) and "." not in k[len(section) :]
            ]
            if section
            else [k for k in keys if "." not in k]
        )
        msg = f"config: unknown key {full_key!r}"
        if hint:
            msg += f"; did you mean {hint[0]!r}?"
        msg += f" Allowed keys{' in ' + section[:-1] if section else ''}: {', '.join(siblings)}"
        return ConfigError(msg)
    if isinstance(err, ValidationError):
        first = str(err).splitlines()[0]
        return ConfigError(f"config key {full_key}: {first}")
    return ConfigError(f"config: {err}")


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """The :class:`RunConfig` from defaults, an optional YAML file and ``key=value`` overrides.

    Raises:
      ConfigError: a missing or unparsable file, an unknown key (with a
        close-match hint), a value of the wrong type, an override without
        ``=``, or a value or combination that ``__post_init__`` rejects.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(RunConfig)
    layers = []
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {os.fspath(path)!r} does not exist")
        try:
            layers.append(OmegaConf.load(os.fspath(path)))
        except Exception as err:  # yaml errors come in several types
            raise ConfigError(f"config file {os.fspath(path)!r} is not valid YAML: {err}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. loss.name=grpo)")
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise ConfigError(f"overrides {list(overrides)}: {err}") from None
    try:
        merged = OmegaConf.merge(base, *layers)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _friendly(err) from None
    assert isinstance(obj, RunConfig)
    return obj


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as nested plain dicts (tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def config_to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML (what ``<out>/config.yaml`` holds)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(config)))


# Keys that may differ between a checkpoint's run and its resumption.
_RESUMABLE = {
    "steps",
    "out",
    "progress",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_every",
    "profile_step",
    # how the run is computed, not what: the same programs from a cache, the
    # same losses and updates on fewer padding columns or accumulated over
    # other micro-batches, and the same samples from a decode loop split in
    # phases (equal up to float rounding, so a resume that changes one is no
    # longer bit-exact; a run saved with the old defaults
    # rollout.decode_phases=1 or train.micro_batches=1 resumes under null)
    "compilation_cache_dir",
    "train.length_buckets",
    "train.micro_batches",
    "rollout.decode_phases",
    "rollout.gather_params",
}


def config_diff(
    saved: dict[str, Any],
    current: dict[str, Any],
    prefix: str = "",
    *,
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """Dotted keys whose values differ and that change the run's results.

    Only the bookkeeping keys (``steps``, ``out``, ``checkpoint_every``, ...)
    may change on resume; the rest define the run. With ``defaults`` (the
    default config as a dict), a key the saved config lacks (one added to
    the library after the checkpoint was written) is unchanged when its
    current value is its default: a new key's default keeps the behaviour
    the run had without it.
    """
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in _RESUMABLE:
            continue
        a, b = saved.get(key), current.get(key)
        default = None if defaults is None else defaults.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = default if isinstance(default, dict) else None
            out.extend(config_diff(a, b, name + ".", defaults=sub))
        elif key not in saved and defaults is not None and key in defaults and b == default:
            continue
        elif a != b:
            out.append(f"{name} (checkpoint: {a!r}, now: {b!r})")
    return out
