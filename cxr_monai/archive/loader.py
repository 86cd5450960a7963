"""Read and pre-process films in DataLoader workers: batches of network inputs plus, per film, its site
name, reader warnings or the one-line reason it could not be read.

A film that cannot be read never stops the loader: its record carries the reason and no tensor. Records
carry no header values (the site name comes from the site map, never from the header itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cxr_monai.archive.films import Film
from cxr_monai.errors import CXRMonaiError
from cxr_monai.explain.files import film_site
from cxr_monai.io import read_cxr
from cxr_monai.site.sitemap import SiteMap


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


def film_loader(dataset: FilmDataset, batch_size: int, workers: int) -> DataLoader:
    """Batches of ``dataset`` in order, read by ``workers`` processes (0: in this process)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )
