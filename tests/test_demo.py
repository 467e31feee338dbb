"""`starfish demo` is the README's first command: it must train, prune and really heal, offline."""

from __future__ import annotations

from starfish.cli import main


def test_demo_trains_prunes_and_heals(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STARFISH_CACHE", str(tmp_path))
    assert main(["demo"]) == 0
    printed = capsys.readouterr().out
    assert "healed" in printed
    assert (tmp_path / "demo-digits-resnet.safetensors").is_file()  # trained once, cached
    from starfish.demo import run_demo

    rows = run_demo()  # second run reuses the cached dense network
    assert rows["dense"]["top1"] > 0.95
    assert rows["healed"]["top1"] > rows["pruned"]["top1"] + 0.3
