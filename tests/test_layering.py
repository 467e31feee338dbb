"""The package's layers (issue 21): every import, also those inside functions, goes to the same or a
lower layer, and the top level of ``src/starfish`` holds only the public API and its foundations.

Layers, lowest first (a module may import from its own layer and every layer below):

0. foundations: errors, version, registry, masks, ``common`` (value checks, atomic outputs, signals)
   and ``distributed.context`` (which process this is: read from the environment, imports nothing
   of starfish but errors);
1. ``nn``: seeing inside a network;
2. ``distributed``: ranks working on shares of the data and on sharded weights;
3. ``data``: what a job reads;
4. ``models``, ``tasks`` (how models are scored), ``zeroshot``;
5. ``pruning``, ``repair``: the one-shot algorithms;
6. ``heal``: training the surviving weights, and its memory plan;
7. ``reporting``;
8. ``experiments``: the verbs and their orchestration;
9. the public API: ``starfish`` itself, ``hf_api``, ``cli``, ``__main__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "starfish"

LAYERS: list[tuple[str, ...]] = [
    ("starfish.errors", "starfish.version", "starfish.registry", "starfish.masks", "starfish.common", "starfish.distributed.context"),
    ("starfish.nn",),
    ("starfish.distributed",),
    ("starfish.data",),
    ("starfish.models", "starfish.tasks", "starfish.zeroshot"),
    ("starfish.pruning", "starfish.repair"),
    ("starfish.heal",),
    ("starfish.reporting",),
    ("starfish.experiments",),
    ("starfish", "starfish.hf_api", "starfish.cli", "starfish.__main__"),
]
TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py", "errors.py", "version.py", "registry.py", "masks.py", "hf_api.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The layer of the longest prefix naming ``module`` (``distributed.context`` before ``distributed``)."""
    best, found = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} is in no layer: add it to LAYERS"
    return found


def imports_of(path: Path) -> set[str]:
    """Every starfish module ``path`` imports, at the top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("starfish")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("starfish") and node.level == 0:
            if node.module == "starfish":  # from starfish import X: X is a module or a name of the API
                found |= {f"starfish.{a.name}" if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").is_file() else "starfish" for a in node.names}
            else:
                found.add(node.module)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_import_runs_up_a_layer(path):
    here = module_name(path)
    upward = sorted(m for m in imports_of(path) if layer_of(m) > layer_of(here))
    assert not upward, f"{here} (layer {layer_of(here)}) imports from higher layers: {upward}"


def test_the_top_level_holds_only_the_api_and_its_foundations():
    files = {p.name for p in PACKAGE.glob("*.py")}
    assert files == TOP_LEVEL, f"move {sorted(files - TOP_LEVEL)} into a package"


def test_the_layering_check_catches_an_upward_import(tmp_path):
    """The check itself can fail: a foundation module importing an experiment is caught."""
    fake = PACKAGE / "common" / "validation.py"
    assert layer_of("starfish.experiments.run") > layer_of(module_name(fake))
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from starfish.experiments.run import run\n")
    assert imports_of(probe) == {"starfish.experiments.run"}


def test_every_test_file_is_on_the_map():
    """tests/README.md maps the packages to their tests; a new test file must be placed on it."""
    tests = PACKAGE.parents[1] / "tests"
    mapped = (tests / "README.md").read_text(encoding="utf-8")
    missing = sorted(p.name for p in tests.glob("test_*.py") if f"`{p.name}`" not in mapped)
    assert not missing, f"add {missing} to tests/README.md"


def test_only_the_modality_asks_whether_a_model_is_a_language_model():
    """Image-vs-text decisions live in ``experiments/modality.py`` (and the model sources that set
    the kind); every other module asks the job's ``Modality``."""
    allowed = {"experiments/modality.py", "models/causal_lm.py", "models/registry.py", "experiments/evaluate_saved.py"}
    asking = []
    for path in MODULES:
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text(encoding="utf-8")
        if rel not in allowed and any(probe in text for probe in ("CAUSAL_LM", "is_causal_lm(", '"input_ids" in ')):
            asking.append(rel)
    assert not asking, f"{asking} decide image-vs-text themselves: ask modality_of(loaded) instead"
