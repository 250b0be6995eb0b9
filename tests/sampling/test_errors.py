"""Bad input raises a ValueError that names the argument; annotations match the code."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

from erpo_jax.sampling import (
    bucket_length,
    full_logp_and_entropy,
    repeat_for_groups,
    sample,
    sample_from_logits,
    score_tokens,
    truncation_mask,
)


def _ok(h):
    return h.left_padded(0)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t, m: (t[:, :0], m[:, :0]), "prompt_tokens"),  # no columns at all
        (lambda t, m: (t, np.where(np.arange(4)[:, None] == 1, False, m)), "prompt_mask.*empty"),
        (lambda t, m: (np.where(m, 100, t), m), "prompt_tokens.*vocab"),
        (lambda t, m: (np.where(m, -1, t), m), "prompt_tokens.*vocab"),
        (lambda t, m: (t, m[:, ::-1]), "prompt_mask.*left-padded"),
        (lambda t, m: (t, m[:3]), "prompt_mask"),
        (lambda t, m: (t.astype(np.float32), m), "prompt_tokens"),
    ],
    ids=[
        "no-columns",
        "empty-row",
        "id-too-big",
        "negative-id",
        "right-padded",
        "mask-shape",
        "float-ids",
    ],
)
def test_bad_prompts(model, h, change, match):
    tokens, mask = change(*_ok(h))
    with pytest.raises(ValueError, match=match):
        sample(model, tokens, mask, h.key(0), max_new_tokens=4)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_length": 10}, "max_length"),  # 7-token prompt + 4 new > 10
        ({"max_new_tokens": 250}, "max_length"),  # beyond max_position_embeddings=256
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 101}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"eos_ids": (100,)}, "eos_ids"),
        ({"pad_id": 100}, "pad_id"),
        ({"stop_strings": ["x"]}, "tokenizer"),
        ({"stop_strings": [""], "tokenizer": object()}, "stop_strings"),
        ({"first_token": "diverse"}, "first_token"),
        ({"first_token": "reft"}, "group_size"),
        ({"first_token": "reft", "group_size": 4, "reft_k": 3}, "reft_k"),
        ({"first_token": "reft", "group_size": 4, "reft_k": 4, "reft_top_n": 2}, "reft_top_n"),
        ({"first_token": "reft", "group_size": 3, "reft_k": 3}, "group_size"),  # 4 rows
        (
            {"first_token": "reft", "group_size": 4, "reft_k": 2, "reft_marker": (1, 2, 3, 4)},
            "reft_marker",
        ),
        ({"reft_marker": (1,)}, "reft_marker"),
        ({"key": np.zeros(3, np.uint32)}, "key"),
    ],
)
def test_bad_options(model, h, kw, match):
    tokens, mask = _ok(h)
    kw = {"max_new_tokens": 4, **kw}
    key = kw.pop("key", h.key(0))
    with pytest.raises(ValueError, match=match):
        sample(model, tokens, mask, key, **kw)


def test_bad_model_and_group_helper(h):
    tokens, mask = _ok(h)
    with pytest.raises(ValueError, match="model"):
        sample("not a model", tokens, mask, h.key(0), max_new_tokens=4)
    with pytest.raises(ValueError, match="group_size"):
        repeat_for_groups(tokens, mask, h.key(0), group_size=0)
    with pytest.raises(ValueError, match="key"):
        repeat_for_groups(tokens, mask, jax.random.split(h.key(0), 2), group_size=2)


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 7, 8, 9, 16, 17, 100)] == [8, 8, 8, 16, 16, 32, 128]


def test_annotations_accept_good_and_reject_bad_shapes(h):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 11)).astype(np.float32)
    tokens = np.array([1, 2, 3], np.int32)
    keys = jax.random.split(h.key(0), 3)
    checked = {f: jaxtyped(typechecker=beartype)(f) for f in
               (full_logp_and_entropy, truncation_mask, sample_from_logits, score_tokens)}  # fmt: skip
    checked[full_logp_and_entropy](logits, tokens)
    checked[truncation_mask](logits, top_k=3, top_p=0.5, min_p=0.1)
    checked[sample_from_logits](logits, keys, top_p=0.9)
    checked[score_tokens](logits, tokens, top_k=2)
    with pytest.raises(TypeCheckError):
        checked[full_logp_and_entropy](logits, tokens[:2])
