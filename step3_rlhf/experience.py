"""Experience making: sample responses, then score them with all models in batched forwards.

For one batch of left-padded prompts (B, P), each repeated --num_samples_per_prompt (n) times in a row, so
that a prompt's group of n answers is sampled in one batch on one rank:
  1. the actor samples responses (hybrid engine or the model's own `generate`); under ZeRO-3 its weights
     are gathered once per batch when a full copy fits (otherwise at every decode step, with `synced_gpus`);
     everything after the first EOS is masked, the EOS itself kept (items 5, 1);
  2. one forward each of actor, reference, critic (when the estimator has one) and reward model (when there
     is one) over prompt + response with attention mask and explicit position ids (item 4): temperature-
     scaled log-probs of the response tokens (items 6-7), values at the same positions (item 13), the
     normalised reward-model score at the last valid token (item 9), plus the --reward_fn's score;
  3. optional missing-EOS penalty (item 8) and overlong penalty (DAPO), then the advantage estimator over the whole rollout
     (`common.rl_math.estimate_advantages`): for PPO per-token rewards = -beta * KL + clipped score at the
     last token (item 14), GAE advantages and returns (item 16), whitened advantages (item 17); for the
     critic-free estimators a group baseline of the scores, then returns-to-go.
The math lives in common/rl_math/; this module only moves tensors between models and those functions.
Item numbers refer to docs/ppo-fidelity.md.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TypeVar

import torch
import torch.nn.functional as F

from common import dist
from common.evaluation.score_fn import ScoreFunction, call_score_function
from common.models.forward import response_logits
from common.models.sampling import Samples, SamplingSettings, decode_answer, sample_answers
from common.rl_math import (
    estimate_advantages,
    kl_penalty,
    logprobs_from_logits,
    overlong_penalty,
    response_positions,
)
from step3_rlhf.engines import (
    Engines,
    gathered_copy_fits,
    gathered_for_generation,
    has_inference_kernels,
)

E = TypeVar("E", bound="Experience")


@dataclass
class Experience:
    """Sampled answers, scored: B sequences of prompt (left-padded to P) + response (right-padded to R) with
    the policy's and reference's log-probs, the critic's values (zeros without a critic), the per-token KL and
    the sequence scores, before any advantage is computed (`ExperienceMaker.make`).

    seq, attention_mask: (B, P + R); action_mask and every per-token tensor: (B, R); scores, ends_with_eos: (B,).
    """

    seq: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    scores: torch.Tensor
    ends_with_eos: torch.Tensor
    prompt_len: int

    def select(self: E, index: torch.Tensor) -> E:
        """Rows `index` (of the same class: a Rollout stays a Rollout), trimmed to the longest valid response
        among them."""
        width = int(self.action_mask[index].sum(1).max().item())
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not torch.is_tensor(v):
                out[f.name] = v
            elif v.dim() == 1:
                out[f.name] = v[index]
            elif f.name in ("seq", "attention_mask"):
                out[f.name] = v[index, : self.prompt_len + width]
            else:
                out[f.name] = v[index, :width]
        return type(self)(**out)

    def __len__(self) -> int:
        return self.seq.shape[0]


@dataclass
class Rollout(Experience):
    """Experience with its per-token rewards, advantages and returns, (B, R) each, computed over the whole
    rollout of a rank (`ExperienceMaker.shape`): what the PPO update trains on."""

    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def _pad_right(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[1]), value=value)


def concat_experience(parts: list[Experience], pad_id: int) -> Experience:
    """Stack experience of different prompt widths P and response lengths R: prompts are left-padded to the
    widest P (position ids come from the mask, so this changes no number), responses right-padded."""
    if len(parts) == 1:
        return parts[0]
    prompt_len = max(p.prompt_len for p in parts)
    width = max(p.action_mask.shape[1] for p in parts)
    out: dict = {"prompt_len": prompt_len}
    for f in fields(Experience):
        if f.name == "prompt_len":
            continue
        vals = [getattr(p, f.name) for p in parts]
        if vals[0].dim() == 1:
            out[f.name] = torch.cat(vals)
        elif f.name in ("seq", "attention_mask"):
            value = pad_id if f.name == "seq" else 0
            out[f.name] = torch.cat(
                [
                    F.pad(
                        v,
                        (prompt_len - p.prompt_len, p.prompt_len + width - v.shape[1]),
                        value=value,
                    )
                    for v, p in zip(vals, parts, strict=True)
                ]
            )
        else:
            out[f.name] = torch.cat([_pad_right(v, width, 0) for v in vals])
    return Experience(**out)


def _columns(extra: list[dict] | None) -> dict[str, list]:
    """Rows' extra columns (B dicts) -> {column: [value of row i, None where row i lacks it]}."""
    if not extra:
        return {}
    names = dict.fromkeys(k for row in extra for k in row)
    return {name: [row.get(name) for row in extra] for name in names}


