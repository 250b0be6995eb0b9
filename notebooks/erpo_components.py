# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ERPO's token advantage, piece by piece
#
# GRPO gives every token of an answer the same advantage `A_b` (the answer's
# group-normalized reward). ERPO (METHOD.md section 2) replaces it with
#
#     A_tok = A_b * omega + eta * Psi,      Psi = W * sign(A_b) * s_hat
#
# built from the entropy gate `W = sigmoid(gamma z)` (Eq. 8), the progress
# signal `s = beta (old_logp - ref_logp)` (Eq. 7) z-scored within relative-position
# buckets of the group (`s_hat`, Eq. 9), and the credit weights `omega`
# (`gate_mode="redistribute"`: `n_b softmax_t(log W)`, mean 1 over the row).
#
# `erpo_jax.losses.erpo_token_terms` returns every one of these as `[B, T]`
# arrays; this notebook shows them as heatmaps on one real batch next to
# GRPO's uniform advantages, then shows how `gamma` and `eta` reshape them.
# Runs on CPU in one to two minutes once the toy model is cached.

# %%
import os
import warnings
from pathlib import Path

# Run from the repository root (relative paths below), also when opened from notebooks/.
_here = Path.cwd().resolve()
for _p in [_here, *_here.parents]:
    if (_p / "pyproject.toml").is_file() and (_p / "erpo_jax").is_dir():
        os.chdir(_p)
        break
# tqdm (progress bars of the library) warns that ipywidgets is missing; text bars are fine.
warnings.filterwarnings("ignore", message="IProgress not found")

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

from erpo_jax.losses import erpo_loss, erpo_token_terms, group_advantages, grpo_loss
from erpo_jax.models import load_hf_checkpoint, load_tokenizer, resolve_eos_ids, score_completions
from erpo_jax.rollout import encode_prompts
from erpo_jax.sampling import sample
from erpo_jax.tasks import generate_countdown, make_task
from erpo_jax.train import build_toy_base_model

# Jitted once (gamma, beta and eta are traced scalars, so the grid below does not recompile).
token_terms = jax.jit(erpo_token_terms, static_argnames=("num_buckets",))
loss_and_aux = jax.jit(erpo_loss, static_argnames=("num_buckets",))

# %% [markdown]
# ## Parameters
#
# `CHECKPOINT`: a Hugging Face checkpoint directory with the toy tokenizer, or
# None for the toy Countdown base model (built under `runs/toy_models` on first
# use and cached); the environment variable `ERPO_JAX_NOTEBOOK_CHECKPOINT`
# overrides it.

# %%
CHECKPOINT = os.environ.get("ERPO_JAX_NOTEBOOK_CHECKPOINT") or None
G = 8  # answers per prompt
NUM_CANDIDATES = 16  # prompts sampled per call
P_SHOW = 4  # groups shown (those with mixed rewards first)
MAX_NEW_TOKENS = 48
DRIFT_STEPS = 4  # GRPO steps that move the rollout policy away from the reference
DRIFT_LR = 3e-4  # Adam, the trainer's default learning rate
GAMMA, NUM_BUCKETS, BETA, ETA = 5.0, 10, 0.1, 0.2  # ERPO's defaults
SEED = 0

# %% [markdown]
# ## The reference, the rollout policy, and the batch
#
# The progress signal needs two policies: `old_logp` from the policy that
# sampled the batch and `ref_logp` from the reference (the initial model).
# At the first training step they are the same model, so `s` is exactly 0 and
# only the gate acts (checked below). To show the term doing something we make
# the situation of a few steps into training, with nothing faked:
#
# - **reference** = the toy base model;
# - **rollout policy** = the base model after `DRIFT_STEPS` plain GRPO updates
#   (Adam, the trainer's learning rate), each on groups it sampled itself: a
#   policy that has moved the way RL moves it, not a random perturbation (a few
#   steps do not change its accuracy measurably; they do change its log-probs);
# - **batch** = `G` answers per prompt sampled from the rollout policy by
#   `erpo_jax.sampling.sample`, whose per-token `logp` is `old_logp` and whose
#   `entropy` feeds the gate; `ref_logp` = the reference's log-probs of the same
#   tokens (`erpo_jax.models.score_completions`); rewards from the Countdown verifier.

# %%
checkpoint = Path(CHECKPOINT) if CHECKPOINT else build_toy_base_model("runs/toy_models", seed=0)
model, model_config = load_hf_checkpoint(checkpoint)
tokenizer = load_tokenizer(checkpoint)
eos_ids = resolve_eos_ids(model_config, tokenizer, checkpoint)
pad_id = tokenizer.pad_token_id
task = make_task("countdown")
graphdef, ref_params, rest = nnx.split(model, nnx.Param, ...)


