"""The GPU path, measured: heal steps and a calibration pass on randomly initialised Llama models.

For Llama-architecture models built from a config (no weights, no network: the real Llama-3.2-1B and
Llama-2-7B shapes, or ``--tiny`` for a CPU smoke run), one joint and one block-wise STARFISH heal
step in bf16 autocast with per-block gradient checkpointing (joint), 50% magnitude masks: seconds of
the measured step (the second; the first warms up), tokens per second, the peak memory (CUDA
``max_memory_allocated``, or the resident set on a CPU) against the plan ``heal`` made; and for the
1B (tiny: the tiny model) one Wanda and one SparseGPT calibration pass over 128 x 2048 tokens
(tiny: 8 x 32). The 1B heals with float32 master weights; the 7B is loaded in bfloat16 (float32
weights, gradients and Adam state of 7B do not fit one 80 GB GPU beside the teacher). Writes a
markdown table with the device line.

    bash benchmarks/gpu_check.sh            # on the GPU machine, < 8 minutes on one H100
    python benchmarks/gpu_check.py --tiny --out /tmp/GPU.md   # CPU smoke run (a test runs this)
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab, tied head, weight dtype, batch, tokens)
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True, torch.float32, 4, 2048),
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000, False, torch.bfloat16, 1, 2048),
    "tiny": (64, 128, 2, 4, 2, 1000, False, torch.float32, 2, 32),
}
CALIBRATION = {"llama-3.2-1b": (128, 2048), "tiny": (8, 32)}


def build(name: str, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab, tied, dtype, _, tokens = SHAPES[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=max(tokens, 128))
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def heal_step(name: str, scope: str, device: torch.device) -> dict:
    """Two heal steps of one scope; the second is timed. Peak and plan are the heal's own."""
    from starfish.heal import HealConfig, heal
    from starfish.pruning import PruneConfig, prune

    *_, batch, tokens = SHAPES[name]
    dense = build(name, device)
    sparse = copy.deepcopy(dense)
    masks = prune(sparse, PruneConfig(sparsity=0.5, pruner="magnitude"))
    calib = {"input_ids": torch.randint(0, SHAPES[name][5], (2 * batch, tokens), generator=torch.Generator().manual_seed(0))}
    stamps: list[float] = []

    def observe(_steps: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    config = HealConfig(healer="starfish", scope=scope, batch_size=batch, max_steps=2, epochs=1, precision="bf16" if device.type == "cuda" else "fp32",
                        grad_checkpoint="on", device=str(device), progress=False, cache_dtype="bfloat16")
    started = time.perf_counter()
    result = heal(dense, sparse, masks, calib, config, block_pattern=r"model\.layers\.\d+", observer=observe if scope == "joint" else None)
    if scope == "joint" and len(stamps) == 2:
        step = stamps[1] - stamps[0]
    else:  # block-wise: every block trains its 2 steps; the whole heal over all blocks' steps
        step = result.seconds / max(1, result.steps)
    plan = result.memory_estimate
    place = next(iter(plan["need_mb"]))
    planned = plan["need_mb"][place] if device.type == "cuda" else plan["added_mb"][place]
    measured = result.peak_memory_mb - (0 if device.type == "cuda" else result.memory_at_start_mb or 0)
    out = {"model": name, "what": f"heal step, {scope}", "tokens": batch * tokens, "seconds": step, "tokens_per_s": batch * tokens / step,
           "measured_mb": measured, "plan_mb": planned, "measure": result.memory_measure, "elapsed": time.perf_counter() - started,
           "masks_hold": not masks.violations(sparse)}
    del dense, sparse
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def calibration_pass(name: str, pruner: str, device: torch.device) -> dict:
    from starfish.pruning import PruneConfig, prune

    n, tokens = CALIBRATION[name]
    model = build(name, device)
    calib = {"input_ids": torch.randint(0, SHAPES[name][5], (n, tokens), generator=torch.Generator().manual_seed(1))}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    masks = prune(model, PruneConfig(sparsity=0.5, pruner=pruner), calibration=calib)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    out = {"model": name, "what": f"{pruner} calibration, {n} x {tokens} tokens", "tokens": n * tokens, "seconds": seconds,
           "tokens_per_s": n * tokens / seconds, "measured_mb": peak, "plan_mb": None, "measure": "cuda max allocated" if peak else "-",
           "masks_hold": not masks.violations(model) and abs(masks.sparsity() - 0.5) < 1e-3}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def table(rows: list[dict], device: torch.device, command: str) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "# The GPU path: heal steps and calibration on randomly initialised Llama models", "",
        f"Device: {device_line(device)}", "", f"Command: `{command}`", "",
        "Protocol: models built from a config (random weights), 50% magnitude masks for healing; joint scope with per-block "
        "gradient checkpointing, block-wise without; bf16 autocast on CUDA; the second of two steps is timed (block-wise: the "
        "heal's seconds per step over all blocks). *plan*: the memory plan heal made before its first step (CUDA: whole need; "
        "CPU: what healing adds to what was resident). Masks are checked after every row.", "",
        "| model | what | tokens | seconds | tokens/s | measured peak (MB) | plan (MB) | measured / plan | masks hold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["measured_mb"] / r["plan_mb"] if r["measured_mb"] and r["plan_mb"] else None
        lines.append(f"| {r['model']} | {r['what']} | {r['tokens']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{fmt(r['measured_mb'], '.0f')} | {fmt(r['plan_mb'], '.0f')} | {fmt(ratio, '.2f')} | {r['masks_hold']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny config only (a CPU smoke run)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(Path(__file__).with_name("GPU.md")))
    parser.add_argument("--models", default="llama-3.2-1b,llama-2-7b")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    names = ["tiny"] if args.tiny else args.models.split(",")
    rows: list[dict] = []
    for name in names:
        for scope in ("joint", "blockwise"):
            rows.append(heal_step(name, scope, device))
            print(rows[-1], flush=True)
        if name in CALIBRATION:
            for pruner in ("wanda", "sparsegpt"):
                rows.append(calibration_pass(name, pruner, device))
                print(rows[-1], flush=True)
        Path(args.out).write_text(table(rows, device, "python " + " ".join(sys.argv)))  # after each model: a timeout keeps what ran
    return 0 if all(r["masks_hold"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
