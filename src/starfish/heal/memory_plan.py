"""How much memory healing will need, said before it starts, and a clear refusal when it won't fit.

The estimate adds up, per place (the compute device, host memory), the weights that sit there,
the gradients and optimizer state of the trainable weights, the cached dense targets, the
divergence guard's copy of the best weights, and the activations autograd keeps for one
backward pass. Activations are *measured*, not guessed: one and then two samples go through the
sparse model with ``saved_tensors_hooks`` counting every tensor saved for backward (parameters
excluded), per block and in total; the difference is the per-sample part, scaled by the batch
size, and the rest is paid once per forward (autocast's low-precision weight copies). The pass runs
under the run's autocast (``--precision``) and, when the objective reads no logits, stops where
healing stops (the head is skipped, its output not counted). With per-block gradient
checkpointing the plan keeps what is saved outside the blocks, every block's input and one block's
internals (``ActivationProbe.activations``). Block outputs' shapes come from the same pass and size
the target cache.

On more than one process the plan is per rank (``Parallelism``): with DDP every rank holds a full
replica of the weights, gradients and optimizer state and the activations of its share of each
batch; with FSDP2 the weights, gradients, optimizer state, mask shards and the best-weights copy
are split over the N ranks, and each rank additionally holds the units it has gathered (the root's
parameters and two blocks: the one computing and the one prefetched). In a compare grid under
FSDP2 only the student is sharded: the dense teacher's weights count whole on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from starfish.nn.batch import call_model, select, to_device
from starfish.errors import StarfishError
from starfish.masks import is_sharded, local_view
from starfish.nn.device import free_device_bytes

GB = 1024**3
CHECKPOINT_FLAG = "--grad-checkpoint on"
PRECISION_FLAG = "--precision bf16"
# What a CPU heal touches besides tensors: the autograd engine, thread pools and allocator arenas (measured
# 10-20 MB on a tiny Llama, tests/test_memory_plan_accuracy.py; a fixed amount, noise on a real model).
CPU_RUNTIME_BYTES = 12 * 2**20
# Full-size float32 temporaries a block loss holds on one block at a time (the cosine's widened target,
# product and backward terms: ``heal.objectives._CosineDistance``).
LOSS_TEMPORARIES = 4


@dataclass
class ActivationProbe:
    """What the forward pass of healing keeps for backward, measured on the sparse model.

    Bytes are split into a per-sample part (times the batch size) and a fixed part paid once per
    forward whatever the batch (autocast's low-precision copies of the weights, rotary tables), by
    measuring one and two samples. Per block: what is saved inside it, and its input stream (what a
    checkpointed block keeps instead).
    """

    saved_total: int  # per sample
    saved_per_block: list[int]  # per sample
    block_output_numel: list[int]  # per sample
    logits_numel: int  # per sample (0 when the head is skipped)
    fixed_total: int = 0  # per forward
    fixed_per_block: list[int] = field(default_factory=list)
    block_input_bytes: list[int] = field(default_factory=list)  # per sample
    logits_bytes: int = 0  # per sample, in the dtype the head produced
    hidden_numel: int = 0  # per sample: the head's input when the loss applies the head itself (heal.vocab)
    vocab: int = 0  # that head's vocabulary
    largest_per_block: list[int] = field(default_factory=list)  # per sample: each block's largest saved tensor
    # per sample: what each block's backward recomputes instead of keeping (heal.saved_tensors)
    recomputed_per_block: list[int] = field(default_factory=list)

    def step_transient(self, batch: int) -> int:
        """Bytes the backward pass adds while saved tensors are still held: the gradients of the largest
        saved tensor and of a sibling (the gated MLP's two branches, attention's scores), and the
        tensors one block's backward recomputes (alive together while that block's MLP is differentiated)."""
        return (2 * max(self.largest_per_block, default=0) + max(self.recomputed_per_block, default=0)) * batch

    def block_step(self, batch: int) -> int:
        """Bytes one block's training step holds at its peak (block-wise healing): the largest block's
        saved tensors and what its backward recomputes. No gradient transient on top: one block's
        backward frees its saved tensors as it makes their gradients (``tests/test_memory_plan_accuracy.py``
        holds the block-wise plan within 15% of the measured peak on a tiny Llama; with the transient
        added it was above that band)."""
        blocks = zip(self.fixed_per_block, self.saved_per_block, self.recomputed_per_block)
        return max((f + (b + r) * batch for f, b, r in blocks), default=0)

    def activations(self, batch: int, checkpoint: bool) -> int:
        """Bytes autograd holds at the peak of one step of ``batch`` samples.

        Without checkpointing: everything saved by the forward pass. With per-block checkpointing:
        what is saved outside the blocks, every block's input (kept for its recompute), and the
        internals of one block at a time (the largest), recomputed during backward.
        """
        if not checkpoint:
            return self.fixed_total + self.saved_total * batch
        fixed_blocks, per_blocks = sum(self.fixed_per_block), sum(self.saved_per_block)
        outside = (self.fixed_total - fixed_blocks) + (self.saved_total - per_blocks) * batch
        one_block = max((f + b * batch for f, b in zip(self.fixed_per_block, self.saved_per_block)), default=0)
        return outside + one_block + sum(self.block_input_bytes) * batch


@dataclass
class _Saved:
    total: int
    per_block: list[int]
    outputs: list[int]
    inputs: list[int]
    logits_numel: int
    logits_bytes: int
    hidden_numel: int = 0
    vocab: int = 0
    largest: list[int] = field(default_factory=list)
    recomputed: list[int] = field(default_factory=list)


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """(identity, bytes) of the memory a tensor views: its data pointer, or on the meta device (no
    data, every pointer 0) the storage object itself, so a model built on ``meta`` can be probed."""
    try:
        storage = t.untyped_storage()
        return (storage._cdata if t.is_meta else storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


def _count_saved(
    model: nn.Module, blocks: list[nn.Module], sample: Mapping[str, torch.Tensor], precision: str, points: list | None, head: str | None = None
) -> _Saved:
    """One forward pass with gradients on, counting every distinct storage saved for backward
    (parameters excluded), in total and per block, plus each block's input and output sizes."""
    from starfish.nn.blockio import first_tensor
    from starfish.nn.hooks import forward_until, hooks
    from starfish.tasks.evaluate import logits_of
    from starfish.nn.capture import record_stream
    from starfish.heal.precision import autocast
    from starfish.heal.saved_tensors import Recompute, lean_saved_tensors
    from starfish.heal.vocab import stop_at_head
    from starfish.nn.batch import model_device
    from starfish.nn.structure import input_tensor

    param_storages = {key[0] for p in model.parameters() if (key := _storage(local_view(p))) is not None}
    seen: set[int] = set()

    def gathered(module: nn.Module, *_) -> None:
        """FSDP2 swaps gathered weights (views into one all-gather buffer) in before a unit's forward:
        their storage is weights, not activations."""
        param_storages.update(key[0] for p in module.parameters() if (key := _storage(local_view(p))) is not None)

    out = _Saved(0, [0] * len(blocks), [0] * len(blocks), [0] * len(blocks), 0, 0, largest=[0] * len(blocks), recomputed=[0] * len(blocks))
    current: list[int | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor | Recompute:
        if isinstance(t, nn.Parameter):
            return t
        # saved as healing saves them (heal.saved_tensors): recomputed ones hold nothing, shared
        # casts count once; every tensor comes back detached (a saved output kept as itself would
        # reference its own grad_fn, a cycle the garbage collector cannot see)
        t = saved.pack(t)
        if isinstance(t, Recompute):
            if current[0] is not None:
                out.recomputed[current[0]] += t.nbytes
            return t
        storage = _storage(t)
        if storage is None or storage[0] in param_storages or storage[0] in seen:
            return t
        seen.add(storage[0])
        out.total += storage[1]
        if current[0] is not None:
            out.per_block[current[0]] += storage[1]
            out.largest[current[0]] = max(out.largest[current[0]], storage[1])
        return t

    handles = []
    for i, block in enumerate(blocks):

        def pre(_m, args, kwargs, i=i):
            gathered(_m)
            current[0] = i
            stream = input_tensor(args, kwargs)
            out.inputs[i] = stream.numel() * stream.element_size() if stream is not None else 0

        def post(_m, _args, output, i=i):
            current[0] = None
            try:
                out.outputs[i] = first_tensor(output).numel()
            except TypeError:
                pass

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post))
    handles.append(model.register_forward_pre_hook(gathered))
    # the lean context releases its keys on exit; its own hooks are shadowed by the counting ones, which call it first
    with hooks(handles), torch.enable_grad(), lean_saved_tensors() as saved, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with (
            autocast(precision, model_device(model)),
            record_stream(model, points or [], stop=points is not None),
            stop_at_head(model, head) as hidden,
        ):
            logits = forward_until(lambda: logits_of(call_model(model, sample)))
            if logits is not None:
                out.logits_numel, out.logits_bytes = logits.numel(), logits.numel() * logits.element_size()
                del logits
        if hidden[0] is not None:
            out.hidden_numel, out.vocab = hidden[0].numel(), model.get_submodule(head).out_features
    return out


