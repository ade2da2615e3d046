"""Tests for common/rl_math/ against hand-computed numbers and independent references.

Item numbers refer to docs/ppo-fidelity.md.
"""

from __future__ import annotations

import math

import pytest
import torch

from common import rl_math
from common.rl_math import (
    ADVANTAGE_ESTIMATORS,
    LOSS_AGGREGATIONS,
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    discounted_returns,
    dr_grpo_scores,
    entropy_from_logits,
    estimate_advantages,
    gae,
    get_advantage_estimator,
    grpo_scores,
    kl_loss,
    kl_penalty,
    last_valid_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    response_logprobs,
    response_positions,
    rloo_scores,
    sequence_kl,
    shape_rewards,
    value_loss,
)


def ragged_mask(lengths: list[int], T: int, starts: list[int] | None = None) -> torch.Tensor:
    """(B, T) float mask with row b valid on [starts[b], starts[b] + lengths[b])."""
    starts = starts or [0] * len(lengths)
    mask = torch.zeros(len(lengths), T)
    for b, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        mask[b, s : s + n] = 1.0
    return mask


def fill_garbage(x: torch.Tensor, mask: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """x with huge finite values at masked positions, alternating in sign (`sign` flips the pattern).

    3/4 of the dtype's largest value: finite, but any sum of two of them or square overflows to inf, so any
    arithmetic on masked slots before masking (e.g. multiplying by the mask) shows up as inf or NaN.
    """
    huge = torch.finfo(x.dtype).max * 0.75
    alternating = torch.where(torch.arange(x.numel()).reshape(x.shape) % 2 == 0, 1.0, -1.0).to(x.dtype)
    return torch.where(mask.bool(), x, sign * huge * alternating)


# ------------------------------------------------------------------------------------------------------
# Masked statistics and whitening (item 17)
# ------------------------------------------------------------------------------------------------------

WHITEN_X = [[1.2, 1.3, 1.4], [1.5, 1.6, 1.7], [1.8, 1.9, 2.0]]


def test_whiten_known_matrix_mean_kept():
    x = torch.tensor(WHITEN_X, dtype=torch.float64)
    expected = torch.tensor(
        [[0.0508, 0.4381, 0.8254], [1.2127, 1.6000, 1.9873], [2.3746, 2.7619, 3.1492]], dtype=torch.float64
    )
    out = masked_whiten(x, torch.ones_like(x), shift_mean=False)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_whiten_known_matrix_mean_removed():
    # mean 1.6; population variance = 2 * (0.4^2 + 0.3^2 + 0.2^2 + 0.1^2) / 9 = 1/15, so out = (x - 1.6) * sqrt(15).
    x = torch.tensor(WHITEN_X, dtype=torch.float64)
    expected = (x - 1.6) * math.sqrt(15.0)
    out = masked_whiten(x, torch.ones_like(x), shift_mean=True, eps=0.0)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    # With the unbiased variance (8 in the denominator) the scale would be sqrt(15 * 8 / 9) instead.
    assert not torch.allclose(out, (x - 1.6) * math.sqrt(15.0 * 8 / 9), atol=1e-3)


def test_whiten_uses_valid_tokens_only_and_zeroes_masked():
    x = torch.tensor(WHITEN_X, dtype=torch.float64)
    mask = ragged_mask([3, 2, 1], 3)  # valid: 1.2 1.3 1.4 1.5 1.6 1.8
    valid = torch.tensor([1.2, 1.3, 1.4, 1.5, 1.6, 1.8], dtype=torch.float64)
    mean, std = valid.mean(), valid.std(unbiased=False)
    out = masked_whiten(fill_garbage(x, mask), mask.double(), eps=0.0)
    expected = torch.where(mask.bool(), (x - mean) / std, 0.0)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert (out[~mask.bool()] == 0).all()


def test_masked_var_population_and_unbiased():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # valid 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    torch.testing.assert_close(masked_var(x, mask), torch.tensor(5 / 4))
    torch.testing.assert_close(masked_var(x, mask, unbiased=True), torch.tensor(5 / 3))
    assert masked_var(fill_garbage(x, mask), mask).item() == pytest.approx(1.25)


def test_masked_sum_and_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    g = fill_garbage(x, mask)
    assert masked_sum(g, mask).item() == 7.0
    assert masked_mean(g, mask).item() == pytest.approx(7.0 / 3)
    torch.testing.assert_close(masked_mean(g, mask, dim=1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_sum(g, mask, dim=0), torch.tensor([5.0, 2.0, 0.0]))
    torch.testing.assert_close(masked_mean(g, mask.bool(), dim=1, keepdim=True), torch.tensor([[1.5], [4.0]]))


def test_masked_mean_rejects_empty_mask_and_shape_mismatch():
    with pytest.raises(ValueError, match="no valid entry"):
        masked_mean(torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no valid entry"):
        masked_mean(torch.ones(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), dim=1)
    with pytest.raises(ValueError, match=r"x\(2, 3\), mask\(2, 4\)"):
        masked_mean(torch.ones(2, 3), torch.ones(2, 4))


# ------------------------------------------------------------------------------------------------------
# Log-probs, entropy, the [C-1 : -1] slice (items 6, 7)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_logprobs_and_entropy_match_categorical(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 11, (3, 5), generator=g)
    dist = torch.distributions.Categorical(logits=logits / temperature)
    torch.testing.assert_close(logprobs_from_logits(logits, labels, temperature), dist.log_prob(labels))
    torch.testing.assert_close(entropy_from_logits(logits, temperature), dist.entropy())


def test_temperature_changes_logprobs_and_must_be_positive():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    labels = torch.tensor([[0]])
    # By hand at T=2: scaled logits 1, 0, -0.5 -> log p(0) = 1 - log(e + 1 + e^-0.5)
    expected = 1.0 - math.log(math.e + 1.0 + math.exp(-0.5))
    assert logprobs_from_logits(logits, labels, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)
    assert logprobs_from_logits(logits, labels).item() != pytest.approx(expected, abs=1e-3)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, labels, temperature=0.0)


def test_half_precision_logits_are_upcast():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    labels = torch.zeros(2, 3, dtype=torch.long)
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), dim=-1)[..., 0]
    torch.testing.assert_close(out, ref)


