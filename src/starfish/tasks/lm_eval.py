"""Perplexity of causal language models, and how far a sparse model drifts from its dense one.

Streamed over evaluation windows: each window is run through every model once and reduced to
per-token sums before the next window, so no full-vocabulary output is ever kept. Every predicted
token counts once: position t predicts token t+1, and a prediction counts only when both positions
are real (``attention_mask`` 1), so padding never counts.

* perplexity = exp(mean next-token negative log-likelihood over all predicted tokens); ``inf``, with
  a ``perplexity_note`` saying why, where exp() overflows;
* against the reference model (the dense one), on the same tokens: top-1 agreement (how often both
  predict the same next token) and KL(reference || model), in nats per token.
"""

from __future__ import annotations

import math
import sys
from typing import Iterable, Mapping

import torch
from torch import nn
import torch.nn.functional as F

from starfish.nn.batch import ATTENTION, TOKENS, call_model, to_device
from starfish.distributed.context import is_writer, sum_floats
from starfish.distributed.shares import is_padding
from starfish.errors import StarfishError

POSITION_CHUNK = 512  # positions turned into log-probabilities at a time (bounds the vocab-wide temporaries)


def _logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = call_model(model, batch)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise StarfishError(f"{type(model).__name__} returned {type(out).__name__} without logits; pass a causal LM.")
    return logits


def predicted_weights(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(N, L-1) weights of the next-token predictions that count (both positions real)."""
    ids = batch[TOKENS]
    mask = batch.get(ATTENTION)
    if mask is None:
        return torch.ones(ids.shape[0], ids.shape[1] - 1, device=ids.device)
    mask = mask.float()
    return mask[:, 1:] * mask[:, :-1]


class _Totals:
    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0.0
        self.agree = 0.0
        self.kl = 0.0

    def gather(self) -> None:
        """Sum over ranks (each scored its share of the windows; a no-op alone)."""
        self.nll, self.tokens, self.agree, self.kl = sum_floats(self.nll, self.tokens, self.agree, self.kl)

    def metrics(self, compared: bool) -> dict[str, float]:
        mean_nll = self.nll / self.tokens if self.tokens else float("nan")
        out = {"perplexity": perplexity(mean_nll), "nll": mean_nll, "tokens": int(self.tokens)}
        if out["perplexity"] == math.inf:
            out["perplexity_note"] = (
                f"mean next-token NLL {mean_nll:.4g} nats is beyond exp()'s range: the model is broken or diverged"
            )
        if compared:
            out["top1_agreement"] = self.agree / self.tokens if self.tokens else float("nan")
            out["kl_from_reference"] = self.kl / self.tokens if self.tokens else float("nan")
        return out


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL); ``inf`` where that overflows (a mean NLL above ~709 nats: a broken model),
    so a run reports it instead of crashing at its final scoring."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def _accumulate(
    totals: _Totals, logp: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, ref_logp: torch.Tensor | None
) -> None:
    """Add one chunk of positions: ``logp`` (n, V) log-probabilities, ``targets``/``weights`` (n,)."""
    nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    totals.nll += float((nll * weights).sum())
    totals.tokens += float(weights.sum())
    if ref_logp is not None:
        totals.agree += float(((logp.argmax(1) == ref_logp.argmax(1)).float() * weights).sum())
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(1)
        totals.kl += float((kl * weights).sum())


@torch.no_grad()
def evaluate_lm(
    models: Mapping[str, nn.Module],
    windows: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str,
    reference: str | None = "dense",
) -> dict[str, dict[str, float]]:
    """Per label: perplexity, mean NLL and token count; for every model other than ``reference``
    (when that label is present) also top-1 agreement and KL(reference || model).

    ``windows`` are text batches (``{"input_ids", "attention_mask"}``, e.g. ``TextWindows``);
    the models must already sit on ``device`` and are put in eval mode.
    """
    if not models:
        raise StarfishError("evaluate_lm needs at least one model.")
    ref = reference if reference in models else None
    order = ([ref] if ref else []) + [k for k in models if k != ref]
    totals = {k: _Totals() for k in order}
    for m in models.values():
        m.eval()
    for batch in windows:
        padding = is_padding(batch)
        batch = to_device(batch, device)
        if padding:  # only keeps this rank in step with the others (FSDP): every model runs, nothing counts
            for label in order:
                _logits(models[label], batch)
            continue
        weights = predicted_weights(batch).reshape(-1)
        targets = batch[TOKENS][:, 1:].reshape(-1)
        ref_logits = None
        for label in order:
            logits = _logits(models[label], batch)[:, :-1]
            logits = logits.reshape(-1, logits.shape[-1])
            if label == ref:
                ref_logits = logits
            for lo in range(0, targets.numel(), POSITION_CHUNK):
                hi = lo + POSITION_CHUNK
                logp = F.log_softmax(logits[lo:hi].float(), dim=-1)
                ref_logp = None
                if ref_logits is not None and label != ref:
                    ref_logp = F.log_softmax(ref_logits[lo:hi].float(), dim=-1)
                _accumulate(totals[label], logp, targets[lo:hi], weights[lo:hi], ref_logp)
            del logits
        del ref_logits
    for k in order:
        totals[k].gather()
    scores = {k: totals[k].metrics(compared=ref is not None and k != ref) for k in models}
    for label, metrics in scores.items():
        if "perplexity_note" in metrics and is_writer():
            sys.stderr.write(f"starfish: warning: perplexity of {label} is inf: {metrics['perplexity_note']}.\n")
    return scores
