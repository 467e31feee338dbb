"""SmolLM2-135M joint STARFISH healing: the memory plan, and peak RSS and seconds per step, with and
without per-block gradient checkpointing and head skipping.

Two modes, each on the real SmolLM2 folder and calibration text drawn like ``benchmarks/lm_heal.py``
(512-token sequences from ../shared/data/wikitext2/valid.tokenized.txt, seed 0), masks from 50%
magnitude pruning of the decoder layers' Linear weights (the masks' content changes neither memory
nor time):

* ``plan``: only the memory plan ``heal`` makes before its first step (no training), for
  fp32/bf16 x checkpointing off/on, at the recipe's 32 x 512 tokens and batch 32.
* ``measure``: one configuration, a real heal of ``--steps`` steps of ``--batch-size`` x 512
  tokens; prints one JSON line with the process's peak RSS, seconds per training step (from the
  sparse model's forward starts) and the plan at that batch. Run each configuration in its own
  process (peak RSS is per process). ``--head run`` keeps the head in the forward pass (as before
  this change) by declaring that the objective reads logits in the training forward only.

    OMP_NUM_THREADS=1 python benchmarks/lm_heal_memory.py plan
    OMP_NUM_THREADS=1 python benchmarks/lm_heal_memory.py measure --grad-checkpoint off --head run
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
MODEL = Path(os.environ.get("STARFISH_SMOLLM2", REPO / ".cache" / "smollm2-135m"))
CALIB = SHARED / "data/wikitext2/valid.tokenized.txt"
SEQ_LEN = 512


def setup(size: int):
    """Dense and 50%-magnitude-pruned SmolLM2, its masks and ``size`` calibration sequences."""
    from starfish.models import create_model
    from starfish.models.causal_lm import tokenizer_of
    from starfish.pruning import PruneConfig, prune
    from starfish.data.text import calibration_text

    loaded = create_model(f"hf:{MODEL}")
    dense = loaded.module.eval()
    sparse = copy.deepcopy(dense)
    masks = prune(sparse, PruneConfig(sparsity=0.5, pruner="magnitude"))
    calib = calibration_text(CALIB, tokenizer_of(loaded.extra), size, SEQ_LEN, seed=0)
    return dense, sparse, masks, calib, loaded.block_pattern


def plans(dense, sparse, masks, calib, pattern, batch_size: int) -> list[tuple[str, str, object]]:
    """(precision, checkpointing, plan) for fp32/bf16 x off/on, one activation measurement per
    precision; on the code before this change, its single plan (fp32, no checkpointing, head run)."""
    from starfish.heal import HealConfig
    from starfish.heal.objectives import get_objective
    from starfish.heal.targets import cache_location
    from starfish.heal.memory_plan import estimate_heal_memory
    from starfish.nn.batch import select
    from starfish.nn.structure import stream_points

    objective = get_objective("starfish")
    device = torch.device("cpu")
    points = stream_points(dense, select(calib, slice(0, 2)), pattern)
    config = HealConfig(batch_size=batch_size, device="cpu", progress=False)
    args = (dense, sparse, masks.names(), calib, config, objective, [p.block for p in points], device, cache_location(None, device))
    if "precision" not in inspect.signature(estimate_heal_memory).parameters:  # the code before this change
        return [("fp32", "off", estimate_heal_memory(*args))]
    out = []
    for precision in ("fp32", "bf16"):
        plain = estimate_heal_memory(*args, precision=precision, checkpoint=False, points=points)
        again = estimate_heal_memory(*args, precision=precision, checkpoint=True, points=points, probe=plain.probe)
        out += [(precision, "off", plain), (precision, "on", again)]
    return out


def cmd_plan(args: argparse.Namespace) -> None:
    dense, sparse, masks, calib, pattern = setup(args.size)
    for precision, checkpoint, plan in plans(dense, sparse, masks, calib, pattern, args.batch_size):
        parts = {k: round(b / 2**30, 2) for k, (_, b) in plan.parts.items()}
        print(json.dumps({"precision": precision, "grad_checkpoint": checkpoint, "need_gb": round(plan.need("cpu") / 2**30, 2),
                          "head_skipped": getattr(plan, "head_skipped", False), "parts_gb": parts}), flush=True)


class TrainingWindow:
    """Peak RSS and forward-start times inside ``train_steps`` only (model loading, pruning, the memory
    probe and target caching excluded): freed heap is handed back to the OS when training starts,
    and a thread samples the resident set every 20 ms until it ends."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.ended: float | None = None
        self.peak = 0
        self.forwards: list[float] = []
        self._running = False

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    def wrap(self, train_steps):
        def run(*args, **kwargs):
            import ctypes
            import threading

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self._running, self.started = True, time.perf_counter()
            sampler = threading.Thread(target=self._sample, daemon=True)
            sampler.start()
            try:
                return train_steps(*args, **kwargs)
            finally:
                self.ended = time.perf_counter()
                self._running = False
                sampler.join()

        return run

    def on_forward(self, *_args) -> None:
        if self._running:
            self.forwards.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        times = [*self.forwards, self.ended]
        return [round(b - a, 1) for a, b in zip(times, times[1:])]


