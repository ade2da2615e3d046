"""The tiny built-in model: a BPE tokenizer trained on the bundled data and a random-init causal LM.

`python -m tools.tiny OUTPUT_DIR [--arch opt|gpt2|llama] [--seed 0] [--vocab_size N] [--hidden_size H]
[--num_layers L] [--num_heads A]` writes a Hugging Face model directory that every stage accepts as
`--model_name_or_path`, so the whole pipeline runs in minutes on a CPU with nothing downloaded.

Tokenizer: byte-level BPE (GPT-2 style, no prefix space) trained on prompt/chosen/rejected of
`data/synthetic/train.jsonl`. Special tokens: id 0 "<|endoftext|>" (EOS, also BOS as in GPT-2) and id 1
"<pad>" (PAD, never equal to EOS). The tokenizer adds no special tokens on its own: callers append the EOS
id themselves. A literal "<|endoftext|>" (or "<pad>") in text is encoded as that single special id, which
is the usual Hugging Face behaviour and makes a textual EOS marker harmless; the pipeline still appends
the id rather than the string. The requested vocab_size is an upper bound: BPE stops merging once every
word of the small synthetic corpus is one token (about 1650 tokens for the bundled data).

Model: OPT (default), GPT-2 or Llama with about 2-3M parameters, float32, the architecture's usual
dropout, `vocab_size == len(tokenizer)` and pad/eos/bos ids taken from the tokenizer (also in
generation_config.json). Weights are saved as safetensors. Same seed and sizes give byte-identical
model.safetensors and tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from common.files import jsonl_rows
from common.training.output_dir import HF_MODEL_FILES, refuse_foreign_files

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
ARCHS = ("opt", "gpt2", "llama")
DEFAULT_VOCAB_SIZE = 2048
# Model sizes accepted by build_tiny_model / write_tiny. ffn_size None means 4 * hidden for OPT and
# GPT-2, and about 8/3 * hidden rounded up to a multiple of 64 for Llama (its SwiGLU convention).
DEFAULT_SIZES: dict[str, int | None] = {
    "hidden_size": 192,
    "num_layers": 4,
    "num_heads": 4,
    "max_position_embeddings": 512,
    "ffn_size": None,
}
BUNDLED_TRAIN = Path(__file__).resolve().parents[1] / "data" / "synthetic" / "train.jsonl"
# Everything write_tiny (through save_pretrained) may write; it refuses to write into a directory that
# holds anything else, so it never mixes its output with someone's real model.
OWN_FILES = HF_MODEL_FILES


def read_bundled_texts(path: Path = BUNDLED_TRAIN) -> Iterator[str]:
    """Yield prompt, chosen and rejected of every row of an rm-static style JSONL file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer training data not found: {path} (run data/make_synthetic.py)")
    for row in jsonl_rows(path, ["prompt", "chosen", "rejected"]):
        yield from (row["prompt"], row["chosen"], row["rejected"])


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on texts; ids 0 and 1 are EOS/BOS and PAD.

    vocab_size is an upper bound (special tokens and the 256 byte symbols included).
    """
    if vocab_size < 258 + 1:
        raise ValueError(f"vocab_size must exceed 258 (2 special tokens + 256 bytes), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    # No post-processor: encoding never adds BOS/EOS, callers append the EOS id.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def _sizes(arch: str, sizes: dict[str, int | None]) -> dict[str, int]:
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise TypeError(
            f"unknown size argument(s) {sorted(unknown)}; expected some of {sorted(DEFAULT_SIZES)}"
        )
    merged = {**DEFAULT_SIZES, **{k: v for k, v in sizes.items() if v is not None}}
    if merged["ffn_size"] is None:
        h = merged["hidden_size"]
        merged["ffn_size"] = -(-8 * h // 3 // 64) * 64 if arch == "llama" else 4 * h
    for key, value in merged.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if merged["hidden_size"] % merged["num_heads"]:
        raise ValueError(
            f"hidden_size {merged['hidden_size']} is not divisible by num_heads {merged['num_heads']}"
        )
    return merged  # type: ignore[return-value]


def tiny_config(arch: str, tokenizer: PreTrainedTokenizerFast, **sizes: int | None) -> PreTrainedConfig:
    """The model config for arch with vocab and special token ids taken from the tokenizer."""
    s = _sizes(arch, sizes)
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "opt":
        return OPTConfig(
            hidden_size=s["hidden_size"],
            word_embed_proj_dim=s["hidden_size"],
            num_hidden_layers=s["num_layers"],
            num_attention_heads=s["num_heads"],
            ffn_dim=s["ffn_size"],
            max_position_embeddings=s["max_position_embeddings"],
            **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=s["hidden_size"],
            n_layer=s["num_layers"],
            n_head=s["num_heads"],
            n_inner=s["ffn_size"],
            n_positions=s["max_position_embeddings"],
            **ids,
        )
    if arch == "llama":
        return LlamaConfig(
            hidden_size=s["hidden_size"],
            num_hidden_layers=s["num_layers"],
            num_attention_heads=s["num_heads"],
            num_key_value_heads=s["num_heads"],
            intermediate_size=s["ffn_size"],
            max_position_embeddings=s["max_position_embeddings"],
            **ids,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def build_tiny_model(
    arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **sizes: int | None
) -> PreTrainedModel:
    """A randomly initialised float32 causal LM; the same seed and sizes give the same weights.

    The global torch RNG state is left untouched.
    """
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            f"tokenizer needs a pad token distinct from EOS (pad id {tokenizer.pad_token_id}, "
            f"eos id {tokenizer.eos_token_id})"
        )
    config = tiny_config(arch, tokenizer, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model


def write_tiny(
    out_dir: str | Path,
    arch: str = "opt",
    seed: int = 0,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    train_file: str | Path = BUNDLED_TRAIN,
    **sizes: int | None,
) -> Path:
    """Train the tokenizer, build the model and save both (Hugging Face format) in out_dir.

    Raises FileExistsError if out_dir holds anything write_tiny does not write itself; its own files
    from an earlier call are overwritten. Returns out_dir as a Path.
    """
    out = Path(out_dir)
    refuse_foreign_files(out, OWN_FILES, "write_tiny")
    tokenizer = train_tokenizer(read_bundled_texts(Path(train_file)), vocab_size)
    model = build_tiny_model(arch, tokenizer, seed, **sizes)
    tokenizer.model_max_length = model.config.max_position_embeddings
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the tiny built-in tokenizer and model.")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--arch", choices=ARCHS, default="opt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--hidden_size", type=int)
    parser.add_argument("--num_layers", type=int)
    parser.add_argument("--num_heads", type=int)
    parser.add_argument("--max_position_embeddings", type=int)
    parser.add_argument("--ffn_size", type=int)
    parser.add_argument("--train_file", type=Path, default=BUNDLED_TRAIN, help="tokenizer training data")
    args = parser.parse_args(argv)
    sizes = {k: getattr(args, k) for k in DEFAULT_SIZES}
    out = write_tiny(
        args.output_dir, args.arch, args.seed, vocab_size=args.vocab_size, train_file=args.train_file, **sizes
    )
    config = json.loads((out / "config.json").read_text())
    print(f"wrote {args.arch} (vocab {config['vocab_size']}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
