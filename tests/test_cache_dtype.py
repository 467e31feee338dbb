"""The target-cache dtype is chosen from the dense model's measured range, not guessed: float16 only
when the activations fit it, bfloat16 otherwise, with no flag; an explicit float16 that cannot hold
the model is refused before heavy work, naming the setting that works."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_tiny import llama_config
from starfish.errors import StarfishError
from starfish.heal import HealConfig, heal
from starfish.heal.cache_dtype import choose_cache_dtype, dense_peak
from starfish.masks import Masks
from starfish.nn.structure import prunable_targets

REPO = Path(__file__).resolve().parents[1]


def _llama(scale: float):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    dense = LlamaForCausalLM(llama_config(40)).eval()
    with torch.no_grad():
        dense.model.embed_tokens.weight.mul_(scale)  # the residual stream carries the embeddings: block outputs ~ scale
    sparse = copy.deepcopy(dense)
    masks = Masks({t.name: torch.rand(sparse.get_parameter(t.name).shape, generator=torch.Generator().manual_seed(1)) < 0.5
                   for t in prunable_targets(sparse)})
    masks.apply_(sparse)
    return dense, sparse, masks, {"input_ids": torch.randint(0, 40, (8, 10), generator=torch.Generator().manual_seed(2))}


@pytest.mark.parametrize("scale, expected", [(1.0, "float16"), (1e7, "bfloat16")])
def test_defaults_heal_and_name_the_cache_dtype_chosen_from_the_dense_range(scale, expected):
    dense, sparse, masks, calib = _llama(scale)
    peak = dense_peak(dense, calib, 4, None)
    assert (peak > 65504) == (expected == "bfloat16")
    result = heal(dense, sparse, masks, calib, HealConfig(max_steps=2, batch_size=4, device="cpu", progress=False))  # no cache flag
    assert result.cache_dtype == expected and "auto" in result.cache_dtype_reason
    assert result.to_dict()["cache_dtype"] == expected
    assert all(torch.isfinite(torch.tensor(result.loss_history)))
    assert not masks.violations(sparse)


def test_an_explicit_float16_the_model_overflows_is_refused_naming_what_works():
    with pytest.raises(StarfishError, match="--cache-dtype bfloat16"):
        choose_cache_dtype("float16", 7e4)
    assert choose_cache_dtype("float16", 6e4).dtype == "float16"
    assert choose_cache_dtype("bfloat16", 7e4).dtype == "bfloat16"


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_with_the_tiny_config(tmp_path):
    out = tmp_path / "GPU.md"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "Device: CPU" in text
    for what in ("heal step, joint", "heal step, blockwise", "wanda calibration", "sparsegpt calibration"):
        assert f"| tiny | {what}" in text
