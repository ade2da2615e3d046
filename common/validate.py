"""Checks of a stage's flags against the models they name, run before any data is tokenised or model built.

Each stage's main calls `validate_sft`, `validate_ppo` or `step2_reward.validate.validate_reward` (which
composes the checks below with those of the normalisation policy, a stage-2 flag) right after parsing its flags
and initialising torch.distributed (every rank runs them, so every rank stops); nothing here imports a stage.
They read config.json and the tokenizer files only; LoRA names are matched on a model built on the meta device
(no weights, no memory).
Every failure is a SystemExit whose message names the flag, the path and what is wrong:

- model path: a local directory must exist, be readable, hold a readable config.json and safetensors weights
  (pickle weights - pytorch_model*.bin, *.pt, *.pth, *.ckpt, *.pkl - only with --allow_pickle_weights,
  since unpickling can run arbitrary code); a config.json or tokenizer_config.json with `auto_map` (model code
  shipped with the weights) needs --trust_remote_code. A name that is not an existing local path and looks
  like a hub id ("name" or "org/name") goes through transformers' normal hub loading; failing there names the
  flag. Hub models get `use_safetensors=True` from the loaders (common.models, common.models.reward_model).
- tokenizer: it has an EOS token, and its base vocabulary has no id >= the model's vocab_size. Added
  tokens (like the pad token `common.models.loading.load_tokenizer` adds when there is none) are not counted: the
  loaders resize the embeddings to len(tokenizer) for them.
- tokenizers that must agree: stage 3's critic and reward model read the actor's token ids; stage 2's
  normalisation policy generates token ids the reward model reads.
- lengths: --max_seq_len (stages 1-2), --max_prompt_seq_len + --max_answer_seq_len (stage 3) fit in the
  model's positions (config max_position_embeddings / n_positions), when its config states them.
- batch sizes and counts are >= 1 (`check_counts`, called from `common.args.check_args`); stage 3's rollout /
  minibatch divisibility is in step3_rlhf/args.py; the hybrid engine's --inference_tp_size divides the ranks.
- LoRA: --lora_module_name (--actor_/--critic_) matches at least one Linear layer of the model it adapts.

A DataError found later (common.data names the file, row and column) ends the run with that message and no
traceback: it is a `common.errors.UserError`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from common.files import DamagedFileError, check_model_weights, read_json_file
from common.rl_math import get_advantage_estimator

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
COUNT_FLAGS = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "per_device_generation_batch_size",
    "per_device_training_batch_size",
    "gradient_accumulation_steps",
    "generation_batches",
    "ppo_epochs",
    "num_train_epochs",
    "print_answers_interval",
)


# ----------------------------------------------------------------------------------------- model paths


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub id ("gpt2", "facebook/opt-1.3b") rather than a filesystem path."""
    return bool(name) and not name.startswith(("/", ".", "~")) and name.count("/") <= 1 and "\\" not in name


def check_model_path(
    flag: str, name_or_path: str, *, trust_remote_code: bool = False, allow_pickle_weights: bool = False
) -> Any:
    """Check what `flag` names and return its transformers config (read from config.json, no weights)."""
    path = Path(name_or_path)
    if path.exists():
        _check_local_dir(flag, path, trust_remote_code, allow_pickle_weights)
    elif not is_hub_id(name_or_path):
        raise SystemExit(f"{flag} {name_or_path}: no such directory")
    elif "auto_map" in _read_json(flag, _hub_config_file(flag, name_or_path)) and not trust_remote_code:
        raise SystemExit(_remote_code_message(flag, name_or_path, "config.json"))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag} {name_or_path}: cannot load its config: {e}") from None


