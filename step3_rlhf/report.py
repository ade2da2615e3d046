"""What stage 3 reports about a run: the per-iteration statistics of a rollout, the algorithm's settings in
words and in ppo_metrics.json, and sampled answers printed during training."""

from __future__ import annotations

import torch

from common import dist
from common.rl_math import get_advantage_estimator, masked_mean, masked_sum
from common.validate import reward_model_path
from step3_rlhf.experience import Rollout


def rollout_stats(r: Rollout) -> dict[str, float]:
    """Per-iteration statistics over all ranks (means of per-rank means; every rank has equal B)."""
    mask = r.action_mask
    seq_kl = masked_sum(r.kl, mask, dim=1)
    local = {
        "score_mean": r.scores.mean(),
        "score_sq_mean": (r.scores**2).mean(),
        "total_reward": masked_sum(r.rewards, mask, dim=1).mean(),
        "kl": seq_kl.mean(),  # mean over sequences of the per-sequence KL sum
        "response_length": mask.sum(1).float().mean(),
        "eos_fraction": r.ends_with_eos.float().mean(),
        "value_mean": masked_mean(r.values, mask),
        "advantage_mean": masked_mean(r.advantages, mask),
    }
    keys = list(local)
    reduced = dist.all_reduce_mean(torch.stack([local[k].float() for k in keys]))
    stats = dict(zip(keys, reduced.tolist(), strict=True))
    stats["score_std"] = max(stats.pop("score_sq_mean") - stats["score_mean"] ** 2, 0.0) ** 0.5
    return stats


def algorithm_settings(args) -> dict[str, object]:
    """The settings that say which RL algorithm ran: estimator, group size, reward, KL placement, loss
    aggregation (recorded in ppo_metrics.json)."""
    settings = {
        "advantage_estimator": args.advantage_estimator,
        "num_samples_per_prompt": args.num_samples_per_prompt,
        "critic": get_advantage_estimator(args.advantage_estimator).needs_critic,
        "reward_model": (reward_model_path(args) or (None, None))[1],
        "reward_model_coef": args.reward_model_coef,
        "reward_fn": args.reward_fn,
        "reward_fn_coef": args.reward_fn_coef,
        "kl": f"loss ({args.kl_loss_estimator}, coef {args.kl_loss_coef})" if args.kl_in_loss else "reward",
        "loss_agg": args.loss_agg,
        "whiten_advantages": args.whiten_advantages,
        "clip_ratio": [args.clip_ratio_low, args.clip_ratio_high],
        "ratio_level": args.ratio_level,
    }
    for flag in ("dual_clip", "overlong_buffer_len", "mask_truncated_answers"):
        if getattr(args, flag):
            settings[flag] = getattr(args, flag)
    if args.overlong_buffer_len:
        settings["overlong_penalty_factor"] = args.overlong_penalty_factor
    if args.reward_ensemble_models:
        settings["reward_ensemble"] = {
            "members": [settings["reward_model"], *args.reward_ensemble_models],
            "aggregation": args.reward_ensemble_aggregation,
            "std_coef": args.reward_ensemble_std_coef,
        }
    return settings


def describe_algorithm(args) -> str:
    """One log line of `algorithm_settings`."""
    s = algorithm_settings(args)
    model = f"reward model {s['reward_model']}"
    if "reward_ensemble" in s:
        ens = s["reward_ensemble"]
        model = f"{ens['aggregation']} of a {len(ens['members'])}-member reward-model ensemble"
    reward = " + ".join(
        [f"{s['reward_model_coef']:g} x {model}"] * (s["reward_model"] is not None)
        + [f"{s['reward_fn_coef']:g} x {s['reward_fn']}"] * (s["reward_fn"] is not None)
    )
    return (
        f"estimator {s['advantage_estimator']} ({'with' if s['critic'] else 'no'} critic), "
        f"{s['num_samples_per_prompt']} samples per prompt, reward {reward}, KL in the {s['kl']}, "
        f"loss {s['loss_agg']}, whitened advantages {'yes' if s['whiten_advantages'] else 'no'}, "
        f"{s['ratio_level']} ratio clipped to [{1 - s['clip_ratio'][0]:g}, {1 + s['clip_ratio'][1]:g}]"
        + "".join(
            f", {k} {s[k]}" for k in ("dual_clip", "overlong_buffer_len", "mask_truncated_answers") if k in s
        )
    )


def print_answers(tokenizer, r: Rollout, step: int) -> None:
    """Rank 0 prints the first answer of a rollout with its prompt and score (--print_answers)."""
    if not dist.is_rank0():
        return
    prompt = tokenizer.decode(r.seq[0, : r.prompt_len], skip_special_tokens=True)
    answer = tokenizer.decode(r.seq[0, r.prompt_len :][r.action_mask[0].bool()], skip_special_tokens=False)
    print(f"--- step {step} | score {r.scores[0].item():+.3f}\n{prompt.strip()}\n>>> {answer}", flush=True)
