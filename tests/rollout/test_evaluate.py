"""``erpo_jax.rollout.evaluate`` and ``erpo-jax eval`` on a tiny random model with the Countdown tokenizer.

Metrics are recomputed from the per-sample records with plain Python (the
closed-form binomial pass@k, a hand-written majority vote), so the summary
cannot drift from what was sampled. Every sampling call uses the same shapes
(batch of 2 prompts, 4 samples, 12 new tokens) so the sampler compiles once
per prompt-length bucket for the whole module.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from erpo_jax.cli import main
from erpo_jax.models import (
    Decoder,
    ModelConfig,
    load_hf_checkpoint,
    load_tokenizer,
    save_hf_checkpoint,
)
from erpo_jax.rollout import EvalResult, evaluate
from erpo_jax.tasks import (
    CountdownProblem,
    build_countdown_tokenizer,
    countdown_prompt,
    countdown_reward,
    generate_countdown,
    load_math_file,
    make_task,
)

DATA = Path(__file__).resolve().parents[1] / "data"
VOCAB = 100  # the Countdown character tokenizer
T = 12
N = 4
BATCH = 2
# Extra end ids (characters this model samples ~10% of the time), so completions
# come in many lengths, some finished and some truncated.
EOS_IDS = (2, 52, 74)

CONFIG = ModelConfig(
    "qwen3",
    VOCAB,
    32,
    64,
    2,
    4,
    2,
    8,
    qk_norm=True,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_ids=(2,),
    pad_token_id=0,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random decoder saved as a HF directory with the Countdown tokenizer."""
    path = tmp_path_factory.mktemp("tiny_countdown")
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    # Peaked logits (std ~2.8): samples differ from greedy but are not uniform noise.
    model.lm_head.set_value(jnp.asarray(rng.normal(0.0, 0.5, (32, VOCAB)), jnp.float32))
    save_hf_checkpoint(model, CONFIG, path)
    build_countdown_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, _ = load_hf_checkpoint(checkpoint)
    return model, load_tokenizer(checkpoint)


def _run(loaded, problems, **kw) -> EvalResult:
    model, tokenizer = loaded
    kw = {
        "num_samples": N,
        "max_new_tokens": T,
        "batch_size": BATCH,
        "key": 0,
        "eos_ids": EOS_IDS,
        "progress": False,
        **kw,
    }
    return evaluate(model, tokenizer, problems, **kw)


def _pass_at_k_closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _majority_correct(answers, correct, k) -> float:
    votes = [("".join(a.split()) if a is not None else None) for a in answers[:k]]
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    winner = next(i for i, v in enumerate(votes) if v is not None and counts[v] == top)
    return float(correct[winner])


def _check_consistent(result: EvalResult, problems, n: int) -> None:
    s, records = result.summary, result.samples
    p = len(problems)
    greedy = [r for r in records if r.kind == "greedy"]
    sampled = [r for r in records if r.kind == "sampled"]
    assert len(greedy) == p and len(sampled) == p * n
    assert [(r.problem_index, r.kind, r.sample_index) for r in records] == [
        (i, kind, j)
        for i in range(p)
        for kind, j in [("greedy", 0)] + [("sampled", g) for g in range(n)]
    ]
    assert s["num_problems"] == p and s["num_samples"] == n
    assert s["pass_at_1_greedy"] == pytest.approx(sum(r.reward for r in greedy) / p)
    assert s["pass_at_1_sampled"] == pytest.approx(sum(r.reward for r in sampled) / (p * n))
    for k in range(1, n + 1):
        per_problem = []
        majority = []
        for i in range(p):
            rows = [r for r in sampled if r.problem_index == i]
            c = sum(r.reward >= 1.0 for r in rows)
            per_problem.append(_pass_at_k_closed_form(n, c, k))
            majority.append(
                _majority_correct([r.answer for r in rows], [r.reward >= 1.0 for r in rows], k)
            )
        assert s["pass_at_k"][str(k)] == pytest.approx(sum(per_problem) / p, abs=1e-9)
        assert s["maj_at_k"][str(k)] == pytest.approx(sum(majority) / p, abs=1e-9)
    assert s["pass_at_k"]["1"] == pytest.approx(s["pass_at_1_sampled"])
    assert s["mean_response_length"] == pytest.approx(sum(r.length for r in sampled) / (p * n))
    tokens = sum(r.length for r in sampled)
    assert s["mean_token_entropy"] == pytest.approx(
        sum(r.mean_entropy * r.length for r in sampled) / tokens, rel=1e-5
    )
    assert s["truncated_frac"] == pytest.approx(sum(r.truncated for r in sampled) / (p * n))
    assert s["greedy"]["truncated_frac"] == pytest.approx(sum(r.truncated for r in greedy) / p)
    for r in records:
        assert 1 <= r.length <= T
        assert r.mean_entropy >= 0.0
        if r.truncated:
            assert r.length == T  # only a full budget can be truncated
    json.dumps(s)  # JSON-able


