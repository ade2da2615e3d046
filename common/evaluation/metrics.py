"""The metrics files the stages write and the pipeline's report, the multi-seed study, the plot and the benches
read: one typed schema, so each key is spelled in one place.

    sft/sft_metrics.json    SFTMetrics            stage 1
    rm/rm_metrics.json      RewardModelMetrics    stage 2
    ppo/ppo_metrics.json    PolicyMetrics         stage 3 (PPO and the critic-free estimators)
    dpo/dpo_metrics.json    PolicyMetrics         DPO

A stage builds its object and writes `to_dict()` as JSON (the file is written last: it marks the stage
finished); a reader calls `read(path)`, which names the file and the key when a file is not one. Keys this
schema does not name are kept in `extra` and written back unchanged, so a file from a newer stage still reads.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from common.files import write_text_atomic

# JSON key of the share of answers the gold gave a label: gold_share_<label>
GOLD_SHARE_PREFIX = "gold_share_"


class MetricsFileError(ValueError):
    """A metrics file that is missing a key this schema needs, or is not JSON."""


def _require_object(data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise MetricsFileError(f"{where}: a {type(data).__name__}, not a JSON object")


def _split(cls: type, data: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the keys that are fields of `cls`, the others); MetricsFileError for a required field that is absent."""
    _require_object(data, where)
    names = {f.name for f in fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    if missing := sorted(required - known.keys()):
        raise MetricsFileError(f"{where}: no {missing[0]!r} (is this a {cls.__name__} file?)")
    return known, {k: v for k, v in data.items() if k not in names}


def _json(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


class _Record:
    """What every schema below shares: fields of the JSON object by name, the other keys in `extra`, nested
    records parsed by `NESTED`, and None written only for the fields in `KEEP_NONE` (absent otherwise)."""

    NESTED: ClassVar[dict[str, Any]] = {}  # field -> the record type of its value (a list of them for a list)
    KEEP_NONE: ClassVar[frozenset[str]] = frozenset()
    extra: dict[str, Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "metrics") -> Any:
        known, extra = _split(cls, data, where)
        for name, record in cls.NESTED.items():
            if isinstance(known.get(name), list):
                known[name] = [record.from_dict(v, f"{where}: {name}") for v in known[name]]
            elif name in known:
                known[name] = record.from_dict(known[name], f"{where}: {name}")
        return cls(**known, extra=extra)

    @classmethod
    def read(cls, path: str | Path) -> Any:
        return cls.from_dict(_read_json(path), str(path))

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name != "extra" and (value is not None or f.name in self.KEEP_NONE):
                out[f.name] = _json(value)
        return out | self.extra


@dataclass
class AnswerEval(_Record):
    """One held-out evaluation of a policy's sampled answers: stage 3's `before`, `after` and each of `evals`;
    DPO's, with its pair metrics. A measure the run did not take is None (and absent from the file)."""

    step: int | None = None
    score: float | None = None  # the proxy: the reward model's normalised score, or --reward_fn's (stage 3)
    kl: float | None = None  # mean per-sequence KL of the answers to the stage-1 policy
    response_length: float | None = None  # tokens
    eos_fraction: float | None = None  # share of answers that ended in EOS
    repeated_3gram_rate: float | None = None
    distinct_2: float | None = None
    leaked_turn_markers: float | None = None  # share of answers with a turn marker of the chat format
    gold_mean: float | None = None  # the gold scorer's mean (the bundled task's ground truth)
    gold_shares: dict[str, float] = field(
        default_factory=dict
    )  # label -> share; JSON keys gold_share_<label>
    accuracy: float | None = None  # DPO: held-out pair accuracy of the implicit reward
    margin: float | None = None  # DPO: mean implicit-reward margin, chosen - rejected
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "evaluation") -> AnswerEval:
        _require_object(data, where)
        shares = {
            k.removeprefix(GOLD_SHARE_PREFIX): v for k, v in data.items() if k.startswith(GOLD_SHARE_PREFIX)
        }
        rest = {k: v for k, v in data.items() if not k.startswith(GOLD_SHARE_PREFIX) and k != "gold_shares"}
        return super().from_dict({**rest, "gold_shares": shares}, where)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        shares = out.pop("gold_shares")
        return out | {f"{GOLD_SHARE_PREFIX}{label}": share for label, share in shares.items()}

    def share(self, label: str) -> float | None:
        """The share of answers the gold labelled `label`; None when the gold gave no such label."""
        return self.gold_shares.get(label)


@dataclass
class PolicyMetrics(_Record):
    """What a stage that trains a policy (stage 3, DPO) records: the held-out evaluations of the stage-1
    policy (`before`) and of the trained one (`after`), every evaluation in between, and for stage 3 the
    per-iteration training statistics (`history`, the TensorBoard scalars, free-form)."""

    NESTED: ClassVar[dict[str, Any]] = {"before": AnswerEval, "after": AnswerEval, "evals": AnswerEval}
    KEEP_NONE: ClassVar[frozenset[str]] = frozenset({"final_kl", "gold_reward"})

    before: AnswerEval
    after: AnswerEval
    evals: list[AnswerEval] = field(default_factory=list)
    final_kl: float | None = None  # stage 3: the last iteration's rollout KL; DPO: the held-out answers' KL
    gold_reward: str | None = None  # the gold scorer, module:function, or None
    score_gain: float | None = None  # stage 3: proxy after - before
    gold_gain: float | None = None  # stage 3: gold after - before, when a gold was known
    algorithm: dict[str, Any] | None = None  # stage 3: estimator, reward, KL handling, loss aggregation
    history: list[dict[str, Any]] | None = None  # stage 3 only
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SFTMetrics(_Record):
    """Stage 1: held-out perplexity before training and after each epoch."""

    perplexity_per_epoch: list[float]
    optimizer_steps: int
    skipped_nonfinite_steps: int = 0
    saved_logits_max_abs_diff: float | None = None  # --verify_save: the saved model against the engine
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PairEval(_Record):
    """The reward model on held-out preference pairs (chosen_mean, rejected_mean, margin_mean, loss in extra)."""

    pairs: int
    accuracy: float  # share of pairs whose chosen answer scores higher
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardModelMetrics(_Record):
    """Stage 2: the held-out pair metrics at the end (`final`) and at each evaluation (`eval_curve`), and
    the normalisation fitted to the stage-1 policy's answers."""

    NESTED: ClassVar[dict[str, Any]] = {"final": PairEval}

    final: PairEval
    eval_curve: list[dict[str, Any]] = field(default_factory=list)
    normalization: dict[str, Any] | None = None
    optimizer_steps: int = 0
    skipped_nonfinite_steps: int = 0
    saved_scores_max_abs_diff: float | None = None  # --verify_save: the saved model against the engine
    extra: dict[str, Any] = field(default_factory=dict)


def write_metrics(metrics: SFTMetrics | RewardModelMetrics | PolicyMetrics, path: str | Path) -> None:
    """Write `metrics` as the JSON file `path`, atomically (a reader never sees half a file)."""
    write_text_atomic(path, json.dumps(metrics.to_dict(), indent=2))


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise MetricsFileError(f"{path}: not valid JSON ({e})") from None
    _require_object(data, str(path))
    return data