def _check_local_dir(flag: str, path: Path, trust_remote_code: bool, allow_pickle_weights: bool) -> None:
    if not path.is_dir():
        raise SystemExit(
            f"{flag} {path}: is a file; expected a model directory (config.json, weights, tokenizer)"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise SystemExit(f"{flag} {path}: the directory is not readable (permissions)")
    if not (path / "config.json").exists():
        raise SystemExit(f"{flag} {path}: no config.json in it, so it is not a Hugging Face model directory")
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        if file.exists() and "auto_map" in _read_json(flag, file) and not trust_remote_code:
            raise SystemExit(_remote_code_message(flag, str(path), name))
    _check_weight_files(flag, path, allow_pickle_weights)
    _check_whole(flag, path)


def _check_whole(flag: str, path: Path) -> None:
    """Every safetensors file is whole (a save killed halfway, a copy cut short), the tokenizer's JSON files
    parse, and a reward model's value head, which its config.json names, is there."""
    fix = "it was cut short or damaged: rerun the stage that wrote it, or point the flag at an intact copy"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if (path / name).is_file():
            try:
                read_json_file(path / name, fix)
            except DamagedFileError as e:
                raise SystemExit(f"{flag} {e}") from None
    head = _read_json(flag, path / "config.json").get("reward_model")
    if isinstance(head, dict) and not (path / head.get("value_head", "value_head.safetensors")).is_file():
        raise SystemExit(
            f"{flag} {path}: a reward model whose value head ({head.get('value_head')}) is missing; {fix}"
        )
    try:
        check_model_weights(path, fix)
    except DamagedFileError as e:
        raise SystemExit(f"{flag} {e}") from None


def _read_json(flag: str, file: Path) -> dict:
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"{flag} {file}: cannot read it ({e})") from None
    if not isinstance(content, dict):
        raise SystemExit(f"{flag} {file}: expected a JSON object, got a {type(content).__name__}")
    return content


def _remote_code_message(flag: str, where: str, file: str) -> str:
    return (
        f"{flag} {where}: its {file} has an 'auto_map', i.e. the model ships its own Python code, which is "
        "not run without --trust_remote_code (pass it if you trust the code, or remove 'auto_map' to use "
        "transformers' built-in implementation of its model_type)"
    )


def _check_weight_files(flag: str, path: Path, allow_pickle_weights: bool) -> None:
    """Safetensors weights, or pickle weights only when allowed."""
    if any((path / name).is_file() for name in SAFETENSORS_FILES):
        return
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern)})
    if not pickles:
        raise SystemExit(f"{flag} {path}: no model weights in it (model.safetensors or its index)")
    if not allow_pickle_weights:
        raise SystemExit(
            f"{flag} {path}: its weights are pickle files ({', '.join(pickles[:3])}) and it has no "
            "safetensors; unpickling can run arbitrary code. Convert them to safetensors, or pass "
            "--allow_pickle_weights if you trust this directory."
        )
    if not any(p.startswith("pytorch_model") for p in pickles):
        raise SystemExit(
            f"{flag} {path}: found {pickles[:3]}, but from_pretrained reads pytorch_model.bin (or its index)"
        )


def _hub_config_file(flag: str, hub_id: str) -> Path:
    """config.json of a hub model, through transformers' usual download and cache."""
    from transformers.utils import cached_file

    try:
        return Path(cached_file(hub_id, "config.json"))
    except OSError as e:
        raise SystemExit(
            f"{flag} {hub_id}: no such local directory, and loading it from the Hugging Face hub failed: {e}"
        ) from None


