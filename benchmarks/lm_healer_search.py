"""Screening of label-free LLM healers (issue 22): objective x scope x calibration size on SmolLM2-135M.

Every candidate is one `starfish run` process (prune, heal, score), run one at a time; its row is
appended to the JSON as soon as it finishes, so a stopped sweep resumes where it stopped (a
candidate already in the JSON with the same budget is skipped). The markdown is rendered from the JSON.

Protocol. Nothing here reads WikiText test.txt (the issue's evaluation text): ``valid.tokenized.txt``
is split at a line boundary into a calibration part (the first ``--calib-fraction`` of its lines)
and a disjoint scoring part (the rest); pruning and healing draw their calibration sequences
(``--calib-size`` x 512 tokens, seed 0) from the first, perplexity is measured on the first
``--score-windows`` windows of 2048 tokens of the second. Both parts are written under
``.cache/lm_healer_search/`` and their sha256 recorded. One short budget for every candidate:
``--steps`` optimizer steps of batch 8 (language-model default, lr 3e-4 cosine), i.e. the same
tokens for every calibration size; block-wise scopes take those steps for every block.

    OMP_NUM_THREADS=2 python benchmarks/lm_healer_search.py --dry-run        # the commands only
    OMP_NUM_THREADS=2 python benchmarks/lm_healer_search.py --steps 16
    python benchmarks/lm_healer_search.py --render
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from lm_heal import MODEL, REPO, SHARED, run_process

RESULTS = REPO / "benchmarks" / "results" / "lm_healer_search.json"
TABLE = REPO / "benchmarks" / "LM_HEALER_SEARCH.md"
PARTS = REPO / ".cache" / "lm_healer_search"
OBJECTIVES = "starfish,starfish_norm,nmse,kd,starfish_kd"
LOGIT_ONLY = {"kd", "starfish_kd"}  # read the logits: joint scope only
SCOPES = {  # scope name -> starfish run flags
    "joint": ["--heal-scope", "joint"],
    "blockwise": ["--heal-scope", "blockwise", "--blockwise-inputs", "sparse"],
    "blockwise-dense": ["--heal-scope", "blockwise", "--blockwise-inputs", "dense"],
}
CELLS = "wanda,wanda:2:4"
BATCH = 8


SAME = ("calibration", "scoring", "score_windows", "score_seq_len", "seq_len")  # what rows of one JSON must share


def _comparable(protocol: dict) -> dict:
    """What rows of one JSON must share: the texts' contents (not where they were written) and the windows."""
    return {k: {f: v for f, v in protocol[k].items() if f != "path"} if isinstance(protocol.get(k), dict) else protocol.get(k) for k in SAME}


def split_validation(fraction: float, folder: Path = PARTS) -> dict:
    """Write the calibration and scoring parts of valid.tokenized.txt (a line boundary) and describe them."""
    source = SHARED / "data/wikitext2/valid.tokenized.txt"
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * fraction)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"calibration": (folder / "calib.txt", lines[:cut]), "scoring": (folder / "score.txt", lines[cut:])}
    described = {"source": str(source), "split_line": cut, "lines": len(lines)}
    for name, (path, part) in parts.items():
        text = "".join(part)
        path.write_text(text, encoding="utf-8")
        described[name] = {"path": str(path), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "chars": len(text)}
    return described


def candidates(args: argparse.Namespace) -> list[dict]:
    """Every (cell, objective, scope, calibration size) to screen, in order; logit objectives joint only."""
    found = []
    for cell in args.cells.split(","):
        pruner, *nm = cell.split(":")
        for size in (int(s) for s in args.calib_sizes.split(",")):
            for objective in args.objectives.split(","):
                for scope in args.scopes.split(","):
                    if scope != "joint" and objective in LOGIT_ONLY:
                        continue
                    found.append({"pruner": pruner, "pattern": ":".join(nm) or None, "healer": objective, "scope": scope,
                                  "calib_size": size, "steps": args.steps})
    return found


def key(row: dict) -> tuple:
    return row["pruner"], row["pattern"], row["healer"], row["scope"], row["calib_size"], row["steps"]


def run_command(c: dict, parts: dict, out: Path, args: argparse.Namespace) -> list[str]:
    """The `starfish run` of one candidate: exactly ``steps`` optimizer steps of batch 8."""
    epochs = math.ceil(c["steps"] * BATCH / c["calib_size"])
    cmd = [
        "-m", "starfish", "run", "--model", f"hf:{MODEL}",
        "--calib", parts["calibration"]["path"], "--calib-size", str(c["calib_size"]), "--seq-len", str(args.seq_len),
        "--eval", parts["scoring"]["path"], "--eval-size", str(args.score_windows), "--eval-seq-len", str(args.score_seq_len),
        "--pruner", c["pruner"], "--sparsity", "0.5", "--seed", "0", "--healer", c["healer"], *SCOPES[c["scope"]],
        "--budget", "fixed", "--epochs", str(epochs), "--max-steps", str(c["steps"]), "--batch-size", str(BATCH),
        "--device", args.device, "--no-progress", "--out", str(out), "--force",
    ]
    return cmd + (["--pattern", c["pattern"]] if c["pattern"] else [])


def result_row(c: dict, out: Path, wall: float, peak: float, cmd: list[str], seq_len: int) -> dict:
    report = json.loads((out / "report.json").read_text())
    heal = report.get("heal") or {}
    ppl = report["perplexity"]
    return {
        **c, **{f"{k}_perplexity": ppl.get(k) for k in ("dense", "pruned", "healed")},
        "optimizer_steps": heal.get("steps"), "seq_len": seq_len, "tokens_per_step": BATCH * seq_len, "heal_seconds": report.get("heal_seconds"),
        "heal_peak_mb": heal.get("peak_memory_mb"), "memory_measure": heal.get("memory_measure"), "kd_weight": heal.get("kd_weight"),
        "achieved_sparsity": report.get("sparsity"), "process_wall_seconds": wall, "process_peak_rss_mb": peak,
        "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
        "command": "python " + " ".join(cmd).replace(str(out), "OUT"),
    }


