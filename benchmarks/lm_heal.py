"""SmolLM2-135M on WikiText-2: prune, then heal, each cell one real `starfish run` command.

Protocol (issue: language models): perplexity on the first 6 non-overlapping windows of 2048
tokens of ../shared/data/wikitext2/test.txt; calibration 32 x 512 tokens drawn with seed 0 from
valid.tokenized.txt; embeddings and lm_head dense; every Linear in the decoder layers pruned.
Each cell is one `python -m starfish run` process with no tuning flag beyond those given here, so
a row is what a user gets at the defaults; its peak RSS is that process's own (``wait4``). Results
are appended to the JSON after every cell, so a long sweep keeps what finished, and the markdown
table is rendered from the JSON.

    python scripts/install_smollm2.py
    OMP_NUM_THREADS=2 python benchmarks/lm_heal.py --cells wanda:none,wanda:starfish
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
MODEL = Path(os.environ.get("STARFISH_SMOLLM2", REPO / ".cache" / "smollm2-135m"))
RESULTS = REPO / "benchmarks" / "results" / "lm_heal.json"


def cell_command(pruner: str, healer: str, pattern: str | None, out: Path, args: argparse.Namespace) -> list[str]:
    """The `starfish run` command of one cell: the issue's protocol, and only the heal flags given here
    (everything else is what a user gets with no tuning flags: the language-model defaults)."""
    cmd = [
        "-m", "starfish", "run", "--model", f"hf:{MODEL}",
        "--calib", str(SHARED / "data/wikitext2/valid.tokenized.txt"), "--calib-size", "32", "--seq-len", "512",
        "--eval", str(SHARED / "data/wikitext2/test.txt"), "--eval-size", "6", "--eval-seq-len", "2048",
        "--pruner", pruner, "--seed", "0", "--healer", healer, "--device", "cpu", "--no-progress", "--out", str(out), "--force",
    ]
    cmd += ["--pattern", pattern] if pattern else ["--sparsity", "0.5"]
    for flag, value in (("--epochs", args.epochs), ("--heal-scope", args.heal_scope), ("--batch-size", args.batch_size), ("--lr", args.lr)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def run_process(cmd: list[str]) -> tuple[float, float]:
    """Run ``python CMD`` in its own process: (wall seconds, that process's peak RSS in MB)."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, *cmd], cwd=REPO)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"cell failed with exit {code}: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024


def run_cell(cmd: list[str]) -> tuple[dict, float, float]:
    """Run one cell in its own process: (report, wall seconds, that process's peak RSS in MB)."""
    wall, peak = run_process(cmd)
    out = Path(cmd[cmd.index("--out") + 1])
    return json.loads((out / "report.json").read_text()), wall, peak


def reload_check(out: Path) -> dict:
    """benchmarks/lm_reload_check.py on the cell's output: plain transformers reproduce the healed
    perplexity and every pruned weight is exactly zero."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lm_reload_check.py"), str(out)],
                          cwd=REPO, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _budget(row: dict) -> str:
    heal, stop = row.get("heal") or {}, row.get("stopping") or {}
    if row["healer"] == "none":
        return "—"
    if heal.get("budget") == "auto":
        kept = stop.get("best_epoch")
        return f"auto (max {heal.get('max_epochs')} epochs; kept epoch {kept}; {stop.get('reason', '?')})"
    return f"{heal.get('epochs')} epochs"


def render(rows: list[dict]) -> str:
    lines = [
        "| pruner | pattern | healer | scope | dense | pruned | healed | budget | batch, lr | heal time | heal steps | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl, heal = r["perplexity"], r.get("heal") or {}
        healed = "—" if r["healer"] == "none" else f"{ppl['healed']:.2f}"
        training = "—" if r["healer"] == "none" else f"{heal.get('batch_size')}, {heal.get('lr')}"
        lines.append(
            f"| {r['pruner']} | {r['pattern'] or '50% unstructured'} | {r['healer']} | {r['scope']} | {ppl['dense']:.2f} | "
            f"{ppl['pruned']:.2f} | {healed} | {_budget(r)} | {training} | "
            f"{r['heal_seconds']:.0f} s | {r['steps']} | {r['peak_rss_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="wanda:none,wanda:starfish", help="PRUNER:HEALER[:N:M],... e.g. wanda:starfish:2:4")
    parser.add_argument("--epochs", type=int, default=None, help="healing epochs (default: the recipe's 10)")
    parser.add_argument("--heal-scope", default=None, help="joint (default) or blockwise")
    parser.add_argument("--batch-size", type=int, default=None, help="healing batch size (default: the recipe's 32)")
    parser.add_argument("--lr", type=float, default=None, help="healing learning rate (default: the recipe's 6e-4)")
    args = parser.parse_args()
    if not (MODEL / "config.json").is_file():
        sys.exit(f"no SmolLM2 folder at {MODEL}: run python scripts/install_smollm2.py first")
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    with tempfile.TemporaryDirectory(prefix="lm_heal-") as scratch:
        for cell in args.cells.split(","):
            pruner, healer, *nm = cell.split(":")
            pattern = ":".join(nm) if nm else None
            cmd = cell_command(pruner, healer, pattern, Path(scratch) / "out", args)
            report, wall, peak = run_cell(cmd)
            reload = reload_check(Path(scratch) / "out") if healer != "none" else None
            heal = report.get("heal", {})
            rows.append({
                "pruner": pruner, "pattern": pattern, "healer": healer, "scope": heal.get("scope", "joint"),
                "perplexity": report["perplexity"], "fidelity_to_dense": report["fidelity_to_dense"],
                "heal_seconds": report["heal_seconds"], "steps": heal.get("steps", 0),
                "heal": {k: heal.get(k) for k in ("budget", "epochs", "max_epochs", "eval_every", "patience", "batch_size", "lr", "min_lr", "optimizer", "cache_dtype", "grad_checkpoint")},
                "stopping": heal.get("stopping"),
                "wall_seconds": wall, "peak_rss_mb": peak,
                "plan_mb": (heal.get("memory_estimate") or {}).get("need_mb"),
                "reload_check": reload,
                "eval": report["eval"], "calibration": report["calibration"], "sparsity": report["sparsity"],
                "command": "python benchmarks/lm_heal.py " + " ".join(sys.argv[1:]),
                "cell_command": "python " + " ".join(cmd).replace(str(Path(scratch) / "out"), "OUT"),
                "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
            })
            RESULTS.write_text(json.dumps({"model": str(MODEL.name), "rows": rows}, indent=2) + "\n")
            print(render(rows[-1:]), flush=True)
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
