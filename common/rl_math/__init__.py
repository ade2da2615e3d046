"""RL math for language models (PPO and the critic-free estimators GRPO, Dr. GRPO, RLOO, REINFORCE++; the
preference losses of DPO): pure functions over tensors with explicit masks.

Nothing here touches a model, an optimizer or DeepSpeed; every function takes tensors and returns tensors,
so each formula can be unit-tested against hand-computed numbers (tests/unit/common/test_rl_math.py).
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
  Under `--dtype bf16` every per-token tensor of PPO is therefore float32 (tests/runs/test_bf16.py).

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

The package's modules, each importable on its own; everything public is re-exported here, so
`from common.rl_math import gae` is the one import a caller needs:

- `masked`: masked sums, means, variances and whitening, and the input checks every function runs
- `logprobs`: log-probs and entropy from logits, the response slice and masks
- `kl`: the KL estimators, reward ensembles, per-token reward shaping, the KL controllers
- `advantages`: GAE, returns-to-go, the group baselines and the estimator registry, DAPO's group filter and
  overlong penalty
- `losses`: loss aggregation, the clipped policy loss (with clip-higher, dual-clip, GSPO's sequence-level ratio
  and importance weights) and value loss, truncated importance weights, the KL loss, the preference losses
"""

from common.rl_math.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    discounted_returns,
    dr_grpo_scores,
    estimate_advantages,
    gae,
    get_advantage_estimator,
    grpo_scores,
    informative_groups,
    overlong_penalty,
    rloo_scores,
)
from common.rl_math.kl import (
    ENSEMBLE_AGGREGATIONS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    ensemble_scores,
    kl_controller,
    kl_penalty,
    sequence_kl,
    shape_rewards,
)
from common.rl_math.logprobs import (
    entropy_from_logits,
    last_valid_index,
    logprobs_from_logits,
    pair_response_mask,
    response_logprobs,
    response_mask,
    response_positions,
)
from common.rl_math.losses import (
    LOSS_AGGREGATIONS,
    POLICY_RATIO_LEVELS,
    PREFERENCE_LOSSES,
    PREFERENCE_METHODS,
    PreferenceMethod,
    aggregate_loss,
    kl_loss,
    kto_loss,
    log_odds,
    orpo_loss,
    policy_loss,
    preference_loss,
    simpo_loss,
    truncated_is_weights,
    value_loss,
)
from common.rl_math.masked import (
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdaptiveKLController",
    "AdvantageEstimator",
    "ENSEMBLE_AGGREGATIONS",
    "FixedKLController",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_RATIO_LEVELS",
    "PREFERENCE_LOSSES",
    "PREFERENCE_METHODS",
    "PreferenceMethod",
    "aggregate_loss",
    "discounted_returns",
    "dr_grpo_scores",
    "ensemble_scores",
    "entropy_from_logits",
    "estimate_advantages",
    "gae",
    "get_advantage_estimator",
    "grpo_scores",
    "informative_groups",
    "kl_controller",
    "kl_loss",
    "kto_loss",
    "log_odds",
    "kl_penalty",
    "last_valid_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "overlong_penalty",
    "pair_response_mask",
    "orpo_loss",
    "policy_loss",
    "preference_loss",
    "simpo_loss",
    "response_logprobs",
    "response_mask",
    "response_positions",
    "rloo_scores",
    "sequence_kl",
    "shape_rewards",
    "truncated_is_weights",
    "value_loss",
]