def test_response_logprobs_match_per_token_loop():
    g = torch.Generator().manual_seed(2)
    B, L, V, C, temperature = 2, 7, 13, 3, 0.7
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, V, (B, L), generator=g)
    out = response_logprobs(logits, input_ids, C, temperature)
    assert out.shape == (B, L - C)
    for b in range(B):
        for t in range(L - C):
            # Token C + t is predicted by the logits at position C + t - 1.
            expected = torch.log_softmax(logits[b, C + t - 1] / temperature, dim=-1)[input_ids[b, C + t]]
            assert out[b, t].item() == pytest.approx(expected.item(), abs=1e-12)


def test_response_positions_slices_values_like_logprobs():
    values = torch.arange(10.0).reshape(1, 10)
    torch.testing.assert_close(response_positions(values, 4), torch.tensor([[3.0, 4.0, 5.0, 6.0, 7.0, 8.0]]))
    with pytest.raises(ValueError, match="context_len"):
        response_positions(values, 0)
    with pytest.raises(ValueError, match="context_len"):
        response_positions(values, 10)


# ------------------------------------------------------------------------------------------------------
# KL penalty, last valid token, rewards (item 14)
# ------------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])  # x = logp - ref = [0.5, -1.0]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.125, 0.5]))
    # k3 = exp(-x) - 1 + x: exp(-0.5) - 0.5 = 0.1065307, exp(1) - 2 = 0.7182818
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([0.1065307, 0.7182818]))
    torch.testing.assert_close(kl_penalty(logp, ref, "abs"), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k1", clamp=0.25), torch.tensor([0.25, -0.25]))
    with pytest.raises(ValueError, match="unknown kind"):
        kl_penalty(logp, ref, "k4")


def test_sequence_kl_sums_the_estimator_over_the_answer_tokens_only():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, 9.0], [-1.0, -1.0, -1.0]])  # row 0: x = 0.5, -1.0, then a masked slot
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(sequence_kl(logp, ref, mask), torch.tensor([-0.5, 0.0]))
    # k3: 0.1065307 + 0.7182818; clamp 0.6 caps the second token's estimate
    torch.testing.assert_close(sequence_kl(logp, ref, mask, "k3"), torch.tensor([0.8248125, 0.0]))
    torch.testing.assert_close(sequence_kl(logp, ref, mask, "k3", clamp=0.6), torch.tensor([0.7065307, 0.0]))


