"""Perplexity for causal language models, with agreement and KL against the dense model.

Full-vocabulary outputs are far too large to keep (a 2048-token window of a 49k-vocabulary model
is 400 MB in float32), so this task never remembers the reference: every call runs the dense model
beside the scored one on the same window (``starfish.tasks.lm_eval.evaluate_lm``).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from starfish.nn.batch import Batch, model_device
from starfish.tasks.lm_eval import evaluate_lm
from starfish.tasks.base import TASKS, Task


@TASKS.register("perplexity")
class Perplexity(Task):
    name = "perplexity"
    remembers_reference = False
    headline = "perplexity"
    higher_is_better = False

    def evaluate(
        self,
        models: Mapping[str, nn.Module],
        batches: Iterable[Batch],
        reference: str | None = "dense",
        device: torch.device | None = None,
    ) -> dict[str, dict]:
        first = next(iter(models.values()))
        device = device or model_device(first)
        for model in models.values():
            model.to(device)
        return evaluate_lm(models, batches, device, reference)
