"""prepare at scale: the indexed near-duplicate search finds exactly the all-pairs definition's pairs and
groups; the fingerprint cache resumes after ``kill -9`` and does not trust a damaged file."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from data_layouts import distinct_image, synthetic_public_data
from PIL import Image

import cxr_monai.data.near_duplicates as nd
from cxr_monai.data import CACHE_DIRNAME, DataItem, PrepareOptions, assemble_dataset
from cxr_monai.data.near_duplicates import (
    CROP_LEVELS,
    NCC_THRESHOLD,
    THUMBNAIL_SIZE,
    Fingerprint,
    FingerprintCache,
    fingerprint_images,
    load_cache,
    near_duplicate_pairs,
    near_duplicate_pairs_brute_force,
    save_cache,
    split_groups,
)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches and chunks far smaller than the films, so that pairs cross batch and chunk borders."""
    monkeypatch.setattr(nd, "_QUERY_BATCH", 7)
    monkeypatch.setattr(nd, "_VERIFY_CHUNK", 5)


def _items(count: int) -> list[DataItem]:
    return [DataItem(image=f"{k}.png", label=0, patient_id=f"p{k}", source="test") for k in range(count)]


def _assert_same_as_brute_force(fingerprints: list[Fingerprint]) -> list[nd.NearDuplicatePair]:
    reference = near_duplicate_pairs_brute_force(fingerprints)
    indexed = near_duplicate_pairs(fingerprints)
    assert indexed == reference  # the same pairs, in the same order, with the same bits and correlations
    items = _items(len(fingerprints))
    assert split_groups(items, indexed) == split_groups(items, reference)
    return reference


def _save(image: Image.Image, path: Path, **options: object) -> str:
    image.save(path, **options)
    return str(path)


def test_made_images_with_planted_duplicates(tmp_path: Path, small_batches: None) -> None:
    paths, planted = [], []
    for seed in range(40):
        paths.append(_save(distinct_image(seed, size=256), tmp_path / f"{seed}.png"))
    for seed in range(0, 40, 4):  # re-encoded, re-cropped and re-encoded, brightness-shifted copies
        image = distinct_image(seed, size=256)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=60)
        paths.append(_save(Image.open(buffer), tmp_path / f"{seed}-q60.jpeg"))
        planted.append((seed, len(paths) - 1))
        cropped = image.crop((8, 6, 250, 256))
        paths.append(_save(cropped, tmp_path / f"{seed}-crop.jpeg", quality=75))
        planted.append((seed, len(paths) - 1))
        brighter = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + 25, 0, 255).astype(np.uint8))
        paths.append(_save(brighter, tmp_path / f"{seed}-bright.png"))
        planted.append((seed, len(paths) - 1))
    fingerprints, _ = fingerprint_images(paths, {})
    assert all(fp is not None for fp in fingerprints)

    pairs = _assert_same_as_brute_force([fp for fp in fingerprints if fp is not None])

    found = {(pair.first, pair.second) for pair in pairs}
    assert set(planted) <= found, "every planted copy is found (the comparison is not vacuous)"


def _smooth(rng: np.random.Generator, size: int) -> np.ndarray:
    grid = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)


def _crop_levels(picture: np.ndarray) -> np.ndarray:
    """(L, S*S) uint8 thumbnails of ``picture`` at the crop levels, as ``fingerprint`` makes them."""
    size = picture.shape[0]
    image = Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8))
    levels = []
    for level in CROP_LEVELS:
        d = round(size * level)
        crop = image.crop((d, d, size - d, size - d))
        thumbnail = crop.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BOX)
        levels.append(np.asarray(thumbnail, dtype=np.uint8).ravel())
    return np.stack(levels)


