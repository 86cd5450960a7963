"""Typer commands of ``cxr-monai``, one module each; :mod:`cxr_monai.cli` registers them."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from cxr_monai import log_hygiene
from cxr_monai.errors import CXRMonaiError

#: Human-facing output (tables, progress) goes to stderr so stdout stays machine-readable.
console = Console(stderr=True)
#: Environment variable every ``--bundle`` option falls back to.
BUNDLE_ENV = "CXR_MONAI_BUNDLE"


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on one line; the caller raises the returned exit (1: bad input or
    configuration, 2: usage, as typer's own usage errors)."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


def bundle_option() -> Any:
    """The ``--bundle DIR`` option of every command that loads a trained bundle, ``$CXR_MONAI_BUNDLE``
    as its default; pass the value to :func:`resolve_bundle`."""
    return typer.Option(
        None,
        "--bundle",
        envvar=BUNDLE_ENV,
        metavar="DIR",
        help="Trained bundle directory.",
    )


def site_profiles_option() -> Any:
    """The ``--site-profiles DIR`` option of every command that applies site calibration profiles."""
    return typer.Option(
        None,
        "--site-profiles",
        metavar="DIR",
        exists=True,
        file_okay=False,
        help="Site profiles folder (default: <bundle>/sites).",
    )


def site_option() -> Any:
    """The ``--site NAME`` option of the commands that read films (explain, predict)."""
    return typer.Option(
        None, "--site", metavar="NAME", help="The films' site: its calibration profile is applied."
    )


def site_from_institution_option() -> Any:
    """The ``--site-from-institution SITE_MAP`` option of the commands that read films."""
    return typer.Option(
        None,
        "--site-from-institution",
        metavar="SITE_MAP",
        exists=True,
        dir_okay=False,
        help="Site of each DICOM film from its InstitutionName via this site map (else --site).",
    )


def unknown_site_option(help_text: str) -> Any:
    """The ``--unknown-site flag|refuse`` option (``help_text`` says what it means for the command)."""
    return typer.Option("flag", "--unknown-site", metavar="POLICY", help=help_text)


def resolve_bundle(bundle: Path | None) -> Path:
    """``--bundle`` or ``$CXR_MONAI_BUNDLE``; neither is a one-line error, exit code 1."""
    if bundle is None:
        raise fail(f"no trained bundle: pass --bundle DIR or set {BUNDLE_ENV}")
    return bundle


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`CXRMonaiError` into a one-line message and exit code 1 (2 stays typer's usage error),
    also when a MONAI bundle expression raised it (MONAI wraps it in a RuntimeError)."""
    try:
        yield
    except CXRMonaiError as exc:
        raise fail(str(exc)) from exc
    except RuntimeError as exc:
        cause = _user_error_cause(exc)
        if cause is None:
            raise
        raise fail(str(cause)) from exc


def _user_error_cause(exc: BaseException) -> CXRMonaiError | None:
    """The :class:`CXRMonaiError` in ``exc``'s chain of causes, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, CXRMonaiError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def warn_sites_without_profile(named: Iterable[str], profiles: Collection[str], unknown_site: str) -> None:
    """One warning line per site the user named that has no calibration profile for the loaded model."""
    fate = "refused" if unknown_site == "refuse" else "flagged uncalibrated"
    for name in sorted(set(named) - set(profiles)):
        console.print(
            f"[yellow]warning:[/] site {name} has no calibration profile for this model; its films are "
            f"{fate}",
            highlight=False,
            soft_wrap=True,
        )


def examples(*commands: str) -> str:
    """Typer ``epilog=`` text: the example command lines after the options, printed as written (``\\b``
    stops click from rewrapping them; keep each line within 76 columns so help fits 80)."""
    title = "Example:" if len(commands) == 1 else "Examples:"
    lines = (line for command in commands for line in command.splitlines())
    return "\b\n" + title + "\n" + "\n".join(f"  {line}" for line in lines)


def configure_logging(verbose: bool) -> None:
    """Standard logging at INFO (or DEBUG with ``--verbose``); messages never carry patient data: library
    warnings go to the log as one line each, and quoted values in them and in pydicom's and highdicom's
    log records are scrubbed (:mod:`cxr_monai.log_hygiene`)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # faiss logs each CPU build it tries and fails to load, as INFO: noise to users
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    log_hygiene.install()
