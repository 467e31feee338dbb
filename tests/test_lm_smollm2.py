"""The real SmolLM2-135M-Instruct (installed by scripts/install_smollm2.py) on real WikiText-2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STARFISH_SHARED", REPO.parent / "shared"))
SMOLLM2 = Path(os.environ.get("STARFISH_SMOLLM2") or REPO / ".cache" / "smollm2-135m")
WIKITEXT_TEST = SHARED / "data" / "wikitext2" / "test.txt"


@pytest.mark.slow
@pytest.mark.shared
def test_smollm2_dense_perplexity_on_one_wikitext_window():
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"SmolLM2 folder {SMOLLM2} absent: run `python scripts/install_smollm2.py` (or set STARFISH_SMOLLM2)")
    if not WIKITEXT_TEST.is_file():
        pytest.fail(f"the shared WikiText-2 test split is missing at {WIKITEXT_TEST}; set STARFISH_SHARED")
    from starfish.tasks.lm_eval import evaluate_lm
    from starfish.models import create_model
    from starfish.data.text import evaluation_windows

    lm = create_model(f"hf:{SMOLLM2}")
    assert lm.task == "causal-lm" and lm.block_pattern == r"model\.layers\.\d+"
    assert sum(p.numel() for p in lm.module.parameters()) == pytest.approx(134.5e6, rel=0.01)
    windows = evaluation_windows(WIKITEXT_TEST, lm.extra["tokenizer"], seq_len=512, size=1)
    assert windows.protocol()["sha256"].startswith("696cca6b")
    ppl = evaluate_lm({"dense": lm.module}, windows, "cpu")["dense"]["perplexity"]
    assert 10.0 < ppl < 40.0  # 6 windows of 2048 give 22.06; one short window is close to it


def test_install_script_leaves_a_complete_folder_alone(tmp_path, capsys, monkeypatch):
    import importlib.util
    import subprocess

    spec = importlib.util.spec_from_file_location("install_smollm2", REPO / "scripts" / "install_smollm2.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / script.COMPLETE).write_text("done\n")

    def no_pip(*args, **kwargs):
        raise AssertionError("a complete folder must not trigger an install")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert script.main(["--folder", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == str(folder.resolve())
    (folder / script.COMPLETE).unlink()  # an interrupted conversion is not complete
    assert not script.is_complete(folder)


@pytest.mark.slow
@pytest.mark.shared
def test_smollm2_zero_shot_tasks_on_a_few_dozen_items(tmp_path):
    """The real model on a few dozen real items per task through lm-evaluation-harness (lm-eval's own
    command line gives the same numbers on these items: arc_easy acc 0.1667 / acc_norm 0.2917, piqa 0.9167)."""
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"SmolLM2 folder {SMOLLM2} absent: run `python scripts/install_smollm2.py` (or set STARFISH_SMOLLM2)")
    import json

    from starfish.cli import main

    out = tmp_path / "ev"
    assert main(["evaluate", f"hf:{SMOLLM2}", "--tasks", "lambada,piqa,arc_easy", "--eval-limit", "24",
                 "--tasks-data", str(SHARED / "data" / "zeroshot"), "--batch-size", "8", "--out", str(out)]) == 0
    tasks = json.loads((out / "evaluate.json").read_text())["tasks"]
    assert all(tasks[t]["n"] == 24 for t in ("lambada_openai", "piqa", "arc_easy"))
    assert tasks["piqa"]["acc"] > 0.55  # two choices: chance is 0.5
    assert 0.0 <= tasks["arc_easy"]["acc"] <= 1.0 and 0.0 <= tasks["arc_easy"]["acc_norm"] <= 1.0
    assert 1.0 < tasks["lambada_openai"]["perplexity"] < 1000.0 and tasks["lambada_openai"]["acc"] > 0.0
