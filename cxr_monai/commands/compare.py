"""``cxr-monai compare``: trained runs side by side (the paper's Table 2 and Figs. 4-7)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from cxr_monai.commands import console, examples, user_errors
from cxr_monai.constants import RESEARCH_USE_NOTICE

EPILOG = examples(
    "cxr-monai compare out/vgg16 out/resnet50 out/effb0 \\\n"
    "    --datalist out/prep/datalist.json --out out/compare",
)


def compare(
    runs: list[Path] = typer.Argument(
        ..., help="`cxr-monai train` --out folders (fold_K/, final/, cv_summary.json)."
    ),
    datalist: Path = typer.Option(
        ..., "--datalist", metavar="FILE", help="MONAI datalist JSON (from `cxr-monai prepare`)."
    ),
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Folder for report.md, compare.json and the PNG figures."
    ),
    split: str = typer.Option(
        "test", "--split", metavar="SPLIT", help="test | training | all | fold:K | source:NAME (as evaluate)."
    ),
    bootstrap: int = typer.Option(
        2000, "--bootstrap", metavar="N", min=0, help="Bootstrap resamples for the 95% CIs (0: none)."
    ),
    by_patient: bool = typer.Option(
        True, "--by-patient/--by-image", help="Bootstrap resamples whole patients (when every item has one)."
    ),
    gradcam: bool = typer.Option(True, "--gradcam/--no-gradcam", help="Draw Fig. 7 (Grad-CAM of every run)."),
    batch_size: int = typer.Option(8, "--batch-size", metavar="N", min=1, help="Images per forward pass."),
    device: str | None = typer.Option(
        None, "--device", metavar="DEVICE", help="cpu, cuda, cuda:1 ... (default: cuda if available)."
    ),
    seed: int = typer.Option(0, "--seed", metavar="SEED", help="Seed of the bootstrap and the baseline."),
) -> None:
    """Compare trained runs (any backbones, augmentation v1/v2) on one datalist split.

    Every final and fold model is scored as `cxr-monai evaluate` scores it (same numbers). Writes
    report.md (Table 2 with 95% CIs and the shortcut baseline's row; fold mean +- sd; parameters, model.pt
    size, training s/epoch, inference images/s here; paired accuracy differences with bootstrap CIs; GAN
    quality of v2 runs), compare.json and Figs. 4-7 (curves, confusion matrices, class-wise bars,
    Grad-CAM on the same three test images).
    """
    from cxr_monai.evaluation import compare as comparison
    from cxr_monai.evaluation import report as evaluation

    with user_errors():
        splits = evaluation.load_splits(datalist)
        items = evaluation.select_split(splits, split)
        console.print(f"[dim]{RESEARCH_USE_NOTICE}[/]")
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            tasks: dict[str, TaskID] = {}

            def on_progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = progress.add_task(stage, total=total)
                progress.update(tasks[stage], completed=done, total=total)

            scored, baseline = comparison.compare_runs(
                runs, splits, items, n_boot=bootstrap, seed=seed, batch_size=batch_size,
                by_patient=by_patient, device=device, progress=on_progress,
            )  # fmt: skip
        written = comparison.write_comparison(
            scored, baseline, out, n_boot=bootstrap, seed=seed, by_patient=by_patient, gradcam=gradcam,
            device=device, datalist=str(datalist.resolve()), split=split,
            split_scope=evaluation.describe_split(split),
        )  # fmt: skip
        console.print((out / "report.md").read_text(encoding="utf-8"), markup=False, highlight=False)
        console.print(f"wrote {', '.join(sorted(written))} to {out}", highlight=False)
