"""SmolLM2-135M dense, pruned and healed: perplexity in and out of domain, and zero-shot task accuracy.

Models: dense; Wanda 50% and Wanda 2:4, each pruned only, healed by STARFISH (the former
language-model default) and by kd (the default since issue 22), at the budget of benchmarks/LM_HEAL_MATRIX.md (2 epochs of 32 x 512
calibration tokens of WikiText-2 valid.tokenized.txt, seed 0, float32 as that matrix ran). Every model is one `starfish run`
output (written once), then scored by `starfish evaluate`:
- perplexity on WikiText-2 test (first 6 windows of 2048 tokens) and on the out-of-domain text of
  benchmarks/ood_text.py (Python standard-library sources, first 6 windows of 2048 tokens);
- every task of `--tasks standard` through lm-evaluation-harness, a seeded subset of --limit items
  per task (all items where a task has fewer), one `starfish evaluate` process per model and task.
Every finished score is kept in the repository (benchmarks/results/lm_zeroshot/MODEL/PIECE.json:
the evaluate.json of one model and task, or of its two texts), so the sweep resumes where it
stopped, also in a later session; run outputs (the models) are rebuilt under --work when needed.
The table is rendered from what exists.

    python scripts/install_smollm2.py
    OMP_NUM_THREADS=2 python benchmarks/lm_zeroshot.py --limit 500
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lm_heal import MODEL, REPO, SHARED, run_process
from ood_text import ensure as ensure_ood

sys.path.insert(0, str(REPO / "src"))
from starfish.zeroshot.catalog import TASK_SETS, ZEROSHOT_TASKS  # noqa: E402

TABLE = REPO / "benchmarks" / "LM_ZEROSHOT.md"
RESULTS = REPO / "benchmarks" / "results" / "lm_zeroshot"
WIKITEXT = SHARED / "data" / "wikitext2"
MATRIX_BUDGET = ["--budget", "fixed", "--epochs", "2", "--precision", "fp32"]  # LM_HEAL_MATRIX.md's budget, as it ran
MODELS = {  # name -> extra `starfish run` flags (None: the dense model itself)
    "dense": None,
    "wanda50-pruned": ["--healer", "none"],
    "wanda50-starfish": ["--healer", "starfish", *MATRIX_BUDGET],
    "wanda50-kd": ["--healer", "kd", *MATRIX_BUDGET],
    "wanda24-pruned": ["--pattern", "2:4", "--healer", "none"],
    "wanda24-starfish": ["--pattern", "2:4", "--healer", "starfish", *MATRIX_BUDGET],
    "wanda24-kd": ["--pattern", "2:4", "--healer", "kd", *MATRIX_BUDGET],
}


def run_model(name: str, work: Path) -> str:
    """The model's TARGET for `starfish evaluate`, running `starfish run` once if needed (the
    run's own report.json is kept in RESULTS beside the scores)."""
    flags = MODELS[name]
    if flags is None:
        return f"hf:{MODEL}"
    out = work / name
    if not (out / "report.json").is_file():
        run_process([
            "-m", "starfish", "run", "--model", f"hf:{MODEL}", "--calib", str(WIKITEXT / "valid.tokenized.txt"),
            "--calib-size", "32", "--seq-len", "512", "--eval", str(WIKITEXT / "test.txt"), "--eval-size", "6",
            "--eval-seq-len", "2048", "--pruner", "wanda", "--sparsity", "0.5", "--seed", "0", *flags,
            "--device", "cpu", "--no-progress", "--out", str(out),
        ])
        (RESULTS / name).mkdir(parents=True, exist_ok=True)
        (RESULTS / name / "run_report.json").write_text((out / "report.json").read_text())
    return str(out)


