"""Distillation over the vocabulary in chunks of tokens (heal.vocab): the same loss and gradients as
full logits, a head that post-processes its logits keeps the full path, and kd on a 200k-token
vocabulary heals within its memory plan without ever holding (tokens x vocabulary) logits."""

from __future__ import annotations

import pytest

import torch
from torch import nn

from lm_tiny import llama_config, randomly_pruned
from starfish.heal import HealConfig, heal
from starfish.heal.objectives import Signals, kd_loss
from starfish.heal.vocab import chunk_tokens, chunked_kl, head_route
from starfish.masks import Masks


def _llama(vocab: int, hidden: int = 32, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = llama_config(vocab)
    config.hidden_size, config.intermediate_size = hidden, 2 * hidden
    return LlamaForCausalLM(config).eval()


def _student(dense: nn.Module) -> tuple[nn.Module, Masks]:
    return randomly_pruned(dense)


def _hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model(**batch)
    finally:
        handle.remove()
    return seen[0]


def test_chunked_kd_matches_full_logits_in_loss_and_gradients():
    dense = _llama(300)
    sparse, _ = _student(dense)
    sparse.lm_head.weight.requires_grad_(True)  # the head's gradient must match too
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(1))
    weights = torch.ones(3, 11)
    weights[1, -4:] = 0  # padding does not count
    batch = {"input_ids": ids}
    config = type("C", (), {"temperature": 2.0})()
    with torch.no_grad():
        teacher_hidden = _hidden(dense, batch)
        teacher_logits = dense.lm_head(teacher_hidden)
    params = [p for p in sparse.parameters() if p.requires_grad]

    full = kd_loss(Signals([], sparse(**batch).logits, weights), Signals([], teacher_logits), None, config)
    full_grads = torch.autograd.grad(full, params)
    hidden = _hidden(sparse, batch)
    per_position = chunked_kl(hidden, teacher_hidden, sparse.lm_head, dense.lm_head, 2.0, tokens=7)  # 33 tokens: 5 chunks
    chunked = (per_position * weights).sum() / weights.sum() * 4.0
    chunked_grads = torch.autograd.grad(chunked, params)
    via_loss = kd_loss(Signals([], None, weights, _hidden(sparse, batch), sparse.lm_head), Signals([], None, hidden=teacher_hidden, head=dense.lm_head), None, config)

    assert torch.allclose(full, chunked, rtol=1e-5, atol=1e-7) and torch.allclose(full, via_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(full_grads, chunked_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert float(full.detach()) > 0


def test_chunked_kd_runs_the_heads_in_the_autocast_dtype_like_the_model_would():
    """``dtype=bfloat16`` (a bf16 run): the same loss as the full logits the model's own head makes under
    bf16 autocast, at 1 and 2 degrees of temperature, and the head's gradient still reaches a trained head."""
    dense = _llama(300)
    sparse, _ = _student(dense)
    sparse.lm_head.weight.requires_grad_(True)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        teacher_hidden = _hidden(dense, {"input_ids": ids})
    hidden = _hidden(sparse, {"input_ids": ids}).detach()
    for t in (1.0, 2.0):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            student_logits, teacher_logits = sparse.lm_head(hidden).float(), dense.lm_head(teacher_hidden).float()
        expected = torch.nn.functional.kl_div(
            torch.log_softmax(student_logits / t, -1), torch.log_softmax(teacher_logits / t, -1), reduction="none", log_target=True
        ).sum(-1)
        got = chunked_kl(hidden, teacher_hidden, sparse.lm_head, dense.lm_head, t, tokens=5, dtype=torch.bfloat16)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), t
        full32 = chunked_kl(hidden, teacher_hidden, sparse.lm_head, dense.lm_head, t, tokens=5)
        assert not torch.equal(got, full32)  # the products really ran in bf16
    (grad,) = torch.autograd.grad(got.sum(), [sparse.lm_head.weight])
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


class _ScaledLogits(nn.Module):
    """A causal LM whose logits are its head's output times 2 (like logit scaling or soft-capping)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.lm_head

    def forward(self, **batch):
        out = self.inner(**batch)
        out.logits = out.logits * 2
        return out


def test_the_head_is_left_to_the_loss_only_when_the_logits_are_exactly_its_output():
    model = _llama(50)
    batch = {"input_ids": torch.randint(0, 50, (2, 6))}
    assert head_route(model, batch) == "lm_head"
    assert head_route(_ScaledLogits(model), batch) is None


@pytest.mark.slow
def test_kd_with_a_200k_vocabulary_heals_within_its_plan_without_full_logits():
    vocab, n, tokens = 200_000, 8, 64
    dense = _llama(vocab)
    sparse, masks = _student(dense)
    calib = {"input_ids": torch.randint(0, vocab, (n, tokens), generator=torch.Generator().manual_seed(2))}
    config = HealConfig(healer="kd", max_steps=2, batch_size=n, lr=1e-3, device="cpu", progress=False, divergence_factor=100.0)
    result = heal(dense, sparse, masks, calib, config)

    plan = result.memory_estimate
    parts = {k: v["mb"] for k, v in plan["parts_mb"].items()}
    assert "logits" not in parts and "vocabulary chunks" in parts
    one_logits_mb = n * tokens * vocab * 4 / 2**20  # 391 MB: what a single full float32 copy would take
    assert parts["vocabulary chunks"] < one_logits_mb / 2
    assert parts["dense targets"] < n * tokens * 32 * 2 / 2**20 + 1  # the hidden state, not the logits
    added = result.peak_memory_mb - result.memory_at_start_mb
    assert added <= plan["added_mb"]["cpu"] * 1.15, (added, plan["added_mb"])
    assert added < one_logits_mb
    assert not masks.violations(sparse) and all(torch.isfinite(p).all() for p in sparse.parameters())
    assert result.loss_history[-1] < result.loss_history[0]
    assert chunk_tokens(vocab) < n * tokens
