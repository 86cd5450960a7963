"""The package layout keeps its promises: names that trained bundles' configs call stay importable."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Every ``cxr_monai.training.<name>`` a config names, in the shipped bundles and as written by bundles
#: trained before ``training`` became a subpackage (the same names: configs are copied at training time).
_CONFIG_NAMES = sorted(
    {
        match
        for path in (ROOT / "bundles").rglob("*.json")
        for match in re.findall(r"cxr_monai\.training\.([A-Za-z_]+)", path.read_text(encoding="utf-8"))
    }
)


def test_the_shipped_configs_name_training_objects() -> None:
    assert {"fold_items", "prepare_output_dir", "FineTuneSchedule", "TrainingLog"} <= set(_CONFIG_NAMES)


@pytest.mark.parametrize("name", _CONFIG_NAMES)
def test_names_in_trained_bundle_configs_resolve(name: str) -> None:
    training = importlib.import_module("cxr_monai.training")
    assert callable(getattr(training, name))


def _import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every back edge of a depth-first walk over the import graph, as the cycle it closes.

    (grimp answers "who imports whom" and chains between two modules, but has no cycle finder.)
    """
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == "open":
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                walk(imported, path)
        path.pop()
        state[module] = "done"

    for module in sorted(graph.modules):
        if module not in state:
            walk(module, [])
    return cycles


def test_the_package_has_no_import_cycle() -> None:
    graph = grimp.build_graph("cxr_monai", include_external_packages=False)
    assert "cxr_monai.io.dicom" in graph.modules
    assert _import_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")
    assert _import_cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