def test_k3_nonnegative_and_close_to_k2_for_small_x():
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    zero = torch.zeros_like(x)
    assert (kl_penalty(x, zero, "k3") >= 0).all()
    small = torch.linspace(-1e-2, 1e-2, 101, dtype=torch.float64)
    k2, k3 = (
        kl_penalty(small, torch.zeros_like(small), "k2"),
        kl_penalty(small, torch.zeros_like(small), "k3"),
    )
    # k3 - k2 = -x^3/6 + O(x^4)
    assert ((k3 - k2).abs() <= small.abs() ** 3 / 6 * 1.01 + 1e-18).all()
    assert kl_penalty(torch.tensor([-100.0]), torch.tensor([0.0]), "k3", clamp=10.0).item() == 10.0


def test_last_valid_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]])
    assert last_valid_index(mask).tolist() == [2, 4, 3, 4, 0]
    assert last_valid_index(mask.float()).tolist() == [2, 4, 3, 4, 0]
    with pytest.raises(ValueError, match="row 1"):
        last_valid_index(torch.tensor([[1, 0], [0, 0]]))


def test_shape_rewards_placement_by_hand():
    # Seed 001's example: kl = [-0.3315, -0.0426, 0.6351], score 0.4 -> r = -beta*kl, score added at the end.
    beta = 0.1
    kl = torch.tensor([[-0.3315, -0.0426, 0.6351, 7.0], [5.0, 0.2, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])  # second row has a leading zero
    score = torch.tensor([0.4, -2.0])
    rewards = shape_rewards(score, kl, mask, kl_coef=beta)
    expected = torch.tensor(
        [[0.03315, 0.00426, -0.06351 + 0.4, 0.0], [0.0, -0.02, -0.03 - 2.0, 0.0]],
    )
    torch.testing.assert_close(rewards, expected)
    clipped = shape_rewards(score, kl, mask, kl_coef=beta, clip_score=1.0)
    torch.testing.assert_close(clipped[1, 2], torch.tensor(-0.03 - 1.0))
    torch.testing.assert_close(clipped[0], expected[0])


def test_shape_rewards_sum_identity_random_ragged():
    g = torch.Generator().manual_seed(3)
    B, T, beta = 6, 9, 0.05
    mask = ragged_mask([9, 1, 4, 7, 2, 5], T, starts=[0, 0, 2, 1, 7, 0])
    kl = fill_garbage(torch.randn(B, T, generator=g, dtype=torch.float64), mask)
    score = torch.randn(B, generator=g, dtype=torch.float64)
    rewards = shape_rewards(score, kl, mask.double(), kl_coef=beta)
    kl_sums = torch.tensor([sum(kl[b, t].item() for t in range(T) if mask[b, t]) for b in range(B)])
    torch.testing.assert_close(rewards.sum(dim=1), score - beta * kl_sums.double())
    assert (rewards[~mask.bool()] == 0).all()


def test_higher_logp_gives_lower_reward():
    ref = torch.tensor([[-2.0, -2.0]])
    mask = torch.ones(1, 2)
    score = torch.tensor([0.0])
    low = shape_rewards(score, kl_penalty(torch.tensor([[-2.0, -2.0]]), ref), mask, kl_coef=0.1)
    high = shape_rewards(score, kl_penalty(torch.tensor([[-1.0, -2.0]]), ref), mask, kl_coef=0.1)
    assert high[0, 0] < low[0, 0]
    assert high[0, 1] == low[0, 1]


def test_shape_rewards_rejects_bad_input():
    with pytest.raises(ValueError, match="score must be"):
        shape_rewards(torch.zeros(3), torch.zeros(2, 4), torch.ones(2, 4), kl_coef=0.1)
    with pytest.raises(ValueError, match=r"row 1 of the mask has no valid token"):
        shape_rewards(torch.zeros(2), torch.zeros(2, 4), torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match=r"\(0, 2\) holds 0.5"):
        shape_rewards(torch.zeros(1), torch.zeros(1, 4), torch.tensor([[1, 1, 0.5, 0]]), 0.1)


# ------------------------------------------------------------------------------------------------------
# KL controllers (item 15)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current_kl", "factor"),
    [
        (12.0, 1.01024),  # err = 1 clipped to 0.2; 0.2 * 512 / 10000 = 0.01024
        (100.0, 1.01024),  # clipped the same
        (6.0, 1.0),
        (0.0, 0.98976),  # err = -1 clipped to -0.2
        (5.0, 1 - (1 / 6) * 512 / 10000),  # inside the clip range: err = 5/6 - 1
        (6.6, 1 + 0.1 * 512 / 10000),
    ],
)
def test_adaptive_kl_worked_numbers(current_kl, factor):
    ctl = AdaptiveKLController(init_kl_coef=0.15, target=6.0, horizon=10000)
    ctl.update(current_kl, n_steps=512)
    assert ctl.value == pytest.approx(0.15 * factor, rel=1e-12)


