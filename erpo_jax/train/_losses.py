"""Losses by name: ``loss.name`` -> a pure function the train step differentiates.

Each named loss is one of the library's pure losses with the hyperparameters
of its paper (METHOD.md), bound at the script boundary. The returned
function has one signature for all of them::

    loss_fn(logp, batch, *, denominator, step) -> (loss, aux_dict)

``batch`` holds the arrays of a micro-batch of whole groups (rows
prompt-major): ``mask``, ``old_logp``, ``ref_logp`` (when the loss needs a
reference), ``entropy`` (the sampler's), ``rewards [P, G]``, and for some
losses ``token_keep`` (80/20) or ``residual_norm`` (ARCA). ``denominator`` is
the aggregation denominator of the whole mini-batch, so the micro-batch
losses and gradients sum to the mini-batch's exactly; ``step`` is the
optimizer step (HolderPO's p schedule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from erpo_jax import losses as L
from erpo_jax.train._config import LossConfig

__all__ = ["DEFAULT_AGG", "loss_agg", "loss_denominator", "make_loss_fn"]

DEFAULT_AGG: dict[str, str] = {
    "grpo": "seq_mean_token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
    "dapo": "token_mean",
    "erpo": "token_mean",
    "holder": "seq_mean_token_mean",  # rows averaged with 1/B, as the loss defines
    "gspo": "seq_mean_token_mean",
    "entropy_top20": "token_mean",
    "arca": "seq_mean_token_mean",
}
"""The aggregation each method's paper uses, when ``loss.agg`` is null."""

_SEQUENCE_LOSSES = ("holder", "gspo")


def loss_agg(cfg: LossConfig) -> str:
    """The aggregation mode of ``cfg`` (its own, or the method's default)."""
    if cfg.name in _SEQUENCE_LOSSES:
        return "seq_mean_token_mean"
    return cfg.agg or DEFAULT_AGG[cfg.name]


def loss_denominator(cfg: LossConfig, mask: Any, *, max_len: int) -> Any:
    """The aggregation denominator of a whole (mini-)batch: tokens, or rows, or ``B * L``."""
    mask = jnp.asarray(mask, bool)
    if cfg.name in _SEQUENCE_LOSSES:
        return jnp.float32(mask.shape[0])
    zeros = jnp.zeros(mask.shape, jnp.float32)
    _, den = L.aggregate_parts(zeros, mask, agg=loss_agg(cfg), max_len=cfg.max_len or max_len)
    return den


def _policy_kw(cfg: LossConfig, *, max_len: int, clip_high_default: float | None = None):
    return dict(
        clip_eps=cfg.clip_eps,
        clip_eps_high=cfg.clip_eps_high if cfg.clip_eps_high is not None else clip_high_default,
        clip_c=cfg.clip_c,
        agg=loss_agg(cfg),
        max_len=cfg.max_len or max_len,
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator,
    )


def _aux(aux: Any) -> dict[str, Any]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in aux._asdict().items()}


def make_loss_fn(cfg: LossConfig, *, max_len: int, total_steps: int) -> Callable[..., Any]:
    """The pure loss function of ``cfg.name`` (see the module docstring).

    Args:
      cfg: the loss section of the run config.
      max_len: the completion budget T (Dr. GRPO's normalizer when ``loss.max_len`` is null).
      total_steps: optimizer steps of the run (HolderPO's p schedule spans them).
    """
    name = cfg.name
    ref_needed = cfg.needs_reference

    def ref(batch):
        return batch["ref_logp"] if ref_needed else None

    if name in ("grpo", "dr_grpo", "dapo"):
        kw = _policy_kw(cfg, max_len=max_len, clip_high_default=0.28 if name == "dapo" else None)
        normalize = cfg.normalize_std if cfg.normalize_std is not None else name != "dr_grpo"

        def grpo_family(logp, batch, *, denominator, step):
            loss, aux = L.grpo_loss(
                logp,
                batch["old_logp"],
                batch["rewards"],
                batch["mask"],
                ref_logp=ref(batch),
                normalize_std=normalize,
                denominator=denominator,
                **kw,
            )
            return loss, _aux(aux)

        return grpo_family

    if name == "erpo":
        kw = _policy_kw(cfg, max_len=max_len)
        erpo_kw = dict(
            gamma=cfg.gamma,
            num_buckets=cfg.num_buckets,
            beta=cfg.beta,
            eta=cfg.eta,
            gate_mode=cfg.gate_mode,
            normalize_std=cfg.normalize_std if cfg.normalize_std is not None else True,
        )
        extra = dict(
            psi_gate=cfg.psi_gate,
            progress_std_floor=cfg.progress_std_floor,
            progress_source=cfg.progress_source,
        )
        # The ERPO keywords of METHOD.md's tightened section 2 are passed only
        # when they differ from the paper-form defaults, so the loss works
        # with or without them.
        extra = {
            k: v
            for k, v in extra.items()
            if v != {"psi_gate": True, "progress_std_floor": 0.0, "progress_source": "old"}[k]
        }

        def erpo(logp, batch, *, denominator, step):
            loss, aux = L.erpo_loss(
                logp,
                batch["old_logp"],
                batch["rewards"],
                batch["entropy"],
                batch["mask"],
                ref_logp=ref(batch),
                denominator=denominator,
                **erpo_kw,
                **extra,
                **kw,
            )
            return loss, _aux(aux)

        return erpo

    if name in _SEQUENCE_LOSSES:
        schedule = (
            L.holder_p_schedule(total_steps, p_start=cfg.holder_p_start, p_end=cfg.holder_p_end)
            if name == "holder"
            else None
        )

        def sequence(logp, batch, *, denominator, step):
            rewards = batch["rewards"]
            adv = L.group_advantages(rewards).reshape(-1)
            if name == "holder":
                assert schedule is not None
                loss, aux = L.holder_loss(
                    logp,
                    batch["old_logp"],
                    adv,
                    batch["mask"],
                    p=schedule(step),
                    clip_eps=cfg.clip_eps,
                )
            else:
                loss, aux = L.gspo_loss(
                    logp,
                    batch["old_logp"],
                    adv,
                    batch["mask"],
                    clip_eps=cfg.gspo_clip_low,
                    clip_eps_high=cfg.gspo_clip_high,
                )
            # Sequence losses average rows with 1/B: rescaling by this
            # micro-batch's share of the rows makes the micro-batch losses sum
            # to the mini-batch's exactly.
            rows = jnp.float32(batch["mask"].shape[0])
            return loss * rows / denominator, _aux(aux)

        return sequence

    if name in ("entropy_top20", "arca"):
        kw = _policy_kw(cfg, max_len=max_len)

        def token_credit(logp, batch, *, denominator, step):
            adv_seq = L.group_advantages(batch["rewards"]).reshape(-1)
            mask = batch["mask"]
            if name == "entropy_top20":
                # The keep-mask is computed once on the whole batch (a batch
                # quantile); dropped tokens keep their place in the normalizer
                # and get no policy gradient.
                adv_tok = jnp.where(batch["token_keep"], adv_seq[:, None], 0.0)
            else:
                adv_tok = L.arca_token_advantages(
                    adv_seq, batch["residual_norm"], mask, power=cfg.arca_power
                )
            loss, aux = L.policy_loss(
                logp,
                batch["old_logp"],
                adv_tok,
                mask,
                ref_logp=ref(batch),
                denominator=denominator,
                **kw,
            )
            return loss, _aux(aux)

        return token_credit

    raise AssertionError(f"unhandled loss {name}")  # LossConfig validated the name
