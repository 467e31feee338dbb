"""Peak host memory per rank while healing SmolLM2-135M: one process vs FSDP2 over 2 processes (CPU, gloo).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fsdp_memory.py --out benchmarks/results/fsdp_memory

runs, each in fresh processes, (a) one process healing the unsharded model and (b)
``torch.distributed.run --nproc-per-node 2`` healing it sharded with ``shard_model``, with the same
global batch, calibration windows and steps. Every rank loads the full model before sharding (the
simple path the CLI takes), so the number that shows the sharding is the *healing* memory: the
peak resident set sampled every 5 ms during ``heal`` minus the resident set when it starts
(gradients, Adam state, gathered units, activations, target cache), plus the resident set once
sharded. Writes one JSON per rank and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

MB = 2**20
DEFAULT_MODEL = "/work/main/.cache/smollm2-135m"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples the resident set in a thread: the peak of a stretch of work, unlike ru_maxrss (a
    high-water mark since the process started, which would include loading the full model)."""

    def __enter__(self) -> "PeakSampler":
        self.start = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())


def magnitude_masks(model: torch.nn.Module, sparsity: float):
    from starfish.masks import Masks
    from starfish.nn.structure import prunable_targets

    params = dict(model.named_parameters())
    out = {}
    for t in prunable_targets(model):
        w = params[t.name].detach().abs().flatten()
        k = int(sparsity * w.numel())
        threshold = w.kthvalue(k).values if k else w.min() - 1
        out[t.name] = params[t.name].detach().abs() > threshold
    return Masks(out)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from starfish.heal import HealConfig, heal

    distributed = "RANK" in os.environ
    rank = 0
    if distributed:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    sparse = copy.deepcopy(dense)
    masks = magnitude_masks(sparse, 0.5)
    masks.apply_(sparse)
    loaded = rss()
    blocks = [f"model.layers.{i}" for i in range(len(sparse.model.layers))]
    if distributed:
        from starfish.distributed.fsdp import fsdp_mesh, shard_model

        mesh = fsdp_mesh()
        shard_model(dense, blocks, mesh)
        shard_model(sparse, blocks, mesh)
    sharded = rss()
    g = torch.Generator().manual_seed(0)
    vocab = dense.config.vocab_size
    calib = {"input_ids": torch.randint(0, vocab, (args.samples, args.seq_len), generator=g),
             "attention_mask": torch.ones(args.samples, args.seq_len, dtype=torch.long)}
    config = HealConfig(batch_size=args.batch_size, max_steps=args.steps, progress=False, device="cpu", seed=0)
    started = time.perf_counter()
    with PeakSampler() as sampler:
        result = heal(dense, sparse, masks, calib, config)
    seconds = time.perf_counter() - started
    violations = masks.violations(sparse)
    world = dist.get_world_size() if distributed else 1
    record = {
        "world": world, "rank": rank, "loaded_mb": loaded / MB, "sharded_mb": sharded / MB,
        "heal_start_mb": sampler.start / MB, "heal_peak_mb": sampler.peak / MB,
        "heal_extra_mb": (sampler.peak - sampler.start) / MB, "steps": result.steps, "seconds": seconds,
        "loss_first": result.loss_history[0], "loss_last": result.loss_history[-1], "violations": len(violations),
        "plan": result.memory_estimate,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"world{world}_rank{rank}.json").write_text(json.dumps(record, indent=1))
    if distributed:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("STARFISH_SMOLLM2", DEFAULT_MODEL))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="global batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/fsdp_memory")
    parser.add_argument("--processes", default="1,2", help="which runs: 1 (unsharded), 2 (FSDP2 over 2 ranks)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    passed = ["--model", args.model, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
              "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--out", args.out, "--worker"]
    me = str(Path(__file__).resolve())
    runs = args.processes.split(",")
    if "1" in runs:
        subprocess.run([sys.executable, me, *passed], env=env, check=True)
    if "2" in runs:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", me, *passed], env=env, check=True)
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("world*_rank*.json"))]
    print("| processes | rank | RSS loaded (MiB) | RSS sharded | healing peak | healing extra (peak - start) | planned per rank (MiB) | steps | s | violations |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        planned = r["plan"]["need_mb"].get("cpu", 0.0)
        print(f"| {r['world']} | {r['rank']} | {r['loaded_mb']:.0f} | {r['sharded_mb']:.0f} | {r['heal_peak_mb']:.0f} | "
              f"{r['heal_extra_mb']:.0f} | {planned:.0f} | {r['steps']} | {r['seconds']:.0f} | {r['violations']} |")


if __name__ == "__main__":
    main()
