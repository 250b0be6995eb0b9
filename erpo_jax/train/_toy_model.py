"""The toy base model: a tiny decoder trained on Countdown solution traces.

RL needs a base policy that is sometimes right and sometimes wrong, so that
sampled groups carry a learning signal and exploration matters. This module
builds one on a laptop CPU in minutes: a 2-layer Qwen3-type decoder trained by
supervised next-token learning on a mix of correct solution traces and
imperfect ones (wrong final expression, wrong arithmetic, a reused number,
truncated). A trace continues the task prompt with one step per line and a
final answer, e.g.::

    Numbers: 9 4 3
    Target: 15
    9-4=5
    5*3=15
    Answer: (9-4)*3<eos>

Correct traces choose uniformly among all integer solution paths of the
problem, so the model learns several routes to a target.

:func:`build_toy_base_model` writes a Hugging Face checkpoint directory
(``config.json``, ``model.safetensors``, the toy tokenizer files and
``train_meta.json``) under ``data_dir``, named by the seed and a hash of the
recipe, and returns it; a later call with the same arguments returns the
cached directory without training. The directory loads with
``erpo_jax.models.load_hf_checkpoint`` and
``transformers.AutoTokenizer.from_pretrained``.

Everything is deterministic for a seed: problems and traces come from NumPy
generators seeded from it, the initial weights from ``nnx.Rngs(seed)``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erpo_jax.tasks import (
    COUNTDOWN_LEVELS,
    COUNTDOWN_SPECIAL_TOKENS,
    CountdownProblem,
    build_countdown_tokenizer,
    countdown_prompt,
    countdown_reward,
    generate_countdown,
)

__all__ = [
    "TRACE_KINDS",
    "ToyModelRecipe",
    "ToyTrace",
    "build_toy_base_model",
    "make_toy_traces",
    "toy_base_model_dir",
]

TRACE_KINDS: tuple[str, ...] = (
    "correct",
    "wrong_answer",
    "wrong_arithmetic",
    "reused_number",
    "truncated",
)
"""Kinds of training trace. Only ``correct`` earns reward; the others are the
base model's mistakes: a correct derivation with a mis-copied final expression,
a last step that claims the target with false arithmetic, a derivation that
uses a given number twice, and a derivation cut off before its answer."""

# Bump when trace generation or training changes, so old caches are not reused.
_RECIPE_VERSION = 1
_PAD_ID, _BOS_ID, _EOS_ID = 0, 1, 2
_MAX_POSITIONS = 512
_META_FILE = "train_meta.json"


@dataclasses.dataclass(frozen=True)
class ToyModelRecipe:
    """Everything that determines the toy base model, besides the seed.

    Attributes:
      level: Countdown level name (``"easy"``: 3 numbers; ``"medium"``, ``"hard"``: 4).
      trace_mix: probability of each of :data:`TRACE_KINDS`, in that order
        (normalized; an imperfect kind a problem cannot produce falls back to
        ``correct``).
      num_train_problems: distinct training problems (the easy level has
        about 2,600 in its train split).
      num_eval_problems: test-split problems on which pass@1 is measured.
      num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads:
        decoder geometry (Qwen3 type, tied embeddings, head_dim = hidden / heads).
      steps: optimizer steps.
      batch_size: traces per step.
      learning_rate: peak of the warmup-cosine schedule.
      warmup_steps: linear warmup length.
      weight_decay: AdamW decay on matrices (not on norms).
    """

    level: str = "easy"
    trace_mix: tuple[float, ...] = (0.5, 0.15, 0.15, 0.1, 0.1)
    num_train_problems: int = 2400
    num_eval_problems: int = 256
    num_layers: int = 2
    hidden_size: int = 128
    intermediate_size: int = 384
    num_heads: int = 4
    num_kv_heads: int = 2
    steps: int = 500
    batch_size: int = 64
    learning_rate: float = 5e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01

    def __post_init__(self):
        if self.level not in COUNTDOWN_LEVELS:
            raise ValueError(
                f"ToyModelRecipe.level must be one of {sorted(COUNTDOWN_LEVELS)}, "
                f"got {self.level!r}"
            )
        if len(self.trace_mix) != len(TRACE_KINDS) or any(p < 0 for p in self.trace_mix):
            raise ValueError(
                f"ToyModelRecipe.trace_mix must be {len(TRACE_KINDS)} non-negative weights "
                f"for {TRACE_KINDS}, got {self.trace_mix!r}"
            )
        if not sum(self.trace_mix) > 0:
            raise ValueError(f"ToyModelRecipe.trace_mix must not sum to 0, got {self.trace_mix!r}")
        for name in (
            "num_train_problems",
            "num_eval_problems",
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "steps",
            "batch_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ToyModelRecipe.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"ToyModelRecipe.hidden_size={self.hidden_size} must be num_heads="
                f"{self.num_heads} times an even head width"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ToyModelRecipe.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if not self.learning_rate > 0:
            raise ValueError(
                f"ToyModelRecipe.learning_rate must be > 0, got {self.learning_rate!r}"
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"ToyModelRecipe.warmup_steps must be in [0, steps={self.steps}), "
                f"got {self.warmup_steps!r}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"ToyModelRecipe.weight_decay must be >= 0, got {self.weight_decay!r}")

    def fingerprint(self) -> str:
        """A short hash of the recipe (and the trace format version), for cache names."""
        blob = json.dumps({"version": _RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------- traces


@dataclasses.dataclass(frozen=True)
class ToyTrace:
    """One training example.

    Attributes:
      problem: the problem, numbers in the order the prompt shows them.
      kind: one of :data:`TRACE_KINDS`.
      prompt: ``countdown_prompt(problem)``.
      completion: the text after the prompt (EOS is appended at tokenization).
    """

    problem: CountdownProblem
    kind: str
    prompt: str
    completion: str


# A step combines two values: (left, op, right, result).
_Step = tuple[int, str, int, int]
# A pool entry: (value, expression, is a given number, bitmask of the given numbers it uses).
_Entry = tuple[int, str, bool, int]
# A derivation: (steps, final expression, final value, bitmask of the given numbers used).
_Path = tuple[list[_Step], str, int, int]


def _combine(a: int, b: int, op: str) -> int | None:
    """``a op b`` if it is a positive integer, else None (traces keep integer steps)."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a > b else None
    return a // b if b and a % b == 0 else None


