"""Admission by work and memory: work slots, a bounded wait queue with a deadline, a memory budget, and a
deadline for streams that send nothing.

- **Work slots** (``max_inflight``): a call holds one while it reads, pre-processes, waits for or runs the
  model and encodes. A ClassifyStudy stream holds one per image (read and pre-process) and once more for
  its results; waiting for its next message it holds none.
- **Wait queue** (``max_queue`` places, ``queue_timeout_s``): a call that finds every slot taken waits, in
  arrival order, for at most the queue timeout (and its own deadline); a full queue refuses at once. An
  open stream holds a place for its whole life, so the gRPC threads (work slots + places + spares) can
  never all be taken and health checks always find one.
- **Memory** (``memory_bytes``): a call reserves what its image will cost (pixels from the header, before
  any decoding, times a per-method factor) and the bytes of its request; over the whole budget it is
  refused, else it waits for room like a queued call.

The queue follows Triton's queue policy (``max_queue_size``, ``default_timeout_microseconds``): a short
burst waits instead of being refused, a long one is refused with RESOURCE_EXHAUSTED before it costs
anything.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import grpc

logger = logging.getLogger(__name__)

#: How often a waiting call re-checks its deadline, cancellation and the server's state.
POLL_S = 0.05


class Refused(Exception):
    """Admission refused a call: the status and message to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


class Admission:
    """Work slots, a FIFO wait queue and a memory budget shared by every call of one server.

    ``checkpoint`` arguments raise (any exception) when the waiting call must stop (cancelled, shutting
    down); ``deadline`` is the call's own (``time.monotonic()``), or None.
    """

    def __init__(self, slots: int, max_queue: int, queue_timeout_s: float, memory_bytes: int) -> None:
        self.slots, self.max_queue = slots, max_queue
        self.queue_timeout_s, self.memory_bytes = queue_timeout_s, memory_bytes
        self._changed = threading.Condition()
        self._free = slots
        self._waiting: deque[object] = deque()
        self._places = 0
        self._memory_free = memory_bytes

    # --- queue places ---------------------------------------------------------------------------------

    def take_place(self, what: str) -> None:
        """Hold one of the ``max_queue`` places (a queued call, an open stream).

        Raises:
            Refused: RESOURCE_EXHAUSTED, every place is held.
        """
        with self._changed:
            if self._places >= self.max_queue:
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server busy: {self.slots} calls in flight and the wait queue is full ({self.max_queue} "
                    f"places); retry later",
                )
            self._places += 1
        logger.debug("%s took a queue place", what)

    def release_place(self) -> None:
        with self._changed:
            self._places -= 1
            self._changed.notify_all()

    # --- work slots ----------------------------------------------------------------------------------

    def try_slot(self) -> bool:
        """Take a free slot when nobody is waiting for one; never waits."""
        with self._changed:
            if self._free > 0 and not self._waiting:
                self._free -= 1
                return True
            return False

    def wait_slot(self, checkpoint: Callable[[], None], deadline: float | None) -> None:
        """Take a slot, waiting in arrival order for at most the queue timeout and until ``deadline``.

        Raises:
            Refused: RESOURCE_EXHAUSTED after the queue timeout, DEADLINE_EXCEEDED at ``deadline``;
                whatever ``checkpoint`` raises.
        """
        start = time.monotonic()
        until = start + self.queue_timeout_s
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            try:
                while True:
                    if self._waiting[0] is ticket and self._free > 0:
                        self._waiting.popleft()
                        self._free -= 1
                        return
                    checkpoint()
                    self._check_time(start, until, deadline, "a work slot")
                    self._changed.wait(self._wait_s(until, deadline))
            finally:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    self._changed.notify_all()

    def slot(self, checkpoint: Callable[[], None], deadline: float | None) -> None:
        """A free slot at once, else :meth:`wait_slot` holding a queue place meanwhile."""
        if self.try_slot():
            return
        self.take_place("a call")
        try:
            self.wait_slot(checkpoint, deadline)
        finally:
            self.release_place()

    def release_slot(self) -> None:
        with self._changed:
            self._free += 1
            self._changed.notify_all()

    # --- memory --------------------------------------------------------------------------------------

    def reserve_now(self, n: int, what: str) -> None:
        """Reserve ``n`` bytes without waiting (a request's bytes, already received).

        Raises:
            Refused: RESOURCE_EXHAUSTED when the budget has no room for them now.
        """
        with self._changed:
            if n > self._memory_free:
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server busy: no memory for {what} of {_mib(n)} now ({_mib(self._memory_free)} of "
                    f"the {_mib(self.memory_bytes)} budget free); retry later",
                )
            self._memory_free -= n

    def reserve(self, n: int, what: str, checkpoint: Callable[[], None], deadline: float | None) -> None:
        """Reserve ``n`` bytes, waiting for room for at most the queue timeout and until ``deadline``.

        Raises:
            Refused: RESOURCE_EXHAUSTED when ``n`` exceeds the whole budget (at once) or after the queue
                timeout; DEADLINE_EXCEEDED at ``deadline``; whatever ``checkpoint`` raises.
        """
        if n > self.memory_bytes:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{what} needs about {_mib(n)} of memory, over the server's {_mib(self.memory_bytes)} memory "
                "budget for images (--max-memory-mb); send a smaller image",
            )
        start = time.monotonic()
        until = start + self.queue_timeout_s
        with self._changed:
            while n > self._memory_free:
                checkpoint()
                self._check_time(start, until, deadline, f"memory for {what} ({_mib(n)})")
                self._changed.wait(self._wait_s(until, deadline))
            self._memory_free -= n

    def release_memory(self, n: int) -> None:
        if n:
            with self._changed:
                self._memory_free += n
                self._changed.notify_all()

    # --- helpers -------------------------------------------------------------------------------------

    @staticmethod
    def _wait_s(until: float, deadline: float | None) -> float:
        end = until if deadline is None else min(until, deadline)
        return max(0.0, min(POLL_S, end - time.monotonic()))

    def _check_time(self, start: float, until: float, deadline: float | None, what: str) -> None:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise Refused(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the deadline passed after {now - start:.1f} s waiting for {what}",
            )
        if now >= until:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: waited {self.queue_timeout_s:g} s for {what} (the queue timeout); retry later",
            )

    def snapshot(self) -> dict[str, int]:
        """Free slots, calls waiting, places held, free memory (bytes): for logs and tests."""
        with self._changed:
            return {
                "free_slots": self._free,
                "waiting": len(self._waiting),
                "places": self._places,
                "memory_free": self._memory_free,
            }


