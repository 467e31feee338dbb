"""Per-block gradient checkpointing for joint healing, installed for the run and removed after it.

Joint healing keeps every activation of the whole network for one backward pass; on a causal LM
that is most of the memory (SmolLM2-135M, 32 x 512 tokens: ~19 GB of 23). With checkpointing each
block keeps only its input during the forward pass and recomputes its internals when the backward
pass reaches it, so activations shrink to the block inputs plus one block's internals, for about
one extra forward pass of compute.

How: while ``checkpoint_blocks`` is open, each chosen block gets an instance-level ``forward`` that
runs the class's forward through ``torch.utils.checkpoint`` (non-reentrant: keyword arguments such
as a Hugging Face decoder layer's ``position_embeddings``/``attention_mask`` pass through, autocast
and RNG state are replayed). Hooks registered *on* the block stay outside the checkpointed call, so
``record_stream`` still fires exactly once per forward. Blocks that have a watched module (another
block, or a module whose input is a stream point) strictly inside them are not wrapped, because that
module's hooks would fire again during the recompute. Buffers a forward updates in place (BatchNorm
running statistics of ResNet stages in ``--bn-mode train``) are restored after each recompute, so
statistics move once per step, exactly as without checkpointing. On exit the original ``forward``
comes back and no attribute is left on the user's model.

Without gradients (evaluation, target caching) the wrapper calls the forward directly.
Block-wise healing trains one block at a time, so it has nothing to checkpoint.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

GRAD_CHECKPOINT_MODES = ("auto", "on", "off")
_MISSING = object()


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name.startswith(outer + ".")


def blocks_to_wrap(block_names: Sequence[str], watched: Sequence[str] = ()) -> list[str]:
    """The blocks that can be checkpointed: those with no other block or watched module inside them."""
    others = set(block_names) | set(watched)
    return [b for b in block_names if not any(o != b and _inside(o, b) for o in others)]


@contextmanager
def _restore_buffers(block: nn.Module) -> Iterator[None]:
    """Put back every buffer of ``block`` after a recompute (in-place updates happen only once)."""
    saved = [(b, b.detach().clone()) for b in block.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _restore_buffers(block)


def _checkpointed(block: nn.Module, forward: Callable) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=partial(_contexts, block), **kwargs)

    return run


@contextmanager
def checkpoint_blocks(model: nn.Module, block_names: Sequence[str], watched: Sequence[str] = ()) -> Iterator[list[str]]:
    """Checkpoint each block of ``model`` (see ``blocks_to_wrap``) while open; yields the wrapped names."""
    names = blocks_to_wrap(block_names, watched)
    previous: list[tuple[nn.Module, object]] = []
    try:
        for name in names:
            block = model.get_submodule(name)
            previous.append((block, block.__dict__.get("forward", _MISSING)))
            block.forward = _checkpointed(block, block.forward)
        yield names
    finally:
        for block, before in reversed(previous):
            if before is _MISSING:
                del block.forward
            else:
                block.forward = before
