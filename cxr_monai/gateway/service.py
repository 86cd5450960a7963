"""``cxr-monai gateway``: receive chest films over C-STORE, classify and explain them, C-STORE the results.

Three activities share the on-disk queue (:mod:`cxr_monai.gateway.queue`):

* the Storage SCP (pynetdicom's association server threads) checks each instance, writes it to the
  inbox and only then answers success (:mod:`cxr_monai.gateway.scp`);
* the processing thread takes inbox files in arrival order, up to ``batch_size`` per Grad-CAM batch,
  runs the same code as ``cxr-monai explain`` (:class:`~cxr_monai.explain.gradcam.Explainer`,
  :func:`~cxr_monai.explain.record.explained_image`) and queues the Secondary Capture and the
  Structured Report in the outbox; a file that cannot be decoded after all goes to ``failed/``. Each
  film's site comes from the site map (:class:`~cxr_monai.site.sitemap.SiteMap`: its InstitutionName, else
  the calling AE title kept with the queued instance); its calibration is applied and both results state
  it, or that there is none; under ``--unknown-site refuse`` a film without a profile goes to ``failed/``;
* the delivery thread C-STOREs each outbox entry (SC, then SR) to the destination and removes it once
  both are accepted. When the destination is unreachable or refuses, it waits and retries with
  exponential back-off (``retry_initial_s`` doubling up to ``retry_max_s``); results keep their UIDs
  across retries, so a partly delivered entry is sent again as the same instances.

A stopped or crashed gateway loses nothing: on start it resumes the inbox and the outbox. Logs name
queue entries (random names) and technical tags only, never patient data or UIDs.

Who may send: only associations addressed to this gateway's AE title, from the allowed calling AE
titles (or any, when ``allow_any_calling`` says so explicitly: there is no silent default). At most
``max_associations`` at once; an association (or a bare connection) that has sent nothing for
``first_message_timeout_s`` is closed, so a few idle peers cannot hold every slot. What the gateway
did is in ``status.json`` at the queue's root (counts since start, queue sizes, the last failure's
reason) and in a log line every ``status_interval_s`` while anything changed.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.transport import ThreadedAssociationServer

from cxr_monai import log_hygiene
from cxr_monai.errors import CXRMonaiError
from cxr_monai.explain.gradcam import Explainer
from cxr_monai.explain.record import explained_image
from cxr_monai.gateway.queue import SC_FILE, SR_FILE, DiskQueue
from cxr_monai.gateway.scp import STORAGE_CLASSES, TRANSFER_SYNTAXES, store_handler
from cxr_monai.io import CXRImage, read_cxr
from cxr_monai.predictor import Predictor
from cxr_monai.site.profile import SiteStatus
from cxr_monai.site.sitemap import SiteMap

logger = logging.getLogger(__name__)

#: The Verification SOP Class (C-ECHO), which pydicom.uid does not name.
VERIFICATION = "1.2.840.10008.1.1"
#: C-STORE statuses the delivery counts as accepted: success and the warnings (PS3.4 B.2.3).
_ACCEPTED = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Destination:
    """The peer that receives the results: called AE title, host, port."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class GatewayConfig:
    """How the gateway listens, where it sends and how it retries (seconds)."""

    destination: Destination
    queue_dir: Path
    ae_title: str = "CXR_MONAI"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling: tuple[str, ...] = ()
    #: Accept any calling AE title; required (explicitly) when ``allowed_calling`` is empty.
    allow_any_calling: bool = False
    batch_size: int = 4
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    network_timeout_s: float = 30.0
    #: Associations at once (pynetdicom's default, 10, let ten idle peers lock every sender out).
    max_associations: int = 32
    #: A connection or association that has sent nothing for this long is closed.
    first_message_timeout_s: float = 10.0
    idle_poll_s: float = 5.0
    #: At most one status log line per interval (only when something changed).
    status_interval_s: float = 60.0
    site_map: SiteMap = field(default_factory=SiteMap)

    def check(self) -> None:
        """Refuse a configuration that would accept anyone by default, or cannot work.

        Raises:
            CXRMonaiError: no allowed calling AE title and no explicit ``allow_any_calling``, or both;
                a limit below 1 (or a timeout not above 0).
        """
        if not self.allowed_calling and not self.allow_any_calling:
            raise CXRMonaiError(
                "no sender is allowed: name each calling AE title that may send (--allow AE), or accept "
                "any with --allow-any"
            )
        if self.allowed_calling and self.allow_any_calling:
            raise CXRMonaiError("--allow and --allow-any exclude each other")
        if self.max_associations < 1:
            raise CXRMonaiError(f"max_associations is {self.max_associations}; expected at least 1")
        if self.first_message_timeout_s <= 0 or self.network_timeout_s <= 0:
            raise CXRMonaiError("network timeouts must be above 0 s")