def cmd_measure(args: argparse.Namespace) -> None:
    loop = importlib.import_module("starfish.heal.healing")  # `starfish.heal` is also the name of a function
    from starfish.heal import HealConfig, heal

    dense, sparse, masks, calib, pattern = setup(args.batch_size)
    config = HealConfig(batch_size=args.batch_size, max_steps=args.steps, epochs=args.steps, device="cpu", progress=False)
    new_code = hasattr(config, "precision")
    if new_code:
        config.precision, config.grad_checkpoint = args.precision, args.grad_checkpoint
        if args.head == "run":
            _keep_head_in_training()
    window = TrainingWindow()
    loop.train_steps = window.wrap(loop.train_steps)
    sparse.get_submodule("model.embed_tokens").register_forward_pre_hook(window.on_forward)
    at_start = TrainingWindow.rss()  # the process with both models loaded, before healing starts
    result = heal(dense, sparse, masks, calib, config, block_pattern=pattern)
    print(json.dumps({
        "code": "this change" if new_code else "before",
        "grad_checkpoint": getattr(result, "grad_checkpoint", False),
        "head": args.head if new_code else "run",
        "precision": getattr(result, "precision", "fp32"),
        "batch": args.batch_size,
        "steps": result.steps,
        "seconds_per_step": window.step_seconds(),
        "training_peak_rss_gb": round(window.peak / 2**30, 2),
        "process_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "rss_at_heal_start_gb": round(at_start / 2**30, 2),
        "plan_need_gb": round(sum(v["mb"] for v in result.memory_estimate["parts_mb"].values() if v["place"] == "cpu") / 1024, 2),
        "loss": result.loss_history,
        "masks_hold": not masks.violations(sparse),
        "threads": torch.get_num_threads(),
    }), flush=True)


def _keep_head_in_training() -> None:
    """Make the training forward run the head as it did before head skipping (the targets are still
    cached without logits): the sparse runner is built as if the objective read logits."""
    loop = importlib.import_module("starfish.heal.healing")  # `starfish.heal` is also the name of a function

    original = loop._Runner.__init__

    def init(self, model, points, device, precision="fp32", needs_logits=True):
        original(self, model, points, device, precision, True)

    loop._Runner.__init__ = init


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    plan = sub.add_parser("plan", help="the memory plan only (no training)")
    plan.add_argument("--size", type=int, default=32, help="calibration sequences (default 32, the recipe's)")
    plan.add_argument("--batch-size", type=int, default=32)
    measure = sub.add_parser("measure", help="a short real heal: peak RSS and seconds per step")
    measure.add_argument("--batch-size", type=int, default=4)
    measure.add_argument("--steps", type=int, default=2)
    measure.add_argument("--grad-checkpoint", default="off", choices=["off", "on"])
    measure.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    measure.add_argument("--head", default="skip", choices=["skip", "run"], help="run: keep the head in the training forward")
    args = parser.parse_args()
    if not (MODEL / "config.json").is_file():
        sys.exit(f"no SmolLM2 folder at {MODEL}: run python scripts/install_smollm2.py first")
    cmd_plan(args) if args.cmd == "plan" else cmd_measure(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
