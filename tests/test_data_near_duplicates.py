"""Near-duplicate fingerprints: a re-encoded, re-cropped copy joins its original's split group."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from data_layouts import covid_row, distinct_image, make_covid, synthetic_public_data
from PIL import Image

from cxr_monai.data import CACHE_DIRNAME, DataItem, PrepareOptions, assemble_dataset
from cxr_monai.data.near_duplicates import (
    NCC_THRESHOLD,
    Fingerprint,
    NearDuplicatePair,
    fingerprint_images,
    load_cache,
    near_duplicate_pairs,
    save_cache,
    split_groups,
)


def _recropped_copy(image: Image.Image, path: Path, crop: float = 0.03, quality: int = 60) -> Path:
    """``image`` with ``crop`` of each side cut (asymmetrically: the right/bottom a third less), saved as
    JPEG at ``quality``."""
    width, height = image.size
    box = (round(width * crop), round(height * crop), width - round(width * crop * 2 / 3), height)
    buffer = io.BytesIO()
    image.crop(box).save(buffer, format="JPEG", quality=quality)
    path.write_bytes(buffer.getvalue())
    return path


def _item(path: Path, patient: str) -> DataItem:
    return DataItem(image=str(path), label=0, patient_id=patient, source="test")


def test_recropped_reencoded_copy_is_one_group_and_different_images_are_not(tmp_path: Path) -> None:
    original = distinct_image(1, size=400)
    original.save(tmp_path / "a.png")
    _recropped_copy(original, tmp_path / "a-copy.jpeg")
    distinct_image(2, size=400).save(tmp_path / "b.png")
    distinct_image(3, size=400).save(tmp_path / "c.png")
    paths = [tmp_path / name for name in ("a.png", "a-copy.jpeg", "b.png", "c.png")]

    fingerprints, cached = fingerprint_images([str(p) for p in paths], {})
    assert cached == 0 and all(fp is not None for fp in fingerprints)
    pairs = near_duplicate_pairs([fp for fp in fingerprints if fp is not None])

    assert [(pair.first, pair.second) for pair in pairs] == [(0, 1)]
    assert pairs[0].correlation >= NCC_THRESHOLD
    items = [_item(path, f"p{k}") for k, path in enumerate(paths)]
    groups = split_groups(items, pairs)
    assert groups[0] == groups[1] == "p0" and len({groups[0], groups[2], groups[3]}) == 3


def test_groups_chain_across_patients_and_link_same_patient_ids() -> None:
    items = [_item(Path(f"{k}.png"), patient) for k, patient in enumerate(["x", "y", "y", "z", "w"])]
    groups = split_groups(items, [NearDuplicatePair(0, 2, 0, 1.0)], same_patients=[("z", "w")])
    assert groups == ["x", "x", "x", "w", "w"], "x~y by one pair pulls in y's other image"


def test_cache_is_used_and_keyed_by_content(tmp_path: Path) -> None:
    distinct_image(5, size=300).save(tmp_path / "a.png")
    distinct_image(6, size=300).save(tmp_path / "b.png")
    paths = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    first, cached = fingerprint_images(paths, {})
    assert cached == 0
    cache: dict[str, Fingerprint] = {}
    fingerprint_images(paths, cache)
    save_cache(tmp_path / "cache", cache)
    assert len(list((tmp_path / "cache" / CACHE_DIRNAME).iterdir())) == 1, "one compacted segment"
    again, cached = fingerprint_images(paths, load_cache(tmp_path / "cache"))
    assert cached == 2
    for a, b in zip(first, again, strict=True):
        assert a is not None and b is not None
        np.testing.assert_array_equal(a.phash, b.phash)
        np.testing.assert_array_equal(a.thumbnails, b.thumbnails)
    distinct_image(7, size=300).save(tmp_path / "a.png")  # same path, new content: fingerprinted anew
    changed, cached = fingerprint_images(paths, load_cache(tmp_path / "cache"))
    assert cached == 1 and changed[0] is not None and first[0] is not None
    assert not np.array_equal(changed[0].thumbnails, first[0].thumbnails)


def test_prepare_keeps_a_near_duplicate_pair_in_one_split_and_reports_it(tmp_path: Path) -> None:
    covid, kaggle = synthetic_public_data(tmp_path / "public", patients_per_class=12)
    # patient 500 publishes a re-cropped, re-encoded copy of patient 0's first film
    original = Image.open(covid / "images" / "covid0-0.png")
    rows = [
        *(covid_row(p, f"covid{p}-{k}.png") for p in range(12) for k in range(1 + p % 3)),
        covid_row(500, "republished.jpeg"),
        covid_row(501, "broken.png"),
    ]
    make_covid(covid, rows, absent=[row["filename"] for row in rows])
    _recropped_copy(original.resize((400, 400)), covid / "images" / "republished.jpeg")
    (covid / "images" / "broken.png").write_bytes(b"not an image")

    prepared = assemble_dataset(PrepareOptions(covid_dir=covid, kaggle_dir=kaggle, cache_dir=tmp_path))

    report = prepared.summary["near_duplicates"]
    merged = [{image["patient_id"] for image in pair["images"]} for pair in report["merged_pairs"]]
    assert merged == [{"covid:0", "covid:500"}]
    assert report["unreadable"] == {"covid-chestxray-dataset": 1}
    assert any("1 image file(s) cannot be decoded" in w for w in prepared.warnings)
    items = prepared.datalist["training"] + prepared.datalist["test"]
    assert not any(item["image"].endswith("broken.png") for item in items)
    place = {
        item["patient_id"]: item.get("fold", "test") for item in items if item["patient_id"] in merged[0]
    }
    assert len(set(place.values())) == 1, "the pair straddles splits"
    groups = {item["group"] for item in items if item["patient_id"] in merged[0]}
    assert groups == {"covid:0"}


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n truncated"])
def test_unreadable_files_give_none(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.png").write_bytes(content)
    fingerprints, _ = fingerprint_images([str(tmp_path / "bad.png")], {})
    assert fingerprints == [None]


def test_worker_processes_give_the_serial_fingerprints_cache_and_counts(tmp_path: Path) -> None:
    """70 files (enough for the process pool): distinct films, a copy of one (same bytes), a missing and a
    truncated file; a third of them already cached. Two workers give what one process gives."""
    paths = []
    for k in range(66):
        distinct_image(100 + k, size=160).save(tmp_path / f"{k}.png")
        paths.append(str(tmp_path / f"{k}.png"))
    (tmp_path / "copy.png").write_bytes((tmp_path / "3.png").read_bytes())
    (tmp_path / "cut.png").write_bytes((tmp_path / "4.png").read_bytes()[:200])
    paths[10:10] = [str(tmp_path / "copy.png"), str(tmp_path / "missing.png"), str(tmp_path / "cut.png")]
    runs, progress = {}, {1: [], 2: []}
    for workers in (1, 2):
        cache = load_cache(tmp_path / f"cache{workers}")
        fingerprint_images(paths[::3], cache)
        runs[workers] = (
            *fingerprint_images(
                paths, cache, lambda done, _total, w=workers: progress[w].append(done), workers=workers
            ),
            load_cache(tmp_path / f"cache{workers}"),
        )
    assert progress[1] == progress[2] == list(range(1, len(paths) + 1)), "after each film, in order"
    (serial, serial_cached, serial_store), (parallel, parallel_cached, parallel_store) = runs[1], runs[2]
    # cached: the films fingerprinted before (less the truncated one among them), plus the copy of one
    assert parallel_cached == serial_cached == len(paths[::3]) - 1 + 1
    assert [fp is None for fp in parallel] == [fp is None for fp in serial]
    assert sum(fp is None for fp in parallel) == 2
    for a, b in zip(serial, parallel, strict=True):
        if a is not None and b is not None:
            np.testing.assert_array_equal(a.phash, b.phash)
            np.testing.assert_array_equal(a.thumbnails, b.thumbnails)
    assert set(parallel_store) == set(serial_store) and len(parallel_store) == 66, "stored as they came"


def test_dicom_films_are_fingerprinted_as_a_viewer_shows_them(tmp_path: Path) -> None:
    """A site CSV of a PACS export lists DICOM files: they are fingerprinted (not skipped as unreadable),
    MONOCHROME1 inverted, so a DICOM and a PNG of the same picture are one near-duplicate group."""
    from dicom_factory import make_dataset, save

    picture = np.asarray(distinct_image(11, size=256), dtype=np.uint8)
    picture = ((picture - picture.min()) * (255.0 / np.ptp(picture))).astype(np.uint8)  # spans 0..255
    Image.fromarray(picture).save(tmp_path / "film.png")
    save(make_dataset(picture), tmp_path / "film.dcm")
    save(make_dataset(255 - picture, photometric="MONOCHROME1"), tmp_path / "inverted.dcm")
    distinct_image(12, size=256).save(tmp_path / "other.png")
    names = ["film.png", "film.dcm", "inverted.dcm", "other.png"]

    fingerprints, _ = fingerprint_images([str(tmp_path / name) for name in names], {})

    assert all(fp is not None for fp in fingerprints)
    png, dcm, inverted, _ = fingerprints
    for fp in (dcm, inverted):
        assert fp is not None and png is not None
        np.testing.assert_array_equal(fp.thumbnails, png.thumbnails)
        np.testing.assert_array_equal(fp.phash, png.phash)
    pairs = near_duplicate_pairs([fp for fp in fingerprints if fp is not None])
    assert {(pair.first, pair.second) for pair in pairs} == {(0, 1), (0, 2), (1, 2)}
