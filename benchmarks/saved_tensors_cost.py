"""What the lean saved tensors (``heal.saved_tensors``) cost and save in a real joint heal.

Protocol: SmolLM2-135M from the installed folder, 50% magnitude pruning of every decoder Linear weight
(the masks' content changes neither memory nor time), 16 calibration sequences of 512 tokens from
../shared/data/wikitext2/valid.tokenized.txt (seed 0), joint STARFISH through the public
``starfish.heal`` at batch 8, ``--steps`` optimizer steps, no per-block checkpointing, per precision
(fp32, bf16 autocast). Two variants, in one process, alternating: ``lean`` (what healing does) and
``plain`` (every saved tensor kept as autograd would keep it: the hooks installed but passing each
tensor through unchanged). Reported per variant: seconds per optimizer step (median of the step
intervals after the first step), the plan's activation part, what healing added to the resident set
(its peak minus the memory at its start), and whether the per-step losses are equal to every bit.
Writes benchmarks/results/saved_tensors_cost.json and prints a markdown table.

    OMP_NUM_THREADS=2 python benchmarks/saved_tensors_cost.py
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import subprocess
import time

import torch

from lm_heal import REPO
from lm_heal_memory import setup

RESULTS = REPO / "benchmarks" / "results" / "saved_tensors_cost.json"


@contextlib.contextmanager
def plain_saved_tensors():
    """The variant without the rules: every tensor is saved as it is (the hooks stay installed, so
    both variants pay the same Python call per saved tensor)."""
    from starfish.heal import runner, saved_tensors

    class Plain(saved_tensors.SavedTensors):
        def pack(self, t: torch.Tensor) -> torch.Tensor:
            return t.detach()

    lean = saved_tensors.lean_saved_tensors
    runner.lean_saved_tensors = saved_tensors.lean_saved_tensors = lambda saved=None: lean(saved or Plain())
    try:
        yield
    finally:
        runner.lean_saved_tensors = saved_tensors.lean_saved_tensors = lean


def heal_once(dense, sparse0, masks0, calib, precision: str, steps: int, variant: str) -> dict:
    from starfish.heal import HealConfig, heal

    sparse, masks = copy.deepcopy(sparse0), copy.deepcopy(masks0)
    stamps: list[float] = []
    config = HealConfig(healer="starfish", scope="joint", batch_size=8, epochs=10, max_steps=steps, device="cpu", progress=False,
                        precision=precision, grad_checkpoint="off", budget="fixed", cache_dtype="float16")
    with plain_saved_tensors() if variant == "plain" else contextlib.nullcontext():
        result = heal(dense, sparse, masks, calib, config, observer=lambda _step: stamps.append(time.perf_counter()))
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "precision": precision,
        "variant": variant,
        "steps": result.steps,
        "seconds_per_step": statistics.median(intervals),
        "step_intervals": intervals,
        "activations_planned_mb": result.memory_estimate["parts_mb"]["activations"]["mb"],
        "added_mb": result.peak_memory_mb - result.memory_at_start_mb,
        "planned_added_mb": result.memory_estimate["added_mb"]["cpu"],
        "losses": result.loss_history,
        "violations": sum(masks.violations(sparse).values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per heal (default 5)")
    args = parser.parse_args()
    from starfish.nn.device import bound_heap_growth

    bound_heap_growth()  # as run and compare do: no large free heap chunks from loading and pruning for a heal to reuse
    dense, sparse, masks, calib, _ = setup(16)
    rows = []
    for precision, order in (("fp32", ("lean", "plain")), ("bf16", ("plain", "lean"))):
        for variant in order:
            rows.append(heal_once(dense, sparse, masks, calib, precision, args.steps, variant))
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("losses", "step_intervals")}), flush=True)
    for precision in ("fp32", "bf16"):
        lean, plain = (next(r for r in rows if r["precision"] == precision and r["variant"] == v) for v in ("lean", "plain"))
        lean["losses_equal_to_plain"] = lean["losses"] == plain["losses"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    record = {"command": "python benchmarks/saved_tensors_cost.py" + (f" --steps {args.steps}" if args.steps != 5 else ""),
              "commit": commit, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows}
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print("| precision | saved tensors | s / step | activations (plan) | added by healing (plan) | losses equal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        equal = {True: "yes", False: "no", None: "—"}[r.get("losses_equal_to_plain")]
        print(f"| {r['precision']} | {r['variant']} | {r['seconds_per_step']:.2f} | {r['activations_planned_mb']:,.0f} MB | "
              f"+{r['added_mb']:,.0f} MB ({r['planned_added_mb']:,.0f}) | {equal} |")


if __name__ == "__main__":
    main()