def test_countdown_metrics_match_records(loaded):
    problems = generate_countdown(5, seed=0, split="test", level="easy")  # 5: last batch padded
    result = _run(loaded, problems)
    _check_consistent(result, problems, N)
    for r in result.samples:
        prob = problems[r.problem_index]
        assert r.prompt == countdown_prompt(prob)
        assert r.reference == str(prob.target)
        assert r.reward == countdown_reward(r.completion, list(prob.numbers), prob.target)
    lengths = {r.length for r in result.samples}
    truncated = {r.truncated for r in result.samples}
    # The fixture's end ids give both finished and truncated completions.
    assert len(lengths) > 2 and truncated == {True, False}


def test_partial_rewards_and_batch_size_invariance(loaded):
    """A reward that depends on the completion gives non-trivial pass@k / maj@k; the
    completions do not depend on the batching (keys are per problem)."""
    problems = generate_countdown(4, seed=1, split="test", level="easy")

    def reward_fn(completion, problem):
        return float(len(completion) % 2 == 0)

    result = _run(loaded, problems, reward_fn=reward_fn)
    _check_consistent(result, problems, N)
    rewards = [r.reward for r in result.samples]
    assert 0 < sum(rewards) < len(rewards)
    # Same completions with batches of 4 prompts (another compile, but small).
    other = _run(loaded, problems, reward_fn=reward_fn, batch_size=4, greedy=False)
    sampled = [
        (r.problem_index, r.sample_index, r.completion)
        for r in result.samples
        if r.kind == "sampled"
    ]
    assert sampled == [(r.problem_index, r.sample_index, r.completion) for r in other.samples]


@pytest.mark.parametrize("value", [1.0, 0.0])
def test_constant_reward_gives_constant_pass_at_k(loaded, value):
    problems = generate_countdown(3, seed=2, split="test", level="easy")
    s = _run(loaded, problems, reward_fn=lambda completion, problem: value).summary
    assert s["pass_at_1_greedy"] == value and s["pass_at_1_sampled"] == value
    assert s["pass_at_k"] == {str(k): value for k in range(1, N + 1)}
    if value == 0.0:
        assert s["maj_at_k"] == {str(k): 0.0 for k in range(1, N + 1)}


# The shipped file has one malformed row on purpose (the loader tests count it).
@pytest.mark.filterwarnings("ignore::erpo_jax.tasks.MalformedRowWarning")
def test_math_path_plumbing_and_verifier_stats(loaded):
    loaded_problems = load_math_file(DATA / "math500_sample.jsonl")
    problems = list(loaded_problems)[:3]
    result = _run(loaded, problems, num_samples=N)
    _check_consistent(result, problems, N)
    s = result.summary
    assert s["task"] == "math"
    verifier = s["verifier"]
    assert verifier["num_scored"] == len(problems) * (1 + N)
    assert verifier["num_timeouts"] == 0 and verifier["num_errors"] == 0
    for r in result.samples:
        prob = problems[r.problem_index]
        assert r.reference == prob.answer and r.source == prob.source
        assert prob.problem in r.prompt and "\\boxed{}" in r.prompt
        assert r.reward in (0.0, 1.0)


