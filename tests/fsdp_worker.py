"""One rank of the FSDP2 test (launched by tests/test_fsdp.py with torch.distributed.run, gloo, CPU).

Every rank heals the same tiny Llama twice: unsharded on the whole global batch (the one-process
reference, computed locally) and sharded with FSDP2 on its share of every batch. Rank 0 writes
what it measured to ``OUT/rank0.json``; the test asserts on it. Each check gathers its numbers
over all ranks, so one rank breaking the contract fails the test.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lm_tiny import llama_config  # noqa: E402

from starfish.nn.batch import call_model  # noqa: E402
from starfish.distributed.fsdp import data_parallel_loss, fsdp_mesh, full_state_dict, shard_model  # noqa: E402
from starfish.heal import HealConfig, heal  # noqa: E402
from starfish.nn.capture import record_stream  # noqa: E402
from starfish.masks import Masks, is_sharded, local_view  # noqa: E402
from starfish.nn.structure import prunable_targets, stream_points  # noqa: E402

VOCAB, N, SEQ = 24, 7, 8
CONFIG = dict(epochs=2, batch_size=3, lr=3e-3, progress=False, device="cpu", seed=0)  # batches of 3, 3, 1


def tiny_llama() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(VOCAB), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model.eval()


def random_masks(model: torch.nn.Module) -> Masks:
    g = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    return Masks({t.name: torch.rand(params[t.name].shape, generator=g) > 0.5 for t in prunable_targets(model)})


def checkpoint_blocks(model: torch.nn.Module, blocks: list[str]) -> list[int]:
    """Per-block gradient checkpointing the way a forward wrapper does it: each block's ``forward``
    (an instance attribute) recomputes its activations in the backward pass. Returns a counter of
    the blocks' forward computations (two per block and step when the recomputation happens)."""
    from torch.utils.checkpoint import checkpoint

    calls = [0]
    for name in blocks:
        block = model.get_submodule(name)

        def counted(*a, inner=block.forward, **k):
            calls[0] += 1
            return inner(*a, **k)

        block.forward = lambda *a, counted=counted, **k: checkpoint(counted, *a, use_reentrant=False, **k)
    return calls


def local_grads(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: local_view(params[n].grad).clone() for n in names}


def gathered_sum(value: float) -> float:
    t = torch.tensor([float(value)])
    dist.all_reduce(t)
    return float(t)


