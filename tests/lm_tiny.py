"""Tiny causal LMs and a tokenizer built offline for the LM tests (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

LINES = [
    "the quick brown fox jumps over the lazy dog",
    "a small model reads a little text and predicts the next word",
    "pruning removes weights and healing trains the ones that remain",
    "every sentence here is short but the words repeat often enough",
]


def tiny_tokenizer():
    """A word-level tokenizer trained on LINES, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.train_from_iterator(LINES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def llama_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def gpt2_config(vocab: int):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                      architectures=["GPT2LMHeadModel"])


def save_tiny(folder: Path, config) -> Path:
    """A randomly initialised causal LM plus the tiny tokenizer saved into ``folder``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger random weights so logits are far from uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def randomly_pruned(dense: torch.nn.Module, seed: int = 3):
    """(a copy of ``dense`` with half of every prunable weight zeroed at random, its masks)."""
    import copy

    from starfish.masks import Masks
    from starfish.nn.structure import prunable_targets

    g = torch.Generator().manual_seed(seed)
    sparse = copy.deepcopy(dense)
    masks = Masks({t.name: torch.rand(sparse.get_parameter(t.name).shape, generator=g) < 0.5 for t in prunable_targets(sparse)})
    masks.apply_(sparse)
    return sparse, masks


def write_texts(root: Path) -> Path:
    """A calibration and an evaluation text made of LINES, written into ``root``."""
    (root / "calib.txt").write_text("\n".join(LINES * 20))
    (root / "eval.txt").write_text("\n\n".join(LINES[::-1] * 30))
    return root
