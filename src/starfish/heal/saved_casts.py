"""One saved copy per autocast cast: duplicate low-precision copies kept for backward are shared.

Why: under autocast every linear layer casts its own input, so the projections that read one
normalised hidden state (attention's q, k and v; a gated MLP's gate and up) each save their own
bfloat16 copy of it for the backward pass: equal values, held three and two times. Sharing them took
a joint STARFISH heal of SmolLM2-135M at batch 8 from +5,186 MB to +4,859 MB (``BENCHMARKS.md``,
the #24 matrix reruns).

How: while ``share_saved_casts`` is open, every tensor autograd saves passes through a pack hook.
A saved tensor that is a cast (``ToCopyBackward0``), or a view of one, is looked up by the cast's
source node, its dtype and layout, and the view's shape, strides and offset: two such tensors with
one key hold the same values, so the second is replaced by the first and its own copy is freed
once the forward pass moves on. The graph keeps one cast node per consumer, so every gradient is
computed from the same values as without sharing, bit for bit (``tests/test_saved_casts.py``).

Only under an autocast precision: without autocast there are no casts to share, and the hooks stay
off. Inside a checkpointed block ``torch.utils.checkpoint`` installs its own hooks, which take over
there (a checkpointed block saves only its input anyway).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

_CAST = "ToCopyBackward0"


class SharedCasts:
    """The pack hook's memory for one forward pass: the first saved tensor of each cast key."""

    def __init__(self) -> None:
        self.first: dict[tuple, torch.Tensor] = {}
        self.shared = 0  # saved tensors replaced by an earlier equal one (read by the tests)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        # detached: a saved *output* kept as itself would reference its own grad_fn, a reference
        # cycle through autograd that the garbage collector cannot see
        base = t._base if t._is_view() else t
        cast = base.grad_fn
        if cast is None or cast.name() != _CAST:
            return t.detach()
        source, index = cast.next_functions[0]
        key = (source, index, base.dtype, base.device, tuple(base.shape), base.stride(), tuple(t.shape), t.stride(), t.storage_offset())
        first = self.first.get(key)
        if first is None:
            self.first[key] = first = t.detach()
        else:
            self.shared += 1
        return first

    def release(self) -> None:
        """Forget the keys (and the autograd nodes they hold) once the forward pass is over."""
        self.first.clear()


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


@contextmanager
def share_saved_casts(precision: str, shared: SharedCasts | None = None) -> Iterator[SharedCasts | None]:
    """Share duplicate saved casts during the forward passes run inside (``precision``: the run's
    resolved precision; nothing is installed unless it is an autocast one).

    On exit the keys are dropped: they hold autograd nodes, and every tensor saved inside keeps the
    pack hook (so this object) alive, a cycle through autograd that would keep a graph never run
    backward (the memory plan's probe) alive for good."""
    from starfish.heal.precision import AUTOCAST_DTYPES

    if precision not in AUTOCAST_DTYPES:
        yield None
        return
    shared = shared or SharedCasts()
    try:
        with torch.autograd.graph.saved_tensors_hooks(shared.pack, _unpack):
            yield shared
    finally:
        shared.release()