def load_checked_tokenizer(flag: str, name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer as saved (before `load_tokenizer` adds a pad token); it must have an EOS token."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers would quietly build an empty tokenizer from the model type
        raise SystemExit(f"{flag} {name_or_path}: cannot load its tokenizer: no tokenizer files in it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag} {name_or_path}: cannot load its tokenizer: {e}") from None
    if tokenizer.eos_token_id is None:
        raise SystemExit(
            f"{flag} {name_or_path}: its tokenizer has no EOS token (set eos_token in its config)"
        )
    return tokenizer


# ----------------------------------------------------------------------------------- model vs flags


def check_vocab(flag: str, name_or_path: str, tokenizer: Any, config: Any, tokenizer_from: str = "") -> None:
    """The tokenizer's base vocabulary indexes rows of the model's embedding (config.vocab_size).

    Added tokens (a pad token, chat markers) may lie beyond it: the loaders resize the embeddings to
    len(tokenizer), as they do for the pad token `load_tokenizer` adds. A base vocabulary beyond it means the
    tokenizer belongs to another model, and its ids would index the wrong rows or none."""
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None:
        return
    added = set(tokenizer.get_added_vocab().values())
    largest = max((i for i in tokenizer.get_vocab().values() if i not in added), default=-1)
    if largest >= vocab_size:
        source = tokenizer_from or f"{flag} {name_or_path}"
        raise SystemExit(
            f"{flag} {name_or_path}: the tokenizer ({source}) has token ids up to {largest} (added tokens not "
            f"counted), but the model's config.json has vocab_size {vocab_size}: tokenizer and model do not "
            "belong together"
        )


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's config allows, if it states one."""
    for attr in POSITION_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_length(flag: str, name_or_path: str, config: Any, length: int, what: str) -> None:
    """`length` tokens (described by `what`, e.g. '--max_seq_len 1024') fit in the model's positions."""
    limit = max_positions(config)
    if limit is not None and length > limit:
        raise SystemExit(
            f"{what} is longer than the {limit} positions of {flag} {name_or_path} "
            "(max_position_embeddings in its config.json)"
        )


def check_lora_modules(
    lora_flag: str,
    module_name: str,
    flag: str,
    name_or_path: str,
    config: Any,
    *,
    trunk: bool,
    trust_remote_code: bool = False,
) -> None:
    """`module_name` matches a Linear layer of the model (the causal LM, or with trunk=True the AutoModel
    trunk that the reward model adapts), built on the meta device from `config`."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from common.models.lora import lora_target_modules

    auto = AutoModel if trunk else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    try:
        lora_target_modules(model, module_name, flag=lora_flag)
    except ValueError as e:
        raise SystemExit(f"{e} ({flag} {name_or_path})") from None


def check_counts(args: argparse.Namespace) -> None:
    """Batch sizes, accumulation steps, epochs and intervals that must be >= 1 (pure; before any modulo)."""
    for name in COUNT_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"--{name} must be >= 1 (got {value})")
    for name in ("eval_interval", "eval_num_prompts", "eval_iters"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise SystemExit(f"--{name} must be >= 0 (got {value})")


def check_tensor_parallel(args: argparse.Namespace, world_size: int) -> None:
    """The hybrid engine splits the ranks into groups of --inference_tp_size."""
    if not getattr(args, "enable_hybrid_engine", False):
        return
    tp = args.inference_tp_size
    if tp < 1 or world_size % tp:
        raise SystemExit(
            f"--inference_tp_size {tp} must be >= 1 and divide the number of ranks ({world_size})"
        )


# ------------------------------------------------------------------------------------------ the stages


def validate_sft(args: argparse.Namespace) -> None:
    """Stage 1: model path and weights, tokenizer vs vocabulary, --max_seq_len, LoRA names."""
    flag, path = "--model_name_or_path", args.model_name_or_path
    config = _check_model(args, flag, path)
    tokenizer = load_checked_tokenizer(flag, path, args.trust_remote_code)
    check_vocab(flag, path, tokenizer, config)
    check_length(flag, path, config, args.max_seq_len, f"--max_seq_len {args.max_seq_len}")
    if args.lora_dim > 0:
        lora = ("--lora_module_name", args.lora_module_name)
        check_lora_modules(*lora, flag, path, config, trunk=False, trust_remote_code=args.trust_remote_code)


def validate_dpo(args: argparse.Namespace) -> None:
    """DPO: the policy as stage 1's model (path, weights, vocabulary, --max_seq_len, LoRA names); the
    reference, when another model, with the policy's tokenizer; prompt + answer of the held-out evaluation
    within the policy's positions."""
    validate_sft(args)
    flag, path = "--model_name_or_path", args.model_name_or_path
    config = _check_model(args, flag, path)
    ref = args.reference_model_name_or_path
    if ref and ref != path:
        ref_config = _check_model(args, "--reference_model_name_or_path", ref)
        check_same_tokenizer(flag, path, {"--reference_model_name_or_path": ref}, args.trust_remote_code)
        check_length(
            "--reference_model_name_or_path",
            ref,
            ref_config,
            args.max_seq_len,
            f"--max_seq_len {args.max_seq_len}",
        )
    if args.eval_num_prompts:
        total = args.max_prompt_seq_len + args.max_answer_seq_len
        what = (
            f"--max_prompt_seq_len {args.max_prompt_seq_len} + --max_answer_seq_len {args.max_answer_seq_len} "
            "(the held-out answers)"
        )
        check_length(flag, path, config, total, what)


def reward_model_path(args: argparse.Namespace) -> tuple[str, str] | None:
    """(flag, path) of the frozen reward model: --reward_model_name_or_path, else --critic_model_name_or_path
    (DeepSpeed-Chat's default); None when there is none or --reward_model_coef is 0."""
    if args.reward_model_coef == 0:
        return None
    for flag in ("reward_model_name_or_path", "critic_model_name_or_path"):
        if getattr(args, flag):
            return f"--{flag}", getattr(args, flag)
    return None


def ppo_model_paths(args: argparse.Namespace) -> dict[str, str]:
    """{flag: path} of every model stage 3 loads: the actor, the critic when the estimator trains one, the
    reward model when there is one and the further members of its ensemble."""
    models = {"--actor_model_name_or_path": args.actor_model_name_or_path}
    if get_advantage_estimator(args.advantage_estimator).needs_critic:
        models["--critic_model_name_or_path"] = args.critic_model_name_or_path
    if (reward := reward_model_path(args)) is not None:
        models[reward[0]] = reward[1]
        for i, path in enumerate(getattr(args, "reward_ensemble_models", []), start=1):
            models[f"--reward_ensemble_models (member {i})"] = path
    return models


def validate_ppo(args: argparse.Namespace) -> None:
    """Stage 3: every model path the run loads (`ppo_model_paths`), one tokenizer for all, prompt + answer
    length against every model, LoRA names of actor and critic, the hybrid engine's tensor-parallel size."""
    from common import dist

    check_tensor_parallel(args, dist.get_world_size())
    models = ppo_model_paths(args)
    configs = {flag: _check_model(args, flag, path) for flag, path in models.items()}
    actor_flag, actor_path = "--actor_model_name_or_path", args.actor_model_name_or_path
    actor_tokenizer = load_checked_tokenizer(actor_flag, actor_path, args.trust_remote_code)
    check_same_tokenizer(actor_flag, actor_path, models, args.trust_remote_code)
    total = args.max_prompt_seq_len + args.max_answer_seq_len
    what = (
        f"--max_prompt_seq_len {args.max_prompt_seq_len} + --max_answer_seq_len {args.max_answer_seq_len} "
        f"= {total} tokens (the prompt must leave room for the answer)"
    )
    for flag, path in models.items():
        check_vocab(flag, path, actor_tokenizer, configs[flag], f"{actor_flag} {actor_path}")
        check_length(flag, path, configs[flag], total, what)
    if args.actor_lora_dim > 0:
        lora = ("--actor_lora_module_name", args.actor_lora_module_name)
        trust = args.trust_remote_code
        check_lora_modules(
            *lora, actor_flag, actor_path, configs[actor_flag], trunk=False, trust_remote_code=trust
        )
    if args.critic_lora_dim > 0 and "--critic_model_name_or_path" in models:
        lora = ("--critic_lora_module_name", args.critic_lora_module_name)
        critic = "--critic_model_name_or_path"
        check_lora_modules(*lora, critic, models[critic], configs[critic], trunk=True)


def check_same_tokenizer(
    ref_flag: str, ref_path: str, models: dict[str, str], trust_remote_code: bool
) -> None:
    """Every model in `models` ({flag: path}) has the tokenizer of `ref_path`, as `load_tokenizer` gives it
    (same vocabulary, same EOS and pad ids): they all read the same token ids."""
    from common.models.loading import load_tokenizer

    reference = load_tokenizer(ref_path, trust_remote_code)
    for flag, path in models.items():
        if path == ref_path:
            continue
        other = load_tokenizer(path, trust_remote_code)
        difference = _tokenizer_difference(reference, other)
        if difference:
            raise SystemExit(
                f"{flag} {path}: its tokenizer differs from the one of {ref_flag} {ref_path} ({difference}): "
                "it would read token ids it was not trained on. Train it from a model with the same tokenizer."
            )


def _tokenizer_difference(a: Any, b: Any) -> str:
    """'' when `a` and `b` map the same strings to the same ids with the same EOS and pad; else what differs."""
    if (a.eos_token_id, a.pad_token_id) != (b.eos_token_id, b.pad_token_id):
        return f"EOS/pad ids {a.eos_token_id}/{a.pad_token_id} vs {b.eos_token_id}/{b.pad_token_id}"
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return ""
    token = next((t for t in sorted(va.keys() | vb.keys()) if va.get(t) != vb.get(t)), None)
    return f"{len(va)} vs {len(vb)} tokens; {token!r} has id {va.get(token)} vs {vb.get(token)}"


def _check_model(args: argparse.Namespace, flag: str, path: str) -> Any:
    return check_model_path(
        flag,
        path,
        trust_remote_code=getattr(args, "trust_remote_code", False),
        allow_pickle_weights=getattr(args, "allow_pickle_weights", False),
    )
