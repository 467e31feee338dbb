"""`starfish demo` is the README's first command: it must train, prune and really heal, offline."""

from __future__ import annotations

import pytest
from starfish.experiments.demo import run_demo


@pytest.mark.slow
def test_demo_trains_prunes_and_heals(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STARFISH_CACHE", str(tmp_path))
    rows = run_demo()
    assert (tmp_path / "demo-digits-resnet.safetensors").is_file()  # trained once, cached for next time
    printed = capsys.readouterr().out
    assert "healed" in printed and "pruned" in printed
    assert rows["dense"]["top1"] > 0.95
    assert rows["healed"]["top1"] > rows["pruned"]["top1"] + 0.3
