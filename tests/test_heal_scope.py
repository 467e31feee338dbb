"""Block-wise healing, bounded target caches, the memory plan and divergence handling, on tiny models."""

from __future__ import annotations

import copy
import glob
import os
import resource
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.heal import HealConfig, heal
from starfish.nn.capture import record_outputs
from starfish.heal.objectives import Signals, cosine_distance
from starfish.heal.targets import TargetCache, TensorStore
from starfish.masks import Masks


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Chain(nn.Module):
    """Token-sequence model: stem, a chain of residual MLP blocks, mean-pooled head."""

    def __init__(self, d: int = 16, depth: int = 3, parallel: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, 4)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.parallel:  # every block reads the stem output: not a chain
            h = sum(block(h) for block in self.blocks)
        else:
            h = self.blocks(h)
        return self.head(h.mean(1))


def _setup(seed: int = 0, sparsity: float = 0.6, **kwargs):
    torch.manual_seed(seed)
    dense = Chain(**kwargs).eval()
    sparse = copy.deepcopy(dense)
    masks = Masks()
    for name, p in sparse.named_parameters():
        if name.startswith("blocks.") and name.endswith("weight"):
            keep = p.detach().abs() > p.detach().abs().flatten().kthvalue(int(sparsity * p.numel())).values
            masks[name] = keep
    masks.apply_(sparse)
    calib = {"pixel_values": torch.randn(48, 5, 6)}
    return dense, sparse, masks, calib


def _block_alignment(dense, sparse, x) -> list[float]:
    """Per-block 1 - cosine of the sparse network's own stream against the dense one."""
    with torch.no_grad(), record_outputs(list(dense.blocks)) as d, record_outputs(list(sparse.blocks)) as s:
        dense(x)
        sparse(x)
        return [float(cosine_distance(a, b)) for a, b in zip(s, d)]


def _config(**kwargs) -> HealConfig:
    base = dict(epochs=6, batch_size=16, lr=3e-3, device="cpu", progress=False)
    return HealConfig(**{**base, **kwargs})


@pytest.mark.parametrize("inputs", ["sparse", "dense"])
def test_blockwise_keeps_masks_and_reduces_every_block_loss(inputs):
    dense, sparse, masks, calib = _setup()
    frozen = {k: v.clone() for k, v in sparse.state_dict().items() if k not in masks}
    before = _block_alignment(dense, sparse, calib["pixel_values"])
    result = heal(dense, sparse, masks, calib, _config(scope="blockwise", blockwise_inputs=inputs), block_pattern=r"blocks\.\d+")
    after = _block_alignment(dense, sparse, calib["pixel_values"])
    assert masks.violations(sparse) == {}
    assert all(torch.equal(sparse.state_dict()[k], v) for k, v in frozen.items())  # biases, stem, head untouched
    assert result.scope == "blockwise" and [b["block"] for b in result.per_block] == ["blocks.0", "blocks.1", "blocks.2"]
    assert result.steps == 3 * 6 * 3  # every block gets the full per-block budget
    assert all(b["loss_last"] < b["loss_first"] for b in result.per_block), result.per_block
    assert after[0] < before[0] and sum(after) < sum(before), (before, after)
    assert not result.diverged


def test_blockwise_refuses_blocks_that_are_not_a_chain():
    dense, sparse, masks, calib = _setup(parallel=True)
    with pytest.raises(StarfishError, match="chain"):
        heal(dense, sparse, masks, calib, _config(scope="blockwise"), block_pattern=r"blocks\.\d+")


def test_blockwise_refuses_a_logit_healer():
    dense, sparse, masks, calib = _setup()
    with pytest.raises(StarfishError, match="--heal-scope joint"):
        heal(dense, sparse, masks, calib, _config(scope="blockwise", healer="kd"), block_pattern=r"blocks\.\d+")


def test_memory_limit_refuses_before_any_step_and_names_the_fixes():
    dense, sparse, masks, calib = _setup()
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    with pytest.raises(StarfishError) as err:
        heal(dense, sparse, masks, calib, _config(memory_limit_gb=1e-6), block_pattern=r"blocks\.\d+")
    message = str(err.value)
    assert "\n" not in message and "--heal-scope blockwise" in message and "--cache-device disk" in message
    assert all(torch.equal(sparse.state_dict()[k], v) for k, v in before.items())


