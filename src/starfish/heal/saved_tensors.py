"""What autograd keeps for backward, made smaller without changing any gradient.

Two rules, applied by a pack hook to every tensor a training forward pass saves for backward:

* **Recompute cheap elementwise outputs.** A gated MLP computes ``down(act(gate(x)) * up(x))``: the
  activation's input ``gate(x)`` and ``up(x)`` are saved anyway (by the activation and the
  product), yet ``act(gate(x))`` is saved again for the product and the product again for ``down``.
  A saved tensor made by such an op (SiLU, GELU, or a product of two saved tensors) is kept as a
  recipe that recomputes it from the producing node's own saved inputs when the backward pass
  reads it. On a Llama-style block that is two of the MLP's four intermediate-width tensors; the
  recomputation is elementwise, so it costs little beside the matrix products and gives the same
  values bit for bit.
* **One saved copy per autocast cast.** Under autocast every linear layer casts its own input, so
  the projections that read one normalised hidden state (attention's q, k and v; a gated MLP's gate
  and up) each save their own low-precision copy of it: equal values, held three and two times. A
  saved cast (``ToCopyBackward0``), or a view of one, is keyed by the cast's source node, dtype and
  layout and the view's shape, strides and offset; a later tensor with an equal key is replaced by
  the first.

The graph keeps one node per consumer and every gradient is computed from equal values, so the
gradients are bit-identical with and without the hooks (``tests/test_saved_tensors.py``). Measured on
SmolLM2-135M, joint STARFISH at batch 8 x 512 (``benchmarks/saved_tensors_cost.py``): healing added
1.4 GB less in fp32 at +1% step time, 1.1 GB less in bf16 at +5-10%. The
memory plan's probe saves tensors through the same rules, so it counts what healing holds. Inside a
checkpointed block ``torch.utils.checkpoint`` installs its own hooks, which take over there (a
checkpointed block saves only its input anyway). Nothing here supports double backward: a
recomputed tensor carries no graph of its own, and healing never differentiates twice.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

_CAST = "ToCopyBackward0"

# node name -> how its output is computed again from what the node saved (every input it reads is
# saved by the node itself whenever that input requires grad; see ``_inputs_saved``)
_RECOMPUTE: dict[str, Callable[[object], torch.Tensor]] = {
    "SiluBackward0": lambda node: F.silu(node._saved_self),
    "GeluBackward0": lambda node: F.gelu(node._saved_self, approximate=node._saved_approximate),
    "MulBackward0": lambda node: node._saved_self * node._saved_other,
}


def _inputs_saved(node) -> bool:
    """Whether the node saved every input its recipe reads: a product saves each factor only when
    the other one requires grad (a frozen norm weight times a state is kept as it is)."""
    return all(fn is not None for fn, _ in node.next_functions)


@dataclass
class Recompute:
    """A saved tensor kept as the node that made it plus the view taken of its output."""

    node: object
    base_shape: tuple[int, ...]
    base_stride: tuple[int, ...]
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    nbytes: int  # what the recomputed output occupies while a backward pass reads it

    def tensor(self) -> torch.Tensor:
        with torch.no_grad():
            base = _RECOMPUTE[self.node.name()](self.node)
            if base.stride() != self.base_stride:  # lay it out as the original was, so the view reads the same entries
                base = torch.empty_strided(self.base_shape, self.base_stride, dtype=base.dtype, device=base.device).copy_(base)
            return base.as_strided(self.shape, self.stride, self.offset)


class SavedTensors:
    """The pack hook's state for one forward pass: the first saved tensor of each cast key, and
    counts of what was shared and what will be recomputed (read by the tests)."""

    def __init__(self) -> None:
        self.first: dict[tuple, torch.Tensor] = {}
        self.shared = 0
        self.recomputed = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor | Recompute:
        base = t._base if t._is_view() else t
        node = base.grad_fn
        name = node.name() if node is not None else None
        if name in _RECOMPUTE and _inputs_saved(node):
            self.recomputed += 1
            offset = t.storage_offset() - base.storage_offset()
            return Recompute(node, tuple(base.shape), base.stride(), tuple(t.shape), t.stride(), offset, base.numel() * base.element_size())
        # detached: a saved *output* kept as itself would reference its own grad_fn, a reference
        # cycle through autograd that the garbage collector cannot see
        if name != _CAST:
            return t.detach()
        source, index = node.next_functions[0]
        key = (source, index, base.dtype, base.device, tuple(base.shape), base.stride(), tuple(t.shape), t.stride(), t.storage_offset())
        first = self.first.get(key)
        if first is None:
            self.first[key] = first = t.detach()
        else:
            self.shared += 1
        return first

    def release(self) -> None:
        """Forget the cast keys (and the autograd nodes they hold) once the forward pass is over."""
        self.first.clear()


def unpack(saved: torch.Tensor | Recompute) -> torch.Tensor:
    return saved.tensor() if isinstance(saved, Recompute) else saved


@contextmanager
def lean_saved_tensors(saved: SavedTensors | None = None) -> Iterator[SavedTensors]:
    """Apply both rules to the forward passes run inside (a no-op for passes without gradients).

    On exit the cast keys are dropped: they hold autograd nodes, and every tensor saved inside keeps
    the pack hook (so this object) alive, a cycle through autograd that would keep a graph never run
    backward (the memory plan's probe) alive for good."""
    saved = saved or SavedTensors()
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, unpack):
            yield saved
    finally:
        saved.release()
