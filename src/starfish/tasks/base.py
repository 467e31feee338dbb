"""An evaluation task scores models on streamed batches; the pipeline never assumes what it measures.

A task receives the models to score as ``{label: module}`` and one iterable of dict batches, runs
every model on each batch (so a metric that compares two models, such as KL(dense || sparse) over
a full vocabulary, can be computed batch by batch without storing outputs), and returns
``{label: {metric: value}}``. A task whose per-sample outputs are small (class logits) may
remember the reference model's outputs (``remembers_reference``), so the reference runs once per
evaluation set instead of once per scored model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Iterable, Mapping

import torch
from torch import nn

from starfish.nn.batch import Batch
from starfish.registry import Registry

TASKS: Registry[type["Task"]] = Registry("evaluation task", "--task")


class Task(ABC):
    """One way to score models (top-1 for classifiers, perplexity for language models, ...)."""

    name: ClassVar[str]
    # True when the task keeps the reference model's per-sample outputs between calls: later calls
    # may then omit the reference model. False: pass the reference model in every call.
    remembers_reference: ClassVar[bool] = False
    # The one number a table ranks models by, and its direction (compare bolds the best row by it).
    headline: ClassVar[str] = "top1"
    higher_is_better: ClassVar[bool] = True

    @abstractmethod
    def evaluate(
        self,
        models: Mapping[str, nn.Module],
        batches: Iterable[Batch],
        reference: str | None = "dense",
        device: torch.device | None = None,
    ) -> dict[str, dict]:
        """``{label: metrics}`` for every model, all run on the same batches in one pass."""

    def has_reference(self, label: str) -> bool:
        """Whether outputs of ``label`` from an earlier call are remembered."""
        return False


def get_task(name: str) -> Task:
    return TASKS.get(name)()


def list_tasks() -> list[str]:
    return TASKS.names()


class Evaluation:
    """One task on one evaluation set: score model after model against a reference model.

    ``batches`` opens a fresh pass over the evaluation data (a DataLoader); the reference model
    is passed along whenever the task has not remembered its outputs.
    """

    def __init__(
        self,
        task: Task,
        batches: Callable[[], Iterable[Batch]],
        reference_model: nn.Module,
        device: torch.device,
        reference: str = "dense",
    ) -> None:
        self.task = task
        self.batches = batches
        self.reference_model = reference_model
        self.device = device
        self.reference = reference
        self.scores: dict[str, dict] = {}

    def score(self, label: str, model: nn.Module) -> dict:
        """Metrics of ``model`` under ``label`` (kept in ``self.scores``)."""
        models = {label: model}
        if label != self.reference and not self.task.has_reference(self.reference):
            models = {self.reference: self.reference_model, label: model}
        result = self.task.evaluate(models, self.batches(), self.reference, self.device)
        self.scores.update(result)
        return result[label]