def probe_activations(
    model: nn.Module,
    blocks: list[nn.Module],
    sample: Mapping[str, torch.Tensor],
    trainable: set[str],
    precision: str = "fp32",
    stop_points: list | None = None,
    head: str | None = None,
) -> ActivationProbe:
    """Run ``model`` with gradients on (only ``trainable`` parameters requiring them, as in healing),
    under the run's autocast, and count what autograd stores; the model's state and modes are left
    unchanged. ``sample`` holds one or two samples: with two, the per-sample and the fixed part are
    told apart from the difference of a one- and a two-sample pass. ``stop_points``: end the pass
    once those stream points are read (the head is skipped in healing), so the head is not counted;
    ``head``: end it at that head's input (the loss applies the head in chunks, ``heal.vocab``).
    """
    from starfish.nn.batch import batch_len

    modes = {m: m.training for m in model.modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    try:
        one = _count_saved(model, blocks, select(sample, slice(0, 1)), precision, stop_points, head)
        two = _count_saved(model, blocks, sample, precision, stop_points, head) if batch_len(sample) > 1 else None
    finally:
        for m, mode in modes.items():
            m.training = mode
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
    if two is None:  # one sample: everything counts as per sample (an over-estimate of the fixed part)
        return ActivationProbe(
            one.total, one.per_block, one.outputs, one.logits_numel, 0, [0] * len(blocks), one.inputs, one.logits_bytes, one.hidden_numel,
            one.vocab, one.largest, one.recomputed,
        )
    per_sample = max(two.total - one.total, 0)
    per_block = [max(b2 - b1, 0) for b1, b2 in zip(one.per_block, two.per_block)]
    return ActivationProbe(
        per_sample,
        per_block,
        one.outputs,
        one.logits_numel,
        max(one.total - per_sample, 0),
        [max(b1 - b, 0) for b1, b in zip(one.per_block, per_block)],
        one.inputs,
        one.logits_bytes,
        one.hidden_numel,
        one.vocab,
        [l2 - l1 if l2 > l1 else l1 for l1, l2 in zip(one.largest, two.largest)],
        [max(r2 - r1, 0) for r1, r2 in zip(one.recomputed, two.recomputed)],
    )


def sample_of(calibration: Mapping[str, torch.Tensor], model: nn.Module, count: int = 1) -> dict[str, torch.Tensor]:
    from starfish.nn.batch import model_device

    return to_device(select(calibration, slice(0, count)), model_device(model))


def tensor_bytes(module: nn.Module, where: torch.device | None = None, local: bool = False) -> int:
    """Bytes of a module's parameters and buffers (only those on ``where`` when given); of the whole
    tensors, or with ``local`` of what this rank holds (a sharded weight's local shard)."""
    tensors = [local_view(t) if local else t for t in [*module.parameters(), *module.buffers()]]
    return sum(t.numel() * t.element_size() for t in tensors if where is None or _same_place(t.device, where))


@dataclass(frozen=True)
class Parallelism:
    """How healing is spread over processes, which decides what one rank holds.

    ``single``: one process; ``ddp``: every rank a full replica, each batch split over the ranks;
    ``fsdp``: weights, gradients and optimizer state sharded over the ranks (FSDP2).
    ``teacher_replicated`` (fsdp): only the student is sharded and the dense teacher is a full
    replica on every rank (a compare grid, which prunes every grid point from it)."""

    mode: str = "single"
    ranks: int = 1
    teacher_replicated: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("single", "ddp", "fsdp") or self.ranks < 1 or (self.mode == "single" and self.ranks != 1):
            raise StarfishError(f"parallelism must be single (1 rank), ddp or fsdp with ranks >= 1; got {self.mode} x {self.ranks}.")

    @classmethod
    def of(cls, model: nn.Module, teacher: nn.Module | None = None) -> "Parallelism":
        """FSDP2 over the mesh of the model's sharded weights, else one process; with FSDP2, whether
        ``teacher`` (when given) is left unsharded."""
        for p in model.parameters():
            if is_sharded(p):
                replicated = teacher is not None and not any(is_sharded(q) for q in teacher.parameters())
                return cls("fsdp", p.device_mesh.size(), replicated)
        return cls()

    def local_batch(self, batch: int) -> int:
        """The largest share of a global batch one rank computes."""
        return math.ceil(batch / self.ranks)

    def sharded(self, nbytes: int) -> int:
        """What one rank holds of state that FSDP splits over the ranks (all of it otherwise)."""
        return math.ceil(nbytes / self.ranks) if self.mode == "fsdp" else nbytes

    def describe(self) -> str:
        teacher = ", teacher replicated" if self.teacher_replicated else ""
        return "one process" if self.mode == "single" else f"{self.mode} over {self.ranks} ranks{teacher}, per rank"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "ranks": self.ranks, **({"teacher": "replicated"} if self.teacher_replicated else {})}


