"""The jitted train step: exact micro-batching, the shared scoring forward, losses by name."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from erpo_jax.losses import progress_signal
from erpo_jax.models import Decoder, ModelConfig, add_lora
from erpo_jax.train import (
    AUTO_MICRO_TOKENS,
    LOSS_NAMES,
    LossConfig,
    OptimizerConfig,
    load_config,
    make_loss_fn,
    make_optimizer,
    make_score_fn,
    make_update_fn,
    resolve_micro_batches,
    split_policy,
)

CONFIG = ModelConfig(
    "qwen3",
    40,
    32,
    64,
    2,
    4,
    2,
    8,
    qk_norm=True,
    max_position_embeddings=64,
    eos_token_ids=(2,),
    pad_token_id=0,
)
P, G, S, T = 4, 4, 4, 6


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    b = P * G
    prompt = rng.integers(3, 40, (b, S)).astype(np.int32)
    pmask = np.ones((b, S), bool)
    pmask[::3, :2] = False  # some left padding
    lengths = rng.integers(1, T + 1, b)
    mask = np.arange(T)[None] < lengths[:, None]
    tokens = np.where(mask, rng.integers(3, 40, (b, T)), 0).astype(np.int32)
    rewards = rng.integers(0, 2, (P, G)).astype(np.float32)
    rewards[1] = 1.0  # an all-equal group
    entropy = rng.gamma(1.5, 0.8, (b, T)).astype(np.float32)
    return {
        "prompt_tokens": prompt,
        "prompt_mask": pmask,
        "tokens": tokens,
        "mask": mask,
        "rewards": rewards,
        "entropy": entropy,
    }


def _setup(name, *, lora=False, micro=1, sgd=False, row_shards=1, group_size=1,
           old_from_forward=False, **loss_kw):  # fmt: skip
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    if lora:
        add_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
        # Non-zero B so the adapter moves the hidden state (ARCA's credit).
        model.layers.q_proj_lora_b.set_value(jnp.full(model.layers.q_proj_lora_b.shape, 0.05))
    graphdef, trainable, frozen = split_policy(model, lora=lora)
    cfg = LossConfig(name=name, **loss_kw)
    if sgd:
        # Plain SGD with lr 1: the parameter change is the gradient itself, so
        # comparing parameters compares gradients (Adam's normalization would
        # amplify float32 noise on near-zero gradient entries).
        tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    else:
        tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-2), 10, trainable)
    loss_fn = make_loss_fn(cfg, max_len=T, total_steps=10)
    update = make_update_fn(
        graphdef,
        tx,
        schedule,
        loss_fn,
        cfg,
        micro_batches=micro,
        max_len=T,
        temperature=1.0,
        chunk_size=None,
        vocab_chunk_size=None,
        arca=name == "arca",
        row_shards=row_shards,
        group_size=group_size,
        old_from_forward=old_from_forward,
    )
    score = make_score_fn(graphdef, temperature=1.0, chunk_size=8, vocab_chunk_size=None)
    return graphdef, trainable, frozen, tx, update, score, cfg


def _full_batch(trainable, frozen, score, cfg):
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    logp, _ = score(trainable, frozen, batch, True)
    batch["old_logp"] = logp - 0.05 * jnp.asarray(
        np.random.default_rng(1).normal(size=logp.shape), jnp.float32
    )
    batch["ref_logp"] = logp + 0.1
    if cfg.name == "entropy_top20":
        from erpo_jax.losses import high_entropy_mask

        batch["token_keep"] = high_entropy_mask(batch["entropy"], batch["mask"], top_fraction=0.2)
    return batch


# Three losses cover the three aggregation paths (token mean with group
# statistics, sequence-level rows, the GRPO family); the rest are `slow`.
_FAST = ("erpo", "grpo")


@pytest.mark.parametrize(
    "name", [n if n in _FAST else pytest.param(n, marks=pytest.mark.slow) for n in LOSS_NAMES]
)
def test_micro_batches_reproduce_the_full_batch_update(name):
    kw = {"kl_coef": 0.04} if name == "grpo" else {}
    results = []
    # (micro-batches, row shards): contiguous micro-batches, and micro-batches
    # that take a slice of each of 2 row shards' groups (a different grouping).
    for micro, shards in ((1, 1), (4, 1), (2, 2)):
        _, trainable, frozen, tx, update, score, cfg = _setup(
            name, lora=name == "arca", micro=micro, sgd=True, row_shards=shards, **kw
        )
        batch = _full_batch(trainable, frozen, score, cfg)
        state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0)}
        state, metrics = update(state, frozen, batch)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), state["params"]))
    (l1, g1, p1) = results[0]
    assert abs(l1) > 1e-6 and g1 > 1e-6  # a real signal, not a vacuous match
    for loss, gnorm, params in results[1:]:
        assert loss == pytest.approx(l1, rel=1e-5, abs=1e-7)
        assert gnorm == pytest.approx(g1, rel=1e-5)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params), strict=True):
            # float32 sums in a different order: 1e-5 of the largest gradient entry.
            scale = float(np.abs(np.asarray(a)).max())
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale + 1e-9
            )


@pytest.mark.parametrize(
    ("name", "group_size", "micro", "width"),
    [("erpo", 1, 1, 4), ("dr_grpo", 1, 1, 4), ("erpo", G, 2, 1)],
    ids=["erpo", "dr_grpo", "erpo-shared-prompts-micro2-width1"],
)
def test_update_on_completions_cut_to_their_longest_equals_the_full_width(
    name, group_size, micro, width
):
    """The loop's train.length_buckets cut: dropping columns that are padding in
    every row changes neither the loss (Dr. GRPO's normalizer stays the
    budget T), the gradient nor the parameters; also with shared prompts,
    micro-batches and one-token completions (a one-column cut)."""
    _, trainable, frozen, tx, update, score, cfg = _setup(
        name, sgd=True, group_size=group_size, micro=micro
    )
    batch = _full_batch(trainable, frozen, score, cfg)
    batch["mask"] = batch["mask"].at[:, width:].set(False)
    batch["mask"] = batch["mask"].at[0, :width].set(True)  # one row fills every kept column
    batch["tokens"] = jnp.where(batch["mask"], batch["tokens"], 0)
    cut = {k: v[:, :width] if v.ndim == 2 and v.shape[1] == T else v for k, v in batch.items()}
    assert cut["tokens"].shape == (P * G, width) and cut["rewards"].shape == (P, G)
    results = []
    for b in (batch, cut):
        params = jax.tree.map(jnp.copy, trainable)  # the update donates its state
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
        state, metrics = update(state, frozen, b)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), state["params"]))
    (l1, g1, p1), (l2, g2, p2) = results
    assert abs(l1) > 1e-6 and g1 > 1e-6
    assert l2 == pytest.approx(l1, rel=1e-5, abs=1e-7) and g2 == pytest.approx(g1, rel=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale + 1e-9)


@pytest.mark.parametrize(
    ("last_used", "budget", "buckets", "want"),
    [
        (34, 48, 8, 36),  # quantum 6: 34 -> 36
        (36, 48, 8, 36),
        (48, 48, 8, 48),
        (None, 48, 8, 6),  # every row empty: one quantum
        (34, 48, 1, 48),  # one bucket: always the budget
        (9, 10, 3, 10),  # quantum ceil(10 / 3) = 4: 9 -> 12, capped at the budget
        (3, 10, 10, 3),
    ],
)
def test_completion_width(last_used, budget, buckets, want):
    from erpo_jax.train._loop import completion_width

    mask = np.zeros((3, budget), bool)
    if last_used is not None:
        mask[1, :last_used] = True
        mask[2, :2] = True
    assert completion_width(mask, budget, buckets) == want


def test_completion_width_takes_the_longest_over_all_processes(monkeypatch):
    """Every process must cut to the same width (the arrays form one global
    batch): a peer whose longest completion is 40 sets the width here too."""
    from erpo_jax.sampling import _hosts
    from erpo_jax.train._loop import completion_width

    mask = np.zeros((2, 48), bool)
    mask[0, :10] = True
    monkeypatch.setattr(_hosts, "global_max", lambda v: max(v, 40))
    assert completion_width(mask, 48, 4) == 48  # 40 -> the next multiple of 12
    monkeypatch.setattr(_hosts, "global_max", lambda v: max(v, 5))
    assert completion_width(mask, 48, 4) == 12  # this process's 10 is the longest


def test_step_zero_progress_signal_is_exactly_zero():
    """old_logp (recomputed) and ref_logp go through one compiled forward: equal bit for bit."""
    _, trainable, frozen, _, _, score, _ = _setup("erpo")
    ref = jax.tree.map(jnp.copy, trainable)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    old, _ = score(trainable, frozen, batch, True)
    ref_logp, _ = score(ref, frozen, batch, True)
    s = progress_signal(old, ref_logp, batch["mask"], beta=0.1)
    assert np.array_equal(np.asarray(old), np.asarray(ref_logp))
    assert float(jnp.max(jnp.abs(s))) == 0.0


def test_score_without_entropy_gives_the_same_logp_and_no_entropy():
    """make_score_fn(entropy=False) (the trainer's old/reference scoring) returns the
    log-probs the full scorer returns, bit for bit, and None for the entropy; the
    full scorer's entropy is the NumPy softmax entropy of the model's logits."""
    graphdef, trainable, frozen, _, _, score, _ = _setup("erpo")
    lean = make_score_fn(graphdef, temperature=1.0, chunk_size=8, vocab_chunk_size=None,
                         entropy=False)  # fmt: skip
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    logp, entropy = score(trainable, frozen, batch, True)
    logp_only, none = lean(trainable, frozen, batch, True)
    assert none is None
    assert np.array_equal(np.asarray(logp_only), np.asarray(logp))
    model = nnx.merge(graphdef, trainable, frozen)
    full = np.concatenate([batch["prompt_tokens"], batch["tokens"]], axis=1)
    full_mask = np.concatenate([batch["prompt_mask"], batch["mask"]], axis=1)
    logits = np.asarray(model(jnp.asarray(full), jnp.asarray(full_mask)), np.float64)
    s = batch["prompt_tokens"].shape[1]
    z = logits[:, s - 1 : -1]  # the positions that predict the completion tokens
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    want = -(p * np.log(p)).sum(-1)
    m = np.asarray(batch["mask"])
    np.testing.assert_allclose(np.asarray(entropy)[m], want[m], atol=2e-4)


def test_update_moves_parameters_and_reports_metrics():
    _, trainable, frozen, tx, update, score, cfg = _setup("erpo")
    batch = _full_batch(trainable, frozen, score, cfg)
    before = jax.tree.map(np.asarray, trainable)
    state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0)}
    state, metrics = update(state, frozen, batch)
    assert int(state["step"]) == 1
    for key in (
        "loss",
        "grad_norm",
        "learning_rate",
        "clip_frac_low",
        "clip_frac_high",
        "approx_kl",
        "kl",
        "cdp_frac",
        "gate_mean",
        "entropy_mean",
    ):
        assert key in metrics, key
    assert float(metrics["learning_rate"]) == pytest.approx(1e-2)
    moved = [
        np.abs(np.asarray(a) - b).max()
        for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before), strict=True)
    ]
    assert max(moved) > 1e-4


def test_lora_trains_only_adapters():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    add_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    _, trainable, frozen = split_policy(model, lora=True)

    def names(state):
        return {
            k.key
            for path, _ in jax.tree_util.tree_leaves_with_path(state)
            for k in path
            if isinstance(k, jax.tree_util.DictKey)
        } - {"layers"}

    assert names(trainable) and all("lora" in n for n in names(trainable)), names(trainable)
    assert "q_proj" in names(frozen) and not any("lora" in n for n in names(frozen))


def test_sharded_micro_split_takes_a_slice_of_every_shard():
    from erpo_jax.train._step import _split_micro

    rows = np.arange(16)  # 8 groups of 2 rows, 2 row shards of 4 groups
    batch = {"rows": rows, "rewards": np.arange(8).reshape(8, 1)}
    got = _split_micro(batch, 2, shards=2)
    # micro-batch 0: the first 2 groups of each shard; 1: the next 2 of each
    np.testing.assert_array_equal(
        got["rows"], [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
    )
    np.testing.assert_array_equal(got["rewards"][:, :, 0], [[0, 1, 4, 5], [2, 3, 6, 7]])
    # 3 shards do not divide the groups into slices: the contiguous split
    plain = _split_micro(batch, 2, shards=3)
    np.testing.assert_array_equal(plain["rows"], rows.reshape(2, 8))


def test_join_micro_inverts_the_split_for_every_shard_layout():
    from erpo_jax.train._step import _join_micro, _split_micro

    rows = np.arange(48).reshape(24, 2)  # 12 groups of 2 rows
    for micro, shards in ((1, 1), (3, 1), (2, 2), (3, 2), (2, 3), (4, 2), (2, 5)):
        split = _split_micro({"x": rows}, micro, shards=shards, groups=12)["x"]
        assert split.shape == (micro, 24 // micro, 2)
        np.testing.assert_array_equal(_join_micro(split, 12, micro, shards), rows)


def test_resolve_micro_batches_by_hand():
    # An int is kept; None is 1 off the CPU backend.
    assert resolve_micro_batches(4, groups=16, rows=128, row_tokens=160) == 4
    assert resolve_micro_batches(None, groups=16, rows=128, row_tokens=160, backend="gpu") == 1
    assert resolve_micro_batches(None, groups=16, rows=128, row_tokens=160, backend="tpu") == 1
    # CPU: the fewest whole-group chunks of at most AUTO_MICRO_TOKENS tokens a device.
    assert AUTO_MICRO_TOKENS == 4096
    cpu = functools.partial(resolve_micro_batches, None, backend="cpu")
    assert cpu(groups=16, rows=128, row_tokens=160) == 8  # 20,480 tokens: 8 x 2,560
    assert cpu(groups=16, rows=128, row_tokens=32) == 1  # 4,096 fit at once
    assert cpu(groups=16, rows=128, row_tokens=33) == 2
    assert cpu(groups=16, rows=128, row_tokens=160, row_shards=4) == 2  # 4 devices
    assert cpu(groups=12, rows=96, row_tokens=160) == 4  # 5 and 8 do not divide 12
    assert cpu(groups=16, rows=128, row_tokens=5000) == 16  # never fits: one group each
    assert cpu(groups=1, rows=8, row_tokens=5000) == 1


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (0, "None \\(auto\\) or a positive int"),
        (True, "positive int"),
        (2.0, "positive int"),
        (3, "micro_batches=3 must divide the 16 groups"),
    ],
)
def test_resolve_micro_batches_names_a_bad_value(value, match):
    with pytest.raises(ValueError, match=match):
        resolve_micro_batches(value, groups=16, rows=128, row_tokens=160)


def test_auto_micro_batches_reproduce_the_full_batch_update_and_scores(monkeypatch):
    """micro_batches=None on CPU splits a batch larger than AUTO_MICRO_TOKENS
    (lowered here to 48 tokens: 4 micro-batches of one group): the update and
    the scores equal the one-pass ones."""
    import erpo_jax.train._step as step_mod

    monkeypatch.setattr(step_mod, "AUTO_MICRO_TOKENS", (S + T) * G)
    assert resolve_micro_batches(None, groups=P, rows=P * G, row_tokens=S + T) == P
    runs = []
    for micro in (1, None):
        graphdef, trainable, frozen, tx, update, _, cfg = _setup(
            "erpo", micro=micro, sgd=True, group_size=G
        )
        score = make_score_fn(graphdef, temperature=1.0, chunk_size=None, vocab_chunk_size=None,
                              group_size=G, micro_batches=micro)  # fmt: skip
        traced = score.lower(trainable, frozen, {k: jnp.asarray(v) for k, v in _batch().items()},
                             True).as_text()  # fmt: skip
        batch = _full_batch(trainable, frozen, score, cfg)
        state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0)}
        state, metrics = update(state, frozen, batch)
        runs.append((batch["old_logp"], float(metrics["loss"]), state["params"], traced))
    (s1, l1, p1, one), (s2, l2, p2, auto) = runs
    assert auto.count("stablehlo.while") > one.count("stablehlo.while")  # auto really loops
    np.testing.assert_allclose(np.asarray(s2), np.asarray(s1), rtol=0, atol=1e-6)
    assert abs(l1) > 1e-6 and l2 == pytest.approx(l1, rel=1e-5, abs=1e-7)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale + 1e-9)


def test_erpo_backward_is_not_fused_into_the_logit_gradient():
    """The at-once head's backward takes the loss's per-token cotangent as one
    computed array: XLA:CPU otherwise fused ERPO's whole per-token backward
    (about 300 instructions) into the [tokens, V] logit-gradient loop, run once
    per vocabulary entry (the update in 8 micro-batches: 1.6 s of 4.6 s)."""
    import re

    from erpo_jax.ops import _logp_entropy

    v = 512
    config = ModelConfig("qwen3", v, 32, 64, 1, 4, 2, 8, qk_norm=True,
                         max_position_embeddings=64, eos_token_ids=(2,), pad_token_id=0)  # fmt: skip
    graphdef, trainable, frozen = split_policy(Decoder(config, rngs=nnx.Rngs(0)), lora=False)
    cfg = LossConfig(name="erpo")
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-2), 10, trainable)
    t, rows = 16, P * G
    sd = jax.ShapeDtypeStruct
    batch = {
        "prompt_tokens": sd((rows, S), jnp.int32),
        "prompt_mask": sd((rows, S), jnp.bool_),
        "tokens": sd((rows, t), jnp.int32),
        "mask": sd((rows, t), jnp.bool_),
        "rewards": sd((P, G), jnp.float32),
        **{k: sd((rows, t), jnp.float32) for k in ("entropy", "old_logp", "ref_logp")},
    }
    state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0)}

    def largest_vocab_fusion():
        update = make_update_fn(graphdef, tx, schedule, make_loss_fn(cfg, max_len=t, total_steps=10),
                                cfg, micro_batches=2, max_len=t, temperature=1.0, chunk_size=None,
                                vocab_chunk_size=None, arca=False, group_size=G)  # fmt: skip
        text = update.lower(state, frozen, batch).compile().as_text()
        sizes = [0]
        for body in re.findall(r"^%?fused_computation[^\n]*\{\n.*?\n\}", text, re.S | re.M):
            root = next(line for line in body.splitlines() if "ROOT" in line)
            if re.search(rf"\[[0-9,]*\b{v}\b[0-9,]*\]", root.split("=", 1)[1][:60]):
                sizes.append(len(body.splitlines()) - 2)
        return max(sizes)

    assert largest_vocab_fusion() < 60
    # The check can fail: with the cotangent passed through as is, the loss's
    # backward lands in the vocabulary-sized loop.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_logp_entropy, "_materialized_cotangent", lambda x: x)
        assert largest_vocab_fusion() > 150


@pytest.mark.parametrize(("micro", "kl"), [pytest.param(1, 0.0, marks=pytest.mark.slow), (2, 0.04)])
def test_on_policy_update_with_shared_prompts_equals_the_scored_update(micro, kl):
    """The trainer's fast on-policy path (each group's prompt run once,
    ``old_logp`` = the update's own detached forward, a KL reference scored
    apart) is the same update as scoring ``old_logp`` first and running
    every row's prompt; and it reports the sampler-vs-trainer log-prob gap
    over valid tokens."""
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    # the trainer's layout: a group's G rows share their prompt
    for key in ("prompt_tokens", "prompt_mask"):
        batch[key] = jnp.repeat(batch[key][::G], G, axis=0)
    results = []
    for fast in (False, True):
        _, trainable, frozen, tx, update, score, _ = _setup(
            "grpo",
            micro=micro,
            sgd=True,
            group_size=G if fast else 1,
            old_from_forward=fast,
            kl_coef=kl,
        )
        logp, _ = score(trainable, frozen, batch, True)
        noise = np.random.default_rng(2).normal(scale=0.03, size=logp.shape)
        sampler = logp + jnp.asarray(noise, jnp.float32)
        b = dict(batch, sampler_logp=sampler) if fast else dict(batch, old_logp=logp)
        if kl:
            b["ref_logp"] = logp + 0.1  # a KL term with a gradient
        state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0)}
        state, metrics = update(state, frozen, b)
        results.append((metrics, state["params"]))
    (m0, p0), (m1, p1) = results
    # (on-policy GRPO's loss is ~0: zero-mean advantages at ratio 1; the gradient is not)
    assert float(m0["grad_norm"]) > 1e-3
    assert float(m1["loss"]) == pytest.approx(float(m0["loss"]), abs=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m0["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True):
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale)
    # on-policy: the ratio is exactly 1, nothing clips
    assert float(m1["clip_frac_low"]) == 0.0 and float(m1["clip_frac_high"]) == 0.0
    gap = np.abs(np.random.default_rng(2).normal(scale=0.03, size=(P * G, T)))[_batch()["mask"]]
    assert float(m1["logp_mismatch_mean"]) == pytest.approx(gap.mean(), rel=1e-3)
    assert float(m1["logp_mismatch_max"]) == pytest.approx(gap.max(), rel=1e-3)
    assert "logp_mismatch_mean" not in m0
    if kl:
        assert float(m1["kl"]) == pytest.approx(float(m0["kl"]), rel=1e-5)
        assert float(m1["kl"]) > 1e-4


def test_old_logp_comes_from_the_update_unless_erpo_needs_the_exact_pair():
    from erpo_jax.train._loop import old_logp_in_update

    def fast(*overrides):
        return old_logp_in_update(load_config(None, list(overrides)))

    assert fast("loss.name=grpo")
    assert fast("loss.name=grpo", "loss.kl_coef=0.04")  # the reference is scored apart
    assert fast("loss.name=erpo", "loss.eta=0")
    assert fast("loss.name=erpo", "loss.progress_source=current")
    assert not fast("loss.name=erpo")  # s = beta (old - ref): one function for both
    assert not fast("loss.name=grpo", "train.num_iterations=2")  # off-policy after the first
    assert not fast("loss.name=grpo", "train.mini_batches=2")
    assert not fast("loss.name=grpo", "train.recompute_old_logp=false")
