"""Dynamic micro-batching: concurrent calls' images share one model call.

Each call hands its pre-processed image (3, S, S) to :meth:`MicroBatcher.submit` and gets a
``concurrent.futures.Future`` of its probabilities (K,), then lends its thread with :meth:`MicroBatcher.serve`
until the future is done. The first caller to find no batch under way *leads*: it waits up to
``max_wait_ms`` for more images (up to ``max_batch``), runs the model once on the stack and hands out the
results; the others wait for it. There is no worker thread to start or stop. A call that gives up
(deadline, cancellation) cancels its future; the leader drops cancelled futures just before the model
call, so an abandoned image never reaches the model. grpc, torch and ONNX Runtime offer no such
batching for a synchronous server, hence this small one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from cxr_monai.errors import CXRMonaiError

logger = logging.getLogger(__name__)

#: How often a leader waiting for the model lock re-checks its own call.
_POLL_S = 0.05


@dataclass(frozen=True)
class BatchingConfig:
    """How concurrent Classify images are grouped.

    Attributes:
        max_batch: most images per model call (1: no batching).
        max_wait_ms: how long a leader waits for company before the model runs anyway.
    """

    max_batch: int = 8
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise CXRMonaiError(f"max batch must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise CXRMonaiError(f"max batch wait must be 0 ms or more, got {self.max_wait_ms}")


def _never_abandon() -> None:
    """The default ``checkpoint`` of :meth:`MicroBatcher.serve`."""


class MicroBatcher:
    """Runs ``run_batch`` ((B, 3, S, S) -> probabilities (B, K)) on batches of submitted images.

    ``lock``: held around each model call (the eager model is shared with Grad-CAM); taken before the
    batch's futures are marked running, so images abandoned while the model is busy are dropped.
    ``batch_sizes`` counts the batches run by size.
    """

    def __init__(
        self,
        run_batch: Callable[[torch.Tensor], np.ndarray],
        config: BatchingConfig | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self.config = config or BatchingConfig()
        self._run_batch = run_batch
        self._lock = lock
        self._pending: deque[tuple[torch.Tensor, Future[np.ndarray]]] = deque()
        self._changed = threading.Condition()
        self._leading = False
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()

    def submit(self, image: torch.Tensor) -> Future[np.ndarray]:
        """Queue one pre-processed image (3, S, S); the future's result is its probabilities (K,)."""
        future: Future[np.ndarray] = Future()
        with self._changed:
            if self._closed:
                raise CXRMonaiError("the batcher is closed")
            self._pending.append((image, future))
            self._changed.notify_all()
        return future

    def run(self, images: Iterable[torch.Tensor]) -> list[np.ndarray]:
        """Submit ``images`` and serve until all are done: their probabilities (K,) in order."""
        futures = [self.submit(image) for image in images]
        while not all(f.done() for f in futures):
            self.serve(_POLL_S)
        return [f.result() for f in futures]

    def close(self) -> None:
        """Refuse new images and cancel those still waiting (a batch under way finishes)."""
        with self._changed:
            self._closed = True
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
            self._changed.notify_all()

    def serve(self, timeout: float, checkpoint: Callable[[], None] = _never_abandon) -> None:
        """Lend the calling thread for up to about ``timeout`` seconds: lead one batch when nobody else
        does, else wait for progress. ``checkpoint`` raises when the caller's call must stop; a leader
        checks it while waiting for the model lock and then puts the batch back for another leader."""
        with self._changed:
            if self._leading or not self._pending:
                self._changed.wait(timeout)
                return
            self._leading = True
            until = time.monotonic() + self.config.max_wait_ms / 1000.0
            while len(self._pending) < self.config.max_batch and not self._closed:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            count = min(len(self._pending), self.config.max_batch)
            taken = [self._pending.popleft() for _ in range(count)]
        try:
            self._run(taken, checkpoint)
        finally:
            with self._changed:
                self._leading = False
                self._changed.notify_all()

    def _run(
        self, taken: list[tuple[torch.Tensor, Future[np.ndarray]]], checkpoint: Callable[[], None]
    ) -> None:
        try:
            while self._lock is not None and not self._lock.acquire(timeout=_POLL_S):
                checkpoint()
        except BaseException:
            with self._changed:  # not run: back to the front of the queue, in order
                self._pending.extendleft(reversed([t for t in taken if not t[1].cancelled()]))
            raise
        try:
            live = [(x, f) for x, f in taken if f.set_running_or_notify_cancel()]
            if not live:
                return
            try:
                probabilities = self._run_batch(torch.stack([x for x, _ in live]))
            except Exception as exc:  # handed to every caller of the batch, which maps it to a status
                for _, future in live:
                    future.set_exception(exc)
                return
        finally:
            if self._lock is not None:
                self._lock.release()
        self.batch_sizes[len(live)] += 1
        for (_, future), probs in zip(live, probabilities, strict=True):
            future.set_result(probs)
