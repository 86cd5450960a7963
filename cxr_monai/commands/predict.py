"""``cxr-monai predict``: score an archive (a folder tree of DICOM/PNG/JPEG films, or a datalist) into one
CSV row per film; resumable, and sharded over the ranks when started under torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

if TYPE_CHECKING:
    from cxr_monai.archive.run import Summary

from cxr_monai.commands import (
    bundle_option,
    console,
    examples,
    fail,
    resolve_bundle,
    site_from_institution_option,
    site_option,
    site_profiles_option,
    unknown_site_option,
    user_errors,
    warn_sites_without_profile,
)

EPILOG = examples(
    "cxr-monai predict /pacs/export --bundle out/train/final --out scores.csv",
    "cxr-monai predict out/prep/datalist.json --bundle out/train/final \\\n"
    "    --out scores.csv --backend onnx --site ourhospital",
    "torchrun --nproc_per_node 4 --no-python cxr-monai predict /pacs/export \\\n"
    "    --bundle out/train/final --out scores.csv",
)


class FilmsPerSecond(ProgressColumn):
    """``12.3 films/s`` (rich's own speed columns count bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.1f} films/s")


def predict(
    archive: Path = typer.Argument(
        ...,
        metavar="ARCHIVE",
        help="Folder of films (walked recursively; hidden files and documents skipped), datalist JSON or "
        "one image.",
    ),
    bundle: Path | None = bundle_option(),
    out: Path = typer.Option(
        Path("predictions.csv"), "--out", metavar="CSV", help="Output CSV; an existing one is resumed."
    ),
    batch_size: int = typer.Option(16, "--batch-size", metavar="N", min=1, help="Films per forward."),
    workers: int = typer.Option(
        2, "--workers", metavar="N", min=0, help="DataLoader processes reading films (0: none)."
    ),
    backend: str = typer.Option(
        "eager", "--backend", metavar="BACKEND", help="eager (PyTorch) or onnx (ONNX Runtime)."
    ),
    onnx_file: Path | None = typer.Option(
        None,
        "--onnx",
        metavar="FILE",
        exists=True,
        dir_okay=False,
        help="ONNX file from `cxr-monai export` (default: export the bundle at start-up).",
    ),
    onnx_threads: int = typer.Option(
        0, "--onnx-threads", metavar="N", min=0, help="ONNX Runtime threads (0: all cores)."
    ),
    device: str | None = typer.Option(
        None,
        "--device",
        metavar="DEVICE",
        help="cpu, cuda, cuda:1 ... (default: the node's GPU LOCAL_RANK if any, else cpu).",
    ),
    threads: int | None = typer.Option(
        None, "--threads", metavar="N", min=1, help="torch threads per process (default: torch's)."
    ),
    site: str | None = site_option(),
    site_profiles: Path | None = site_profiles_option(),
    unknown_site: str = unknown_site_option(
        "A film of a site without a profile: flag (site_calibrated false) or refuse (listed failed)."
    ),
    site_from_institution: Path | None = site_from_institution_option(),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Score again the films an existing output lists as failed."
    ),
) -> None:
    """Score every film of an archive: one CSV row each (path relative to the archive, predicted class,
    probabilities as the site reads them, the model's own, site, site_calibrated, warnings, error).

    Rows are appended and fsynced batch by batch: a killed run loses at most one batch, and running the
    same command again scores only the films without a row. A film that cannot be read (truncated,
    not an image, DICOM without pixels, an unreadable folder) gets a row with its reason in the error
    column, and the run goes on. Exit code 0 when every film has its row (scored or failed: the summary
    counts them), 1 on a user error, 2 on a usage error.

    Under torchrun each rank scores its own share of the films and rank 0 merges them into --out, in
    the order of one process.
    """
    from cxr_monai.archive.backends import BACKENDS
    from cxr_monai.site.profile import UNKNOWN_SITE_POLICIES, check_site_name
    from cxr_monai.site.sitemap import SiteMap

    if unknown_site not in UNKNOWN_SITE_POLICIES:
        raise fail(f"--unknown-site: expected flag or refuse, got {unknown_site!r}", code=2)
    if backend not in BACKENDS:
        raise fail(f"--backend: expected eager or onnx, got {backend!r}", code=2)
    if onnx_file is not None and backend != "onnx":
        raise fail("--onnx needs --backend onnx", code=2)
    if out.is_dir():
        raise fail(f"--out {out}: is a folder; expected the CSV file to write", code=2)
    bundle_dir = resolve_bundle(bundle)
    with user_errors():
        from cxr_monai.archive.films import list_archive
        from cxr_monai.archive.shards import shard_from_env

        shard = shard_from_env()
        root, films = list_archive(archive)  # before the bundle: a mistyped path fails in a second
        institutions = SiteMap.read(site_from_institution) if site_from_institution else None
        if site is not None:
            check_site_name(site)
    # imported here so that `cxr-monai --help` and the other commands do not load torch
    import torch

    from cxr_monai.archive.backends import make_forward
    from cxr_monai.archive.run import Settings, predict_archive
    from cxr_monai.archive.shards import process_group
    from cxr_monai.predictor import Predictor

    if threads is not None:
        torch.set_num_threads(threads)
    if device is None and torch.cuda.is_available():
        device = f"cuda:{shard.local_rank % torch.cuda.device_count()}"
    lead = shard.rank == 0
    settings = Settings(batch_size, workers, site, institutions, retry_failed)
    with user_errors():
        predictor = Predictor.from_bundle(
            bundle_dir, device=device or "cpu", site_profiles=site_profiles, unknown_site=unknown_site
        )
        if institutions is None:
            predictor.sites.resolve(site)  # every film has this site: refused now, not once per film
        if lead:
            named = ({site} if site else set()) | (institutions.sites if institutions else set())
            warn_sites_without_profile(named, predictor.sites.profiles, unknown_site)
        forward = make_forward(predictor, backend, bundle_dir, onnx_file, onnx_threads)
        columns = (
            TextColumn("predict" if not shard.distributed else f"predict (rank 0 of {shard.world_size})"),
            BarColumn(),
            MofNCompleteColumn(),
            FilmsPerSecond(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with (
            process_group(shard) as group,
            Progress(*columns, console=console, transient=True, disable=not lead) as progress,
        ):
            task = progress.add_task("predict", total=None)

            def on_plan(todo: int, mine: int, done: int) -> None:
                progress.update(task, total=mine)
                if lead:
                    _say_plan(len(films), todo, done, shard.world_size, out)

            summary = predict_archive(
                films,
                out,
                predictor,
                forward,
                backend,
                settings,
                shard,
                group,
                on_plan=on_plan,
                on_batch=lambda n: progress.advance(task, n),
            )
    if summary is not None:
        _say_summary(summary, root)


def _say_plan(films: int, todo: int, done: int, ranks: int, out: Path) -> None:
    where = f" on {ranks} ranks" if ranks > 1 else ""
    resumed = f" ({done} already in {out})" if done else ""
    console.print(f"scoring {todo} of {films} films{where}{resumed}", highlight=False, soft_wrap=True)


def _say_summary(summary: Summary, root: Path) -> None:
    for path, reason in summary.failed:
        console.print(f"[bold red]failed:[/] {path}: {reason}", highlight=False, soft_wrap=True)
    more = summary.failed_count - len(summary.failed)
    if more > 0:
        console.print(f"... and {more} more (the error column of {summary.output})", highlight=False)
    flagged = f"; {summary.uncalibrated} not calibrated for their site" if summary.uncalibrated else ""
    console.print(
        f"{summary.scored} of {summary.films} films of {root} scored, {summary.failed_count} failed"
        f"{flagged}; rows in {summary.output}",
        highlight=False,
        soft_wrap=True,
    )