def evaluate(name: str, piece: str, work: Path, extra: list[str], kept_only: bool = False) -> dict | None:
    """One model's score for one piece (a task, or the texts), computed once and kept in RESULTS
    (``kept_only``: None where nothing is kept yet, nothing computed)."""
    kept = RESULTS / name / f"{piece}.json"
    if not kept.is_file() and kept_only:
        return None
    if not kept.is_file():
        out = work / "eval" / name / piece
        run_process(["-m", "starfish", "evaluate", run_model(name, work), *extra, "--device", "cpu", "--out", str(out), "--force"])
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text((out / "evaluate.json").read_text())
    return json.loads(kept.read_text())


def sweep(args: argparse.Namespace) -> dict:
    work = args.work
    ood = work / "ood" / "python_stdlib.txt"
    ood_record = ensure_ood(ood)
    results: dict = {"ood": ood_record, "limit": args.limit, "models": {}}
    for name in args.models.split(","):
        texts = evaluate(name, "texts", work, [
            "--eval", str(WIKITEXT / "test.txt"), "--eval", str(ood), "--eval-size", "6", "--eval-seq-len", "2048"], args.render)
        if texts is None:
            continue
        entry = {"perplexity": {k: v["perplexity"] for k, v in texts["perplexity"].items()}, "tasks": {}}
        for task in args.tasks.split(","):
            record = evaluate(name, f"{task}-{args.limit}", work, [
                "--tasks", task, "--eval-limit", str(args.limit), "--tasks-data", str(SHARED / "data" / "zeroshot")], args.render)
            if record is None:
                continue
            entry["tasks"][task] = {**record["tasks"][task], "protocol": record["protocol"]["tasks"][task]}
            results["lm_eval_version"] = record["protocol"]["lm_eval_version"]
        results["models"][name] = entry
        render(results, args)  # the table grows as models finish
    return results


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def render(results: dict, args: argparse.Namespace) -> None:
    tasks = TASK_SETS["standard"]
    head = ["WikiText-2 ppl", "Python stdlib ppl", *(f"{t} ({ZEROSHOT_TASKS.get(t).headline})" for t in tasks), "mean of the tasks scored", "mean (paper 7)"]
    lines = [
        "# SmolLM2-135M: perplexity in and out of domain, and zero-shot tasks", "",
        f"`OMP_NUM_THREADS=2 python benchmarks/lm_zeroshot.py {' '.join(a for a in sys.argv[1:] if a != '--render')}` (a missing cell: not scored yet). Models as in the script's docstring "
        f"(Wanda pruning, healing at the LM_HEAL_MATRIX budget of 2 epochs). Perplexity: first 6 windows of 2048 tokens. "
        f"Zero-shot: lm-evaluation-harness {results.get('lm_eval_version')}, 0-shot, a seeded subset of {results['limit']} items per "
        "task (all where a task has fewer); acc_norm for ARC, HellaSwag and OpenBookQA, acc elsewhere. Out-of-domain text: "
        f"{len(results['ood']['files'])} Python {results['ood']['python']} standard-library modules, sha256 `{results['ood']['sha256'][:16]}`.", "",
        "| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head),
    ]
    from starfish.zeroshot import means

    for name, entry in results["models"].items():
        ppl = list(entry["perplexity"].values())
        m = means({t: entry["tasks"][t] for t in tasks if t in entry["tasks"]})
        cells = [f"{v:.2f}" for v in ppl] + [_pct(entry["tasks"].get(t, {}).get(ZEROSHOT_TASKS.get(t).headline)) for t in tasks]
        scored = sum(t in entry["tasks"] for t in tasks)
        lines.append(f"| {name} | " + " | ".join(cells + [f"{_pct(m['mean'])} ({scored} tasks)", _pct(m["mean_paper7"])]) + " |")
    TABLE.write_text("\n".join(lines) + "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=500, help="items per task (seeded subset)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--tasks", default=",".join(TASK_SETS["standard"]), help="comma-separated tasks (default: standard, in its order)")
    parser.add_argument("--render", action="store_true", help="only render the table from the scores kept so far (computes nothing)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "lm_zeroshot", help="run outputs and per-task scores (resumable)")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sweep(parser.parse_args())


if __name__ == "__main__":
    main()
