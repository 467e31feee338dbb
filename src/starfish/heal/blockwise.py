"""Block-wise healing: each block trained alone, on its own inputs, against the dense block's output.

Only one block (its dense twin for the targets, then the sparse one for training) sits on the
compute device at a time, so memory is bounded by one block plus its activations; the models
stay where they are and the per-sample block inputs and targets are stored in the cache dtype at
the cache location (CPU by default). ``blockwise_inputs`` chooses what a block sees: the stream of
the already-healed sparse blocks before it ("sparse", so it learns to correct upstream error) or
the dense model's own stream ("dense", every block independent of the others).

This needs a chain of blocks (each block's input is exactly the previous block's output), which is
checked on one real batch with ``blockio.is_chain``. The per-step recipe is the joint one
(``heal.training.train_steps``) with its budget applied to every block. Block forwards (the dense
targets and the training passes) run under the run's autocast (``heal.precision``) and the loss is
computed in float32. Gradient checkpointing does not apply: only one block is trained at a time.

Resume (``heal.resume``): every block has its own checkpoint (``block-NNN``), written after its
last step too, so a resumed run restores the finished blocks without training them again and
continues the block in progress at its step; the streams between blocks are recomputed by
forward passes (deterministic), which is cheap next to training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from starfish.nn.batch import batch_len, iter_batches, model_device, position_weights, select
from starfish.nn.blockio import BlockCall, capture_block_calls, is_chain
from starfish.errors import StarfishError
from starfish.heal.job import HealJob
from starfish.heal.objectives import Objective, Signals
from starfish.heal.precision import as_float, autocast
from starfish.heal.saved_tensors import lean_saved_tensors
from starfish.heal.training import StepsOutcome, set_heal_mode, train_steps
from starfish.heal.targets import TensorStore
from starfish.masks import Masks


@dataclass
class BlockArguments:
    """What the first block was called with besides its input stream, for every sample.

    Tensors whose first dimension is the batch (attention masks, per-sample position embeddings)
    are concatenated over the calibration set and sliced per minibatch; everything else (shared
    rotary tables, flags) is taken from the first call.
    """

    leaves: list[Any]
    per_sample: list[bool]
    spec: Any
    stream_in_args: bool

    @classmethod
    def from_calls(cls, calls: list[BlockCall], sizes: list[int]) -> "BlockArguments":
        stream_in_args = bool(calls[0].args) and isinstance(calls[0].args[0], torch.Tensor)
        flat = []
        spec = None
        for call in calls:
            args = call.args[1:] if stream_in_args else call.args
            kwargs = call.kwargs if stream_in_args else {k: v for k, v in call.kwargs.items() if k != "hidden_states"}
            leaves, spec = tree_flatten((args, kwargs))
            flat.append(leaves)
        per_sample = [
            all(isinstance(f[j], torch.Tensor) and f[j].dim() > 0 and f[j].shape[0] == size for f, size in zip(flat, sizes))
            for j in range(len(flat[0]))
        ]
        leaves = [torch.cat([f[j] for f in flat]) if per_sample[j] else flat[0][j] for j in range(len(flat[0]))]
        return cls(leaves, per_sample, spec, stream_in_args)

    def call(self, stream: torch.Tensor, index: torch.Tensor | slice, device: torch.device) -> BlockCall:
        leaves = [
            (leaf[index] if each else leaf).to(device) if isinstance(leaf, torch.Tensor) else leaf
            for leaf, each in zip(self.leaves, self.per_sample)
        ]
        args, kwargs = tree_unflatten(leaves, self.spec)
        if self.stream_in_args:
            return BlockCall((stream, *args), kwargs)
        return BlockCall(tuple(args), {**kwargs, "hidden_states": stream})


def _block_dtype(block: nn.Module) -> torch.dtype:
    p = next(block.parameters(), None)
    return p.dtype if p is not None else torch.float32


@torch.no_grad()
def _run_block(
    block: nn.Module,
    stream: torch.Tensor,
    arguments: BlockArguments,
    device: torch.device,
    store: TensorStore,
    batch_size: int,
    precision: str = "fp32",
) -> torch.Tensor:
    """The block's output for every stored input, written to ``store`` (the block is in eval mode)."""
    n = stream.shape[0]
    dtype = _block_dtype(block)
    out: torch.Tensor | None = None
    for start in range(0, n, batch_size):
        index = slice(start, start + batch_size)
        with autocast(precision, device):
            y = arguments.call(stream[index].to(device, dtype), index, device).run(block)
        if out is None:
            out = store.empty((n, *y.shape[1:]))
        store.write(out, start, y)
    assert out is not None
    return out


