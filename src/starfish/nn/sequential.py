"""The sequential calibration pipeline: one block at a time, O(blocks) forward work in all.

Pruners and repairs need statistics of what each target weight sees on calibration data. Running
the whole network once per target costs O(targets x blocks) forwards; instead (the pattern of
SparseGPT's layer-by-layer loop and llm-compressor's sequential pipeline, without graph tracing):

1. capture what the first block receives, positional and keyword arguments, with one prefix pass
   per calibration batch that stops at the block (``blockio.capture_block_calls``);
2. for each block in order: run it on those calls with hooks on its targets (calibration), let the
   caller compress or correct its weights, and hand the block's output to the next block as its
   input (``BlockCall.with_stream``): the first pass's output when the stream should stay dense,
   a second pass of the changed block when later blocks should see its pruned output.

That is valid only when the blocks form a chain (each block's input is exactly the previous
block's output) and every target lies inside a block; ``plan_blocks`` checks both (the chain on
one sample, ``blockio.is_chain``) and says why not, so callers fall back to whole-model passes.

Statistics over token positions skip padding: each call carries its batch's position weights
(``batch.position_weights``) to the hooks, which drop padded rows (``layerops.real_rows``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from starfish.nn.batch import Batch, calibration_set, iter_batches, model_device, position_weights, select
from starfish.nn.blockio import BlockCall, StopForward, capture_block_calls, is_chain
from starfish.nn.layerops import evaluation, hooked_targets, watch
from starfish.nn.structure import Target, find_blocks


@dataclass
class Stage:
    """One block and the targets inside it, in the model's order."""

    name: str
    targets: list[Target]


@dataclass
class Plan:
    """Blocks to walk, or ``None`` with the reason the whole-model path must be used instead."""

    stages: list[Stage] | None
    note: str

    @property
    def sequential(self) -> bool:
        return self.stages is not None


def _inside(target: Target, block: str) -> bool:
    return target.module_name == block or target.module_name.startswith(block + ".")


@torch.no_grad()
def plan_blocks(model: nn.Module, targets: list[Target], calibration: object, block_pattern: str | None = None) -> Plan:
    """Group ``targets`` by block when a block-by-block walk computes what a whole-model pass would."""
    try:
        blocks = find_blocks(model, block_pattern)
    except Exception as error:  # no repeated blocks: nothing to walk
        return Plan(None, f"whole-model passes: {error}")
    outside = [t.name for t in targets if not any(_inside(t, b) for b, _ in blocks)]
    if outside:
        return Plan(None, f"whole-model passes: {len(outside)} target(s) lie outside the blocks (e.g. {outside[0]})")
    one = select(calibration_set(calibration), slice(0, 1))
    with evaluation(model):
        chain = is_chain(model, [m for _, m in blocks], one, model_device(model))
    if not chain:
        return Plan(None, "whole-model passes: the blocks do not form a chain (a block's input is not the previous block's output)")
    stages = [Stage(name, [t for t in targets if _inside(t, name)]) for name, _ in blocks]
    return Plan(stages, f"sequential: {len(stages)} blocks, one prefix pass per calibration batch")


# visit(target, module, input, position weights)
TargetVisit = Callable[[Target, nn.Module, torch.Tensor, "torch.Tensor | None"], None]


class InputOrder:
    """A visit that records the order targets run in on the first call, and the tensors they read.

    ``groups`` then puts consecutive targets that read the same input tensor (q/k/v projections,
    gate/up) together: a group can be measured and corrected at once, since none of its members
    changes another's input.
    """

    def __init__(self) -> None:
        self.order: list[tuple[Target, torch.Tensor]] = []  # tensors held, so identity is meaningful
        self.done = False

    def __call__(self, target: Target, module: nn.Module, x: torch.Tensor, weights: torch.Tensor | None) -> None:
        if self.done or any(t.name == target.name for t, _ in self.order):
            self.done = True  # a target seen twice: the first call is over
            return
        self.order.append((target, x))

    def groups(self, targets: list[Target]) -> list[list[Target]]:
        groups: list[list[Target]] = []
        last: torch.Tensor | None = None
        for target, x in self.order:
            if groups and x is last:
                groups[-1].append(target)
            else:
                groups.append([target])
            last = x
        self.order = []
        seen = {t.name for g in groups for t in g}
        return groups + [[t] for t in targets if t.name not in seen]


