"""Command-line flags, defined once as argument groups that every stage composes.

Flag names and meanings follow DeepSpeed-Chat (docs/stages.md) so its launch scripts carry over. Where
DeepSpeed-Chat hard-codes a constant (Adam betas, gradient clipping, ...), it is a flag here. A stage
builds its parser from these groups; no flag is copied between stages, so defaults cannot drift.

Stage 3 trains two models; its model-specific groups take a `prefix` ("actor_", "critic_") and produce
e.g. `--actor_lora_dim` and `--critic_lora_dim` from the same definition as stage 1's `--lora_dim`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATA = str(REPO_ROOT / "data" / "synthetic")


def add_data_args(parser: argparse.ArgumentParser, stage: int) -> None:
    """Data sources, split and tokenisation limits (the shared data layer, `common.data`)."""
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data_path",
        nargs="*",
        default=[BUNDLED_DATA],
        help="Dataset names (DeepSpeed-Chat adapters, e.g. Dahoas/rm-static) or local files/directories in "
        "the prompt/chosen/rejected schema; several are mixed. Default: the bundled synthetic dataset.",
    )
    g.add_argument(
        "--data_split",
        type=str,
        default="2,4,4",
        help="Proportions of each dataset given to stages 1,2,3 as disjoint seeded slices, e.g. '2,4,4'.",
    )
    g.add_argument(
        "--data_split_seed",
        type=int,
        default=None,
        help="Seed of the --data_split slices (default: --seed). Runs of one pipeline must share it to get "
        "disjoint slices; give it to train a second reward model with another --seed on the same slice.",
    )
    g.add_argument("--sft_only_data_path", nargs="*", default=[], help="Datasets used only in stage 1.")
    g.add_argument(
        "--data_output_path",
        type=str,
        default="/tmp/data_files/",
        help="Where the tokenized-data cache lives (keyed by file content, tokenizer and settings).",
    )
    g.add_argument(
        "--apply_chat_template",
        action="store_true",
        help="Render the rm-static prompts ('\\n\\nHuman: ...\\n\\nAssistant:', multi-turn too) with the "
        "model's own chat template, responses as its assistant turns ending in its end-of-turn token "
        "(SFT then learns the assistant tokens only). Use it for chat models (SmolLM2, Qwen, Llama instruct).",
    )
    g.add_argument(
        "--max_train_samples",
        type=int,
        default=0,
        help="Train on at most this many rows of the stage's slice (0 = all): a quick or CPU-sized run.",
    )
    g.add_argument(
        "--max_eval_samples",
        type=int,
        default=0,
        help="Evaluate on a seeded sample of at most this many held-out rows (0 = all).",
    )
    g.add_argument(
        "--skip_bad_rows",
        action="store_true",
        help="Skip and count malformed dataset rows instead of stopping with an error naming them.",
    )
    if stage in (1, 2):
        g.add_argument("--max_seq_len", type=int, default=512, help="Maximum prompt+response tokens.")
    if stage == 1:
        g.add_argument(
            "--mask_prompt",
            action="store_true",
            help="Compute the SFT loss on response tokens only (labels -100 on the prompt).",
        )
    if stage == 3:
        add_prompt_answer_length_args(g)
        g.add_argument(
            "--prompt_overflow",
            choices=["truncate_left", "drop"],
            default="truncate_left",
            help="Prompts longer than --max_prompt_seq_len: keep their end, or drop them (counted either way).",
        )


def add_model_args(
    parser: argparse.ArgumentParser,
    prefix: str = "",
    required: bool = True,
    dropout_default: float | None = None,
) -> None:
    """Which model to load and how (dropout, gradient checkpointing)."""
    g = parser.add_argument_group(f"{prefix or 'model'} model".strip())
    g.add_argument(
        f"--{prefix}model_name_or_path",
        type=str,
        required=required,
        help="A Hugging Face hub id or a local directory (the same code loads both).",
    )
    g.add_argument(
        f"--{prefix}dropout",
        type=float,
        default=dropout_default,
        help="Override every dropout probability in the model config "
        + ("(default: keep the config's)." if dropout_default is None else f"(default: {dropout_default})."),
    )
    g.add_argument(f"--{prefix}gradient_checkpointing", action="store_true", help="Trade compute for memory.")


def add_lora_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """LoRA through peft; adapters are merged into the weights when the model is saved."""
    g = parser.add_argument_group(f"{prefix}LoRA")
    g.add_argument(f"--{prefix}lora_dim", type=int, default=0, help="LoRA rank; 0 disables LoRA.")
    g.add_argument(
        f"--{prefix}lora_module_name",
        type=str,
        default="decoder.layers.",
        help="LoRA goes into every Linear layer whose module name contains this string (DeepSpeed-Chat "
        "semantics), e.g. 'decoder.layers.' (OPT), 'h.' (GPT-2), 'layers.' (Llama).",
    )
    g.add_argument(
        f"--{prefix}lora_alpha",
        type=float,
        default=1.0,
        help="LoRA scaling numerator: scale = alpha / lora_dim (1.0 matches DeepSpeed-Chat).",
    )
    g.add_argument(
        f"--{prefix}lora_learning_rate",
        type=float,
        default=5e-4,
        help="Learning rate of the LoRA parameters.",
    )


def add_prompt_answer_length_args(g: argparse._ArgumentGroup) -> None:
    """The lengths of the prompts a policy answers by sampling and of its answers (stage 3's rollouts and
    held-out evaluation; DPO's held-out evaluation, which samples as stage 3 does)."""
    g.add_argument("--max_prompt_seq_len", type=int, default=256, help="Maximum prompt tokens.")
    g.add_argument("--max_answer_seq_len", type=int, default=256, help="Maximum generated tokens.")


def add_pair_eval_args(g: argparse._ArgumentGroup) -> None:
    """How often a stage trained on preference pairs (reward model, DPO) evaluates on the held-out pairs."""
    g.add_argument(
        "--eval_interval",
        type=int,
        default=0,
        help="Evaluate every this many optimizer steps (0: only before and after training).",
    )
    g.add_argument(
        "--eval_iters",
        type=int,
        default=100,
        help="At most this many eval batches per rank in the evaluations before and during training "
        "(0: all). The final evaluation always covers the whole eval set.",
    )


def add_gold_reward_arg(g: argparse._ArgumentGroup) -> None:
    """--gold_reward: the ground truth that grades sampled held-out answers (stage 3, DPO; common/evaluation/heldout.py)."""
    g.add_argument(
        "--gold_reward",
        type=str,
        default="auto",
        metavar="MODULE:FUNCTION|auto|none",
        help="Gold scorer of held-out answers, to tell real gains from reward hacking: a function "
        "f(prompts, responses, finished) -> one float, or one object with .score and optional .label, per "
        "answer (responses decoded without special tokens, cut at EOS; finished: ended with EOS). auto: the "
        "bundled task's common.evaluation.gold:synthetic_gold when --data_path is the bundled dataset, else none.",
    )


def add_training_args(parser: argparse.ArgumentParser, stage: int) -> None:
    """Batch sizes, optimiser and schedule (stage 3 adds actor/critic specifics itself)."""
    g = parser.add_argument_group("training")
    if stage in (1, 2):
        g.add_argument("--per_device_train_batch_size", type=int, default=16, help="Micro-batch per device.")
        g.add_argument("--per_device_eval_batch_size", type=int, default=16, help="Eval batch per device.")
        g.add_argument("--learning_rate", type=float, default=1e-3, help="Peak learning rate.")
        g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay.")
        g.add_argument("--num_train_epochs", type=int, default=1, help="Passes over the stage's data.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per step.")
    g.add_argument(
        "--lr_scheduler_type",
        type=str,
        default="cosine",
        choices=[
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
            "constant",
            "constant_with_warmup",
        ],
        help="Learning-rate schedule after warm-up.",
    )
    g.add_argument("--num_warmup_steps", type=int, default=0, help="Warm-up optimiser steps.")
    g.add_argument("--adam_betas", type=float, nargs=2, default=(0.9, 0.95), help="Adam beta1 beta2.")
    g.add_argument("--only_optimize_lora", action="store_true", help="Train only the LoRA parameters.")
    g.add_argument("--seed", type=int, default=1234, help="Seed for data order, init and sampling.")


def add_deepspeed_args(parser: argparse.ArgumentParser, stage: int) -> None:
    """ZeRO stage, offload, precision and the DeepSpeed launcher's own flags."""
    g = parser.add_argument_group("deepspeed")
    if stage in (1, 2):
        g.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage.")
    g.add_argument(
        "--offload", action="store_true", help="Offload optimizer states (and ZeRO-3 params) to CPU."
    )
    g.add_argument(
        "--dtype",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="Training precision; auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU.",
    )
    g.add_argument("--gradient_clipping", type=float, default=1.0, help="Global gradient-norm clip.")
    g.add_argument(
        "--compute_fp32_loss",
        action="store_true",
        help="Accepted for DeepSpeed-Chat compatibility: losses are always computed from fp32 logits here.",
    )
    g.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher.")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """Where results and monitoring go."""
    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", type=str, required=True, help="Where the trained model is saved.")
    g.add_argument("--enable_tensorboard", action="store_true", help="Write TensorBoard scalars.")
    g.add_argument(
        "--tensorboard_path",
        type=str,
        default=None,
        help="TensorBoard log directory (default: <output_dir>/tensorboard).",
    )
    g.add_argument("--print_loss", action="store_true", help="Print the loss of every step on rank 0.")
    g.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the hub (off).")
    g.add_argument(
        "--allow_pickle_weights",
        action="store_true",
        help="Load model directories whose weights are pickle files (pytorch_model*.bin, *.pt, ...) and no "
        "safetensors; unpickling can run arbitrary code, so only for directories you trust (off).",
    )
    g.add_argument(
        "--verify_save",
        action="store_true",
        help="After saving, reload the output with from_pretrained and report its largest logit difference "
        "from the trained engine on a held-out batch.",
    )


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """--save_interval, --resume, --save_total_limit, --overwrite_output_dir, --skip_nonfinite_steps."""
    g = parser.add_argument_group("checkpoints")
    g.add_argument(
        "--save_interval",
        type=int,
        default=0,
        help="Save a resumable checkpoint every this many optimizer steps (0: never).",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="Resume from a checkpoint: 'latest' (the default value: newest complete one under "
        "<output_dir>/checkpoints), 'auto' (latest if there is one, else start: for jobs that get requeued) "
        "or a checkpoint directory. Needs the same number of ranks.",
    )
    g.add_argument(
        "--save_total_limit",
        type=int,
        default=0,
        help="Keep only the newest K checkpoints (0: keep all).",
    )
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Write into an output directory that holds other files or another run's results (nothing "
        "this project did not write is deleted).",
    )
    g.add_argument(
        "--skip_nonfinite_steps",
        action="store_true",
        help="Skip (and count) a micro-batch whose loss is NaN/inf instead of stopping.",
    )


def add_single_model_args(parser: argparse.ArgumentParser, stage: int) -> None:
    """The groups of a stage that trains one model (1: SFT, 2: reward model): model, data, training, LoRA,
    DeepSpeed, output and checkpoints. Stage 3 composes its own (two models, prefixed)."""
    add_model_args(parser)
    add_data_args(parser, stage=stage)
    add_training_args(parser, stage=stage)
    add_lora_args(parser)
    add_deepspeed_args(parser, stage=stage)
    add_output_args(parser)
    add_checkpoint_args(parser)


def parse_stage_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add DeepSpeed's own flags (--deepspeed_config, ...; the launcher passes --local_rank), parse `argv`
    and run the checks every stage shares (`check_args`)."""
    import deepspeed

    args = deepspeed.add_config_arguments(parser).parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Validate cross-flag constraints before any compute; raise SystemExit with a clear message."""
    from common.validate import check_counts

    check_counts(args)
    split = [s.strip() for s in args.data_split.split(",")]
    try:
        parts = [float(s) for s in split]
    except ValueError:
        raise SystemExit(
            f"--data_split {args.data_split!r}: expected comma-separated numbers like '2,4,4'"
        ) from None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise SystemExit(f"--data_split {args.data_split!r}: expected three non-negative proportions")
    if getattr(args, "only_optimize_lora", False):
        dims = [v for k, v in vars(args).items() if k.endswith("lora_dim")]
        if not any(dims):
            raise SystemExit("--only_optimize_lora needs a LoRA rank > 0 (--lora_dim / --actor_lora_dim)")
    if getattr(args, "save_interval", 0) < 0 or getattr(args, "save_total_limit", 0) < 0:
        raise SystemExit("--save_interval and --save_total_limit must be >= 0")


def data_config(args: argparse.Namespace):
    """The data layer's settings from parsed flags (fields a stage doesn't define keep their defaults)."""
    from common.data import DataConfig

    fields = (
        "data_split",
        "sft_only_data_path",
        "data_output_path",
        "max_seq_len",
        "max_prompt_seq_len",
        "seed",
        "mask_prompt",
        "prompt_overflow",
        "skip_bad_rows",
        "apply_chat_template",
        "max_train_samples",
        "max_eval_samples",
    )
    values = {f: getattr(args, f) for f in fields if hasattr(args, f)}
    if getattr(args, "data_split_seed", None) is not None:
        values["seed"] = args.data_split_seed
    return DataConfig(data_path=list(args.data_path), **values)