def _block_masks(masks: Masks, prefix: str, device: torch.device) -> Masks:
    """The masks of one block's weights, named relative to the block."""
    return Masks({k[len(prefix) :]: v for k, v in masks.items() if k.startswith(prefix)}).to(device)


def _reader(dense: nn.Module, point, objective: Objective, device: torch.device):
    """What the loss compares of a block's output: the output itself, or (norm reads) what the next
    layer reads, through a float32 copy of the dense model's norm (norms never train, so it equals the
    sparse one)."""
    if objective.reads != "norm":
        return lambda y: y
    norm = copy.deepcopy(dense.get_submodule(point.module)).float().to(device).requires_grad_(False)
    return norm


def check_blockwise(objective: Objective) -> None:
    if not objective.needs_blocks or objective.uses_labels or objective.needs_logits:
        why = "does not use" if not objective.needs_blocks or objective.uses_labels else "does not use alone (it also reads the logits)"
        raise StarfishError(
            f"--heal-scope blockwise trains each block against the dense block's output, which healer "
            f"'{objective.name}' {why}; pick --healer starfish, starfish_norm or nmse, or --heal-scope joint."
        )


def heal_blockwise(job: HealJob) -> list[tuple[str, StepsOutcome]]:
    """Heal ``job.sparse`` one block at a time; returns each block's training outcome in order."""
    from tqdm.auto import tqdm

    dense, sparse, masks, calibration, config = job.dense, job.sparse, job.masks, job.calibration, job.config
    objective, block_names, device, store = job.objective, job.block_names, job.device, job.store
    check_blockwise(objective)
    n = batch_len(calibration)
    dense_blocks = [dense.get_submodule(b) for b in block_names]
    sparse_blocks = [sparse.get_submodule(b) for b in block_names]
    home = model_device(dense)
    dense.eval()
    probe = select(calibration, slice(0, min(n, config.batch_size)))
    if not is_chain(dense, dense_blocks, probe, home):
        raise StarfishError(
            "--heal-scope blockwise needs blocks that form a chain (each block fed exactly the previous "
            "block's output), which this model's blocks do not; use --heal-scope joint or name chained blocks with --blocks."
        )
    batches = list(iter_batches(calibration, config.batch_size))
    calls = capture_block_calls(dense, dense_blocks[0], batches, home, store="cpu")
    arguments = BlockArguments.from_calls(calls, [batch_len(b) for b in batches])
    dense_stream = store.empty((n, *calls[0].stream.shape[1:]))
    start = 0
    for call in calls:
        store.write(dense_stream, start, call.stream)
        start += call.stream.shape[0]
    del calls
    sparse_stream = dense_stream
    weights = position_weights(calibration)
    outcomes: list[tuple[str, StepsOutcome]] = []
    for k, name in enumerate(tqdm(block_names, desc="healing block by block", disable=not config.progress, leave=False)):
        dense_block, sparse_block = dense_blocks[k], sparse_blocks[k]
        dense_block.to(device).eval()
        targets = _run_block(dense_block, dense_stream, arguments, device, store, config.batch_size, job.precision)
        dense_block.to(home)
        sparse_block.to(device)
        block_masks = _block_masks(masks, name + ".", device)
        block_masks.apply_(sparse_block)
        inputs = sparse_stream if config.blockwise_inputs == "sparse" else dense_stream
        dtype = _block_dtype(sparse_block)
        read = _reader(dense, job.points[k], objective, device)

        def loss_of(index: torch.Tensor, inputs=inputs, targets=targets, block=sparse_block, read=read) -> torch.Tensor:
            call = arguments.call(inputs[index].to(device, dtype), index, device)
            w = weights[index].to(device) if weights is not None else None
            with autocast(job.precision, device), lean_saved_tensors():
                y = call.run(block)
            out = Signals([read(as_float(y))], None, w)
            return objective.loss(out, Signals([read(targets[index].to(device).float())]), None, config)

        set_heal_mode(sparse_block, config)
        try:
            outcome = train_steps(
                sparse_block, block_masks, loss_of, n, config, config.seed + k, f"healing {name}", job.snapshot_device,
                job.resume_point(f"block-{k:03d}"),
            )
        finally:
            sparse_block.eval()
        outcomes.append((name, outcome))
        del inputs, loss_of  # what they reference is released as soon as it is replaced: at most three streams live
        if config.blockwise_inputs == "sparse" and k + 1 < len(block_names):
            del dense_stream
            sparse_stream = _run_block(sparse_block, sparse_stream, arguments, device, store, config.batch_size, job.precision)
        sparse_block.to(home)
        dense_stream = targets
        del targets
    return outcomes