def test_dense_clusters_straddling_both_thresholds(small_batches: None) -> None:
    """Clusters of noisy, shifted, re-cropped variants whose correlations straddle 0.97 and whose hashes
    straddle 12 bits: where a missed index cell or a rounding slip would show."""
    rng = np.random.default_rng(0)
    fingerprints = []
    for _ in range(12):
        base = _smooth(rng, 64)
        bits = rng.integers(0, 2**63, len(CROP_LEVELS), dtype=np.uint64)
        for _ in range(20):
            noisy = base + rng.normal(0, rng.uniform(4, 16), base.shape) + rng.uniform(-20, 20)
            shift = rng.integers(0, 3)
            picture = np.roll(noisy, shift, axis=1)
            flips = np.zeros(len(CROP_LEVELS), dtype=np.uint64)
            for position in rng.choice(64, rng.integers(0, 20), replace=False):
                flips |= np.uint64(1) << np.uint64(position)
            fingerprints.append(Fingerprint(bits ^ flips, _crop_levels(picture)))

    pairs = _assert_same_as_brute_force(fingerprints)

    correlations = np.array([pair.correlation for pair in pairs])
    assert len(pairs) > 100 and np.sum(correlations < NCC_THRESHOLD + 0.005) > 10
    assert max(pair.phash_bits for pair in pairs) >= 10


def test_flat_and_tiny_sets() -> None:
    flat = Fingerprint(np.zeros(len(CROP_LEVELS), np.uint64), np.full((5, THUMBNAIL_SIZE**2), 7, np.uint8))
    assert near_duplicate_pairs([]) == near_duplicate_pairs([flat]) == []
    assert near_duplicate_pairs([flat, flat, flat]) == near_duplicate_pairs_brute_force([flat] * 3) == []


@pytest.mark.integration
@pytest.mark.slow
def test_shared_data_gives_todays_pairs_and_groups(shared_data: Path, pytestconfig: pytest.Config) -> None:
    """Every image of the three sources (fingerprints kept in pytest's cache between runs)."""
    paths = sorted(str(p) for p in shared_data.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    cache_dir = pytestconfig.cache.mkdir("near_duplicate_fingerprints") if pytestconfig.cache else None
    cache = load_cache(cache_dir) if cache_dir is not None else {}
    fingerprints, _ = fingerprint_images(paths, cache)
    if cache_dir is not None:
        save_cache(cache_dir, cache)
    kept = [fp for fp in fingerprints if fp is not None]
    assert len(kept) > 1000

    pairs = _assert_same_as_brute_force(kept)

    names = [Path(paths[k]).name for k, fp in enumerate(fingerprints) if fp is not None]
    found = {frozenset((names[pair.first], names[pair.second])) for pair in pairs}
    assert frozenset(("AR-1.jpg", "extubation-1.jpg")) in found  # benchmarks/results/near_duplicates.md


_CHILD = textwrap.dedent(
    """
    import sys, time
    import cxr_monai.data.near_duplicates as nd

    def report(done, total):  # slow: the run is still going when the test kills it
        print(done, flush=True)
        time.sleep(0.1)

    cache = nd.load_cache(sys.argv[1])
    nd.fingerprint_images(sys.argv[3:], cache, report, workers=int(sys.argv[2]))
    """
)


@pytest.mark.parametrize("workers", [1, 2])
def test_cache_resumes_after_kill_9(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    paths = [_save(distinct_image(seed, size=120), tmp_path / f"{seed}.png") for seed in range(70)]
    cache_dir = tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(cache_dir), str(workers), *paths],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert child.stdout is not None
    reported = 0
    deadline = time.monotonic() + 120
    while reported < 12 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        reported = int(line)
    workers_of_child = _children(child.pid)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert 12 <= reported < len(paths), "killed midway"
    assert len(workers_of_child) == (workers if workers > 1 else 0)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers_of_child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers_of_child), "worker processes outlived the killed run"

    calls = _count_fingerprints(monkeypatch)
    cache = load_cache(cache_dir)
    resumed, cached = fingerprint_images(paths, cache)

    assert cached >= reported, "every image reported done before the kill comes from the cache"
    done_before = {hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths[:reported]}
    assert len(calls) == len(paths) - cached and set(calls).isdisjoint(done_before)
    fresh, _ = fingerprint_images(paths, {})
    for a, b in zip(resumed, fresh, strict=True):
        assert a is not None and b is not None
        np.testing.assert_array_equal(a.thumbnails, b.thumbnails)
        np.testing.assert_array_equal(a.phash, b.phash)


