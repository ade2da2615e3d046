"""The policy-loss variants of common.rl_math against values computed by hand and against independent
formulas: DAPO's clip-higher, dynamic-sampling filter and overlong penalty; dual-clip PPO; GSPO's
sequence-level ratio; truncated importance sampling."""

from __future__ import annotations

import math

import pytest
import torch

from common.rl_math import informative_groups, overlong_penalty, policy_loss, truncated_is_weights


def _logp_for(ratios: list[float], old: torch.Tensor) -> torch.Tensor:
    return (old + torch.tensor(ratios).log()).requires_grad_(True)


def test_clip_higher_lets_a_positive_advantage_rise_past_the_symmetric_bound():
    old = torch.tensor([[-2.0, -1.0]])
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    # ratio 1.25 with A = +1: clipped at 1.2 symmetrically, not at 1.28; ratio 0.7 with A = -1: clipped at 0.8.
    sym_logp, high_logp = _logp_for([1.25, 0.7], old), _logp_for([1.25, 0.7], old)
    sym, sym_stats = policy_loss(sym_logp, old, adv, mask, clip_eps=0.2)
    high, high_stats = policy_loss(high_logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert sym.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert high.item() == pytest.approx((-1.25 + 0.8) / 2)
    sym.backward()
    high.backward()
    torch.testing.assert_close(sym_logp.grad, torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(high_logp.grad, torch.tensor([[-1.25 / 2, 0.0]]))
    assert sym_stats["clipfrac"].item() == 1.0 and high_stats["clipfrac"].item() == 0.5


def test_dual_clip_caps_the_loss_of_negative_advantages_only():
    old = torch.tensor([[-3.0, -3.0, -3.0, -1.0]])
    adv = torch.tensor([[-1.0, -1.0, 1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    logp = _logp_for([5.0, 2.0, 5.0, 50.0], old)
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    # per token: min(max(5, 1.2), 3) = 3 (held, no gradient); max(2, 1.2) = 2 < 3; A > 0: max(-5, -1.2) = -1.2
    assert loss.item() == pytest.approx((3 + 2 - 1.2) / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 2.0 / 3, 0.0, 0.0]]))
    assert stats["dual_clipfrac"].item() == pytest.approx(1 / 3)
    plain, plain_stats = policy_loss(logp.detach(), old, adv, mask, clip_eps=0.2)
    assert plain.item() == pytest.approx((5 + 2 - 1.2) / 3) and "dual_clipfrac" not in plain_stats


def test_sequence_ratio_is_gspo_value_and_gradient():
    """GSPO's objective written directly, per sequence, with autograd: mean_i(max(-A_i s_i, -A_i clip(s_i)))
    with s_i = exp(mean of the answer's log-ratios), against policy_loss(ratio_level="sequence")."""
    old = torch.tensor([[-1.0, -2.0, -1.5], [-0.5, -1.0, -9.0]])
    log_ratio = torch.tensor([[0.1, 0.3, 0.2], [-0.4, 0.0, 7.0]])  # the last token of row 1 is masked
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    logp = (old + log_ratio).requires_grad_(True)
    loss, stats = policy_loss(
        logp, old, adv, mask, 0.5, loss_agg="seq_mean_token_mean", ratio_level="sequence"
    )
    loss.backward()

    ref_logp = (old + log_ratio).requires_grad_(True)
    seq_terms = []
    for i, n in enumerate((3, 2)):
        s = torch.exp((ref_logp[i, :n] - old[i, :n]).mean())
        a = adv[i, 0]
        seq_terms.append(torch.maximum(-a * s, -a * s.clamp(0.5, 1.5)))
    reference = torch.stack(seq_terms).mean()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item())
    torch.testing.assert_close(logp.grad, ref_logp.grad)
    # by hand: s_0 = e^0.2, s_1 = e^-0.2; d/dlogp_{i,t} = -A_i s_i / (B |y_i|)
    assert logp.grad[0, 0].item() == pytest.approx(-math.exp(0.2) / 6)
    assert logp.grad[1, 1].item() == pytest.approx(math.exp(-0.2) / 4)
    assert logp.grad[1, 2].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx((3 * math.exp(0.2) + 2 * math.exp(-0.2)) / 5)


def test_sequence_ratio_clips_whole_answers():
    old = torch.zeros(2, 2)
    mask = torch.ones(2, 2)
    adv = torch.ones(2, 2)
    # row 0: token ratios 2.0 and 0.8 (a token-level PPO clips one of them); the sequence ratio is
    # sqrt(1.6) = 1.265 > 1.2, so the whole answer is clipped: no gradient to either token.
    logp = torch.tensor([[math.log(2.0), math.log(0.8)], [0.0, 0.0]], requires_grad=True)
    loss, stats = policy_loss(
        logp, old, adv, mask, 0.2, loss_agg="seq_mean_token_mean", ratio_level="sequence"
    )
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 - 1.0) / 2)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0], [-0.25, -0.25]]))
    assert stats["clipfrac"].item() == 0.5
    token, _ = policy_loss(logp.detach(), old, adv, mask, 0.2, loss_agg="seq_mean_token_mean")
    assert token.item() == pytest.approx(((-1.2 - 0.8) / 2 - 1.0) / 2)


