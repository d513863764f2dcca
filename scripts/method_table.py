"""Print a Markdown table comparing finished runs (e.g. full vs LoRA vs adapter fine-tuning)
from their summary.json files: python scripts/method_table.py runs/finetune/*"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dirs: list[str]) -> None:
    print("| method | trainable params | % of total | first eval loss | final eval loss "
          "| eval ppl / acc | time (s) | peak RSS (MB) | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in run_dirs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        quality = (f"acc {s['eval_accuracy']:.3f}" if "eval_accuracy" in s
                   else f"ppl {s.get('eval_ppl', float('nan')):.1f}")
        print(f"| {s['method']} | {s['trainable_parameters']:,} "
              f"| {100 * s['trainable_parameters'] / s['parameters']:.2f}% "
              f"| {s['first_eval_loss']:.3f} | {s['eval_loss']:.3f} | {quality} "
              f"| {s['wall_s']:.0f} | {s['peak_memory_mb']:,.0f} | {s['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
