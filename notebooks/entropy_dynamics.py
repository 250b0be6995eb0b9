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
# # Entropy along sampled answers: where ERPO's gate opens
#
# ERPO (METHOD.md section 2) gates each token's credit by
# `W = sigmoid(gamma * z)`, where `z` is the token's sampler entropy z-scored
# over all tokens of its group of sibling answers. Its premise: the few
# high-entropy tokens are the "critical decision pivots" where the answers
# branch, so that is where credit should go.
#
# This notebook samples one group of `G = 8` answers to one Countdown prompt
# from the toy base model, plots the per-token entropy the sampler returns
# along each answer, marks the tokens whose gate is above 0.5 (the library's
# `entropy_gate`, the same function the loss uses), and marks where each
# answer leaves its siblings. It then checks the premise on this group: are
# the branch points high-entropy tokens?
#
# Runs on CPU in about a minute once the toy model is cached
# (`runs/toy_models`; building it the first time takes tens of minutes).

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

from erpo_jax.losses import entropy_gate, erpo_token_terms
from erpo_jax.models import load_hf_checkpoint, load_tokenizer, resolve_eos_ids
from erpo_jax.rollout import encode_prompts
from erpo_jax.sampling import sample
from erpo_jax.tasks import generate_countdown, make_task
from erpo_jax.train import build_toy_base_model

# %% [markdown]
# ## Parameters
#
# `CHECKPOINT`: a Hugging Face checkpoint directory with the toy tokenizer, or
# None for the toy Countdown base model (built under `runs/toy_models` on first
# use and cached). The environment variable `ERPO_JAX_NOTEBOOK_CHECKPOINT`
# overrides it (the notebook test uses it to run on a micro model when the toy
# model is not cached).

# %%
CHECKPOINT = os.environ.get("ERPO_JAX_NOTEBOOK_CHECKPOINT") or None
G = 8  # answers in the group
NUM_CANDIDATES = 32  # prompts sampled at once; the first one with mixed rewards is shown
MAX_NEW_TOKENS = 48  # the trainer's default budget
TEMPERATURE = 1.0
GAMMA = 5.0  # ERPO's default gate sharpness
SEED = 0

# %% [markdown]
# ## Load the model and sample
#
# Exactly as the trainer does (`erpo_jax/train/_loop.py`): `load_hf_checkpoint`,
# `load_tokenizer`, `resolve_eos_ids`; prompts from the Countdown task,
# left-padded by `encode_prompts`, repeated `G` times (rows are prompt-major,
# `b = p * G + g`), and sampled with `erpo_jax.sampling.sample`, which returns
# every token's log-prob and the entropy of the full distribution it was drawn from.

# %%
checkpoint = Path(CHECKPOINT) if CHECKPOINT else build_toy_base_model("runs/toy_models", seed=0)
model, model_config = load_hf_checkpoint(checkpoint)
tokenizer = load_tokenizer(checkpoint)
eos_ids = resolve_eos_ids(model_config, tokenizer, checkpoint)
pad_id = tokenizer.pad_token_id
task = make_task("countdown")
problems = generate_countdown(NUM_CANDIDATES, seed=SEED, split="test", level="easy")