def test_memory_estimate_is_reported_and_blockwise_plans_less_activation_memory():
    dense, sparse, masks, calib = _setup(depth=4)
    joint = heal(dense, copy.deepcopy(sparse), masks, calib, _config(max_steps=1), block_pattern=r"blocks\.\d+")
    block = heal(dense, copy.deepcopy(sparse), masks, calib, _config(max_steps=1, scope="blockwise"), block_pattern=r"blocks\.\d+")
    j, b = joint.memory_estimate["parts_mb"], block.memory_estimate["parts_mb"]
    assert j["activations"]["mb"] > 0 and b["activations"]["mb"] < j["activations"]["mb"]
    # the cache holds the 4 block outputs of 48 samples in float16 and no logits
    assert j["dense targets"]["mb"] == pytest.approx(48 * 4 * 5 * 16 * 2 / 2**20)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak-RSS window needs Linux /proc")
def test_a_heal_reports_its_own_peak_not_the_process_peak_before_it():
    """On a CPU the heal's peak memory is the resident-set peak while it healed: 600 MB that the
    process touched and freed before healing (an evaluation, pruning, an earlier healer) do not count."""
    dense, sparse, masks, calib = _setup()
    ballast = torch.ones(600 * 2**20 // 4)  # touched, then freed: the process peak now includes it
    del ballast
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = heal(dense, sparse, masks, calib, _config(max_steps=1), block_pattern=r"blocks\.\d+")
    assert result.memory_measure == "process peak RSS during healing"
    assert result.peak_memory_mb < lifetime_peak - 400
    assert 0 < result.memory_at_start_mb <= result.peak_memory_mb  # what was held when the window opened


def test_target_cache_keeps_only_what_is_read_in_the_cache_dtype():
    outputs = torch.randn(10, 3, 4)

    def run(batch):
        x = batch["pixel_values"]
        return Signals([x * 2, x * 3], logits=x.sum(-1))

    store = TensorStore("cpu", torch.float16)
    cache = TargetCache.build(run, {"pixel_values": outputs}, 4, store, keep_logits=False)
    assert cache.logits is None and all(b.dtype == torch.float16 for b in cache.blocks)
    got = cache.get(torch.tensor([7, 1]), torch.device("cpu"))
    # block targets come back in the cache's dtype: the block losses widen one block at a time
    assert torch.allclose(got.blocks[1].float(), outputs[[7, 1]] * 3, atol=1e-2) and got.blocks[1].dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_disk_cache_round_trips_and_removes_its_files(dtype):
    pattern = os.path.join(tempfile.gettempdir(), "starfish-targets-*")
    before = set(glob.glob(pattern))
    store = TensorStore("disk", dtype)
    values = torch.randn(6, 3)
    cache = TargetCache.build(lambda b: Signals([b["pixel_values"]]), {"pixel_values": values}, 4, store, keep_logits=False)
    assert set(glob.glob(pattern)) - before  # really on disk
    got = cache.get(torch.tensor([5, 0]), torch.device("cpu")).blocks[0]
    assert got.dtype == dtype and torch.allclose(got.float(), values[[5, 0]], atol=2e-2)
    cache.close()
    assert set(glob.glob(pattern)) == before


def test_float16_overflow_is_refused_with_the_fix():
    store = TensorStore("cpu", torch.float16)
    with pytest.raises(StarfishError, match="--cache-dtype bfloat16"):
        TargetCache.build(lambda b: Signals([b["pixel_values"] * 1e6]), {"pixel_values": torch.ones(2, 3)}, 2, store, False)


def test_disk_cache_heals_like_the_memory_cache():
    dense, sparse, masks, calib = _setup()
    runs = []
    for where in (None, "disk"):
        model = copy.deepcopy(sparse)
        runs.append(heal(dense, model, masks, calib, _config(max_steps=3, cache_device=where), block_pattern=r"blocks\.\d+").loss_history)
        assert masks.violations(model) == {}
    assert runs[0] == pytest.approx(runs[1], abs=1e-6)


def test_padding_positions_do_not_count_in_the_alignment():
    a = torch.randn(2, 4, 8)
    b = a.clone()
    b[:, -1] = -b[:, -1]  # only the last (padding) position differs
    weights = torch.ones(2, 4)
    weights[:, -1] = 0
    assert cosine_distance(b, a, weights).abs() < 1e-6
    assert cosine_distance(b, a) > 0.4


@pytest.mark.parametrize("scope", ["joint", "blockwise"])
def test_divergence_stops_keeps_the_best_weights_and_says_how_to_fix_it(scope, capsys):
    dense, sparse, masks, calib = _setup()
    start = {k: v.clone() for k, v in sparse.state_dict().items()}
    result = heal(dense, sparse, masks, calib, _config(lr=10.0, scope=scope), block_pattern=r"blocks\.\d+")
    assert result.diverged and result.stopped_reason
    assert masks.violations(sparse) == {}
    assert result.best_step == 0  # the first update already made things worse: the start is the best seen
    changed = [k for k, v in sparse.state_dict().items() if not torch.equal(v, start[k])]
    assert changed == [] if scope == "joint" else len(changed) < len(start)
    err = capsys.readouterr().err
    assert "lower --lr" in err and len([line for line in err.splitlines() if "warning" in line]) == 1


def test_a_sane_learning_rate_does_not_trigger_the_divergence_guard():
    dense, sparse, masks, calib = _setup()
    result = heal(dense, sparse, masks, calib, _config(), block_pattern=r"blocks\.\d+")
    assert not result.diverged and result.loss_history[-1] < result.loss_history[0]


def test_cli_flags_reach_the_heal_config():
    from starfish.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["run", "--heal-scope", "blockwise", "--blockwise-inputs", "dense", "--cache-device", "disk", "--memory-limit-gb", "3"]
    )
    heal_config = config_from_args(args).heal
    assert (heal_config.scope, heal_config.blockwise_inputs, heal_config.cache_device, heal_config.memory_limit_gb) == (
        "blockwise", "dense", "disk", 3.0,
    )


