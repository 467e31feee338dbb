"""The sequential calibration pipeline: O(blocks) forward work, the same masks as whole-model passes,
and Hugging Face decoder layers with padded batches."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.pruning import PruneConfig, prune, prune_with_notes
from starfish.pruning.pruners import get_pruner
from starfish.repair import apply_repair
from starfish.nn.sequential import Plan, plan_blocks, walk
from starfish.nn.structure import prunable_targets

BLOCKS = 8
prune_module = importlib.import_module("starfish.pruning.prune")  # the package re-exports a function named prune
varmatch_module = importlib.import_module("starfish.repair.varmatch")


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    """A token model (N, T, 6) -> (N, 3) whose 8 blocks form a chain."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(BLOCKS)])
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(1))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def _calibration(n: int = 150, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 5, 6, generator=torch.Generator().manual_seed(seed))


class Counter:
    """Counts whole-model calls, calls of each block and of the head (a full pass reaches it)."""

    def __init__(self, model: Net) -> None:
        self.model_calls: list[int] = []  # batch size of each whole-model call
        self.block_calls = [0] * BLOCKS
        self.block_samples = [0] * BLOCKS
        self.head_calls = 0
        model.register_forward_pre_hook(lambda m, a: self.model_calls.append(a[0].shape[0]))
        for i, block in enumerate(model.blocks):
            # counted when a call completes: the prefix pass is stopped *at* block 0, which never runs
            block.register_forward_hook(lambda m, a, out, i=i: self._block(i, a[0].shape[0]))
        model.head.register_forward_pre_hook(lambda m, a: self._head())

    def _block(self, i: int, n: int) -> None:
        self.block_calls[i] += 1
        self.block_samples[i] += n

    def _head(self) -> None:
        self.head_calls += 1

    def assert_sequential(self, batches: int, samples: int, passes_per_block: int) -> None:
        # one prefix pass per calibration batch, plus the one-sample chain check
        assert len(self.model_calls) <= batches + 1
        assert sum(self.model_calls) <= samples + 1
        assert self.head_calls <= 1  # only the chain check runs the whole network
        for calls, n in zip(self.block_calls, self.block_samples):
            assert calls <= passes_per_block * batches + 1
            assert n <= passes_per_block * samples + 1


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_pruners_cost_at_most_two_passes_per_block(pruner):
    model, calib = _net(), _calibration(150)  # 3 batches of at most 64
    counter = Counter(model)
    masks, notes = prune_with_notes(model, PruneConfig(0.5, pruner=pruner), calibration=calib)
    assert notes["calibration"].startswith("sequential: 8 blocks")
    counter.assert_sequential(batches=3, samples=150, passes_per_block=2 if pruner == "sparsegpt" else 1)
    assert abs(masks.sparsity() - 0.5) < 1e-9 and masks.violations(model) == {}


def test_the_whole_model_fallback_costs_a_pass_per_target():
    """The counter can fail: including the head (outside the blocks) forces whole-model passes."""
    model, calib = _net(), _calibration(150)
    counter = Counter(model)
    _, notes = prune_with_notes(model, PruneConfig(0.5, pruner="sparsegpt", include=r"blocks|head"), calibration=calib)
    assert "outside the blocks" in notes["calibration"] and notes["calibration"].startswith("whole-model")
    assert len(counter.model_calls) > 3 * 2 * BLOCKS  # one truncated pass per target and batch


@pytest.mark.parametrize("scheme", ["block", "layer", "layer-grouped"])
def test_varmatch_costs_at_most_two_passes_per_block(scheme, monkeypatch):
    if scheme == "layer-grouped":  # the fallback when the calibration set does not fit in one call
        monkeypatch.setattr(varmatch_module, "_one_call_size", lambda calibration, model: None)
    dense, calib = _net(), _calibration(150)
    sparse = copy.deepcopy(dense)
    masks = prune(sparse, PruneConfig(0.6))
    dense_count, sparse_count = Counter(dense), Counter(sparse)
    stats = apply_repair("varmatch", dense, sparse, masks, calib, scheme=scheme.split("-")[0])
    assert stats["calibration"].startswith("sequential")
    dense_count.assert_sequential(batches=3, samples=150, passes_per_block=1)
    # complete calls of the pruned block: its calibration passes stop inside it
    sparse_count.assert_sequential(batches=3, samples=150, passes_per_block=1)
    # calls started: "layer" one call of the whole set that corrects as it goes; "block" measures
    # all layers in one pass then runs again; the grouped fallback one pass per group (fc1, fc2) + 1
    started = [0] * BLOCKS
    for i, block in enumerate(sparse.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: started.__setitem__(i, started[i] + 1))
    apply_repair("varmatch", dense, sparse, masks, calib, scheme=scheme.split("-")[0])
    calls = {"layer": 1, "block": 2 * 3, "layer-grouped": 3 * 3}[scheme]
    prefix = 1 if scheme == "layer" else 3
    # + 1: the one-sample chain check; block 0 also sees the prefix passes stop at it
    assert started[1:] == [calls + 1] * (BLOCKS - 1) and started[0] == calls + 1 + prefix
    assert masks.violations(sparse) == {}


def test_varmatch_in_one_pass_makes_the_per_layer_corrections(monkeypatch):
    """Correcting inside one call of the whole set equals measuring layer by layer (grouped passes)."""
    dense, calib = _net(), _calibration(150)
    sparse = copy.deepcopy(dense)
    masks = prune(sparse, PruneConfig(0.6))
    one_pass, grouped = copy.deepcopy(sparse), copy.deepcopy(sparse)
    stats = apply_repair("varmatch", dense, one_pass, masks, calib)
    assert stats["passes"].startswith("one pass of each pruned block")
    monkeypatch.setattr(varmatch_module, "_one_call_size", lambda calibration, model: None)
    assert apply_repair("varmatch", dense, grouped, masks, calib)["passes"].startswith("one truncated pass")
    changed = 0
    for (name, a), b, c in zip(one_pass.state_dict().items(), grouped.state_dict().values(), sparse.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        changed += not torch.equal(a, c)
    assert changed >= 2 * BLOCKS  # the repair did correct the layers


def _force_whole_model(monkeypatch, module) -> None:
    real = module.plan_blocks

    def whole(*args, **kwargs):
        real(*args, **kwargs)
        return Plan(None, "whole-model passes: forced by the test")

    monkeypatch.setattr(module, "plan_blocks", whole)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sequential_wanda_masks_equal_whole_model_masks(monkeypatch, pattern):
    calib = _calibration(150)
    sequential, whole = _net(), _net()
    seq_masks = prune(sequential, PruneConfig(0.5, pruner="wanda", pattern=pattern), calibration=calib)
    _force_whole_model(monkeypatch, prune_module)
    whole_masks, notes = prune_with_notes(whole, PruneConfig(0.5, pruner="wanda", pattern=pattern), calibration=calib)
    assert notes["calibration"] == "whole-model passes: forced by the test"
    for name, keep in seq_masks.items():
        assert torch.equal(keep, whole_masks[name]), name


def test_sequential_sparsegpt_is_close_to_the_whole_model_path(monkeypatch):
    calib, probe = _calibration(150), _calibration(100, seed=7)
    dense, sequential, whole, magnitude = _net(), _net(), _net(), _net()
    prune(sequential, PruneConfig(0.5, pruner="sparsegpt"), calibration=calib)
    prune(magnitude, PruneConfig(0.5))
    _force_whole_model(monkeypatch, prune_module)
    prune(whole, PruneConfig(0.5, pruner="sparsegpt"), calibration=calib)
    with torch.no_grad():
        ref, a, b, m = dense(probe), sequential(probe), whole(probe), magnitude(probe)
    error = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    assert error(a) < 0.5 * error(m) and error(b) < 0.5 * error(m)  # both reconstruct
    assert abs(error(a) - error(b)) < 0.25 * error(b)  # and about equally well
    assert float((a - b).norm() / ref.norm()) < 0.5 * error(m)


def test_varmatch_layer_scheme_equals_the_whole_model_path(monkeypatch):
    calib, probe = _calibration(150), _calibration(100, seed=7)
    dense = _net()
    base = copy.deepcopy(dense)
    masks = prune(base, PruneConfig(0.7))
    sequential, whole = copy.deepcopy(base), copy.deepcopy(base)
    together = copy.deepcopy(base)
    apply_repair("varmatch", dense, sequential, masks, calib)
    apply_repair("varmatch", dense, together, masks, calib, scheme="block")
    _force_whole_model(monkeypatch, varmatch_module)
    stats = apply_repair("varmatch", dense, whole, masks, calib)
    assert stats["calibration"] == "whole-model passes: forced by the test"
    with torch.no_grad():
        ref, a, b, c, raw = dense(probe), sequential(probe), whole(probe), together(probe), base(probe)
    # layer by layer inside each block computes what the whole-model fallback computes
    assert float((a - b).norm() / (b - raw).norm()) < 1e-4
    assert float((b - raw).norm() / ref.norm()) > 0.05  # and the repair changed something
    # measuring a block's layers together is a different (cheaper) correction
    assert float((c - b).norm() / (b - raw).norm()) > 1e-2


def test_sparsegpt_runs_in_float32_on_the_weights_device():
    from starfish.pruning.sparsegpt import inverse_hessian_factor, sparsegpt_layer

    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
    x[:, 5] = 0.0  # a dead input
    x[:, 7] = x[:, 6]  # a singular Gram matrix: damping must keep it factorable
    gram = x.T @ x / 300
    u = inverse_hessian_factor(gram, 0.01)
    assert u.dtype == torch.float32 and bool(torch.isfinite(u).all())
    w = torch.randn(8, 32)
    new, keep = sparsegpt_layer(w, gram, 128)
    assert new.dtype == torch.float32 and int((~keep).sum()) == 128 and bool((new[~keep] == 0).all())


def test_pruner_registry_keeps_the_old_names_and_adds_units():
    from starfish.pruning.pruners import PRUNERS, list_pruners, register_pruner

    assert {"magnitude", "random", "wanda", "sparsegpt"} <= set(list_pruners())
    assert get_pruner("sparsegpt").reconstructs and get_pruner("wanda").needs_calibration
    assert not get_pruner("magnitude").needs_calibration
    with pytest.raises(StarfishError, match="choose one of"):
        get_pruner("nope")

    @register_pruner("test-largest-first")
    def largest_first(weight, generator, stats=None):
        """The opposite of magnitude (a test scorer)."""
        return -weight.abs()

    try:
        model = _net()
        w = model.blocks[0].fc1.weight.detach().clone()
        masks = prune(model, PruneConfig(0.25, pruner="test-largest-first"))
        gone = w[~masks["blocks.0.fc1.weight"]].abs()
        assert float(gone.min()) >= float(w[masks["blocks.0.fc1.weight"]].abs().max())
    finally:
        PRUNERS._entries.pop("test-largest-first")


def test_nm_pattern_accepts_a_rounded_sparsity():
    PruneConfig(0.666667, pattern="1:3").validate()
    PruneConfig(0.6, pattern="1:3").validate()  # within half a weight per group of 3
    with pytest.raises(StarfishError, match="--sparsity 0.666667"):
        PruneConfig(0.45, pattern="1:3").validate()
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(6, 4))
    model = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(2)])
    masks = prune(model, PruneConfig(0.666667, pattern="1:3"))
    for _, keep in masks.items():
        assert bool((keep.view(6, 2, 3).sum(-1) == 1).all())
    assert masks.sparsity() == pytest.approx(2 / 3, abs=1e-12)


