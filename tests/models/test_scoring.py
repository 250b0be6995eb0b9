"""``score_completions`` (the trainer's policy head) and ``resolve_eos_ids`` (one EOS rule)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from erpo_jax.models import Decoder, ModelConfig, resolve_eos_ids, score_completions

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
