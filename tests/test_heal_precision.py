"""Healing within memory: bf16/fp16 autocast, per-block gradient checkpointing, the skipped head, and
the memory plan that accounts for them; on a tiny Llama (keyword block arguments, padding), a
ResNet-20 (BatchNorm stages in train mode) and a vit-pytorch style ViT (stream read at inputs)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from any_network_models import loop_vit
from lm_tiny import llama_config
from starfish.nn.batch import select
from starfish.nn.blockio import StopForward
from starfish.errors import StarfishError
from starfish.heal import HealConfig, heal
from starfish.nn.capture import record_stream
from starfish.heal.grad_checkpoint import blocks_to_wrap, checkpoint_blocks
from starfish.heal.healing import _Runner
from starfish.heal.objectives import get_objective
from starfish.masks import Masks
from starfish.heal.memory_plan import _count_saved, estimate_heal_memory, probe_activations
from starfish.nn.structure import prunable_targets, stream_points

LLAMA_BLOCKS = r"model\.layers\.\d+"


def _masked_copy(dense: nn.Module, keep: float = 0.5, seed: int = 0) -> tuple[nn.Module, Masks]:
    """The sparse twin: a copy of ``dense`` with a random ``keep`` fraction of its prunable weights."""
    g = torch.Generator().manual_seed(seed)
    sparse = copy.deepcopy(dense)
    masks = Masks({t.name: torch.rand(sparse.get_parameter(t.name).shape, generator=g) < keep for t in prunable_targets(sparse)})
    masks.apply_(sparse)
    return sparse, masks


def _llama(depth: int = 2):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config(40)
    config.num_hidden_layers = depth
    dense = LlamaForCausalLM(config).eval()
    sparse, masks = _masked_copy(dense)
    ids = torch.randint(0, 40, (12, 10), generator=torch.Generator().manual_seed(1))
    attention = torch.ones(12, 10, dtype=torch.long)
    attention[::3, -4:] = 0  # right padding on a third of the sequences
    return dense, sparse, masks, {"input_ids": ids, "attention_mask": attention}, LLAMA_BLOCKS


def _resnet():
    from starfish.models import create_model

    torch.manual_seed(0)
    dense = create_model("cifar10-resnet20").module.eval()
    sparse, masks = _masked_copy(dense)
    return dense, sparse, masks, {"pixel_values": torch.randn(8, 3, 32, 32)}, None


def _vit():
    dense = loop_vit().eval()
    sparse, masks = _masked_copy(dense)
    return dense, sparse, masks, {"pixel_values": torch.randn(8, 3, 16, 16)}, None


MODELS = {"llama": _llama, "resnet20": _resnet, "loop-vit": _vit}


def _config(**kwargs) -> HealConfig:
    base = dict(max_steps=3, batch_size=4, lr=3e-3, device="cpu", progress=False, divergence_factor=100.0)
    return HealConfig(**{**base, **kwargs})


@pytest.mark.parametrize("kind", list(MODELS))
def test_checkpointing_heals_exactly_like_the_plain_backward(kind):
    dense, sparse, masks, calib, pattern = MODELS[kind]()
    plain, ckpt = copy.deepcopy(sparse), copy.deepcopy(sparse)
    a = heal(dense, plain, masks, calib, _config(grad_checkpoint="off", max_steps=2), block_pattern=pattern)
    b = heal(dense, ckpt, masks, calib, _config(grad_checkpoint="on", max_steps=2), block_pattern=pattern)
    assert (a.grad_checkpoint, b.grad_checkpoint) == (False, True)
    assert b.memory_estimate["grad_checkpoint"] and not a.memory_estimate["grad_checkpoint"]
    assert b.loss_history == pytest.approx(a.loss_history, rel=1e-5, abs=1e-7)
    changed = False
    for name, value in plain.state_dict().items():  # weights and BatchNorm running statistics alike
        assert torch.allclose(ckpt.state_dict()[name], value, atol=1e-6, rtol=1e-5), name
        changed |= name in masks and not torch.equal(value, sparse.state_dict()[name])
    assert changed and masks.violations(ckpt) == {}
    assert all("forward" not in m.__dict__ for m in ckpt.modules())  # nothing left on the user's model


def _starfish_loss(sparse, dense, points, batch):
    objective = get_objective("starfish")
    target = _Runner(dense, points, torch.device("cpu"), needs_logits=False)(batch)
    return objective.loss(_Runner(sparse, points, torch.device("cpu"), needs_logits=False)(batch), target, None, None)


def test_checkpointed_gradients_match_and_hooks_fire_once_per_forward():
    dense, sparse, masks, calib, pattern = _llama()
    batch = select(calib, slice(0, 6))
    points = stream_points(dense, batch, pattern)
    names = [p.block for p in points]
    trainable = [p for n, p in sparse.named_parameters() if n in masks]

    def gradients():
        sparse.zero_grad(set_to_none=True)
        _starfish_loss(sparse, dense, points, batch).backward()
        return [p.grad.clone() for p in trainable]

    plain = gradients()
    fired = {n: 0 for n in names}
    inner = [0]
    handles = [sparse.get_submodule(n).register_forward_hook(lambda *_, n=n: fired.__setitem__(n, fired[n] + 1)) for n in names]
    handles.append(sparse.get_submodule(names[0] + ".mlp").register_forward_pre_hook(lambda *_: inner.__setitem__(0, inner[0] + 1)))
    with checkpoint_blocks(sparse, names, [p.module for p in points]) as wrapped:
        assert wrapped == names and all("forward" in sparse.get_submodule(n).__dict__ for n in names)
        checkpointed = gradients()
    for h in handles:
        h.remove()
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(plain, checkpointed))
    assert any(bool(g.abs().sum()) for g in checkpointed)
    assert fired == {n: 1 for n in names}  # the block hooks (record_stream's) fire once per forward...
    assert inner[0] == 2  # ...while the block's insides ran twice: forward, then recompute in backward
    assert all("forward" not in m.__dict__ for m in sparse.modules())


def test_only_blocks_without_watched_modules_inside_are_wrapped():
    assert blocks_to_wrap(["a", "a.0", "b"]) == ["a.0", "b"]  # nested: the inner one
    assert blocks_to_wrap(["a", "b"], watched=["b", "a.norm"]) == ["b"]  # a stream point inside `a`


@pytest.mark.parametrize("scope", ["joint", "blockwise"])
def test_bf16_autocast_heals_with_float32_master_weights_and_exact_masks(scope):
    dense, sparse, masks, calib, pattern = _llama()
    fp32, bf16 = copy.deepcopy(sparse), copy.deepcopy(sparse)
    a = heal(dense, fp32, masks, calib, _config(scope=scope, precision="fp32", max_steps=4), block_pattern=pattern)
    b = heal(dense, bf16, masks, calib, _config(scope=scope, precision="bf16", max_steps=4), block_pattern=pattern)
    assert (a.precision, b.precision) == ("fp32", "bf16")
    assert b.loss_history[0] != a.loss_history[0]  # autocast really ran the forward in bfloat16...
    assert b.loss_history[0] == pytest.approx(a.loss_history[0], rel=0.05)  # ...and still measures the same thing
    assert masks.violations(bf16) == {}
    params = dict(bf16.named_parameters())
    for name, keep in masks.items():
        assert params[name].dtype == torch.float32 and torch.all(params[name][~keep] == 0)
        assert not torch.equal(params[name], dict(sparse.named_parameters())[name])
    if scope == "joint":
        assert b.loss_history[-1] < b.loss_history[0]


def test_fp16_uses_loss_scaling_also_on_float16_weights():
    dense, sparse, masks, calib, pattern = _llama()
    healed = copy.deepcopy(sparse)
    result = heal(dense, healed, masks, calib, _config(precision="fp16"), block_pattern=pattern)
    assert result.precision == "fp16" and result.steps == 3 and masks.violations(healed) == {}
    half = copy.deepcopy(sparse).half()  # float32 master weights while healing: the scaler can unscale them
    result = heal(dense.half(), half, masks, calib, _config(precision="fp16"), block_pattern=pattern)
    assert result.master_weights == "float32 (loaded float16)" and result.steps == 3
    assert {p.dtype for p in half.parameters()} == {torch.float16} and masks.violations(half) == {}
    assert all(bool(torch.isfinite(p).all()) for p in half.parameters())


def test_skipping_the_head_gives_the_same_loss_and_the_head_never_runs():
    dense, sparse, masks, calib, pattern = _llama()
    batch = select(calib, slice(0, 6))
    points = stream_points(dense, batch, pattern)
    head_batches: list[int] = []  # the batch size of every call of either model's head
    for model in (sparse, dense):
        model.lm_head.register_forward_hook(lambda _m, args, _out: head_batches.append(args[0].shape[0]))
    objective = get_objective("starfish")
    full = [_Runner(m, points, torch.device("cpu"), needs_logits=True)(batch) for m in (sparse, dense)]
    assert head_batches == [6, 6] and full[0].logits is not None
    skipped = [_Runner(m, points, torch.device("cpu"), needs_logits=False)(batch) for m in (sparse, dense)]
    assert head_batches == [6, 6] and skipped[0].logits is None
    assert all(torch.equal(x, y) for x, y in zip(full[0].blocks, skipped[0].blocks))
    assert torch.equal(objective.loss(full[0], full[1], None, None), objective.loss(skipped[0], skipped[1], None, None))
    head_batches.clear()
    heal(dense, sparse, masks, calib, _config(grad_checkpoint="on"), block_pattern=pattern)
    # neither the memory probe (1 and 2 samples), the target cache nor training (batch 4) ran a head;
    # only passes on 2 samples run the whole model: the block discovery's order pass (structure.find_blocks)
    # and, for the cache dtype's range measurement, the check that the head is a plain linear map (heal.vocab)
    assert head_batches and set(head_batches) == {2}
    from starfish.heal import vocab

    chunk_tokens: list[int] = []
    chunk_kl = vocab._chunk_kl
    vocab._chunk_kl = lambda student, *rest: chunk_tokens.append(student.shape[0]) or chunk_kl(student, *rest)
    try:
        heal(dense, copy.deepcopy(sparse), masks, calib, _config(healer="kd", max_steps=1), block_pattern=pattern)
    finally:
        vocab._chunk_kl = chunk_kl
    assert 4 * 10 in chunk_tokens  # kd reads the logits: the loss applies the heads' weights to the batch's 40 tokens (heal.vocab)


def test_record_stream_stops_only_once_every_point_is_read():
    dense, _, _, calib, pattern = _llama()
    points = stream_points(dense, calib, pattern)
    with torch.no_grad(), record_stream(dense, points, stop=True) as slots:
        with pytest.raises(StopForward):
            dense(**calib, use_cache=False)
        assert all(s is not None for s in slots)


def _plan(dense, sparse, masks, calib, pattern, healer="starfish", **kwargs):
    from starfish.nn.batch import select as take

    points = stream_points(dense, take(calib, slice(0, 2)), pattern)
    config = _config(healer=healer)
    return estimate_heal_memory(
        dense, sparse, masks.names(), calib, config, get_objective(healer), [p.block for p in points],
        torch.device("cpu"), "cpu", points=points, **kwargs,
    )


def test_memory_plan_shrinks_with_checkpointing_and_counts_the_head_only_when_it_runs():
    dense, sparse, masks, calib, pattern = _llama(depth=4)
    plain = _plan(dense, sparse, masks, calib, pattern)
    ckpt = _plan(dense, sparse, masks, calib, pattern, checkpoint=True, probe=plain.probe)
    bf16 = _plan(dense, sparse, masks, calib, pattern, precision="bf16")
    act = lambda p: p.parts["activations"][1]  # noqa: E731
    assert act(ckpt) < act(plain) and ckpt.need("cpu") < plain.need("cpu")
    assert plain.head_skipped and "logits" not in plain.parts
    assert plain.probe.saved_total > bf16.probe.saved_total  # bf16 saves narrower activations per sample
    kd = _plan(dense, sparse, masks, calib, pattern, healer="kd")
    assert not kd.head_skipped and kd.parts["logits"][1] == 4 * 10 * 40 * 4  # batch x tokens x vocab x float32


def test_the_probe_separates_the_per_sample_and_the_fixed_part():
    dense, sparse, masks, calib, pattern = _llama()
    blocks = [sparse.get_submodule(p.block) for p in stream_points(dense, calib, pattern)]
    for precision in ("fp32", "bf16"):
        probe = probe_activations(sparse, blocks, select(calib, slice(0, 2)), set(masks.names()), precision)
        for n in (3, 5):  # what autograd really keeps for n samples
            for p_name, p in sparse.named_parameters():
                p.requires_grad_(p_name in masks)
            counted = _count_saved(sparse, blocks, select(calib, slice(0, n)), precision, None)
            assert probe.activations(n, checkpoint=False) == counted.total
        if precision == "bf16":
            assert probe.fixed_total > 0  # autocast's bfloat16 copies of the weights, once per forward


def test_auto_checkpoints_only_when_the_plain_plan_does_not_fit():
    dense, sparse, masks, calib, pattern = _llama(depth=4)
    plain = _plan(dense, sparse, masks, calib, pattern)
    ckpt = _plan(dense, sparse, masks, calib, pattern, checkpoint=True, probe=plain.probe)
    limit = (plain.need("cpu") + ckpt.need("cpu")) / 2 / 2**30
    roomy = heal(dense, copy.deepcopy(sparse), masks, calib, _config(max_steps=1), block_pattern=pattern)
    tight = heal(dense, copy.deepcopy(sparse), masks, calib, _config(max_steps=1, memory_limit_gb=limit), block_pattern=pattern)
    assert (roomy.grad_checkpoint, tight.grad_checkpoint) == (False, True)
    with pytest.raises(StarfishError, match="--grad-checkpoint on") as refused:
        heal(dense, copy.deepcopy(sparse), masks, calib, _config(grad_checkpoint="off", memory_limit_gb=limit), block_pattern=pattern)
    assert "--precision bf16" in str(refused.value)


def test_precision_and_checkpoint_flags_reach_the_heal_config_and_are_checked():
    from starfish.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--precision", "bf16", "--grad-checkpoint", "on"])
    heal_config = config_from_args(args).heal
    assert (heal_config.precision, heal_config.grad_checkpoint) == ("bf16", "on")
    with pytest.raises(StarfishError, match="--precision"):
        HealConfig(precision="int8").validate()
    with pytest.raises(StarfishError, match="--grad-checkpoint"):
        HealConfig(grad_checkpoint="always").validate()
    assert HealConfig().precision == "auto"


def test_native_precision_is_bf16_only_where_the_hardware_multiplies_bf16(monkeypatch):
    """``auto`` keeps CPUs at fp32 (image results stay reproducible); ``native``, the language-model
    default, takes bf16 on a CPU with AMX/AVX512-BF16 and nowhere else on a CPU."""
    from starfish.heal import precision

    cpu = torch.device("cpu")
    for has_it in (True, False):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda has_it=has_it: has_it)
        assert precision.resolve_precision("native", cpu) == ("bf16" if has_it else "fp32")
        assert precision.resolve_precision("auto", cpu) == "fp32"
        assert precision.resolve_precision("fp32", cpu) == "fp32"
    HealConfig(precision="native").validate()
