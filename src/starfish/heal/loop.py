"""One training loop for every healer: dense targets cached once, masked Adam, cosine LR per step.

Only the surviving entries of the prunable weights train. Gradients are multiplied by the mask and
the mask is re-applied after every optimizer step, so pruned entries stay exactly zero.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from starfish.device import peak_memory_mb, reset_peak_memory, resolve_device
from starfish.errors import StarfishError
from starfish.evaluate import logits_of
from starfish.heal.capture import record_stream
from starfish.heal.config import HealConfig
from starfish.heal.objectives import Objective, Signals, get_objective
from starfish.masks import Masks
from starfish.structure import StreamPoint, stream_points

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class HealResult:
    healer: str
    steps: int
    seconds: float
    peak_memory_mb: float
    memory_measure: str
    uses_labels: bool
    loss_history: list[float] = field(default_factory=list)  # one value per optimizer step
    lr_history: list[float] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    points: list[str] = field(default_factory=list)  # where each block's stream was read

    def to_dict(self) -> dict:
        return {
            "healer": self.healer,
            "steps": self.steps,
            "seconds": self.seconds,
            "peak_memory_mb": self.peak_memory_mb,
            "memory_measure": self.memory_measure,
            "uses_labels": self.uses_labels,
            "blocks": self.blocks,
            "points": self.points,
            "loss_first": self.loss_history[0] if self.loss_history else None,
            "loss_last": self.loss_history[-1] if self.loss_history else None,
        }


def _as_tensors(calibration: Dataset | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(calibration, torch.Tensor):
        return calibration, None
    if isinstance(calibration, TensorDataset):
        x = calibration.tensors[0]
        y = calibration.tensors[1] if len(calibration.tensors) > 1 else None
        return x, y
    items = [calibration[i] for i in range(len(calibration))]
    x = torch.stack([it[0] for it in items])
    y = torch.as_tensor([int(it[1]) for it in items]) if isinstance(items[0], (tuple, list)) else None
    return x, y


class _Runner:
    """Runs a model and returns the Signals an objective needs."""

    def __init__(self, model: nn.Module, points: list[StreamPoint]) -> None:
        self.model = model
        self.points = points

    def __call__(self, x: torch.Tensor) -> Signals:
        with record_stream(self.model, self.points) as slots:
            logits = logits_of(self.model(x))
        return Signals([s for s in slots if s is not None], logits)


def _optimizer(params: list[nn.Parameter], config: HealConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``, decaying to ``min_lr``."""
    if total <= 1:
        return lr
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * step / (total - 1)))


def heal(
    dense: nn.Module,
    sparse: nn.Module,
    masks: Masks,
    calibration: Dataset | torch.Tensor,
    config: HealConfig | None = None,
    block_pattern: str | None = None,
) -> HealResult:
    """Heal ``sparse`` in place against ``dense`` on unlabeled ``calibration`` images."""
    from tqdm.auto import tqdm

    config = (config or HealConfig()).validate()
    objective: Objective = get_objective(config.healer)
    device = resolve_device(config.device)
    x_all, y_all = _as_tensors(calibration)
    if objective.uses_labels and (y_all is None or bool((y_all < 0).any())):
        raise StarfishError(
            f"healer '{objective.name}' needs labelled calibration images; "
            "use a calibration folder with class sub-folders."
        )
    n = x_all.shape[0]
    if n == 0:
        raise StarfishError("the calibration set is empty; pass at least one image.")

    points: list[StreamPoint] = []
    if objective.needs_blocks:  # where each block's residual stream is read, decided on one batch
        points = stream_points(dense, {"pixel_values": x_all[:2]}, block_pattern)
    block_names = [p.block for p in points]

    dense.to(device).eval()
    sparse.to(device)
    sparse.train(config.train_mode)
    if config.bn_mode == "train":  # pruning shifts every activation's statistics; let BN follow them
        for module in sparse.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
    masks = masks.to(device)
    masks.apply_(sparse)
    reset_peak_memory(device)
    started = time.perf_counter()

    dense_run = _Runner(dense, points)
    sparse_run = _Runner(sparse, points)
    cache_dtype = CACHE_DTYPES[config.cache_dtype]
    cache_device = torch.device(config.cache_device) if config.cache_device else device

    cache: Signals | None = None
    if objective.needs_dense and not config.recompute_targets:
        chunks: list[Signals] = []
        with torch.no_grad():
            for i in tqdm(range(0, n, config.batch_size), desc="caching dense targets", disable=not config.progress, leave=False):
                out = dense_run(x_all[i : i + config.batch_size].to(device))
                chunks.append(
                    Signals(
                        [b.to(cache_device, cache_dtype) for b in out.blocks],
                        out.logits.to(cache_device, cache_dtype),
                    )
                )
        cache = Signals(
            [torch.cat([c.blocks[j] for c in chunks]) for j in range(len(block_names))],
            torch.cat([c.logits for c in chunks]),
        )
        del chunks

    params = dict(sparse.named_parameters())
    trainable = [params[name] for name in masks.names()]
    was_trainable = {name: p.requires_grad for name, p in params.items()}
    for name, p in params.items():
        p.requires_grad_(name in masks)
    handles = masks.register_gradient_masks(sparse)
    optimizer = _optimizer(trainable, config)

    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    lrs: list[float] = []
    step = 0
    bar = tqdm(total=total, desc=f"healing ({objective.name})", disable=not config.progress, leave=False)
    try:
        while step < total:
            order = torch.randperm(n, generator=generator)
            for i in range(0, n, config.batch_size):
                if step >= total:
                    break
                idx = order[i : i + config.batch_size]
                x = x_all[idx].to(device)
                labels = y_all[idx].to(device) if y_all is not None else None
                if cache is not None:
                    cidx = idx.to(cache_device)
                    target = Signals([b[cidx].to(device) for b in cache.blocks], cache.logits[cidx].to(device))
                elif objective.needs_dense:
                    with torch.no_grad():
                        target = dense_run(x)
                else:
                    target = None
                lr = cosine_lr(step, total, config.lr, config.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = objective.loss(sparse_run(x), target, labels, config)
                if not torch.isfinite(loss):
                    raise StarfishError(
                        f"healing diverged at step {step} (loss {loss.item()}); lower --lr or check the inputs."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                masks.apply_(sparse)
                losses.append(float(loss.detach()))
                lrs.append(lr)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for name, p in params.items():
            p.requires_grad_(was_trainable[name])
        sparse.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak, measure = peak_memory_mb(device)
    return HealResult(objective.name, step, seconds, peak, measure, objective.uses_labels, losses, lrs, block_names, [p.describe() for p in points])
