"""The label-free LLM healers of issue 22 on tiny Llamas: starfish_norm (STARFISH on what the next
layer reads, after its input norm) and starfish_kd (that term plus next-token KL, balanced).

Each keeps the mask contract, ignores padding, runs through `starfish run` and `compare`; and on a
Llama whose hidden states carry a few channels far larger than the rest, healing lowers perplexity."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lm_tiny import LINES, llama_config, randomly_pruned, save_tiny, tiny_tokenizer, write_texts
from starfish.cli import main
from starfish.experiments.defaults import LANGUAGE_MODEL_HEAL
from starfish.errors import StarfishError
from starfish.heal import HealConfig, heal
from starfish.heal.objectives import get_objective, kd_loss, starfish_loss
from starfish.heal.runner import Runner
from starfish.heal.vocab import head_route
from starfish.masks import Masks
from starfish.heal.norms import norm_points
from starfish.nn.structure import stream_points

NEW = ["starfish_norm", "starfish_kd"]
VOCAB = len(tiny_tokenizer())


def _llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(VOCAB)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


def _pruned(dense: nn.Module) -> tuple[nn.Module, Masks]:
    return randomly_pruned(dense)


def _calibration(n: int = 12, length: int = 9) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(5))
    attention = torch.ones(n, length, dtype=torch.long)
    attention[::2, -3:] = 0  # right padding on half the samples
    ids[attention == 0] = 1
    return {"input_ids": ids, "attention_mask": attention}


def _config(healer: str, **kw) -> HealConfig:
    base = dict(healer=healer, epochs=4, batch_size=4, lr=3e-3, progress=False, device="cpu", kd_weight=None)
    return HealConfig(**(base | kw))


def test_norm_reads_are_the_next_input_norm_and_the_final_norm():
    dense = _llama()
    sample = _calibration(2)
    points = norm_points(dense, stream_points(dense, sample), sample, "starfish_norm")
    assert [(p.block, p.module, p.side) for p in points] == [
        ("model.layers.0", "model.layers.1.input_layernorm", "output"),
        ("model.layers.1", "model.norm", "output"),
    ]


def test_a_model_without_norms_is_refused_in_one_line():
    class NoNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
            self.head = nn.Linear(8, 20)

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.embed(input_ids)
            for layer in self.layers:
                h = layer(h)
            return self.head(h)

    torch.manual_seed(0)
    dense = NoNorm().eval()
    sparse = copy.deepcopy(dense)
    masks = Masks({"layers.0.0.weight": torch.rand(8, 8) < 0.5})
    masks.apply_(sparse)
    calib = {"input_ids": torch.randint(0, 20, (4, 5)), "attention_mask": torch.ones(4, 5, dtype=torch.long)}
    for healer in NEW:
        with pytest.raises(StarfishError, match="no normalization module") as info:
            heal(dense, sparse, masks, calib, _config(healer, max_steps=1))
        assert "\n" not in str(info.value) and "--healer starfish" in str(info.value)


@pytest.mark.parametrize("healer", NEW)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_tokens_never_change_the_loss(healer, side):
    dense = _llama()
    sparse, _ = _pruned(dense)
    ids = torch.randint(3, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2))
    attention = torch.ones(4, 10, dtype=torch.long)
    pad = slice(-4, None) if side == "right" else slice(0, 4)
    attention[1::2, pad] = 0
    other = ids.clone()
    other[attention == 0] = (other[attention == 0] + 7) % VOCAB  # only padding tokens differ
    batch, changed = {"input_ids": ids, "attention_mask": attention}, {"input_ids": other, "attention_mask": attention}
    objective = get_objective(healer)
    points = norm_points(dense, stream_points(dense, batch), batch, healer)
    head = head_route(dense, batch) if objective.needs_logits else None
    config = _config(healer, kd_weight=0.7)
    losses = []
    for b in (batch, changed):
        with torch.no_grad():
            target = Runner(dense, points, torch.device("cpu"), needs_logits=objective.needs_logits, head=head)(b)
            out = Runner(sparse, points, torch.device("cpu"), needs_logits=objective.needs_logits, head=head)(b)
            losses.append(float(objective.loss(out, target, None, config)))
    assert losses[0] > 0 and losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("healer,scope", [("starfish_norm", "joint"), ("starfish_norm", "blockwise"), ("starfish_kd", "joint")])
def test_healing_keeps_the_mask_and_lowers_the_objective(healer, scope):
    dense = _llama()
    sparse, masks = _pruned(dense)
    result = heal(dense, sparse, masks, _calibration(), _config(healer, scope=scope))
    assert masks.violations(sparse) == {}
    assert all(torch.equal(sparse.get_parameter(n) != 0, m) for n, m in masks.items())  # exactly the mask's zeros
    assert result.points[-1] == "output of `model.norm`"
    if scope == "blockwise":
        assert all(b["loss_last"] < b["loss_first"] for b in result.per_block), result.per_block
    else:
        assert result.loss_history[-1] < result.loss_history[0]


def test_gradient_checkpointing_heals_norm_reads_like_without_it():
    dense = _llama()
    runs = []
    for mode in ("off", "on"):
        sparse, masks = _pruned(dense)
        result = heal(dense, sparse, masks, _calibration(), _config("starfish_kd", max_steps=3, grad_checkpoint=mode))
        assert result.grad_checkpoint == (mode == "on") and masks.violations(sparse) == {}
        runs.append(result.loss_history)
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_starfish_kd_balances_both_terms_on_the_first_batch_or_takes_the_given_weight():
    dense = _llama()
    calib = _calibration(4)  # one batch: the first step sees exactly the batch the balance is set on
    sparse, masks = _pruned(dense)
    start = copy.deepcopy(sparse)
    result = heal(dense, sparse, masks, calib, _config("starfish_kd", max_steps=2, cache_dtype="float32"))
    # recompute the two terms on the first batch of the unhealed model, independently of the loop
    first = calib
    points = norm_points(dense, stream_points(dense, first), first, "starfish_kd")
    head = head_route(dense, first)
    with torch.no_grad():
        target = Runner(dense, points, torch.device("cpu"), head=head)(first)
        out = Runner(start, points, torch.device("cpu"), head=head)(first)
        block, kl = float(starfish_loss(out, target, None, None)), float(kd_loss(out, target, None, HealConfig()))
    assert block > 0 and kl > 0
    assert result.kd_weight == pytest.approx(block / kl, rel=1e-5)
    assert result.loss_history[0] == pytest.approx(2 * block, rel=1e-4)  # both terms equal at the first step
    again = heal(dense, copy.deepcopy(start), masks, calib, _config("starfish_kd", max_steps=2, kd_weight=0.25, cache_dtype="float32"))
    assert again.kd_weight == 0.25 and again.loss_history[0] == pytest.approx(block + 0.25 * kl, rel=1e-4)


# ---- end to end through the CLI -------------------------------------------------------------------


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return write_texts(tmp_path_factory.mktemp("text"))


COMMON = ["--calib-size", "16", "--seq-len", "16", "--eval-size", "4", "--eval-seq-len", "32", "--seed", "0", "--batch-size", "4",
          "--no-progress"]


def _run(model_dir, texts, out, *extra: str) -> int:
    return main(["run", "--model", f"hf:{model_dir}", "--calib", str(texts / "calib.txt"), "--eval", str(texts / "eval.txt"),
                 "--sparsity", "0.5", "--epochs", "3", *COMMON, "--out", str(out), *extra])


@pytest.mark.parametrize("extra", [["--healer", "starfish_norm"], ["--healer", "starfish_kd", "--kd-weight", "0.5"], ["--healer", "starfish_kd"]])
def test_run_heals_with_each_new_healer(extra, texts, tmp_path):
    from safetensors.torch import load_file

    model_dir = save_tiny(tmp_path / "llama", llama_config(VOCAB))
    out = tmp_path / "out"
    assert _run(model_dir, texts, out, "--pruner", "wanda", *extra) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["healer"] == extra[1] and report["perplexity"]["healed"] is not None
    assert report["heal"]["steps"] == 12 and abs(report["sparsity"] - 0.5) < 1e-9
    if extra[1] == "starfish_kd":
        weight = report["heal"]["kd_weight"]
        assert weight == 0.5 if "--kd-weight" in extra else weight > 0
    masks = load_file(str(out / "masks.safetensors"))
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert masks and all(torch.count_nonzero(weights[n][~keep]) == 0 for n, keep in masks.items())


@pytest.mark.slow
def test_compare_runs_the_new_healers_beside_kd(texts, tmp_path):
    model_dir = save_tiny(tmp_path / "llama", llama_config(VOCAB))
    out = tmp_path / "cmp"
    code = main(["compare", "--model", f"hf:{model_dir}", "--calib", str(texts / "calib.txt"), "--eval", str(texts / "eval.txt"),
                 "--sparsities", "0.5", "--healers", "none,starfish_norm,starfish_norm@blockwise,starfish_kd,kd", "--epochs", "2",
                 *COMMON, "--out", str(out)])
    assert code == 0
    rows = {r["healer"]: r for r in json.loads((out / "compare.json").read_text())}
    assert set(rows) == {"none", "starfish_norm", "starfish_norm@blockwise", "starfish_kd", "kd"}
    assert all(r["mask_violations"] == 0 and r["perplexity"] > 1 for r in rows.values())
    assert len({r["start_sha256"] for r in rows.values()}) == 1
    assert rows["starfish_norm"]["perplexity"] != rows["none"]["perplexity"]


def test_starfish_kd_block_by_block_is_refused_before_any_work(texts, tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "llama", llama_config(VOCAB))
    out = tmp_path / "bw"
    assert _run(model_dir, texts, out, "--healer", "starfish_kd", "--heal-scope", "blockwise") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--heal-scope joint" in err[0] and not out.exists()


# ---- a Llama with outlier channels ----------------------------------------------------------------

OUTLIERS = [3, 17]  # hidden channels made far larger than the rest
SCALE = 300.0  # how much larger the rows writing those channels start


def _outlier_llama(folder, texts) -> None:
    """A tiny Llama trained briefly on the text, whose residual stream carries a few channels far
    larger than the rest: the rows of every layer's output projections that write those channels are
    scaled up before training, so the trained model relies on them (as real LLMs do)."""
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(VOCAB))
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.weight[OUTLIERS] *= SCALE
    ids = torch.tensor(tok((texts / "calib.txt").read_text().replace("\n", " "))["input_ids"])
    windows = ids[: (len(ids) // 16) * 16].reshape(-1, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(120):
        batch = windows[torch.randint(0, len(windows), (8,), generator=torch.Generator().manual_seed(step))]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _stream_channel_scale(folder, texts) -> tuple[float, float]:
    """(mean |value| of the outlier channels, median over the other channels) of the last layer's output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tiny_tokenizer()(LINES[0])["input_ids"]])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-2]  # before the final norm
    per_channel = hidden.abs().mean(dim=(0, 1))
    rest = [c for c in range(per_channel.numel()) if c not in OUTLIERS]
    return float(per_channel[OUTLIERS].mean()), float(per_channel[rest].median())


@pytest.mark.slow
@pytest.mark.parametrize("pattern", [[], ["--pattern", "2:4"]])
def test_healing_a_llama_with_outlier_channels_lowers_perplexity(pattern, texts, tmp_path):
    folder = tmp_path / "outlier"
    _outlier_llama(folder, texts)
    big, typical = _stream_channel_scale(folder, texts)
    assert big > 15 * typical, (big, typical)  # the model is what this test claims
    for healer in [*NEW, "default"]:  # "default": no --healer flag, so the language-model defaults choose
        out = tmp_path / healer
        chosen = ["--healer", healer] if healer != "default" else []
        assert _run(folder, texts, out, "--pruner", "wanda", *chosen, *pattern) == 0
        report = json.loads((out / "report.json").read_text())
        ppl = report["perplexity"]
        assert report["healer"] == (healer if healer != "default" else LANGUAGE_MODEL_HEAL["healer"])
        assert ppl["healed"] < ppl["pruned"], (healer, ppl)