def _same_place(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


@dataclass
class MemoryEstimate:
    """Planned bytes per part and place; ``available`` already counts what the models occupy there."""

    scope: str
    parallel: Parallelism = field(default_factory=Parallelism)
    parts: dict[str, tuple[str, int]] = field(default_factory=dict)  # part -> (place, bytes)
    available: dict[str, int] = field(default_factory=dict)  # place -> bytes it may use
    limit_gb: float | None = None
    precision: str = "fp32"  # the autocast the activations were measured under
    checkpoint: bool = False  # per-block gradient checkpointing planned (joint scope)
    head_skipped: bool = False  # the forward stops after the last stream point (no logits)
    probe: ActivationProbe | None = field(default=None, repr=False)  # reused to re-plan without re-measuring
    held: set[str] = field(default_factory=set)  # parts already resident before healing starts (models, masks in place)
    # parts never alive together, so only the largest counts: gradients are cleared before each
    # forward pass and filled while the backward pass frees the activations
    overlap: tuple[str, ...] = ()
    cache_dtype: str = "float16"  # the (resolved) storage dtype of cached targets
    blockwise_possible: bool = False  # the objective aligns blocks, so --heal-scope blockwise applies

    def add(self, part: str, place: str, nbytes: int) -> None:
        self.parts[part] = (place, int(nbytes))

    def _sum(self, place: str, names: list[str]) -> int:
        at = [k for k in names if self.parts[k][0] == place]
        shared = [self.parts[k][1] for k in at if k in self.overlap]
        return sum(self.parts[k][1] for k in at) - (sum(shared) - max(shared) if shared else 0)

    def need(self, place: str) -> int:
        return self._sum(place, list(self.parts))

    def added(self, place: str) -> int:
        """What healing adds at ``place`` on top of what was resident when it started: the number to
        compare with a measured peak minus the memory held at the start of healing."""
        return self._sum(place, [k for k in self.parts if k not in self.held])

    def places(self) -> list[str]:
        return [p for p in dict.fromkeys(p for p, _ in self.parts.values()) if p != "disk"]

    def shortfall(self) -> tuple[str, int, int] | None:
        for place in self.places():
            if place in self.available and self.need(place) > self.available[place]:
                return place, self.need(place), self.available[place]
        return None

    def summary(self) -> str:
        needs = ", ".join(f"{self.need(p) / GB:.2f} GB on {p}" for p in self.places())
        disk = self.need("disk")
        if disk:
            needs += f", {disk / GB:.2f} GB on disk"
        free = ", ".join(f"{v / GB:.1f} GB on {k}" for k, v in self.available.items())
        ranks = f", {self.parallel.describe()}" if self.parallel.mode != "single" else ""
        return f"healing ({self.scope}{ranks}) plans {needs} (available: {free})"

    def to_dict(self) -> dict:
        return {
            "scope": self.scope,
            "parallel": self.parallel.to_dict(),
            "parts_mb": {k: {"place": p, "mb": b / 2**20} for k, (p, b) in self.parts.items()},
            "need_mb": {p: self.need(p) / 2**20 for p in [*self.places(), *(["disk"] if self.need("disk") else [])]},
            "added_mb": {p: self.added(p) / 2**20 for p in self.places()},
            "held_at_start": sorted(self.held),
            "not_at_once": list(self.overlap),
            "available_mb": {k: v / 2**20 for k, v in self.available.items()},
            "limit_gb": self.limit_gb,
            "precision": self.precision,
            "grad_checkpoint": self.checkpoint,
            "head_skipped": self.head_skipped,
            "activations": "measured: tensors saved for backward on one and two samples (per-sample part times "
            "the batch size, plus the fixed part); with checkpointing, the block inputs plus one block's internals",
        }

    def fixes(self) -> str:
        """The flags that shrink this plan, the cheapest first: only settings that differ from this
        run's and can work for this model (a float32 cache shrinks with ``auto``, which picks float16
        only when the dense activations fit it; block-wise scope only for block objectives)."""
        flags = [CHECKPOINT_FLAG] if self.scope == "joint" and not self.checkpoint else []
        flags += [PRECISION_FLAG] if self.precision == "fp32" else []
        if self.cache_part() is not None:
            flags += ["--cache-dtype auto"] if self.cache_dtype == "float32" else []
            flags += ["--cache-device disk", "--recompute-targets"]
        flags += ["--heal-scope blockwise"] if self.scope == "joint" and self.blockwise_possible else []
        return ", ".join(flags + ["a smaller --batch-size"])

    def cache_part(self) -> str | None:
        return next((k for k in self.parts if k in ("dense targets", "block inputs and targets") and self.parts[k][0] != "disk"), None)

    def check(self) -> None:
        """Refuse, in one line naming the fixes, a run that would run out of memory halfway."""
        short = self.shortfall()
        if short is None:
            return
        place, need, have = short
        cap = f" (capped by --memory-limit-gb {self.limit_gb:g})" if self.limit_gb is not None else ""
        biggest = max(((k, b) for k, (p, b) in self.parts.items() if p == place), key=lambda kv: kv[1])
        raise StarfishError(
            f"healing needs about {need / GB:.2f} GB on {place} but {have / GB:.2f} GB is available{cap} "
            f"(largest part: {biggest[0]} {biggest[1] / GB:.2f} GB); reduce it with {self.fixes()}."
        )


def place_name(device: torch.device | str) -> str:
    device = torch.device(device) if not isinstance(device, torch.device) else device
    return "cpu" if device.type == "cpu" else str(device)


def availability(places: list[str], models: list[nn.Module], limit_gb: float | None) -> dict[str, int]:
    """Free bytes per place plus what the models already occupy there (they are part of the plan)."""
    out: dict[str, int] = {}
    for place in places:
        device = torch.device(place)
        if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
            # no query possible (other backends; a plan for GPUs made on a machine without one): only a limit applies
            if limit_gb is not None:
                out[place] = int(limit_gb * GB)
            continue
        free = free_device_bytes(device) + sum(tensor_bytes(m, device, local=True) for m in models)
        out[place] = min(free, int(limit_gb * GB)) if limit_gb is not None else free
    return out


def _trainable_bytes(module: nn.Module, names: list[str], kept: Mapping[str, int] | None = None) -> int:
    """Bytes of the weights ``names``; with ``kept``, of their surviving entries only (a best-weights copy)."""
    params = dict(module.named_parameters())
    kept = kept or {}
    return sum(kept.get(k, params[k].numel()) * params[k].element_size() for k in names if k in params)


def _gathered_bytes(model: nn.Module, blocks: list[nn.Module]) -> int:
    """What FSDP2 gathers at once: the root's own parameters (embeddings, head) for the whole
    forward and backward, plus the computing block and the prefetched next one."""
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_blocks)
    largest = max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks), default=0)
    return root + 2 * largest


