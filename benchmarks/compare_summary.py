"""Print the tables of benchmarks/COMPARE.md from the committed compare results (no recomputation).

    python benchmarks/compare_summary.py
"""

from __future__ import annotations

import json
from pathlib import Path

from starfish.reporting.compare_report import glance_table

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    for folder in sorted(RESULTS.glob("compare-*")):
        rows = json.loads((folder / "compare.json").read_text())
        protocol = json.loads((folder / "protocol.json").read_text())
        print(f"### {folder.name}: {protocol['model']}, BatchNorm while healing: {protocol['heal_budget'].get('bn_mode', 'frozen')} (dense {100 * protocol['dense_top1']:.2f}% on {protocol['eval']['size']} test images)\n")
        print(glance_table(rows, protocol))
        print()
        by = {(r["healer"], r["sparsity"]): r for r in rows}
        for start in ("", "varmatch+"):  # from the pruned weights, and after the same repair
            for s in protocol["sparsities"]:
                if (start + "starfish", s) not in by:
                    continue
                star = by[(start + "starfish", s)]["top1"]
                rivals = {start + h: by[(start + h, s)]["top1"] for h in ("kd", "nmse") if (start + h, s) in by}
                verdict = all(star >= v for v in rivals.values())
                diffs = ", ".join(f"{h} {100 * (star - v):+.2f} pts" for h, v in rivals.items())
                print(f"- {100 * s:g}%: {start}starfish {100 * star:.2f}% ({diffs}) -> at least as accurate: {verdict}")
        print()


if __name__ == "__main__":
    main()
