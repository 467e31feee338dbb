"""``--distributed ddp|fsdp`` on CPU with the gloo backend (the same code runs with NCCL on GPUs).

Two processes under torchrun must compute what one process computes: the same masks (calibration
statistics are all-reduced sums over disjoint slices), the same healed weights within floating-point
tolerance (every global batch is split across ranks and the gradients summed), the same accuracy
(each rank scores every other image and the tallies are summed); rank 0 alone writes. An error
on one rank ends both processes with a non-zero exit instead of a hang.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from conftest import CIFAR, REPO, WEIGHTS
from starfish.cli import main

TESTS = Path(__file__).resolve().parent
HANG_GUARD_S = 300  # a run that has not ended by then has hung: the failure this file guards against
RUN = [
    "--device", "cpu", "--model", "cifar10-resnet20", "--weights", str(WEIGHTS["cifar10-resnet20"]),
    "--sparsity", "0.75", "--pruner", "wanda", "--repair", "varmatch", "--bn-mode", "frozen",
    "--calib", str(CIFAR / "train"), "--calib-size", "32", "--eval", str(CIFAR / "test"), "--eval-size", "60",
    "--seed", "0", "--epochs", "1", "--batch-size", "8", "--no-progress",
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(TESTS)])}


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "starfish", *args]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, shared) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("ddp")
    assert main(["run", *RUN, "--out", str(root / "one")]) == 0
    two = torchrun("run", "--distributed", "ddp", *RUN, "--out", str(root / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    return root / "one", root / "two", two


@pytest.mark.slow
def test_two_processes_prune_heal_and_score_like_one(one_and_two) -> None:
    one, two, _ = one_and_two
    masks_one, masks_two = load_file(str(one / "masks.safetensors")), load_file(str(two / "masks.safetensors"))
    assert masks_one.keys() == masks_two.keys()
    for name in masks_one:  # Wanda's input norms were summed over the two slices: the very same masks
        assert torch.equal(masks_one[name], masks_two[name]), name
    weights_one, weights_two = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-4, atol=1e-4, msg=name)
    for name, keep in masks_two.items():  # the sparsity contract holds in what rank 0 wrote
        assert not bool(weights_two[name][~keep.bool()].any()), name
    report_one, report_two = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert report_two["distributed"] == {"mode": "ddp", "world_size": 2, "backend": "gloo"}
    assert "distributed" not in report_one
    assert report_two["metrics"]["dense"]["samples"] == 60  # every image scored once, over both ranks
    for label in ("dense", "pruned", "repaired", "healed"):
        assert report_two["top1"][label] == pytest.approx(report_one["top1"][label], abs=0.011), label
    assert report_two["heal"]["steps"] == report_one["heal"]["steps"] == 4  # 32 images in global batches of 8
    assert report_two["heal"]["loss_first"] == pytest.approx(report_one["heal"]["loss_first"], rel=1e-4)
    assert report_two["sparsity"] == pytest.approx(0.75, abs=1e-3)


@pytest.mark.slow
def test_fsdp_from_the_command_line_matches_one_process(one_and_two) -> None:
    """``--distributed fsdp``: both models sharded after pruning and repair; the pruned and repaired
    states scored at the end are swapped into the shards; rank 0 writes the gathered weights."""
    one, two, _ = one_and_two
    result = torchrun("run", "--distributed", "fsdp", *RUN, "--out", str(two.parent / "fsdp"))
    assert result.returncode == 0, result.stderr[-3000:]
    fsdp = two.parent / "fsdp"
    assert result.stdout.count("wrote ") == 1
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in one.iterdir())
    masks_one, masks_fsdp = load_file(str(one / "masks.safetensors")), load_file(str(fsdp / "masks.safetensors"))
    assert masks_one.keys() == masks_fsdp.keys() and all(torch.equal(masks_one[k], masks_fsdp[k]) for k in masks_one)
    weights_one, weights_fsdp = load_file(str(one / "model.safetensors")), load_file(str(fsdp / "model.safetensors"))
    assert weights_one.keys() == weights_fsdp.keys()
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_fsdp[name], value, rtol=1e-4, atol=1e-4, msg=name)
    for name, keep in masks_fsdp.items():
        assert not bool(weights_fsdp[name][~keep.bool()].any()), name
    report_one, report = (json.loads((d / "report.json").read_text()) for d in (one, fsdp))
    assert report["distributed"] == {"mode": "fsdp", "world_size": 2, "backend": "gloo"}
    assert report["metrics"]["dense"]["samples"] == 60
    for label in ("dense", "pruned", "repaired", "healed"):
        assert report["top1"][label] == pytest.approx(report_one["top1"][label], abs=0.011), label
    assert report["heal"]["steps"] == 4 and report["heal"]["loss_first"] == pytest.approx(report_one["heal"]["loss_first"], rel=1e-4)


def test_only_rank_zero_writes(one_and_two) -> None:
    one, two, result = one_and_two
    assert result.stdout.count("wrote ") == 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not [p for p in two.parent.iterdir() if p.name.startswith(".")]  # no scratch or lock left behind
    config_one, config_two = (json.loads((d / "config.json").read_text()) for d in (one, two))
    assert config_one == config_two  # --distributed is a property of the launch, not of the job


@pytest.mark.slow
def test_an_error_on_rank_one_ends_both_processes(tmp_path, shared) -> None:
    args = [a for a in RUN]
    args[args.index("--model") + 1] = "distributed_models:resnet20_failing_on_rank_one"
    del args[args.index("--weights") : args.index("--weights") + 2]
    result = torchrun("run", "--distributed", "ddp", *args, "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("starfish: error: rank 1")]
    assert lines and "injected failure" in lines[0], result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_user_errors_come_before_the_process_group(tmp_path, capsys, monkeypatch) -> None:
    """Rank 0 of two, with no rendezvous address set: joining the group would fail, so an existing
    --out being refused with its one-line message proves validation runs first."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier results")
    assert main(["run", "--distributed", "ddp", *RUN, "--out", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier results"
    assert not dist.is_initialized()


@pytest.mark.slow
def test_an_existing_out_is_refused_by_every_rank_itself(tmp_path, shared) -> None:
    """Each rank decides the refusal on its own: none is left waiting for a peer that already left."""
    (tmp_path / "out").mkdir()
    result = torchrun("run", "--distributed", "ddp", *RUN, "--out", str(tmp_path / "out"))
    refusals = [line for line in result.stderr.splitlines() if line.startswith("starfish: error:")]
    assert result.returncode != 0 and len(refusals) == 2, result.stderr[-3000:]
    assert all("already exists" in line for line in refusals)
    assert "starfish/" not in result.stderr.replace(str(tmp_path), "")  # torchrun reports its failed children; no starfish traceback
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.slow
def test_a_refusal_only_rank_zero_sees_still_ends_every_rank_at_once(tmp_path, shared) -> None:
    """Another process holds the output lock: rank 0 alone can tell. Rank 1, already waiting in the
    rendezvous, ends on torchrun's SIGTERM at once instead of after torchrun's 30 s grace period."""
    import time

    from starfish.common.outputs import check_output_dir, release_output_lock

    out = tmp_path / "out"
    check_output_dir(out, force=False)  # this test process now holds the lock on --out
    try:
        started = time.monotonic()
        result = torchrun("run", "--distributed", "ddp", *RUN, "--out", str(out))
        seconds = time.monotonic() - started
    finally:
        release_output_lock(out)
    refusals = [line for line in result.stderr.splitlines() if line.startswith("starfish: error:")]
    assert result.returncode != 0 and len(refusals) == 1 and "another starfish process" in refusals[0], result.stderr[-3000:]
    assert seconds < 30, f"rank 1 lingered: the launch took {seconds:.0f} s"
    assert not out.exists()


@pytest.mark.parametrize("command,extra,message", [
    ("run", ["--heal-scope", "blockwise"], "--heal-scope joint"),
    ("run", ["--checkpoint-every", "2"], "--checkpoint-every"),
    ("run", ["--precision", "fp16"], "--precision"),
    ("run", ["--pipeline", "auto"], "--pipeline auto probes whole"),
    ("run", ["--dtype", "float16"], "float16 steps overflow"),
    ("compare", ["--sparsities", "0.5", "--heal-scope", "blockwise"], "--heal-scope joint"),
])
def test_what_fsdp_cannot_do_is_refused_before_the_process_group(command, extra, message, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    args = RUN if command == "run" else [a for i, a in enumerate(RUN) if not {a, RUN[i - 1]} & {"--sparsity", "--repair"}]
    assert main([command, "--distributed", "fsdp", *args, *extra, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("starfish: error: ") and message in err and err.count("\n") == 1
    assert not dist.is_initialized() and not (tmp_path / "out").exists()


def test_distributed_needs_torchrun(tmp_path, capsys, monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main(["run", "--distributed", "ddp", "--device", "cpu", "--healer", "none", "--out", str(tmp_path / "o")]) == 2
    assert "torchrun" in capsys.readouterr().err


# ------------------------------------------------------------ the helpers, in a 2-process gloo group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _helpers_on_rank(rank: int, world: int, port: int, results: dict) -> None:
    from starfish.distributed.context import DistributedContext, activate, mean_over_ranks, sum_floats, sum_tensors
    from starfish.distributed.ddp import average_buffers, data_parallel_step
    from starfish.distributed.statistics import merge_batchnorm_statistics

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    activate(DistributedContext("ddp", rank, world, rank, "gloo", torch.device("cpu")))
    try:
        out: dict = {"floats": sum_floats(rank + 0.5, 1)}
        out["held_out"] = mean_over_ranks({"objective": 1.0 + 2 * rank, "kl": None})  # every rank decides alike
        tensors = [torch.full((3,), float(rank + 1)), torch.full((2, 2), 10.0 * (rank + 1), dtype=torch.float64)]
        sum_tensors(tensors, bucket_bytes=8)  # smaller than one tensor: one bucket each
        out["tensors"] = [t.tolist() for t in tensors]

        torch.manual_seed(0)  # the same model and data on every rank, as after the same seeded load
        model, x = nn.Linear(4, 2), torch.randn(10, 4)
        loss_of = lambda index: model(x[index]).pow(2).mean()  # noqa: E731
        step = data_parallel_step(loss_of, list(model.parameters()))
        index = torch.tensor([9, 3, 0, 7, 5])  # 5 samples: ranks take 3 and 2
        loss = step.loss(index)
        loss.backward()
        step.reduce_gradients()
        out["loss"] = float(loss.detach())
        out["grads"] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        empty = step.loss(torch.tensor([4]))  # one sample: rank 1 has nothing to add
        empty.backward()
        step.reduce_gradients()
        out["small_grads"] = [p.grad.clone() for p in model.parameters()]

        bn = nn.BatchNorm1d(2)
        bn.running_mean.fill_(float(rank))
        bn.num_batches_tracked.fill_(1 + rank)  # rank 0 averaged one batch, rank 1 two
        merge_batchnorm_statistics([bn])
        out["bn_mean"], out["bn_batches"] = bn.running_mean.tolist(), int(bn.num_batches_tracked)
        buffers = nn.BatchNorm1d(2)
        buffers.running_var.fill_(float(2 * rank))
        average_buffers(buffers)
        out["averaged_var"] = buffers.running_var.tolist()
        results[rank] = out
    finally:
        activate(None)
        dist.destroy_process_group()


@pytest.mark.slow
def test_helpers_in_a_two_process_gloo_group() -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_helpers_on_rank, args=(2, _free_port(), results), nprocs=2, join=True)
    torch.manual_seed(0)
    model, x = nn.Linear(4, 2), torch.randn(10, 4)
    index = torch.tensor([9, 3, 0, 7, 5])
    loss = model(x[index]).pow(2).mean()
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x[torch.tensor([4])]).pow(2).mean().backward()
    expected_small = [p.grad.clone() for p in model.parameters()]
    for rank in (0, 1):
        out = results[rank]
        assert out["floats"] == [2.0, 2.0]
        assert out["held_out"] == {"objective": 2.0, "kl": None}
        assert out["tensors"] == [[3.0] * 3, [[30.0, 30.0], [30.0, 30.0]]]
        assert out["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)  # the global batch loss on every rank
        for got, want in zip(out["grads"], expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip(out["small_grads"], expected_small):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert out["bn_mean"] == pytest.approx([2 / 3, 2 / 3])  # (0 x 1 + 1 x 2) / 3 batches
        assert out["bn_batches"] == 3
        assert out["averaged_var"] == [1.0, 1.0]


def test_shares_are_disjoint_and_cover_everything() -> None:
    from starfish.distributed.shares import share_bounds

    for n in (1, 5, 32, 33):
        for world in (1, 2, 3):
            bounds = [share_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [e - s for s, e in bounds]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.slow
def test_a_float16_language_model_heals_to_finite_weights_under_ddp(tmp_path) -> None:
    """float32 master weights on every rank: the first step no longer turns the float16 weights NaN."""
    from lm_tiny import LINES, llama_config, save_tiny, tiny_tokenizer

    model = save_tiny(tmp_path / "llama", llama_config(len(tiny_tokenizer())))
    (tmp_path / "calib.txt").write_text("\n".join(LINES * 20))
    (tmp_path / "eval.txt").write_text("\n\n".join(LINES * 30))
    out = tmp_path / "out"
    result = torchrun(
        "run", "--distributed", "ddp", "--device", "cpu", "--model", f"hf:{model}", "--dtype", "float16",
        "--calib", str(tmp_path / "calib.txt"), "--calib-size", "8", "--seq-len", "16", "--eval", str(tmp_path / "eval.txt"),
        "--eval-size", "2", "--eval-seq-len", "32", "--sparsity", "0.5", "--healer", "kd", "--epochs", "1", "--batch-size", "4",
        "--no-progress", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["heal"]["master_weights"] == "float32 (loaded float16)" and not report["heal"]["diverged"]
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float16} and all(bool(torch.isfinite(w).all()) for w in weights.values())
    assert report["perplexity"]["healed"] < float("inf")
