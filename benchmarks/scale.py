"""How each stage grows with the archive: wall time, peak memory and the growth exponent between sizes.

For each size n, a synthetic archive of n films is derived from the shared data's real films (each a
random crop of 80-100 % of a real film, resized to 512-1024 px, brightness/contrast jittered, noise
added; written as PNG, every 10th as DICOM), with a site CSV ``image,label,patient_id`` (label and
patient of the source film: films made from one real film share its patient, so near-duplicate grouping
and patient splits see realistic structure). Then every stage runs as the user runs it, one process each,
under ``/usr/bin/time -v`` (wall time, peak RSS):

1. ``cxr-monai prepare --site-csv`` (fingerprints, near-duplicates, splits),
2. ``cxr-monai train --cache-trunk-features`` (trunk features of the training split, then the head; fold
   0 and a final model),
3. ``cxr-monai evaluate --split test`` (reuses the training cache) and ``--split cv``,
4. ``cxr-monai predict`` over the whole archive (eager, batch 16, 2 reader processes: its defaults).

The **decode + forward limit** for ``predict``: in this process, on the first 512 films of the archive
(all when fewer), every film decoded and pre-processed exactly as ``predict`` does (the bundle's chain),
batch by batch (16), the network run on each batch, one step after the other; its seconds per film
times n is the limit the issue names (what decoding and the forward cost with nothing else: no readers,
queues, CSV or progress).
``predict`` overlaps its readers with the forward on the same cores, so it can come in under 1.

The growth exponent between sizes n1 < n2 is log(t2 / t1) / log(n2 / n1): 1 is linear, 2 quadratic.
Only sizes that ran are reported; nothing is extrapolated here.

Usage::

    python benchmarks/scale.py --sizes 300,1200 --work /tmp/scale --out benchmarks/results/scale.md
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import multiprocessing
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
from _results import command_line, write_results
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STAGES = ("prepare", "train", "evaluate test", "evaluate cv", "predict", "decode + forward limit")


def real_films(data: Path) -> list[tuple[Path, str, str]]:
    """(path, label, patient) of the shared data's NIH and Kaggle films (the labelled, one-per-patient-ish
    sources whose labels are plain)."""
    films = []
    with (data / "nih-chestxray8" / "labels.csv").open() as handle:
        for row in csv.DictReader(handle):
            films.append((data / "nih-chestxray8" / row["image"], row["label"], f"nih{row['patient_id']}"))
    for label, folder in (("Normal", "NORMAL"), ("Pneumonia", "PNEUMONIA")):
        for path in sorted((data / "chest_xray" / "train" / folder).glob("*.jpeg")):
            films.append((path, label, f"kaggle{path.stem.split('_')[0]}"))
    return films


def synthetic_film(source: Path, rng: np.random.Generator) -> np.ndarray:
    """A perturbed uint8 grey copy of ``source``: random crop, 512-1024 px, jitter, noise."""
    pixels = np.asarray(Image.open(source).convert("L"), dtype=np.float32)
    rows, cols = pixels.shape
    scale = rng.uniform(0.8, 1.0)
    h, w = int(rows * scale), int(cols * scale)
    top, left = rng.integers(0, rows - h + 1), rng.integers(0, cols - w + 1)
    side = int(rng.integers(512, 1025))
    crop = Image.fromarray(pixels[top : top + h, left : left + w].astype(np.uint8)).resize((side, side))
    out = np.asarray(crop, dtype=np.float32) * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
    out += rng.normal(0, 3, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_dicom(pixels: np.ndarray, path: Path) -> None:
    """A minimal Secondary Capture DICOM of ``pixels`` (no patient data)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _film(task: tuple[int, int, list[tuple[Path, str, str]], Path]) -> dict[str, str]:
    """Film ``i`` of the archive (its own seeded generator, so the archive does not depend on the worker
    count): written under ``folder``; its CSV row."""
    i, seed, sources, folder = task
    rng = np.random.default_rng([seed, i])
    source, label, patient = sources[int(rng.integers(len(sources)))]
    pixels = synthetic_film(source, rng)
    name = f"films/{i // 1000:03d}/{i:06d}" + (".dcm" if i % 10 == 0 else ".png")
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".dcm"):
        write_dicom(pixels, folder / name)
    else:
        Image.fromarray(pixels).save(folder / name)
    return {"image": name, "label": label, "patient_id": patient}


def build_archive(n: int, folder: Path, data: Path, seed: int = 0) -> Path:
    """``n`` synthetic films under ``folder/films`` and ``folder/labels.csv`` (written last); returns the
    CSV (kept and reused when it already lists n films). Built by as many processes as there are CPUs."""
    labels = folder / "labels.csv"
    if labels.is_file() and sum(1 for _ in labels.open()) == n + 1:
        return labels
    sources = real_films(data)
    tasks = ((i, seed, sources, folder) for i in range(n))
    with multiprocessing.Pool(os.cpu_count()) as pool:
        rows = list(pool.imap(_film, tasks, chunksize=64))
    with labels.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return labels


