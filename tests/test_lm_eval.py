"""Perplexity and dense-vs-sparse agreement of causal LMs, checked against hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lm_tiny import LINES, llama_config, save_tiny, tiny_tokenizer
from starfish.tasks.lm_eval import evaluate_lm
from starfish.models import create_model
from starfish.pruning import prune
from starfish.data.text import evaluation_windows


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp("llama"), llama_config(len(tiny_tokenizer())))
    return create_model(f"hf:{folder}")


@pytest.fixture(scope="module")
def windows(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text("\n\n".join(LINES * 4))
    return evaluation_windows(path, lm.extra["tokenizer"], seq_len=24, size=3)


def test_perplexity_equals_a_hand_computation_on_one_window(lm, windows):
    ids = windows.input_ids[:1]
    one = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    got = evaluate_lm({"dense": lm.module}, one, "cpu")["dense"]
    with torch.no_grad():
        logits = lm.module(input_ids=ids).logits[0]
        hf_loss = lm.module(input_ids=ids, labels=ids).loss  # transformers' own shifted loss
    logp = torch.log_softmax(logits[:-1].double(), -1)
    nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].mean().item()
    assert got["tokens"] == ids.shape[1] - 1
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(hf_loss.item()), rel=1e-5)


def test_identical_models_agree_fully_and_a_pruned_one_does_not(lm, windows):
    twin = copy.deepcopy(lm.module)
    sparse = copy.deepcopy(lm.module)
    prune(sparse, 0.5)
    res = evaluate_lm({"dense": lm.module, "twin": twin, "sparse": sparse}, windows, "cpu")
    assert "kl_from_reference" not in res["dense"]
    assert res["twin"]["kl_from_reference"] == pytest.approx(0.0, abs=1e-9)
    assert res["twin"]["top1_agreement"] == 1.0
    assert res["twin"]["perplexity"] == pytest.approx(res["dense"]["perplexity"], rel=1e-9)
    assert res["sparse"]["kl_from_reference"] > 1e-3 and res["sparse"]["top1_agreement"] < 1.0
    assert res["sparse"]["tokens"] == res["dense"]["tokens"] == 3 * 23
    # KL by hand on the first window
    ids = windows.input_ids[:1]
    with torch.no_grad():
        p = F.log_softmax(lm.module(input_ids=ids).logits[0, :-1].double(), -1)
        q = F.log_softmax(sparse(input_ids=ids).logits[0, :-1].double(), -1)
    one = evaluate_lm({"dense": lm.module, "sparse": sparse}, [next(windows.batches(1))], "cpu")
    assert one["sparse"]["kl_from_reference"] == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-5)


def test_padding_never_counts(lm, windows):
    ids = windows.input_ids[:1, :10]
    padded = torch.cat([ids, torch.full((1, 6), 1)], 1)
    mask = torch.cat([torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)], 1)
    plain = evaluate_lm({"dense": lm.module}, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], "cpu")
    masked = evaluate_lm({"dense": lm.module}, [{"input_ids": padded, "attention_mask": mask}], "cpu")
    assert masked["dense"]["tokens"] == plain["dense"]["tokens"] == 9
    assert masked["dense"]["perplexity"] == pytest.approx(plain["dense"]["perplexity"], rel=1e-5)
