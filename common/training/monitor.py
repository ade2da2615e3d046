"""TensorBoard scalars and a progress bar, both on rank 0 only."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from common import dist


class Monitor:
    """Writes scalars to TensorBoard (when enabled) on rank 0; a no-op elsewhere."""

    def __init__(self, enabled: bool, log_dir: str | os.PathLike, prefix: str):
        self.prefix = prefix
        self.writer = None
        if enabled and dist.is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(f"{self.prefix}/{key}", float(value), step)
        self.writer.flush()

    def charts(self, category: str, charts: dict[str, list[str]]) -> None:
        """Lay out TensorBoard's Custom Scalars tab: under `category`, one chart per title drawing the
        scalars `keys` (as given to `log`) together, e.g. the proxy and gold scores on one chart."""
        if self.writer is None:
            return
        layout = {
            title: ["Multiline", [f"{self.prefix}/{k}" for k in keys]] for title, keys in charts.items()
        }
        self.writer.add_custom_scalars({category: layout})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress(iterable: Iterable, total: int | None = None, desc: str = "") -> Any:
    """A tqdm bar on rank 0 (to stderr, refreshed sparingly when not a terminal); the bare iterable elsewhere."""
    if not dist.is_rank0():
        return iterable
    from tqdm import tqdm

    return tqdm(
        iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 10.0
    )
