"""Distillation over a language model's vocabulary, a chunk of tokens at a time.

A causal LM's logits are (batch, tokens, vocabulary): at 8 x 512 tokens and a 262k vocabulary one
float32 copy is 4.3 GB, and a plain KL loss holds several (student logits, their log-softmax, the
teacher's, the gradient). Here neither model's forward pass runs its head: both stop at the head's
input (the final hidden state, ``head_route``), the dense one is cached as that small hidden state
instead of logits, and the loss applies each model's head to ``chunk_tokens`` tokens at a time.
Every chunk runs under ``torch.utils.checkpoint``, so autograd keeps only the chunk's hidden states
and the backward pass recomputes one chunk's logits at a time: at most one chunk's full-vocabulary
logits (student and teacher) are alive at any moment. The loss equals the unchunked one up to float
rounding (tested).

A head counts as a plain linear map only after checking it on real inputs: models that post-process
logits (soft-capping, scaling) keep the full-logits path.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from starfish.nn.hooks import hooks

CHUNK_BYTES = 16 * 2**20  # float32 logits of one chunk for one model
CHUNK_COPIES = 6  # chunk-sized tensors alive at the peak of the recomputed backward: logits, log-softmaxes, KL terms, gradients
# (measured: 6 on a tiny Llama whose chunks dominate its peak, tests/test_memory_plan_accuracy.py)


def chunk_tokens(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one model's float32 logits of a chunk take about ``budget`` bytes."""
    return max(1, budget // (4 * max(1, vocab)))


def chunk_peak_bytes(vocab: int, tokens: int) -> int:
    """What the chunked loss holds at its peak beyond the hidden states (for the memory plan)."""
    return CHUNK_COPIES * min(tokens, chunk_tokens(vocab)) * vocab * 4


def output_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """(name, module) of a causal LM's linear output head (Hugging Face ``get_output_embeddings``)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Linear):
        return None
    name = next((n for n, m in model.named_modules() if m is head), None)
    return (name, head) if name else None


@torch.no_grad()
def head_route(model: nn.Module, sample: dict) -> str | None:
    """The head's module name when the model's logits are exactly ``head(hidden)`` on ``sample``
    (so the loss may apply the head itself, chunk by chunk), else None (full logits)."""
    from starfish.nn.batch import call_model
    from starfish.tasks.evaluate import logits_of

    from starfish.masks import is_sharded

    found = output_head(model)
    if found is None or any(is_sharded(p) for p in found[1].parameters()):  # FSDP2 gathers a head only inside the root forward
        return None
    name, head = found
    seen: list[torch.Tensor] = []
    with hooks(head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))):
        logits = logits_of(call_model(model, sample))
    if len(seen) != 1 or logits is None or logits.dim() != 3:
        return None
    try:
        own = head(seen[0]).float()
    except RuntimeError:  # a head whose weights live only inside the model's forward (FSDP2 shards): full logits
        return None
    return name if torch.allclose(own, logits.float(), rtol=1e-4, atol=1e-4) else None


def _scaled(logits: torch.Tensor, t: float) -> torch.Tensor:
    return logits if t == 1 else logits / t  # at T = 1 a division would only cost a pass over the chunk


def _head_weights(head: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias in ``dtype`` (a cast autograd follows when the head trains)."""
    bias = head.bias.to(dtype) if head.bias is not None else None
    return head.weight.to(dtype), bias


def _log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: float) -> torch.Tensor:
    """Float32 log-softmax at temperature ``t`` of one head's logits, the product in the weight's dtype."""
    return F.log_softmax(_scaled(F.linear(hidden.to(weight.dtype), weight, bias).float(), t), dim=-1)


def _chunk_kl(
    student: torch.Tensor, teacher: torch.Tensor, student_w: torch.Tensor, student_b: torch.Tensor | None, teacher_w: torch.Tensor,
    teacher_b: torch.Tensor | None, t: float,
) -> torch.Tensor:
    """Per-token KL(teacher || student) of one chunk of hidden states, both heads applied here (their
    products in the weights' dtype, the softmaxes in float32)."""
    log_q = _log_probs(student, student_w, student_b, t)
    with torch.no_grad():
        log_p = _log_probs(teacher, teacher_w, teacher_b, t)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def chunked_kl(
    student: torch.Tensor, teacher: torch.Tensor, student_head: nn.Module, teacher_head: nn.Module, temperature: float,
    tokens: int | None = None, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-position KL(softmax(teacher/T) || softmax(student/T)), shape student.shape[:-1], computed
    over ``tokens`` positions at a time (default: ``chunk_tokens`` of the head's vocabulary).

    ``dtype``: what the heads' matrix products run in, the run's autocast dtype (default: the heads'
    own). The heads are cast once per call, not once per chunk; log-softmax and KL stay float32. On
    SmolLM2-135M (49k vocabulary), 48 bf16 kd steps of batch 2 took 302 s with bf16 head products
    against 357 s with float32 ones, at the same held-out perplexity (``benchmarks/LM_HEALER_SEARCH.md``).
    """
    shape = student.shape[:-1]
    flat_s, flat_t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    step = tokens or chunk_tokens(student_head.out_features)
    student_w, student_b = _head_weights(student_head, dtype or student_head.weight.dtype)
    with torch.no_grad():
        teacher_w, teacher_b = _head_weights(teacher_head, dtype or teacher_head.weight.dtype)
    parts = []
    for start in range(0, flat_s.shape[0], step):
        s, t = flat_s[start : start + step], flat_t[start : start + step]
        args = (s, t, student_w, student_b, teacher_w, teacher_b, temperature)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_kl, *args, use_reentrant=False))
        else:
            parts.append(_chunk_kl(*args))
    return torch.cat(parts).reshape(shape)


@contextmanager
def stop_at_head(model: nn.Module, name: str | None) -> Iterator[list[torch.Tensor | None]]:
    """While open, a forward pass of ``model`` ends (``StopForward``) when it reaches head ``name``;
    the yielded list then holds the head's input. A no-op for ``name`` None."""
    from starfish.nn.blockio import StopForward

    slot: list[torch.Tensor | None] = [None]
    if name is None:
        yield slot
        return

    def grab(_m, args):
        slot[0] = args[0]
        raise StopForward

    with hooks(model.get_submodule(name).register_forward_pre_hook(grab)):
        yield slot
