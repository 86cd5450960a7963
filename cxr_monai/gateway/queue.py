"""The gateway's on-disk queue: the only state of a gateway, so a restarted one resumes where it stopped.

Layout under the queue directory (names are ``<time_ns>-<random hex>``, so sorting is arrival order;
they carry no UIDs and no patient data)::

    inbox/<name>.dcm         received and answered with success, not yet processed
    inbox/<name>.json        how it arrived: {"calling_ae_title": "MODALITY1"} (written before the .dcm)
    outbox/<name>/sc.dcm     processed: Secondary Capture and Structured Report waiting for delivery
    outbox/<name>/sr.dcm
    failed/<name>.dcm        accepted, but could not be processed; <name>.txt says why, <name>.json
                             how it arrived

Every step is atomic: a file appears complete or not at all (:mod:`cxr_monai.atomic`), an outbox entry
is a directory renamed into place, and an inbox file is removed only after its outbox entry exists. A
crash between the two leaves both; :meth:`DiskQueue.inbox` then drops the inbox file instead of
processing it twice. Delivery removes an outbox entry only after the destination accepted both files.
An instance's arrival record goes and comes with it, so a restarted gateway still knows who sent it (a
crash between the two writes of :meth:`DiskQueue.put` leaves a record without an instance: never read).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from cxr_monai.atomic import atomic_path, write_json_atomic, write_text_atomic

SC_FILE = "sc.dcm"
SR_FILE = "sr.dcm"


class DiskQueue:
    """Received instances -> processed results -> delivered, as files under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.inbox_dir = self.root / "inbox"
        self.outbox_dir = self.root / "outbox"
        self.failed_dir = self.root / "failed"
        for folder in (self.inbox_dir, self.outbox_dir, self.failed_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, calling_ae_title: str | None = None) -> str:
        """Store a received instance (DICOM Part 10 bytes) in the inbox, atomically, with the AE title of
        the peer that sent it (None: not known); returns its name."""
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        write_json_atomic(self.inbox_dir / f"{name}.json", {"calling_ae_title": calling_ae_title})
        with atomic_path(self.inbox_dir / f"{name}.dcm") as tmp:
            tmp.write_bytes(data)
        return name

    @staticmethod
    def arrival(queued_file: Path) -> dict[str, Any]:
        """How a queued instance (inbox or failed path) arrived: ``{"calling_ae_title": str | None}``;
        ``{}`` for one queued without a record (by a gateway before records, or by hand)."""
        try:
            record = json.loads(queued_file.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def inbox(self) -> list[Path]:
        """Received instances still to process, oldest first (ones already processed are dropped)."""
        pending = []
        for path in sorted(self.inbox_dir.glob("*.dcm")):
            if (self.outbox_dir / path.stem).is_dir():
                path.unlink(missing_ok=True)  # crashed after its results were queued
                path.with_suffix(".json").unlink(missing_ok=True)
            else:
                pending.append(path)
        return pending

    def to_outbox(self, inbox_file: Path, sc: bytes, sr: bytes) -> Path:
        """Queue the results of ``inbox_file`` for delivery, then remove it from the inbox."""
        staging = Path(tempfile.mkdtemp(prefix=f".{inbox_file.stem}.", dir=self.outbox_dir))
        try:
            (staging / SC_FILE).write_bytes(sc)
            (staging / SR_FILE).write_bytes(sr)
            os.chmod(staging, 0o755)
            target = self.outbox_dir / inbox_file.stem
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        inbox_file.unlink(missing_ok=True)
        inbox_file.with_suffix(".json").unlink(missing_ok=True)
        return target

    def to_failed(self, inbox_file: Path, reason: str) -> None:
        """Move an instance that cannot be processed out of the way, with the reason beside it."""
        write_text_atomic(self.failed_dir / f"{inbox_file.stem}.txt", reason + "\n")
        os.replace(inbox_file, self.failed_dir / inbox_file.name)
        record = inbox_file.with_suffix(".json")
        if record.is_file():
            os.replace(record, self.failed_dir / record.name)

    def outbox(self) -> list[Path]:
        """Result entries waiting for delivery, oldest first."""
        return sorted(p for p in self.outbox_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    @staticmethod
    def delivered(entry: Path) -> None:
        """Remove an outbox entry the destination has accepted."""
        shutil.rmtree(entry)
