"""Text sources for causal LMs: seeded calibration sequences (padding masked) and eval windows."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from lm_tiny import LINES, tiny_tokenizer
from starfish.errors import StarfishError
from starfish.data.text import calibration_text, evaluation_windows, tokenize


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def long_txt(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("\n\n".join(LINES * 5))
    return path


def test_calibration_from_txt_is_seeded_and_full(long_txt, tok):
    a = calibration_text(long_txt, tok, size=6, seq_len=8, seed=0)
    b = calibration_text(long_txt, tok, size=6, seq_len=8, seed=0)
    c = calibration_text(long_txt, tok, size=6, seq_len=8, seed=1)
    assert set(a) == {"input_ids", "attention_mask"} and a["input_ids"].shape == (6, 8)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])
    assert bool(a["attention_mask"].all())  # the document is longer than a sequence: no padding
    whole = tokenize(tok, long_txt.read_text()).tolist()
    for row in a["input_ids"].tolist():  # every sequence is a real window of the text
        assert any(whole[i : i + 8] == row for i in range(len(whole) - 7))


def test_short_jsonl_documents_are_padded_and_masked(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["the lazy dog", "a small model"]) + "\n")
    batch = calibration_text(path, tok, size=5, seq_len=6, seed=3)
    pad = tok.pad_token_id
    for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        n = sum(mask)
        assert n == 3 and mask == [1] * 3 + [0] * 3  # real tokens first, padding masked
        assert ids[3:] == [pad] * 3
        assert tok.decode(ids[:n]) in ("the lazy dog", "a small model")


def test_folder_source_and_bad_inputs(tmp_path, tok):
    (tmp_path / "a.txt").write_text(LINES[0])
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": LINES[1]}) + "\n")
    batch = calibration_text(tmp_path, tok, size=20, seq_len=4, seed=0)
    firsts = {tok.decode(r[:1]) for r in batch["input_ids"].tolist()}
    assert firsts & set(LINES[0].split()) and firsts & set(LINES[1].split())  # both files drawn
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    with pytest.raises(StarfishError, match='field "text"'):
        calibration_text(tmp_path / "bad.jsonl", tok, size=2, seq_len=4)
    with pytest.raises(StarfishError, match="does not exist"):
        calibration_text(tmp_path / "missing.txt", tok, size=2, seq_len=4)
    with pytest.raises(StarfishError, match="at least 2"):
        calibration_text(tmp_path / "a.txt", tok, size=2, seq_len=1)


def test_evaluation_windows_cut_the_whole_text_without_overlap(long_txt, tok):
    whole = tokenize(tok, long_txt.read_text())
    windows = evaluation_windows(long_txt, tok, seq_len=16)
    assert len(windows) == whole.numel() // 16
    assert torch.equal(windows.input_ids.flatten(), whole[: len(windows) * 16])
    first_two = evaluation_windows(long_txt, tok, seq_len=16, size=2)
    proto = first_two.protocol()
    assert proto["windows"] == 2 and proto["seq_len"] == 16 and proto["tokens"] == 32
    assert proto["sha256"] == hashlib.sha256(long_txt.read_bytes()).hexdigest()
    batches = list(first_two.batches(1))
    assert len(batches) == 2 and bool(batches[0]["attention_mask"].all())
    with pytest.raises(StarfishError, match="lower --eval-size"):
        evaluation_windows(long_txt, tok, seq_len=16, size=len(windows) + 1)


def test_held_out_sequences_never_share_a_token_position_with_the_calibration_ones(tmp_path):
    """The held-out stopping check reads text healing never trained on, even from the same source."""
    from starfish.data.text import draw_sequences

    tok = tiny_tokenizer()
    documents = [" ".join(LINES * 8) for _ in range(3)]  # three documents of a few hundred tokens
    calib, picks = draw_sequences(documents, tok, 12, 16, seed=0)
    again, same = draw_sequences(documents, tok, 12, 16, seed=0)
    assert same == picks and torch.equal(again["input_ids"], calib["input_ids"])  # reproducible from the seed
    held, held_picks = draw_sequences(documents, tok, 12, 16, seed=7919, avoid=picks)
    for doc, start, count in held_picks:
        for d, s, c in picks:
            assert d != doc or start + count <= s or start >= s + c, "a held-out window overlaps a calibration window"
    _, independent = draw_sequences(documents, tok, 12, 16, seed=7919)
    overlapping = [(doc, start) for doc, start, count in independent for d, s, c in picks if d == doc and start < s + c and s < start + count]
    assert overlapping  # drawn without the rule, some held-out windows would sit on calibration ones
    assert held["attention_mask"].sum() == 12 * 16
    from starfish.data.text import overlapping

    short = documents[:1]
    cal_picks = draw_sequences(short, tok, 20, 16)[1]
    crowded, crowded_picks = draw_sequences(short, tok, 60, 16, seed=1, avoid=cal_picks)  # no room for 60 apart
    assert crowded["input_ids"].shape == (60, 16) and 0 < overlapping(crowded_picks, cal_picks) < 60  # said, not hidden
    assert overlapping(held_picks, picks) == 0