def decode_forward_limit(bundle: Path, films: list[Path], batch_size: int = 16) -> float:
    """Seconds per film to decode, pre-process (the bundle's chain) and run the network on ``films``, one
    step after the other in this process (torch's default threads): the limit ``predict`` is held to."""
    import torch

    from cxr_monai.predictor import Predictor

    predictor = Predictor.from_bundle(bundle, with_sites=False)
    predictor.predict_tensors(torch.as_tensor(predictor.preprocess(films[0]))[None])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(films), batch_size):
        chunk = films[start : start + batch_size]
        predictor.predict_tensors(torch.stack([torch.as_tensor(predictor.preprocess(f)) for f in chunk]))
    return (time.perf_counter() - started) / len(films)


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of ``command`` under /usr/bin/time -v; raises when it fails."""
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{done.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr)
    assert rss and wall, done.stderr[-2000:]
    parts = [float(p) for p in wall.group(1).split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return seconds, int(rss.group(1)) / 2**20


def run_size(
    n: int, work: Path, data: Path, epochs: int, prepare_only: bool = False
) -> dict[str, tuple[float, float]]:
    """Every stage (or ``prepare`` alone) on an archive of ``n`` films: {stage: (seconds, peak GiB)}."""
    folder = work / f"n{n}"
    labels = build_archive(n, folder, data)
    out = folder / "out"
    results = {}
    prep = ["cxr-monai", "prepare", "--site-csv", f"archive={labels}", "--out", str(out / "prep")]
    prep += ["--n-covid", "all", "--n-normal", "all", "--n-pneumonia", "all"]  # not the paper's 300
    results["prepare"] = timed([*prep, "--cache-dir", str(out / "fingerprints")])
    if prepare_only:
        return results
    datalist = str(out / "prep" / "datalist.json")
    train = ["cxr-monai", "train", "--datalist", datalist, "--out", str(out / "train")]
    train += ["--backbone", "efficientnet_lite2", "--pretrained", "imagenet", "--spatial-size", "260"]
    train += [
        "--folds",
        "0",
        "--final",
        "retrain",
        "--max-epochs",
        str(epochs),
        "--freeze-epochs",
        str(epochs),
    ]
    results["train"] = timed([*train, "--cache-trunk-features"])
    evaluate = ["cxr-monai", "evaluate", "--datalist", datalist, "--bootstrap", "200"]
    results["evaluate test"] = timed(
        [*evaluate, "--bundle", str(out / "train" / "final"), "--split", "test", "--out", str(out / "eval")]
    )
    results["evaluate cv"] = timed(
        [*evaluate, "--bundle", str(out / "train"), "--split", "cv", "--out", str(out / "eval_cv")]
    )
    predict = ["cxr-monai", "predict", str(folder / "films"), "--bundle", str(out / "train" / "final")]
    results["predict"] = timed([*predict, "--out", str(out / "scores.csv")])
    with labels.open() as handle:
        sample = [folder / row["image"] for row in itertools.islice(csv.DictReader(handle), 512)]
    per_film = decode_forward_limit(out / "train" / "final", sample)
    results["decode + forward limit"] = (per_film * n, float("nan"))
    return results


def exponent(n1: int, t1: float, n2: int, t2: float) -> float:
    return math.log(t2 / t1) / math.log(n2 / n1) if t1 > 0 and t2 > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="300,1200", help="Archive sizes (films), comma-separated.")
    parser.add_argument(
        "--prepare-only", default="", help="Further sizes at which only prepare runs, comma-separated."
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="Keep the sizes measured before (the JSON beside --out) in the table.",
    )
    parser.add_argument("--data", type=Path, default=SHARED, help="The shared data folder.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cxr_scale"))
    parser.add_argument("--epochs", type=int, default=30, help="Head epochs (the main job's 30).")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.md")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no shared data at {args.data}")
    full = [int(v) for v in args.sizes.split(",") if v]
    prepare_only = [int(v) for v in args.prepare_only.split(",") if v]
    started = time.perf_counter()
    saved = args.out.with_suffix(".json")
    measured = {int(k): v for k, v in json.loads(saved.read_text()).items()} if args.keep else {}
    for n in [*full, *prepare_only]:  # each size's figures kept as soon as they exist
        measured[n] = run_size(n, args.work, args.data, args.epochs, prepare_only=n in prepare_only)
        saved.write_text(json.dumps({str(k): v for k, v in sorted(measured.items())}, indent=1))
    sizes = sorted(measured)
    load = os.getloadavg()
    header = "| stage | " + " | ".join(f"n = {n}: s, GiB" for n in sizes)
    header += "".join(f" | exponent {a}→{b}" for a, b in itertools.pairwise(sizes)) + " |"
    lines = [
        "# Growth with the archive: each stage's wall time and peak memory",
        "",
        __doc__.split("Usage::")[0].strip(),
        "",
        header,
        "|" + "---|" * (1 + len(sizes) + len(sizes) - 1),
    ]
    for stage in STAGES:
        cells = [
            f"{measured[n][stage][0]:.0f} s, {measured[n][stage][1]:.2f}"
            if stage in measured[n]
            else "not run"
            for n in sizes
        ]
        cells = [cell.replace(", nan", "") for cell in cells]
        cells += [
            f"{exponent(a, measured[a][stage][0], b, measured[b][stage][0]):.2f}"
            if stage in measured[a] and stage in measured[b]
            else ""
            for a, b in itertools.pairwise(sizes)
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    scored = [n for n in sizes if "predict" in measured[n]]
    ratios = [measured[n]["predict"][0] / measured[n]["decode + forward limit"][0] for n in scored]
    lines += [
        "",
        "`predict` against its decode + forward limit: "
        + ", ".join(f"{ratio:.2f}x at n = {n}" for n, ratio in zip(scored, ratios, strict=True))
        + "; its peak memory: "
        + ", ".join(f"{measured[n]['predict'][1]:.2f} GiB at n = {n}" for n in scored)
        + ".",
        "",
        f"Machine: {os.cpu_count()} cores; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (other work on the machine inflates the times); this run "
        f"{time.perf_counter() - started:.0f} s including building its archives.",
        "",
        f"Command: `{command_line()}`",
        "",
    ]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
