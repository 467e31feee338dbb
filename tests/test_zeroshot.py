"""Zero-shot tasks through lm-evaluation-harness (starfish evaluate, run/compare --eval-tasks) and
several --eval texts, on tiny models built here; the task files are the real ones in ../shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED
from lm_tiny import LINES, llama_config, save_tiny, tiny_tokenizer
from starfish.cli import main
from starfish.zeroshot import ZeroShot, resolve_task_names
from starfish.zeroshot.catalog import ZEROSHOT_TASKS
from starfish.zeroshot.harness import subset

TASKS_DATA = SHARED / "data" / "zeroshot"
VOCAB = len(tiny_tokenizer())
LIMIT = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("llama"), llama_config(VOCAB))


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    (root / "calib.txt").write_text("\n".join(LINES * 20))
    (root / "eval.txt").write_text("\n\n".join(LINES[::-1] * 30))
    (root / "other.txt").write_text("\n\n".join(" ".join(reversed(line.split())) for line in LINES * 30))
    return root


def test_every_task_reads_its_real_files_into_the_fields_lm_eval_reads():
    counts = {"lambada_openai": 5153, "piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042,
              "winogrande": 1267, "boolq": 3270, "openbookqa": 500, "rte": 277}
    for name, task in ZEROSHOT_TASKS.items():
        docs = task.read([TASKS_DATA / f for f in task.files])
        assert len(docs) == counts[name], name
    arc = ZEROSHOT_TASKS.get("arc_easy").read([TASKS_DATA / "arc/ARC-Easy-Test.jsonl"])[0]
    assert arc["answerKey"] in arc["choices"]["label"] and isinstance(arc["question"], str)
    boolq = ZEROSHOT_TASKS.get("boolq").read([TASKS_DATA / "boolq/superglue_BoolQ_val.jsonl"])
    assert {d["label"] for d in boolq} == {0, 1}
    hella = ZEROSHOT_TASKS.get("hellaswag").read([TASKS_DATA / "hellaswag/hellaswag_val_full.txt.bz2"])[0]
    assert hella["activity_label"] == "Roof shingle removal" and len(hella["endings"]) == 4 and hella["label"] == "3"


def test_task_names_sets_aliases_and_refusals():
    assert resolve_task_names("lambada,arc_e") == ["lambada_openai", "arc_easy"]
    assert len(resolve_task_names("standard")) == 9 and "piqa" in resolve_task_names("standard")
    for bad, words in (("nope", "unknown zero-shot task 'nope'"), ("piqa,piqa", "named twice"), ("piqa,", "comma-separated")):
        with pytest.raises(Exception, match=words):
            resolve_task_names(bad)
    assert subset(10, 4, 0) == subset(10, 4, 0) != subset(10, 4, 1)
    assert subset(10, None, 0) == list(range(10)) and subset(3, 5, 0) == [0, 1, 2]


def _read(folder: Path) -> dict:
    return json.loads((folder / "evaluate.json").read_text())


@pytest.mark.slow
def test_evaluate_equals_lm_evals_own_command_line(tiny, tmp_path):
    """The same folder, items and prompts scored by lm-eval's CLI give exactly starfish's numbers."""
    tasks = "lambada_openai,piqa,arc_easy,hellaswag,winogrande,boolq,openbookqa,rte"
    out = tmp_path / "ev"
    code = main(["evaluate", f"hf:{tiny}", "--tasks", tasks, "--eval-limit", str(LIMIT), "--tasks-data", str(TASKS_DATA),
                 "--batch-size", "4", "--out", str(out)])
    assert code == 0
    ours = _read(out)
    assert ours["protocol"]["limit"] == LIMIT and ours["protocol"]["lm_eval_version"]
    assert ours["protocol"]["files"]["piqa"]["piqa/valid.jsonl"].startswith("93503cc9")
    assert all(ours["tasks"][t]["n"] == LIMIT for t in tasks.split(","))

    include = tmp_path / "tasks"  # the same seeded subsets, written where lm-eval's CLI can include them
    ZeroShot.check(tasks, str(TASKS_DATA), LIMIT, 0).open(include)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cli = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny},dtype=float32",
         "--include_path", str(include), "--tasks", tasks, "--batch_size", "4", "--device", "cpu", "--output_path", str(cli)],
        check=True, env=env, capture_output=True, cwd=tmp_path,
    )
    theirs = json.loads(next(cli.rglob("results_*.json")).read_text())["results"]
    for task in tasks.split(","):
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in theirs[task]:
                assert ours["tasks"][task][metric] == pytest.approx(theirs[task][f"{metric},none"], rel=1e-6, abs=1e-9), (task, metric)


def test_evaluate_refuses_bad_input_before_loading_with_one_line(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "never"
    cases = [
        (["--tasks", "nope"], "unknown zero-shot task"),
        (["--tasks", "piqa", "--tasks-data", str(tmp_path / "missing")], "needs"),
        (["--eval", str(tmp_path / "missing.txt")], "does not exist"),
        ([], "nothing to score"),
    ]
    for extra, words in cases:
        assert main(["evaluate", f"hf:{tiny}", *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err and not out.exists()
    assert main(["evaluate", str(tmp_path), "--tasks", "piqa", "--out", str(out)]) == 2  # not a run output
    assert "neither a starfish run output" in capsys.readouterr().err

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["evaluate", f"hf:{tiny}", "--tasks", "piqa", "--out", str(out)]) == 2
    assert "starfish-heal[eval]" in capsys.readouterr().err


def test_run_refuses_eval_tasks_for_an_image_model_before_loading(tmp_path, capsys):
    code = main(["run", "--model", "cifar10-resnet20", "--eval-tasks", "piqa", "--healer", "none", "--out", str(tmp_path / "o")])
    assert code == 2 and "applies to causal language models" in capsys.readouterr().err
    code = main(["run", "--model", "cifar10-resnet20", "--eval", "a", "--eval", "b", "--healer", "none", "--out", str(tmp_path / "o")])
    assert code == 2 and "more than one --eval" in capsys.readouterr().err


@pytest.mark.slow
def test_run_scores_every_state_on_two_texts_and_the_tasks_and_evaluate_rescores_the_output(tiny, texts, tmp_path):
    out = tmp_path / "run"
    code = main([
        "run", "--model", f"hf:{tiny}", "--calib", str(texts / "calib.txt"), "--calib-size", "8", "--seq-len", "16",
        "--eval", str(texts / "eval.txt"), "--eval", str(texts / "other.txt"), "--eval-size", "3", "--eval-seq-len", "32",
        "--eval-tasks", "piqa,lambada", "--eval-limit", str(LIMIT), "--tasks-data", str(TASKS_DATA),
        "--sparsity", "0.5", "--pruner", "wanda", "--healer", "kd", "--epochs", "1", "--batch-size", "4", "--no-progress", "--out", str(out),
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    by_text = report["perplexity_by_text"]
    assert list(by_text) == ["eval", "other"]
    assert by_text["eval"]["perplexity"]["healed"] == pytest.approx(report["perplexity"]["healed"])
    assert set(by_text["other"]["perplexity"]) == {"dense", "pruned", "healed"}
    assert by_text["other"]["perplexity"]["dense"] != by_text["eval"]["perplexity"]["dense"]
    zs = report["zeroshot"]
    assert zs["tasks"] == ["piqa", "lambada_openai"] and set(zs["scores"]) == {"dense", "pruned", "healed"}
    assert all(zs["scores"][k]["tasks"]["piqa"]["n"] == LIMIT for k in zs["scores"])
    assert "Zero-shot tasks" in (out / "report.md").read_text() and "Perplexity per text" in (out / "report.md").read_text()
    # healing kept the mask contract in the written folder
    masks = load_file(str(out / "masks.safetensors"))
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.count_nonzero(weights[n][~m]) == 0 for n, m in masks.items())

    again = tmp_path / "again"
    assert main(["evaluate", str(out), "--tasks", "piqa,lambada", "--eval-limit", str(LIMIT), "--tasks-data", str(TASKS_DATA),
                 "--eval", str(texts / "other.txt"), "--eval-size", "3", "--eval-seq-len", "32", "--out", str(again)]) == 0
    rescored = _read(again)
    healed = zs["scores"]["healed"]["tasks"]
    assert rescored["tasks"]["piqa"]["acc"] == pytest.approx(healed["piqa"]["acc"])
    assert rescored["tasks"]["lambada_openai"]["perplexity"] == pytest.approx(healed["lambada_openai"]["perplexity"], rel=1e-4)
    assert rescored["perplexity"]["other"]["perplexity"] == pytest.approx(by_text["other"]["perplexity"]["healed"], rel=1e-4)


@pytest.mark.slow
def test_compare_scores_tasks_and_texts_per_row(tiny, texts, tmp_path):
    out = tmp_path / "cmp"
    code = main([
        "compare", "--model", f"hf:{tiny}", "--calib", str(texts / "calib.txt"), "--calib-size", "8", "--seq-len", "16",
        "--eval", str(texts / "eval.txt"), "--eval", str(texts / "other.txt"), "--eval-size", "2", "--eval-seq-len", "32",
        "--eval-tasks", "arc_easy", "--eval-limit", "4", "--tasks-data", str(TASKS_DATA),
        "--sparsities", "0.5", "--healers", "none,kd", "--epochs", "1", "--batch-size", "4", "--no-progress", "--out", str(out),
    ])
    assert code == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["healer"] for r in rows] == ["none", "kd"]
    assert all(r["zeroshot"]["tasks"]["arc_easy"]["n"] == 4 and r["perplexity_texts"]["other"] > 1 for r in rows)
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["zeroshot"]["limit"] == 4 and "other" in protocol["texts"]
    assert "Further texts and zero-shot tasks" in (out / "compare.md").read_text()
