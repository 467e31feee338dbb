"""FSDP2 keeps the mask contract: masks on DTensor shards, and 2-rank healing on gloo (CPU).

The 2-rank test launches tests/fsdp_worker.py with ``torch.distributed.run`` (two processes, gloo);
the same code runs with NCCL on GPUs. The 1-rank tests build a one-process gloo group in this
process to exercise the DTensor paths of ``Masks`` directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from starfish.errors import StarfishError
from starfish.masks import Masks, is_sharded, local_mask, local_view

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group and its 1-D CPU mesh, torn down afterwards."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3))


def mlp_masks(model: nn.Module) -> Masks:
    g = torch.Generator().manual_seed(0)
    return Masks({n: torch.rand(p.shape, generator=g) > 0.5 for n, p in model.named_parameters() if n.endswith("weight")})


def test_masks_on_dtensor_shards(one_rank):
    from starfish.distributed.fsdp import shard_model

    model = shard_model(small_mlp(), ["0", "2", "4"], one_rank)
    masks = mlp_masks(model)
    weight = model.get_parameter("2.weight")
    assert is_sharded(weight) and local_mask(masks["2.weight"], weight).shape == local_view(weight).shape

    assert masks.violations(model)  # random weights: pruned entries are non-zero before apply_
    masks.apply_(model)
    assert masks.violations(model) == {}
    with torch.no_grad():  # break the contract in the shard: violations sees exactly those entries
        local_view(weight)[~masks["2.weight"]] = 1.0
    assert masks.violations(model) == {"2.weight": int((~masks["2.weight"]).sum())}
    masks.apply_(model)

    assert masks.register_gradient_masks(model) == []  # hooks never fire on FSDP2 weights: none are registered
    model(torch.randn(5, 6)).pow(2).mean().backward()
    grad = local_view(weight.grad)
    assert (grad[~masks["2.weight"]] != 0).any()  # without masking, pruned entries receive gradient
    masks.mask_gradients_(model)
    assert (grad[~masks["2.weight"]] == 0).all() and (grad[masks["2.weight"]] != 0).any()


def test_sharded_healing_is_joint_only(one_rank):
    from starfish.distributed.fsdp import shard_model
    from starfish.heal import HealConfig, heal

    dense = shard_model(small_mlp(), ["0", "2", "4"], one_rank)
    sparse = shard_model(small_mlp(), ["0", "2", "4"], one_rank)
    config = HealConfig(scope="blockwise", progress=False, device="cpu", max_steps=1)
    with pytest.raises(StarfishError, match="--heal-scope joint"):
        heal(dense, sparse, mlp_masks(sparse), {"pixel_values": torch.randn(4, 6)}, config)


def test_precision_names_are_checked():
    from starfish.distributed.fsdp import mixed_precision

    assert mixed_precision("bfloat16").param_dtype == torch.bfloat16
    assert mixed_precision("bfloat16").reduce_dtype == torch.float32
    with pytest.raises(StarfishError, match="--precision"):
        mixed_precision("fp8")


@pytest.mark.slow
def test_two_ranks_heal_keeps_the_contract_and_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads((tmp_path / "rank0.json").read_text())

    assert r["uneven_local_rows"] == 4 + 3 * 10  # rank 0 holds 4 of the 7 rows, rank 1 holds 3
    assert r["uneven_pruned_nonzero"] == 0 and r["uneven_kept_nonzero"] > 0
    assert r["weights_are_dtensors"] and r["hooks_registered_on_shards"] == 0
    assert r["grad_diff_vs_one_process"] < 1e-5 * max(1.0, r["grad_scale"]) and r["grad_scale"] > 1e-3
    assert r["pruned_grad_nonzero_before"] > 0  # the bug the explicit masking fixes
    assert r["pruned_grad_nonzero_after"] == 0
    # the mask contract: on every shard, over all ranks, and in the gathered full state dict
    assert r["violations"] == {} and r["shard_pruned_nonzero"] == 0 and r["full_violations"] == {}
    assert r["shard_pruned_grad_nonzero"] == 0
    assert r["rank1_state_empty"]
    # forward hooks that record block outputs fire under fully_shard and see the same stream
    assert r["stream_recorded"] == len(r["blocks"]) == 2 and r["stream_max_diff"] < 1e-5
    # per-block gradient checkpointing (wrapped before or after sharding) gives the same gradients
    assert r["checkpoint_block_computations"] == [2 * len(r["blocks"])] * 2  # forward + recomputation per block
    assert max(r["checkpoint_grad_diff"]) < 1e-5
    # data parallel over 2 ranks (batches of 3, 3 and 1: uneven and empty shares) = one process
    assert len(r["fsdp_losses"]) == len(r["reference_losses"]) == 6
    assert r["fsdp_losses"] == pytest.approx(r["reference_losses"], rel=1e-4, abs=1e-5)
    assert r["max_change"] > 1e-3  # healing moved the weights ...
    assert r["max_diff_vs_reference"] < 1e-4  # ... and the sharded run moved them the same way
    # the memory plan knows it is one of 2 FSDP ranks, and its activation probe counts no gathered weight:
    # per sample the same as one process (local batch 2 of 3; the plan adds a fixed per-forward part,
    # so the rank's share lies between 2/3 of the one-process figure and all of it)
    assert r["plan_parallel"] == {"mode": "fsdp", "ranks": 2}
    one, sharded = r["activations_mb"]
    assert 0.9 * one * 2 / 3 <= sharded < one  # the probe counts live storages: address reuse moves it by ~1%
    # bf16 through FSDP2's mixed-precision policy: float32 shards, contract intact
    assert r["bf16_violations"] == {} and r["bf16_shard_dtype"] == "torch.float32"
    assert len(r["bf16_losses"]) == 3 and all(abs(a - b) < 0.05 for a, b in zip(r["bf16_losses"], r["reference_losses"]))


def test_memory_plan_per_rank():
    from starfish.heal import HealConfig
    from starfish.heal.objectives import get_objective
    from starfish.heal.memory_plan import Parallelism, estimate_heal_memory

    dense, sparse = small_mlp(), small_mlp()
    names = list(mlp_masks(sparse))
    calib = {"pixel_values": torch.randn(16, 6)}
    config = HealConfig(batch_size=8, device="cpu", progress=False)

    def plan(mode: str, ranks: int) -> dict[str, int]:
        estimate = estimate_heal_memory(dense, sparse, names, calib, config, get_objective("starfish"), ["0", "2", "4"],
                                        torch.device("cpu"), "cpu", parallel=Parallelism(mode, ranks))
        return {part: nbytes for part, (_, nbytes) in estimate.parts.items()}

    single, ddp, fsdp = plan("single", 1), plan("ddp", 4), plan("fsdp", 4)
    for part in ("weights", "gradients", "optimizer state", "best-weights copy"):
        assert ddp[part] == single[part] > 0  # DDP replicates
        assert fsdp[part] == -(-single[part] // 4)  # FSDP splits over the ranks
    # per rank: the fixed part plus the per-sample part times the local batch (2 of 8)
    assert ddp["activations"] == fsdp["activations"] < single["activations"]
    fixed = ddp["activations"] - (single["activations"] - ddp["activations"]) / 3
    assert 0 <= fixed < ddp["activations"]
    block_bytes = max(sum(p.numel() * 4 for p in sparse.get_submodule(b).parameters()) for b in ["0", "2", "4"])
    assert fsdp["gathered units (root + 2 blocks)"] == 2 * block_bytes and "gathered units (root + 2 blocks)" not in ddp
    assert fsdp["masks"] < single["masks"] and fsdp["dense targets"] == single["dense targets"]
    with pytest.raises(StarfishError, match="parallelism"):
        Parallelism("single", 2)


def test_parallelism_is_read_from_sharded_weights(one_rank):
    from starfish.distributed.fsdp import shard_model
    from starfish.heal.memory_plan import Parallelism

    assert Parallelism.of(small_mlp()) == Parallelism()
    student, teacher = (shard_model(small_mlp(), ["0", "2", "4"], one_rank) for _ in range(2))
    assert Parallelism.of(student) == Parallelism.of(student, teacher) == Parallelism("fsdp", 1)
    assert Parallelism.of(student, small_mlp()) == Parallelism("fsdp", 1, teacher_replicated=True)  # a compare grid
    assert Parallelism.of(small_mlp(), student) == Parallelism()  # the student decides the mode


def test_memory_plan_counts_a_replicated_teacher_whole():
    """compare --distributed fsdp shards the student only: its weights are split, the teacher's are not."""
    from starfish.heal import HealConfig
    from starfish.heal.objectives import get_objective
    from starfish.heal.memory_plan import Parallelism, estimate_heal_memory, tensor_bytes

    dense, sparse = small_mlp(), small_mlp()
    calib = {"pixel_values": torch.randn(16, 6)}
    config = HealConfig(batch_size=8, device="cpu", progress=False)
    plans = {
        replicated: estimate_heal_memory(dense, sparse, list(mlp_masks(sparse)), calib, config, get_objective("starfish"),
                                         ["0", "2", "4"], torch.device("cpu"), "cpu", parallel=Parallelism("fsdp", 4, replicated))
        for replicated in (False, True)
    }
    one = tensor_bytes(dense)
    assert plans[False].parts["weights"][1] == -(-2 * one // 4)
    assert plans[True].parts["weights"][1] == -(-one // 4) + one
    for part in ("gradients", "optimizer state", "masks", "best-weights copy"):  # the student's: sharded either way
        assert plans[True].parts[part] == plans[False].parts[part]
    assert plans[True].to_dict()["parallel"] == {"mode": "fsdp", "ranks": 4, "teacher": "replicated"}
    assert "teacher replicated" in plans[True].summary()


def test_a_dropped_sharded_student_is_freed(one_rank):
    """compare shards each grid point's student and must free it before the next one, although
    FSDP2's hooks keep it in reference cycles."""
    import gc
    import weakref

    from starfish.distributed.context import DistributedContext, activate
    from starfish.distributed.sharding import collect_dropped, shard_student

    student = small_mlp()
    assert not shard_student(student, "0|2|4")  # no torchrun context: left alone
    activate(DistributedContext("fsdp", 0, 1, 0, "gloo", torch.device("cpu")))
    gc.disable()  # only collect_dropped may collect
    try:
        assert shard_student(student, "0|2|4") and is_sharded(student.get_parameter("2.weight"))
        student(torch.randn(2, 6)).sum().backward()
        alive = weakref.ref(student)
        del student  # FSDP2's hooks hold it in reference cycles: dropping the name is not enough
        collect_dropped()
        assert alive() is None
    finally:
        gc.enable()
        activate(None)