class Stream:
    """The calls one model's current block receives, one per calibration batch, and their weights.

    ``Stream.start`` pays the prefix pass; ``run`` calls a block on every batch (with target hooks)
    and returns its outputs; ``advance`` makes those outputs the next block's inputs.
    """

    def __init__(self, model: nn.Module, calls: list[BlockCall], weights: list[torch.Tensor | None]) -> None:
        self.model = model
        self.calls = calls
        self.weights = weights

    @classmethod
    @torch.no_grad()
    def start(cls, model: nn.Module, first_block: str, calibration: object, batch_size: int) -> "Stream":
        batches: list[Batch] = list(iter_batches(calibration_set(calibration), batch_size))
        block = model.get_submodule(first_block)
        with evaluation(model):
            calls = capture_block_calls(model, block, batches, model_device(model))
        return cls(model, calls, [position_weights(b) for b in batches])

    @torch.no_grad()
    def run(self, block_name: str, targets: list[Target] = (), visit: TargetVisit | None = None, stop: bool = False) -> list[torch.Tensor]:
        """Call block ``block_name`` on every batch; ``visit`` sees each target's input.

        ``stop``: end each call as soon as every target has been seen (nothing is returned); a
        truncated call costs only the part of the block before its last target.
        """
        block = self.model.get_submodule(block_name)
        device = model_device(self.model)
        current: list = [None]
        outputs = []
        targets = list(targets)
        seen: set[int] = set()

        def each(i: int, module: nn.Module, x: torch.Tensor, weights: torch.Tensor | None) -> None:
            if visit is not None:
                visit(targets[i], module, x, weights)
            seen.add(i)
            if stop and len(seen) == len(targets):
                raise StopForward

        hooks = hooked_targets(self.model, targets, each, current) if targets else nullcontext()
        with evaluation(self.model), hooks:
            for call, weights in zip(self.calls, self.weights):
                current[0] = weights
                seen.clear()
                try:
                    outputs.append(call.to(device).run(block).to(call.stream.device))
                except StopForward:
                    pass
        return outputs

    def advance(self, outputs: list[torch.Tensor]) -> None:
        self.calls = [call.with_stream(out) for call, out in zip(self.calls, outputs)]


def walk(
    model: nn.Module,
    plan: Plan,
    calibration: object,
    batch_size: int,
    calibrate: TargetVisit,
    change: Callable[[Stage], None],
    propagate_changed: bool,
) -> None:
    """Walk ``plan``'s blocks: calibrate each block's targets, ``change`` the block, move on.

    ``propagate_changed``: later blocks see the changed block's output (a second pass of the block);
    otherwise they see the unchanged block's output from the calibration pass (one pass per block).
    """
    assert plan.stages is not None
    stream = Stream.start(model, plan.stages[0].name, calibration, batch_size)
    for stage in plan.stages:
        outputs = stream.run(stage.name, stage.targets, calibrate)
        change(stage)
        if propagate_changed and stage.targets:
            outputs = stream.run(stage.name)
        stream.advance(outputs)


def observe(model: nn.Module, targets: list[Target], calibration: object, batch_size: int, visit: TargetVisit, block_pattern: str | None = None) -> str:
    """Show ``visit`` every target's inputs on the unchanged model: block by block where the blocks
    form a chain (one pass per block), else whole-model passes. Returns the plan's note."""
    plan = plan_blocks(model, targets, calibration, block_pattern)
    if plan.sequential:
        walk(model, plan, calibration, batch_size, visit, lambda stage: None, propagate_changed=False)
    else:
        watch(model, targets, calibration, lambda i, module, x, w: visit(targets[i], module, x, w), batch_size, weighted=True)
    return plan.note