def local_pruned_nonzero(model: torch.nn.Module, masks: Masks, grads: bool = False) -> int:
    """Non-zero pruned entries in this rank's shards (of the weights, or of their gradients)."""
    params = dict(model.named_parameters())
    count = 0
    for name in masks.names():
        p = params[name]
        t = p.grad if grads else p
        if t is None:
            continue
        count += int((local_view(t).detach()[~masks._shard_of(name, p)] != 0).sum())
    return count


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = fsdp_mesh()
    dense = tiny_llama()
    masks = random_masks(dense)
    sparse = copy.deepcopy(dense)
    masks.apply_(sparse)
    g = torch.Generator().manual_seed(2)
    calib = {"input_ids": torch.randint(0, VOCAB, (N, SEQ), generator=g), "attention_mask": torch.ones(N, SEQ, dtype=torch.long)}
    blocks = [p.block for p in stream_points(dense, calib)]
    results: dict = {"blocks": blocks}

    # uneven (7 rows over 2 ranks) and empty (1 row) shards: the masks' shards line up with the weights'
    torch.manual_seed(3)
    odd = shard_model(torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Linear(7, 1)), ["0", "1"], mesh)
    odd_masks = Masks({n: torch.rand(p.shape, generator=g) > 0.5 for n, p in odd.named_parameters() if n.endswith("weight")})
    odd_masks.apply_(odd)
    full = {n: odd.get_parameter(n).full_tensor() for n in odd_masks.names()}  # collective gathers
    results["uneven_pruned_nonzero"] = sum(int((full[n][~m] != 0).sum()) for n, m in odd_masks.items())
    results["uneven_kept_nonzero"] = sum(int((full[n][m] != 0).sum()) for n, m in odd_masks.items())
    results["uneven_local_rows"] = gathered_sum(local_view(odd.get_parameter("0.weight")).shape[0] * (10 ** rank))

    # the one-process reference: the whole global batch, no sharding
    ref_sparse = copy.deepcopy(sparse)
    ref = heal(copy.deepcopy(dense), ref_sparse, masks, calib, HealConfig(**CONFIG))
    results["reference_losses"] = ref.loss_history

    # record_stream under fully_shard: the block outputs a sharded dense model yields match the plain one
    points = stream_points(dense, calib)
    sharded_dense = shard_model(copy.deepcopy(dense), blocks, mesh)
    with torch.no_grad():
        with record_stream(dense, points) as plain_slots:
            call_model(dense, calib)
        with record_stream(sharded_dense, points) as sharded_slots:
            call_model(sharded_dense, calib)
    results["stream_recorded"] = sum(s is not None for s in sharded_slots)
    results["stream_max_diff"] = max(float((a - b).abs().max()) for a, b in zip(plain_slots, sharded_slots))

    # gradients of pruned entries: non-zero after backward (the hooks do not fire), zero after mask_gradients_
    def probe_backward(model: torch.nn.Module) -> None:
        loss = data_parallel_loss(lambda idx: call_model(model, {k: v[idx] for k, v in calib.items()}).logits.pow(2).mean())
        loss(torch.arange(N)).backward()

    probe = shard_model(copy.deepcopy(sparse), blocks, mesh)
    hooks = masks.register_gradient_masks(probe)
    probe_backward(probe)
    results["hooks_registered_on_shards"] = len(hooks)
    plain_grads = local_grads(probe, masks.names())
    # the gradient FSDP2 reduces is the one-process gradient of the global batch (not a multiple:
    # Adam would hide a constant factor in the weights)
    one = copy.deepcopy(sparse)
    call_model(one, calib).logits.pow(2).mean().backward()
    full_grads = {n: probe.get_parameter(n).grad.full_tensor() for n in masks.names()}  # collective
    results["grad_diff_vs_one_process"] = max(float((full_grads[n] - one.get_parameter(n).grad).abs().max()) for n in full_grads)
    results["grad_scale"] = max(float(one.get_parameter(n).grad.abs().max()) for n in full_grads)
    # per-block gradient checkpointing composes with fully_shard, wrapped before or after sharding
    diffs, computations = [], []
    for before in (True, False):
        model = copy.deepcopy(sparse)
        if before:
            calls = checkpoint_blocks(model, blocks)
        shard_model(model, blocks, mesh)
        if not before:
            calls = checkpoint_blocks(model, blocks)
        probe_backward(model)
        grads = local_grads(model, masks.names())
        diffs.append(gathered_sum(max(float((grads[n] - plain_grads[n]).abs().max()) for n in grads)))
        computations.append(calls[0])
    results["checkpoint_grad_diff"] = diffs
    results["checkpoint_block_computations"] = computations
    results["pruned_grad_nonzero_before"] = gathered_sum(local_pruned_nonzero(probe, masks, grads=True))
    masks.mask_gradients_(probe)
    results["pruned_grad_nonzero_after"] = gathered_sum(local_pruned_nonzero(probe, masks, grads=True))

    # healing under FSDP2
    sharded_sparse = shard_model(copy.deepcopy(sparse), blocks, mesh)
    results["weights_are_dtensors"] = all(is_sharded(sharded_sparse.get_parameter(n)) for n in masks.names())
    healed = heal(sharded_dense, sharded_sparse, masks, calib, HealConfig(**CONFIG))
    results["fsdp_losses"] = healed.loss_history
    results["activations_mb"] = [r.memory_estimate["parts_mb"]["activations"]["mb"] for r in (ref, healed)]
    results["plan_parallel"] = healed.memory_estimate["parallel"]
    results["violations"] = masks.violations(sharded_sparse)  # collective
    results["shard_pruned_nonzero"] = gathered_sum(local_pruned_nonzero(sharded_sparse, masks))
    results["shard_pruned_grad_nonzero"] = gathered_sum(local_pruned_nonzero(sharded_sparse, masks, grads=True))
    results["pruned_entries"] = int(sum(int((~m).sum()) for _, m in masks.items()))
    state = full_state_dict(sharded_sparse)
    results["rank1_state_empty"] = gathered_sum(len(state) if rank == 1 else 0) == 0

    # bf16 mixed precision through FSDP2's policy: the contract still holds, the shards stay float32
    mixed = shard_model(copy.deepcopy(sparse), blocks, mesh, precision="bfloat16")
    bf16_dense = shard_model(copy.deepcopy(dense), blocks, mesh, precision="bfloat16")
    mixed_result = heal(bf16_dense, mixed, masks, calib, HealConfig(**{**CONFIG, "epochs": 1}))
    results["bf16_losses"] = mixed_result.loss_history
    results["bf16_violations"] = masks.violations(mixed)
    results["bf16_shard_dtype"] = str(local_view(mixed.get_parameter(masks.names()[0])).dtype)

    if rank == 0:
        full = Masks({k: v for k, v in masks.items()})
        plain = copy.deepcopy(dense)
        plain.load_state_dict(state)
        results["full_violations"] = full.violations(plain)
        ref_state = ref_sparse.state_dict()
        results["max_diff_vs_reference"] = max(float((state[k] - ref_state[k]).abs().max()) for k in masks.names())
        results["max_change"] = max(float((ref_state[k] - sparse.state_dict()[k]).abs().max()) for k in masks.names())
        (out / "rank0.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
