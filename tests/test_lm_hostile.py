"""Hostile inputs to the language-model surfaces, round 2: half precision, unchecked last steps,
overflowing perplexity, broken ``hf:`` folders and text, sizes beyond what the data or the model
holds. Each ends in a healed model that is finite, or in one line (exit 2) before heavy work with
no output written and no input touched."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from lm_tiny import llama_config, save_tiny
from starfish.cli import main
from starfish.heal import HealConfig, heal

from test_heal_precision import _llama
from test_lm_cli import VOCAB, texts  # noqa: F401  (fixture)
from test_reliability import no_heavy_work, refused  # noqa: F401  (fixture)

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama") / "llama", llama_config(VOCAB))


def lm_args(model_dir, texts, out, *extra: str) -> list[str]:
    return [
        "run", "--model", f"hf:{model_dir}", "--calib", str(texts / "calib.txt"), "--calib-size", "16",
        "--seq-len", "16", "--eval", str(texts / "eval.txt"), "--eval-size", "4", "--eval-seq-len", "32",
        "--sparsity", "0.7", "--seed", "0", "--epochs", "4", "--batch-size", "4", "--no-progress", "--out", str(out), *extra,
    ]


# --- 1. half-precision weights heal through float32 master weights; nothing unchecked is written --------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_llama_heals_to_finite_weights_below_the_pruned_perplexity(dtype, llama, texts, tmp_path):
    out = tmp_path / "out"
    assert main(lm_args(llama, texts, out, "--dtype", dtype, "--healer", "kd", "--lr", "3e-3")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["heal"]["master_weights"] == f"float32 (loaded {dtype})" and not report["heal"]["diverged"]
    assert report["perplexity"]["healed"] < report["perplexity"]["pruned"]
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {getattr(torch, dtype)}
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


class _BreakingSGD(torch.optim.SGD):
    """An optimizer whose every step leaves NaN in the weights (a step far too large, in any dtype)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.fill_(float("nan"))


@pytest.fixture()
def breaking_optimizer(monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("starfish.heal.training"), "make_optimizer", lambda params, config: _BreakingSGD(params, lr=config.lr))


def test_a_last_step_that_breaks_the_weights_is_caught_and_rolled_back(breaking_optimizer):
    """The last step's weights are scored by no loss, so they are checked themselves."""
    dense, sparse, masks, calib, pattern = _llama()
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    config = HealConfig(optimizer="sgd", max_steps=1, epochs=1, batch_size=4, device="cpu", progress=False)
    result = heal(dense, sparse, masks, calib, config, block_pattern=pattern)
    assert result.stopped_reason == "the weights became non-finite in step 0" and result.best_step == 0
    assert all(torch.equal(before[k], v) for k, v in sparse.state_dict().items())  # the checked step-0 weights


def test_non_finite_weights_without_a_kept_copy_are_refused_not_written(breaking_optimizer, llama, texts, tmp_path, capsys):
    from starfish.errors import StarfishError

    dense, sparse, masks, calib, pattern = _llama()
    config = HealConfig(max_steps=1, epochs=1, batch_size=4, device="cpu", progress=False, keep_best=False)
    with pytest.raises(StarfishError, match="non-finite.*lower --lr"):
        heal(dense, copy.deepcopy(sparse), masks, calib, config, block_pattern=pattern)
    out = tmp_path / "out"  # the command line keeps the checked weights of step 0 and writes those
    assert main(lm_args(llama, texts, out, "--max-steps", "1")) == 0
    assert "became non-finite in step 0" in capsys.readouterr().err
    assert all(bool(torch.isfinite(w).all()) for w in load_file(str(out / "model" / "model.safetensors")).values())


# --- 3. a perplexity beyond exp()'s range is inf with the reason, not a crash at the end ------------------


def _edited_copy(model_dir, folder, edit):
    """A copy of a saved tiny causal LM with ``edit(model)`` applied to its weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


def test_an_overflowing_perplexity_is_reported_as_inf_with_the_reason(llama, texts, tmp_path, capsys):
    broken = _edited_copy(llama, tmp_path / "loud", lambda m: m.lm_head.weight.mul_(1e4))  # logits ~1e4: NLL >> 709
    out = tmp_path / "out"
    assert main(lm_args(broken, texts, out, "--healer", "none")) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "perplexity of dense is inf" in err and "broken or diverged" in err
    report = json.loads((out / "report.json").read_text())
    assert report["perplexity"]["dense"] == float("inf")
    assert "beyond exp()'s range" in report["metrics"]["dense"]["perplexity_note"]
    assert "| inf |" in (out / "report.md").read_text()


# --- 4, 6, 9, 10. an hf: folder is loaded strictly or refused in one line ---------------------------------


def _variant(llama, folder, edit):
    """A copy of the tiny Llama folder whose model.safetensors went through ``edit(tensors)`` (or whose
    files ``edit(folder)`` changed, when ``edit`` takes a path)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(llama, folder)
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    if edit(tensors) is not False:
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return folder


