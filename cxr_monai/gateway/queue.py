"""The gateway's on-disk queue: the only state of a gateway, so a restarted one resumes where it stopped.

Layout under the queue directory (names are ``<time_ns>-<random hex>``, so sorting is arrival order;
they carry no UIDs and no patient data)::

    inbox/<name>.dcm         received and answered with success, not yet processed
    inbox/<name>.json        how it arrived: {"calling_ae_title": "MODALITY1"} (written before the .dcm)
    outbox/<name>/sc.dcm     processed: Secondary Capture and Structured Report waiting for delivery
    outbox/<name>/sr.dcm
    failed/<name>.dcm        accepted, but could not be processed; <name>.txt says why, <name>.json
                             how it arrived
    status.json              the running gateway's counts (received, refused, failed, delivered...)
                             and queue sizes, rewritten on every change

The queue holds patient data: its folders are 0700 and its files 0600 (whatever the umask; a queue made
by an older gateway is narrowed on start), so no other local user can read them.

Every step is atomic and durable: a file is written under a temporary name, synced to disk (``fsync``)
and renamed into place, and the folder is synced too, so an instance answered with success survives a
power cut; an outbox entry is a directory renamed into place, and an inbox file is removed only after
its outbox entry is on disk. A crash between the two leaves both; :meth:`DiskQueue.inbox` then drops the
inbox file instead of processing it twice. Delivery removes an outbox entry only after the destination
accepted both files. An instance's arrival record goes and comes with it, so a restarted gateway still
knows who sent it (a crash between the two writes of :meth:`DiskQueue.put` leaves a record without an
instance: never read).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SC_FILE = "sc.dcm"
SR_FILE = "sr.dcm"
STATUS_FILE = "status.json"
#: Modes of the queue's folders and files: its owner's only (patient data).
FOLDER_MODE = 0o700
FILE_MODE = 0o600


def write_private(path: Path, data: bytes, *, sync: bool = True) -> None:
    """``data`` to ``path`` atomically with mode 0600: a temporary file beside it, synced to disk
    (``sync``), renamed over ``path``. The folder is not synced here (:func:`sync_folder`)."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sync_folder(folder: Path) -> None:
    """Make the renames and removals in ``folder`` durable (``fsync`` of the directory)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_folder(folder: Path) -> None:
    """Create ``folder`` (0700), or narrow an existing one to 0700."""
    folder.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o777 != FOLDER_MODE:
        try:
            os.chmod(folder, FOLDER_MODE)
        except PermissionError:
            logger.warning("queue folder %s is not ours: its mode cannot be set to 0700", folder.name)


class DiskQueue:
    """Received instances -> processed results -> delivered, as files under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.inbox_dir = self.root / "inbox"
        self.outbox_dir = self.root / "outbox"
        self.failed_dir = self.root / "failed"
        for folder in (self.root, self.inbox_dir, self.outbox_dir, self.failed_dir):
            _private_folder(folder)

    def put(self, data: bytes, calling_ae_title: str | None = None) -> str:
        """Store a received instance (DICOM Part 10 bytes) in the inbox, atomically, with the AE title of
        the peer that sent it (None: not known); returns its name once both files and the inbox folder
        are synced to disk (only then may the sender be told success)."""
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        record = json.dumps({"calling_ae_title": calling_ae_title}) + "\n"
        write_private(self.inbox_dir / f"{name}.json", record.encode("utf-8"))
        write_private(self.inbox_dir / f"{name}.dcm", data)
        sync_folder(self.inbox_dir)
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
        staging = Path(tempfile.mkdtemp(prefix=f".{inbox_file.stem}.", dir=self.outbox_dir))  # 0700
        try:
            write_private(staging / SC_FILE, sc)
            write_private(staging / SR_FILE, sr)
            sync_folder(staging)
            target = self.outbox_dir / inbox_file.stem
            os.replace(staging, target)
            sync_folder(self.outbox_dir)  # the results are durable before the inbox file goes
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        inbox_file.unlink(missing_ok=True)
        inbox_file.with_suffix(".json").unlink(missing_ok=True)
        return target

    def to_failed(self, inbox_file: Path, reason: str) -> None:
        """Move an instance that cannot be processed out of the way, with the reason beside it."""
        write_private(self.failed_dir / f"{inbox_file.stem}.txt", (reason + "\n").encode("utf-8"))
        os.replace(inbox_file, self.failed_dir / inbox_file.name)
        record = inbox_file.with_suffix(".json")
        if record.is_file():
            os.replace(record, self.failed_dir / record.name)
        sync_folder(self.failed_dir)

    def failed(self) -> list[Path]:
        """Instances that could not be processed (each with its ``.txt`` reason), oldest first."""
        return sorted(self.failed_dir.glob("*.dcm"))

    def write_status(self, status: dict[str, Any]) -> None:
        """``status.json`` at the queue's root (0600; not synced: it is rewritten on every change)."""
        text = json.dumps(status, indent=2) + "\n"
        write_private(self.root / STATUS_FILE, text.encode("utf-8"), sync=False)

    def outbox(self) -> list[Path]:
        """Result entries waiting for delivery, oldest first."""
        return sorted(p for p in self.outbox_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    @staticmethod
    def delivered(entry: Path) -> None:
        """Remove an outbox entry the destination has accepted."""
        shutil.rmtree(entry)