def estimate_heal_memory(
    dense: nn.Module,
    sparse: nn.Module,
    mask_names: list[str],
    calibration: Mapping[str, torch.Tensor],
    config,
    objective,
    block_names: list[str],
    device: torch.device,
    cache_place: str,
    *,
    precision: str = "fp32",
    checkpoint: bool = False,
    points: list | None = None,
    probe: ActivationProbe | None = None,
    parallel: Parallelism | None = None,
    head: str | None = None,
    kept: Mapping[str, int] | None = None,
) -> MemoryEstimate:
    """The memory plan of ``heal`` for this config, before anything is moved or trained.

    ``precision``: the resolved autocast (activations are measured under it); ``checkpoint``: per-block
    gradient checkpointing in joint scope; ``points``: the stream points, given when the objective
    reads no logits so the head is skipped (and not counted); ``probe``: a measurement from an
    earlier plan of the same run (``plan.probe``), to re-plan without running the model again;
    ``parallel``: the plan is per rank (default: FSDP2 when the weights are sharded, else one process);
    ``head``: the causal LM head the loss applies in chunks of tokens (``heal.vocab``), so no
    (tokens x vocabulary) logits are held or cached, only the final hidden state and one chunk;
    ``kept``: surviving entries per masked weight, for the best-weights copies that hold only those
    (``heal.training.WeightSnapshot``; default: whole weights, as for sharded ones).
    """
    from starfish.nn.batch import batch_len, model_device
    from starfish.heal.precision import AUTOCAST_DTYPES
    from starfish.heal.targets import CACHE_DTYPES

    parallel = parallel or Parallelism.of(sparse, dense)
    n = batch_len(calibration)
    batch = parallel.local_batch(min(config.batch_size, n))
    compute = place_name(device)
    home = place_name(model_device(sparse))  # where the models stay in block-wise healing
    cache = "disk" if cache_place == "disk" else place_name(cache_place)
    host_copy = "cpu" if device.type != "cpu" else compute
    cache_size = torch.tensor([], dtype=CACHE_DTYPES.get(config.cache_dtype, torch.float16)).element_size()  # auto: 2 bytes either way
    optimizer_slots = 1 if config.optimizer == "sgd" else 2
    blocks = [sparse.get_submodule(b) for b in block_names]
    skip_head = bool(points) and not objective.needs_logits
    if probe is None:
        sample = sample_of(calibration, sparse, count=2)
        probe = probe_activations(sparse, blocks, sample, set(mask_names), precision, points if skip_head else None, head)
    checkpoint = checkpoint and config.scope == "joint"
    models = [dense, sparse] if objective.needs_dense else [sparse]
    plan = MemoryEstimate(config.scope, parallel, limit_gb=config.memory_limit_gb, precision=precision, checkpoint=checkpoint,
                          head_skipped=skip_head, probe=probe, cache_dtype=config.cache_dtype,
                          blockwise_possible=objective.needs_blocks and not objective.uses_labels)
    shard = parallel.sharded
    float_size = 4

    if config.scope == "blockwise":
        prefixes = [b + "." for b in block_names]
        per_block = [[k for k in mask_names if k.startswith(p)] for p in prefixes]
        largest = max(range(len(blocks)), key=lambda i: tensor_bytes(blocks[i])) if blocks else 0
        train = _trainable_bytes(sparse, per_block[largest]) if blocks else 0
        numel = sum(sparse.get_parameter(k).numel() for k in per_block[largest]) if blocks else 0
        plan.add("weights (both models, staying in place)", home, sum(tensor_bytes(m) for m in models))
        if home != compute:  # otherwise the blocks train where they are: no copies
            plan.add("one dense + one sparse block", compute, 2 * tensor_bytes(blocks[largest]) if blocks else 0)
            plan.add("masks", compute, numel)  # boolean; gradients are masked in place, no float copies
        plan.add("gradients", compute, train)  # created while the block's saved tensors are still held: not overlapped
        plan.add("optimizer state", compute, optimizer_slots * train)
        stream = max(probe.block_output_numel, default=0)
        # the step's block input and dense target read in float32, its output, and the float32 copies the
        # loss keeps for backward (``Objective.saved_block_copies``: none for the cosine, the difference for nmse)
        plan.add("activations", compute, probe.block_step(batch) + (3 + objective.saved_block_copies) * stream * batch * float_size)
        copies = 3 if config.blockwise_inputs == "sparse" else 2  # dense stream, targets (+ sparse stream)
        plan.add("block inputs and targets", cache, copies * n * stream * cache_size)
        plan.add("best-weights copy", host_copy, _trainable_bytes(sparse, per_block[largest], kept) if blocks else 0)
    else:
        train = _trainable_bytes(sparse, mask_names)
        numel = sum(sparse.get_parameter(k).numel() for k in mask_names)
        if parallel.teacher_replicated and objective.needs_dense:  # a compare grid's full teacher on every rank
            plan.add("weights", compute, shard(tensor_bytes(sparse)) + tensor_bytes(dense))
        else:
            plan.add("weights", compute, shard(sum(tensor_bytes(m) for m in models)))
        if parallel.mode == "fsdp":
            plan.add("gathered units (root + 2 blocks)", compute, _gathered_bytes(sparse, blocks))
        plan.add("optimizer state", compute, shard(optimizer_slots * train))
        if parallel.mode == "fsdp":  # boolean shards beside the weights; the full masks stay on the host
            plan.add("masks", compute, shard(numel))
            plan.add("full masks", "cpu", numel)
        else:  # boolean masks; gradients are masked in place after backward, so no float copies
            plan.add("masks", compute, numel)
        final = probe.hidden_numel or probe.logits_numel  # what stands for the logits: the hidden state, or the logits
        block_numel = sum(probe.block_output_numel) if objective.needs_blocks else 0
        final_numel = final if objective.needs_logits else 0
        per_sample_targets = block_numel + final_numel
        plan.add("gradients", compute, shard(train))
        # besides what the model saves: the batch's targets (block outputs in the cache's dtype, the final
        # state in float32: ``TargetCache.get``), the float32 copies of every aligned block output the loss
        # keeps for backward (``Objective.saved_block_copies``) and its temporaries on one block at a time,
        # two float32 copies of the final hidden state the loss applies the head to, and the backward's
        # transient (``ActivationProbe.step_transient``)
        block_loss = objective.saved_block_copies * block_numel + (LOSS_TEMPORARIES * max(probe.block_output_numel, default=0) if block_numel else 0)
        targets_read = block_numel * cache_size + final_numel * float_size
        extra = (targets_read + (block_loss + 2 * (probe.hidden_numel if objective.needs_logits else 0)) * float_size) * batch + probe.step_transient(batch)
        plan.add("activations", compute, probe.activations(batch, checkpoint) + extra)
        plan.overlap = ("gradients", "activations")
        if probe.logits_bytes:  # the head's output, held until the loss is computed
            plan.add("logits", compute, probe.logits_bytes * batch)
        if probe.hidden_numel and objective.needs_logits:
            from starfish.heal.vocab import chunk_peak_bytes

            tokens = probe.hidden_numel // max(1, sparse.get_submodule(head).in_features) * batch
            plan.add("vocabulary chunks", compute, chunk_peak_bytes(probe.vocab, tokens))
            if precision in AUTOCAST_DTYPES:  # student and teacher head cast once per loss (heal.vocab.chunked_kl)
                size = torch.tensor([], dtype=AUTOCAST_DTYPES[precision]).element_size()
                plan.add("heads in the autocast dtype", compute, 2 * sum(p.numel() for p in sparse.get_submodule(head).parameters()) * size)
        if objective.needs_dense and not config.recompute_targets:
            plan.add("dense targets", cache, n * per_sample_targets * cache_size)
        snapshot = shard(_trainable_bytes(sparse, mask_names, None if parallel.mode == "fsdp" else kept))
        plan.add("best-weights copy", host_copy, snapshot)
        if config.budget == "auto":  # the held-out monitor keeps its own best weights beside the divergence guard's copy
            plan.add("held-out best-weights copy", host_copy, snapshot)
    if compute == "cpu":
        plan.add("runtime (autograd engine, thread pools, allocator arenas)", compute, CPU_RUNTIME_BYTES)
    if home == compute:  # the models (and their masks) already sit where healing computes
        plan.held = {"weights", "weights (both models, staying in place)", "masks"} & set(plan.parts)
    plan.available = availability(plan.places(), models, config.memory_limit_gb)
    return plan