HF_FOLDERS = {
    "truncated safetensors": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]), "SafetensorError"),
    "random safetensors": (lambda f: (f / "model.safetensors").write_bytes(bytes(range(256)) * 64), "SafetensorError"),
    "pickle payload": (lambda f: ((f / "model.safetensors").unlink(), (f / "pytorch_model.bin").write_bytes(
        b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x05true\x94\x85\x94R\x94.")), "could not read the weight files"),
    "NaN weights": (lambda f: None, "NaN or infinite values (first in 'model.layers.0.mlp.up_proj.weight')"),
    "missing tensor": (lambda f: None, "missing: model.layers.0.mlp.up_proj.weight"),
    "unexpected tensor": (lambda f: None, "unexpected: model.extra.weight"),
}
TENSOR_EDITS = {
    "NaN weights": lambda t: t["model.layers.0.mlp.up_proj.weight"].view(-1)[3:5].fill_(float("nan")),
    "missing tensor": lambda t: t.pop("model.layers.0.mlp.up_proj.weight"),
    "unexpected tensor": lambda t: t.__setitem__("model.extra.weight", torch.zeros(3)),
}


@pytest.mark.parametrize("case", list(HF_FOLDERS))
def test_a_broken_hf_folder_is_a_one_line_refusal(case, llama, texts, tmp_path, capsys):
    import hashlib

    folder = tmp_path / "model"
    edit_files, needle = HF_FOLDERS[case]
    _variant(llama, folder, TENSOR_EDITS.get(case, lambda t: False))
    edit_files(folder)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    out = tmp_path / "out"
    refused(capsys, lm_args(folder, texts, out), needle)
    assert not out.exists() and [p for p in tmp_path.iterdir()] == [folder]
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_a_tied_head_is_not_a_missing_tensor(texts, tmp_path):
    config = llama_config(VOCAB)
    config.tie_word_embeddings = True
    tied = save_tiny(tmp_path / "tied", config)
    assert "lm_head.weight" not in load_file(str(tied / "model.safetensors"))
    assert main(lm_args(tied, texts, tmp_path / "out", "--healer", "none")) == 0


def test_float16_overflow_of_float32_weights_is_refused_with_the_fix(llama, texts, tmp_path, capsys):
    loud = _variant(llama, tmp_path / "loud", lambda t: t["model.layers.1.mlp.down_proj.weight"].view(-1)[0].fill_(1e6))
    refused(capsys, lm_args(loud, texts, tmp_path / "out", "--dtype", "float16"), "once loaded in float16")


@pytest.mark.parametrize("arch", ["BertForMaskedLM", "LlamaForSequenceClassification"])
def test_hf_models_that_are_not_causal_lms_name_what_is_supported(arch, texts, tmp_path, capsys):
    from transformers import AutoConfig, BertConfig

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32) \
        if arch.startswith("Bert") else llama_config(VOCAB)
    config.architectures = [arch]
    folder = tmp_path / "m"
    folder.mkdir()
    config.save_pretrained(folder)
    assert AutoConfig.from_pretrained(folder).architectures == [arch]
    refused(capsys, lm_args(folder, texts, tmp_path / "out"), f"is a {arch}; starfish supports Hugging Face causal language models")


# --- 5. text that is not UTF-8 --------------------------------------------------------------------------


@pytest.mark.parametrize("name,data,needle", [
    ("invalid.txt", "the quick brown fox".encode() + b"\xff\xfe\x00 jumps", "not UTF-8 text (byte offset 19: 0xff)"),
    ("binary.txt", bytes(range(128, 256)) * 8, "not UTF-8 text (byte offset 0: 0x80)"),
    ("odd.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "not UTF-8 text (byte offset 28: 0xe9)"),
    ("broken16.txt", b"\xff\xfe" + "the fox".encode("utf-16-le") + b"\x00\xd8", "not UTF-16 text"),
])
def test_text_that_is_not_utf8_is_refused_with_the_byte_offset(name, data, needle, llama, texts, tmp_path, capsys):
    bad = tmp_path / name
    bad.write_bytes(data)
    for flag in ("--calib", "--eval"):
        args = lm_args(llama, texts, tmp_path / "out", flag, str(bad))
        refused(capsys, args, f"{bad} is {needle}")
    assert not (tmp_path / "out").exists() and bad.read_bytes() == data


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig"])
def test_text_with_a_byte_order_mark_is_decoded_by_it(encoding, tmp_path):
    import codecs

    from starfish.data.text import read_documents

    text = "the quick brown fox — naïve café\nsecond line"
    bom = {"utf-16-be": codecs.BOM_UTF16_BE}.get(encoding, b"")
    (tmp_path / "a.txt").write_bytes(bom + text.encode(encoding))
    assert read_documents(tmp_path / "a.txt") == [text]


# --- 7, 8, 13. lengths, sizes and tasks a language model cannot take ------------------------------------


@pytest.mark.parametrize("family,flags,needle", [
    ("gpt2", ("--seq-len", "65"), "--seq-len 65 is longer than the model's context of 64 tokens; pass --seq-len 64 or less"),
    ("gpt2", ("--eval-seq-len", "100"), "--eval-seq-len 100 is longer than the model's context of 64 tokens"),
    ("llama", ("--seq-len", "129"), "--seq-len 129 is longer than the model's context of 128 tokens"),
    ("llama", ("--calib-size", "1000000000000"), "over the 4 GB budget; lower --calib-size or raise --calib-max-gb"),
    ("llama", ("--holdout-size", "1000000000000"), "lower --holdout-size or raise --calib-max-gb"),
    ("llama", ("--task", "classification"), "--task classification scores image classifiers"),
])
def test_lengths_sizes_and_tasks_beyond_the_model_or_budget_are_refused(family, flags, needle, texts, tmp_path, capsys, no_heavy_work):
    """Decided from config.json alone: neither the model nor any text is loaded first."""
    from lm_tiny import gpt2_config

    model = save_tiny(tmp_path / family, gpt2_config(VOCAB) if family == "gpt2" else llama_config(VOCAB))
    capsys.readouterr()  # saving the model's progress bar
    refused(capsys, lm_args(model, texts, tmp_path / "out", *flags), needle)
    assert not (tmp_path / "out").exists()


def test_a_language_task_on_an_image_model_is_refused(tmp_path, capsys):
    refused(capsys, ["run", "--model", "cifar10-resnet20", "--task", "perplexity", "--healer", "none", "--out", str(tmp_path / "o")],
            "--task perplexity scores causal language models")


# --- 14, 15. outputs: never inside the input model folder; written with the user's umask -----------------


def test_out_inside_the_input_model_folder_is_refused(llama, texts, capsys, no_heavy_work):
    import hashlib

    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in llama.iterdir()}
    refused(capsys, lm_args(llama, texts, llama / "healed"), "lies inside the input folder")
    refused(capsys, lm_args(llama, texts, llama, "--force"), "would overwrite the input")
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in llama.iterdir()}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_output_is_written_with_the_users_umask(umask, llama, texts, tmp_path):
    import os
    import stat

    previous = os.umask(umask)
    try:
        out = tmp_path / "out"
        assert main(lm_args(llama, texts, out, "--healer", "none")) == 0
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in (out, *out.rglob("*"))}
    expected = {k: (0o777 if (out / k).is_dir() else 0o666) & ~umask for k in modes}
    assert "model/model.safetensors" in modes and "masks.safetensors" in modes
    assert modes == expected


def test_an_hf_image_classifier_folder_is_loaded_strictly_too(tmp_path, capsys):
    """The same strict loading for a transformers image classifier: a tensor left out is named."""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTForImageClassification

    from starfish.errors import StarfishError
    from starfish.models import create_model

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=3)
    ViTForImageClassification(cfg).save_pretrained(tmp_path)
    assert create_model(f"hf:{tmp_path}").module.config.num_labels == 3  # the intact folder loads
    assert create_model(f"hf:{tmp_path}", num_classes=5).module.config.num_labels == 5  # a new head starts fresh, by request
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors.pop("vit.encoder.layer.0.intermediate.dense.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StarfishError, match=r"do not fit its config.json \(missing: vit\."):
        create_model(f"hf:{tmp_path}")