def test_sequence_ratio_equals_token_ratio_when_every_token_moved_alike():
    g = torch.Generator().manual_seed(3)
    old = torch.randn(3, 4, generator=g)
    shift = torch.tensor([[0.05], [-0.1], [0.15]])
    adv = torch.randn(3, 1, generator=g).expand(3, 4)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    a, _ = policy_loss(old + shift, old, adv, mask, 0.2, ratio_level="sequence")
    b, _ = policy_loss(old + shift, old, adv, mask, 0.2)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_importance_weights_truncate_and_multiply_each_token():
    old = torch.tensor([[-1.0, -2.0, -1.0]])
    behaviour = torch.tensor([[-1.5, -0.5, 40.0]])  # garbage at the masked slot
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = truncated_is_weights(old, behaviour, mask, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, math.exp(-1.5), 0.0]]))
    assert truncated_is_weights(old, old.clone(), mask, cap=2.0).tolist() == [[1.0, 1.0, 0.0]]
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([[2.0, -1.0, 5.0]])
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, is_weights=w)
    assert loss.item() == pytest.approx((-2.0 * 1.5 + 1.0 * math.exp(-1.5)) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.5, math.exp(-1.5) / 2, 0.0]]))
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(old, behaviour, mask, cap=0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_eps_high": 0.0}, "clip ranges must be > 0"),
        ({"dual_clip": 1.0}, "dual_clip must be > 1"),
        ({"ratio_level": "answer"}, "ratio_level must be one of"),
    ],
)
def test_policy_loss_refuses_bad_variant_settings(kwargs, message):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=message):
        policy_loss(x, x, x, torch.ones(1, 2), 0.2, **kwargs)


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([5, 6, 7, 10, 12])
    # max 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 from 10 on
    torch.testing.assert_close(
        overlong_penalty(lengths, max_len=10, buffer_len=4), torch.tensor([0.0, 0.0, -0.25, -1.0, -1.0])
    )
    torch.testing.assert_close(
        overlong_penalty(lengths, max_len=10, buffer_len=4, factor=0.5),
        torch.tensor([0, 0, -0.125, -0.5, -0.5]),
    )
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, max_len=10, buffer_len=11)


def test_informative_groups_drop_groups_whose_answers_scored_alike():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, -2.0, -2.0, -2.0, -2.0 + 1e-4])
    assert informative_groups(scores, 4).tolist() == [False, True, True]
    assert informative_groups(scores, 4, tol=1e-3).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="do not split into groups"):
        informative_groups(scores[:5], 4)
