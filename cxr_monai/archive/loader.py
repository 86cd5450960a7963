"""Read and pre-process films in DataLoader workers: batches of network inputs plus, per film, its site
name, reader warnings or the one-line reason it could not be read.

A film that cannot be read never stops the loader: its record carries the reason and no tensor. Records
carry no header values (the site name comes from the site map, never from the header itself).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from cxr_monai.archive.films import Film
from cxr_monai.errors import CXRMonaiError
from cxr_monai.explain.files import film_site
from cxr_monai.io import read_cxr
from cxr_monai.site.sitemap import SiteMap
from cxr_monai.worker_processes import end_with_parent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilmRecord:
    """What the reader found for one film.

    Attributes:
        film: the archive entry.
        site: the film's site name (its InstitutionName's in the site map, else ``--site``; None: unknown).
        warnings: the reader's warnings (lateral view, not CR/DX ...).
        error: the one-line reason it could not be read, or None.
    """

    film: Film
    site: str | None = None
    warnings: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class FilmBatch:
    """A batch: every film's record in order, and the inputs (B', 3, S, S) of the readable ones
    (``readable[i]`` is the index in ``records`` of ``inputs[i]``)."""

    records: list[FilmRecord]
    inputs: torch.Tensor | None
    readable: list[int]


class FilmDataset(Dataset):
    """``films[i]`` -> (record, tensor (3, S, S) or None), read with :func:`cxr_monai.io.read_cxr` and
    pre-processed with ``preprocess`` (the predictor's chain: the same tensor as ``Predictor.predict``)."""

    def __init__(
        self,
        films: Sequence[Film],
        preprocess: Callable[[Any], Any],
        site: str | None = None,
        institutions: SiteMap | None = None,
    ) -> None:
        self.films = list(films)
        self.preprocess = preprocess
        self.site = site
        self.institutions = institutions

    def __len__(self) -> int:
        return len(self.films)

    def __getitem__(self, index: int) -> tuple[FilmRecord, torch.Tensor | None]:
        film = self.films[index]
        if film.error is not None:
            return FilmRecord(film, self.site, error=film.error), None
        try:
            image = read_cxr(film.path)
            site = film_site(image, self.site, self.institutions)
            tensor = torch.as_tensor(self.preprocess(image)).as_subclass(torch.Tensor).float()
        except CXRMonaiError as exc:
            # read_cxr names the file by its base name; the output's path column names it already
            name = film.path.rsplit("/", 1)[-1]
            return FilmRecord(film, self.site, error=one_line(str(exc).removeprefix(f"{name}: "))), None
        except OSError as exc:
            return FilmRecord(film, self.site, error=one_line(exc.strerror or type(exc).__name__)), None
        except Exception as exc:  # a decoder's or transform's own error: listed, never fatal
            # its message may quote header values (pydicom does): only the type is kept
            reason = f"cannot be pre-processed ({type(exc).__name__})"
            return FilmRecord(film, self.site, error=reason), None
        return FilmRecord(film, site, tuple(one_line(w) for w in image.warnings)), tensor


def one_line(text: str) -> str:
    """``text`` on one line (CSV rows of the output are one line each)."""
    return " ".join(text.split())


def collate(items: list[tuple[FilmRecord, torch.Tensor | None]]) -> FilmBatch:
    """A :class:`FilmBatch` of a list of dataset items (tensors stacked, failures kept in place)."""
    records = [record for record, _ in items]
    readable = [i for i, (_, tensor) in enumerate(items) if tensor is not None]
    tensors = [tensor for _, tensor in items if tensor is not None]
    return FilmBatch(records, torch.stack(tensors) if tensors else None, readable)


#: Batches each reader process holds in flight (DataLoader ``prefetch_factor``).
PREFETCH = 2


def film_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """Batches of ``dataset`` in order, read by ``workers`` processes (0: in this process)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=PREFETCH if workers else None,
        persistent_workers=False,
        worker_init_fn=end_with_parent,
    )


def film_batches(dataset: FilmDataset, batch_size: int, workers: int) -> Iterator[FilmBatch]:
    """The batches of :func:`film_loader`, surviving a reader process that dies (a decoder crashing on a
    damaged film kills its process, not just raises).

    When a worker dies, the films of every batch that may have been in flight (``PREFETCH`` per worker)
    are read again one at a time, each in a process of its own: a film that kills that one too gets a
    failed record; then the loader starts again after them. With ``workers=0`` there is no process to
    lose: such a crash ends the run (a rerun resumes before the film and crashes on it again).
    """
    start, total = 0, len(dataset)
    restore: Callable[[], None] | None = None
    try:
        while start < total:
            batches = iter(film_loader(Subset(dataset, range(start, total)), batch_size, workers))
            try:
                restore = restore or _synchronous_worker_deaths(workers)
                for batch in batches:
                    start += len(batch.records)
                    yield batch
                return
            except RuntimeError as exc:
                if workers == 0 or "DataLoader worker" not in str(exc):
                    raise
                logger.warning(
                    "a film reader process died (%s); reading the films it may have held one at a time",
                    one_line(str(exc)),
                )
            del batches  # its remaining reader processes stop
            suspects = range(start, min(total, start + PREFETCH * workers * batch_size))
            for index in suspects:
                yield _read_alone(dataset, index)
            start = suspects.stop
    finally:
        if restore is not None:
            restore()


def _synchronous_worker_deaths(workers: int) -> Callable[[], None]:
    """Make a dead reader process surface in ``next()`` on the loader only; returns the undo.

    torch's DataLoader reports a dead worker from a SIGCHLD handler, i.e. wherever the main thread is at
    that moment (the forward, or half-way through writing a row). Without the handler the loader's
    ``next()`` finds the dead worker itself (it checks its workers whenever a batch is 5 s late) and
    raises there, where :func:`film_batches` handles it.
    """
    if (
        not workers
        or not hasattr(signal, "SIGCHLD")
        or threading.current_thread() is not threading.main_thread()
    ):
        return lambda: None
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def undo() -> None:
        signal.signal(signal.SIGCHLD, previous)

    return undo


def _read_alone(dataset: FilmDataset, index: int) -> FilmBatch:
    """Film ``index`` read in a process of its own: its batch, or a failed record when it kills it."""
    try:
        return next(iter(film_loader(Subset(dataset, [index]), 1, 1)))
    except RuntimeError as exc:
        if "DataLoader worker" not in str(exc):
            raise
    film = dataset.films[index]
    crashed = "the image reader crashed on this film (its process died)"
    return FilmBatch([FilmRecord(film, dataset.site, error=crashed)], None, [])