def _wrap(entry: _Entry) -> str:
    return entry[1] if entry[2] else f"({entry[1]})"


@functools.lru_cache(maxsize=16384)
def _all_paths(numbers: tuple[int, ...]) -> list[_Path]:
    """Every derivation over ``numbers`` (callers must not mutate the cached list).

    Each step combines two values of the pool (given numbers or earlier
    results) into a positive integer, which replaces them. ``+`` and ``*``
    put the larger operand first, so commuted duplicates do not appear.
    Derivations of every length from one step up are listed.
    """
    out: list[_Path] = []

    def walk(pool: list[_Entry], steps: list[_Step]) -> None:
        for i, j in ((i, j) for i in range(len(pool)) for j in range(len(pool)) if i != j):
            a, b = pool[i][0], pool[j][0]
            for op in "+-*/":
                if op in "+*" and (a < b or (a == b and i > j)):
                    continue
                c = _combine(a, b, op)
                if c is None:
                    continue
                expr = f"{_wrap(pool[i])}{op}{_wrap(pool[j])}"
                used = pool[i][3] | pool[j][3]
                new_steps = [*steps, (a, op, b, c)]
                out.append((new_steps, expr, c, used))
                rest = [e for k, e in enumerate(pool) if k not in (i, j)]
                if rest:
                    walk([*rest, (c, expr, False, used)], new_steps)

    walk([(n, str(n), True, 1 << k) for k, n in enumerate(numbers)], [])
    return out


def _render(steps: Sequence[_Step], answer: str | None) -> str:
    lines = [f"{a}{op}{b}={c}" for a, op, b, c in steps]
    if answer is not None:
        lines.append(f"Answer: {answer}")
    return "\n".join(lines)


def _corrupt_expression(expr: str, numbers: Sequence[int], rng: np.random.Generator) -> str:
    """A plausible mis-copy of ``expr``: dropped parentheses, a changed operator or number."""
    choice = rng.integers(3)
    if choice == 0 and "(" in expr:
        return expr.replace("(", "").replace(")", "")
    if choice == 1:
        ops = [k for k, ch in enumerate(expr) if ch in "+-*/"]
        k = int(rng.choice(ops))
        new_op = str(rng.choice([o for o in "+-*/" if o != expr[k]]))
        return expr[:k] + new_op + expr[k + 1 :]
    # Replace one literal by another given number or by itself plus or minus one.
    tokens = [(m.start(), m.end()) for m in re.finditer(r"\d+", expr)]
    start, end = tokens[int(rng.integers(len(tokens)))]
    old = int(expr[start:end])
    options = sorted({*numbers, old + 1, max(old - 1, 1)} - {old})
    return expr[:start] + str(int(rng.choice(options))) + expr[end:]


