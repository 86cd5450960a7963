"""``cxr-monai progression``: one montage of a patient's studies over time, maps on one scale."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cxr_monai.atomic import atomic_path, write_json_atomic
from cxr_monai.commands import bundle_option, console, examples, fail, resolve_bundle, user_errors
from cxr_monai.constants import RESEARCH_USE_NOTICE

EPILOG = examples(
    "cxr-monai progression day1.dcm day5.dcm --bundle out/train/final \\\n    --out out/progression",
    "cxr-monai progression --datalist out/prep/datalist.json --patient-id 19 \\\n"
    "    --bundle out/train/final --out out/progression-19",
)

if TYPE_CHECKING:
    from cxr_monai.explain.progression import Study


def _load_studies(
    files: list[Path], datalist: Path | None, patient_id: str | None
) -> tuple[list[Study], str, str]:
    """(studies in time order, how they were ordered, montage title)."""
    from cxr_monai.explain.progression import Study, datalist_series, order_studies
    from cxr_monai.io import read_cxr

    if datalist is not None:
        if patient_id is None:
            raise fail("--datalist needs --patient-id", code=2)
        items = datalist_series(datalist, patient_id)
        studies = []
        for item in items:
            offset, view = item.get("offset"), item.get("view") or "?"
            day = None if offset is None else float(offset)
            label = f"day {offset:g}, {view}" if isinstance(offset, (int, float)) else f"day ?, {view}"
            studies.append(Study(Path(item["image"]), read_cxr(item["image"]), label, day))
        return studies, "offset (days since symptom onset)", f"Patient {patient_id}"
    if not files:
        raise fail("give image FILEs, or --datalist FILE --patient-id ID", code=2)
    studies, how = order_studies([(path, read_cxr(path)) for path in files])
    return studies, how, f"{len(studies)} studies"


def progression(
    files: list[Path] = typer.Argument(
        None, metavar="FILE", help="One patient's studies (DICOM ordered by StudyDate)."
    ),
    bundle: Path | None = bundle_option(),
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Output directory (progression.png, progression.json)."
    ),
    datalist: Path | None = typer.Option(
        None, "--datalist", metavar="FILE", help="Datalist from `cxr-monai prepare`."
    ),
    patient_id: str | None = typer.Option(
        None,
        "--patient-id",
        metavar="ID",
        help="Patient in the datalist (e.g. covid:19 or 19); images ordered by offset.",
    ),
    batch_size: int = typer.Option(4, "--batch-size", metavar="N", min=1, help="Images per Grad-CAM batch."),
) -> None:
    """Montage of one patient's studies with Grad-CAM, normalised by the series maximum."""
    bundle_dir = resolve_bundle(bundle)
    # imported here so that `cxr-monai --help` and the other commands do not load torch
    from cxr_monai.explain.gradcam import Explainer, normalise_series
    from cxr_monai.explain.progression import render_montage
    from cxr_monai.explain.record import AREA_KEY, heatmap_summary
    from cxr_monai.predictor import Predictor

    with user_errors():
        predictor = Predictor.from_bundle(bundle_dir)
        studies, ordered_by, title = _load_studies(list(files or []), datalist, patient_id)
        results = Explainer(predictor.model, predictor.preprocess, batch_size).explain(
            [s.image for s in studies]
        )
        heatmaps = normalise_series([r.raw_map for r in results])
        summaries = [heatmap_summary(h) for h in heatmaps]
        fig = render_montage(
            studies,
            heatmaps,
            [r.probabilities for r in results],
            [summary[AREA_KEY] for summary in summaries],
            predictor.class_names,
            f"{title} - {predictor.model_name} ({predictor.backbone}) - {RESEARCH_USE_NOTICE}",
        )
        with atomic_path(out / "progression.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        record: dict[str, Any] = {
            "ordered_by": ordered_by,
            "normalisation": "series maximum",
            "model": {
                "name": predictor.model_name,
                "version": predictor.model_version,
                "backbone": predictor.backbone,
            },
            "studies": [
                {
                    "input": study.path.name,
                    "label": study.label,
                    "day": study.day,
                    "probabilities": {
                        c: float(p) for c, p in zip(predictor.class_names, r.probabilities, strict=True)
                    },
                    "predicted_class": predictor.class_names[r.predicted_index],
                    **summary,
                    "peak_value": float(h.max()),
                    "warnings": list(study.image.warnings),
                }
                for study, r, h, summary in zip(studies, results, heatmaps, summaries, strict=True)
            ],
            "intended_use": RESEARCH_USE_NOTICE,
        }
        write_json_atomic(out / "progression.json", record)
    console.print(f"progression of {len(studies)} studies ({ordered_by}) in {out}", highlight=False)
