"""Does ``torch.compile`` of each block speed up a heal step? Eager against compiled, same weights.

Protocol: a heal-like joint step on a pruned model — forward through every block, a per-block
1 - cosine loss against fixed random targets, backward, gradients of pruned entries zeroed, Adam,
masks re-applied — timed as the median of --steps steps after --warmup (compilation happens in the
warm-up and is reported apart). Models: a Llama with SmolLM2-135M's layer shape (hidden 576, 9
heads, 3 KV heads, MLP 1536; --layers of them, random weights, 50% magnitude-pruned per row) on
batch x seq tokens, and the shared CIFAR ViT (75% magnitude-pruned, batch 32). Each block is
compiled on its own (``module.compile()``, default inductor backend). The mask contract is checked
after the last step of both variants. Writes benchmarks/results/compile_trial.json and prints a
markdown table.

    OMP_NUM_THREADS=2 python benchmarks/compile_trial.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "benchmarks" / "results" / "compile_trial.json"
sys.path.insert(0, str(REPO / "src"))


def smollm2_shaped(layers: int) -> tuple[torch.nn.Module, list[torch.nn.Module], dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return model.model, list(model.model.layers), {}


def vit() -> tuple[torch.nn.Module, list[torch.nn.Module], dict]:
    from starfish.models import create_model

    loaded = create_model("cifar10-vit", SHARED / "models" / "vit_cifar10_smmk47.pth")
    return loaded.module, list(loaded.module.transformer.layers), {}


def prune_rows(blocks: list[torch.nn.Module], sparsity: float) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Magnitude pruning of every Linear weight inside the blocks, per output row."""
    masks = {}
    for block in blocks:
        for module in block.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.data
                k = int(w.shape[1] * sparsity)
                drop = w.abs().topk(k, dim=1, largest=False).indices
                keep = torch.ones_like(w, dtype=torch.bool).scatter_(1, drop, False)
                w.mul_(keep)
                masks[module.weight] = keep
    return masks


def time_steps(model, blocks, masks, inputs, steps: int, warmup: int) -> tuple[list[float], float]:
    captured: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out)) for b in blocks]
    params = list(masks)
    for p in model.parameters():
        p.requires_grad_(p in masks)
    optimizer = torch.optim.Adam(params, lr=1e-5)
    targets = None
    times, first = [], 0.0
    try:
        for step in range(warmup + steps):
            captured.clear()
            started = time.perf_counter()
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
            if targets is None:
                targets = [torch.randn_like(c).detach() for c in captured]
            loss = sum((1 - F.cosine_similarity(c.flatten(1), t.flatten(1), dim=-1)).mean() for c, t in zip(captured, targets)) / len(captured)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p, keep in masks.items():
                p.grad.mul_(keep)
            optimizer.step()
            with torch.no_grad():
                for p, keep in masks.items():
                    p.mul_(keep)
            elapsed = time.perf_counter() - started
            if step == 0:
                first = elapsed
            if step >= warmup:
                times.append(elapsed)
    finally:
        for h in hooks:
            h.remove()
    return times, first


def trial(name: str, build, inputs, sparsity: float, steps: int, warmup: int) -> dict:
    row: dict = {"model": name, "sparsity": sparsity}
    base, blocks, _ = build()
    pruned_masks = prune_rows(blocks, sparsity)
    state = copy.deepcopy(base.state_dict())
    for variant in ("eager", "compiled"):
        base.load_state_dict(state)
        model = base
        if variant == "compiled":
            for block in blocks:
                block.compile()
        times, first = time_steps(model, blocks, pruned_masks, inputs, steps, warmup)
        violations = sum(int((p.detach()[~keep] != 0).sum()) for p, keep in pruned_masks.items())
        row[variant] = {"median_s": statistics.median(times), "first_step_s": first, "mask_violations": violations}
    row["speedup"] = row["eager"]["median_s"] / row["compiled"]["median_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = [
        trial(f"SmolLM2-shaped Llama, {args.layers} layers, {args.batch}x{args.seq} tokens",
              lambda: smollm2_shaped(args.layers), {"input_ids": ids}, 0.5, args.steps, args.warmup),
        trial("CIFAR ViT (shared weights), batch 32", vit, torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
              0.75, args.steps, args.warmup),
    ]
    record = {"command": "python benchmarks/compile_trial.py " + " ".join(sys.argv[1:]), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "platform": platform.platform(), "processor": platform.processor(), "rows": rows}
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print("| model | eager step | compiled step | speed-up | first compiled step (compiles) | mask violations (eager / compiled) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        e, c = r["eager"], r["compiled"]
        print(f"| {r['model']} | {1000 * e['median_s']:.0f} ms | {1000 * c['median_s']:.0f} ms | {r['speedup']:.2f}x | "
              f"{c['first_step_s']:.1f} s | {e['mask_violations']} / {c['mask_violations']} |")


if __name__ == "__main__":
    main()
