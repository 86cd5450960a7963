"""The images ``inference.json`` runs on: a split of a datalist (labels optional), or a folder of new films.

A site with new, unlabelled films (and MONAI Deploy) has a folder, not a labelled datalist; both give
items ``{"image": absolute path}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist

from cxr_monai.errors import BundleError, DatasetError
from cxr_monai.io.dicom import looks_like_dicom

#: File names taken from a folder by suffix; files without a suffix are taken when they are DICOM.
IMAGE_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".nii", ".nii.gz")
_DICOM_PROBE_BYTES = 132  # preamble + "DICM"


def inference_items(datalist: str = "", split: str = "test", input_dir: str = "") -> list[dict[str, Any]]:
    """Items ``{"image": path}`` from exactly one of ``datalist`` (its ``split`` list; relative paths
    resolve against the datalist's folder, as ``monai.data.load_decathlon_datalist`` does) and
    ``input_dir`` (every image file below it, in sorted order; hidden files skipped)."""
    if bool(datalist) == bool(input_dir):
        raise BundleError("inference needs exactly one of --datalist FILE and --input_dir DIR")
    if input_dir:
        return [{"image": str(path)} for path in _image_files(Path(input_dir))]
    path = Path(datalist)
    if not path.is_file():
        raise DatasetError(f"datalist {path} not found")
    try:
        entries = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=split)
    except (ValueError, KeyError, IndexError) as exc:
        raise DatasetError(f"datalist {path} has no usable {split!r} list ({exc})") from exc
    if not entries:
        raise DatasetError(f"datalist {path} has an empty {split!r} list")
    return [{"image": str(entry["image"])} for entry in entries]


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"input folder {folder} not found")
    found = [
        path
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and (path.name.lower().endswith(IMAGE_SUFFIXES) or (not path.suffix and _is_dicom(path)))
    ]
    if not found:
        raise DatasetError(f"no image files ({', '.join(IMAGE_SUFFIXES)} or DICOM) found in {folder}")
    return found


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as handle:
        return looks_like_dicom(handle.read(_DICOM_PROBE_BYTES))
