"""Class logits of a model on a dataset (streamed in batches), and top-1 / agreement / KL from them.

The pipeline scores models through ``starfish.tasks`` (which never keeps more than the reference's
logits); ``predict`` is the small public helper that returns one model's logits and labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from starfish.nn.batch import LABELS, call_model, to_device
from starfish.nn.device import resolve_device
from starfish.data.loading import stream


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
    """Logits and labels of ``model`` on ``data`` (dict items or (x, y) pairs), one batch at a time."""
    from tqdm.auto import tqdm

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    model.to(device).eval()
    logits, labels = [], []
    for batch in tqdm(stream(data, batch_size, workers, device), desc=desc, disable=desc is None, leave=False):
        logits.append(logits_of(call_model(model, to_device(batch, device, non_blocking=True))).float().cpu())
        labels.append(batch[LABELS].long() if LABELS in batch else torch.full((logits[-1].shape[0],), -1))
    return Predictions(torch.cat(logits), torch.cat(labels).long())


def top1(pred: Predictions) -> float | None:
    known = pred.labels >= 0
    if not bool(known.any()):
        return None
    return (pred.logits[known].argmax(1) == pred.labels[known]).float().mean().item()


def agreement(pred: Predictions, reference: Predictions) -> float:
    """Fraction of images where the model's top-1 class equals the reference model's."""
    return (pred.logits.argmax(1) == reference.logits.argmax(1)).float().mean().item()


def kl_rows(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(reference || model) of the softmax outputs over the last dimension, in nats."""
    log_p = F.log_softmax(reference_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_divergence(reference: Predictions, pred: Predictions) -> float:
    """Mean KL(reference || model) of the softmax outputs, in nats."""
    return kl_rows(reference.logits, pred.logits).mean().item()


def summarize(pred: Predictions, reference: Predictions | None = None) -> dict:
    out: dict = {"top1": top1(pred)}
    if reference is not None:
        out["agreement"] = agreement(pred, reference)
        out["kl"] = kl_divergence(reference, pred)
    return out
