"""The output of ``cxr-monai predict``: one CSV row per film, appended and fsynced batch by batch.

Columns: ``path`` (relative to the archive root), ``predicted_class``, ``probability_<class>`` (as the
film's site reads them: calibrated when its site has a profile), ``model_probability_<class>`` (the
network's softmax), ``site``, ``site_calibrated`` (``true``/``false``), ``warnings`` (the reader's, ``; ``
between them) and ``error`` (why the film could not be scored; the other result columns are then empty).
Probabilities are written with ``repr(float)``: they read back to the same float, bit for bit.

Every row is one line (no field holds a line break: keys are escaped by :mod:`cxr_monai.archive.films`,
messages joined onto one line), so a file killed mid-write ends in at most one partial line, which
:meth:`ResultFile.repair` cuts off; the rows before it are whole.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from cxr_monai.atomic import atomic_path
from cxr_monai.errors import DatasetError
from cxr_monai.site.profile import SiteStatus

Row = list[str]


def columns(class_names: Sequence[str]) -> list[str]:
    """The header, for the model's class order."""
    return [
        "path",
        "predicted_class",
        *(f"probability_{name}" for name in class_names),
        *(f"model_probability_{name}" for name in class_names),
        "site",
        "site_calibrated",
        "warnings",
        "error",
    ]


def scored_row(
    key: str,
    class_names: Sequence[str],
    model_probabilities: np.ndarray,
    status: SiteStatus,
    warnings: Sequence[str] = (),
) -> Row:
    """A scored film's row: the site's calibration applied to the model's probabilities (K,), as
    :meth:`cxr_monai.predictor.Predictor.predict` applies it, and the arg-max as the predicted class."""
    calibrated = status.apply(model_probabilities)
    predicted = class_names[int(np.argmax(calibrated))]
    return [
        key,
        predicted,
        *(repr(float(p)) for p in calibrated),
        *(repr(float(p)) for p in model_probabilities),
        status.site or "",
        "true" if status.calibrated else "false",
        "; ".join(warnings),
        "",
    ]


def failed_row(key: str, class_names: Sequence[str], site: str | None, reason: str) -> Row:
    """The row of a film that could not be scored: its path, site and the reason."""
    return [key, "", *([""] * (2 * len(class_names))), site or "", "", "", reason]


def is_failed(row: Row) -> bool:
    return bool(row[-1])


class ResultFile:
    """One CSV of rows with the header ``header``: read back (whole rows only), repaired, appended to."""

    def __init__(self, path: Path, header: Sequence[str]) -> None:
        self.path = Path(path)
        self.header = list(header)
        self._handle: io.TextIOWrapper | None = None

    def read(self) -> list[Row]:
        """Every whole row, as a list (see :meth:`rows`)."""
        return list(self.rows())

    def rows(self) -> Iterator[Row]:
        """The file's whole rows, streamed (none when it does not exist); a partial last line is left out.

        Raises:
            DatasetError: the header differs from this run's (another model's classes, another
                program's file) or a whole line is damaged: nothing is guessed.
        """
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 (closed below; a generator holds it)
        except FileNotFoundError:
            return
        with handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.endswith(b"\n"):
                    return  # killed mid-write: not a row
                row = _parse(raw[:-1].decode("utf-8", errors="replace"))
                if number == 1:
                    if row != self.header:
                        raise DatasetError(
                            f"{self.path}: exists with other columns than this run writes (another model "
                            "or not a cxr-monai predict output); pass another --out or remove it"
                        )
                    continue
                if len(row) != len(self.header):
                    raise DatasetError(
                        f"{self.path}: line {number} is damaged ({len(row)} fields, expected "
                        f"{len(self.header)}); repair or remove the file"
                    )
                yield row

    def repair(self) -> int:
        """Cut a partial last line (a run killed mid-write) off the file; returns the bytes removed."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        if size == 0:
            return 0
        with open(self.path, "rb+") as handle:
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return 0
            keep, end = 0, size
            while end > 0:  # the last line break, searched backwards block by block
                start = max(0, end - (1 << 16))
                handle.seek(start)
                cut = handle.read(end - start).rfind(b"\n")
                if cut >= 0:
                    keep = start + cut + 1
                    break
                end = start
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        return size - keep

    def append(self, rows: Iterable[Row]) -> None:
        """Append ``rows`` (the header first when the file is empty), flushed and fsynced before returning:
        a kill afterwards loses none of them."""
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        writer = csv.writer(self._handle, lineterminator="\n")
        if self._handle.tell() == 0:
            writer.writerow(self.header)
        writer.writerows(rows)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def replace(self, rows: Iterable[Row]) -> None:
        """Write header and ``rows`` as the whole file, atomically (fsynced, then renamed over it)."""
        self.close()
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(self.header)
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())


def _parse(line: str) -> Row:
    return next(csv.reader([line]), [])
