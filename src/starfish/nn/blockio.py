"""Block inputs and outputs, observed with hooks on named modules (no graph tracing).

The sequential calibration pipeline and block-wise healing both work one block at a time: they
capture what the first block receives (positional *and* keyword arguments: Hugging Face decoder
layers get attention masks and rotary position embeddings as keywords), run a block on those
inputs alone, and hand its output to the next block. That is only valid when the blocks form a
chain, i.e. each block's input is exactly the previous block's output; ``is_chain`` checks that on
one real batch instead of assuming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from starfish.nn.batch import call_model, to_device
from starfish.nn.hooks import StopForward, forward_until, hooks  # StopForward: re-exported, hooks raise it




def first_tensor(output: object) -> torch.Tensor:
    """The hidden state a block produced: a tensor, the first element of a tuple, or ``.last_hidden_state``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # e.g. older Hugging Face layers return (hidden_states, ...)
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"block returned {type(output).__name__}; expected a tensor or a tuple starting with one")


def move(obj: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """Move every floating/integer tensor inside nested tuples/lists/dicts (other values kept)."""
    if isinstance(obj, torch.Tensor):
        target_dtype = dtype if (dtype is not None and obj.is_floating_point()) else None
        return obj.to(device=device, dtype=target_dtype)
    if isinstance(obj, tuple):
        return tuple(move(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [move(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device, dtype) for k, v in obj.items()}
    return obj


@dataclass
class BlockCall:
    """One batch's call of a block: the stream tensor plus everything else it was called with."""

    args: tuple
    kwargs: dict

    @property
    def stream(self) -> torch.Tensor:
        if self.args and isinstance(self.args[0], torch.Tensor):
            return self.args[0]
        if isinstance(self.kwargs.get("hidden_states"), torch.Tensor):
            return self.kwargs["hidden_states"]
        raise TypeError("cannot find the block's input tensor (first positional argument or 'hidden_states')")

    def with_stream(self, stream: torch.Tensor) -> "BlockCall":
        """The same call with another input tensor (the previous block's output)."""
        if self.args and isinstance(self.args[0], torch.Tensor):
            return BlockCall((stream, *self.args[1:]), self.kwargs)
        return BlockCall(self.args, {**self.kwargs, "hidden_states": stream})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "BlockCall":
        return BlockCall(move(self.args, device, dtype), move(self.kwargs, device, dtype))

    def run(self, block: nn.Module) -> torch.Tensor:
        return first_tensor(block(*self.args, **self.kwargs))


@torch.no_grad()
def capture_block_calls(
    model: nn.Module,
    block: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str,
    store: torch.device | str = "cpu",
) -> list[BlockCall]:
    """Run ``model`` on each batch only as far as ``block``; return the calls ``block`` received.

    The forward pass stops at the block (nothing after it runs), so capturing costs one prefix pass
    per batch. Arguments are stored on ``store`` (the CPU by default, to keep accelerators free).
    """
    calls: list[BlockCall] = []

    def hook(_module, args, kwargs):
        calls.append(BlockCall(move(args, store), move(kwargs, store)))
        raise StopForward

    with hooks(block.register_forward_pre_hook(hook, with_kwargs=True)):
        for batch in batches:
            forward_until(lambda batch=batch: call_model(model, to_device(batch, device)))
    return calls


@torch.no_grad()
def is_chain(model: nn.Module, blocks: list[nn.Module], batch: Mapping[str, torch.Tensor], device: torch.device | str) -> bool:
    """True when, on this batch, each block runs once, in the given order, and receives exactly the
    previous block's output as its input: then blocks can be calibrated and healed one at a time.

    Each input is compared with the previous output as the pass goes (only that one output is kept),
    and the pass stops after the last block's output: no later layer (the head's vocabulary-sized
    logits) runs. A block called again after the last one is therefore not seen."""
    order: list[int] = []
    linked: list[bool] = []
    previous: list[torch.Tensor | None] = [None]
    handles = []
    last = len(blocks) - 1
    for i, block in enumerate(blocks):

        def pre(_m, args, kwargs, i=i):
            try:
                stream = BlockCall(args, kwargs).stream
            except TypeError:
                stream = None
            out = previous[0]
            if order:
                linked.append(out is not None and stream is not None and out.shape == stream.shape and torch.equal(out, stream))
            order.append(i)
            previous[0] = None

        def post(_m, _args, output, i=i):
            try:
                previous[0] = first_tensor(output)
            except TypeError:
                previous[0] = None
            if i == last and order == list(range(len(blocks))):
                raise StopForward

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        with hooks(handles):
            forward_until(lambda: call_model(model, to_device(batch, device)))
    finally:
        model.train(was_training)
    return order == list(range(len(blocks))) and all(linked)
