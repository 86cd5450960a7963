"""Keep header values out of logs: library warnings and log records with quoted values are scrubbed.

pydicom and highdicom quote the value they object to ("Invalid value for VR PN: 'Doe'", "The string
'Doe' is unlikely to represent the intended person name", "Unknown encoding 'X'"), and a header value
can be patient data. :func:`install` makes this safe process-wide, once, without toggling anything per
call (``warnings.catch_warnings`` swaps the process-wide filter list and is not thread-safe: under
concurrent calls a warning slips past it):

* warnings are routed to logging (the ``py.warnings`` logger, as ``logging.captureWarnings`` does, but
  as one line ``Category: message (module:line)`` without the source line), with every quoted part of
  the message replaced by ``<value>``; what Python's warning filters show or hide is left as it is;
* a :class:`ScrubQuotedValues` filter on the root logger's handlers (and on logging's last-resort
  handler) rewrites records of the pydicom, highdicom and ``py.warnings`` loggers the same way and
  drops their tracebacks; pydicom's pixel decoders' errors for a corrupt file (one per plugin tried,
  each with a traceback) are shown only at DEBUG: the refusal that follows names the cause in one line.

Our own messages never quote header values in the first place (they name the attribute and what was
expected); :func:`scrub_quoted` is also used on library exception messages before they become ours.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from typing import TextIO

#: Loggers whose records are scrubbed: the DICOM libraries, and warnings routed to logging.
SCRUBBED_LOGGERS = ("pydicom", "highdicom", "py.warnings")
#: pydicom's pixel decoders log an ERROR with a traceback per plugin that fails on a corrupt file, before
#: raising; the caller's one-line refusal says the same, so these show only when the root logs DEBUG.
QUIET_UNLESS_DEBUG = "pydicom.pixels.decoders"
#: What a quoted value becomes.
PLACEHOLDER = "<value>"

# From the first quote to the last of the same kind: a value may itself hold that quote (O'Brien),
# and one placeholder for several values is better than a value left half-quoted.
_SINGLE = re.compile(r"'.*'", re.DOTALL)
_DOUBLE = re.compile(r'".*"', re.DOTALL)
_lock = threading.Lock()


def scrub_quoted(text: str) -> str:
    """``text`` with everything between quotes (single or double; bytes reprs too) replaced by
    ``'<value>'``; a lone quote is left as it is."""
    text = _SINGLE.sub(f"'{PLACEHOLDER}'", text)
    return _DOUBLE.sub(f'"{PLACEHOLDER}"', text)


class ScrubQuotedValues(logging.Filter):
    """Rewrite records of :data:`SCRUBBED_LOGGERS` (and their children) with quoted values replaced
    and without a traceback; other records pass unchanged. Attach it to handlers: a logger's filter
    does not see records that its children propagate."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(QUIET_UNLESS_DEBUG) and not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        if any(record.name == name or record.name.startswith(name + ".") for name in SCRUBBED_LOGGERS):
            record.msg, record.args = scrub_quoted(record.getMessage()), ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` replacement: one scrubbed log line on ``py.warnings``."""
    logging.getLogger("py.warnings").warning(
        "%s: %s (%s:%d)", category.__name__, scrub_quoted(str(message)), _module(filename), lineno
    )


def _module(filename: str) -> str:
    """``.../site-packages/highdicom/sc/sop.py`` -> ``highdicom/sc/sop.py`` (no local paths)."""
    parts = filename.replace("\\", "/").split("/")
    for anchor in ("site-packages", "dist-packages", "lib"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) :])
    return "/".join(parts[-2:])


def _add_filter(handler: logging.Handler, scrub: logging.Filter) -> None:
    if not any(isinstance(existing, ScrubQuotedValues) for existing in handler.filters):
        handler.addFilter(scrub)


def install() -> None:
    """Route warnings to logging, scrubbed, and scrub library records on every handler of the root
    logger (and the last-resort one); idempotent and thread-safe. Call it after the handlers are
    configured (a handler added later has no filter)."""
    with _lock:
        scrub = ScrubQuotedValues()
        for handler in logging.getLogger().handlers:
            _add_filter(handler, scrub)
        if logging.lastResort is not None:
            _add_filter(logging.lastResort, scrub)
        for name in SCRUBBED_LOGGERS:  # records handled by handlers of these loggers themselves
            for handler in logging.getLogger(name).handlers:
                _add_filter(handler, scrub)
        warnings.showwarning = _show_warning
