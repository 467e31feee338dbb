"""The held-out unlabeled samples a run watches while healing (``--budget auto``) and probes alignment on.

Every choice a run makes (when healing stops, which weights are kept, where alignment is probed)
must be made without the evaluation set, so it is made on samples that were neither trained on nor
scored: by default a seeded draw from the calibration source that is disjoint from the calibration
draw (images), or further windows of the calibration text drawn with another seed (text);
``--holdout DIR`` names a separate unlabeled folder or text instead. Labels are never read (images
are indexed without them). When the source has no spare images, ``None`` is returned and healing
holds out a seeded part of the calibration set itself (``heal.stopping.split_calibration``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from starfish.nn.batch import Batch
from starfish.errors import StarfishError

IMAGES_DEFAULT = 200  # held-out images when --holdout-size is not given
TEXT_DEFAULT = 16  # held-out sequences of --seq-len tokens for a language model
SEED_OFFSET = 7919  # the held-out draw's seed, apart from the calibration draw's


@dataclass
class HeldOut:
    samples: Batch  # model inputs only (no labels)
    source: str  # how they were drawn, for the report


def load_image_holdout(config, transform, calib_index, calib_picks: list[int], eval_paths: set[Path]) -> HeldOut | None:
    """``--holdout DIR`` or the calibration folder's images outside the calibration draw (None: none spare)."""
    from starfish.data.images import ImageFiles, index_image_folder, random_subset
    from starfish.data.loading import decode_calibration

    size = int(config.holdout_size or IMAGES_DEFAULT)
    if config.holdout is not None:
        index = index_image_folder(config.holdout, "held-out")
        pool = list(range(len(index)))
        where = f"`{config.holdout}`"
    else:
        index = calib_index
        taken = set(calib_picks)
        pool = [i for i in range(len(index)) if i not in taken]
        where = f"`{config.calib}` outside the calibration draw"
    if not pool:
        return None
    chosen = [pool[i] for i in random_subset(len(pool), min(size, len(pool)), config.seed + SEED_OFFSET)]
    paths = [index.paths[i] for i in chosen]
    overlap = {p.resolve() for p in paths} & eval_paths
    if overlap:
        raise StarfishError(
            f"the held-out images include evaluation files (e.g. {sorted(overlap)[0]}); every choice must be made "
            "without the evaluation set, so point --holdout (or --calib) at a folder apart from --eval."
        )
    files = ImageFiles(paths, None, transform)  # no labels: held-out samples are inputs only
    samples = decode_calibration(files, config.calib_max_gb, workers=config.workers)
    samples.pop("labels", None)
    return HeldOut(samples, f"{len(paths)} unlabeled images from {where} (seed {config.seed + SEED_OFFSET})")


def load_text_holdout(config, tokenizer, calibration_picks=None) -> HeldOut:
    """Further sequences of ``--holdout``, or of the calibration text apart from the calibration
    sequences (``calibration_picks``: where those were taken), drawn with another seed."""
    from starfish.data.text import draw_sequences, overlapping, read_documents

    own = config.holdout is not None
    source = config.holdout if own else config.calib
    size = int(config.holdout_size or TEXT_DEFAULT)
    avoid = None if own else list(calibration_picks or [])
    samples, picks = draw_sequences(read_documents(source), tokenizer, size, config.seq_len, config.seed + SEED_OFFSET, f"text source {source}", avoid)
    shared = overlapping(picks, avoid) if avoid is not None else 0
    apart = "" if own else (", apart from the calibration sequences" if not shared else
                            f"; {shared} overlap the calibration sequences: the text is too short to hold them apart, pass --holdout TEXT")
    return HeldOut(samples, f"{size} sequences of {config.seq_len} tokens from `{source}` (seed {config.seed + SEED_OFFSET}{apart})")

