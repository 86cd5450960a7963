"""``cxr-monai gateway``: a DICOM Storage SCP that classifies + explains chest films and C-STOREs results."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import typer

from cxr_monai.commands import (
    bundle_option,
    console,
    examples,
    fail,
    resolve_bundle,
    site_profiles_option,
    unknown_site_option,
    user_errors,
    warn_sites_without_profile,
)

#: How often the main thread wakes to run a pending signal handler (SIGTERM, SIGINT), seconds.
SIGNAL_POLL_S = 0.5

EPILOG = examples(
    "cxr-monai gateway --bundle out/train/final --host 0.0.0.0 --port 11112 \\\n"
    "    --allow MODALITY1 --dest-ae PACS --dest-host pacs.local \\\n"
    "    --dest-port 104 --queue /var/lib/cxr-monai/queue \\\n"
    "    --site-map sites.json --unknown-site flag"
)


def gateway(
    bundle: Path | None = bundle_option(),
    ae_title: str = typer.Option("CXR_MONAI", "--ae-title", metavar="AE", help="This gateway's AE title."),
    host: str = typer.Option(
        "127.0.0.1", "--host", metavar="HOST", help="Address to listen on (0.0.0.0: all interfaces)."
    ),
    port: int = typer.Option(11112, "--port", metavar="PORT", min=0, max=65535, help="Port to listen on."),
    allow: list[str] = typer.Option(
        [],
        "--allow",
        metavar="AE",
        help="Calling AE title allowed to send (repeat). One --allow, or --allow-any, is required.",
    ),
    allow_any: bool = typer.Option(
        False, "--allow-any", help="Accept any calling AE title (no allow-list; not recommended)."
    ),
    max_associations: int = typer.Option(
        32, "--max-associations", metavar="N", min=1, help="Associations accepted at once."
    ),
    dest_ae: str = typer.Option(..., "--dest-ae", metavar="AE", help="Destination AE title (the PACS)."),
    dest_host: str = typer.Option(..., "--dest-host", metavar="HOST", help="Destination host."),
    dest_port: int = typer.Option(
        ..., "--dest-port", metavar="PORT", min=1, max=65535, help="Destination port."
    ),
    queue_dir: Path = typer.Option(
        Path("gateway_queue"), "--queue", metavar="DIR", help="On-disk queue directory."
    ),
    batch_size: int = typer.Option(4, "--batch-size", metavar="N", min=1, help="Images per Grad-CAM batch."),
    retry_max_s: float = typer.Option(
        60.0,
        "--retry-max-s",
        metavar="SECONDS",
        min=1.0,
        help="Longest wait between delivery retries, seconds.",
    ),
    device: str | None = typer.Option(
        None, "--device", metavar="DEVICE", help="cpu, cuda, cuda:1 ... (default: cuda if present)."
    ),
    site_map: Path | None = typer.Option(
        None,
        "--site-map",
        metavar="FILE",
        help='JSON {"CALLING_AE": "site", "institution_names": {"Name": "site"}}: each film\'s site.',
    ),
    site_profiles: Path | None = site_profiles_option(),
    unknown_site: str = unknown_site_option(
        "A film whose site has no profile: flag (results say uncalibrated) or refuse (to failed/)."
    ),
) -> None:
    """Receive CR/DX/SC chest films over C-STORE; send a Grad-CAM Secondary Capture and a Structured
    Report of each to the destination.

    Instances are written to the queue before success is answered; results are retried with back-off
    until the destination accepts them, and a restarted gateway resumes its queue. Unsuitable instances
    are refused: 0xA900 (not a decodable single-frame image), 0xC000 (not a frontal chest radiograph).

    A film's site is its InstitutionName's in the --site-map, else its calling AE title's; that site's
    calibration is applied and the SC and SR state it, or that the probabilities are not calibrated
    for this hospital (--unknown-site refuse: such a film goes to the queue's failed/ folder).
    Only associations addressed to --ae-title are accepted, from the --allow'ed calling AE titles (or,
    with --allow-any, from any); an association that sends nothing for 10 s is closed. Counts of what
    was received, refused, failed and delivered are in <queue>/status.json and a log line a minute.
    Stop with Ctrl-C or SIGTERM. Research use only - NOT FOR CLINICAL USE.
    """
    # imported here so that `cxr-monai --help` and the other commands do not load torch and pynetdicom
    from cxr_monai.errors import CXRMonaiError
    from cxr_monai.gateway.service import Destination, Gateway, GatewayConfig
    from cxr_monai.site.sitemap import SiteMap

    try:  # who may send is checked before the model is loaded
        GatewayConfig(
            Destination(dest_ae, dest_host, dest_port),
            queue_dir,
            allowed_calling=tuple(allow),
            allow_any_calling=allow_any,
        ).check()
    except CXRMonaiError as exc:
        raise fail(str(exc), code=2) from exc
    bundle_dir = resolve_bundle(bundle)
    from cxr_monai.predictor import Predictor

    with user_errors():
        sites = SiteMap.read(site_map) if site_map is not None else SiteMap()
        predictor = Predictor.from_bundle(
            bundle_dir, device=device, site_profiles=site_profiles, unknown_site=unknown_site
        )
        warn_sites_without_profile(sites.sites, predictor.sites.profiles, unknown_site)
        config = GatewayConfig(
            destination=Destination(dest_ae, dest_host, dest_port),
            queue_dir=queue_dir,
            ae_title=ae_title,
            host=host,
            port=port,
            allowed_calling=tuple(allow),
            allow_any_calling=allow_any,
            max_associations=max_associations,
            batch_size=batch_size,
            retry_max_s=retry_max_s,
            site_map=sites,
        )
        service = Gateway(predictor, config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with user_errors():
        bound = service.start()
    console.print(
        f"gateway {ae_title} on {host}:{bound} -> {dest_ae}@{dest_host}:{dest_port}, model "
        f"{predictor.model_name} {predictor.model_version}, queue {queue_dir}, site profiles: "
        f"{', '.join(sorted(predictor.sites.profiles)) or 'none'} (unknown sites: {unknown_site}). "
        "Research use only - NOT FOR CLINICAL USE.",
        highlight=False,
    )
    # Wait with a timeout: Python runs a signal handler only in the main thread, and only once that
    # thread runs again. A wait without one never returns when the kernel delivered SIGTERM to another
    # thread (an association's, the worker's): the gateway would stay up.
    while not stop.wait(SIGNAL_POLL_S):
        pass
    service.stop()  # the queue is on disk (synced); every thread has finished its step
    # The interpreter's teardown of torch took ~7 s on a loaded 2-core machine after everything had
    # stopped: exit at once, as `serve` does.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
