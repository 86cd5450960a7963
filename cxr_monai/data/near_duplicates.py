"""Near-duplicate images across patients: found from pixels, merged into one split group.

The covid-chestxray-dataset publishes some radiographs twice under different patient ids (re-encoded,
re-cropped, a caption added). Split by patient alone, such a pair can land in test and training.

Each image gets a fingerprint from a grayscale copy at several centre crops (:data:`CROP_LEVELS`, share of
width/height removed per side), so a re-cropped copy matches the original at some crop level:

* a 64-bit perceptual hash (``imagehash.phash``) per crop level: the cheap first filter, pairs within
  :data:`PHASH_CANDIDATE_BITS` bits (minimum over crop levels) are candidates;
* a :data:`THUMBNAIL_SIZE` px thumbnail per crop level: a candidate pair is a near-duplicate when the best
  normalised cross-correlation (Pearson r of the pixels) over crop levels reaches :data:`NCC_THRESHOLD`.

Why two stages: on the real data (``benchmarks/results/near_duplicates.md``) 64-bit phash puts different
patients' films within 2 bits (chest films look alike at 8x8 frequencies), as close as a real re-cropped
duplicate (2-4 bits), so the hash alone cannot separate them; the thumbnail correlation does (duplicates
>= 0.974, closest different films <= 0.963). Fingerprints are cached by the SHA-256 of the file bytes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cxr_monai.atomic import atomic_path
from cxr_monai.data.sources import DataItem

logger = logging.getLogger(__name__)

#: Share of the width and height removed on each side for the crop levels fingerprinted.
CROP_LEVELS: tuple[float, ...] = (0.0, 0.02, 0.04, 0.06, 0.08)
#: Thumbnail side (px) for the correlation check.
THUMBNAIL_SIZE = 32
#: Candidate pairs: phash Hamming distance (bits of 64, minimum over crop levels) at most this.
PHASH_CANDIDATE_BITS = 12
#: Near-duplicate: best thumbnail correlation over crop levels at least this.
NCC_THRESHOLD = 0.97
CACHE_FILENAME = "near_duplicate_cache.npz"
_CACHE_VERSION = 1
_DECODE_SIZE = 256  # JPEG draft decoding to >= this many px: the fingerprints need no more
_BLOCK = 1024  # rows of the pairwise hash comparison held at once


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


def _grayscale(path: str) -> Image.Image:
    """The image as 8-bit grayscale; 16-bit and float images rescaled min..max to 0..255."""
    with Image.open(path) as opened:
        opened.draft("L", (_DECODE_SIZE, _DECODE_SIZE))  # JPEG: decode at reduced scale (fast)
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            pixels = np.asarray(image, dtype=np.float64)
            span = float(pixels.max() - pixels.min()) or 1.0
            return Image.fromarray(((pixels - pixels.min()) * (255.0 / span)).astype(np.uint8))
        return image.convert("L")


def fingerprint(path: str) -> Fingerprint:
    """Fingerprint of one image file; OSError / PIL errors when it cannot be decoded."""
    image = _grayscale(path)
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


def _content_key(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def load_cache(cache_dir: Path) -> dict[str, Fingerprint]:
    """Fingerprints by content key from ``cache_dir/near_duplicate_cache.npz``; empty when absent,
    unreadable or of another version."""
    path = Path(cache_dir) / CACHE_FILENAME
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != _CACHE_VERSION or data["thumbnails"].shape[1:] != (
                len(CROP_LEVELS),
                THUMBNAIL_SIZE * THUMBNAIL_SIZE,
            ):
                return {}
            rows = zip(data["keys"], data["phash"], data["thumbnails"], strict=True)
            return {str(key): Fingerprint(phash, thumbnails) for key, phash, thumbnails in rows}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("near-duplicate cache %s unreadable (%s); fingerprinting every image", path, exc)
        return {}


def save_cache(cache_dir: Path, cache: dict[str, Fingerprint]) -> None:
    """Write ``cache`` to ``cache_dir/near_duplicate_cache.npz`` (created), atomically."""
    keys = sorted(cache)
    with atomic_path(Path(cache_dir) / CACHE_FILENAME) as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            version=np.array(_CACHE_VERSION),
            keys=np.array(keys, dtype=str),
            phash=np.array([cache[key].phash for key in keys], dtype=np.uint64).reshape(len(keys), -1),
            thumbnails=np.array([cache[key].thumbnails for key in keys], dtype=np.uint8).reshape(
                len(keys), len(CROP_LEVELS), -1
            ),
        )


def fingerprint_images(
    paths: Sequence[str],
    cache: dict[str, Fingerprint],
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Fingerprint | None], int]:
    """Fingerprints of ``paths`` (None where the file cannot be read or decoded) and how many came from
    ``cache`` (content key -> fingerprint; new ones are added to it). ``on_progress(done, total)`` after
    each image."""
    results: list[Fingerprint | None] = []
    cached = 0
    for done, path in enumerate(paths, start=1):
        try:
            key = _content_key(path)
            if key in cache:
                cached += 1
            else:
                cache[key] = fingerprint(path)
            results.append(cache[key])
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            logger.debug("cannot fingerprint image %d: %s", done - 1, type(exc).__name__)
            results.append(None)
        if on_progress is not None:
            on_progress(done, len(paths))
    return results, cached


def _normalised(thumbnails: np.ndarray) -> np.ndarray:
    """(..., S*S) uint8 -> float32 rows with zero mean and unit norm (a flat row stays 0)."""
    rows = thumbnails.astype(np.float32)
    rows -= rows.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.divide(rows, norm, out=np.zeros_like(rows), where=norm > 0)


def near_duplicate_pairs(fingerprints: Sequence[Fingerprint]) -> list[NearDuplicatePair]:
    """All pairs (i < j) whose phash is within :data:`PHASH_CANDIDATE_BITS` bits at some crop level and
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