# --- Hugging Face decoder layers ----------------------------------------------------------------


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _padded_text(seed: int = 0, pad_token: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (6, 12), generator=g)
    lengths = [12, 9, 7, 12, 4, 10]
    mask = torch.zeros(6, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = pad_token
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_llama_decoder_layers_through_the_sequential_path(pruner, pattern):
    model = _tiny_llama()
    masks, notes = prune_with_notes(model, PruneConfig(0.5, pruner=pruner, pattern=pattern), calibration=_padded_text())
    assert notes["calibration"].startswith("sequential: 2 blocks")
    params = dict(model.named_parameters())
    assert len(masks) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for name, keep in masks.items():
        assert int((~keep).sum()) == keep.numel() // 2, name  # exactly half of every layer
        assert bool((params[name].detach()[~keep] == 0).all()), name
        if pattern:
            assert bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()), name
    with torch.no_grad():
        logits = model(**_padded_text(), use_cache=False).logits
    assert bool(torch.isfinite(logits).all())


def _wanda_norms(model, calibration) -> dict:
    targets = prunable_targets(model)
    plan = plan_blocks(model, targets, calibration)
    assert plan.sequential
    wanda = get_pruner("wanda")()
    walk(model, plan, calibration, 64, wanda.calibrate, lambda stage: None, propagate_changed=False)
    return wanda.norms


def test_padding_does_not_change_wanda_statistics():
    model = _tiny_llama()
    padded = _wanda_norms(model, _padded_text(pad_token=0))
    other_pad = _wanda_norms(model, _padded_text(pad_token=17))  # what the padding holds does not matter
    one_by_one: dict = {}  # each sequence alone, unpadded
    text = _padded_text()
    for ids, mask in zip(text["input_ids"], text["attention_mask"]):
        n = int(mask.sum())
        alone = _wanda_norms(model, {"input_ids": ids[None, :n], "attention_mask": mask[None, :n]})
        for k, v in alone.items():
            one_by_one[k] = one_by_one.get(k, 0) + v
    for name, value in padded.items():
        assert torch.allclose(value, other_pad[name], rtol=1e-5), name
        assert torch.allclose(value, one_by_one[name], rtol=1e-4, atol=1e-6), name
