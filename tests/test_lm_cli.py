"""`starfish run` on causal LMs end to end: prune, heal, evaluate, save a Hugging Face folder, reload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lm_tiny import gpt2_config, llama_config, save_tiny, tiny_tokenizer, write_texts
from starfish.cli import main
from starfish.tasks.lm_eval import evaluate_lm
from starfish.data.text import evaluation_windows

VOCAB = len(tiny_tokenizer())


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return write_texts(tmp_path_factory.mktemp("text"))


def _run(model_dir, texts, out, *extra: str) -> int:
    return main([
        "run", "--model", f"hf:{model_dir}", "--calib", str(texts / "calib.txt"), "--calib-size", "16",
        "--seq-len", "16", "--eval", str(texts / "eval.txt"), "--eval-size", "4", "--eval-seq-len", "32",
        "--sparsity", "0.5", "--seed", "0", "--epochs", "3", "--batch-size", "4", "--no-progress", "--out", str(out), *extra,
    ])


@pytest.mark.parametrize("family,pruner", [("llama", "wanda"), ("gpt2", "sparsegpt"), ("llama", "magnitude")])
def test_run_prunes_heals_and_saves_a_folder_transformers_reloads(family, pruner, texts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = llama_config(VOCAB) if family == "llama" else gpt2_config(VOCAB)
    model_dir = save_tiny(tmp_path / family, config)
    out = tmp_path / "out"
    assert _run(model_dir, texts, out, "--pruner", pruner) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "perplexity"
    ppl = report["perplexity"]
    assert all(ppl[k] is not None and ppl[k] > 1 for k in ("dense", "pruned", "healed"))
    assert report["eval"]["windows"] == 4 and report["eval"]["seq_len"] == 32 and report["eval"]["tokens"] == 128
    assert len(report["eval"]["text_sha256"]) == 64
    assert report["calibration"] == {"source": str(texts / "calib.txt"), "size": 16, "seq_len": 16, "seed": 0}
    assert report["heal_seconds"] > 0 and abs(report["sparsity"] - 0.5) < 1e-9
    assert report["heal"]["steps"] == 12  # 16 sequences / batch 4 x 3 epochs
    config_json = json.loads((out / "model" / "config.json").read_text())
    assert "sparsity_config" not in config_json

    # the folder loads with plain transformers and reproduces the reported healed perplexity
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    windows = evaluation_windows(texts / "eval.txt", tok, 32, 4)
    again = evaluate_lm({"healed": model}, windows, "cpu", reference=None)["healed"]["perplexity"]
    assert again == pytest.approx(ppl["healed"], rel=1e-4)

    # every weight named in the masks is exactly zero where its mask is zero, in the checkpoint's layout
    masks = load_file(str(out / "masks.safetensors"))
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert masks and all(name in weights for name in masks)
    for name, keep in masks.items():
        assert keep.dtype == torch.bool and keep.shape == weights[name].shape
        assert torch.count_nonzero(weights[name][~keep]) == 0
    assert sum(int((~m).sum()) for m in masks.values()) == sum(m.numel() for m in masks.values()) // 2


@pytest.mark.slow
def test_blockwise_healing_and_kd_run_on_a_language_model(texts, tmp_path):
    model_dir = save_tiny(tmp_path / "llama", llama_config(VOCAB))
    assert _run(model_dir, texts, tmp_path / "bw", "--pruner", "wanda", "--heal-scope", "blockwise") == 0
    assert json.loads((tmp_path / "bw" / "report.json").read_text())["heal"]["scope"] == "blockwise"
    assert _run(model_dir, texts, tmp_path / "kd", "--pruner", "magnitude", "--healer", "kd") == 0
    report = json.loads((tmp_path / "kd" / "report.json").read_text())
    assert report["healer"] == "kd" and report["perplexity"]["healed"] is not None


def test_language_model_misuse_is_a_one_line_error(texts, tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "llama", llama_config(VOCAB))
    assert _run(model_dir, texts, tmp_path / "a", "--calib-size", "0.5") == 2
    assert "whole number" in capsys.readouterr().err
    assert _run(model_dir, texts, tmp_path / "b", "--input-size", "32") == 2
    assert "image models" in capsys.readouterr().err
    assert _run(model_dir, texts, tmp_path / "c", "--eval-seq-len", "1") == 2
    assert "at least 2" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.slow
def test_compare_ranks_healers_by_perplexity_on_a_language_model(texts, tmp_path):
    """`starfish compare` on a causal LM: every healer from the same pruned weights, scored by perplexity."""
    model_dir = save_tiny(tmp_path / "llama", llama_config(VOCAB))
    out = tmp_path / "cmp"
    code = main([
        "compare", "--model", f"hf:{model_dir}", "--calib", str(texts / "calib.txt"), "--calib-size", "16",
        "--seq-len", "16", "--eval", str(texts / "eval.txt"), "--eval-size", "4", "--eval-seq-len", "32",
        "--sparsities", "0.5", "--healers", "none,starfish,starfish@blockwise,kd", "--epochs", "2", "--batch-size", "4",
        "--seed", "0", "--no-progress", "--out", str(out),
    ])
    assert code == 0
    rows = {r["healer"]: r for r in json.loads((out / "compare.json").read_text())}
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["metric"] == "perplexity" and protocol["dense_perplexity"] > 1
    assert protocol["eval"]["windows"] == 4 and protocol["eval"]["tokens"] == 128
    assert len({r["start_sha256"] for r in rows.values()}) == 1  # same pruned start for every healer
    assert all(r["top1"] is None and r["perplexity"] > 1 and r["mask_violations"] == 0 for r in rows.values())
    assert rows["starfish"]["steps"] == rows["kd"]["steps"] == 8
    assert rows["starfish"]["perplexity"] != rows["none"]["perplexity"]
    # the same objective block by block, from the same pruned start, is its own column
    assert rows["starfish@blockwise"]["perplexity"] not in (rows["starfish"]["perplexity"], rows["none"]["perplexity"])
    scopes = {h["name"]: h["scope"] for h in protocol["healers"]}
    assert scopes["starfish@blockwise"] == "blockwise" and scopes["starfish"] == scopes["kd"] == "joint"
    md = (out / "compare.md").read_text()
    best = min(rows.values(), key=lambda r: r["perplexity"])
    assert f"**{best['perplexity']:.2f}**" in md and "lower is better" in md


def test_language_models_get_their_own_heal_defaults_and_flags_win(texts, tmp_path):
    """No heal flag: a causal LM trains with the language-model defaults; a flag or a --config value
    names its own; an image model keeps the recipe's; the resolved values are what config.json saves."""
    from starfish.cli import build_parser, config_from_args
    from starfish.experiments.defaults import LANGUAGE_MODEL_HEAL

    model_dir = save_tiny(tmp_path / "llama", llama_config(VOCAB))
    base = ["run", "--model", f"hf:{model_dir}", "--calib", str(texts / "calib.txt"), "--out", str(tmp_path / "o")]
    parser = build_parser()
    lm = config_from_args(parser.parse_args(base)).heal
    assert {k: getattr(lm, k) for k in LANGUAGE_MODEL_HEAL} == LANGUAGE_MODEL_HEAL
    assert lm.budget == "auto"

    flagged = config_from_args(parser.parse_args([*base, "--lr", "0.002", "--patience", "5"])).heal
    assert flagged.lr == 0.002 and flagged.patience == 5 and flagged.batch_size == LANGUAGE_MODEL_HEAL["batch_size"]

    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({"model": f"hf:{model_dir}", "heal": {"batch_size": 2}}))
    from_file = config_from_args(parser.parse_args(["run", "--config", str(saved), "--out", str(tmp_path / "o2")])).heal
    assert from_file.batch_size == 2 and from_file.lr == LANGUAGE_MODEL_HEAL["lr"]

    image = config_from_args(parser.parse_args(["run", "--model", "cifar10-resnet20", "--out", str(tmp_path / "o3")])).heal
    assert image.batch_size == 32 and image.lr == 6e-4 and image.max_epochs == 60
