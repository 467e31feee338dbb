"""The Python API and the CLI resolve a job the same way (issue 21): one function decides the heal
defaults of a model's kind (``defaults.resolve_heal_settings``), and ``prune_and_heal`` brings the
same job to a transformers model held in memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lm_tiny import gpt2_config, llama_config, save_tiny, tiny_tokenizer, write_texts
from starfish import HealConfig, RunConfig, StarfishError, prune_and_heal, run
from starfish.cli import main
from starfish.experiments.defaults import LANGUAGE_MODEL_HEAL

VOCAB = len(tiny_tokenizer())


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return write_texts(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama") / "llama", llama_config(VOCAB))


def test_runconfig_from_python_takes_the_language_model_defaults(llama_dir):
    lm = RunConfig(model=f"hf:{llama_dir}").heal
    assert {k: getattr(lm, k) for k in LANGUAGE_MODEL_HEAL} == LANGUAGE_MODEL_HEAL and lm.budget == "auto"
    named = RunConfig(model=f"hf:{llama_dir}", heal={"lr": 1e-3, "epochs": 2}).heal
    assert named.lr == 1e-3 and named.healer == LANGUAGE_MODEL_HEAL["healer"]
    assert named.budget == "fixed"  # a named epoch count asks for that much training, as --epochs does
    blockwise = RunConfig(model=f"hf:{llama_dir}", heal={"scope": "blockwise"}).heal
    assert blockwise.healer == "starfish"  # kd reads logits; a lone block has none
    whole = RunConfig(model=f"hf:{llama_dir}", heal=HealConfig(lr=1e-3)).heal
    assert whole.healer == "starfish" and whole.batch_size == 32  # a HealConfig passed whole is taken as it is
    image = RunConfig(model="cifar10-resnet20").heal
    assert image.healer == "starfish" and image.batch_size == 32 and image.lr == 6e-4 and image.budget == "auto"
    with pytest.raises(StarfishError, match="heal.lrr"):
        RunConfig(model=f"hf:{llama_dir}", heal={"lrr": 1e-3})


def test_python_run_and_cli_run_write_identical_config_and_outputs(llama_dir, texts, tmp_path):
    """The issue's done-when: the same job from ``starfish.run(RunConfig(...))`` and from ``starfish run``
    writes a byte-identical config.json, model weights and masks."""
    common = dict(calib=str(texts / "calib.txt"), calib_size=8, seq_len=16, eval=str(texts / "eval.txt"), eval_size=2, eval_seq_len=32, seed=0)
    py_out, cli_out = tmp_path / "py", tmp_path / "cli"
    run(RunConfig(model=f"hf:{llama_dir}", **common, heal={"max_steps": 2, "progress": False}, out=str(py_out)))
    assert main([
        "run", "--model", f"hf:{llama_dir}", "--calib", common["calib"], "--calib-size", "8", "--seq-len", "16",
        "--eval", common["eval"], "--eval-size", "2", "--eval-seq-len", "32", "--seed", "0", "--max-steps", "2",
        "--no-progress", "--out", str(cli_out),
    ]) == 0
    assert (py_out / "config.json").read_bytes() == (cli_out / "config.json").read_bytes()
    saved = json.loads((py_out / "config.json").read_text())
    assert saved["heal"]["healer"] == LANGUAGE_MODEL_HEAL["healer"] and saved["heal"]["budget"] == "fixed"
    for name in ("model/model.safetensors", "masks.safetensors"):
        a, b = load_file(py_out / name), load_file(cli_out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    py_report, cli_report = (json.loads((o / "report.json").read_text()) for o in (py_out, cli_out))
    assert py_report["perplexity"] == cli_report["perplexity"]


def test_prune_and_heal_on_a_transformers_model_in_memory(llama_dir, texts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    documents = (texts / "calib.txt").read_text().split("\n\n")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    same = prune_and_heal(model, tokenizer, documents, sparsity=0.5, calib_size=8, seq_len=16, heal={"max_steps": 3}, progress=False)
    assert same is model
    masks = model.starfish_masks
    assert model.starfish_heal["healer"] == LANGUAGE_MODEL_HEAL["healer"] and model.starfish_heal["steps"] == 3
    assert masks.sparsity() == pytest.approx(0.5, abs=1e-6)  # the sparsity asked for
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name  # the mask contract
        assert not torch.equal(params[name].detach()[mask], before[name][mask]), f"{name} was not healed"

    model.save_pretrained(tmp_path / "healed")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    for name, mask in masks.items():
        assert torch.equal(again.get_parameter(name).detach(), params[name].detach())


def test_prune_and_heal_refuses_bad_input_before_work(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, message in (
        (dict(texts=[]), "non-empty list of strings"),
        (dict(texts="some text", heal={"lr": "fast"}), "heal.lr"),
        (dict(texts="some text", pruner="nope"), "nope"),
        (dict(texts="some text", sparsity=1.5), "sparsity"),
    ):
        with pytest.raises(StarfishError, match=message):
            prune_and_heal(model, tokenizer, **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # untouched
    gpt2 = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "gpt2", gpt2_config(VOCAB)))
    with pytest.raises(StarfishError, match="Conv1D"):
        prune_and_heal(gpt2, tokenizer, "some text")


def test_the_modality_of_a_model_decides_its_kind_once(llama_dir):
    from starfish.experiments.modality import IMAGES, TEXT, modality_of_model

    assert modality_of_model(f"hf:{llama_dir}") is TEXT and TEXT.default_task == "perplexity"
    assert modality_of_model("cifar10-resnet20") is IMAGES and IMAGES.default_task == "classification"
    assert TEXT.auto_repair()[0] == "none" and IMAGES.auto_repair() is None
    assert TEXT.candidate_defaults(None) == {"allocation": ["uniform"], "repair": ["none"]}
    assert IMAGES.candidate_defaults("2:4")["allocation"] == ["uniform"] and IMAGES.candidate_defaults(None)["allocation"] is None
