"""The jaxtyping annotations of every public loss agree with what the code does.

Each function is wrapped with ``jaxtyped(typechecker=beartype)`` and called on
well-shaped inputs (the annotations must accept them and the returns), then on
a mis-shaped input (the annotations must reject it). The rest of the suite
calls the plain functions, whose own checks raise ValueErrors with messages.
"""

from __future__ import annotations

import numpy as np
import pytest
from beartype import beartype
from conftest import make_batch
from jaxtyping import TypeCheckError, jaxtyped

from erpo_jax import losses as L
from erpo_jax import ops


def _cases(x):
    bt = (x["logp"], x["old_logp"])
    return {
        "group_advantages": (L.group_advantages, (x["rewards"],), {}),
        "policy_loss": (L.policy_loss, (*bt, x["adv_tok"], x["mask"]), {"ref_logp": x["ref_logp"], "kl_coef": 0.1}),
        "policy_token_loss": (L.policy_token_loss, (*bt, x["adv_tok"], x["mask"]), {}),
        "aggregate": (L.aggregate, (x["adv_tok"], x["mask"]), {}),
        "aggregate_parts": (L.aggregate_parts, (x["adv_tok"], x["mask"]), {}),
        "kl_penalty": (L.kl_penalty, (x["logp"], x["ref_logp"]), {}),
        "grpo_loss": (L.grpo_loss, (*bt, x["rewards"], x["mask"]), {}),
        "entropy_gate": (L.entropy_gate, (x["entropy"], x["mask"]), {"group_size": 4}),
        "bucket_normalize": (L.bucket_normalize, (x["entropy"], x["mask"]), {"group_size": 4}),
        "bucket_ids": (L.bucket_ids, (x["mask"],), {}),
        "progress_signal": (L.progress_signal, (x["old_logp"], x["ref_logp"], x["mask"]), {}),
        "result_anchored_synthesis": (
            L.result_anchored_synthesis, (x["adv_seq"], x["entropy"], x["adv_tok"], x["mask"]), {},
        ),
        "erpo_token_advantages": (
            L.erpo_token_advantages, (x["rewards"], x["entropy"], x["mask"]),
            {"old_logp": x["old_logp"], "ref_logp": x["ref_logp"]},
        ),
        "erpo_token_terms": (
            L.erpo_token_terms, (x["rewards"], x["entropy"], x["mask"]),
            {"old_logp": x["old_logp"], "ref_logp": x["ref_logp"], "logp": x["logp"]},
        ),
        "erpo_loss": (L.erpo_loss, (*bt, x["rewards"], x["entropy"], x["mask"]), {"ref_logp": x["ref_logp"]}),
        "holder_loss": (L.holder_loss, (*bt, x["adv_seq"], x["mask"]), {"p": 0.5}),
        "gspo_loss": (L.gspo_loss, (*bt, x["adv_seq"], x["mask"]), {}),
        "log_power_mean": (L.log_power_mean, (x["logp"], x["mask"], 0.5), {}),
        "high_entropy_mask": (L.high_entropy_mask, (x["entropy"], x["mask"]), {}),
        "arca_token_weights": (L.arca_token_weights, (x["residual_norm"], x["mask"]), {}),
        "arca_token_advantages": (L.arca_token_advantages, (x["adv_seq"], x["residual_norm"], x["mask"]), {}),
        "masked_sum": (ops.masked_sum, (x["logp"], x["mask"]), {}),
        "masked_mean": (ops.masked_mean, (x["logp"], x["mask"]), {}),
        "masked_quantile": (ops.masked_quantile, (x["logp"], x["mask"], 0.5), {}),
        "masked_group_moments": (ops.masked_group_moments, (x["logp"], x["mask"], 4), {}),
    }  # fmt: skip


NAMES = sorted(_cases(make_batch(0, 2, 4, 5)))


@pytest.mark.parametrize("name", NAMES)
def test_annotations_accept_good_inputs(name):
    fn, args, kw = _cases(make_batch(70, 2, 4, 5))[name]
    jaxtyped(typechecker=beartype)(fn)(*args, **kw)


# One [B, T] array, or "..." shapes that broadcast: nothing to disagree with.
SINGLE_ARRAY = {
    "group_advantages",
    "bucket_ids",
    "kl_penalty",
    "masked_sum",
    "masked_mean",
    "masked_quantile",
}


@pytest.mark.parametrize("name", [n for n in NAMES if n not in SINGLE_ARRAY])
def test_annotations_reject_mismatched_shapes(name):
    fn, args, kw = _cases(make_batch(71, 2, 4, 5))[name]
    # Drop the last token column of the last argument that has a T axis.
    args = list(args)
    i = max(i for i, a in enumerate(args) if np.ndim(a) == 2 and a.shape[1] == 5)
    args[i] = args[i][:, :4]
    with pytest.raises(TypeCheckError):
        jaxtyped(typechecker=beartype)(fn)(*args, **kw)


def test_every_public_name_is_covered():
    public = {n for n in L.__all__ if n[0].islower()} | {
        n for n in ops.__all__ if n.startswith("masked_")
    }
    assert public - {"holder_p_schedule"} <= set(NAMES)