def _make_trace(
    problem: CountdownProblem, kind: str, rng: np.random.Generator
) -> tuple[str, str] | None:
    """(kind, completion) of one trace, or None if ``problem`` has no solution path.

    An imperfect kind the problem cannot produce (e.g. no derivation reuses a
    number) falls back to a correct trace.
    """
    numbers, target = problem.numbers, problem.target
    # Derivations depend on the multiset only; sorting shares the cache across orders.
    paths = _all_paths(tuple(sorted(numbers)))
    solutions = [(s, e) for s, e, v, _ in paths if v == target]
    if not solutions:
        return None
    steps, expr = solutions[int(rng.integers(len(solutions)))]
    if kind == "wrong_answer":
        for _ in range(8):
            bad = _corrupt_expression(expr, numbers, rng)
            if countdown_reward(f"Answer: {bad}", list(numbers), target) == 0.0:
                return kind, _render(steps, bad)
    elif kind == "wrong_arithmetic":
        # A derivation that misses the target, whose last line claims it anyway.
        misses = [(s, e) for s, e, v, _ in paths if v != target and len(s) == len(numbers) - 1]
        if misses:
            s, e = misses[int(rng.integers(len(misses)))]
            a, op, b, _ = s[-1]
            return kind, _render([*s[:-1], (a, op, b, target)], e)
    elif kind == "reused_number":
        # Derivations over the numbers plus one more copy of one of them that use
        # every copy of it, i.e. one more than given.
        extra = numbers[int(rng.integers(len(numbers)))]
        pool = tuple(sorted((*numbers, extra)))
        copies = sum(1 << i for i, n in enumerate(pool) if n == extra)
        reused = [
            (s, e)
            for s, e, v, used in _all_paths(pool)
            if v == target and used & copies == copies and len(s) < len(numbers)
        ]
        if reused:
            s, e = reused[int(rng.integers(len(reused)))]
            return kind, _render(s, e)
    elif kind == "truncated":
        full = _render(steps, expr)
        cut = int(rng.integers(1, full.index("Answer:") + 1))
        return kind, full[:cut]
    return "correct", _render(steps, expr)


def make_toy_traces(
    problems: Sequence[CountdownProblem],
    num_traces: int,
    *,
    seed: int,
    trace_mix: Sequence[float] = ToyModelRecipe.trace_mix,
) -> list[ToyTrace]:
    """``num_traces`` training traces over ``problems``, deterministic in ``seed``.

    Problems are visited in shuffled epochs; each visit shows the numbers in a
    fresh random order and draws a trace kind from ``trace_mix`` and a
    solution path uniformly among the problem's integer derivations. Problems
    whose every solution needs a fractional or non-positive intermediate are
    skipped.

    Args:
      problems: training problems (``generate_countdown(..., split="train")``).
      num_traces: how many traces to return.
      seed: NumPy seed.
      trace_mix: weights of :data:`TRACE_KINDS`.

    Returns:
      A list of :class:`ToyTrace`. Every ``correct`` trace earns
      ``countdown_reward`` 1.0 and every other trace 0.0.
    """
    rng = np.random.default_rng([seed, 0x70E])
    probs = np.asarray(trace_mix, np.float64)
    probs = probs / probs.sum()
    traces: list[ToyTrace] = []
    solvable = list(problems)
    while len(traces) < num_traces:
        if not solvable:
            raise ValueError("make_toy_traces: no problem has an integer solution path")
        kept = []
        for idx in rng.permutation(len(solvable)):
            if len(traces) == num_traces:
                break
            base = solvable[idx]
            shown = CountdownProblem(
                tuple(int(n) for n in rng.permutation(base.numbers)), base.target
            )
            kind = TRACE_KINDS[int(rng.choice(len(TRACE_KINDS), p=probs))]
            made = _make_trace(shown, kind, rng)
            if made is None:
                continue
            kept.append(base)
            traces.append(ToyTrace(shown, made[0], countdown_prompt(shown), made[1]))
        else:
            solvable = kept
    return traces


# ----------------------------------------------------------------------------- model


