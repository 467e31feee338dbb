"""Print the tables of benchmarks/COMPARE.md from the committed compare results (no recomputation).

    python benchmarks/compare_summary.py
"""

from __future__ import annotations

import json
from pathlib import Path

from starfish.compare_report import glance_table

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    for folder in sorted(RESULTS.glob("compare-*")):
        rows = json.loads((folder / "compare.json").read_text())
        protocol = json.loads((folder / "protocol.json").read_text())
        print(f"### {folder.name}: {protocol['model']}, BatchNorm while healing: {protocol['heal_budget'].get('bn_mode', 'frozen')} (dense {100 * protocol['dense_top1']:.2f}% on {protocol['eval']['size']} test images)\n")
        print(glance_table(rows, protocol))
        print()
        by = {(r["healer"], r["sparsity"]): r for r in rows}
        for s in protocol["sparsities"]:
            if ("starfish", s) not in by:
                continue
            star = by[("starfish", s)]["top1"]
            rivals = {h: by[(h, s)]["top1"] for h in ("kd", "nmse") if (h, s) in by}
            verdict = all(star >= v for v in rivals.values())
            diffs = ", ".join(f"{h} {100 * (star - v):+.2f} pts" for h, v in rivals.items())
            print(f"- {100 * s:g}%: starfish {100 * star:.2f}% ({diffs}) -> starfish at least as accurate: {verdict}")
        print()


if __name__ == "__main__":
    main()
