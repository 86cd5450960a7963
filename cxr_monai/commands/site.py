"""``cxr-monai site``: calibrate a trained bundle for one hospital from a few of its labelled films; list
the site profiles a bundle carries."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cxr_monai.commands import bundle_option, console, examples, fail, resolve_bundle, user_errors
from cxr_monai.constants import CLASS_NAMES, RESEARCH_USE_NOTICE

if TYPE_CHECKING:
    from cxr_monai.site.profile import SiteProfile

site_app = typer.Typer(
    name="site",
    help="Per-site calibration: fit a hospital's profile from its labelled films; list profiles.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

CALIBRATE_EPILOG = examples(
    "cxr-monai site calibrate --bundle out/train/final --site st-elsewhere \\\n"
    "    --labels site_films.csv \\\n"
    "    --accept 'Normal:recall>=0.8,COVID-19:recall>=0.9'",
    "cxr-monai site calibrate --bundle out/train/final --site st-elsewhere \\\n"
    "    --labels labels.csv --films /pacs-export/ --method bias --replace",
)


def _profiles_dir(bundle_dir: Path, site_profiles: Path | None) -> Path:
    from cxr_monai.site.profile import SITES_DIR

    return site_profiles if site_profiles is not None else bundle_dir / SITES_DIR


def _site_profiles_option() -> Any:
    return typer.Option(
        None,
        "--site-profiles",
        metavar="DIR",
        help="Folder of site profiles (default: the bundle's sites/; use another for a read-only bundle).",
    )


@site_app.command("calibrate", epilog=CALIBRATE_EPILOG)
def calibrate(
    bundle: Path | None = bundle_option(),
    site: str = typer.Option(..., "--site", metavar="NAME", help="The site's name (letters, digits, . _ -)."),
    labels: Path = typer.Option(
        ..., "--labels", metavar="CSV", help="The site's labelled films: image,label[,patient_id]."
    ),
    films: Path | None = typer.Option(
        None,
        "--films",
        metavar="DIR",
        help="Folder the CSV's image paths are relative to (default: the CSV's).",
    ),
    method: str = typer.Option(
        "temperature",
        "--method",
        metavar="METHOD",
        help="temperature (one shared scale and a per-class bias) | bias (per-class logit bias only) | "
        "vector (per-class scale and bias) | em-prior (no labels used: the site's class shares "
        "re-estimated by EM; labels only score it).",
    ),
    accept: str | None = typer.Option(
        None,
        "--accept",
        metavar="CRITERIA",
        help="Acceptance criteria, e.g. 'Normal:recall>=0.8,COVID-19:recall>=0.9,ece<=0.1': pass, fail or "
        "undecided from the 95% intervals.",
    ),
    target: str | None = typer.Option(
        None,
        "--operating-point",
        metavar="CLASS:recall>=R",
        help="Also shift one class's threshold until that share of its films is called it (e.g. "
        "'COVID-19:recall>=0.9').",
    ),
    priors: str | None = typer.Option(
        None,
        "--training-priors",
        metavar="P,P,P",
        help="em-prior: the training class shares (COVID-19,Normal,Pneumonia); default: from the "
        "bundle's datalist.",
    ),
    site_profiles: Path | None = _site_profiles_option(),
    out: Path | None = typer.Option(
        None, "--out", metavar="DIR", help="Report folder (default: site_reports/NAME)."
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", metavar="DIR", help="Keep each film's model output here for reruns."
    ),
    replace: bool = typer.Option(False, "--replace", help="Replace the site's existing profile."),
    bootstrap: int = typer.Option(
        2000, "--bootstrap", metavar="N", min=0, help="Bootstrap resamples (by patient) for the 95% CIs."
    ),
    seed: int = typer.Option(0, "--seed", metavar="SEED", help="Seed of the bootstrap."),
) -> None:
    """Fit a site's calibration on its labelled films and write its profile into the bundle.

    Every film is scored by a calibration fitted without its patient's films (leave-one-patient-out), so
    the figures before and after, with patient-cluster 95% intervals, say what the site can expect. Works
    from 2 films per class; the report says how wide the intervals then are. Writes
    <profiles>/NAME.json (applied by explain --site, serve, gateway) and a report folder
    (site_report.json, site_calibration.png). Nothing is written when an input is wrong.
    """
    bundle_dir = resolve_bundle(bundle)
    from cxr_monai.site.acceptance import parse_criteria
    from cxr_monai.site.calibrate import METHODS, load_site_films
    from cxr_monai.site.profile import check_site_name, profile_path

    if method not in METHODS:
        raise fail(f"--method: expected one of {', '.join(METHODS)}, got {method!r}", code=2)
    with user_errors():
        check_site_name(site)
        criteria = parse_criteria(accept) if accept else []
        operating_point = _operating_point(target) if target else None
        if operating_point is not None and method == "em-prior":
            raise fail(
                "--operating-point needs labels; em-prior uses none (choose --method temperature, bias "
                "or vector)"
            )
        shares = _parse_priors(priors) if priors else None
        destination = profile_path(_profiles_dir(bundle_dir, site_profiles), site)
        if destination.exists() and not replace:
            raise fail(f"{destination} exists: pass --replace to recalibrate site {site}")
        site_films = load_site_films(labels, site, films)
    profile = _fit_profile(
        bundle_dir, site, site_films, method, operating_point, criteria, shares, cache_dir, bootstrap, seed
    )
    report_dir = out if out is not None else Path("site_reports") / site
    with user_errors():
        written = _write_outputs(profile, destination, report_dir)
    _print_summary(profile, written, report_dir)


def _fit_profile(
    bundle_dir: Path,
    site: str,
    site_films: Any,
    method: str,
    operating_point: tuple[int, float] | None,
    criteria: list[Any],
    shares: Any,
    cache_dir: Path | None,
    bootstrap: int,
    seed: int,
) -> SiteProfile:
    from cxr_monai.predictor import WEIGHTS, Predictor
    from cxr_monai.site.calibrate import calibrate_site, score_films, training_priors
    from cxr_monai.site.profile import model_digest

    with user_errors():
        predictor = Predictor.from_bundle(bundle_dir, with_sites=False)
        if method == "em-prior" and shares is None:
            shares = training_priors(bundle_dir)
        digest = model_digest(bundle_dir / WEIGHTS)
        columns = (TextColumn("scoring films"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("score", total=len(site_films.items))
            probabilities = score_films(
                predictor,
                site_films,
                digest,
                cache_dir=cache_dir,
                on_done=lambda n: progress.advance(task, n),
            )
        model = {"name": predictor.model_name, "version": predictor.model_version, "digest": digest}
        return calibrate_site(
            site,
            site_films,
            probabilities,
            model,
            method=method,
            target=operating_point,
            criteria=criteria,
            priors=shares,
            n_boot=bootstrap,
            seed=seed,
        )


def _write_outputs(profile: SiteProfile, destination: Path, report_dir: Path) -> Path:
    """Report first (figure, JSON), the profile last: a failure leaves no profile behind."""
    from cxr_monai.atomic import write_json_atomic
    from cxr_monai.evaluation.plots import save_png
    from cxr_monai.site.plots import site_calibration_figure
    from cxr_monai.site.profile import write_profile

    save_png(site_calibration_figure(profile), report_dir / "site_calibration.png")
    write_json_atomic(report_dir / "site_report.json", profile.to_dict())
    return write_profile(destination.parent, profile)


def _operating_point(text: str) -> tuple[int, float]:
    from cxr_monai.site.acceptance import AcceptanceError, parse_criteria

    criteria = parse_criteria(text)
    if (
        len(criteria) != 1
        or criteria[0].figure != "recall"
        or criteria[0].op != ">="
        or not criteria[0].class_name
    ):
        raise AcceptanceError(
            f"--operating-point {text!r}: expected one CLASS:recall>=R, e.g. Normal:recall>=0.8"
        )
    criterion = criteria[0]
    if not 0 < criterion.bound <= 1:
        raise AcceptanceError(f"--operating-point {text!r}: the recall must be in (0, 1]")
    return CLASS_NAMES.index(str(criterion.class_name)), criterion.bound


def _parse_priors(text: str) -> Any:
    import numpy as np

    from cxr_monai.errors import CXRMonaiError

    try:
        shares = np.asarray([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError:
        raise CXRMonaiError(f"--training-priors {text!r}: expected {len(CLASS_NAMES)} numbers") from None
    if shares.shape != (len(CLASS_NAMES),) or np.any(shares <= 0):
        raise CXRMonaiError(f"--training-priors {text!r}: expected {len(CLASS_NAMES)} positive numbers")
    return shares / shares.sum()


def _estimate_text(estimate: dict[str, Any]) -> str:
    if estimate["value"] is None:
        return "n/a"
    if estimate["ci_low"] is None:
        return f"{estimate['value']:.2f}"
    return f"{estimate['value']:.2f} [{estimate['ci_low']:.2f}, {estimate['ci_high']:.2f}]"


def _print_summary(profile: SiteProfile, written: Path, report_dir: Path) -> None:
    report = profile.report
    before, after = report["evaluation"]["before"], report["evaluation"]["after"]
    films = report["films"]
    present = [name for name, n in films["per_class"].items() if n]
    table = Table(
        title=f"Site {profile.site}: {films['total']} films of {films['patients']} patients, "
        f"{profile.calibration.method} calibration ({report['evaluation']['scheme']})"
    )
    for column in ("figure", "model as trained", "calibrated"):
        table.add_column(column)
    rows: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("accuracy", before["accuracy"], after["accuracy"])
    ]
    for name in present:
        rows.append(
            (f"{name} recall", before["per_class"][name]["recall"], after["per_class"][name]["recall"])
        )
    ece_key = "expected_calibration_error"
    rows.append(("calibration error (ECE)", before[ece_key], after[ece_key]))
    for label, b, a in rows:
        table.add_row(label, _estimate_text(b), _estimate_text(a))
    for name in CLASS_NAMES:
        table.add_row(f"films called {name}", f"{before['called'][name]:.2f}", f"{after['called'][name]:.2f}")
    console.print(table)
    acceptance = report["acceptance"]
    for result in acceptance["criteria"]:
        console.print(
            f"  {result['criterion']}: {result['verdict']} "
            f"({_estimate_text({k: result[k] for k in ('value', 'ci_low', 'ci_high')})})",
            highlight=False,
        )
    console.print(f"acceptance: [bold]{acceptance['verdict']}[/]", highlight=False)
    for note in report["uncertainty"]:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    console.print(f"profile: {written}   report: {report_dir}", highlight=False, soft_wrap=True)
    console.print(
        f"Outputs for films of site {profile.site} are now calibrated (explain --site {profile.site}, "
        f"the gRPC 'site' field, the gateway's site map). {RESEARCH_USE_NOTICE}.",
        highlight=False,
        soft_wrap=True,
    )


@site_app.command("list", epilog=examples("cxr-monai site list --bundle out/train/final"))
def list_profiles(
    bundle: Path | None = bundle_option(), site_profiles: Path | None = _site_profiles_option()
) -> None:
    """Print the bundle's site profiles, tab-separated: site, method, films, date, acceptance verdict.

    A damaged profile, or one fitted for another model, is an error naming the file.
    """
    bundle_dir = resolve_bundle(bundle)
    from cxr_monai.predictor import WEIGHTS
    from cxr_monai.site.profile import SiteProfiles, model_digest

    with user_errors():
        weights = bundle_dir / WEIGHTS
        if not weights.is_file():
            raise fail(f"{weights}: missing; {bundle_dir} is not a trained bundle")
        profiles = SiteProfiles.load(_profiles_dir(bundle_dir, site_profiles), model_digest(weights))
    if not profiles.profiles:
        console.print("no site profiles: every site's outputs are flagged uncalibrated", highlight=False)
    for name, profile in sorted(profiles.profiles.items()):
        report = profile.report
        verdict = report.get("acceptance", {}).get("verdict", "")
        films = report.get("films", {}).get("total", "")
        typer.echo(
            f"{name}\t{profile.calibration.method}\t{films} films\t{report.get('created', '')}\t{verdict}"
        )
