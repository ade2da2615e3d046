"""KL to the reference: the per-token estimators k1, k2, k3 and abs, a sequence's KL, the reward-model
ensemble's aggregation, per-token reward shaping, and the fixed and adaptive KL controllers.
(docs/ppo-fidelity.md items 14-15).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from common.rl_math.logprobs import last_valid_index
from common.rl_math.masked import _check_binary, _check_same_shape, _upcast, _zero_masked, masked_sum


def _kl_k1(x: torch.Tensor) -> torch.Tensor:
    return x


def _kl_k2(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x**2


def _kl_k3(x: torch.Tensor) -> torch.Tensor:
    return torch.expm1(-x) + x


def _kl_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs()


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
    "abs": _kl_abs,
}


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1", clamp: float | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from sampled tokens; logp, ref_logp (B, T) -> (B, T).

    With x = logp - ref_logp: k1 = x (unbiased, can be negative; the references' default), k2 = x^2 / 2,
    k3 = exp(-x) - 1 + x (unbiased, always >= 0), abs = |x|. `clamp` bounds the estimate to
    [-clamp, clamp] (OpenRLHF uses 10). Elementwise: masked positions are the caller's business.
    """
    _check_same_shape("kl_penalty", logp=logp, ref_logp=ref_logp)
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: unknown kind {kind!r}, expected one of {sorted(KL_ESTIMATORS)}")
    kl = KL_ESTIMATORS[kind](_upcast(logp) - _upcast(ref_logp))
    if clamp is not None:
        if not clamp > 0:
            raise ValueError(f"kl_penalty: clamp must be > 0, got {clamp}")
        kl = kl.clamp(min=-clamp, max=clamp)
    return kl


ENSEMBLE_AGGREGATIONS = ("mean", "min", "mean_minus_std")


def sequence_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k1",
    clamp: float | None = None,
) -> torch.Tensor:
    """(B,) the KL of each answer to the reference: the per-token estimator `kind` (`kl_penalty`) summed over
    the answer's valid tokens. What the held-out evaluations report as an answer's KL (the x axis of the
    over-optimisation curve), for PPO, the critic-free estimators and DPO alike."""
    return masked_sum(kl_penalty(logprobs, ref_logprobs, kind, clamp), mask, dim=1)


def ensemble_scores(
    scores: torch.Tensor, aggregation: str = "mean_minus_std", std_coef: float = 1.0
) -> torch.Tensor:
    """One score per sequence from k reward models' scores (k, B) of the same B sequences (Coste et al. 2023,
    "Reward Model Ensembles Help Mitigate Overoptimization"):

        mean            the members' mean
        min             the lowest member's score (worst-case optimisation)
        mean_minus_std  mean - std_coef * std over the members (uncertainty-weighted; population std, so
                        two members 2a apart have std a)

    Members must score on one scale (each normalised by its own stage-2 statistics). Returns (B,) float32
    (or float64 for float64 input)."""
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"ensemble_scores: scores must be (k, B) with k >= 1, got {tuple(scores.shape)}")
    s = _upcast(scores)
    if aggregation == "mean":
        return s.mean(0)
    if aggregation == "min":
        return s.min(0).values
    if aggregation == "mean_minus_std":
        return s.mean(0) - std_coef * s.std(0, unbiased=False)
    raise ValueError(
        f"ensemble_scores: aggregation must be one of {ENSEMBLE_AGGREGATIONS}, got {aggregation!r}"
    )


def shape_rewards(
    score: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    clip_score: float | None = None,
) -> torch.Tensor:
    """Per-token rewards (item 14): r_t = -kl_coef * kl_t, plus the score at the last valid token.

    score (B,) sequence-level reward-model scores (already normalised), kl (B, T) per-token KL estimates
    (see `kl_penalty`), mask (B, T). clip_score clips the score to [-clip_score, clip_score] first.
    Returns rewards (B, T), 0 at masked positions, with sum_t r_t = score - kl_coef * sum_t kl_t * mask_t.
    """
    _check_same_shape("shape_rewards", kl=kl, mask=mask)
    if score.shape != (kl.shape[0],):
        raise ValueError(f"shape_rewards: score must be ({kl.shape[0]},), got {tuple(score.shape)}")
    if kl_coef < 0:
        raise ValueError(f"shape_rewards: kl_coef must be >= 0, got {kl_coef}")
    _check_binary("shape_rewards", mask)
    score = _upcast(score)
    if clip_score is not None:
        if not clip_score > 0:
            raise ValueError(f"shape_rewards: clip_score must be > 0, got {clip_score}")
        score = score.clamp(min=-clip_score, max=clip_score)
    rewards = -kl_coef * _zero_masked(_upcast(kl), mask)
    last = last_valid_index(mask)
    return rewards.scatter_add(1, last.unsqueeze(1), score.to(rewards.dtype).unsqueeze(1))


class FixedKLController:
    """A constant KL coefficient (N+ uses 0.05, DeepSpeed-Chat 0.1); `update` does nothing."""

    kind = "fixed"

    def __init__(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"FixedKLController: value must be >= 0, got {value}")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; same signature as AdaptiveKLController.update."""

    def state_dict(self) -> dict[str, float | str]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        _check_kl_state(self.kind, state)
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019) adaptive KL coefficient (item 15).

    After each rollout batch: err = clip(current_kl / target - 1, -max_error, max_error);
    value *= 1 + err * n_steps / horizon. References: init 0.15, target 6, horizon 10000, max_error 0.2.
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float, max_error: float = 0.2) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"AdaptiveKLController: init_kl_coef must be >= 0, got {init_kl_coef}")
        for name, v in (("target", target), ("horizon", horizon), ("max_error", max_error)):
            if not v > 0:
                raise ValueError(f"AdaptiveKLController: {name} must be > 0, got {v}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.max_error = float(max_error)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt the coefficient.

        current_kl: the batch mean of per-sequence SUMS of the per-token KL (not a per-token mean).
        n_steps: the number of sequences (samples) in that batch.
        """
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: current_kl is not finite ({current_kl})")
        if n_steps < 0:
            raise ValueError(f"AdaptiveKLController.update: n_steps must be >= 0, got {n_steps}")
        err = min(max(current_kl / self.target - 1.0, -self.max_error), self.max_error)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float | str]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        _check_kl_state(self.kind, state)
        self.value = float(state["value"])


def kl_controller(
    adaptive: bool, init_kl_coef: float, target: float, horizon: float
) -> FixedKLController | AdaptiveKLController:
    """Ziegler's adaptive controller (`adaptive`) or a fixed coefficient `init_kl_coef`."""
    if adaptive:
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)


def _check_kl_state(kind: str, state: dict[str, float | str]) -> None:
    if state.get("kind") != kind or "value" not in state:
        raise ValueError(
            f"KL controller state {state!r} does not belong to a {kind} controller "
            f"(expected {{'kind': '{kind}', 'value': ...}})"
        )
