"""An interrupted heal continues with --resume and ends bit-identical to an uninterrupted one (CPU, same seed)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from starfish.cli import main
from starfish.errors import StarfishError
from starfish.heal import HealConfig, heal
from starfish.heal.resume import Checkpointer, ResumePoint
from starfish.masks import Masks
from starfish.common.outputs import resume_dir
from starfish.experiments.run_config import RunConfig, validate

from conftest import REPO
from test_cli import run_args as cli_run_args
from test_reliability import no_heavy_work, refused  # noqa: F401  (fixture)

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs use the thread count of the killed subprocess: a CPU reduction split over another
    number of threads sums in another order, and bit-identity is promised for the same machine setup."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def heal_args(out: Path, *extra: str) -> list[str]:
    """ResNet-20 at 50%, 24 calibration images in batches of 5 (5 batches an epoch, so checkpoints
    every 3 steps land mid-epoch), 4 epochs = 20 steps, no evaluation set (nothing here scores)."""
    tiny = {"--sparsity": "0.5", "--calib-size": "24", "--eval": None, "--eval-size": None, "--epochs": "4",
            "--batch-size": "5", "--repair": "none"}
    return cli_run_args(out, **tiny) + ["--checkpoint-every", "3", *extra]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "starfish", *args], stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for_checkpoint(proc: subprocess.Popen, folder: Path) -> None:
    deadline = time.time() + 240
    while not (folder / "joint.pt").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no checkpoint was written"
        time.sleep(0.01)


def saved_step(folder: Path) -> tuple[int, int]:
    state = torch.load(folder / "joint.pt", weights_only=True)
    return state["step"], state["total"]


def tensors(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / name))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared) -> Path:
    out = tmp_path_factory.mktemp("whole") / "r"
    assert main(heal_args(out)) == 0
    assert not resume_dir(out).exists()  # removed once the output is complete
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory, shared) -> Path:
    """A run SIGKILLed mid-heal, right after its first checkpoint (step 3 of 20, inside epoch 0)."""
    out = tmp_path_factory.mktemp("killed") / "r"
    proc = start(heal_args(out))
    wait_for_checkpoint(proc, resume_dir(out))
    proc.kill()
    proc.communicate(timeout=60)
    step, total = saved_step(resume_dir(out))
    assert 0 < step < total, (step, total)  # killed mid-heal
    assert not out.exists()
    shutil.copytree(resume_dir(out), out.parent / "as-killed")  # for tests that run after the resume
    return out


@pytest.mark.slow
def test_sigkill_mid_heal_then_resume_is_bit_identical(killed, uninterrupted, capsys):
    step, _ = saved_step(resume_dir(killed))
    assert main(heal_args(killed, "--resume")) == 0
    for name in ("model.safetensors", "masks.safetensors"):
        expected, got = tensors(uninterrupted, name), tensors(killed, name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    history = json.loads((uninterrupted / "heal_history.json").read_text())
    assert json.loads((killed / "heal_history.json").read_text()) == history  # losses before the kill restored too
    report = json.loads((killed / "report.json").read_text())
    assert report["resumed_from_step"]["joint"] >= step
    assert not resume_dir(killed).exists()
    assert not [p.name for p in killed.parent.iterdir() if p.name.startswith(".r.")]  # no debris, no lock
    saved = json.loads((killed / "config.json").read_text())
    assert "resume" not in saved and "checkpoint_every" not in saved  # a rerun of config.json starts fresh
    # the mask contract holds in the resumed weights: pruned entries exactly zero, sparsity as asked
    weights, masks = tensors(killed, "model.safetensors"), Masks.load(killed / "masks.safetensors")
    assert all(not weights[k][~m].any() for k, m in masks.items())
    assert abs(masks.sparsity() - 0.5) < 1e-3


def test_a_checkpoint_is_resumed_with_the_same_settings_or_not_at_all(killed, tmp_path, capsys, no_heavy_work):
    # on a copy of the checkpoint as the kill left it
    other = tmp_path / "r"
    shutil.copytree(killed.parent / "as-killed", resume_dir(other))
    before = {p.name: p.read_bytes() for p in resume_dir(other).iterdir()}
    err = refused(capsys, heal_args(other, "--resume", "--lr", "0.001"), "--resume")
    assert "heal.lr=0.0006 there, 0.001 now" in err
    refused(capsys, heal_args(other), "pass --resume to continue it, or --force")  # a plain rerun would lose it
    assert {p.name: p.read_bytes() for p in resume_dir(other).iterdir()} == before
    assert not other.exists()


def test_resume_needs_an_out_and_a_valid_checkpoint_interval(capsys, tmp_path, no_heavy_work):
    with pytest.raises(Exception, match="--resume continues the checkpoint kept beside an output"):
        validate(RunConfig(calib=str(tmp_path), resume=True))
    with pytest.raises(Exception, match="--checkpoint-every"):
        validate(RunConfig(calib=str(tmp_path), checkpoint_every=-1))
    with pytest.raises(SystemExit):
        main(heal_args(tmp_path / "r", "--checkpoint-every", "often"))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'auto', 0 (off) or a number of optimizer steps" in err


def test_resume_without_a_checkpoint_starts_fresh_and_force_discards_one(capsys, tmp_path):
    calib = {"pixel_values": torch.zeros(2, 3)}
    config = RunConfig(out=str(tmp_path / "r"), resume=True)
    assert isinstance(Checkpointer.open(config, calib), Checkpointer)
    assert "--resume starts from the beginning" in capsys.readouterr().err
    folder = resume_dir(tmp_path / "r")
    folder.mkdir()
    (folder / "notes.txt").write_text("not starfish's")  # a folder without the marker is never emptied
    assert Checkpointer.open(RunConfig(out=str(tmp_path / "r"), force=True), calib) is not None
    assert (folder / "notes.txt").exists()
    (folder / "notes.txt").unlink()
    Checkpointer(folder, 1, {"config": {}}).write("joint", {"x": torch.ones(1)}, 1, 2)
    assert Checkpointer.open(RunConfig(out=str(tmp_path / "r"), force=True, checkpoint_every=0), calib) is None
    assert "discarded the healing checkpoint" in capsys.readouterr().err
    assert not folder.exists()


def test_sigterm_after_a_checkpoint_keeps_it_for_resume(tmp_path, shared, capsys, monkeypatch):
    """SIGTERM to this very process once the first checkpoint is on disk (the CLI's own handler turns it
    into an interrupt wherever the program is, exactly as for a separate process)."""
    out = tmp_path / "r"
    original = ResumePoint.step_done

    def signal_after_first_checkpoint(self: ResumePoint) -> None:
        original(self)
        if self.owner.kept is not None:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ResumePoint, "step_done", signal_after_first_checkpoint)
    assert main(heal_args(out)) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err and "rerun the same command with --resume" in err
    step, total = saved_step(resume_dir(out))
    assert 0 < step < total
    assert not out.exists() and not (tmp_path / ".r.lock").exists()


# --- the healing state itself, in-process: dropout (global RNG), BatchNorm, block granularity ---------


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.norm = nn.BatchNorm1d(2 * d)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


class Chain(nn.Module):
    def __init__(self, d: int = 12, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(6, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _pruned() -> tuple[nn.Module, nn.Module, Masks, dict]:
    torch.manual_seed(0)
    dense = Chain().eval()
    sparse = copy.deepcopy(dense)
    masks = Masks({n: torch.rand_like(p) > 0.6 for n, p in sparse.named_parameters() if n.startswith("blocks.") and n.endswith("weight") and p.dim() == 2})
    masks.apply_(sparse)
    return dense, sparse, masks, {"pixel_values": torch.randn(22, 6)}


class Interrupted(KeyboardInterrupt):
    pass


# joint: stopped at step 7, continues from the checkpoint of step 6 (step 7 is replayed);
# blockwise: block 0 finished, block 1 stopped right after its checkpoint at step 4
@pytest.mark.parametrize("scope,stop_at,resumed_at", [("joint", ("joint", 7), 6), ("blockwise", ("block-001", 4), 4)])
def test_an_interrupted_heal_resumes_bit_identically(tmp_path, monkeypatch, scope, stop_at, resumed_at):
    config = HealConfig(epochs=3, batch_size=5, lr=3e-3, device="cpu", progress=False, scope=scope, train_mode=True)
    dense, whole, masks, calib = _pruned()
    torch.manual_seed(1)
    heal(dense, whole, masks, calib, config, block_pattern=r"blocks\.\d+")

    record = {"config": {"scope": scope}}
    dense, cut, masks, calib = _pruned()
    original = ResumePoint.step_done

    def step_then_stop(self: ResumePoint) -> None:
        original(self)
        if (self.key, self.outcome.steps) == stop_at:
            raise Interrupted()

    monkeypatch.setattr(ResumePoint, "step_done", step_then_stop)
    torch.manual_seed(1)
    with pytest.raises(Interrupted):
        heal(dense, cut, masks, calib, config, block_pattern=r"blocks\.\d+", checkpointer=Checkpointer(tmp_path, 2, record))
    monkeypatch.setattr(ResumePoint, "step_done", original)

    dense, resumed, masks, calib = _pruned()
    torch.manual_seed(123)  # whatever the global RNG holds now, the checkpoint's state is what counts
    checkpointer = Checkpointer(tmp_path, 2, record)
    result = heal(dense, resumed, masks, calib, config, block_pattern=r"blocks\.\d+", checkpointer=checkpointer)
    expected, got = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected), [k for k in expected if not torch.equal(expected[k], got[k])]
    assert checkpointer.resumed[stop_at[0]] == resumed_at
    if scope == "blockwise":
        assert checkpointer.resumed["block-000"] == result.steps // 3  # a finished block is restored, not retrained
    assert masks.violations(resumed) == {}


def test_a_checkpoint_of_other_masks_or_data_is_refused_and_leaves_the_model_alone(tmp_path, monkeypatch):
    config = HealConfig(epochs=1, batch_size=5, device="cpu", progress=False)
    dense, sparse, masks, calib = _pruned()
    original = ResumePoint.step_done

    def stop_after_two(self: ResumePoint) -> None:
        original(self)
        if self.outcome.steps == 2:
            raise Interrupted()

    monkeypatch.setattr(ResumePoint, "step_done", stop_after_two)
    with pytest.raises(Interrupted):
        heal(dense, sparse, masks, calib, config, block_pattern=r"blocks\.\d+", checkpointer=Checkpointer(tmp_path, 1, {}))
    monkeypatch.setattr(ResumePoint, "step_done", original)
    dense, sparse, masks, calib = _pruned()
    other = Masks({k: v.clone() for k, v in masks.items()})
    name = other.names()[0]
    other[name] = ~other[name]
    other.apply_(sparse)
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    with pytest.raises(StarfishError, match="pruning masks differ"):
        heal(dense, sparse, other, calib, config, block_pattern=r"blocks\.\d+", checkpointer=Checkpointer(tmp_path, 1, {}))
    assert all(torch.equal(before[k], v) for k, v in sparse.state_dict().items())
    assert all(p.requires_grad for p in sparse.parameters())  # trainability restored after the refusal

    out = tmp_path / "r"
    Checkpointer.open(RunConfig(out=str(out)), {"pixel_values": torch.zeros(2, 3)}).write("joint", {}, 1, 2)
    with pytest.raises(StarfishError, match="calibration data differ"):
        Checkpointer.open(RunConfig(out=str(out), resume=True), {"pixel_values": torch.ones(2, 3)})


@pytest.mark.slow
def test_a_flipped_bit_in_a_checkpoint_is_refused_on_resume(tmp_path, monkeypatch, capsys):
    """A checkpoint left by an interrupted language-model run, one bit flipped: --resume refuses it
    in one line naming the file, before any work; --force starts over."""
    from lm_tiny import llama_config, save_tiny
    from test_lm_cli import VOCAB, _run

    texts = tmp_path / "text"
    texts.mkdir()
    from lm_tiny import LINES

    (texts / "calib.txt").write_text("\n".join(LINES * 20))
    (texts / "eval.txt").write_text("\n\n".join(LINES * 30))
    model = save_tiny(tmp_path / "llama", llama_config(VOCAB))
    out = tmp_path / "out"
    original = ResumePoint.step_done

    def step_then_stop(self: ResumePoint) -> None:
        original(self)
        if self.outcome.steps == 2:
            raise Interrupted()

    monkeypatch.setattr(ResumePoint, "step_done", step_then_stop)
    assert _run(model, texts, out, "--checkpoint-every", "1") == 130
    monkeypatch.setattr(ResumePoint, "step_done", original)
    checkpoint = resume_dir(out) / "joint.pt"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0x10
    checkpoint.write_bytes(bytes(data))
    capsys.readouterr()
    import starfish.experiments.run

    monkeypatch.setattr(starfish.experiments.run, "build_model", lambda *a, **k: pytest.fail("heavy work before the refusal"))
    assert _run(model, texts, out, "--checkpoint-every", "1", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(checkpoint) in err and "sha256" in err and "--force" in err
    assert not out.exists() and checkpoint.read_bytes() == bytes(data)  # nothing written, the evidence kept
    monkeypatch.undo()
    assert _run(model, texts, out, "--checkpoint-every", "1", "--force") == 0
    assert not resume_dir(out).exists()
