"""Top-1 and agreement with the dense model, from logits computed once per model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from starfish.device import resolve_device


def logits_of(output: object) -> torch.Tensor:
    """Class scores from a forward pass: a tensor, a Hugging Face output's ``.logits``, or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


@dataclass
class Predictions:
    logits: torch.Tensor  # (N, classes), float32 on CPU
    labels: torch.Tensor  # (N,), -1 where unknown


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Dataset,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    desc: str | None = None,
    workers: int = 0,
) -> Predictions:
    from tqdm.auto import tqdm

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    model.to(device).eval()
    logits, labels = [], []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    for x, y in tqdm(loader, desc=desc, disable=desc is None, leave=False):
        logits.append(logits_of(model(x.to(device))).float().cpu())
        labels.append(torch.as_tensor(y))
    return Predictions(torch.cat(logits), torch.cat(labels).long())


def top1(pred: Predictions) -> float | None:
    known = pred.labels >= 0
    if not bool(known.any()):
        return None
    return (pred.logits[known].argmax(1) == pred.labels[known]).float().mean().item()


def agreement(pred: Predictions, reference: Predictions) -> float:
    """Fraction of images where the model's top-1 class equals the reference model's."""
    return (pred.logits.argmax(1) == reference.logits.argmax(1)).float().mean().item()


def kl_divergence(reference: Predictions, pred: Predictions) -> float:
    """Mean KL(reference || model) of the softmax outputs, in nats."""
    log_p = F.log_softmax(reference.logits, dim=1)
    log_q = F.log_softmax(pred.logits, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean().item()


def summarize(pred: Predictions, reference: Predictions | None = None) -> dict:
    out: dict = {"top1": top1(pred)}
    if reference is not None:
        out["agreement"] = agreement(pred, reference)
        out["kl"] = kl_divergence(reference, pred)
    return out