class IdleWatch:
    """Cancels streams that send no message for ``timeout_s``: one daemon thread for all of them.

    ``watch(cancel)`` before waiting for a message returns a ticket; ``unwatch(ticket)`` once it came
    (True when the stream had already been cancelled for idling).
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._changed = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._cancel: dict[int, Callable[[], None]] = {}
        self._expired: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, cancel: Callable[[], None]) -> int:
        ticket = next(self._ids)
        with self._changed:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="cxr-idle-watch", daemon=True)
                self._thread.start()
            self._cancel[ticket] = cancel
            heapq.heappush(self._heap, (time.monotonic() + self.timeout_s, ticket))
            self._changed.notify_all()
        return ticket

    def unwatch(self, ticket: int) -> bool:
        with self._changed:
            self._cancel.pop(ticket, None)
            if ticket in self._expired:
                self._expired.discard(ticket)
                return True
            return False

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _run(self) -> None:
        while True:
            due: list[Callable[[], None]] = []
            with self._changed:
                if self._closed:
                    return
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][1] not in self._cancel):
                    _, ticket = heapq.heappop(self._heap)
                    cancel = self._cancel.pop(ticket, None)
                    if cancel is not None:
                        self._expired.add(ticket)
                        due.append(cancel)
                if not due:
                    wait = self._heap[0][0] - now if self._heap else None
                    self._changed.wait(wait)
                    continue
            for cancel in due:  # outside the lock: cancelling wakes the stream's thread
                try:
                    cancel()
                except Exception:  # a call that ended meanwhile
                    logger.debug("cancelling an idle stream failed", exc_info=True)
