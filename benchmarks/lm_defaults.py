"""The language-model defaults on SmolLM2-135M: issue 22's done-when command, nothing tuned.

Each cell is the issue's `starfish run` with no healing and no calibration-size flag (the
language-model defaults, ``starfish.experiments.defaults``, decide the healer, its budget and the calibration),
plus a second ``--eval`` text of another domain (``benchmarks/ood_text.py``: Python standard-library
sources), so one heal is scored in-domain (WikiText-2 test, first 6 windows of 2048 tokens) and
out of domain. ``--parallel`` runs the cells side by side, one thread each: the condition of the
committed baseline ("one busy thread"). Rows are appended to the JSON as cells finish (resumable);
the markdown is rendered from the JSON. Every row records the defaults it ran under; when the
defaults change, a cell runs again and its former row moves to the table of earlier defaults.

    OMP_NUM_THREADS=1 python benchmarks/lm_defaults.py --cells wanda,wanda:2:4 --parallel
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lm_heal import MODEL, REPO, SHARED
from lm_healer_search import log_gap_closed
from ood_text import ensure as ensure_ood

sys.path.insert(0, str(REPO / "src"))
from starfish.experiments.defaults import LANGUAGE_MODEL_HEAL  # noqa: E402
from starfish.data.text import TEXT_CALIB_DEFAULT  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "lm_defaults.json"
TABLE = REPO / "benchmarks" / "LM_DEFAULTS.md"
WORK = REPO / "runs" / "lm_defaults"
BASELINE_SECONDS = 5408  # the committed STARFISH heal at the former defaults (BENCHMARKS.md), one busy thread
DEFAULTS = {**LANGUAGE_MODEL_HEAL, "calib_size": TEXT_CALIB_DEFAULT}  # what a row ran under


def cell_command(cell: str, ood: Path, out: Path) -> list[str]:
    pruner, _, pattern = cell.partition(":")
    cmd = ["-m", "starfish", "run", "--model", f"hf:{MODEL}", "--calib", str(SHARED / "data/wikitext2/valid.tokenized.txt"),
           "--eval", str(SHARED / "data/wikitext2/test.txt"), "--eval", str(ood), "--eval-size", "6", "--eval-seq-len", "2048",
           "--pruner", pruner, "--seed", "0", "--device", "cpu", "--no-progress", "--out", str(out), "--force"]
    return cmd + (["--pattern", pattern] if pattern else ["--sparsity", "0.5"])


def start(cmd: list[str], threads: int, log: Path) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT), time.perf_counter()


def row_of(cell: str, out: Path, cmd: list[str], wall: float, rss_mb: float, threads: int, parallel: int) -> dict:
    report = json.loads((out / "report.json").read_text())
    heal = report["heal"] or {}
    texts = report.get("perplexity_by_text") or {}
    return {
        "cell": cell, "command": "python " + " ".join(cmd), "healer": report["healer"], "scope": heal.get("scope"),
        "calibration": report["calibration"], "perplexity_by_text": texts, "perplexity": report["perplexity"],
        "heal_seconds": report["heal_seconds"], "steps": heal.get("steps"), "stopped_reason": heal.get("stopped_reason"),
        "stopping": {k: v for k, v in (heal.get("stopping") or {}).items() if k != "curve"},
        "budget": {k: heal.get(k) for k in ("budget", "max_epochs", "batch_size", "lr", "patience", "eval_every", "kd_weight", "grad_checkpoint", "precision")},
        "defaults": DEFAULTS,
        "heal_peak_mb": heal.get("peak_memory_mb"), "memory_at_start_mb": heal.get("memory_at_start_mb"),
        "planned_added_mb": (heal.get("memory_estimate") or {}).get("added_mb", {}).get("cpu"),
        "process_peak_mb": rss_mb, "wall_seconds": wall, "threads": threads, "cells_side_by_side": parallel,
        "sparsity": report["sparsity"],
    }


HEADER = ["| cell | healer | calibration | steps | precision | WikiText dense / pruned / **healed** (gap closed) | stdlib dense / pruned / healed (gap closed) | heal time | threads (cells side by side) | heal peak (+ added; plan) |",
          "|---|---|---|---|---|---|---|---|---|---|"]


def render_row(row: dict) -> str:
    cells = []
    for _, entry in list(row["perplexity_by_text"].items())[:2]:
        p = entry["perplexity"]
        cells.append(f"{p['dense']:.2f} / {p['pruned']:.2f} / **{p['healed']:.2f}** ({100 * log_gap_closed(p['dense'], p['pruned'], p['healed']):.0f}%)")
    calib = row["calibration"]
    gen = calib.get("generated")
    calib_text = f"{calib['size']} x {calib['seq_len']}" + (f" + {gen['count']} generated" if gen else "")
    added = row["heal_peak_mb"] - row["memory_at_start_mb"] if row.get("heal_peak_mb") else None
    memory = f"{row['heal_peak_mb']:.0f} MB (+{added:.0f}; plan +{row['planned_added_mb']:.0f})" if added is not None else "—"
    return (f"| {row['cell']} | {row['healer']} ({row['scope']}) | {calib_text} | {row['steps']} ({row['stopped_reason'] or 'budget end'}) | "
            f"{row['budget'].get('precision') or 'fp32'} | {' | '.join(cells)} | {row['heal_seconds']:.0f} s | {row['threads']} ({row['cells_side_by_side']}) | {memory} |")


def render(data: dict) -> str:
    lines = ["# SmolLM2-135M at the language-model defaults (issue 22's done-when command)", "",
             "Each row is `starfish run` with no healing and no calibration-size flag: the language-model defaults "
             "(`starfish.experiments.defaults`) choose healer, budget and calibration. Perplexity: WikiText-2 test, first 6 windows of 2048 "
             f"tokens; out of domain: {len(data['ood']['files'])} Python {data['ood']['python']} standard-library modules "
             f"(sha256 `{data['ood']['sha256'][:16]}`, `benchmarks/ood_text.py`), first 6 windows of 2048 tokens. "
             f"Baseline heal time: {BASELINE_SECONDS} s (STARFISH at the former defaults, one busy thread).", "",
             *HEADER, *(render_row(r) for r in data["rows"].values())]
    lines += ["", f"Conditions: {data['conditions']}."] if data.get("conditions") else []
    lines += ["", "Commands (one per row):", ""] + [f"- `{r['command']}`" for r in data["rows"].values()]
    if data.get("earlier"):
        lines += ["", "## Earlier defaults", "", "The same command under defaults that were replaced (each row's `defaults` in the JSON).", "",
                  *HEADER, *(render_row(r) for r in data["earlier"])]
        lines += ["", f"Conditions: {data['earlier_conditions']}."] if data.get("earlier_conditions") else []
    lines += ["", f"Rendered from `{RESULTS.relative_to(REPO)}` by `{data['command']}`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="wanda,wanda:2:4", help="PRUNER[:N:M],... (default wanda,wanda:2:4)")
    parser.add_argument("--parallel", action="store_true", help="run the cells side by side, one thread each")
    parser.add_argument("--render", action="store_true", help="only render the markdown from the JSON")
    args = parser.parse_args()
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else None
    if args.render:
        TABLE.write_text(render(data))
        return 0
    if not (MODEL / "config.json").is_file():
        sys.exit(f"no SmolLM2 folder at {MODEL}: run python scripts/install_smollm2.py first")
    ood = WORK / "ood" / "python_stdlib.txt"
    ood_record = ensure_ood(ood)
    data = data or {"ood": ood_record, "rows": {}}
    data["command"] = "python benchmarks/lm_defaults.py " + " ".join(sys.argv[1:])
    todo = [c for c in args.cells.split(",") if (data["rows"].get(c) or {}).get("defaults") != DEFAULTS]
    threads = 1 if args.parallel else int(os.environ.get("OMP_NUM_THREADS", "2"))
    waves = [todo] if args.parallel else [[c] for c in todo]
    for wave in waves:
        running = {}
        for cell in wave:
            out = WORK / cell.replace(":", "-")
            cmd = cell_command(cell, ood, out)
            print("running", " ".join(cmd), flush=True)
            running[cell] = (out, cmd, *start(cmd, threads, WORK / "logs" / f"{cell.replace(':', '-')}.log"))
        for cell, (out, cmd, child, started) in running.items():
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - started
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"cell {cell} failed: see {WORK / 'logs'}")
            row = row_of(cell, out, cmd, wall, usage.ru_maxrss / 1024, threads, len(wave))
            if RESULTS.is_file():  # another invocation may have added rows meanwhile: keep them
                kept = json.loads(RESULTS.read_text())
                data["rows"], data["earlier"] = {**kept["rows"], **data["rows"]}, kept.get("earlier", [])
            if cell in data["rows"] and data["rows"][cell].get("defaults") != DEFAULTS:  # ran under replaced defaults
                data["earlier"] = [*data.get("earlier", []), data["rows"][cell]]
            data["rows"][cell] = row
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(data, indent=1))
            TABLE.write_text(render(data))
    print(TABLE.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
