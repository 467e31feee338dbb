"""Classification: top-1 against labels, and agreement and KL(reference || model) with the reference.

Metrics are accumulated batch by batch; only the reference model's class logits are kept
((N, classes) floats, small), so later models are compared with it without running it again.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from starfish.nn.batch import LABELS, Batch, call_model, model_device, to_device
from starfish.distributed.context import sum_floats
from starfish.distributed.shares import is_padding
from starfish.errors import StarfishError
from starfish.tasks.evaluate import kl_rows, logits_of
from starfish.tasks.base import TASKS, Task


class _Tally:
    """Running sums of one model's metrics over the batches seen so far."""

    def __init__(self) -> None:
        self.seen = self.known = self.correct = self.agree = 0
        self.kl = 0.0
        self.compared = False

    def add(self, logits: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None) -> None:
        pred = logits.argmax(1)
        self.seen += logits.shape[0]
        if labels is not None:
            known = labels >= 0
            self.known += int(known.sum())
            self.correct += int((pred[known] == labels[known]).sum())
        if reference is not None:
            self.compared = True
            self.agree += int((pred == reference.argmax(1)).sum())
            self.kl += float(kl_rows(reference, logits).sum())

    def gather(self) -> None:
        """Sum the tallies over ranks (each scored its share of the evaluation set; a no-op alone)."""
        self.seen, self.known, self.correct, self.agree, self.kl = sum_floats(self.seen, self.known, self.correct, self.agree, self.kl)
        self.seen, self.known, self.correct, self.agree = int(self.seen), int(self.known), int(self.correct), int(self.agree)

    def metrics(self, is_reference: bool) -> dict:
        out: dict = {"top1": self.correct / self.known if self.known else None, "samples": self.seen}
        if self.compared and not is_reference:
            out["agreement"] = self.agree / self.seen
            out["kl"] = self.kl / self.seen
        return out


@TASKS.register("classification")
class Classification(Task):
    name = "classification"
    remembers_reference = True

    def __init__(self) -> None:
        self.reference_logits: dict[str, torch.Tensor] = {}

    def has_reference(self, label: str) -> bool:
        return label in self.reference_logits

    @torch.no_grad()
    def evaluate(
        self,
        models: Mapping[str, nn.Module],
        batches: Iterable[Batch],
        reference: str | None = "dense",
        device: torch.device | None = None,
    ) -> dict[str, dict]:
        modes = {label: m.training for label, m in models.items()}
        for m in models.values():
            if device is not None:
                m.to(device)
            m.eval()
        tallies = {label: _Tally() for label in models}
        fresh = reference in models
        stored = None if fresh or reference is None else self.reference_logits.get(reference)
        kept: list[torch.Tensor] = []
        offset = 0
        try:
            for batch in batches:
                labels = batch.get(LABELS)
                labels = labels.long() if labels is not None else None
                outputs = {}
                for label, model in models.items():
                    moved = to_device(batch, device or model_device(model), non_blocking=True)
                    outputs[label] = logits_of(call_model(model, moved)).float().cpu()
                if is_padding(batch):  # only keeps this rank in step with the others (FSDP)
                    continue
                n = next(iter(outputs.values())).shape[0]
                ref = outputs[reference] if fresh else (stored[offset : offset + n] if stored is not None else None)
                if fresh:
                    kept.append(ref)
                for label, logits in outputs.items():
                    tallies[label].add(logits, labels, ref if label != reference else None)
                offset += n
        finally:
            for label, m in models.items():
                m.train(modes[label])
        if stored is not None and offset != stored.shape[0]:
            raise StarfishError(f"the evaluation set changed between passes ({stored.shape[0]} then {offset} samples).")
        if fresh and kept:
            self.reference_logits[reference] = torch.cat(kept)
        for tally in tallies.values():
            tally.gather()
        return {label: t.metrics(label == reference) for label, t in tallies.items()}