def toy_base_model_dir(data_dir: str | os.PathLike, *, seed: int = 0,
                       recipe: ToyModelRecipe | None = None) -> Path:  # fmt: skip
    """Where :func:`build_toy_base_model` keeps the model for these arguments."""
    recipe = ToyModelRecipe() if recipe is None else recipe
    return Path(data_dir) / f"toy_countdown_{recipe.level}_s{seed}_{recipe.fingerprint()}"


def build_toy_base_model(
    data_dir: str | os.PathLike,
    *,
    seed: int = 0,
    recipe: ToyModelRecipe | None = None,
    rebuild: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The toy base model's checkpoint directory, trained on first use and cached.

    Trains a tiny Qwen3-type decoder on :func:`make_toy_traces` (next-token
    cross-entropy on completion tokens and EOS, AdamW with warmup-cosine
    learning rate), measures its greedy and sampled pass@1 on test-split
    problems, and writes ``config.json``, ``model.safetensors``, the toy
    tokenizer files and ``train_meta.json`` into
    :func:`toy_base_model_dir`. The directory is written under a temporary
    name and renamed when complete, so an interrupted build leaves no cache
    behind and concurrent builders agree.

    Args:
      data_dir: cache root (created if missing).
      seed: determines the problems, traces, initial weights and batch order.
      recipe: the data, model and training settings (default ``ToyModelRecipe()``).
      rebuild: train again even if a cached model exists (replacing it).
      log: called with progress lines (e.g. ``print``); silent if None.

    Returns:
      The checkpoint directory: ``load_hf_checkpoint(path)`` and
      ``AutoTokenizer.from_pretrained(path)`` both work on it.
    """
    recipe = ToyModelRecipe() if recipe is None else recipe
    out = toy_base_model_dir(data_dir, seed=seed, recipe=recipe)
    if (out / _META_FILE).is_file() and not rebuild:
        return out
    say = log or (lambda _: None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = _train(tmp, seed=seed, recipe=recipe, say=say)
        meta["path"] = str(out)
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is for every user of data_dir
        if rebuild and out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / _META_FILE).is_file():
                raise
            # Another process finished the same build first; theirs is identical.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"toy base model: {out}")
    return out


def _model_config(recipe: ToyModelRecipe, vocab_size: int):
    from erpo_jax.models import ModelConfig

    return ModelConfig(
        model_type="qwen3",
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_layers=recipe.num_layers,
        num_heads=recipe.num_heads,
        num_kv_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        tie_word_embeddings=True,
        qk_norm=True,
        max_position_embeddings=_MAX_POSITIONS,
        bos_token_id=_BOS_ID,
        eos_token_ids=(_EOS_ID,),
        pad_token_id=_PAD_ID,
    )


def _encode_traces(tokenizer: Any, traces: Sequence[ToyTrace]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``[N, L]`` token ids and a loss mask that is True on completion + EOS."""
    prompts = tokenizer.encode_batch([t.prompt for t in traces])
    completions = tokenizer.encode_batch([t.completion for t in traces], add_special_tokens=False)
    rows = [(p.ids, [*c.ids, _EOS_ID]) for p, c in zip(prompts, completions, strict=True)]
    length = max(len(p) + len(c) for p, c in rows)
    length = -(-length // 8) * 8
    tokens = np.full((len(rows), length), _PAD_ID, np.int32)
    loss_mask = np.zeros((len(rows), length), bool)
    for i, (p, c) in enumerate(rows):
        tokens[i, : len(p) + len(c)] = p + c
        loss_mask[i, len(p) : len(p) + len(c)] = True
    return tokens, loss_mask


def _make_train_step(graphdef: Any, tx: Any) -> Callable:
    """A jitted ``(params, opt_state, tokens, loss_mask) -> (params, opt_state, loss)``."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    def loss_fn(params, tokens, loss_mask):
        model = nnx.merge(graphdef, params)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        # Right padding: positions count from the first token, as for a left-padded prompt.
        logits = model(inputs, inputs != _PAD_ID)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        mask = loss_mask[:, 1:]
        return -jnp.sum(jnp.where(mask, logp, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

    def step(params, opt_state, tokens, loss_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, loss_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _train(
    out: Path, *, seed: int, recipe: ToyModelRecipe, say: Callable[[str], None]
) -> dict[str, Any]:
    """Trains into ``out`` (checkpoint + tokenizer) and returns the metadata dict."""
    import jax
    from flax import nnx
    from tokenizers import Tokenizer

    from erpo_jax.models import Decoder, save_hf_checkpoint
    from erpo_jax.train._config import OptimizerConfig
    from erpo_jax.train._metrics import MetricsWriter
    from erpo_jax.train._step import make_optimizer

    start = time.perf_counter()
    build_countdown_tokenizer(out, model_max_length=_MAX_POSITIONS)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size()

    problems = generate_countdown(
        recipe.num_train_problems, seed=seed, split="train", level=recipe.level
    )
    traces = make_toy_traces(
        problems, recipe.steps * recipe.batch_size, seed=seed, trace_mix=recipe.trace_mix
    )
    tokens, loss_mask = _encode_traces(tokenizer, traces)
    kinds = {k: sum(t.kind == k for t in traces) / len(traces) for k in TRACE_KINDS}
    say(f"{len(traces)} traces of length <= {tokens.shape[1]}; mix {kinds}")

    config = _model_config(recipe, vocab_size)
    model = Decoder(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    # The trainer's optimizer: warmup + cosine to 5% of the peak, AdamW without
    # decay on norms, global-norm clipping at 1.
    opt_cfg = OptimizerConfig(
        learning_rate=recipe.learning_rate,
        schedule="cosine",
        warmup_steps=recipe.warmup_steps,
        min_lr_ratio=0.05,
        weight_decay=recipe.weight_decay,
        b2=0.98,
        max_grad_norm=1.0,
    )
    tx, _ = make_optimizer(opt_cfg, recipe.steps, params)
    opt_state = tx.init(params)
    train_step = _make_train_step(graphdef, tx)
    data_time = time.perf_counter() - start

    losses = []
    for step in range(recipe.steps):
        rows = slice(step * recipe.batch_size, (step + 1) * recipe.batch_size)
        params, opt_state, loss = train_step(params, opt_state, tokens[rows], loss_mask[rows])
        losses.append(loss)
        if (step + 1) % max(recipe.steps // 10, 1) == 0 or step + 1 == recipe.steps:
            say(f"step {step + 1}/{recipe.steps} loss {float(loss):.4f} "
                f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    losses_host = [float(x) for x in jax.device_get(losses)]
    writer = MetricsWriter(out, tensorboard=False)  # the SFT curve, beside the weights
    for step, value in enumerate(losses_host):
        writer.write(step, {"sft_loss": value})
    writer.close()
    train_time = time.perf_counter() - start - data_time

    eval_problems = generate_countdown(
        recipe.num_eval_problems, seed=seed, split="test", level=recipe.level
    )
    completion_len = int(loss_mask.sum(axis=1).max())
    max_new_tokens = -(-(completion_len + 8) // 16) * 16
    # The library's evaluation (the real sampler): greedy and one T=1 sample per problem.
    from erpo_jax.rollout import evaluate

    result = evaluate(
        (graphdef, params), tokenizer, eval_problems, task="countdown", num_samples=1,
        temperature=1.0, max_new_tokens=max_new_tokens, batch_size=64, key=seed,
        greedy=True, eos_ids=[_EOS_ID], progress=False,
    )  # fmt: skip
    greedy = float(result.summary["pass_at_1_greedy"])
    sampled = float(result.summary["pass_at_1_sampled"])
    greedy_samples = [x.completion for x in result.samples if x.kind == "greedy"]
    say(f"pass@1 on {len(eval_problems)} test problems: greedy {greedy:.3f}, "
        f"sampled (T=1) {sampled:.3f}")  # fmt: skip

    save_hf_checkpoint(nnx.merge(graphdef, params), config, out)
    tail = losses_host[-max(len(losses_host) // 20, 1) :]
    return {
        "seed": seed,
        "recipe": dataclasses.asdict(recipe),
        "recipe_fingerprint": recipe.fingerprint(),
        "num_params": config.num_params,
        "num_traces": len(traces),
        "trace_kinds": kinds,
        "steps": recipe.steps,
        "first_loss": losses_host[0],
        "final_loss": float(np.mean(tail)),
        "eval_split": "test",
        "eval_problems": len(eval_problems),
        "max_new_tokens": max_new_tokens,
        "pass_at_1_greedy": greedy,
        "pass_at_1_sampled": sampled,
        "greedy_examples": [
            {"prompt": countdown_prompt(p), "completion": c}
            for p, c in zip(eval_problems[:8], greedy_samples[:8], strict=True)
        ],
        "data_seconds": round(data_time, 2),
        "train_seconds": round(train_time, 2),
        "wall_seconds": round(time.perf_counter() - start, 2),
        "special_tokens": COUNTDOWN_SPECIAL_TOKENS,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }
