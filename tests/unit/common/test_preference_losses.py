"""The preference losses beside DPO, against values computed by hand: SimPO and ORPO (no reference), KTO (unpaired
rows against a reference point), their gradients (nothing reaches a frozen input), their refusals, and the
registry that tells the DPO stage which of them loads a reference."""

from __future__ import annotations

import math

import pytest
import torch

from common.rl_math import PREFERENCE_LOSSES, PREFERENCE_METHODS, kto_loss, log_odds, orpo_loss, simpo_loss


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _avg(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_simpo_loss_margin_and_gradient_by_hand():
    chosen, rejected = _avg(-0.5, -1.0), _avg(-1.5, -1.0)
    losses, stats = simpo_loss(chosen, rejected, beta=2.0, gamma=1.0)
    # pair 0: h = 2 * (-0.5 + 1.5) - 1 = 1; pair 1: h = 0 - 1 = -1 (a tie still pays the margin)
    assert losses.tolist() == pytest.approx(
        [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))], abs=1e-12
    )
    assert stats["chosen_reward"].tolist() == pytest.approx([-1.0, -2.0])
    assert stats["margin"].tolist() == pytest.approx([2.0, 0.0])
    assert stats["accuracy"].tolist() == [1.0, 0.0]
    losses.sum().backward()
    # d/d avg_c of -log sigmoid(h) = -beta * sigmoid(-h); d/d avg_r is its opposite
    assert chosen.grad.tolist() == pytest.approx([-2 * _sigmoid(-1), -2 * _sigmoid(1)], abs=1e-12)
    assert rejected.grad.tolist() == pytest.approx([2 * _sigmoid(-1), 2 * _sigmoid(1)], abs=1e-12)


def test_simpo_gamma_zero_is_a_reference_free_dpo_on_mean_log_probs():
    chosen, rejected = _avg(-0.2, -3.0), _avg(-0.7, -1.0)
    simpo, _ = simpo_loss(chosen, rejected, beta=0.5, gamma=0.0)
    zeros = torch.zeros(2, dtype=torch.float64)
    dpo = PREFERENCE_LOSSES["sigmoid"](chosen - zeros - (rejected - zeros), 0.5, 0.0)
    assert simpo.tolist() == pytest.approx(dpo.tolist(), abs=1e-12)


def test_log_odds_by_hand_and_exact_near_probability_one():
    assert log_odds(
        torch.tensor([math.log(0.5), math.log(0.2)], dtype=torch.float64)
    ).tolist() == pytest.approx([0.0, math.log(0.25)], abs=1e-12)
    # p = exp(-1e-12): odds = p / (1 - p) ~ 1e12; log1p(-exp(x)) would lose every digit of 1 - p
    assert log_odds(torch.tensor([-1e-12], dtype=torch.float64)).item() == pytest.approx(
        math.log(1e12), rel=1e-6
    )


def test_orpo_loss_is_the_chosen_nll_plus_lambda_times_the_odds_ratio_term_by_hand():
    chosen, rejected = _avg(math.log(0.5)), _avg(math.log(0.2))
    losses, stats = orpo_loss(chosen, rejected, beta=0.1)
    # odds 1 and 1/4: log odds ratio log 4; NLL log 2; -log sigmoid(log 4) = log(5 / 4)
    assert losses.item() == pytest.approx(math.log(2) + 0.1 * math.log(1.25), abs=1e-12)
    assert stats["log_odds_ratio"].item() == pytest.approx(math.log(4), abs=1e-12)
    assert stats["chosen_reward"].item() == pytest.approx(0.1 * math.log(0.5), abs=1e-12)
    losses.backward()
    # d log odds / d a = 1 / (1 - p); d(-log sigmoid(x))/dx = -sigmoid(-x) = -1/5 at x = log 4
    assert chosen.grad.item() == pytest.approx(-1 - 0.1 * (1 / 5) / (1 - 0.5), abs=1e-12)
    assert rejected.grad.item() == pytest.approx(0.1 * (1 / 5) / (1 - 0.2), abs=1e-12)


def test_kto_loss_by_hand_with_a_clamped_detached_reference_point():
    policy = torch.tensor([-10.0, -12.0, -9.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-11.0, -11.0, -9.0], dtype=torch.float64, requires_grad=True)
    desirable = torch.tensor([True, False, False])
    kl = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    losses, stats = kto_loss(
        policy, ref, desirable, kl, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5
    )
    # r = [1, -1, 0], z0 = 0.5
    expected = [2 * (1 - _sigmoid(0.1 * 0.5)), 0.5 * (1 - _sigmoid(0.1 * 1.5)), 0.5 * (1 - _sigmoid(0.05))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert stats["reward"].tolist() == pytest.approx([0.1, -0.1, 0.0], abs=1e-12)
    losses.sum().backward()
    s = _sigmoid(0.05)
    s2 = _sigmoid(0.15)
    # d/dr of w(1 - sigmoid(beta(r - z0))) = -w beta s(1 - s); of w(1 - sigmoid(beta(z0 - r))) = +w beta s(1 - s)
    assert policy.grad.tolist() == pytest.approx(
        [-2 * 0.1 * s * (1 - s), 0.5 * 0.1 * s2 * (1 - s2), 0.5 * 0.1 * s * (1 - s)], abs=1e-12
    )
    assert ref.grad is None and kl.grad is None  # the reference and the reference point are frozen
    # a negative KL estimate is clamped to 0
    low, _ = kto_loss(policy, ref, desirable, torch.tensor(-3.0, dtype=torch.float64), beta=0.1)
    assert low[0].item() == pytest.approx(1 - _sigmoid(0.1), abs=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: simpo_loss(_avg(-1.0), _avg(-2.0), beta=0.0, gamma=0.5), "beta must be > 0"),
        (lambda: simpo_loss(_avg(-1.0), _avg(-2.0), beta=2.0, gamma=-0.1), "gamma must be >= 0"),
        (lambda: simpo_loss(_avg(-1.0), _avg(-2.0, -1.0), beta=2.0, gamma=0.5), "shape"),
        (lambda: orpo_loss(_avg(-1.0), _avg(-2.0), beta=-0.1), "beta must be > 0"),
        (
            lambda: kto_loss(_avg(-1.0), _avg(-1.0), torch.tensor([True]), torch.zeros(1), beta=0.1),
            "kl must be a 0-dim",
        ),
        (
            lambda: kto_loss(_avg(-1.0), _avg(-1.0), torch.tensor([True]), torch.tensor(0.0), 0.1, 0.0),
            "weights must be > 0",
        ),
    ],
)
def test_preference_losses_refuse_bad_options(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_registry_says_which_losses_need_a_reference_and_pairs():
    assert {k for k, m in PREFERENCE_METHODS.items() if not m.reference} == {"orpo", "simpo"}
    assert {k for k, m in PREFERENCE_METHODS.items() if not m.paired} == {"kto"}
    assert set(PREFERENCE_LOSSES) < set(PREFERENCE_METHODS)
    assert PREFERENCE_METHODS["simpo"].beta == 2.0 and PREFERENCE_METHODS["orpo"].beta == 0.1


# ------------------------------------------------------------------------------ the stage's flags, at parse time

BASE = ["--model_name_or_path", "m", "--output_dir", "o"]


@pytest.mark.parametrize(
    ("flags", "beta", "gamma"),
    [
        (["--loss_type", "simpo"], 2.0, 1.0),  # the paper's beta, gamma = beta / 2
        (["--loss_type", "simpo", "--beta", "2.5", "--simpo_gamma", "1.4"], 2.5, 1.4),
        (["--loss_type", "orpo"], 0.1, None),
        (["--loss_type", "kto"], 0.1, None),
        ([], 0.1, None),
    ],
)
def test_each_loss_takes_its_papers_beta_unless_given(flags, beta, gamma):
    from step2_dpo.args import parse_args

    args = parse_args([*BASE, *flags])
    assert args.beta == beta and args.simpo_gamma == gamma


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss_type", "orpo", "--reference_model_name_or_path", "r"], "orpo has no reference"),
        (["--loss_type", "simpo", "--reference_model_name_or_path", "r"], "simpo has no reference"),
        (["--loss_type", "orpo", "--sft_loss_coef", "0.5"], "holds the chosen responses' NLL"),
        (["--simpo_gamma", "1.0"], "needs --loss_type simpo"),
        (["--loss_type", "simpo", "--simpo_gamma", "-1"], "--simpo_gamma must be >= 0"),
        (["--loss_type", "sigmoid", "--desirable_weight", "2"], "KTO's: they need --loss_type kto"),
        (["--loss_type", "kto", "--undesirable_weight", "0"], "must be > 0"),
        (["--loss_type", "kto", "--label_smoothing", "0.1"], "needs --loss_type sigmoid"),
        (["--loss_type", "simpo", "--beta", "0"], "--beta must be > 0"),
        (["--loss_type", "hinge"], "invalid choice"),
    ],
)
def test_bad_preference_settings_are_refused_at_parse_time(flags, message, capsys):
    from step2_dpo.args import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args([*BASE, *flags])
    assert message in str(e.value) + capsys.readouterr().err