def test_adaptive_kl_compounds_and_round_trips():
    ctl = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    ctl.update(12.0, 512)
    ctl.update(12.0, 512)
    assert ctl.value == pytest.approx(0.15 * 1.01024**2, rel=1e-12)
    resumed = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    resumed.update(0.0, 512)
    ctl.update(0.0, 512)
    assert resumed.value == ctl.value
    with pytest.raises(ValueError, match="adaptive"):
        resumed.load_state_dict(FixedKLController(0.1).state_dict())


def test_fixed_kl_unchanged_and_round_trips():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 6.0, 1e6):
        ctl.update(kl, 512)
    assert ctl.value == 0.05
    other = FixedKLController(0.3)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# ------------------------------------------------------------------------------------------------------
# GAE (item 16)
# ------------------------------------------------------------------------------------------------------


def gae_closed_form(rewards, values, mask, gamma, lam):
    """A_t = sum_l (gamma*lam)^l delta_{t+l} over the valid block of each row, in plain Python floats."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        end = valid[-1]

        def v(k, b=b, end=end):
            return values[b, k].item() if k <= end else 0.0

        delta = {k: rewards[b, k].item() + gamma * v(k + 1) - v(k) for k in valid}
        for t in valid:
            adv[b][t] = sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, end + 1))
    return torch.tensor(adv, dtype=torch.float64)


def test_gae_hand_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.8]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # deltas: 0.1, 0.1, 0.3 (V past the EOS is 0); A2 = 0.3, A1 = 0.1 + 0.95*0.3, A0 = 0.1 + 0.95*0.385
    torch.testing.assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0, 0.0]]))


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.95), (0.9, 0.5), (1.0, 1.0), (0.8, 0.0)])
def test_gae_matches_closed_form_with_ragged_masks_and_garbage(gamma, lam):
    g = torch.Generator().manual_seed(4)
    B, T = 7, 8
    mask = ragged_mask([8, 1, 3, 5, 2, 6, 1], T, starts=[0, 0, 0, 3, 6, 1, 7])
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    expected = gae_closed_form(rewards, values, mask, gamma, lam)
    adv, ret = gae(fill_garbage(rewards, mask), fill_garbage(values, mask, -1.0), mask.double(), gamma, lam)
    torch.testing.assert_close(adv, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, torch.where(mask.bool(), expected + values, 0.0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lambda_one_is_reward_to_go_minus_value(gamma):
    g = torch.Generator().manual_seed(5)
    B, T = 4, 6
    mask = ragged_mask([6, 4, 1, 3], T)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(n):
            to_go = sum(gamma ** (k - t) * rewards[b, k].item() for k in range(t, n))
            assert adv[b, t].item() == pytest.approx(to_go - values[b, t].item(), abs=1e-12)
            assert ret[b, t].item() == pytest.approx(to_go, abs=1e-12)


def test_gae_rejects_holes_and_registry():
    with pytest.raises(ValueError, match="row 1 of the mask has a hole"):
        gae(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]]), 1.0, 0.95)
    assert get_advantage_estimator("gae").needs_critic
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        get_advantage_estimator("ppo")


# ------------------------------------------------------------------------------------------------------
# Critic-free estimators: group baselines, returns-to-go, the registry
# ------------------------------------------------------------------------------------------------------

# Two groups of three samples: scores 1, 2, 3 (mean 2, sample std 1) and 4, 4, 4 (all equal).
GROUPED = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0], dtype=torch.float64)


def test_grpo_scores_by_hand():
    out = grpo_scores(GROUPED, group_size=3, eps=1e-6)
    # (s - 2) / (1 + 1e-6) in the first group; 0 / (0 + eps) = 0 in the equal group
    expected = torch.tensor([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-15, rtol=0)
    # The std is the sample std (n - 1): for 0, 2 it is sqrt(2), not 1.
    torch.testing.assert_close(
        grpo_scores(torch.tensor([0.0, 2.0]), 2, eps=0.0), torch.tensor([-1.0, 1.0]) / 2**0.5
    )


def test_dr_grpo_and_rloo_scores_by_hand():
    torch.testing.assert_close(
        dr_grpo_scores(GROUPED, 3), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    )
    # RLOO: 1 - mean(2, 3) = -1.5, 2 - mean(1, 3) = 0, 3 - mean(1, 2) = 1.5; equal scores -> 0
    torch.testing.assert_close(
        rloo_scores(GROUPED, 3), torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(rloo_scores(torch.tensor([5.0, 1.0]), 2), torch.tensor([4.0, -4.0]))


@pytest.mark.parametrize("fn", [grpo_scores, dr_grpo_scores, rloo_scores])
def test_group_baselines_refuse_bad_groups(fn):
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        fn(GROUPED, 1)
    with pytest.raises(ValueError, match="6 scores do not split into groups of 4"):
        fn(GROUPED, 4)
    with pytest.raises(ValueError, match=r"scores must be \(B,\)"):
        fn(GROUPED.view(2, 3), 3)


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 4.0, 99.0], [0.0, 0.0, 0.0, 8.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ret = discounted_returns(rewards, mask, gamma=0.5)
    # row 0: G2 = 4, G1 = 2 + 0.5 * 4 = 4, G0 = 1 + 0.5 * 4 = 3; the masked 99 is ignored
    torch.testing.assert_close(ret, torch.tensor([[3.0, 4.0, 4.0, 0.0], [1.0, 2.0, 4.0, 8.0]]))


def test_registry_holds_every_estimator_with_its_defaults():
    assert sorted(ADVANTAGE_ESTIMATORS) == sorted(
        ["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
    )
    critic = {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_critic}
    groups = {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_groups}
    assert critic == {"gae"}
    assert groups == {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"}
    assert ADVANTAGE_ESTIMATORS["grpo"].loss_agg == "seq_mean_token_mean"
    assert ADVANTAGE_ESTIMATORS["dr_grpo"].loss_agg == "seq_mean_token_sum_norm"
    assert {e.loss_agg for e in ADVANTAGE_ESTIMATORS.values()} <= set(LOSS_AGGREGATIONS)


# 4 samples, 2 per prompt; responses of lengths 3, 2, 1, 3 (T = 3).
EST_MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
EST_SCORES = torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=torch.float64)
EST_KL = torch.tensor(
    [[0.1, 0.2, 0.3], [0.5, 0.5, 7.0], [0.4, 9.0, 9.0], [0.0, 0.0, 0.1]], dtype=torch.float64
)


def test_grpo_without_kl_gives_every_token_its_group_score():
    adv, ret, rewards = estimate_advantages("grpo", EST_SCORES, EST_KL, EST_MASK, kl_coef=0.0, group_size=2)
    a = 1 / (2**0.5 + 1e-6)  # (1 - 2) / std(1, 3) with std sqrt(2); the second group is all equal
    expected = torch.tensor(
        [[-a, -a, -a], [a, a, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(adv, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        rewards[0], torch.tensor([0.0, 0.0, -a], dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_rloo_with_kl_in_the_reward_by_hand():
    adv, ret, _ = estimate_advantages("rloo", EST_SCORES, EST_KL, EST_MASK, kl_coef=0.5, group_size=2)
    # baselined scores: 1 - 3 = -2, 3 - 1 = 2, 0, 0. Returns-to-go of r_t = -0.5 kl_t (+ score at the end):
    # row 0: r = (-0.05, -0.1, -0.15 - 2) -> G = (-2.3, -2.25, -2.15)
    # row 1: r = (-0.25, -0.25 + 2) -> G = (1.5, 1.75); row 2: (-0.2); row 3: r = (0, 0, -0.05)
    expected = torch.tensor(
        [[-2.3, -2.25, -2.15], [1.5, 1.75, 0.0], [-0.2, 0.0, 0.0], [-0.05, -0.05, -0.05]], dtype=torch.float64
    )
    torch.testing.assert_close(adv, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, expected, atol=1e-12, rtol=0)


def test_reinforce_pp_is_whitened_returns_to_go_and_baseline_subtracts_the_group_mean():
    mask, kl = EST_MASK, EST_KL
    raw = discounted_returns(shape_rewards(EST_SCORES, kl, mask, 0.1), mask, 1.0)
    adv, ret, _ = estimate_advantages("reinforce_pp", EST_SCORES, kl, mask, kl_coef=0.1)
    torch.testing.assert_close(ret, raw)
    torch.testing.assert_close(adv, masked_whiten(raw, mask))
    valid = adv[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert valid.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    # with the baseline: scores 1, 3 -> -1, +1 and 2, 2 -> 0, 0 before the KL shaping
    _, ret_b, _ = estimate_advantages(
        "reinforce_pp_baseline", EST_SCORES, kl, mask, kl_coef=0.1, group_size=2
    )
    centred = torch.tensor([-1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(ret_b, discounted_returns(shape_rewards(centred, kl, mask, 0.1), mask, 1.0))


def test_dr_grpo_and_gae_through_the_one_entry_point():
    adv, _, _ = estimate_advantages("dr_grpo", EST_SCORES, EST_KL, EST_MASK, kl_coef=0.0, group_size=2)
    torch.testing.assert_close(adv[:, 0], torch.tensor([-1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    values = torch.full((4, 3), 0.25, dtype=torch.float64)
    adv, ret, rewards = estimate_advantages(
        "gae", EST_SCORES, EST_KL, EST_MASK, kl_coef=0.1, values=values, whiten=False
    )
    expected_adv, expected_ret = gae(
        shape_rewards(EST_SCORES, EST_KL, EST_MASK, 0.1), values, EST_MASK, 1.0, 0.95
    )
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, expected_ret)
    with pytest.raises(ValueError, match="needs the critic's values"):
        estimate_advantages("gae", EST_SCORES, EST_KL, EST_MASK, kl_coef=0.1)


def test_estimators_clip_scores_before_the_group_baseline():
    scores = torch.tensor([10.0, 0.0])
    mask, kl = torch.ones(2, 1), torch.zeros(2, 1)
    adv, _, _ = estimate_advantages("dr_grpo", scores, kl, mask, kl_coef=0.0, group_size=2, clip_score=5.0)
    torch.testing.assert_close(adv, torch.tensor([[2.5], [-2.5]]))


# ------------------------------------------------------------------------------------------------------
# Loss aggregation and KL as a loss term
# ------------------------------------------------------------------------------------------------------


def test_aggregate_loss_modes_by_hand():
    losses = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate_loss(losses, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(losses, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(losses, mask, "seq_mean_token_sum_norm", 5).item() == pytest.approx(10 / (2 * 5))
    with pytest.raises(ValueError, match="needs a norm_length"):
        aggregate_loss(losses, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="unknown mode"):
        aggregate_loss(losses, mask, "sum")


def test_policy_loss_aggregation_weighs_sequences():
    # ratio 1, so the per-token loss is -A: row 0 has 3 tokens of A = 1, row 1 one token of A = -1
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logp = torch.zeros(2, 3)
    token, _ = policy_loss(logp, logp, adv, mask, 0.2)
    seq, _ = policy_loss(logp, logp, adv, mask, 0.2, loss_agg="seq_mean_token_mean")
    const, _ = policy_loss(logp, logp, adv, mask, 0.2, loss_agg="seq_mean_token_sum_norm", norm_length=4)
    assert token.item() == pytest.approx(-(3 - 1) / 4)
    assert seq.item() == pytest.approx(-(1 - 1) / 2)
    assert const.item() == pytest.approx(-(3 - 1) / (2 * 4))


def test_kl_loss_k3_value_and_gradient_by_hand():
    # x = logp - ref = 0.5 at the valid token: k3 = exp(-0.5) - 1 + 0.5, d/dlogp = 1 - exp(-0.5)
    logp = torch.tensor([[0.0, 500.0]], requires_grad=True)  # garbage at the masked slot
    ref = torch.tensor([[-0.5, -500.0]])
    mask = torch.tensor([[1, 0]])
    loss = kl_loss(logp, ref, mask, kind="k3")
    assert loss.item() == pytest.approx(math.exp(-0.5) - 0.5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[1 - math.exp(-0.5), 0.0]]))
    assert kl_loss(ref, ref, mask, "k3").item() == 0.0
    assert kl_loss(logp.detach(), ref, mask, "k1").item() == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------------
# PPO losses (item 18)
# ------------------------------------------------------------------------------------------------------


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    g = torch.Generator().manual_seed(6)
    mask = ragged_mask([5, 2, 3], 5)
    logp = torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, clip_eps=0.2)
    valid_adv = adv[mask.bool()]
    assert loss.item() == pytest.approx(-valid_adv.mean().item(), abs=1e-6)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0


def test_policy_loss_clipped_tokens_get_zero_gradient():
    eps = 0.2
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1, 9.0])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 3.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.2, -1.0])
    logp = (old + ratios.log()).requires_grad_(True)
    loss, stats = policy_loss(logp[None], old[None], adv[None], mask[None], clip_eps=eps)
    loss.backward()
    # Per-token max(-A r, -A clip(r)): -1.2 (clipped), 0.8 (clipped), 1.5, -0.5, -1.1 -> mean -0.1.
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)
    # d/dlogp of -A r / N is -A r / 5 on unclipped tokens, exactly 0 on clipped and masked ones.
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, 0.3, -0.1, -0.22, 0.0]))
    assert logp.grad[0] == 0 and logp.grad[1] == 0
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    expected_kl = 0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 1.5, 0.5, 1.1)) / 5
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5, rel=1e-6)


def _loss_and_grad(loss_fn, x, *rest):
    x = x.clone().requires_grad_(True)
    loss, stats = loss_fn(x, *rest)
    loss.backward()
    return loss.detach(), stats, x.grad


def test_losses_ignore_garbage_in_masked_slots():
    g = torch.Generator().manual_seed(7)
    mask = ragged_mask([4, 1, 3], 4, starts=[0, 2, 0])
    logp, old, adv, v, v_old, ret = (torch.randn(3, 4, generator=g) for _ in range(6))
    old = old * 0.1 + logp  # ratios near 1, some clipped with eps 0.05
    clean = _loss_and_grad(policy_loss, logp, old, adv, mask, 0.05)
    dirty = _loss_and_grad(
        policy_loss,
        fill_garbage(logp, mask),
        fill_garbage(old, mask, -1.0),
        fill_garbage(adv, mask),
        mask,
        0.05,
    )
    for a, b in (
        (clean[0], dirty[0]),
        (clean[2], dirty[2]),
        *zip(clean[1].values(), dirty[1].values(), strict=True),
    ):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b)
    assert (dirty[2][~mask.bool()] == 0).all()

    clean = _loss_and_grad(value_loss, v, v_old, ret, mask, 0.2)
    dirty = _loss_and_grad(
        value_loss,
        fill_garbage(v, mask),
        fill_garbage(v_old, mask, -1.0),
        fill_garbage(ret, mask, -1.0),
        mask,
        0.2,
    )
    for a, b in ((clean[0], dirty[0]), (clean[2], dirty[2]), (clean[1]["clipfrac"], dirty[1]["clipfrac"])):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b)


def test_value_loss_hand_numbers():
    c = 0.2
    v = torch.tensor([[1.0, 1.0, 0.0, 2.0, 5.0]], requires_grad=True)
    v_old = torch.tensor([[0.5, 0.9, 1.0, 1.0, 0.0]])
    ret = torch.tensor([[2.0, 0.0, 0.1, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # token 0: clip(1, 0.3, 0.7) = 0.7: (1-2)^2 = 1 < (0.7-2)^2 = 1.69 -> 1.69, clipped
    # token 1: clip(1, 0.7, 1.1) = 1: both 1 -> 1, not clipped (tie)
    # token 2: clip(0, 0.8, 1.2) = 0.8: 0.01 < 0.49 -> 0.49, clipped
    # token 3: clip(2, 0.8, 1.2) = 1.2: 1 > 0.04 -> 1, not clipped
    loss, stats = value_loss(v, v_old, ret, mask, clip_range=c)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 0.49 + 1.0) / 4, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 4)
    loss.backward()
    # Clipped tokens (0, 2) have no gradient to v; token 1 (tie) and 3: d/dv 0.5*(v-R)^2/4 = (v-R)/4.
    assert v.grad[0, 0] == 0 and v.grad[0, 2] == 0 and v.grad[0, 4] == 0
    assert v.grad[0, 3].item() == pytest.approx(0.25)
    assert v.grad[0, 1].item() == pytest.approx(0.25)


# ------------------------------------------------------------------------------- preference losses (DPO)


def _pair_logps(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """Two pairs. Row 0: log-ratios chosen +2, rejected -1, so h = 3. Row 1: all four equal, so h = 0."""
    pc = torch.tensor([-10.0, -7.0], dtype=torch.float64, requires_grad=requires_grad)
    pr = torch.tensor([-15.0, -7.0], dtype=torch.float64, requires_grad=requires_grad)
    rc = torch.tensor([-12.0, -7.0], dtype=torch.float64, requires_grad=requires_grad)
    rr = torch.tensor([-14.0, -7.0], dtype=torch.float64, requires_grad=requires_grad)
    return pc, pr, rc, rr


def test_dpo_sigmoid_loss_rewards_and_accuracy_by_hand():
    losses, stats = rl_math.preference_loss(*_pair_logps(), beta=0.1)
    # row 0: -log sigmoid(0.1 * 3) = log(1 + e^-0.3); row 1: h = 0 gives log 2
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.3)), math.log(2)], abs=1e-12)
    assert stats["chosen_reward"].tolist() == pytest.approx([0.2, 0.0], abs=1e-12)
    assert stats["rejected_reward"].tolist() == pytest.approx([-0.1, 0.0], abs=1e-12)
    assert stats["margin"].tolist() == pytest.approx([0.3, 0.0], abs=1e-12)
    assert stats["accuracy"].tolist() == [1.0, 0.0]  # a tie is not a win


def test_conservative_dpo_label_smoothing_by_hand():
    losses, _ = rl_math.preference_loss(*_pair_logps(), beta=0.1, label_smoothing=0.1)
    expected0 = 0.9 * math.log(1 + math.exp(-0.3)) + 0.1 * math.log(1 + math.exp(0.3))
    assert losses.tolist() == pytest.approx([expected0, math.log(2)], abs=1e-12)


def test_ipo_loss_by_hand():
    losses, _ = rl_math.preference_loss(*_pair_logps(), beta=0.1, loss_type="ipo")
    assert losses.tolist() == pytest.approx([(3 - 5) ** 2, (0 - 5) ** 2], abs=1e-12)  # 1 / (2 * 0.1) = 5
    with pytest.raises(ValueError, match="label_smoothing is a DPO"):
        rl_math.preference_loss(*_pair_logps(), beta=0.1, loss_type="ipo", label_smoothing=0.1)


def test_dpo_gradient_reaches_the_policy_only():
    pc, pr, rc, rr = _pair_logps(requires_grad=True)
    losses, _ = rl_math.preference_loss(pc, pr, rc, rr, beta=0.1)
    losses[0].backward()
    # d/d pc of -log sigmoid(beta * h) = -beta * sigmoid(-beta * h); d/d pr is its opposite
    sig = 1 / (1 + math.exp(0.3))
    assert pc.grad.tolist() == pytest.approx([-0.1 * sig, 0.0], abs=1e-12)
    assert pr.grad.tolist() == pytest.approx([0.1 * sig, 0.0], abs=1e-12)
    assert rc.grad is None and rr.grad is None  # the reference is frozen


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": 0.1, "label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"beta": 0.1, "loss_type": "hinge"}, "unknown loss_type 'hinge'"),
    ],
)
def test_preference_loss_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rl_math.preference_loss(*_pair_logps(), **kwargs)


def test_pair_response_mask_marks_response_targets_by_hand():
    # row 0: prompt 2 tokens, response 3, no padding; row 1: prompt 3, response 1, 1 pad
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    mask = rl_math.pair_response_mask(attention, torch.tensor([2, 3]))
    # targets are input_ids[:, 1:], i.e. positions 1..4
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 0]]


def test_pair_response_logprobs_sum_to_the_response_likelihood():
    """The masked sum of next-token log-probs equals log pi(response | prompt) computed token by token."""
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7, dtype=torch.float64)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    logp = rl_math.logprobs_from_logits(logits[:, :-1], ids[:, 1:])
    mask = rl_math.pair_response_mask(torch.ones_like(ids), torch.tensor([2]))
    by_hand = sum(torch.log_softmax(logits[0, j - 1], -1)[ids[0, j]] for j in (2, 3, 4))
    assert rl_math.masked_sum(logp, mask, dim=1).item() == pytest.approx(by_hand.item(), abs=1e-12)


# ---------------------------------------------------------------------------------------------- reward ensembles


def test_ensemble_scores_by_hand():
    from common.rl_math import ensemble_scores

    # three members scoring two sequences: sequence 0 they agree on, sequence 1 they dispute
    s = torch.tensor([[1.0, 3.0], [1.0, -1.0], [1.0, 1.0]])
    assert torch.equal(ensemble_scores(s, "mean"), torch.tensor([1.0, 1.0]))
    assert torch.equal(ensemble_scores(s, "min"), torch.tensor([1.0, -1.0]))
    # population std of (3, -1, 1): mean 1, squared deviations 4, 4, 0 -> var 8/3
    expected = torch.tensor([1.0, 1.0 - 0.5 * (8 / 3) ** 0.5])
    assert torch.allclose(ensemble_scores(s, "mean_minus_std", std_coef=0.5), expected)
    assert torch.equal(ensemble_scores(s[:1], "mean_minus_std"), s[0])  # one member: its own scores
    assert ensemble_scores(s.bfloat16(), "mean").dtype == torch.float32
    with pytest.raises(ValueError, match="aggregation must be one of"):
        ensemble_scores(s, "median")
    with pytest.raises(ValueError, match=r"\(k, B\)"):
        ensemble_scores(s[0], "mean")
