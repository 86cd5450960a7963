"""Near-duplicate images across patients: found from pixels, merged into one split group.

The covid-chestxray-dataset publishes some radiographs twice under different patient ids (re-encoded,
re-cropped, a caption added). Split by patient alone, such a pair can land in test and training.

Each image gets a fingerprint from a grayscale copy at several centre crops (:data:`CROP_LEVELS`, share of
width/height removed per side), so a re-cropped copy matches the original at some crop level:

* a 64-bit perceptual hash (``imagehash.phash``) per crop level: pairs within
  :data:`PHASH_CANDIDATE_BITS` bits (minimum over crop level pairings) are candidates;
* a :data:`THUMBNAIL_SIZE` px thumbnail per crop level: a candidate pair is a near-duplicate when the best
  normalised cross-correlation (Pearson r of the pixels) over crop level pairings reaches
  :data:`NCC_THRESHOLD`.

Why both: on the real data (``benchmarks/results/near_duplicates.md``) 64-bit phash puts different
patients' films within 2 bits (chest films look alike at 8x8 frequencies), as close as a real re-cropped
duplicate (2-4 bits), so the hash alone cannot separate them; the thumbnail correlation does (duplicates
>= 0.974, closest different films <= 0.963).

Search (:func:`near_duplicate_pairs`): the pairs are exactly those of the all-pairs definition
(:func:`near_duplicate_pairs_brute_force`), found without comparing all pairs. The hash cannot be the index:
2 % of all pairs of real chest films fall within 12 bits, so its candidates grow as n^2. The correlation
is the selective condition (about 4 in a million pairs of different films reach 0.97), so a faiss
inverted-file index over the thumbnails (projected on their top principal components) finds, per film,
every crop level of every other film within the distance that a correlation of :data:`NCC_THRESHOLD`
implies; each hit then passes the hash rule, its own correlation and finally the full rule, in bounded
chunks. Which index cells a film must visit so that no pair is lost is a bound
(:meth:`_CellIndex.cells_to_visit`), not faiss's fixed ``nprobe``. Memory: the projected thumbnails
(n x L x 32 floats) and one batch of hits; no n x n array. Time: the cells that the bound cannot rule out
are a share of all cells that shrinks only slowly as films are added (chest films are alike in many
directions at once), so the search is not linear: ``benchmarks/results/near_duplicate_scale.md``.

Fingerprints are cached by the SHA-256 of the file bytes in :class:`FingerprintCache`, one checksummed
record per image appended as soon as it is computed, so an interrupted ``prepare`` resumes where it
stopped.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
import time
from collections.abc import Callable, Container, Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cxr_monai.atomic import atomic_path
from cxr_monai.data.sources import DataItem
from cxr_monai.io import read_cxr
from cxr_monai.worker_processes import end_with_parent

logger = logging.getLogger(__name__)

#: Share of the width and height removed on each side for the crop levels fingerprinted.
CROP_LEVELS: tuple[float, ...] = (0.0, 0.02, 0.04, 0.06, 0.08)
#: Thumbnail side (px) for the correlation check.
THUMBNAIL_SIZE = 32
#: Candidate pairs: phash Hamming distance (bits of 64, minimum over crop levels) at most this.
PHASH_CANDIDATE_BITS = 12
#: Near-duplicate: best thumbnail correlation over crop levels at least this.
NCC_THRESHOLD = 0.97
#: Folder (inside the cache directory) of the fingerprint cache's segment files.
CACHE_DIRNAME = "near_duplicate_cache"
_CACHE_VERSION = 2
_DECODE_SIZE = 256  # JPEG draft decoding to >= this many px: the fingerprints need no more
_WORKER_CHUNK = 16  # films a fingerprinting worker takes at once
_BLOCK = 1024  # rows of the pairwise hash comparison held at once (brute force)
#: Dimensions of the orthonormal projection (top principal components) the index searches in.
INDEX_DIMENSIONS = 32
_PCA_SAMPLE = 2048  # films whose thumbnails (all crop levels) fit the projection
_QUERY_BATCH = 1024  # films whose candidates are gathered and verified at once
_VERIFY_CHUNK = 2048  # candidate pairs whose thumbnails are normalised at once (~80 MB)
_MAX_CELLS = 4096  # index cells: _CELLS_PER_ROOT sqrt(vectors), at least 39 vectors each (faiss k-means)
_CELLS_PER_ROOT = 10  # measured at 100k films: 2.5 took 126 s, 10 (4096 cells) 94 s, 8192 cells 112 s
# Slack on squared distances: float32 rounding in normalising, projecting and in the index (about 1e-5
# here; a correlation computed as 0.97 is at most 6e-5 off the exact one) is far inside it.
_RADIUS_SLACK = 1e-3
_CORRELATION_SLACK = 1e-3  # the same for a hit's correlation (float64, exact to ~1e-12) before the full rule
_BOUND_SLACK = 1e-3  # the same for the cell bound (float32 centroid distances, about 1e-6 off)
_SEPARATION_SLACK = 1e-4  # added to squared centroid separations (float32, about 1e-6 off): rounds them up


@dataclass(frozen=True)
class Fingerprint:
    """``phash``: (L,) uint64, one 64-bit hash per crop level; ``thumbnails``: (L, S*S) uint8."""

    phash: np.ndarray
    thumbnails: np.ndarray


@dataclass(frozen=True)
class NearDuplicatePair:
    """Items ``first`` < ``second`` (indices), phash bits apart and their thumbnail correlation."""

    first: int
    second: int
    phash_bits: int
    correlation: float


def _grayscale(source: str | io.BytesIO) -> Image.Image:
    """The image (a path or its bytes) as 8-bit grayscale; 16-bit and float images rescaled min..max to
    0..255. What Pillow cannot open (DICOM, NIfTI) is read as a viewer shows it
    (:func:`~cxr_monai.io.read_cxr`: VOI LUT / window, MONOCHROME1 inverted), then rescaled likewise."""
    try:
        with Image.open(source) as opened:
            opened.draft("L", (_DECODE_SIZE, _DECODE_SIZE))  # JPEG: decode at reduced scale (fast)
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return _rescaled(np.asarray(image, dtype=np.float64))
            return image.convert("L")
    except UnidentifiedImageError:
        data = source.getvalue() if isinstance(source, io.BytesIO) else Path(source).read_bytes()
        return _rescaled(read_cxr(data).pixels.astype(np.float64))


def _rescaled(pixels: np.ndarray) -> Image.Image:
    """(rows, columns) values -> 8-bit grayscale image, min..max to 0..255."""
    span = float(pixels.max() - pixels.min()) or 1.0
    return Image.fromarray(((pixels - pixels.min()) * (255.0 / span)).astype(np.uint8))


def fingerprint(source: str | io.BytesIO) -> Fingerprint:
    """Fingerprint of one image file (a path or its bytes); OSError / PIL errors when it cannot be
    decoded."""
    image = _grayscale(source)
    width, height = image.size
    hashes, thumbnails = [], []
    for level in CROP_LEVELS:
        dx, dy = round(width * level), round(height * level)
        crop = image.crop((dx, dy, width - dx, height - dy))
        bits = imagehash.phash(crop).hash.flatten()
        hashes.append(np.packbits(bits).view(">u8")[0])
        thumbnail = crop.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BOX)
        thumbnails.append(np.asarray(thumbnail, dtype=np.uint8).ravel())
    return Fingerprint(np.array(hashes, dtype=np.uint64), np.stack(thumbnails))


def _settings_digest() -> bytes:
    """What a cached fingerprint depends on besides the file bytes: a record made otherwise is stale."""
    settings = repr((_CACHE_VERSION, CROP_LEVELS, THUMBNAIL_SIZE, _DECODE_SIZE)).encode()
    return hashlib.blake2b(settings, digest_size=8).digest()


_MAGIC = b"CXRFPC\x00\x02"
_HEADER_SIZE = 24  # magic (8) + settings digest (8) + record size (uint32 LE) + 4 zero bytes
_CHECK_SIZE = 16  # BLAKE2b digest closing each record
_SEGMENT_SUFFIX = ".fpc"


def _record_dtype() -> np.dtype:
    """One cached fingerprint: SHA-256 of the file, L hashes, L thumbnails, checksum of the rest."""
    levels, pixels = len(CROP_LEVELS), THUMBNAIL_SIZE * THUMBNAIL_SIZE
    return np.dtype(
        [
            ("key", "u1", (32,)),
            ("phash", "<u8", (levels,)),
            ("thumbnails", "u1", (levels, pixels)),
            ("check", "u1", (_CHECK_SIZE,)),
        ]
    )


def _header() -> bytes:
    return _MAGIC + _settings_digest() + _record_dtype().itemsize.to_bytes(4, "little") + bytes(4)


def _record(key: str, fp: Fingerprint) -> bytes:
    payload = (
        bytes.fromhex(key)
        + np.ascontiguousarray(fp.phash, dtype="<u8").tobytes()
        + np.ascontiguousarray(fp.thumbnails, dtype=np.uint8).tobytes()
    )
    return payload + hashlib.blake2b(payload, digest_size=_CHECK_SIZE).digest()


class FingerprintCache(MutableMapping[str, Fingerprint]):
    """Fingerprints by content key (SHA-256 hex of the file), kept in ``directory``/:data:`CACHE_DIRNAME`.

    Resumable: each fingerprint set here is appended at once (one ``write`` of one fixed-size record) to a
    segment file of this process, so a run killed at any point (``kill -9``) loses at most the image it was
    fingerprinting. Not trusted blindly: each record carries a BLAKE2b checksum and each segment a header
    naming the fingerprint settings; a record that fails its checksum, a torn last record or a damaged
    header is dropped (those images are fingerprinted again) and listed in :attr:`damaged`; segments of
    other settings are ignored. :meth:`compact` rewrites everything into one segment, atomically, and
    removes the segments it replaced (those read at start and this process's own). Several processes may
    share a directory: each appends to its own segment.

    ``directory=None``: in memory only.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = None if directory is None else Path(directory) / CACHE_DIRNAME
        self.damaged: list[str] = []
        self._entries: dict[str, Fingerprint] = {}
        self._read: list[Path] = []
        self._segment: Path | None = None
        if self.directory is not None and self.directory.is_dir():
            for path in sorted(self.directory.glob(f"*{_SEGMENT_SUFFIX}")):
                self._load_segment(path)

    def _load_segment(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.damaged.append(f"{path.name}: unreadable ({type(exc).__name__})")
            return
        self._read.append(path)
        if data[: len(_MAGIC)] != _MAGIC or len(data) < _HEADER_SIZE:
            self.damaged.append(f"{path.name}: not a fingerprint segment (damaged header)")
            return
        if data[:_HEADER_SIZE] != _header():
            logger.info("fingerprint cache segment %s was made with other settings; ignored", path.name)
            return
        dtype = _record_dtype()
        body = memoryview(data)[_HEADER_SIZE:]
        count, torn = divmod(len(body), dtype.itemsize)
        records = np.frombuffer(body[: count * dtype.itemsize], dtype=dtype)
        bad = 0
        for k in range(count):
            raw = body[k * dtype.itemsize : (k + 1) * dtype.itemsize]
            check = hashlib.blake2b(raw[:-_CHECK_SIZE], digest_size=_CHECK_SIZE).digest()
            if check != raw[-_CHECK_SIZE:]:
                bad += 1
                continue
            record = records[k]
            self._entries[record["key"].tobytes().hex()] = Fingerprint(record["phash"], record["thumbnails"])
        if bad or torn:
            self.damaged.append(
                f"{path.name}: {bad} record(s) failing their checksum"
                + (f", a torn last record ({torn} bytes)" if torn else "")
            )

    def __getitem__(self, key: str) -> Fingerprint:
        return self._entries[key]

    def __setitem__(self, key: str, fp: Fingerprint) -> None:
        self._entries[key] = fp
        if self.directory is None:
            return
        record = _record(key, fp)
        if self._segment is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"{time.time_ns()}-{os.getpid()}-{secrets.token_hex(4)}{_SEGMENT_SUFFIX}"
            self._segment = self.directory / name
            record = _header() + record  # header and first record in one write
        # append mode, one write per record: a kill leaves whole records and at most one torn last one
        with open(self._segment, "ab") as handle:
            handle.write(record)

    def __delitem__(self, key: str) -> None:
        del self._entries[key]  # in memory; gone from disk at the next compact()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def compact(self) -> None:
        """Write every fingerprint into one new segment (atomically, synced), then remove the segments it
        replaces. No-op in memory or when there is one undamaged segment and nothing new."""
        if self.directory is None:
            return
        if self._segment is None and len(self._read) == 1 and not self.damaged:
            return
        if not self._entries and not self._read and self._segment is None:
            return
        target = self.directory / f"{time.time_ns()}-{os.getpid()}-compact{_SEGMENT_SUFFIX}"
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:
            handle.write(_header())
            for key, fp in self._entries.items():
                handle.write(_record(key, fp))
            handle.flush()
            os.fsync(handle.fileno())
        for old in [*self._read, *([self._segment] if self._segment is not None else [])]:
            old.unlink(missing_ok=True)
        self._read, self._segment, self.damaged = [target], None, []


def load_cache(cache_dir: Path) -> FingerprintCache:
    """The fingerprint cache kept in ``cache_dir`` (empty when there is none): a :class:`FingerprintCache`."""
    return FingerprintCache(cache_dir)


def save_cache(cache_dir: Path, cache: MutableMapping[str, Fingerprint]) -> None:
    """Store ``cache`` in ``cache_dir`` as one compacted segment (``cache`` as :func:`load_cache` gave it
    for that folder already holds every entry on disk: this only compacts it)."""
    if not (isinstance(cache, FingerprintCache) and cache.directory == Path(cache_dir) / CACHE_DIRNAME):
        stored = FingerprintCache(cache_dir)
        for key, fp in cache.items():
            if key not in stored:
                stored[key] = fp
        cache = stored
    cache.compact()


_Keyed = tuple[str | None, Fingerprint | None]  # (content key, new fingerprint) of one film
_FINGERPRINT_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def _keyed_fingerprint(path: str, known: Container[str]) -> _Keyed:
    """(content key, fingerprint) of one file, read once; the fingerprint is None when the key is in
    ``known``, and both are None when the file cannot be read or decoded."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        key = hashlib.sha256(data).hexdigest()
        return key, None if key in known else fingerprint(io.BytesIO(data))
    except _FINGERPRINT_ERRORS as exc:
        logger.debug("cannot fingerprint an image: %s", type(exc).__name__)
        return None, None


class _FingerprintFiles:
    """Map-style dataset for torch's DataLoader: ``i`` -> :func:`_keyed_fingerprint` of ``paths[i]``."""

    def __init__(self, paths: Sequence[str], known: frozenset[str]) -> None:
        self.paths, self.known = paths, known

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _Keyed:
        return _keyed_fingerprint(self.paths[index], self.known)


def fingerprint_workers() -> int:
    """Worker processes for :func:`fingerprint_images` by default: the CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fingerprint_images(
    paths: Sequence[str],
    cache: MutableMapping[str, Fingerprint],
    on_progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> tuple[list[Fingerprint | None], int]:
    """Fingerprints of ``paths`` (None where the file cannot be read or decoded) and how many came from
    ``cache`` (content key -> fingerprint; new ones are added to it, and so saved at once when it is a
    :class:`FingerprintCache`). ``on_progress(done, total)`` after each image.

    ``workers`` > 1: the files are read, hashed and fingerprinted in that many DataLoader worker
    processes, in order, while this process alone writes the cache, so an interrupted run resumes as a
    serial one does (and the workers stop when this process dies). The result equals the serial one."""
    if workers > 1 and len(paths) >= 4 * _WORKER_CHUNK:
        from torch.utils.data import DataLoader, Dataset  # only here: prepare otherwise needs no torch

        files = cast(Dataset[_Keyed], _FingerprintFiles(paths, frozenset(cache.keys())))
        loader: DataLoader[_Keyed] = DataLoader(
            files, _WORKER_CHUNK, num_workers=workers, collate_fn=list, worker_init_fn=end_with_parent
        )
        return _gather((one for chunk in loader for one in chunk), len(paths), cache, on_progress)
    return _gather((_keyed_fingerprint(path, cache) for path in paths), len(paths), cache, on_progress)


def _gather(
    keyed: Iterable[_Keyed],
    total: int,
    cache: MutableMapping[str, Fingerprint],
    on_progress: Callable[[int, int], None] | None,
) -> tuple[list[Fingerprint | None], int]:
    """The fingerprints of (key, new fingerprint or None) results in order, new ones stored in ``cache``."""
    results: list[Fingerprint | None] = []
    cached = 0
    for done, (key, new) in enumerate(keyed, start=1):
        if key is None:
            results.append(None)
        elif key in cache:  # cached before the run, or a film of the same content earlier in it
            cached += 1
            results.append(cache[key])
        elif new is not None:
            cache[key] = new
            results.append(new)
        else:  # cannot happen: a key known at the start stays in the cache
            raise KeyError("fingerprint cache lost an entry during the run")
        if on_progress is not None:
            on_progress(done, total)
    return results, cached


def _normalised(thumbnails: np.ndarray) -> np.ndarray:
    """(..., S*S) uint8 -> float32 rows with zero mean and unit norm (a flat row stays 0)."""
    rows = thumbnails.astype(np.float32)
    rows -= rows.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.divide(rows, norm, out=np.zeros_like(rows), where=norm > 0)


def near_duplicate_pairs_brute_force(fingerprints: Sequence[Fingerprint]) -> list[NearDuplicatePair]:
    """The definition, by comparing all pairs: the reference :func:`near_duplicate_pairs` must equal
    (tests, ``benchmarks/near_duplicate_scale.py``). Time and memory grow as n^2 (at 100k real films a
    block of rows gathers ~2 million candidate pairs, ~40 GB).

    All pairs (i < j) whose phash is within :data:`PHASH_CANDIDATE_BITS` bits at some crop level and
    whose thumbnail correlation at the best crop level pairing reaches :data:`NCC_THRESHOLD`.

    Crop pairings compared: level 0 of one image with every level of the other, both ways (one of the two
    is the cropped copy). Cost: n^2 * L 64-bit popcounts, in blocks of rows."""
    n = len(fingerprints)
    if n < 2:
        return []
    hashes = np.stack([fp.phash for fp in fingerprints])  # (n, L)
    thumbnails = _normalised(np.stack([fp.thumbnails for fp in fingerprints]))  # (n, L, S*S)
    pairs: list[NearDuplicatePair] = []
    for start in range(0, n, _BLOCK):
        rows = slice(start, min(start + _BLOCK, n))
        bits = np.full((rows.stop - start, n), 64, dtype=np.uint8)
        for level in range(len(CROP_LEVELS)):
            bits = np.minimum(bits, np.bitwise_count(hashes[rows, 0, None] ^ hashes[None, :, level]))
            bits = np.minimum(bits, np.bitwise_count(hashes[rows, level, None] ^ hashes[None, :, 0]))
        first, second = np.nonzero(bits <= PHASH_CANDIDATE_BITS)
        first += start
        keep = first < second
        first, second = first[keep], second[keep]
        if not len(first):
            continue
        # (p, L): level 0 of one image against every level of the other, both ways
        forward = np.einsum("pd,pld->pl", thumbnails[first, 0], thumbnails[second])
        backward = np.einsum("pld,pd->pl", thumbnails[first], thumbnails[second, 0])
        correlation = np.maximum(forward, backward).max(axis=1)
        for i, j, r in zip(first, second, correlation, strict=True):
            if r >= NCC_THRESHOLD:
                pairs.append(NearDuplicatePair(int(i), int(j), int(bits[i - start, j]), float(r)))
    return pairs


def _projection(fingerprints: Sequence[Fingerprint], dims: int) -> np.ndarray:
    """(S*S, dims) float32 orthonormal columns: the top principal components of the normalised
    thumbnails (all crop levels) of up to :data:`_PCA_SAMPLE` films (a fixed sample).

    Any orthonormal basis keeps the search exact (a projection never lengthens a difference); the
    principal components only make it selective: the first 32 hold ~85 % of the variance of real films."""
    n = len(fingerprints)
    sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, _PCA_SAMPLE), replace=False))
    rows = _normalised(np.stack([fingerprints[i].thumbnails for i in sample]))
    rows = rows.reshape(-1, rows.shape[-1]).astype(np.float64)
    rows -= rows.mean(axis=0)
    covariance = rows.T @ rows
    # randomised subspace iteration (Halko et al. 2011) on the covariance: the top components to within
    # what the search needs, in matrix products; a full eigendecomposition of 1024 x 1024 took seconds here
    basis = np.random.default_rng(1).standard_normal((covariance.shape[0], min(dims, covariance.shape[0])))
    for _ in range(4):
        basis, _ = np.linalg.qr(covariance @ basis)
    return np.ascontiguousarray(basis, dtype=np.float32)


def _film_vectors(
    fingerprints: Sequence[Fingerprint], basis: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per film and crop level, in chunks: the normalised thumbnail projected on ``basis`` ((n, L, dims)
    float32), and the sum and centred sum of squares of its pixels ((n, L) float64, exact)."""
    n, levels = len(fingerprints), len(fingerprints[0].phash)
    projected = np.empty((n, levels, basis.shape[1]), dtype=np.float32)
    sums = np.empty((n, levels), dtype=np.float64)
    squares = np.empty((n, levels), dtype=np.float64)
    for start in range(0, n, _VERIFY_CHUNK):
        thumbnails = np.stack([fp.thumbnails for fp in fingerprints[start : start + _VERIFY_CHUNK]])
        rows = slice(start, start + len(thumbnails))
        projected[rows] = _normalised(thumbnails) @ basis
        sums[rows] = thumbnails.sum(axis=-1, dtype=np.int64)
        squares[rows] = (thumbnails.astype(np.int32) ** 2).sum(axis=-1, dtype=np.int64)
    centred = squares - sums**2 / fingerprints[0].thumbnails.shape[-1]
    return projected, sums, centred


def _hit_correlations(
    fingerprints: Sequence[Fingerprint],
    sums: np.ndarray,
    centred: np.ndarray,
    query: np.ndarray,
    other: np.ndarray,
    level: np.ndarray,
) -> np.ndarray:
    """Pearson r (float64) of level 0 of film ``query[k]`` and level ``level[k]`` of film ``other[k]``
    from integer pixel products: one correlation per index hit instead of the 2L - 1 the full rule
    computes, without normalising the thumbnails."""
    out = np.zeros(len(query), dtype=np.float64)
    for start in range(0, len(query), _VERIFY_CHUNK):
        k = slice(start, start + _VERIFY_CHUNK)
        a = np.stack([fingerprints[i].thumbnails[0] for i in query[k]]).astype(np.int32)
        b = np.stack([fingerprints[j].thumbnails[c] for j, c in zip(other[k], level[k], strict=True)])
        products = np.einsum("pd,pd->p", a, b.astype(np.int32)).astype(np.float64)
        covariance = products - sums[query[k], 0] * sums[other[k], level[k]] / a.shape[1]
        scale = np.sqrt(centred[query[k], 0] * centred[other[k], level[k]])
        np.divide(covariance, scale, out=out[k], where=scale > 0)
    return out


@contextmanager
def _faiss_threads() -> Iterator[Any]:
    """faiss, with no more OpenMP threads than CPUs this process may use (its default counts every CPU
    of the machine, which oversubscribes a CPU-limited container)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, min(before, len(os.sched_getaffinity(0)))))
    try:
        yield faiss
    finally:
        faiss.omp_set_num_threads(before)


class _CellIndex:
    """A faiss inverted-file index (``IndexIVFFlat``, k-means cells) over the projected crop levels of
    every film, and the centroid geometry :meth:`cells_to_visit` needs."""

    def __init__(self, faiss: Any, vectors: np.ndarray) -> None:
        count, dims = vectors.shape
        cells = max(1, min(_MAX_CELLS, int(_CELLS_PER_ROOT * np.sqrt(count)), count // 39))
        if cells > 1:
            kmeans = faiss.Kmeans(dims, cells, niter=10, seed=1, max_points_per_centroid=64)
            kmeans.train(vectors)
            centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        else:
            centroids = vectors.mean(axis=0, keepdims=True)
        self.quantizer = faiss.IndexFlatL2(dims)
        self.quantizer.add(centroids)
        self.index = faiss.IndexIVFFlat(self.quantizer, dims, cells)
        self.index.add(vectors)  # each vector into the cell of its nearest centroid
        self.centroids = centroids
        self.centroid_norms = (centroids.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)

    def cells_to_visit(self, queries: np.ndarray, radius: float) -> np.ndarray:
        """(b, m) cell ids, -1 padded: every cell that may hold a vector within ``radius`` of a query.

        Why this loses nothing (hand-written: faiss's ``nprobe`` visits a fixed number of nearest cells,
        which can miss a neighbour across a cell border). Let ``a`` be the query's nearest centroid and
        ``x`` a vector in cell ``c`` (so ``|x - m_c|^2 <= |x - m_a|^2``, up to rounding ``eps``). The
        function ``h(y) = |y - m_c|^2 - |y - m_a|^2`` is affine with gradient ``2 (m_a - m_c)``, so
        ``h(q) - h(x) <= 2 |m_a - m_c| |q - x|``, and with ``h(x) <= eps``:
        ``|q - x| >= (h(q) - eps) / (2 |m_a - m_c|)``. A cell where this lower bound exceeds ``radius``
        holds no neighbour; every other cell is visited."""
        rows = np.arange(len(queries))
        distances = (
            (queries.astype(np.float32) ** 2).sum(axis=1)[:, None]
            + self.centroid_norms[None, :]
            - 2 * queries @ self.centroids.T
        )
        nearest = distances.argmin(axis=1)
        gap = distances - distances[rows, nearest][:, None] - _BOUND_SLACK
        # |m_a - m_c|, rounded up: the squared form is off by ~1e-6 in float32, and a separation taken too
        # small would make the bound too large (adding 1e-4 moves a typical separation of 0.1-0.5 by <0.5 %)
        squared = (
            self.centroid_norms[nearest][:, None]
            + self.centroid_norms[None, :]
            - 2 * self.centroids[nearest] @ self.centroids.T
        )
        separation = np.sqrt(np.maximum(squared, 0) + _SEPARATION_SLACK)
        separation[rows, nearest] = 0  # the query's own cell is always visited
        bound = np.divide(gap, 2 * separation, out=np.full_like(gap, -np.inf), where=separation > 0)
        visit = bound <= radius
        visit[rows, nearest] = True
        query, cell = np.nonzero(visit)  # row-major: grouped by query
        counts = np.bincount(query, minlength=len(queries))
        column = np.arange(len(query)) - np.repeat(np.cumsum(counts) - counts, counts)
        keys = np.full((len(queries), int(counts.max())), -1, dtype=np.int64)
        keys[query, column] = cell
        return keys

    def within(self, queries: np.ndarray, radius2: float) -> tuple[np.ndarray, np.ndarray]:
        """(query row, vector id) of every stored vector at squared distance < ``radius2`` of a query."""
        keys = self.cells_to_visit(queries, float(np.sqrt(radius2)))
        self.index.nprobe = keys.shape[1]
        lims, _, ids = self.index.range_search_preassigned(queries, radius2, keys, None)
        return np.repeat(np.arange(len(queries)), np.diff(lims).astype(np.int64)), ids


def _hash_bits(hashes: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """phash bits apart of films ``first[k]`` and ``second[k]``: the minimum over the crop level pairings
    the rule compares (as :func:`near_duplicate_pairs_brute_force` counts them)."""
    bits = np.full(len(first), 64, dtype=np.uint8)
    for level in range(hashes.shape[1]):
        bits = np.minimum(bits, np.bitwise_count(hashes[first, 0] ^ hashes[second, level]))
        bits = np.minimum(bits, np.bitwise_count(hashes[first, level] ^ hashes[second, 0]))
    return bits


def _verified(
    fingerprints: Sequence[Fingerprint], hashes: np.ndarray, first: np.ndarray, second: np.ndarray
) -> Iterator[NearDuplicatePair]:
    """The pairs (first[k] < second[k]) that meet the definition, checked exactly as
    :func:`near_duplicate_pairs_brute_force` checks them (same hash rule, same float32 arithmetic), in
    chunks of :data:`_VERIFY_CHUNK` pairs."""
    bits = _hash_bits(hashes, first, second)
    keep = bits <= PHASH_CANDIDATE_BITS
    first, second, bits = first[keep], second[keep], bits[keep]
    for start in range(0, len(first), _VERIFY_CHUNK):
        chunk = slice(start, start + _VERIFY_CHUNK)
        a = _normalised(np.stack([fingerprints[i].thumbnails for i in first[chunk]]))
        b = _normalised(np.stack([fingerprints[j].thumbnails for j in second[chunk]]))
        forward = np.einsum("pd,pld->pl", np.ascontiguousarray(a[:, 0]), b)
        backward = np.einsum("pld,pd->pl", a, np.ascontiguousarray(b[:, 0]))
        correlation = np.maximum(forward, backward).max(axis=1)
        for i, j, h, r in zip(first[chunk], second[chunk], bits[chunk], correlation, strict=True):
            if r >= NCC_THRESHOLD:
                yield NearDuplicatePair(int(i), int(j), int(h), float(r))


def near_duplicate_pairs(
    fingerprints: Sequence[Fingerprint], on_progress: Callable[[int, int], None] | None = None
) -> list[NearDuplicatePair]:
    """All pairs (i < j) whose phash is within :data:`PHASH_CANDIDATE_BITS` bits at some crop level and
    whose thumbnail correlation at the best crop level pairing reaches :data:`NCC_THRESHOLD`: exactly the
    pairs of :func:`near_duplicate_pairs_brute_force`, sorted, found through an index.

    Candidates: a correlation r between two normalised (zero-mean, unit-norm) thumbnails is
    ``1 - |u - v|^2 / 2``, so r >= :data:`NCC_THRESHOLD` means ``|u - v|^2 <= 2 (1 - NCC_THRESHOLD)``, and
    so does the difference of their projections (a projection on orthonormal components never lengthens
    it). Level 0 of each film is searched against every crop level of every film; both directions of a
    pairing are covered because each film is a query. ``on_progress(done, total)`` after each batch."""
    n = len(fingerprints)
    if n < 2:
        return []
    levels = len(fingerprints[0].phash)
    hashes = np.stack([fp.phash for fp in fingerprints])  # (n, L) uint64: 40 bytes a film
    radius2 = 2 * (1 - NCC_THRESHOLD) + _RADIUS_SLACK
    projected, sums, centred = _film_vectors(fingerprints, _projection(fingerprints, INDEX_DIMENSIONS))
    found: dict[tuple[int, int], NearDuplicatePair] = {}
    with _faiss_threads() as faiss:
        index = _CellIndex(faiss, projected.reshape(n * levels, -1))
        for start in range(0, n, _QUERY_BATCH):
            queries = np.ascontiguousarray(projected[start : start + _QUERY_BATCH, 0])
            rows, ids = index.within(queries, radius2)
            query, other, level = rows + start, ids // levels, ids % levels
            keep = query != other
            query, other, level = query[keep], other[keep], level[keep]
            # a pair meets the rule only if one of its pairings reaches the threshold, and each such pairing
            # is itself a hit (of this batch or of the other film's): checking hits one by one loses nothing
            keep = _hash_bits(hashes, np.minimum(query, other), np.maximum(query, other)) <= (
                PHASH_CANDIDATE_BITS
            )
            query, other, level = query[keep], other[keep], level[keep]
            r = _hit_correlations(fingerprints, sums, centred, query, other, level)
            keep = r >= NCC_THRESHOLD - _CORRELATION_SLACK
            first, second = np.minimum(query, other)[keep], np.maximum(query, other)[keep]
            pair = np.unique(first * n + second)
            for found_pair in _verified(fingerprints, hashes, pair // n, pair % n):
                found[(found_pair.first, found_pair.second)] = found_pair
            if on_progress is not None:
                on_progress(min(start + _QUERY_BATCH, n), n)
    return [found[key] for key in sorted(found)]


def split_groups(
    items: Sequence[DataItem],
    pairs: Sequence[NearDuplicatePair],
    same_patients: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """Split group of each item: the connected components of "same patient", near-duplicate and
    ``same_patients`` (two ids of one person, e.g. one file listed under both) links, named by their
    smallest patient id (so a patient without duplicates keeps its own id)."""
    n = len(items)
    first_of: dict[str, int] = {}
    links = [(first_of.setdefault(item.patient_id, i), i) for i, item in enumerate(items)]
    links += [(pair.first, pair.second) for pair in pairs]
    links += [(first_of[a], first_of[b]) for a, b in same_patients if a in first_of and b in first_of]
    rows, cols = zip(*links, strict=True) if links else ((), ())
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    names: dict[int, str] = {}
    for item, c in zip(items, component, strict=True):
        names[int(c)] = min(names.get(int(c), item.patient_id), item.patient_id)
    return [names[int(c)] for c in component]
