"""``score_completions`` (the trainer's policy head) and ``resolve_eos_ids`` (one EOS rule)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from erpo_jax.models import (
    Decoder,
    ModelConfig,
    completion_hidden_states,
    resolve_eos_ids,
    score_completions,
)

CONFIG = ModelConfig(
    "qwen3",
    50,
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


def _batch():
    rng = np.random.default_rng(0)
    b, s, t = 3, 5, 6
    prompt_len = np.array([5, 2, 3])
    comp_len = np.array([6, 1, 4])
    prompt = np.zeros((b, s), np.int32)
    pmask = np.zeros((b, s), bool)
    tokens = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), bool)
    for i in range(b):
        prompt[i, s - prompt_len[i] :] = rng.integers(3, 50, prompt_len[i])
        pmask[i, s - prompt_len[i] :] = True
        tokens[i, : comp_len[i]] = rng.integers(3, 50, comp_len[i])
        mask[i, : comp_len[i]] = True
    return prompt, pmask, tokens, mask


@nnx.jit(static_argnames=("temperature",))
def _score(model, prompt, pmask, tokens, mask, temperature):
    return score_completions(
        model, prompt, pmask, tokens, mask, temperature=temperature, chunk_size=4
    )


def test_matches_log_softmax_of_each_row_alone():
    """Each row scored alone, unpadded, through full logits: the naive reference."""
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    prompt, pmask, tokens, mask = _batch()
    forward = nnx.jit(lambda m, seq: m(seq))
    for temperature in (1.0, 0.7):
        logp, entropy = _score(model, prompt, pmask, tokens, mask, temperature)
        for i in range(prompt.shape[0]):
            seq = np.concatenate([prompt[i][pmask[i]], tokens[i][mask[i]]])
            n = int(mask[i].sum())
            logits = np.asarray(forward(model, jnp.asarray(seq[None])))[0] / temperature
            pred = logits[len(seq) - n - 1 : len(seq) - 1]
            lsm = pred - jax.scipy.special.logsumexp(pred, axis=-1, keepdims=True)
            ref_logp = np.take_along_axis(np.asarray(lsm), seq[-n:, None], -1)[:, 0]
            p = np.exp(lsm)
            ref_ent = -np.sum(p * lsm, axis=-1)
            np.testing.assert_allclose(np.asarray(logp)[i, :n], ref_logp, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(entropy)[i, :n], ref_ent, rtol=1e-5, atol=1e-5)


def test_gradient_flows_to_parameters():
    model = Decoder(CONFIG, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model)
    prompt, pmask, tokens, mask = _batch()

    def f(params):
        lp, _ = score_completions(nnx.merge(graphdef, params), prompt, pmask, tokens, mask)
        return jnp.sum(jnp.where(mask, lp, 0.0))

    grads = jax.jit(jax.grad(f))(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0


def _group_batch(p=3, g=4, s=6, t=7):
    """``P`` left-padded prompts (1 to S real tokens), each repeated to its ``G``
    rows, and ``P * G`` right-padded completions of 0 to T tokens."""
    rng = np.random.default_rng(3)
    prompt_len = np.array([s, 2, 1])[:p]
    comp_len = np.array([7, 3, 1, 5, 7, 0, 2, 6, 4, 7, 1, 3])[: p * g]
    prompt = np.zeros((p, s), np.int32)
    pmask = np.zeros((p, s), bool)
    for i in range(p):
        prompt[i, s - prompt_len[i] :] = rng.integers(3, 50, prompt_len[i])
        pmask[i, s - prompt_len[i] :] = True
    tokens = np.zeros((p * g, t), np.int32)
    mask = np.zeros((p * g, t), bool)
    for i in range(p * g):
        tokens[i, : comp_len[i]] = rng.integers(3, 50, comp_len[i])
        mask[i, : comp_len[i]] = True
    return np.repeat(prompt, g, 0), np.repeat(pmask, g, 0), tokens, mask, g


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        pytest.param(dict(scan_layers=True, remat=True), marks=pytest.mark.slow),
        pytest.param(dict(attention_impl="chunked", attention_block=4), marks=pytest.mark.slow),
    ],
    ids=["unrolled", "scan-remat", "chunked"],
)
def test_shared_prompt_equals_unshared_in_value_and_gradient(options):
    """The shared-prefix forward (group_size=G) is the same function as the
    per-row one, which test_matches_log_softmax_of_each_row_alone checks
    against the naive reference: hidden states at every predicting position
    and the parameters' gradients agree."""
    model = Decoder(CONFIG, rngs=nnx.Rngs(5), **options)
    graphdef, params = nnx.split(model)
    prompt, pmask, tokens, mask, g = _group_batch()
    # the positions that predict a completion token
    valid = np.concatenate([np.ones((len(mask), 1), bool), mask[:, :-1]], axis=1) & mask

    def loss(params, group_size):
        m = nnx.merge(graphdef, params)
        h = completion_hidden_states(m, prompt, pmask, tokens, mask, group_size=group_size)
        return jnp.sum(jnp.where(valid[..., None], jnp.sin(3.0 * h), 0.0)), h

    (l1, h1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, 1)
    (lg, hg), gg = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, g)
    np.testing.assert_allclose(np.asarray(hg)[valid], np.asarray(h1)[valid], atol=2e-6)
    np.testing.assert_allclose(float(lg), float(l1), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(gg), strict=True):
        # (the untied unembedding gets no gradient from hidden states: 0 both ways)
        scale = max(float(jnp.max(jnp.abs(a))), 1e-30)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale)
    assert float(jnp.linalg.norm(gg["layers"]["q_proj"][...])) > 0


def test_shared_prompt_with_one_token_completions():
    """One completion column (the trainer's cut when every completion is one
    token, or max_new_tokens=1): nothing follows the prompt, and the shared
    forward gives the per-row one's hidden state, not a division by zero."""
    model = Decoder(CONFIG, rngs=nnx.Rngs(5))
    prompt, pmask, tokens, mask, g = _group_batch()
    tokens, mask = tokens[:, :1], mask[:, :1]
    one = completion_hidden_states(model, prompt, pmask, tokens, mask, group_size=1)
    shared = completion_hidden_states(model, prompt, pmask, tokens, mask, group_size=g)
    assert shared.shape == one.shape == (len(tokens), 1, CONFIG.hidden_size)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(one), atol=2e-6)
    assert float(jnp.max(jnp.abs(one))) > 1e-3


def test_shared_prompt_rejects_rows_that_do_not_split_into_groups():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    prompt, pmask, tokens, mask, _ = _group_batch()
    with pytest.raises(ValueError, match="group_size=5 does not divide the 12 rows"):
        completion_hidden_states(model, prompt, pmask, tokens, mask, group_size=5)


def test_resolve_eos_ids_unions_every_source(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = SimpleNamespace(
        eos_token_id=9,
        chat_template="{{ '<|im_start|>' }}...{{ '<|im_end|>' }}",
        unk_token_id=None,
        convert_tokens_to_ids=lambda t: {"<|im_end|>": 11}.get(t),
    )
    assert resolve_eos_ids(CONFIG, tok, tmp_path) == (2, 7, 9, 11)
    assert resolve_eos_ids(CONFIG) == (2,)
    (tmp_path / "generation_config.json").write_text("{not json")
    assert resolve_eos_ids(CONFIG, None, tmp_path) == (2,)  # unreadable: ignored
    out_of_vocab = SimpleNamespace(eos_token_id=500, chat_template=None)
    assert resolve_eos_ids(CONFIG, out_of_vocab) == (2,)