class KeywordBlock(nn.Module):
    """Called like a Hugging Face decoder layer: the stream plus a per-sample keyword tensor."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, hidden_states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.fc2(torch.relu(self.fc1(hidden_states))) * keep


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([KeywordBlock(d) for _ in range(3)])
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        keep = attention_mask[..., None].float()
        for layer in self.layers:
            h = layer(h, keep=keep)
        return self.head(h)


def _text_setup():
    torch.manual_seed(1)
    dense = TinyLM().eval()
    sparse = copy.deepcopy(dense)
    masks = Masks()
    for name, p in sparse.named_parameters():
        if name.startswith("layers.") and name.endswith("weight"):
            masks[name] = torch.rand(p.shape) > 0.6
    masks.apply_(sparse)
    ids = torch.randint(0, 20, (24, 7))
    attention = torch.ones(24, 7, dtype=torch.long)
    attention[::2, -3:] = 0  # right padding on half the samples
    return dense, sparse, masks, {"input_ids": ids, "attention_mask": attention}


@pytest.mark.parametrize("scope,healer", [("blockwise", "starfish"), ("joint", "starfish"), ("joint", "kd")])
def test_token_models_heal_with_keyword_block_arguments(scope, healer):
    dense, sparse, masks, calib = _text_setup()
    result = heal(dense, sparse, masks, calib, _config(scope=scope, healer=healer, epochs=8, batch_size=8), block_pattern=r"layers\.\d+")
    assert masks.violations(sparse) == {} and not result.diverged
    if scope == "blockwise":  # the history runs block after block: compare within each block
        assert all(b["loss_last"] < b["loss_first"] for b in result.per_block), result.per_block
    else:
        assert result.loss_history[-1] < result.loss_history[0]


def test_finetune_refuses_token_models_with_the_fix():
    dense, sparse, masks, calib = _text_setup()
    calib["labels"] = torch.zeros(24, dtype=torch.long)
    with pytest.raises(StarfishError, match="--healer starfish"):
        heal(dense, sparse, masks, calib, _config(healer="finetune", max_steps=1), block_pattern=r"layers\.\d+")
