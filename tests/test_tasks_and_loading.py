"""Streamed evaluation (dict batches through a DataLoader), the classification task, and the
calibration budget that is checked before anything is decoded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import CIFAR
from starfish.nn.batch import LABELS, PIXELS
from starfish.data.images import ImageFiles, images_only, select_images
from starfish.errors import StarfishError
from starfish.tasks.evaluate import Predictions, predict, summarize
from starfish.data.loading import decode_calibration, estimate_bytes, stream
from starfish.tasks import Evaluation, Task, get_task, list_tasks


def tiny_classifier(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 10))


def transform():
    import torchvision.transforms as T

    return T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])


@pytest.fixture(scope="module")
def files(shared) -> ImageFiles:
    data, _, _ = select_images(CIFAR / "test", transform(), 40, 0, "eval", balanced=True)
    return data


def test_image_files_yield_batch_items_and_stream_in_dict_batches(files):
    item = files[0]
    assert set(item) == {PIXELS, LABELS} and item[PIXELS].shape == (3, 32, 32) and 0 <= item[LABELS] < 10
    batches = list(stream(files, 16))
    assert [b[PIXELS].shape[0] for b in batches] == [16, 16, 8]
    assert torch.equal(torch.cat([b[LABELS] for b in batches]), torch.tensor(files.labels))
    assert torch.equal(images_only(files)[5], files[5][PIXELS])


def test_classification_matches_logits_computed_in_one_go(files):
    dense, sparse = tiny_classifier(0), tiny_classifier(1)
    task = get_task("classification")
    both = task.evaluate({"dense": dense, "sparse": sparse}, stream(files, 7), reference="dense")
    ref, pred = predict(dense, files, device="cpu"), predict(sparse, files, device="cpu")
    expected = summarize(pred, ref)
    assert both["sparse"]["top1"] == pytest.approx(expected["top1"])
    assert both["sparse"]["agreement"] == pytest.approx(expected["agreement"])
    assert both["sparse"]["kl"] == pytest.approx(expected["kl"], rel=1e-5) and expected["kl"] > 0
    assert both["dense"]["top1"] == pytest.approx(summarize(ref)["top1"]) and "kl" not in both["dense"]
    # the reference's logits are remembered: a later call compares without running it again
    assert task.has_reference("dense")
    alone = task.evaluate({"sparse": sparse}, stream(files, 13), reference="dense")
    assert alone["sparse"] == pytest.approx(both["sparse"])


def test_unlabelled_data_has_no_top1_but_still_compares():
    data = torch.utils.data.TensorDataset(torch.randn(9, 3, 8, 8), torch.full((9,), -1))
    out = get_task("classification").evaluate({"dense": tiny_classifier(0), "s": tiny_classifier(2)}, stream(data, 4))
    assert out["s"]["top1"] is None and 0 <= out["s"]["agreement"] <= 1 and out["s"]["samples"] == 9


class _PairTask(Task):
    """A task that cannot store outputs: it must see the reference model in every call."""

    name = "pairs"

    def __init__(self):
        self.calls: list[list[str]] = []

    def evaluate(self, models, batches, reference="dense", device=None):
        self.calls.append(sorted(models))
        for _ in batches:
            pass
        return {label: {"models": len(models)} for label in models}


def test_evaluation_passes_the_reference_only_when_the_task_has_not_kept_it(files):
    dense, sparse = tiny_classifier(0), tiny_classifier(1)
    pairs = _PairTask()
    scoring = Evaluation(pairs, lambda: stream(files, 20), dense, torch.device("cpu"))
    scoring.score("dense", dense)
    scoring.score("healed", sparse)
    assert pairs.calls == [["dense"], ["dense", "healed"]]
    runs = []
    dense.register_forward_hook(lambda *a: runs.append(1))
    scoring = Evaluation(get_task("classification"), lambda: stream(files, 20), dense, torch.device("cpu"))
    scoring.score("dense", dense)
    scoring.score("pruned", sparse)
    scoring.score("healed", sparse)
    assert len(runs) == 2  # two batches, once: the dense logits were kept
    assert set(scoring.scores) == {"dense", "pruned", "healed"}
    assert "classification" in list_tasks()


def test_calibration_is_refused_over_its_budget_before_decoding(files, monkeypatch):
    per_image = 3 * 32 * 32 * 4 + 8
    assert estimate_bytes(files) == len(files) * per_image
    decoded = []
    original = ImageFiles.__getitem__
    monkeypatch.setattr(ImageFiles, "__getitem__", lambda self, i: decoded.append(i) or original(self, i))
    with pytest.raises(StarfishError, match="--calib-max-gb"):
        decode_calibration(files, max_gb=(len(files) * per_image - 1) / 1024**3)
    assert decoded == [0]  # only the one sample the estimate needs
    mapping = decode_calibration(files, max_gb=(len(files) * per_image) / 1024**3, batch_size=16)
    assert mapping[PIXELS].shape == (40, 3, 32, 32) and mapping[LABELS].tolist() == files.labels


def test_predict_accepts_tuple_datasets_and_dict_datasets(files):
    model = tiny_classifier(3)
    pairs = torch.utils.data.TensorDataset(images_only(files), torch.tensor(files.labels))
    a, b = predict(model, pairs, batch_size=9, device="cpu"), predict(model, files, batch_size=11, device="cpu")
    assert isinstance(a, Predictions) and torch.allclose(a.logits, b.logits, atol=1e-6) and torch.equal(a.labels, b.labels)
