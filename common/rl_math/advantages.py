"""Advantages: GAE with a critic, returns-to-go without one, the group baselines of GRPO, Dr. GRPO, RLOO and
REINFORCE++, and `ADVANTAGE_ESTIMATORS`, the registry that `estimate_advantages` runs.
(docs/ppo-fidelity.md item 16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.rl_math.kl import shape_rewards
from common.rl_math.masked import (
    _check_binary,
    _check_contiguous,
    _check_same_shape,
    _upcast,
    _zero_masked,
    masked_whiten,
)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T) rewards and values with a (B, T) mask.

    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 past the last valid token;
    A_t = delta_t + gamma * lam * A_{t+1}; returns_t = A_t + V_t (before any advantage whitening).
    The valid tokens of each row must be one contiguous block (leading zeros are allowed). The references
    use gamma 1, lam 0.95. Returns (advantages, returns), both (B, T) and 0 at masked positions.
    """
    _check_same_shape("gae", rewards=rewards, values=values, mask=mask)
    _check_binary("gae", mask)
    _check_contiguous("gae", mask)
    valid = mask.bool()
    r = _zero_masked(_upcast(rewards), mask)
    v = _zero_masked(_upcast(values), mask)
    # Masked values are 0, so V_{t+1} past the last valid token is 0 without special-casing.
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    deltas = r + gamma * next_v - v
    running = torch.zeros_like(r[:, 0])
    reversed_advantages = []
    for t in reversed(range(r.shape[1])):
        # Reset at masked slots so that a row's leading zeros start from a clean state.
        running = torch.where(valid[:, t], deltas[:, t] + gamma * lam * running, torch.zeros_like(running))
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = _zero_masked(advantages + v, mask)
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Returns-to-go G_t = r_t + gamma * G_{t+1} over (B, T) rewards with a (B, T) mask (G = 0 past the last
    valid token): GAE with V = 0 and lam = 1. Returns (B, T), 0 at masked positions."""
    _check_same_shape("discounted_returns", rewards=rewards, mask=mask)
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return returns


# Group baselines: sequence scores (B,) of B = G * n samples, n consecutive samples per prompt (a group).


def _groups(fn: str, scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) scores -> (G, n) view, checked: 1-dim, n >= 2, B a multiple of n."""
    if scores.dim() != 1:
        raise ValueError(f"{fn}: scores must be (B,), got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"{fn}: a group baseline needs at least 2 samples per prompt, got {group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(f"{fn}: {scores.shape[0]} scores do not split into groups of {group_size}")
    return _upcast(scores).view(-1, group_size)


def grpo_scores(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (s_i - mean_g) / (std_g + eps) within each group g of `group_size`
    consecutive scores; std is the sample (unbiased, n - 1) standard deviation, as TRL and veRL compute it,
    and eps (1e-6, veRL's) keeps a group of equal scores at 0 rather than 0 / 0. (B,) -> (B,)."""
    g = _groups("grpo_scores", scores, group_size)
    return ((g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)).view(-1)


def dr_grpo_scores(scores: torch.Tensor, group_size: int, eps: float = 0.0) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): s_i - mean_g, GRPO without the division by the group's std (which
    up-weights prompts whose answers all score alike). (B,) -> (B,); eps is unused (one signature)."""
    g = _groups("dr_grpo_scores", scores, group_size)
    return (g - g.mean(dim=1, keepdim=True)).view(-1)


def rloo_scores(scores: torch.Tensor, group_size: int, eps: float = 0.0) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): s_i - mean_{j != i} s_j, the leave-one-out baseline of the group,
    which equals n / (n - 1) * (s_i - mean_g). (B,) -> (B,); eps is unused (one signature)."""
    g = _groups("rloo_scores", scores, group_size)
    n = g.shape[1]
    return (g - (g.sum(dim=1, keepdim=True) - g) / (n - 1)).view(-1)


def informative_groups(scores: torch.Tensor, group_size: int, tol: float = 0.0) -> torch.Tensor:
    """DAPO's dynamic-sampling filter (Yu et al. 2025): (G,) bool, True for each group of `group_size`
    consecutive scores whose max - min exceeds tol. A group whose answers all scored alike has a group
    baseline equal to every score, so every advantage is 0 and it trains nothing but the KL term."""
    g = _groups("informative_groups", scores, group_size)
    return (g.max(dim=1).values - g.min(dim=1).values) > tol


def overlong_penalty(
    lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), added to each answer's score: (B,) answer lengths in
    tokens -> (B,) penalties. 0 up to max_len - buffer_len, then falling linearly to -factor at max_len:
    factor * ((max_len - buffer_len) - length) / buffer_len, and -factor beyond max_len."""
    if lengths.dim() != 1:
        raise ValueError(f"overlong_penalty: lengths must be (B,), got shape {tuple(lengths.shape)}")
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"overlong_penalty: need 0 < buffer_len <= max_len, got {buffer_len}, {max_len}")
    if not factor >= 0:
        raise ValueError(f"overlong_penalty: factor must be >= 0, got {factor}")
    over = lengths.to(torch.float32) - (max_len - buffer_len)
    return -factor * (over / buffer_len).clamp(min=0.0, max=1.0)


@dataclass(frozen=True)
class AdvantageEstimator:
    """How one estimator turns scores, KL and values into advantages (see `estimate_advantages`).

    baseline:   the group transform of the sequence scores (None: the raw scores); needs groups of >= 2
    returns:    "gae" (needs a critic's values) or "discounted" (returns-to-go, no critic)
    whiten:     whether the advantages are whitened over the batch by default
    loss_agg:   the default aggregation of the per-token policy loss (LOSS_AGGREGATIONS)
    """

    baseline: Callable[[torch.Tensor, int, float], torch.Tensor] | None
    returns: str
    whiten: bool
    loss_agg: str

    @property
    def needs_critic(self) -> bool:
        return self.returns == "gae"

    @property
    def needs_groups(self) -> bool:
        return self.baseline is not None


def _reinforce_baseline(scores: torch.Tensor, group_size: int, eps: float = 0.0) -> torch.Tensor:
    return dr_grpo_scores(scores, group_size)  # the group mean subtracted, before KL shaping and whitening


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    # PPO: GAE over KL-shaped per-token rewards and the critic's values, whitened (items 14, 16, 17).
    "gae": AdvantageEstimator(None, "gae", whiten=True, loss_agg="token_mean"),
    # GRPO: group-normalised scores; the paper averages each sequence's token losses, then the sequences.
    "grpo": AdvantageEstimator(grpo_scores, "discounted", whiten=False, loss_agg="seq_mean_token_mean"),
    # Dr. GRPO: group mean only, and a constant normaliser instead of each answer's length.
    "dr_grpo": AdvantageEstimator(
        dr_grpo_scores, "discounted", whiten=False, loss_agg="seq_mean_token_sum_norm"
    ),
    "rloo": AdvantageEstimator(rloo_scores, "discounted", whiten=False, loss_agg="token_mean"),
    # REINFORCE++ (Hu 2025): returns-to-go of the KL-shaped rewards, whitened over the batch.
    "reinforce_pp": AdvantageEstimator(None, "discounted", whiten=True, loss_agg="token_mean"),
    "reinforce_pp_baseline": AdvantageEstimator(
        _reinforce_baseline, "discounted", whiten=True, loss_agg="token_mean"
    ),
}


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The advantage estimator registered under `name` (ADVANTAGE_ESTIMATORS)."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}, expected one of {sorted(ADVANTAGE_ESTIMATORS)}"
        )
    return ADVANTAGE_ESTIMATORS[name]


def estimate_advantages(
    estimator: str,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
    eps: float = 1e-6,
    clip_score: float | None = None,
    whiten_rewards: bool = False,
    whiten: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advantages of any registered estimator, in four steps:

        1. s = clip(scores, +-clip_score), then the estimator's group baseline: s <- baseline(s) per group
           of `group_size` consecutive samples (grpo, dr_grpo, rloo, reinforce_pp_baseline);
        2. per-token rewards r = shape_rewards(s, kl, mask, kl_coef): -kl_coef * kl_t, plus s at the last
           valid token (kl_coef = 0 puts no KL in the reward, e.g. when KL is a loss term); optionally
           scaled by their std (whiten_rewards, mean kept);
        3. "gae" estimators: GAE of r and `values` (gamma, lam); the others: returns-to-go of r (gamma), and
           the advantage is the return: with gamma = 1 and no KL in the reward, every token of a sequence
           gets its sequence's (baselined) score, as in GRPO;
        4. whitening of the advantages over the batch: `whiten`, or the estimator's default when None.

    scores (B,), kl (B, T), mask (B, T), values (B, T) (for "gae" only). Returns (advantages, returns,
    rewards), each (B, T) and 0 at masked positions.
    """
    spec = get_advantage_estimator(estimator)
    _check_same_shape("estimate_advantages", kl=kl, mask=mask)
    if spec.needs_critic and values is None:
        raise ValueError(f"estimate_advantages: {estimator!r} needs the critic's values")
    s = _upcast(scores)
    if clip_score is not None:
        if not clip_score > 0:
            raise ValueError(f"estimate_advantages: clip_score must be > 0, got {clip_score}")
        s = s.clamp(min=-clip_score, max=clip_score)
    if spec.baseline is not None:
        s = spec.baseline(s, group_size, eps)
    rewards = shape_rewards(s, kl, mask, kl_coef)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if spec.needs_critic:
        advantages, returns = gae(rewards, values, mask, gamma, lam)
    else:
        returns = discounted_returns(rewards, mask, gamma)
        advantages = returns
    if spec.whiten if whiten is None else whiten:
        advantages = masked_whiten(advantages, mask, shift_mean=True)
    return advantages, returns, rewards
