"""Print the pipeline's summary table from the metrics files the three stages wrote under OUTPUT_DIR.

    python scripts/summarize.py OUTPUT_DIR      (expects OUTPUT_DIR/{sft,rm,ppo}/*_metrics.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def summary_rows(out: Path) -> list[tuple[str, str]]:
    sft = _load(out / "sft" / "sft_metrics.json")
    rm = _load(out / "rm" / "rm_metrics.json")
    ppo = _load(out / "ppo" / "ppo_metrics.json")
    rows: list[tuple[str, str]] = []
    if sft:
        ppl = sft["perplexity_per_epoch"]
        rows.append(("stage 1: held-out perplexity before -> after", f"{ppl[0]:.2f} -> {ppl[-1]:.2f}"))
    if rm:
        final = rm["eval_curve"][-1]
        rows.append(("stage 2: held-out pairwise accuracy", f"{final['accuracy']:.3f} ({final['pairs']} pairs)"))
    if ppo:
        rows.append(("stage 3: held-out RM score, stage-1 policy", f"{ppo['before']['score']:+.3f}"))
        rows.append(("stage 3: held-out RM score, PPO policy", f"{ppo['after']['score']:+.3f}"))
        rows.append(("stage 3: score gain (normalised units)", f"{ppo['score_gain']:+.3f}"))
        rows.append(("stage 3: final KL (per-sequence sum)", f"{ppo['final_kl']:.3f}"))
    seconds = out / "stage_seconds.txt"
    if seconds.exists():
        for line in seconds.read_text().split("\n"):
            if line.strip():
                name, secs = line.split()
                rows.append((f"wall time: {name}", f"{int(secs)} s"))
    return rows


def main() -> None:
    out = Path(sys.argv[1])
    rows = summary_rows(out)
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * (width + 24))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("=" * (width + 24))
    print(f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")


if __name__ == "__main__":
    main()
