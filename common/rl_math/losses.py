"""Losses: aggregation over tokens and sequences, the clipped policy loss and its variants (DAPO's clip-higher,
dual-clip PPO, GSPO's sequence-level ratio, truncated importance sampling), the KL loss, the clipped value
loss, and the preference losses: DPO and IPO against a reference, KTO on unpaired rows, ORPO and SimPO without
a reference.
(docs/ppo-fidelity.md item 18).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.rl_math.kl import kl_penalty
from common.rl_math.masked import _check_same_shape, _upcast, _zero_masked, masked_mean, masked_sum

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate_loss(
    losses: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", norm_length: int | None = None
) -> torch.Tensor:
    """Reduce per-token losses (B, T) over the valid tokens of a (B, T) mask to a 0-dim loss.

    token_mean                the mean over all valid tokens (each token weighs alike; the references')
    seq_mean_token_mean       the mean over sequences of each sequence's token mean (each sequence weighs
                              alike, so a token of a short answer weighs more: GRPO's paper)
    seq_mean_token_sum_norm   sum over tokens / (B * norm_length), norm_length a constant such as the
                              answer budget (Dr. GRPO: no length normalisation at all)
    """
    _check_same_shape("aggregate_loss", losses=losses, mask=mask)
    if mode == "token_mean":
        return masked_mean(losses, mask)
    if mode == "seq_mean_token_mean":
        return masked_mean(losses, mask, dim=1).mean()
    if mode == "seq_mean_token_sum_norm":
        if norm_length is None or norm_length < 1:
            raise ValueError(f"aggregate_loss: {mode} needs a norm_length >= 1, got {norm_length}")
        return masked_sum(losses, mask) / (losses.shape[0] * norm_length)
    raise ValueError(f"aggregate_loss: unknown mode {mode!r}, expected one of {list(LOSS_AGGREGATIONS)}")


POLICY_RATIO_LEVELS = ("token", "sequence")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    loss_agg: str = "token_mean",
    norm_length: int | None = None,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: aggregate(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))).

    logp (B, T) from the current policy (carries the gradient), old_logp (B, T) from the rollout,
    advantages (B, T) (already whitened if wanted), mask (B, T). eps is 0.2 in the references.
    The variants, each off by default and composable with every estimator and aggregation:

    clip_eps_high   the upper clip bound 1 + clip_eps_high (DAPO's "clip-higher", Yu et al. 2025: 0.28 with
                    clip_eps 0.2), so low-probability tokens with a positive advantage can still rise.
    dual_clip       c > 1: for A < 0 the per-token loss is also capped at -A * c (dual-clip PPO, Ye et al.
                    2020), so a ratio far above 1 on a bad token cannot make the loss unbounded.
    ratio_level     "token" (PPO) or "sequence" (GSPO, Zheng et al. 2025): every token of answer i uses
                    s_i = exp(mean over its valid tokens of (logp - old_logp)), the length-normalised
                    sequence ratio, clipped per sequence. Implemented in GSPO-token form, ratio_t =
                    sg[s_i] * exp(logp_t - sg[logp_t]): its value is s_i, its gradient s_i * d logp_t, so
                    with advantages constant over an answer (GRPO's) and seq_mean_token_mean this is GSPO.
    is_weights      (B, T) per-token importance weights, detached (`truncated_is_weights`: truncated
                    importance sampling, TIS, for rollouts sampled by another engine), multiplying each
                    token's loss before aggregation.

    Returns (loss, stats): loss is a 0-dim tensor, the per-token losses of this micro-batch reduced by
    `aggregate_loss(loss_agg, norm_length)` (the references' token mean by default); stats are detached
    0-dim token means: clipfrac (fraction of valid tokens where the clipped term is strictly larger, i.e.
    active), approx_kl = 0.5 * mean((logp - old_logp)^2), ratio_mean (of the ratio used: s_i at sequence
    level), and dual_clipfrac when dual_clip is set (fraction of valid tokens held at -A * c).
    """
    _check_same_shape("policy_loss", logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if not clip_eps > 0 or not high > 0:
        raise ValueError(f"policy_loss: clip ranges must be > 0, got low {clip_eps}, high {high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"policy_loss: dual_clip must be > 1, got {dual_clip}")
    if ratio_level not in POLICY_RATIO_LEVELS:
        raise ValueError(
            f"policy_loss: ratio_level must be one of {POLICY_RATIO_LEVELS}, got {ratio_level!r}"
        )
    # Zero the log-ratio before exp so that garbage in masked slots cannot give exp() = inf (and NaN grads).
    token_log_ratio = _zero_masked(_upcast(logp) - _upcast(old_logp), mask)
    adv = _zero_masked(_upcast(advantages), mask).detach()
    log_ratio = token_log_ratio
    if ratio_level == "sequence":
        # (B, 1) mean over each answer's valid tokens; an answer with none (all masked) gets 0
        count = mask.bool().sum(dim=1, keepdim=True).clamp(min=1)
        seq_log_ratio = (masked_sum(token_log_ratio, mask, dim=1, keepdim=True) / count).detach()
        log_ratio = _zero_masked(seq_log_ratio + token_log_ratio - token_log_ratio.detach(), mask)
    ratio = torch.exp(log_ratio)
    losses = -adv * ratio
    losses_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(losses, losses_clipped)
    if dual_clip is not None:
        capped = torch.minimum(per_token, -adv * dual_clip)
        held = (adv < 0) & (capped < per_token)
        per_token = torch.where(adv < 0, capped, per_token)
    if is_weights is not None:
        _check_same_shape("policy_loss", is_weights=is_weights, mask=mask)
        per_token = per_token * _zero_masked(_upcast(is_weights), mask).detach()
    loss = aggregate_loss(per_token, mask, loss_agg, norm_length)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((losses_clipped > losses).to(loss.dtype), mask),
            "approx_kl": 0.5 * masked_mean(token_log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if dual_clip is not None:
            stats["dual_clipfrac"] = masked_mean(held.to(loss.dtype), mask)
    return loss, stats


def truncated_is_weights(
    old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance-sampling weights (TIS): min(exp(old_logp - behaviour_logp), cap), detached, (B, T),
    0 at masked positions. old_logp (B, T) are the learner's log-probs of the rollout (the training engine's
    forward), behaviour_logp (B, T) those of the engine that sampled it (an inference engine whose kernels,
    precision or weights lag the learner's); the weight corrects the mismatch, truncated at cap (2 in the
    TIS note of Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training").
    Equal log-probs give weights of exactly 1."""
    _check_same_shape("truncated_is_weights", old_logp=old_logp, behaviour_logp=behaviour_logp, mask=mask)
    if not cap > 0:
        raise ValueError(f"truncated_is_weights: cap must be > 0, got {cap}")
    log_w = _zero_masked(_upcast(old_logp) - _upcast(behaviour_logp), mask).detach()
    return _zero_masked(torch.exp(log_w).clamp(max=cap), mask)


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k3",
    loss_agg: str = "token_mean",
    norm_length: int | None = None,
) -> torch.Tensor:
    """KL(pi || ref) as a loss term (GRPO: k3 = exp(ref - logp) - (ref - logp) - 1, beta 0.04 in the paper)
    instead of a reward penalty: the per-token estimate `kl_penalty(kind)` of the CURRENT policy's log-probs
    logp (B, T, carries the gradient) against the reference's ref_logp (B, T), reduced like the policy loss.
    Returns a 0-dim tensor (the caller multiplies by its coefficient)."""
    _check_same_shape("kl_loss", logp=logp, ref_logp=ref_logp, mask=mask)
    # Zero the log-ratio first: exp() of garbage at masked slots would poison the gradient with inf * 0.
    log_ratio = _zero_masked(_upcast(logp) - _upcast(ref_logp).detach(), mask)
    per_token = kl_penalty(log_ratio, torch.zeros_like(log_ratio), kind=kind)
    return aggregate_loss(per_token, mask, loss_agg, norm_length)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * masked_mean(max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)).

    values (B, T) from the current critic (carries the gradient), old_values (B, T) from the rollout,
    returns (B, T) from `gae`, mask (B, T). c is 0.2 in the references.
    Returns (loss, stats): loss is a 0-dim tensor (mean over this micro-batch's valid tokens); stats holds
    the detached clipfrac, the fraction of valid tokens where the clipped term is strictly larger.
    """
    _check_same_shape("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    if not clip_range > 0:
        raise ValueError(f"value_loss: clip_range must be > 0, got {clip_range}")
    v = _zero_masked(_upcast(values), mask)
    v_old = _zero_masked(_upcast(old_values), mask).detach()
    ret = _zero_masked(_upcast(returns), mask).detach()
    v_clipped = torch.clamp(v, v_old - clip_range, v_old + clip_range)
    losses = (v - ret) ** 2
    losses_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, losses_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((losses_clipped > losses).to(loss.dtype), mask)}
    return loss, stats


# --------------------------------------------------------------------------------------------------------
# Preference losses: DPO and its variants (stage 2, DPO)
# --------------------------------------------------------------------------------------------------------


def _dpo_sigmoid(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), conservative with label_smoothing e (the label flipped with probability e):
    -(1 - e) * log sigmoid(beta * h) - e * log sigmoid(-beta * h)."""
    return -(1 - label_smoothing) * torch.nn.functional.logsigmoid(beta * h) - (
        label_smoothing * torch.nn.functional.logsigmoid(-beta * h)
    )


def _ipo(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): (h - 1 / (2 * beta))^2, h over whole-sequence log-ratios (the paper's form)."""
    if label_smoothing:
        raise ValueError("preference_loss: label_smoothing is a DPO (sigmoid) option; IPO has none")
    return (h - 1 / (2 * beta)) ** 2


PREFERENCE_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "ipo": _ipo,
}


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference loss of pairs from whole-response log-probabilities, each (B,): the sums of
    log pi(token) over each response's tokens (EOS included) under the policy and under the frozen reference.

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), the margin of the implicit rewards
    r = beta * (log pi - log pi_ref) divided by beta; `loss_type` picks the loss of h (PREFERENCE_LOSSES:
    "sigmoid" = DPO, conservative DPO when label_smoothing > 0; "ipo" = IPO). beta is 0.1 in DPO's paper.
    Returns (losses (B,), stats): stats are detached (B,) tensors: chosen_reward and rejected_reward
    (beta * log-ratio), margin (their difference), accuracy (1 where chosen_reward > rejected_reward).
    """
    _check_same_shape(
        "preference_loss",
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(
            f"preference_loss: unknown loss_type {loss_type!r}, expected one of {sorted(PREFERENCE_LOSSES)}"
        )
    if not beta > 0:
        raise ValueError(f"preference_loss: beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"preference_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = _upcast(policy_chosen) - _upcast(ref_chosen).detach()
    rejected_ratio = _upcast(policy_rejected) - _upcast(ref_rejected).detach()
    losses = PREFERENCE_LOSSES[loss_type](chosen_ratio - rejected_ratio, beta, label_smoothing)
    with torch.no_grad():
        chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
        stats = {
            "chosen_reward": chosen_reward,
            "rejected_reward": rejected_reward,
            "margin": chosen_reward - rejected_reward,
            "accuracy": (chosen_reward > rejected_reward).to(chosen_reward.dtype),
        }
    return losses, stats


def _pair_stats(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> dict[str, torch.Tensor]:
    """The detached (B,) statistics every pair loss reports, from its implicit rewards."""
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    return {
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
        "margin": chosen_reward - rejected_reward,
        "accuracy": (chosen_reward > rejected_reward).to(chosen_reward.dtype),
    }


def simpo_loss(
    chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, beta: float, gamma: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al. 2024), no reference: -log sigmoid(beta * (avg_c - avg_r) - gamma).

    chosen_avg_logp, rejected_avg_logp (B,): each response's mean log pi(token) over its tokens (EOS
    included): the length-normalised log-likelihood is the implicit reward, divided by beta; gamma is the
    target margin (the paper: beta 2.0-2.5, gamma/beta about 0.5). Returns (losses (B,), stats) with
    chosen_reward = beta * avg_c, rejected_reward = beta * avg_r, their margin and accuracy, detached.
    """
    _check_same_shape("simpo_loss", chosen_avg_logp=chosen_avg_logp, rejected_avg_logp=rejected_avg_logp)
    if not beta > 0:
        raise ValueError(f"simpo_loss: beta must be > 0, got {beta}")
    if not gamma >= 0:
        raise ValueError(f"simpo_loss: gamma must be >= 0, got {gamma}")
    chosen_reward, rejected_reward = beta * _upcast(chosen_avg_logp), beta * _upcast(rejected_avg_logp)
    losses = -torch.nn.functional.logsigmoid(chosen_reward - rejected_reward - gamma)
    return losses, _pair_stats(chosen_reward, rejected_reward)


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(avg_logp) (B,), the odds of a response under ORPO's length-normalised
    likelihood; avg_logp must be < 0 (log(1 - p) is computed as log(-expm1(avg_logp)), exact near 0)."""
    return avg_logp - torch.log(-torch.expm1(avg_logp))


def orpo_loss(
    chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024), no reference: the chosen response's NLL plus beta (the paper's lambda, 0.1)
    times the odds-ratio term -log sigmoid(log odds(chosen) - log odds(rejected)).

    chosen_avg_logp, rejected_avg_logp (B,): each response's mean log pi(token) (EOS included), so the NLL
    term is -chosen_avg_logp, the token mean of each chosen response. Returns (losses (B,), stats): stats
    as `preference_loss` with the implicit rewards beta * avg log pi (TRL's), plus log_odds_ratio, detached.
    """
    _check_same_shape("orpo_loss", chosen_avg_logp=chosen_avg_logp, rejected_avg_logp=rejected_avg_logp)
    if not beta > 0:
        raise ValueError(f"orpo_loss: beta must be > 0, got {beta}")
    chosen, rejected = _upcast(chosen_avg_logp), _upcast(rejected_avg_logp)
    ratio = log_odds(chosen) - log_odds(rejected)
    losses = -chosen - beta * torch.nn.functional.logsigmoid(ratio)
    stats = _pair_stats(beta * chosen, beta * rejected)
    stats["log_odds_ratio"] = ratio.detach()
    return losses, stats


def kto_loss(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO (Ethayarajh et al. 2024) on unpaired rows: with r = log pi(y|x) - log pi_ref(y|x) (whole-response
    sums, (N,)) and the reference point z0 = max(0, kl) (detached: no gradient flows through it),

        desirable rows     desirable_weight   * (1 - sigmoid(beta * (r - z0)))
        undesirable rows   undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

    desirable (N,) bool; kl a 0-dim estimate of KL(pi || pi_ref), the paper's: the mean r over responses
    paired with another row's prompt. The paper's weights keep desirable_weight * n_desirable /
    (undesirable_weight * n_undesirable) in [1, 4/3]. Returns (losses (N,), stats): reward (beta * r),
    detached.
    """
    _check_same_shape("kto_loss", policy_logp=policy_logp, ref_logp=ref_logp, desirable=desirable)
    if kl.dim() != 0:
        raise ValueError(f"kto_loss: kl must be a 0-dim estimate, got shape {tuple(kl.shape)}")
    if not beta > 0:
        raise ValueError(f"kto_loss: beta must be > 0, got {beta}")
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ValueError(
            f"kto_loss: the weights must be > 0, got {desirable_weight} and {undesirable_weight}"
        )
    r = _upcast(policy_logp) - _upcast(ref_logp).detach()
    z0 = _upcast(kl).detach().clamp(min=0)
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    return losses, {"reward": (beta * r).detach()}


@dataclass(frozen=True)
class PreferenceMethod:
    """What a preference loss needs: a frozen reference, pairs or unpaired rows, its paper's beta."""

    title: str
    reference: bool  # needs the frozen reference policy (False: no second model is loaded)
    paired: bool  # trains on (chosen, rejected) pairs; False: unpaired rows labelled desirable or not
    beta: float  # the paper's default strength (--beta)


# --loss_type of the DPO stage.
PREFERENCE_METHODS = {
    "sigmoid": PreferenceMethod("DPO", reference=True, paired=True, beta=0.1),
    "ipo": PreferenceMethod("IPO", reference=True, paired=True, beta=0.1),
    "kto": PreferenceMethod("KTO", reference=True, paired=False, beta=0.1),
    "orpo": PreferenceMethod("ORPO", reference=False, paired=True, beta=0.1),
    "simpo": PreferenceMethod("SimPO", reference=False, paired=True, beta=2.0),
}
