"""Causal LMs through create_model: loading, blocks and targets, Conv1D, MoE refusal, saving."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from lm_tiny import gpt2_config, llama_config, save_tiny, tiny_tokenizer
from starfish.errors import StarfishError
from starfish.masks import Masks
from starfish.models import create_model
from starfish.models.causal_lm import CheckpointConv1D, load_checkpoint_masks, save_hf_folder, tokenizer_of
from starfish.pruning import PruneConfig, prune
from starfish.nn.structure import find_blocks, prunable_targets

VOCAB = len(tiny_tokenizer())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama"), llama_config(VOCAB))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gpt2"), gpt2_config(VOCAB))


def _ids(n: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, n), generator=torch.Generator().manual_seed(1))


def test_llama_loads_as_causal_lm_with_decoder_blocks_and_dense_ends(llama_dir):
    loaded = create_model(f"hf:{llama_dir}")
    assert loaded.task == "causal-lm" and loaded.extra["tokenizer"] is not None
    assert loaded.extra["seq_len"] == 128  # the context (128) is below the 2048 cap
    names = [n for n, _ in find_blocks(loaded.module, loaded.block_pattern)]
    assert names == ["model.layers.0", "model.layers.1"]
    assert [n for n, _ in find_blocks(loaded.module)] == names  # automatic discovery agrees
    targets = [t.name for t in prunable_targets(loaded.module, block_pattern=loaded.block_pattern)]
    assert len(targets) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(t.startswith("model.layers.") and t.endswith("proj.weight") for t in targets)
    assert not any("embed" in t or "lm_head" in t or "norm" in t for t in targets)


def test_dtype_is_applied_and_checked(llama_dir):
    loaded = create_model(f"hf:{llama_dir}", dtype="bfloat16")
    assert {p.dtype for p in loaded.module.parameters()} == {torch.bfloat16}
    with pytest.raises(StarfishError, match="dtype must be one of"):
        create_model(f"hf:{llama_dir}", dtype="int8")
    with pytest.raises(StarfishError, match="drop --weights"):
        create_model(f"hf:{llama_dir}", weights=llama_dir / "model.safetensors")


def test_gpt2_conv1d_becomes_an_exact_linear(gpt2_dir):
    from transformers import AutoModelForCausalLM

    loaded = create_model(f"hf:{gpt2_dir}")
    original = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    assert loaded.block_pattern == r"transformer\.h\.\d+"
    targets = prunable_targets(loaded.module, block_pattern=loaded.block_pattern)
    assert sorted({t.module_name.split(".", 3)[3] for t in targets}) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    c_attn = loaded.module.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(c_attn, CheckpointConv1D) and c_attn.weight.shape == (3 * 32, 32)  # (out, in)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(input_ids=ids).logits, original(input_ids=ids).logits)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pruned_model_saves_a_folder_that_transformers_loads_as_is(family, llama_dir, gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = create_model(f"hf:{llama_dir if family == 'llama' else gpt2_dir}")
    sparse = copy.deepcopy(loaded.module)
    masks = prune(sparse, PruneConfig(sparsity=0.5))
    assert abs(masks.sparsity() - 0.5) < 1e-9 and masks.violations(sparse) == {}
    out = save_hf_folder(sparse, loaded.extra["tokenizer"], tmp_path / "model", masks, tmp_path / "masks.safetensors")

    assert "sparsity_config" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, sparse(input_ids=ids).logits)
    saved = Masks.load(tmp_path / "masks.safetensors")
    params = dict(reloaded.named_parameters())
    stored = load_file(str(out / "model.safetensors"))
    assert sorted(saved.names()) == sorted(masks.names())
    for name, keep in saved.items():  # checkpoint names and layout; pruned entries exactly zero
        assert keep.shape == params[name].shape
        assert int((stored[name][~keep] != 0).sum()) == 0
        assert int((~keep).sum()) == keep.numel() // 2
    assert AutoTokenizer.from_pretrained(out)("the lazy dog")["input_ids"] == loaded.extra["tokenizer"]("the lazy dog")["input_ids"]


def test_gpt2_masks_are_transposed_into_the_checkpoint_layout(gpt2_dir, tmp_path):
    loaded = create_model(f"hf:{gpt2_dir}")
    masks = prune(loaded.module, 0.5)
    save_hf_folder(loaded.module, None, tmp_path / "m", masks)
    saved = Masks.load(tmp_path / "m" / "masks.safetensors")
    name = "transformer.h.0.mlp.c_fc.weight"
    assert masks[name].shape == (128, 32) and saved[name].shape == (32, 128)
    assert torch.equal(saved[name], masks[name].t())
    again = create_model(f"hf:{tmp_path / 'm'}")  # the saved folder loads back with its masks
    back = load_checkpoint_masks(again.module, tmp_path / "m" / "masks.safetensors")
    assert torch.equal(back[name], masks[name]) and back.violations(again.module) == {}
    with pytest.raises(StarfishError, match="no tokenizer"):  # saved without one: said when text is needed
        tokenizer_of(again.extra)


def test_save_refuses_a_model_that_breaks_its_masks(llama_dir, tmp_path):
    loaded = create_model(f"hf:{llama_dir}")
    masks = prune(loaded.module, 0.5)
    with torch.no_grad():
        loaded.module.model.layers[0].mlp.down_proj.weight.add_(1.0)
    with pytest.raises(StarfishError, match="non-zero pruned entries"):
        save_hf_folder(loaded.module, None, tmp_path / "m", masks)
    assert not (tmp_path / "m").exists()


def test_fused_mixture_of_experts_is_refused(tmp_path):
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                        architectures=["MixtralForCausalLM"])
    folder = save_tiny(tmp_path / "moe", cfg)
    with pytest.raises(StarfishError, match="mixture-of-experts.*3-D"):
        create_model(f"hf:{folder}")