def gap_closed(row: dict) -> float | None:
    """Share of the pruned-to-dense log-perplexity gap that healing closed."""
    d, p, h = row.get("dense_perplexity"), row.get("pruned_perplexity"), row.get("healed_perplexity")
    if None in (d, p, h) or p <= d:
        return None
    return (math.log(p) - math.log(h)) / (math.log(p) - math.log(d))


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} MB"


def render(data: dict) -> str:
    """One table per pruned cell, candidates best first."""
    rows, protocol = data["rows"], data["protocol"]
    lines = [
        "# SmolLM2-135M: screening label-free healers (issue 22)",
        "",
        f"Scored on held-out WikiText-2 *validation* text (never test.txt): `valid.tokenized.txt` split at line "
        f"{protocol['split_line']} of {protocol['lines']}; calibration from the first part (sha256 "
        f"`{protocol['calibration']['sha256'][:12]}…`), perplexity on the first {protocol['score_windows']} windows of "
        f"{protocol['score_seq_len']} tokens of the second (sha256 `{protocol['scoring']['sha256'][:12]}…`). Budget: the stated "
        f"optimizer steps of batch {BATCH} x {protocol['seq_len']} tokens for every candidate (block-wise: per block), "
        "language-model lr, seed 0. *Gap closed*: share of the pruned-to-dense log-perplexity gap. Lower perplexity is better.",
        "",
    ]
    for cell in dict.fromkeys((r["pruner"], r["pattern"]) for r in rows):
        group = sorted((r for r in rows if (r["pruner"], r["pattern"]) == cell), key=lambda r: r["healed_perplexity"])
        dense = group[0]["dense_perplexity"]
        lines += [
            f"## {cell[0]} {cell[1] or '50% unstructured'} (dense {dense:.2f})",
            "",
            "| healer | scope | calibration | steps (tokens) | pruned | healed | gap closed | heal time | heal peak | threads |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in group:
            closed = gap_closed(r)
            lines.append(
                f"| {r['healer']} | {r['scope']} | {r['calib_size']} x {r['seq_len']} | {r['optimizer_steps']} ({r['steps'] * r['tokens_per_step']}) | "
                f"{r['pruned_perplexity']:.2f} | {r['healed_perplexity']:.2f} | {'—' if closed is None else f'{100 * closed:.0f}%'} | "
                f"{r['heal_seconds']:.0f} s | {_mb(r['heal_peak_mb'])} | {r['threads']} |"
            )
        lines.append("")
    lines.append(f"Command: `{protocol['command']}`; each candidate's own `starfish run` command is in the JSON.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=CELLS, help=f"PRUNER[:N:M],... at 50%% (default {CELLS})")
    parser.add_argument("--objectives", default=OBJECTIVES, help=f"healers (default {OBJECTIVES})")
    parser.add_argument("--scopes", default=",".join(SCOPES), help=f"any of {', '.join(SCOPES)} (logit healers: joint only)")
    parser.add_argument("--calib-sizes", default="32,128", help="calibration sequences of 512 tokens (default 32,128)")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps of batch 8 for every candidate (default 16)")
    parser.add_argument("--calib-fraction", type=float, default=0.75, help="lines of valid.tokenized.txt used for calibration")
    parser.add_argument("--score-windows", type=int, default=6, help="windows of 2048 tokens scored (default 6)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    parser.add_argument("--score-seq-len", type=int, default=2048, help="tokens per scored window (default 2048)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON (the markdown goes beside the default one)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the candidates still to run")
    parser.add_argument("--render", action="store_true", help="only render the markdown from the JSON")
    args = parser.parse_args()
    table = TABLE if args.results == RESULTS else args.results.with_suffix(".md")
    data = json.loads(args.results.read_text()) if args.results.is_file() else None
    if args.render:
        table.write_text(render(data))
        print(table.read_text())
        return 0
    if not (MODEL / "config.json").is_file() and not args.dry_run:
        sys.exit(f"no SmolLM2 folder at {MODEL}: run python scripts/install_smollm2.py first")
    parts = split_validation(args.calib_fraction)
    protocol = {**parts, "score_windows": args.score_windows, "score_seq_len": args.score_seq_len, "seq_len": args.seq_len, "model": MODEL.name,
                "command": "python benchmarks/lm_healer_search.py " + " ".join(sys.argv[1:])}
    if data is not None and _comparable(data["protocol"]) != _comparable(protocol):
        sys.exit(f"{args.results} was scored on other text or windows; pass another --results or the same split.")
    data = data or {"protocol": protocol, "rows": []}
    done = {key(r) for r in data["rows"]}
    todo = [c for c in candidates(args) if key(c) not in done]
    with tempfile.TemporaryDirectory(prefix="lm_healer_search-") as scratch:
        for i, c in enumerate(todo):
            out = Path(scratch) / f"candidate-{i}"
            cmd = run_command(c, parts, out, args)
            if args.dry_run:
                print("python " + " ".join(cmd))
                continue
            wall, peak = run_process(cmd)
            data["rows"].append(result_row(c, out, wall, peak, cmd, args.seq_len))
            args.results.write_text(json.dumps(data, indent=2) + "\n")
            table.write_text(render(data))
            print(f"{key(c)}: healed {data['rows'][-1]['healed_perplexity']:.2f}", flush=True)
    if data["rows"] and not args.dry_run:
        print(table.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
