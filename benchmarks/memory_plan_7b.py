"""The memory plan of joint healing for a Llama-2-7B-sized model, per GPU, on one GPU, DDP and FSDP2.

Nothing is downloaded or allocated: the model is built from a config on the ``meta`` device (shapes
only) and ``starfish.heal.memory_plan.estimate_heal_memory`` plans it, with activations measured by the same
saved-tensor probe healing uses (one meta sample of --seq-len tokens, times each rank's share of
the batch). Run it anywhere:

    PYTHONPATH=src python benchmarks/memory_plan_7b.py --ranks 8
"""

from __future__ import annotations

import argparse
import copy

import torch

from starfish.heal import HealConfig
from starfish.heal.objectives import get_objective
from starfish.heal.memory_plan import GB, Parallelism, estimate_heal_memory
from starfish.nn.structure import prunable_targets


def llama2_7b(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (windows per optimizer step)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--sparsity", type=float, default=0.5, help="share of each prunable weight pruned (best-weights copies hold the rest)")
    args = parser.parse_args()

    import transformers.masking_utils

    # meta tensors hold no values: the check for packed sequences (which reads position ids) cannot
    # run on them; one unpacked window has none, so the probe skips it
    transformers.masking_utils.find_packed_sequence_indices = lambda position_ids: None
    dense = llama2_7b(getattr(torch, args.dtype))
    sparse = copy.deepcopy(dense)
    names = [t.name for t in prunable_targets(sparse)]
    blocks = [f"model.layers.{i}" for i in range(len(sparse.model.layers))]
    calib = {"input_ids": torch.zeros(args.samples, args.seq_len, dtype=torch.long)}
    config = HealConfig(batch_size=args.batch_size, cache_device="cpu", progress=False)
    params = sum(p.numel() for p in sparse.parameters())
    print(f"Llama-2-7B-like ({params / 1e9:.2f} B parameters, {args.dtype}), {len(names)} prunable weights, "
          f"{args.samples} x {args.seq_len} tokens, global batch {args.batch_size}, Adam, targets cached on the host, "
          f"{args.sparsity:.0%} sparse")
    rows = [Parallelism(), Parallelism("ddp", args.ranks), Parallelism("fsdp", args.ranks)]
    shapes = dict(sparse.named_parameters())
    kept = {k: round(shapes[k].numel() * (1 - args.sparsity)) for k in names}
    plans = [estimate_heal_memory(dense, sparse, names, calib, config, get_objective("starfish"), blocks,
                                  torch.device("cuda:0"), "cpu", parallel=parallel, kept=kept) for parallel in rows]
    parts = list(dict.fromkeys(k for plan in plans for k in plan.parts))
    print("| part (GB per GPU unless marked host) | " + " | ".join(p.parallel.describe() for p in plans) + " |")
    print("|---|" + "---:|" * len(plans))
    for part in parts:
        cells = []
        for plan in plans:
            place, nbytes = plan.parts.get(part, ("", 0))
            cells.append(f"{nbytes / GB:.2f}" + (" (host)" if place == "cpu" else ""))
        print(f"| {part} | " + " | ".join(cells) + " |")
    print("| **total on each GPU** | " + " | ".join(f"**{plan.need('cuda:0') / GB:.1f}**" for plan in plans) + " |")
    print("| total on the host, per process | " + " | ".join(f"{plan.need('cpu') / GB:.1f}" for plan in plans) + " |")


if __name__ == "__main__":
    main()
