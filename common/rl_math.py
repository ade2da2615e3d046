"""RL math for language models (PPO and the critic-free estimators GRPO, Dr. GRPO, RLOO, REINFORCE++; the
preference losses of DPO): pure functions over tensors with explicit masks.

Nothing here touches a model, an optimizer or DeepSpeed; every function takes tensors and returns tensors,
so each formula can be unit-tested against hand-computed numbers (tests/test_rl_math.py).
Item numbers below refer to docs/ppo-fidelity.md.

Conventions
-----------
- Per-token tensors are (B, T) over RESPONSE positions: position t holds log pi(a_t | s_t) of response
  token a_t, the value V(s_t) read at the same position, the reward r_t for emitting a_t.
- `mask` is (B, T), 1 on valid response tokens (up to and including the first EOS), 0 after. It may be
  float, int or bool. It is always passed explicitly. Values at masked positions may be garbage (huge but
  finite numbers) and never change a result: inputs are zeroed with `torch.where` (not multiplied by the
  mask) before any arithmetic, so garbage cannot overflow into inf/NaN in values or gradients.
- Outputs that are per-token are 0 at masked positions.
- Every constant (kl_coef, gamma, lam, clip ranges, eps, temperature) is a parameter; the defaults quoted
  in docstrings are the references' values, not values baked in here.
- Half-precision inputs (fp16/bf16) are upcast to float32 before log-softmax, exp, the masked sums and
  statistics (so whitening too), KL, rewards, GAE and the losses; float32/float64 inputs keep their dtype.
  Under `--dtype bf16` every per-token tensor of PPO is therefore float32 (tests/test_bf16.py).

Items covered: 6-7 (temperature, the [C-1 : -1] slice), 14 (per-token rewards), 15 (KL controllers),
16 (GAE), 17 (whitening), 18 (clipped policy and value losses).

Advantage estimators
--------------------
`ADVANTAGE_ESTIMATORS` registers each estimator as a group baseline of the sequence scores, a kind of return
(GAE with a critic, or returns-to-go without) and its defaults (whitening, loss aggregation);
`estimate_advantages` is the one entry point that runs any of them. Group estimators take B = G * n scores,
the n samples of each prompt consecutive.

Loss normalisation
------------------
`value_loss`, and `policy_loss` / `kl_loss` with the default loss_agg="token_mean", return the mean over the
valid tokens OF THE MICRO-BATCH they are given
(a per-micro-batch token mean, as OpenAI's lm-human-preferences and DeepSpeed-Chat do). Under gradient
accumulation each micro-batch therefore gets equal weight, whatever its number of valid tokens; a token in
a micro-batch of short responses weighs more than one in a micro-batch of long responses. This is the
references' behaviour and is kept on purpose; a caller wanting a per-token mean over the whole minibatch
must use `masked_sum` and divide by the minibatch's token count itself. `aggregate_loss` states the other
choices (a mean of per-sequence means, GRPO's; a constant normaliser, Dr. GRPO's).

Whitening statistics are local to the tensor given (one process); nothing here all-reduces across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "AdvantageEstimator",
    "aggregate_loss",
    "discounted_returns",
    "dr_grpo_scores",
    "estimate_advantages",
    "grpo_scores",
    "kl_loss",
    "rloo_scores",
    "PREFERENCE_LOSSES",
    "ENSEMBLE_AGGREGATIONS",
    "ensemble_scores",
    "entropy_from_logits",
    "gae",
    "get_advantage_estimator",
    "kl_penalty",
    "last_valid_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "pair_response_mask",
    "preference_loss",
    "response_logprobs",
    "response_mask",
    "response_positions",
    "shape_rewards",
    "value_loss",
]

Dim = int | tuple[int, ...] | None


# --------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------


def _check_same_shape(fn: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError naming `fn` and every argument's shape when the shapes differ."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name}{shape}" for name, shape in shapes.items())
        raise ValueError(f"{fn}: tensors must have the same shape, got {described}")


def _check_binary(fn: str, mask: torch.Tensor) -> None:
    """Raise ValueError naming the first (row, position) whose mask holds a value other than 0 or 1."""
    if mask.dtype == torch.bool:
        return
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{fn}: mask must hold only 0 and 1, (row, position) {index} holds {mask[index].item()}"
        )


def _check_rows_nonempty(fn: str, mask: torch.Tensor) -> None:
    """Raise ValueError naming the first row of a (B, T) mask with no valid token."""
    empty = ~mask.bool().any(dim=-1)
    if empty.any():
        row = int(empty.nonzero()[0][0])
        raise ValueError(f"{fn}: row {row} of the mask has no valid token")


def _check_contiguous(fn: str, mask: torch.Tensor) -> None:
    """Raise ValueError naming the first row of a (B, T) mask whose valid tokens are not one block."""
    m = mask.bool().to(torch.int8)
    starts = (m[:, 1:] > m[:, :-1]).sum(dim=1) + m[:, 0]
    bad = starts > 1
    if bad.any():
        row = int(bad.nonzero()[0][0])
        raise ValueError(
            f"{fn}: row {row} of the mask has a hole (valid tokens must be one contiguous block)"
        )


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision floats to float32; anything else unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with masked positions set to 0 (no arithmetic on the garbage, so no inf/NaN in value or grad)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------------------------------------
# Masked statistics (item 17)
# --------------------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None, keepdim: bool = False) -> torch.Tensor:
    """Sum of `x` over positions where `mask` is set; x and mask have the same shape.

    dim=None sums everything (0-dim result); otherwise sums over `dim` like `torch.sum`.
    """
    _check_same_shape("masked_sum", x=x, mask=mask)
    z = _zero_masked(_upcast(x), mask)
    return z.sum() if dim is None else z.sum(dim=dim, keepdim=keepdim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None, keepdim: bool = False) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is set.

    dim=None: one mean over all valid entries (0-dim). dim given: a mean per remaining index, e.g. dim=1 on
    (B, T) gives (B,). Raises ValueError if a mean would be over zero valid entries.
    """
    _check_same_shape("masked_mean", x=x, mask=mask)
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim, keepdim=keepdim)
    if (count == 0).any():
        where = "" if dim is None else f" (index {int((count == 0).nonzero()[0][0])} along the kept dims)"
        raise ValueError(f"masked_mean: the mask has no valid entry{where}")
    return masked_sum(x, mask, dim=dim, keepdim=keepdim) / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False, dim: Dim = None) -> torch.Tensor:
    """Variance of `x` over valid positions; population variance (divide by n) unless `unbiased`.

    Item 17 requires unbiased=False for whitening. With unbiased=True, n must be at least 2.
    """
    x = _zero_masked(_upcast(x), mask)
    mean = masked_mean(x, mask, dim=dim, keepdim=True)
    var = masked_mean((x - mean) ** 2, mask, dim=dim)
    if unbiased:
        count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
        if (count < 2).any():
            raise ValueError("masked_var: unbiased variance needs at least 2 valid entries")
        var = var * count / (count - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten `x` (B, T) with statistics over valid tokens only: (x - mean) * rsqrt(var + eps).

    var is the population variance (item 17). shift_mean=True leaves the result with mean 0 (used for
    advantages); shift_mean=False adds the mean back, i.e. scales only (used for rewards). eps is 1e-8 in
    the references. Returns (B, T), 0 at masked positions.
    """
    x = _zero_masked(_upcast(x), mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=False)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, mask)


# --------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy (items 6, 7)
# --------------------------------------------------------------------------------------------------------


def _scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _upcast(logits) / temperature


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature) at `labels`: logits (B, T, V), labels (B, T) int -> (B, T).

    The same temperature as sampling must be used everywhere (item 6), or KL != 0 and ratio != 1 before
    the first update.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logprobs_from_logits: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree "
            "(expected logits (B, T, V) and labels (B, T))"
        )
    z = _scaled_logits(logits, temperature)
    picked = torch.gather(z, dim=-1, index=labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature): logits (B, T, V) -> (B, T), in nats."""
    z = _scaled_logits(logits, temperature)
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def response_positions(x: torch.Tensor, context_len: int) -> torch.Tensor:
    """Slice a full-sequence tensor (B, L, ...) to the positions that predict the response: [C-1 : L-1].

    Position C-1 + t of a causal LM's output sees tokens 0..C-1+t and predicts response token t, so the
    result (B, L - C, ...) is aligned with the response labels input_ids[:, C:] (item 7). Use it for
    values too: V(s_t) is read at the same positions as the log-probs (item 13).
    """
    length = x.shape[1]
    if not 1 <= context_len < length:
        raise ValueError(f"response_positions: context_len must be in [1, {length - 1}], got {context_len}")
    return x[:, context_len - 1 : length - 1]


def response_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, context_len: int, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs of the response tokens from full-sequence logits.

    logits (B, L, V) of prompt+response, input_ids (B, L), prompt (context) length C -> (B, L - C), where
    entry t is log pi(input_ids[:, C + t] | input_ids[:, :C + t]) at the given temperature.
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"response_logprobs: logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} disagree "
            "(expected logits (B, L, V) and input_ids (B, L))"
        )
    return logprobs_from_logits(
        response_positions(logits, context_len), input_ids[:, context_len:], temperature=temperature
    )


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) sampled tokens -> (mask (B, R) long, ends_with_eos (B,) bool): mask is 1 up to and including
    each row's first EOS (the whole row when it has none); what follows the first EOS is not the answer."""
    is_eos = (responses == eos_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long(), is_eos.bool().any(dim=1)


def pair_response_mask(attention_mask: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
    """Mask over the next-token targets input_ids[:, 1:] of right-padded prompt + response rows: (B, L)
    attention mask and (B,) prompt lengths -> (B, L - 1), 1 where target j + 1 is a response token (at or
    after its row's prompt length and not padding). Pairs with `logprobs_from_logits(logits[:, :-1],
    input_ids[:, 1:])`: summing the masked log-probs gives log pi(response | prompt)."""
    positions = torch.arange(1, attention_mask.shape[1], device=attention_mask.device)
    after_prompt = positions[None, :] >= prompt_lens.to(attention_mask.device)[:, None]
    return (after_prompt & attention_mask[:, 1:].bool()).long()


# --------------------------------------------------------------------------------------------------------
# KL penalty and per-token rewards (items 14, 15)
# --------------------------------------------------------------------------------------------------------


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


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid position of each row: mask (B, T) -> (B,) long.

    Rows may have leading zeros as well as trailing ones. Raises ValueError naming a row with no valid
    position.
    """
    if mask.dim() != 2:
        raise ValueError(f"last_valid_index: mask must be (B, T), got shape {tuple(mask.shape)}")
    _check_rows_nonempty("last_valid_index", mask)
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.bool() * positions).max(dim=1).values - 1


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


# --------------------------------------------------------------------------------------------------------
# Advantage estimation (item 16)
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# PPO losses (item 18)
# --------------------------------------------------------------------------------------------------------


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


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    loss_agg: str = "token_mean",
    norm_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: aggregate(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))).

    logp (B, T) from the current policy (carries the gradient), old_logp (B, T) from the rollout,
    advantages (B, T) (already whitened if wanted), mask (B, T). eps is 0.2 in the references.
    Returns (loss, stats): loss is a 0-dim tensor, the per-token losses of this micro-batch reduced by
    `aggregate_loss(loss_agg, norm_length)` (the references' token mean by default); stats are detached
    0-dim token means: clipfrac (fraction of valid tokens where the clipped term is strictly larger, i.e.
    active), approx_kl = 0.5 * mean((logp - old_logp)^2), ratio_mean.
    """
    _check_same_shape("policy_loss", logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    if not clip_eps > 0:
        raise ValueError(f"policy_loss: clip_eps must be > 0, got {clip_eps}")
    # Zero the log-ratio before exp so that garbage in masked slots cannot give exp() = inf (and NaN grads).
    log_ratio = _zero_masked(_upcast(logp) - _upcast(old_logp), mask)
    adv = _zero_masked(_upcast(advantages), mask).detach()
    ratio = torch.exp(log_ratio)
    losses = -adv * ratio
    losses_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = aggregate_loss(torch.maximum(losses, losses_clipped), mask, loss_agg, norm_length)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((losses_clipped > losses).to(loss.dtype), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


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
