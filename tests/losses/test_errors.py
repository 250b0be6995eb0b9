"""Bad input gives a ValueError that names the argument, its shape and what is allowed."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_batch

from erpo_jax import losses as L


@pytest.fixture
def x():
    return make_batch(60, 2, 4, 5)


def test_shape_mismatch_names_both_arrays(x):
    with pytest.raises(
        ValueError, match=r"`old_logp` has shape \(8, 4\) but `logp` has shape \(8, 5\)"
    ):
        L.policy_loss(x["logp"], x["old_logp"][:, :4], x["adv_tok"], x["mask"])
    with pytest.raises(ValueError, match=r"`mask` must be \[B, T\] \(rank 2\), got shape \(8,\)"):
        L.policy_loss(x["logp"], x["old_logp"], x["adv_tok"], x["mask"][:, 0])
    with pytest.raises(ValueError, match=r"`entropy` has shape"):
        L.erpo_loss(x["logp"], x["old_logp"], x["rewards"], x["entropy"][:4], x["mask"], eta=0.0)
    with pytest.raises(ValueError, match=r"`adv_seq` must have shape \[B\] = \(8,\), got \(4,\)"):
        L.holder_loss(x["logp"], x["old_logp"], x["adv_seq"][:4], x["mask"], p=1.0)


def test_group_size_and_rows(x):
    with pytest.raises(ValueError, match=r"shape \(8, 1\): group size G=1.*G >= 2"):
        L.group_advantages(np.zeros((8, 1), np.float32))
    with pytest.raises(
        ValueError, match=r"`rewards` has shape \(3, 4\) \(P\*G=12\) but .* B=8 rows"
    ):
        L.grpo_loss(x["logp"], x["old_logp"], np.zeros((3, 4), np.float32), x["mask"])
    with pytest.raises(ValueError, match=r"`rewards` must be \[P, G\]"):
        L.group_advantages(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match=r"group_size=3 must divide .* B=8"):
        L.entropy_gate(x["entropy"], x["mask"], group_size=3)
    with pytest.raises(ValueError, match=r"ddof=4 must satisfy 0 <= ddof < G=4"):
        L.group_advantages(x["rewards"], ddof=4)


def test_unknown_modes_list_allowed_values(x):
    with pytest.raises(
        ValueError, match=r"agg='mean' is not supported; allowed values: 'token_mean', "
    ):
        L.policy_loss(x["logp"], x["old_logp"], x["adv_tok"], x["mask"], agg="mean")
    with pytest.raises(ValueError, match=r"kl_estimator='k4' .* 'k1', 'k2', 'k3'"):
        L.policy_loss(x["logp"], x["old_logp"], x["adv_tok"], x["mask"], kl_estimator="k4")
    with pytest.raises(ValueError, match=r"gate_mode='soft' .* 'redistribute', 'amplify', 'none'"):
        L.erpo_token_advantages(x["rewards"], x["entropy"], x["mask"], eta=0.0, gate_mode="soft")
    with pytest.raises(ValueError, match=r"clip_level='row' .* 'sequence', 'token'"):
        L.holder_loss(x["logp"], x["old_logp"], x["adv_seq"], x["mask"], p=1.0, clip_level="row")
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) gama"):
        L.erpo_loss(x["logp"], x["old_logp"], x["rewards"], x["entropy"], x["mask"], gama=2.0)


def test_impossible_combinations(x):
    with pytest.raises(ValueError, match=r"eta=0.2 .* but ref_logp is None"):
        L.erpo_token_advantages(x["rewards"], x["entropy"], x["mask"], old_logp=x["old_logp"])
    with pytest.raises(ValueError, match=r"but old_logp and ref_logp are None"):
        L.erpo_token_advantages(x["rewards"], x["entropy"], x["mask"])
    with pytest.raises(ValueError, match=r"kl_coef=0.1 needs `ref_logp`"):
        L.policy_loss(x["logp"], x["old_logp"], x["adv_tok"], x["mask"], kl_coef=0.1)
    with pytest.raises(ValueError, match=r"clip_c=1.0 must be > 1"):
        L.policy_loss(x["logp"], x["old_logp"], x["adv_tok"], x["mask"], clip_c=1.0)
    with pytest.raises(ValueError, match=r"clip_eps=1.5 must lie in \(0, 1\)"):
        L.policy_loss(x["logp"], x["old_logp"], x["adv_tok"], x["mask"], clip_eps=1.5)
    with pytest.raises(ValueError, match=r"top_fraction=0.0 must lie in \(0, 1\]"):
        L.high_entropy_mask(x["entropy"], x["mask"], top_fraction=0.0)
    with pytest.raises(ValueError, match=r"max_len=0 must be a positive"):
        L.aggregate(x["adv_tok"], x["mask"], agg="seq_mean_token_sum_norm", max_len=0)
    with pytest.raises(ValueError, match=r"num_buckets=0 must be >= 1"):
        L.bucket_ids(x["mask"], num_buckets=0)
    with pytest.raises(ValueError, match=r"total_steps=0 must be >= 1"):
        L.holder_p_schedule(0)