class Counters:
    """What the gateway did since it started (thread-safe), for ``status.json`` and the status line."""

    FIELDS = ("received", "refused", "results_queued", "failed", "delivered", "delivery_failures")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)
        self.last_failure: dict[str, str] | None = None

    def add(self, name: str, count: int = 1) -> None:
        with self._lock:
            self._counts[name] += count

    def failure(self, entry: str, reason: str) -> None:
        with self._lock:
            self._counts["failed"] += 1
            self.last_failure = {"entry": entry, "reason": reason, "at": _now()}

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def _status_line(status: dict[str, Any]) -> str:
    """``status`` as one log line: the counts since start, then the queue now."""
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in status["since_start"].items())
    queue = ", ".join(f"{k} {v}" for k, v in status["queue"].items())
    return f"since start {counts}; queue now {queue}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class DeliveryError(Exception):
    """The destination could not be reached, or refused a result; the entry stays queued."""


class Gateway:
    """The running gateway: SCP + processing thread + delivery thread over one :class:`DiskQueue`."""

    def __init__(self, predictor: Predictor, config: GatewayConfig) -> None:
        self.predictor = predictor
        self.config = config
        config.check()
        self.queue = DiskQueue(config.queue_dir)
        self.counters = Counters()
        self._started_at = _now()
        self._status_lock = threading.Lock()
        self._last_status_line: tuple[float, dict[str, int]] = (0.0, {})
        self._explainer = Explainer(predictor.model, predictor.preprocess, batch_size=config.batch_size)
        self._stop = threading.Event()
        self._received = threading.Event()
        self._processed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The port the SCP listens on (the bound one when configured as 0)."""
        if self._server is None:
            raise RuntimeError("gateway not started")
        return int(self._server.server_address[1])

    def start(self) -> int:
        """Start the SCP and both threads (the queue is resumed); returns the bound port.

        Raises:
            CXRMonaiError: the address cannot be listened on.
        """
        log_hygiene.install()  # library warnings quote header values: scrubbed, on every handler
        config = self.config
        ae = AE(ae_title=config.ae_title)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION)  # C-ECHO
        ae.require_called_aet = True  # an association addressed to another AE title is rejected
        if config.allowed_calling:
            ae.require_calling_aet = list(config.allowed_calling)
        ae.maximum_associations = config.max_associations
        ae.network_timeout = config.network_timeout_s
        ae.acse_timeout = config.first_message_timeout_s  # a connection that never asks to associate
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, store_handler(self.queue.put, self._on_queued, self._on_refused)),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_PDU_RECV, self._on_pdu),
        ]
        try:
            self._server = ae.start_server((config.host, config.port), block=False, evt_handlers=handlers)
        except OSError as exc:  # address in use, not ours, unknown host
            raise CXRMonaiError(
                f"cannot listen on {config.host}:{config.port} ({exc.strerror or type(exc).__name__})"
            ) from exc
        for target, name in (
            (self._process_loop, "gateway-process"),
            (self._deliver_loop, "gateway-deliver"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info(
            "gateway %s listening on %s:%d (calling AE titles: %s; at most %d associations); %d queued, "
            "%d to deliver, %d in failed/",
            config.ae_title,
            config.host,
            self.port,
            ", ".join(config.allowed_calling) or "any",
            config.max_associations,
            len(self.queue.inbox()),
            len(self.queue.outbox()),
            len(self.queue.failed()),
        )
        self.write_status()
        return self.port

    # who may send

    def _on_established(self, event: evt.Event) -> None:
        """An association that sends nothing is closed after ``first_message_timeout_s`` (its first
        P-DATA restores the full ``network_timeout_s``): idle peers cannot hold the slots for long."""
        if event.assoc.is_acceptor:
            event.assoc.network_timeout = self.config.first_message_timeout_s

    def _on_pdu(self, event: evt.Event) -> None:
        assoc = event.assoc
        full = self.config.network_timeout_s
        if assoc.is_acceptor and isinstance(event.pdu, P_DATA_TF) and assoc.network_timeout != full:
            assoc.network_timeout = full

    # what the gateway did

    def _on_queued(self) -> None:
        self.counters.add("received")
        self._received.set()
        self.write_status()

    def _on_refused(self) -> None:
        self.counters.add("refused")
        self.write_status()

    def status(self) -> dict[str, Any]:
        """Counts since start, queue sizes now, the last failure (its reason quotes no header value)."""
        return {
            "ae_title": self.config.ae_title,
            "started": self._started_at,
            "updated": _now(),
            "since_start": self.counters.snapshot(),
            "queue": {
                "inbox": len(list(self.queue.inbox_dir.glob("*.dcm"))),
                "outbox": len(self.queue.outbox()),
                "failed": len(self.queue.failed()),
            },
            "last_failure": self.counters.last_failure,
        }

    def write_status(self) -> None:
        """Rewrite ``status.json``; log a status line when ``status_interval_s`` has passed and the
        counts changed since the last one (a failure to write is logged, never raised)."""
        with self._status_lock:
            status = self.status()
            try:
                self.queue.write_status(status)
            except OSError as exc:
                logger.error("status file not written (%s)", exc.strerror or type(exc).__name__)
            last_time, last_counts = self._last_status_line
            now = time.monotonic()
            if status["since_start"] != last_counts and now - last_time >= self.config.status_interval_s:
                self._last_status_line = (now, status["since_start"])
                logger.info("gateway status: %s", _status_line(status))

    def stop(self) -> None:
        """Stop accepting, finish the current step of each thread, and return (the queue stays)."""
        if self._server is not None:
            self._server.shutdown()
        self._stop.set()
        self._received.set()
        self._processed.set()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self._last_status_line = (0.0, {})  # the final counts are always logged
        self.write_status()

    # processing

    def _process_loop(self) -> None:
        while not self._stop.is_set():
            self._received.clear()
            pending = self.queue.inbox()[: self.config.batch_size]
            if not pending:
                self.write_status()  # a status line is due when the interval has passed
                self._received.wait(self.config.idle_poll_s)
                continue
            try:
                self.process(pending)
            except OSError as exc:  # the outbox cannot be written: keep the inbox, try again later
                logger.error("processing failed (%s); retrying", exc.strerror or type(exc).__name__)
                self._stop.wait(self.config.retry_initial_s)

    def process(self, files: list[Path]) -> None:
        """Classify + explain ``files`` (inbox paths) as one batch and queue their results.

        A film whose reading, explanation or outputs fail, for whatever reason, goes to ``failed/`` with a
        one-line reason and the others go on: one film never stops the worker. Only an OSError of the
        queue itself (a full disk) propagates, leaving the inbox as it was.
        """
        images = []
        for path in files:
            try:
                image = read_cxr(path.read_bytes())
                images.append((path, image, self.site_of(path, image)))
            except Exception as exc:
                self._fail(path, "cannot be processed", exc)
        if not images:
            return
        try:
            results = self._explainer.explain([i for _, i, _ in images], None, [s for _, _, s in images])
        except Exception:  # one film spoils the batch: explain each on its own, failing only that one
            results = []
            for path, image, site in list(images):
                try:
                    results.extend(self._explainer.explain([image], None, [site]))
                except Exception as exc:
                    images.remove((path, image, site))
                    self._fail(path, "Grad-CAM failed", exc)
        for (path, image, _), result in zip(images, results, strict=True):
            try:
                explained = explained_image(self.predictor, path.name, image, result)
                sc = explained.secondary_capture_bytes()
                sr_buffer = io.BytesIO()
                explained.structured_report().save_as(sr_buffer, enforce_file_format=True)
            except Exception as exc:
                self._fail(path, "no results", exc)
                continue
            self.queue.to_outbox(path, sc, sr_buffer.getvalue())
            self.counters.add("results_queued")
            site = result.site
            logger.info(
                "queue entry %s: %s (site %s, %s), results queued",
                path.stem,
                explained.record["predicted_class"],
                site.site or "unknown",
                "calibrated" if site.calibrated else "uncalibrated",
            )
        self._processed.set()
        self.write_status()

    def _fail(self, path: Path, what: str, exc: Exception) -> None:
        """Move a film to ``failed/`` with a one-line reason: our own errors' messages (they name what is
        wrong without quoting header values), for anything else its type only (library messages quote
        the offending value, which may be patient data)."""
        detail = str(exc) if isinstance(exc, CXRMonaiError) else f"{type(exc).__name__} while building it"
        reason = f"{what}: {detail}"
        self.queue.to_failed(path, reason)
        self.counters.failure(path.stem, reason)
        failed = self.counters.snapshot()["failed"]
        logger.warning("queue entry %s moved to failed/ (%d since start): %s", path.stem, failed, reason)

    def site_of(self, queued: Path, image: CXRImage) -> SiteStatus:
        """The site status of a queued film: the site map's site for its InstitutionName, else for the
        calling AE title it arrived with (the header value itself is never logged or quoted).

        Raises:
            SiteNotCalibratedError: the site has no profile and the policy is ``refuse``.
        """
        institution = str(image.dataset.get("InstitutionName", "") or "") if image.dataset is not None else ""
        calling = self.queue.arrival(queued).get("calling_ae_title")
        site = self.config.site_map.site_for(calling if isinstance(calling, str) else None, institution)
        return self.predictor.sites.resolve(site)

    # delivery

    def _deliver_loop(self) -> None:
        delay = self.config.retry_initial_s
        while not self._stop.is_set():
            self._processed.clear()
            entries = self.queue.outbox()
            if not entries:
                self._processed.wait(self.config.idle_poll_s)
                continue
            try:
                self.deliver(entries)
                self.write_status()
                delay = self.config.retry_initial_s
            except DeliveryError as exc:
                self.counters.add("delivery_failures")
                self.write_status()
                logger.warning(
                    "delivery failed (%s); %d entries queued, retry in %.1f s", exc, len(entries), delay
                )
                self._stop.wait(delay)
                delay = min(delay * 2, self.config.retry_max_s)

    def deliver(self, entries: list[Path]) -> None:
        """C-STORE each entry's SC and SR over one association; remove each entry once both are accepted.

        Raises:
            DeliveryError: no association, or a result was not accepted (the entry stays).
        """
        destination = self.config.destination
        ae = AE(ae_title=self.config.ae_title)
        for sop_class in (SecondaryCaptureImageStorage, ComprehensiveSRStorage):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.config.network_timeout_s
        ae.connection_timeout = min(self.config.network_timeout_s, 10.0)
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            raise DeliveryError(
                f"no association with {destination.ae_title}@{destination.host}:{destination.port}"
            )
        try:
            for entry in entries:
                if self._stop.is_set():
                    return
                for name in (SC_FILE, SR_FILE):
                    status = assoc.send_c_store(entry / name)
                    code = int(status.get("Status", -1)) if status else -1
                    if code not in _ACCEPTED:
                        raise DeliveryError(
                            f"{name} of queue entry {entry.name} not accepted (status "
                            f"{'none' if code < 0 else f'0x{code:04X}'})"
                        )
                self.queue.delivered(entry)
                self.counters.add("delivered")
                logger.info("queue entry %s delivered", entry.name)
        finally:
            assoc.release()