class ExperienceMaker:
    """Turns prompt batches into `Rollout`s with the engines and the PPO settings in `args`."""

    def __init__(
        self,
        engines: Engines,
        tokenizer,
        args: argparse.Namespace,
        kl_ctl,
        zero3_actor: bool,
        reward_fn: ScoreFunction | None = None,
    ):
        self.engines = engines
        self.tokenizer = tokenizer
        self.args = args
        self.kl_ctl = kl_ctl
        self.reward_fn = reward_fn
        self.zero3_actor = zero3_actor
        self.seconds: dict[str, float] = defaultdict(float)  # wall time per phase, reset by the caller
        self.sampling = SamplingSettings(
            max_new_tokens=args.max_answer_seq_len,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            do_sample=args.do_sample,
            use_cache=args.generation_use_cache,
        )
        if engines.hybrid:
            dist.print_rank0(
                "[ppo] hybrid engine: "
                + (
                    "DeepSpeed inference kernels"
                    if has_inference_kernels(engines.actor)
                    else "no kernels for this model/device, model's own generate()"
                )
            )

    def gather_actor(self) -> bool:
        """Whether this generate() call gathers the ZeRO-3 actor once (the same answer on every rank):
        --gather_actor_for_generation, by default when the full copy fits (see gathered_copy_fits). Never
        with the hybrid engine's kernels, which gather the layers themselves."""
        if not self.zero3_actor or has_inference_kernels(self.engines.actor):
            return False
        choice = self.args.gather_actor_for_generation
        return gathered_copy_fits(self.engines.actor) if choice is None else choice

    @contextmanager
    def _timed(self, phase: str):
        """Accumulate the wall time of a phase (synchronising the GPU so the time is the work's)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[phase] += time.perf_counter() - start

    # -------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> Samples:
        """(B, P) left-padded prompts -> the actor's answers (`common.models.sampling.sample_answers`: with the hybrid
        engine and a model it has kernels for, DeepSpeed's inference path; otherwise the model's own
        generate())."""
        gather = self.gather_actor()
        # Without the gather, every decode step all-gathers partitions: all ranks step until the longest is done.
        synced_gpus = self.zero3_actor and dist.get_world_size() > 1 and not gather
        with self._timed("generation"), gathered_for_generation(self.engines.actor, gather):
            return sample_answers(
                self.engines.actor,
                self.tokenizer,
                prompts,
                prompt_mask,
                self.sampling,
                synced_gpus=synced_gpus,
            )

    # -------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def policy_logprobs(
        self, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Actor and reference log-probs (B, R) of the answers in `seq` at the sampling temperature."""
        t = self.args.temperature
        answer = seq[:, prompt_len:]
        # Train mode is harmless here (dropout is off in every engine) and keeps the hybrid engine in training mode.
        with self._timed("actor_forward"):
            logits = response_logits(self.engines.actor, seq, attention_mask, prompt_len)
            logprobs = logprobs_from_logits(logits, answer, t)
        with self._timed("reference_forward"):
            logits = response_logits(self.engines.ref, seq, attention_mask, prompt_len)
            ref_logprobs = logprobs_from_logits(logits, answer, t)
        return logprobs, ref_logprobs

    @torch.no_grad()
    def score(
        self,
        seq: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_len: int,
        extra: list[dict] | None = None,
        prompt_text: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Actor/reference log-probs, critic values (B, R) and rewards (B,) (`reward_scores`; extra: the rows'
        extra dataset columns, prompt_text: their original prompts (chat-template data), for a reward
        function)."""
        logprobs, ref_logprobs = self.policy_logprobs(seq, attention_mask, prompt_len)
        values = torch.zeros_like(logprobs)
        if self.engines.critic is not None:
            with self._timed("critic_forward"):
                values = response_positions(self.engines.critic(seq, attention_mask).values, prompt_len)
        scores = self.reward_scores(seq, attention_mask, prompt_len, extra, prompt_text)
        return {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values, "scores": scores}

    @torch.no_grad()
    def reward_scores(
        self,
        seq: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_len: int,
        extra: list[dict] | None = None,
        prompt_text: list[str] | None = None,
    ) -> torch.Tensor:
        """(B,) rewards of sequences: --reward_model_coef x the reward model's normalised score plus
        --reward_fn_coef x the reward function's score (either may be absent), the function also given the
        rows' extra dataset columns (and their original prompts, `function_scores`)."""
        args = self.args
        total = torch.zeros(seq.shape[0], dtype=torch.float32, device=seq.device)
        if self.engines.reward is not None:
            with self._timed("reward_forward"):
                total += (
                    args.reward_model_coef
                    * self.engines.reward(seq, attention_mask, normalize=True).scores.float()
                )
        if self.reward_fn is not None:
            with self._timed("reward_fn"):
                answer_mask = attention_mask[:, prompt_len:]
                total += args.reward_fn_coef * self.function_scores(
                    seq, answer_mask, prompt_len, extra, prompt_text
                )
        return total

    def function_scores(
        self,
        seq: torch.Tensor,
        answer_mask: torch.Tensor,
        prompt_len: int,
        extra: list[dict] | None = None,
        prompt_text: list[str] | None = None,
    ) -> torch.Tensor:
        """(B,) scores of --reward_fn for the answers of `seq`, decoded as the held-out gold decodes them, with
        the extra dataset columns as keyword arguments (one list per column; None where a row lacks it). The
        prompts are `prompt_text` when given (the rows' original text; `seq` holds a chat-template rendering),
        else decoded from `seq`. A failing function stops every rank with its message (naming the rank and
        the sample)."""
        eos = self.tokenizer.eos_token_id
        ends = ((seq[:, prompt_len:] == eos) & answer_mask.bool()).any(dim=1)
        rows = [
            decode_answer(
                self.tokenizer,
                seq[i],
                answer_mask[i],
                bool(ends[i]),
                prompt_len,
                prompt_text and prompt_text[i],
            )
            for i in range(seq.shape[0])
        ]
        error, scores = None, []
        try:
            scores, _ = call_score_function(
                self.reward_fn,
                [r[0] for r in rows],
                [r[2] for r in rows],
                ends.tolist(),
                columns=_columns(extra),
                what=f"rank {dist.get_rank()}'s rollout",
            )
        except SystemExit as e:
            error = str(e)
        if dist.get_world_size() > 1:  # one rank's failure stops all of them, with its message
            errors: list[str | None] = [None] * dist.get_world_size()
            torch.distributed.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise SystemExit(error)
        return torch.tensor(scores, dtype=torch.float32, device=seq.device)

    @torch.no_grad()
    def make(
        self,
        prompts: torch.Tensor,
        prompt_mask: torch.Tensor,
        extra: list[dict] | None = None,
        prompt_text: list[str] | None = None,
    ) -> Experience:
        """One generation batch sampled and scored: log-probs, values, KL and scores (`shape` adds the
        rewards, advantages and returns, over the whole rollout). extra / prompt_text: the prompts' extra
        dataset columns and original texts, for a reward function."""
        args = self.args
        prompt_len = prompts.shape[1]
        if args.num_samples_per_prompt > 1:  # a group: n copies of each prompt, next to each other
            prompts = prompts.repeat_interleave(args.num_samples_per_prompt, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(args.num_samples_per_prompt, dim=0)
            if extra is not None:
                extra = [e for e in extra for _ in range(args.num_samples_per_prompt)]
            if prompt_text is not None:
                prompt_text = [t for t in prompt_text for _ in range(args.num_samples_per_prompt)]
        answers = self.sample(prompts, prompt_mask)
        seq, attention_mask, ends = answers.seq, answers.attention_mask, answers.ends
        s = self.score(seq, attention_mask, prompt_len, extra, prompt_text)
        scores = s["scores"].float()
        if args.missing_eos_penalty is not None:
            scores = torch.where(ends, scores, torch.full_like(scores, args.missing_eos_penalty))
        if args.overlong_buffer_len:  # DAPO's soft overlong punishment, on top of the score
            lengths = answers.action_mask.sum(dim=1)
            scores = scores + overlong_penalty(
                lengths, args.max_answer_seq_len, args.overlong_buffer_len, args.overlong_penalty_factor
            ).to(scores.device)
        kl = kl_penalty(s["logprobs"], s["ref_logprobs"], kind=args.kl_estimator, clamp=args.kl_clamp)
        return Experience(
            seq=seq,
            attention_mask=attention_mask,
            action_mask=answers.action_mask,
            logprobs=s["logprobs"],
            ref_logprobs=s["ref_logprobs"],
            values=s["values"],
            kl=kl,
            scores=scores,
            ends_with_eos=ends,
            prompt_len=prompt_len,
        )

    def shape(self, e: Experience) -> Rollout:
        """Rewards, advantages and returns of --advantage_estimator over the whole experience of this rank
        (whose groups are complete: see `make`). The KL penalty goes into the reward unless --kl_in_loss."""
        args = self.args
        advantages, returns, rewards = estimate_advantages(
            args.advantage_estimator,
            e.scores,
            e.kl,
            e.action_mask,
            kl_coef=0.0 if args.kl_in_loss else self.kl_ctl.value,
            values=e.values,
            gamma=args.gamma,
            lam=args.lam,
            group_size=args.num_samples_per_prompt,
            eps=args.group_std_eps,
            clip_score=args.clip_reward_value,
            whiten_rewards=args.whiten_rewards,
            whiten=args.whiten_advantages,
        )
        scored = {f.name: getattr(e, f.name) for f in fields(Experience)}
        return Rollout(**scored, rewards=rewards, advantages=advantages, returns=returns)

    def make_rollout(self, prompt_batches: list[dict[str, torch.Tensor]]) -> Rollout:
        """Several generation batches -> one shaped Rollout."""
        parts = [
            self.make(b["input_ids"], b["attention_mask"], b.get("extra"), b.get("prompt_text"))
            for b in prompt_batches
        ]
        return self.shape(concat_experience(parts, self.tokenizer.pad_token_id))