def sample_batch(params, problems, key):
    """G answers per problem from the policy `params`, with rewards (host arrays)."""
    tokens, pmask, _ = encode_prompts(task, tokenizer, problems, pad_id=pad_id)
    pt, pm = np.repeat(tokens, G, axis=0), np.repeat(pmask, G, axis=0)
    out = sample(
        nnx.merge(graphdef, params, rest),
        pt,
        pm,
        key,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_ids=eos_ids,
        pad_id=pad_id,
    )
    b = {k: np.asarray(v) for k, v in jax.device_get(out._asdict()).items()}
    b["prompt_tokens"], b["prompt_mask"] = pt, pm
    texts = tokenizer.batch_decode(
        [b["tokens"][r, : b["lengths"][r]].tolist() for r in range(len(pt))],
        skip_special_tokens=True,
    )
    rewards = [task.reward(texts[r], problems[r // G]) for r in range(len(pt))]
    b["rewards"] = np.asarray(rewards, np.float32).reshape(len(problems), G)
    b["texts"] = texts
    return b


@jax.jit
def score(params, b):
    """Log-probs of the batch's tokens under `params` (the trainer's head)."""
    m = nnx.merge(graphdef, params, rest)
    logp, _ = score_completions(m, b["prompt_tokens"], b["prompt_mask"], b["tokens"], b["mask"])
    return logp


tx = optax.adam(DRIFT_LR)


@jax.jit
def grpo_update(params, opt_state, b):
    def loss_fn(p):
        m = nnx.merge(graphdef, p, rest)
        logp, _ = score_completions(m, b["prompt_tokens"], b["prompt_mask"], b["tokens"], b["mask"])
        return grpo_loss(logp, b["logp"], b["rewards"], b["mask"])[0]

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


train_problems = generate_countdown(
    NUM_CANDIDATES * DRIFT_STEPS, seed=SEED, split="train", level="easy"
)
arrays = ("prompt_tokens", "prompt_mask", "tokens", "mask", "logp", "rewards")
# Committed to the device like the updated state, so that the update compiles once.
params, opt_state = ref_params, jax.device_put(tx.init(ref_params), jax.devices()[0])
for step in range(DRIFT_STEPS):
    chunk = train_problems[step * NUM_CANDIDATES : (step + 1) * NUM_CANDIDATES]
    b = sample_batch(params, chunk, jax.random.key(1000 + step))
    params, opt_state = grpo_update(params, opt_state, {k: b[k] for k in arrays})
    print(f"drift step {step}: mean reward {b['rewards'].mean():.3f}")

# %% [markdown]
# Now the batch: `NUM_CANDIDATES` held-out prompts, `G` answers each, from the
# rollout policy. We keep `P_SHOW` groups, those with mixed rewards first (a
# group whose answers all score the same has `A_b = 0`: no credit to assign).

# %%
problems = generate_countdown(NUM_CANDIDATES, seed=SEED, split="test", level="easy")
full = sample_batch(params, problems, jax.random.key(SEED))
mixed = [p for p in range(NUM_CANDIDATES) if 0 < full["rewards"][p].sum() < G]
keep = (mixed + [p for p in range(NUM_CANDIDATES) if p not in mixed])[:P_SHOW]
rows = np.concatenate([np.arange(p * G, (p + 1) * G) for p in keep])
batch = {
    k: full[k][rows] for k in ("prompt_tokens", "prompt_mask", "tokens", "mask", "logp", "entropy")
}
rewards = full["rewards"][keep]  # [P, G]
texts = [full["texts"][r] for r in rows]
batch["ref_logp"] = np.asarray(score(ref_params, batch))
old_logp, ref_logp, entropy, mask = (
    batch["logp"],
    batch["ref_logp"],
    batch["entropy"],
    batch["mask"],
)
print(f"groups with mixed rewards: {len(mixed)} of {NUM_CANDIDATES}; showing {len(keep)}")
for i, p in enumerate(keep):
    nums = " ".join(map(str, problems[p].numbers))
    print(f"group {i}: {nums} -> {problems[p].target}, rewards {rewards[i].astype(int).tolist()}")
drift = np.abs(old_logp - ref_logp)[mask]
print(f"|old_logp - ref_logp| over valid tokens: mean {drift.mean():.4f}, max {drift.max():.3f}")

# %% [markdown]
# ## Every term of ERPO's token advantage
#
# One call, ERPO's defaults (`gamma=5`, `K=10`, `beta=0.1`, `eta=0.2`,
# `gate_mode="redistribute"`, `psi_gate=True`). The fields recompose exactly
# as `adv_tok = A_b * omega + eta * psi` (checked).

# %%
terms = token_terms(
    rewards, entropy, mask, old_logp=old_logp, ref_logp=ref_logp,
    gamma=GAMMA, num_buckets=NUM_BUCKETS, beta=BETA, eta=ETA,
)  # fmt: skip
terms = {k: np.asarray(v) for k, v in terms._asdict().items()}
adv_seq = np.asarray(group_advantages(rewards)).reshape(-1)  # A_b, [B]
grpo_adv = np.where(mask, adv_seq[:, None], 0.0)  # GRPO: A_b on every valid token
recomposed = adv_seq[:, None] * terms["omega"] + ETA * terms["psi"]
assert np.allclose(terms["adv_tok"], np.where(mask, recomposed, 0.0), atol=1e-5)
for k, v in terms.items():
    print(f"{k:13s} valid-token range [{v[mask].min():+.3f}, {v[mask].max():+.3f}]")

# At the first step (old policy = reference) the progress signal vanishes:
at_start = token_terms(rewards, entropy, mask, old_logp=old_logp, ref_logp=old_logp)
assert not np.any(np.asarray(at_start.progress)) and not np.any(np.asarray(at_start.psi))
print("with ref_logp = old_logp: progress, s_hat and psi are all exactly 0")

# %% [markdown]
# Each heatmap: rows are the `B = P * G` answers (groups separated by black
# lines; the reward is on the left), columns the token positions; padding is
# blank. Signed quantities use a blue-red scale centred on 0. Colour scales
# end at the 99th percentile of |value| (a few extreme tokens saturate); the
# two advantage panels share one scale.


# %%
def color_limit(values, m):
    """The 99th percentile of |values| on valid tokens: a few extreme tokens saturate."""
    return max(float(np.percentile(np.abs(values[m]), 99)), 1e-6)


def heatmap(ax, values, title, *, signed, vmax=None):
    data = np.where(mask, values, np.nan)[:, : int(mask.sum(axis=1).max())]
    vmax = color_limit(values, mask) if vmax is None else vmax
    cmap = plt.get_cmap("RdBu_r" if signed else "viridis").copy()
    cmap.set_bad("white")
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap,
                   vmin=-vmax if signed else 0.0, vmax=vmax)  # fmt: skip
    for p in range(1, len(data) // G):
        ax.axhline(p * G - 0.5, color="black", lw=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_yticks(np.arange(len(data)))
    ax.set_yticklabels([f"{r:.0f}" for r in rewards.reshape(-1)], fontsize=5)
    ax.tick_params(axis="x", labelsize=7)
    plt.colorbar(im, ax=ax, fraction=0.04, pad=0.01, extend="both" if signed else "max")
    return im


adv_limit = max(color_limit(grpo_adv, mask), color_limit(terms["adv_tok"], mask))
panels = [
    ("sampler entropy H (nats)", entropy, False, None),
    ("gate W = sigmoid(γ z)", terms["gate"], False, 1.0),
    ("progress s = β (old − ref)", terms["progress"], True, None),
    ("bucket-normalized ŝ", terms["progress_hat"], True, None),
    ("Ψ = W sign(A) ŝ", terms["psi"], True, None),
    ("ω (redistribute: n·softmax log W)", terms["omega"], False, None),
    ("GRPO advantage A_b (uniform)", grpo_adv, True, adv_limit),
    ("ERPO token advantage A·ω + η Ψ", terms["adv_tok"], True, adv_limit),
]
fig, axes = plt.subplots(4, 2, figsize=(14, 13))
for ax, (title, values, signed, vmax) in zip(axes.flat, panels, strict=True):
    heatmap(ax, values, title, signed=signed, vmax=vmax)
for ax in axes[-1]:
    ax.set_xlabel("token position")
fig.suptitle("ERPO's terms on one batch (rows: answers, reward on the left; columns: tokens)")
fig.tight_layout()
plt.show()

# %% [markdown]
# What to read off (the numbers below are from this batch):
#
# - **W** is high on a minority of tokens, those above their group's mean
#   entropy (the first choices of an operation and its operands, uncertain
#   step results), and low on copied digits and the fixed `Answer:` text. It
#   is z-scored per group, so every group has its own pivots.
# - **ω** keeps each row's mean at 1 and moves its credit onto those pivots:
#   they get weights of several units, the other tokens less than 1.
# - **s** is small, and its mean is positive: over tokens sampled from the
#   rollout policy it estimates `beta * KL(old || ref) >= 0`. **ŝ** z-scores it within each
#   (group, relative-position bucket), which removes that common offset and
#   the drift's scale. **Ψ** keeps ŝ where the gate is open and signs it by
#   the outcome: a token the policy has moved towards more than its siblings
#   at the same relative position gets extra credit in a correct answer and
#   extra blame in a wrong one.
# - **GRPO** paints each row in one colour; **ERPO** concentrates the same
#   sign on the pivots, and with `eta > 0` the progress term can flip the sign
#   of single tokens (the `sign_flip_frac` the trainer logs).

# %%
valid = {k: v[mask] for k, v in terms.items()}
print(f"W > 0.5 on {np.mean(valid['gate'] > 0.5):.0%} of valid tokens")
print(
    f"omega > 1 on {np.mean(valid['omega'] > 1):.0%} of valid tokens; max {valid['omega'].max():.2f}"
)
print(
    f"s > 0 on {np.mean(valid['progress'] > 0):.0%} of valid tokens; mean s = {valid['progress'].mean():+.4f}"
)
flips = (np.sign(terms["adv_tok"]) != np.sign(adv_seq[:, None])) & mask & (adv_seq[:, None] != 0)
print(f"tokens whose ERPO advantage has the other sign than their answer's: {flips.sum()}")

# %% [markdown]
# ## How gamma and eta reshape the advantage
#
# The token advantage of one group (the first shown) for a grid of
# `gamma` (gate sharpness) and `eta` (weight of the progress term), all else at
# the defaults, on one colour scale. The table gives the trainer's diagnostics
# for each setting on the whole batch (`erpo_loss`'s aux, evaluated at ratio 1).

# %%
GAMMAS = (1.0, 5.0, 20.0)
ETAS = (0.0, 0.2, 0.5)
g0 = slice(0, G)
grid = {}
for gamma in GAMMAS:
    for eta in ETAS:
        t = token_terms(rewards, entropy, mask, old_logp=old_logp, ref_logp=ref_logp,
                        gamma=gamma, eta=eta)  # fmt: skip
        grid[gamma, eta] = np.asarray(t.adv_tok)
vmax = max(color_limit(v[g0], mask[g0]) for v in grid.values())
fig, axes = plt.subplots(len(GAMMAS), len(ETAS), figsize=(14, 7.5), sharex=True, sharey=True)
cmap = plt.get_cmap("RdBu_r").copy()
cmap.set_bad("white")
for i, gamma in enumerate(GAMMAS):
    for j, eta in enumerate(ETAS):
        ax = axes[i, j]
        data = np.where(mask[g0], grid[gamma, eta][g0], np.nan)[:, : int(mask[g0].sum(1).max())]
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-vmax,
                       vmax=vmax)  # fmt: skip
        ax.set_title(f"γ = {gamma:g}, η = {eta:g}", fontsize=10)
        ax.set_yticks(np.arange(G))
        ax.set_yticklabels([f"r={r:.0f}" for r in rewards[0]], fontsize=7)
fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01, label="token advantage", extend="both")
fig.suptitle("ERPO token advantage of one group (rows: answers) as γ and η vary")
plt.show()

print(f"{'gamma':>6} {'eta':>5} {'cdp_frac':>9} {'eff_token_frac':>15} {'omega_max':>10} "
      f"{'sign_flip_frac':>15} {'adv_abs_mean':>13}")  # fmt: skip
table = {}
for gamma in GAMMAS:
    for eta in ETAS:
        _, aux = loss_and_aux(old_logp, old_logp, rewards, entropy, mask, ref_logp=ref_logp,
                              gamma=gamma, eta=eta)  # fmt: skip
        table[gamma, eta] = aux
        print(f"{gamma:6g} {eta:5g} {float(aux.cdp_frac):9.3f} {float(aux.eff_token_frac):15.3f} "
              f"{float(aux.omega_max):10.2f} {float(aux.sign_flip_frac):15.3f} "
              f"{float(aux.adv_abs_mean):13.3f}")  # fmt: skip

# %% [markdown]
# Reading the grid and the table:
#
# - **gamma** sets how sharply credit concentrates. The set of gated tokens
#   (`W > 0.5`, `cdp_frac`) does not depend on gamma (for any gamma > 0 it is
#   the tokens above their group's mean entropy), but the weights do: at
#   `gamma = 1` `ω` stays near 1 and the advantage is close to GRPO's; as gamma
#   grows, each row's credit gathers on its highest-entropy tokens
#   (`eff_token_frac`, the effective share of a row's tokens carrying its
#   credit, falls and `omega_max` rises).
# - **eta** adds the progress term on top: at `eta = 0` every token keeps its
#   answer's sign (`sign_flip_frac = 0`) and each row's total credit equals
#   GRPO's (`adv_abs_mean` does not move with gamma); as eta grows, `Ψ` adds
#   to and subtracts from gated tokens and a few tokens take the opposite sign.
#
# This is one batch of the toy model a few steps into training; it shows what
# each knob does to the credit, not whether it helps. For that, see the study
# (`docs/results/toy.md`) and the `training_curves` notebook.