def test_evaluate_argument_errors(loaded):
    model, tokenizer = loaded
    problems = generate_countdown(2, seed=0, split="test", level="easy")
    with pytest.raises(ValueError, match="problems is empty"):
        evaluate(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match=r"unknown task 'chess'.*countdown, math"):
        evaluate(model, tokenizer, problems, task="chess", progress=False)
    with pytest.raises(ValueError, match=r"task='math' needs MathProblem.*problems\[0\]"):
        evaluate(model, tokenizer, problems, task="math", progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(model, tokenizer, problems, num_samples=-1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, tokenizer, problems, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="greedy=False with num_samples=0"):
        evaluate(model, tokenizer, problems, greedy=False, num_samples=0, progress=False)


def _cli_args(checkpoint, out, *extra):
    return [
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--n-problems",
        "3",
        "--num-samples",
        str(N),
        "--max-new-tokens",
        str(T),
        "--batch-size",
        str(BATCH),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_cli_writes_summary_and_samples(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(_cli_args(checkpoint, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * (1 + N)
    assert summary["checkpoint"] == str(checkpoint) and summary["task"] == "countdown"
    assert set(summary["pass_at_k"]) == {str(k) for k in range(1, N + 1)}
    assert summary["max_new_tokens"] == T
    assert set(rows[0]) >= {"prompt", "completion", "reward", "answer", "length", "truncated"}
    printed = json.loads(capsys.readouterr().out)
    assert printed == summary


def test_cli_countdown_data_file(checkpoint, tmp_path, capsys):
    data = tmp_path / "cd.jsonl"
    assert main(["countdown", "--n", "3", "--split", "test", "--out", str(data)]) == 0
    with data.open("a") as f:
        f.write('{"numbers": "oops"}\n')
    out = tmp_path / "eval"
    with pytest.warns(UserWarning, match="malformed Countdown rows"):
        assert main(_cli_args(checkpoint, out, "--data", str(data))) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    prompts = {r["prompt"] for r in rows}
    expected = [json.loads(line) for line in data.read_text().splitlines()[:3]]
    assert prompts == {
        countdown_prompt(CountdownProblem(tuple(e["numbers"]), e["target"])) for e in expected
    }


def _cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_cli_errors_exit_2_and_name_the_argument(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "never")
    err = _cli_error(["eval", "--checkpoint", str(tmp_path / "missing"), "--out", out], capsys)
    assert "--checkpoint" in err and "not a directory" in err
    (tmp_path / "empty").mkdir()
    err = _cli_error(["eval", "--checkpoint", str(tmp_path / "empty"), "--out", out], capsys)
    assert "--checkpoint" in err and "config.json" in err
    err = _cli_error(["eval", "--checkpoint", str(checkpoint), "--task", "chess"], capsys)
    assert "--task 'chess'" in err and "countdown, math" in err
    err = _cli_error(["eval", "--checkpoint", str(checkpoint), "--task", "math"], capsys)
    assert "--data is required for --task math" in err
    err = _cli_error(
        ["eval", "--checkpoint", str(checkpoint), "--task", "math", "--data", str(tmp_path / "x")],
        capsys,
    )
    assert "--data" in err and "does not exist" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?"}\nnot json\n')
    with pytest.warns(UserWarning):
        err = _cli_error(
            ["eval", "--checkpoint", str(checkpoint), "--task", "math", "--data", str(bad)], capsys
        )
    assert "--data" in err and "no usable problems" in err and "2 malformed rows" in err
    err = _cli_error(["eval", "--checkpoint", str(checkpoint), "--num-samples", "-1"], capsys)
    assert "--num-samples must be >= 0" in err
    err = _cli_error(["eval", "--checkpoint", str(checkpoint), "--level", "epic"], capsys)
    assert "--level 'epic'" in err and "easy" in err
    assert not Path(out).exists()


@pytest.mark.slow
def test_cli_default_toy_model(tmp_path, capsys):
    """The default (no --checkpoint): builds the toy base model on first use, then evaluates."""
    out = tmp_path / "eval"
    argv = ["eval", "--data-dir", str(tmp_path / "toy"), "--n-problems", "32"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "countdown" and summary["num_problems"] == 32
    assert 0.0 < summary["pass_at_k"]["8"] <= 1.0


# ------------------------------------------------------------------ long prompts, partial results


def _prompt_lengths(tokenizer, problems):
    from erpo_jax.rollout import encode_prompts

    task = make_task("countdown")
    return [
        int(encode_prompts(task, tokenizer, [p], pad_id=0, bucket=False)[1].sum()) for p in problems
    ]


def test_long_prompts_are_skipped_counted_and_keep_their_numbers(loaded):
    from erpo_jax.rollout import LongPromptWarning

    _model, tokenizer = loaded
    problems = [
        CountdownProblem((3, 4), 7),
        CountdownProblem((11, 22, 33, 44, 55, 66, 77, 88), 1234),  # a much longer prompt
        CountdownProblem((5, 6), 11),
    ]
    from erpo_jax.rollout import split_long_prompts

    lengths = _prompt_lengths(tokenizer, problems)
    budget = max(lengths[0], lengths[2])
    assert lengths[1] > budget

    assert split_long_prompts(make_task("countdown"), tokenizer, problems, budget) == ([0, 2], [1])
    with pytest.warns(LongPromptWarning, match=r"skipped 1 of 3 problems .* \[1\]"):
        result = _run(loaded, problems, max_prompt_tokens=budget)
    assert result.summary["skipped_long_prompts"] == 1
    assert result.summary["num_problems"] == 2 and result.summary["max_prompt_tokens"] == budget
    assert sorted({r.problem_index for r in result.samples}) == [0, 2]
    # A problem's completions depend on its own index, not on which others were skipped.
    full = _run(loaded, problems)
    assert full.summary["skipped_long_prompts"] == 0
    for index in (0, 2):
        assert [r.completion for r in result.samples if r.problem_index == index] == [
            r.completion for r in full.samples if r.problem_index == index
        ]
    with pytest.raises(ValueError, match=r"every one of the 3 prompts is longer than .* 3 tokens"):
        _run(loaded, problems, max_prompt_tokens=3)
    with pytest.raises(ValueError, match="max_prompt_tokens must be an int >= 1"):
        _run(loaded, problems, max_prompt_tokens=0)
    # The default budget is the context minus the completion budget (512 - 12 here).
    assert full.summary["max_prompt_tokens"] == 512 - T


def test_samples_are_written_as_they_are_scored(loaded, tmp_path):
    """An evaluation interrupted after its first batch leaves that batch's records on disk."""
    problems = generate_countdown(4, seed=3, split="test", level="easy")
    calls = []
    reward = make_task("countdown").reward

    def reward_then_interrupt(completion, problem):
        calls.append(problem)
        if len(calls) > BATCH:  # the second batch of greedy completions
            raise KeyboardInterrupt
        return reward(completion, problem)

    path = tmp_path / "partial" / "samples.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _run(loaded, problems, reward_fn=reward_then_interrupt, samples_path=path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["problem_index"], r["kind"]) for r in rows] == [(0, "greedy"), (1, "greedy")]
    # An evaluation that finishes streams every record, the same ones it returns.
    result = _run(loaded, problems, samples_path=path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(json.dumps(r, sort_keys=True) for r in rows) == sorted(
        json.dumps(r.to_json(), sort_keys=True) for r in result.samples
    )


def test_evaluate_on_a_mesh_gives_the_same_samples(loaded):
    """``mesh=`` shards each sampler call's rows (here over one device, so the
    sharded sampler path runs in-process); a phase whose rows do not divide over
    the row axes samples unsharded. Same completions either way."""
    import jax
    from jax.sharding import AbstractMesh

    from erpo_jax.rollout._evaluate import _rows_divide
    from erpo_jax.train import MeshConfig, make_mesh

    two_by_four = AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor"))
    assert _rows_divide(two_by_four, 16) and not _rows_divide(two_by_four, 12)
    assert not _rows_divide(None, 16)
    problems = generate_countdown(3, seed=2, split="test", level="easy")
    plain = _run(loaded, problems)
    sharded = _run(loaded, problems, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    key = lambda r: (r.kind, r.problem_index, r.sample_index, r.completion, r.reward)
    assert [key(r) for r in sharded.samples] == [key(r) for r in plain.samples]
    for field in ("pass_at_1_greedy", "pass_at_1_sampled", "pass_at_k"):
        assert sharded.summary[field] == plain.summary[field], field


def test_generate_with_decode_phases_matches_one_loop_with_and_without_stop_strings(loaded):
    """rollout.decode_phases reaches the sampler through SamplingOptions: the same
    rollout as one decode loop, with the task's stop strings too."""
    from erpo_jax.rollout import SamplingOptions, generate, problem_keys

    model, tokenizer = loaded
    problems = generate_countdown(2, seed=3)
    kw = dict(group_size=2, eos_ids=EOS_IDS, pad_id=0)
    keys = problem_keys(jax.random.key(0), [0, 1])
    for task in (make_task("countdown"), make_task("countdown", stop_strings=("=",))):
        one = generate(model, tokenizer, task, problems, keys,
                       options=SamplingOptions(max_new_tokens=T), **kw)  # fmt: skip
        phased = generate(model, tokenizer, task, problems, keys,
                          options=SamplingOptions(max_new_tokens=T, decode_phases=3), **kw)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(phased.tokens), np.asarray(one.tokens))
        np.testing.assert_array_equal(np.asarray(phased.mask), np.asarray(one.mask))
        assert phased.texts == one.texts
