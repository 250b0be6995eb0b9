"""The toy base model: trace generator, a micro training run, the cache, the accuracy band."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from toy_micro import MICRO

from erpo_jax.tasks import countdown_prompt, countdown_reward, generate_countdown
from erpo_jax.train import _toy_model as toy_model
from erpo_jax.train._toy_model import (
    TRACE_KINDS,
    ToyModelRecipe,
    build_toy_base_model,
    make_toy_traces,
    toy_base_model_dir,
)


@pytest.fixture(scope="module")
def problems():
    return generate_countdown(200, seed=0, split="train", level="easy")


def test_traces_are_deterministic_in_the_seed(problems):
    a = make_toy_traces(problems, 300, seed=3)
    b = make_toy_traces(problems, 300, seed=3)
    c = make_toy_traces(problems, 300, seed=4)
    assert a == b
    assert a != c
    assert len(a) == 300


def test_only_correct_traces_earn_reward(problems):
    traces = make_toy_traces(problems, 600, seed=0)
    for t in traces:
        assert t.prompt == countdown_prompt(t.problem)
        reward = countdown_reward(t.completion, list(t.problem.numbers), t.problem.target)
        assert reward == (1.0 if t.kind == "correct" else 0.0), t
        assert "<" not in t.completion  # no special tokens in the text
    kinds = Counter(t.kind for t in traces)
    assert set(kinds) == set(TRACE_KINDS)
    # Default mix 0.5 correct; imperfect kinds a problem cannot produce fall back to it.
    assert 0.45 < kinds["correct"] / len(traces) < 0.7


def test_trace_mix_selects_kinds(problems):
    only_correct = make_toy_traces(problems, 100, seed=0, trace_mix=(1, 0, 0, 0, 0))
    assert {t.kind for t in only_correct} == {"correct"}
    truncated = make_toy_traces(problems, 100, seed=0, trace_mix=(0, 0, 0, 0, 1))
    assert {t.kind for t in truncated} == {"truncated"}
    assert all("Answer:" not in t.completion for t in truncated)


def test_correct_traces_use_several_paths():
    # (6 4 2 -> 12) has several integer derivations; correct traces should show more than one.
    from erpo_jax.tasks import CountdownProblem

    problem = CountdownProblem((6, 4, 2), 12)
    traces = make_toy_traces([problem], 40, seed=0, trace_mix=(1, 0, 0, 0, 0))
    answers = {t.completion.rsplit("Answer: ", 1)[1] for t in traces}
    assert len(answers) >= 3, answers


@pytest.mark.parametrize(
    ("field", "value"),
    [("level", "trivial"), ("steps", 0), ("trace_mix", (1, 0)), ("num_heads", 3),
     ("warmup_steps", 10_000), ("learning_rate", 0.0)],
)  # fmt: skip
def test_recipe_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ToyModelRecipe(**{field: value})


def test_fingerprint_depends_on_the_recipe():
    assert ToyModelRecipe().fingerprint() == ToyModelRecipe().fingerprint()
    assert ToyModelRecipe().fingerprint() != ToyModelRecipe(steps=601).fingerprint()
    assert toy_base_model_dir("d", seed=0) != toy_base_model_dir("d", seed=1)


@pytest.fixture(scope="module")
def micro_build(tmp_path_factory):
    return build_toy_base_model(tmp_path_factory.mktemp("toy"), seed=0, recipe=MICRO)


def test_micro_build_trains_and_writes_a_loadable_checkpoint(micro_build):
    from erpo_jax.models import load_hf_checkpoint, load_tokenizer

    path = micro_build
    assert path == toy_base_model_dir(path.parent, seed=0, recipe=MICRO)
    meta = json.loads((path / "train_meta.json").read_text())
    assert meta["seed"] == 0 and meta["steps"] == MICRO.steps
    assert meta["final_loss"] < 0.7 * meta["first_loss"]
    assert 0.0 <= meta["pass_at_1_greedy"] <= 1.0
    assert meta["recipe"]["hidden_size"] == 32

    model, config = load_hf_checkpoint(path)
    tokenizer = load_tokenizer(path)
    assert config.vocab_size == len(tokenizer) == 100
    assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (1, (2,), 0)
    assert tokenizer.eos_token_id == 2 and tokenizer.padding_side == "left"
    batch = tokenizer(["Numbers: 1 2 3\nTarget: 6\n", "Numbers: 10 9 8\nTarget: 7\n"],
                      padding=True, return_tensors="np")  # fmt: skip
    logits = model(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (*batch["input_ids"].shape, 100)
    assert np.isfinite(np.asarray(logits)).all()
    # No temporary build directory is left behind.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_second_call_reuses_the_cache(micro_build, monkeypatch):
    before = (micro_build / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("retrained although a cached model exists")

    monkeypatch.setattr(toy_model, "_train", fail)
    assert build_toy_base_model(micro_build.parent, seed=0, recipe=MICRO) == micro_build
    assert (micro_build / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow  # a second build (~40 s on 2 cores)
def test_build_is_deterministic_for_a_seed(micro_build, tmp_path):
    again = build_toy_base_model(tmp_path, seed=0, recipe=MICRO)
    assert (again / "model.safetensors").read_bytes() == (
        micro_build / "model.safetensors"
    ).read_bytes()
    for name in ("config.json", "tokenizer.json"):
        assert (again / name).read_text() == (micro_build / name).read_text()


@pytest.mark.slow
def test_default_build_is_in_the_accuracy_band(tmp_path):
    path = build_toy_base_model(tmp_path, seed=0)
    meta = json.loads((path / "train_meta.json").read_text())
    assert 0.10 <= meta["pass_at_1_greedy"] <= 0.60, meta