prompt_tokens, prompt_mask, prompt_texts = encode_prompts(task, tokenizer, problems, pad_id=pad_id)
out = sample(
    model,
    np.repeat(prompt_tokens, G, axis=0),
    np.repeat(prompt_mask, G, axis=0),
    jax.random.key(SEED),
    max_new_tokens=MAX_NEW_TOKENS,
    temperature=TEMPERATURE,
    eos_ids=eos_ids,
    pad_id=pad_id,
)
tokens_all, entropy_all, logp_all, mask_all, lengths_all = (
    np.asarray(x)
    for x in jax.device_get((out.tokens, out.entropy, out.logp, out.mask, out.lengths))
)
texts_all = tokenizer.batch_decode(
    [tokens_all[r, : lengths_all[r]].tolist() for r in range(len(lengths_all))],
    skip_special_tokens=True,
)
rewards_all = np.array(
    [task.reward(texts_all[r], problems[r // G]) for r in range(len(texts_all))], np.float32
).reshape(NUM_CANDIDATES, G)
print("sampler outputs:", {k: tuple(v.shape) for k, v in out._asdict().items()})
print("correct answers per candidate prompt:", rewards_all.sum(axis=1).astype(int).tolist())

# %% [markdown]
# A group whose answers are all right or all wrong has no learning signal in
# GRPO or ERPO (zero advantage), so we show the first prompt whose group has
# mixed rewards (or, if none has, the one with the most distinct answers).

# %%
mixed = [p for p in range(NUM_CANDIDATES) if 0 < rewards_all[p].sum() < G]
if mixed:
    chosen = mixed[0]
else:
    chosen = int(
        np.argmax([len(set(texts_all[p * G : (p + 1) * G])) for p in range(NUM_CANDIDATES)])
    )
rows = slice(chosen * G, (chosen + 1) * G)
problem = problems[chosen]
tokens, entropy, logp, mask = tokens_all[rows], entropy_all[rows], logp_all[rows], mask_all[rows]
lengths, texts, rewards = lengths_all[rows], texts_all[rows], rewards_all[chosen]
print(prompt_texts[chosen])
for g in range(G):
    print(f"[{g}] reward={rewards[g]:.0f}  {texts[g]!r}")

# %% [markdown]
# ## The gate
#
# `entropy_gate` z-scores the entropy over the valid tokens of the whole
# group and squashes it: `W > 0.5` exactly where a token's entropy is above
# the group's mean. `erpo_token_terms` (what the loss builds on) gives the
# same gate.

# %%
gate = np.asarray(entropy_gate(entropy, mask, group_size=G, gamma=GAMMA))
terms = erpo_token_terms(rewards[None, :], entropy, mask, gamma=GAMMA, eta=0.0)
assert np.allclose(gate, np.asarray(terms.gate), atol=1e-6)
group_mean_entropy = entropy[mask].mean()
print(f"group mean entropy {group_mean_entropy:.3f} nats over {mask.sum()} tokens")
print(f"tokens with W > 0.5: {(gate[mask] > 0.5).mean():.1%} (the CDP fraction the trainer logs)")

# %% [markdown]
# ## Where siblings diverge
#
# For each answer, its branch point is the first token at which it differs
# from every sibling: the length of its longest common prefix with any other
# answer of the group. Tokens before it are shared with at least one sibling;
# the token at it is the one that sent this answer its own way. An answer that
# equals a sibling has no branch point.


# %%
def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if diff.size else n


seqs = [tokens[g, : lengths[g]] for g in range(G)]
branch = np.array(
    [max(common_prefix(seqs[g], seqs[h]) for h in range(G) if h != g) for g in range(G)]
)
has_branch = branch < lengths
for g in range(G):
    where = f"token {branch[g]}" if has_branch[g] else "none (a sibling is identical)"
    print(f"[{g}] branch point: {where}")


# %% [markdown]
# ## Entropy along each answer
#
# One panel per answer: bars are the sampler's entropy (nats) at each token,
# orange where the gate is above 0.5; the shaded span is the prefix shared
# with a sibling and the red line the branch point. The x axis shows the
# tokens (characters: the toy tokenizer is character-level; `⏎` is a newline).


# %%
def show_token(i: int) -> str:
    t = tokenizer.convert_ids_to_tokens(int(i))
    return {"\n": "⏎", " ": "␣"}.get(t, t)


fig, axes = plt.subplots(G, 1, figsize=(13, 1.55 * G + 0.6), sharey=True)
ymax = max(float(entropy[mask].max()), 1e-3) * 1.15
for g, ax in enumerate(axes):
    n = int(lengths[g])
    x = np.arange(n)
    colors = np.where(gate[g, :n] > 0.5, "tab:orange", "tab:gray")
    if has_branch[g] and branch[g] > 0:
        ax.axvspan(-0.5, branch[g] - 0.5, color="tab:blue", alpha=0.08, lw=0)
    ax.bar(x, entropy[g, :n], color=colors, width=0.8)
    if has_branch[g]:
        ax.axvline(branch[g] - 0.5, color="tab:red", lw=1.2, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels([show_token(t) for t in tokens[g, :n]], fontsize=7, family="monospace")
    ax.set_xlim(-0.7, int(lengths.max()) - 0.3)
    ax.set_ylim(0, ymax)
    ax.set_ylabel(f"[{g}] r={rewards[g]:.0f}", fontsize=8, rotation=0, ha="right", va="center")
    ax.tick_params(axis="y", labelsize=7)
    ax.spines[["top", "right"]].set_visible(False)
handles = [
    plt.Rectangle((0, 0), 1, 1, color="tab:orange", label="gate W > 0.5"),
    plt.Rectangle((0, 0), 1, 1, color="tab:gray", label="gate W ≤ 0.5"),
    plt.Rectangle((0, 0), 1, 1, color="tab:blue", alpha=0.15, label="prefix shared with a sibling"),
    plt.Line2D([], [], color="tab:red", ls="--", label="branch point"),
]
fig.suptitle(
    f"Per-token entropy (nats) of {G} sampled answers to "
    f"numbers {' '.join(map(str, problem.numbers))}, target {problem.target}",
    fontsize=11,
)
fig.tight_layout(rect=(0, 0, 1, 0.95))
fig.legend(
    handles=handles,
    loc="upper center",
    bbox_to_anchor=(0.5, 0.965),
    ncol=4,
    fontsize=8,
    frameon=False,
)
plt.show()

# %% [markdown]
# ## Are the branch points the high-entropy tokens?
#
# If the CDP premise holds, the tokens at which answers branch should carry
# more entropy than the rest, and the gate should be open there.

# %%
valid = mask.copy()
at_branch = np.zeros_like(mask)
for g in np.nonzero(has_branch)[0]:
    at_branch[g, branch[g]] = True
rest = valid & ~at_branch
print(f"branch tokens: {at_branch.sum()}, other tokens: {rest.sum()}")
if at_branch.any():
    print(f"mean entropy at branch points: {entropy[at_branch].mean():.3f} nats")
    print(f"mean entropy elsewhere:        {entropy[rest].mean():.3f} nats")
    print(f"gate > 0.5 at branch points:   {(gate[at_branch] > 0.5).mean():.0%}")
    print(f"gate > 0.5 elsewhere:          {(gate[rest] > 0.5).mean():.0%}")

# %% [markdown]
# Reading the figure: in the toy model the entropy sits on a few tokens, the
# choice of each step's operation and operands; the arithmetic results, the
# fixed `Answer:` text and the final expression (a copy of the steps) are
# near-deterministic, right or wrong. In this group every branch point is a
# gated token. A branch point always has some entropy (two siblings that share
# a prefix drew different tokens from the same distribution there), but
# nothing forces it above the group's mean: that is the premise, and the
# numbers above check it. The converse does not hold: many gated tokens are
# not branch points, because with 8 samples most uncertain positions happen
# to be resolved the same way. This is one group of one prompt: it
# illustrates the mechanism, it does not measure it.
