"""The data layer shared by the three stages.

Typical use (every rank calls it; local rank 0 of each node builds the cache, the others wait):

    from common.data import DataConfig, build_stage_data, collator_for_stage
    data = build_stage_data(DataConfig(data_path=["Dahoas/rm-static"]), tokenizer, stage=2)
    loader = DataLoader(data.train, batch_size=8, collate_fn=collator_for_stage(2, tokenizer.pad_token_id))

Modules, in reading order:
- rows.py           Row, DataError, validation of one row, the tally of skipped rows
- hub_adapters.py   one mapping function per Hub dataset (native row -> prompt/chosen/rejected)
- local_files.py    .jsonl / .json / .parquet / directory readers
- sources.py        data_path entry -> source, its fingerprint, its validated rows
- splits.py         seeded 9:1 train/eval split and the data_split stage slices
- tokenize.py       per-stage tokenization (EOS as an id, left truncation of prompts, counts)
- cache.py          cache key, atomic save, one build per node
- stage_datasets.py map-style Datasets over the cached token lists
- collate.py        dynamic padding (right for SFT/RM/KTO rows, left for PPO prompts)
- build.py          DataConfig, build_stage_data
- unsupervised.py   load_unsupervised for PPO-ptx
"""

from common.data.build import DataConfig, StageData, build_stage_data
from common.data.cache import CACHE_VERSION
from common.data.collate import (
    PairCollator,
    PromptCollator,
    SFTCollator,
    UnpairedCollator,
    collator_for_stage,
    pad_sequences,
)
from common.data.hub_adapters import HUB_ADAPTERS
from common.data.rows import DataError, Row
from common.data.stage_datasets import (
    IGNORE_INDEX,
    BlockDataset,
    PairDataset,
    PromptDataset,
    SFTDataset,
    UnpairedDataset,
)
from common.data.tokenize import check_tokenizer
from common.data.unsupervised import load_unsupervised

__all__ = [
    "CACHE_VERSION",
    "HUB_ADAPTERS",
    "IGNORE_INDEX",
    "BlockDataset",
    "DataConfig",
    "DataError",
    "PairCollator",
    "PairDataset",
    "PromptCollator",
    "PromptDataset",
    "Row",
    "SFTCollator",
    "SFTDataset",
    "StageData",
    "UnpairedCollator",
    "UnpairedDataset",
    "build_stage_data",
    "check_tokenizer",
    "collator_for_stage",
    "load_unsupervised",
    "pad_sequences",
]
