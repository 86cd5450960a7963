"""The CLI as a newcomer meets it: a quick ``--help`` readable at 80 columns, one ``--bundle`` rule."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from cxr_monai.cli import app

runner = CliRunner()
HEAVY = ("torch", "monai", "sklearn", "scipy", "matplotlib", "pydicom", "grpc", "pynetdicom", "PIL")


def _leaf_commands() -> list[tuple[list[str], object]]:
    """(argv prefix, click command) of every runnable command, nested groups walked."""
    found: list[tuple[list[str], object]] = []

    def walk(command: object, prefix: list[str]) -> None:
        children = getattr(command, "commands", None)
        if children is None:
            found.append((prefix, command))
            return
        for name, child in children.items():
            walk(child, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return found


COMMANDS = _leaf_commands()


def test_importing_the_cli_loads_no_heavy_library() -> None:
    """`cxr-monai --help` must not pay for torch, MONAI, scikit-learn ... (seconds each)."""
    code = f"import json, sys, cxr_monai.cli; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    root = Path(__file__).parents[1]
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert json.loads(loaded.stdout) == []


def test_every_command_is_covered() -> None:
    names = {" ".join(prefix) for prefix, _ in COMMANDS}
    assert {"prepare", "train", "evaluate", "explain", "progression", "serve", "gateway"} <= names
    assert {"synthesize", "bundle list", "bundle copy"} <= names


@pytest.mark.parametrize(("prefix", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_at_80_columns_shows_every_option_whole_and_ends_with_an_example(prefix, command) -> None:
    result = runner.invoke(app, [*prefix, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    text = result.output
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert too_long == []
    for param in command.params:  # type: ignore[attr-defined]
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("-"):
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{name} cut or missing"
    assert "<bool>" not in text and "<int" not in text and "…" not in text
    options_at, example_at = text.find("Options:"), text.find("Example")
    assert 0 < options_at < example_at, "the example comes after the options"
    assert f"cxr-monai {' '.join(prefix)}" in text[example_at:]


@pytest.mark.parametrize(
    ("command", "required"),
    [
        ("explain", ["{image}"]),
        ("progression", ["{image}", "--out", "{tmp}"]),
        ("evaluate", ["--datalist", "{tmp}/datalist.json", "--out", "{tmp}"]),
        ("serve", []),
        (
            "gateway",
            ["--allow", "MODALITY", "--dest-ae", "PACS", "--dest-host", "127.0.0.1", "--dest-port", "104"],
        ),
    ],
)
def test_bundle_comes_from_the_option_or_the_environment_else_exit_1(command, required, tmp_path) -> None:
    image = tmp_path / "film.png"
    image.write_bytes(b"not read: the bundle is missing")
    args = [command, *(a.format(image=image, tmp=tmp_path) for a in required)]
    missing = runner.invoke(app, args, env={"CXR_MONAI_BUNDLE": ""})
    assert missing.exit_code == 1, missing.output
    assert missing.output.strip().splitlines() == [
        "error: no trained bundle: pass --bundle DIR or set CXR_MONAI_BUNDLE"
    ]
    # the variable is read: the command gets past the bundle check (and fails later on the empty folder)
    from_env = runner.invoke(app, args, env={"CXR_MONAI_BUNDLE": str(tmp_path / "env-bundle")})
    assert "no trained bundle" not in from_env.output