def _children(pid: int) -> list[int]:
    """Process ids of ``pid``'s children (Linux /proc)."""
    return [int(v) for v in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _count_fingerprints(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SHA-256 of each film fingerprinted from now on in this process, in order."""
    calls: list[str] = []
    original = nd.fingerprint

    def counted(source: io.BytesIO) -> nd.Fingerprint:
        calls.append(hashlib.sha256(source.getvalue()).hexdigest())
        return original(source)

    monkeypatch.setattr(nd, "fingerprint", counted)
    return calls


def _segments(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / CACHE_DIRNAME).glob("*.fpc"))


def _damage(segment: Path, how: str) -> None:
    data = bytearray(segment.read_bytes())
    record = nd._record_dtype().itemsize
    if how == "record":  # one pixel of the third record's thumbnails
        data[nd._HEADER_SIZE + 2 * record + 32 + 8 * len(CROP_LEVELS) + 100] ^= 0xFF
    elif how == "header":
        data[:4] = b"junk"
    elif how == "torn":
        del data[-record // 2 :]
    segment.write_bytes(bytes(data))


@pytest.mark.parametrize(("how", "recomputed"), [("record", 1), ("header", 6), ("torn", 1)])
def test_damaged_cache_is_detected_and_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, recomputed: int
) -> None:
    paths = [_save(distinct_image(seed, size=200), tmp_path / f"{seed}.png") for seed in range(6)]
    fresh, _ = fingerprint_images(paths, load_cache(tmp_path))
    (segment,) = _segments(tmp_path)
    _damage(segment, how)

    calls = _count_fingerprints(monkeypatch)
    cache = load_cache(tmp_path)
    assert len(cache.damaged) == 1 and segment.name in cache.damaged[0]
    again, cached = fingerprint_images(paths, cache)

    assert len(calls) == recomputed and cached == len(paths) - recomputed
    for a, b in zip(again, fresh, strict=True):
        assert a is not None and b is not None
        np.testing.assert_array_equal(a.thumbnails, b.thumbnails)
        np.testing.assert_array_equal(a.phash, b.phash)
    save_cache(tmp_path, cache)  # compaction drops the damaged segment
    (compacted,) = _segments(tmp_path)
    reloaded = load_cache(tmp_path)
    assert compacted != segment and not reloaded.damaged and len(reloaded) == len(paths)


def test_a_cache_made_with_other_settings_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [_save(distinct_image(seed, size=200), tmp_path / f"{seed}.png") for seed in range(3)]
    fingerprint_images(paths, load_cache(tmp_path))
    monkeypatch.setattr(nd, "THUMBNAIL_SIZE", 16)
    cache = load_cache(tmp_path)
    assert len(cache) == 0 and not cache.damaged


def test_two_processes_sharing_a_cache_append_to_their_own_segments(tmp_path: Path) -> None:
    paths = [_save(distinct_image(seed, size=200), tmp_path / f"{seed}.png") for seed in range(4)]
    first, second = load_cache(tmp_path), load_cache(tmp_path)
    fingerprint_images(paths[:2], first)
    fingerprint_images(paths[2:], second)
    assert len(_segments(tmp_path)) == 2 and len(load_cache(tmp_path)) == 4
    save_cache(tmp_path, first)  # removes only what it read and wrote
    assert len(_segments(tmp_path)) == 2 and len(load_cache(tmp_path)) == 4
    assert isinstance(first, FingerprintCache)


def test_prepare_warns_about_a_damaged_cache_and_reports_search_progress(tmp_path: Path) -> None:
    covid, kaggle = synthetic_public_data(tmp_path / "public", patients_per_class=6)
    options = PrepareOptions(covid_dir=covid, kaggle_dir=kaggle, cache_dir=tmp_path / "cache")
    assemble_dataset(options)
    (segment,) = _segments(tmp_path / "cache")
    _damage(segment, "record")
    searched: list[tuple[int, int]] = []

    prepared = assemble_dataset(
        options, on_search_progress=lambda done, total: searched.append((done, total))
    )

    assert any("damaged parts not trusted" in warning for warning in prepared.warnings)
    assert (
        prepared.summary["near_duplicates"]["from_cache"]
        == prepared.summary["near_duplicates"]["fingerprinted"] - 1
    )
    assert (
        searched
        and searched[-1][0] == searched[-1][1] == prepared.summary["near_duplicates"]["fingerprinted"]
    )
