"""Background jobs for the web page: a fixed pool of worker threads, progress and cancel.

A request only queues a job and returns its id; the page polls ``GET /api/jobs/<id>``. Each
job owns a folder of its own (random id) so two users never see each other's files.
Cancelling is cooperative: the job's progress callbacks raise :class:`Cancelled`, the work
function unwinds and the worker takes the next job.
"""

from __future__ import annotations

import logging
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unetkit.errors import UnetkitError

log = logging.getLogger(__name__)

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")


class Cancelled(Exception):
    """Raised inside a job (from its progress callbacks) once the user cancelled it."""


@dataclass
class Job:
    """One unit of work and everything the page may ask about it.

    Args:
        kind: "segment", "finetune", "generate" or "inpaint".
        folder: the job's own output folder.
    """

    kind: str
    folder: Path
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    state: str = "queued"
    done: int = 0
    total: int = 0
    stage: str = ""
    losses: list[float] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    created: float = field(default_factory=time.time)
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def progress(self, done: int, total: int, stage: str | None = None) -> None:
        """Record progress; raises :class:`Cancelled` once the job was cancelled."""
        self.check()
        self.done, self.total = int(done), int(total)
        if stage is not None:
            self.stage = stage

    def check(self) -> None:
        """Raise :class:`Cancelled` if the user cancelled this job."""
        if self.cancel_event.is_set():
            raise Cancelled(self.id)

    def cancelled(self) -> bool:
        """Whether the job was asked to stop (for ``should_stop`` callbacks)."""
        return self.cancel_event.is_set()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "stage": self.stage,
            "losses": list(self.losses),
            "result": self.result,
            "error": self.error,
        }


class JobRunner:
    """A queue of jobs served by ``workers`` threads.

    Args:
        root: folder under which every job gets its own sub-folder.
        workers: threads running jobs at once (a CPU runs one model at a time best).
        keep: finished jobs kept (with their folders) before the oldest are deleted.

    Example:
        >>> runner = JobRunner(Path("/tmp/jobs"))                      # doctest: +SKIP
        >>> job = runner.submit("segment", lambda job: {"count": 3})   # doctest: +SKIP
    """

    def __init__(self, root: Path, *, workers: int = 1, keep: int = 200) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[Job, Callable[[Job], dict[str, Any]]] | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"unetkit-web-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, kind: str, work: Callable[[Job], dict[str, Any]]) -> Job:
        """Queue ``work(job) -> result dict``; returns the job at once."""
        job_id = secrets.token_urlsafe(12)  # unguessable: one user cannot read another's
        job = Job(kind, self.root / job_id, id=job_id)
        job.folder.mkdir(parents=True)
        with self._lock:
            self.jobs[job.id] = job
            self._forget_old()
        self._queue.put((job, work))
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Ask a job to stop; a queued job never starts, a running one stops at its next
        progress report."""
        job = self.get(job_id)
        if job is not None and job.state in ("queued", "running"):
            job.cancel_event.set()
        return job

    def shutdown(self) -> None:
        """Cancel everything and stop the worker threads (waits for running jobs to unwind)."""
        with self._lock:
            for job in self.jobs.values():
                job.cancel_event.set()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=30)

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, work = item
            if job.cancelled():
                job.state = "cancelled"
                continue
            job.state = "running"
            try:
                job.result = work(job) or {}
                job.state = "done"
            except Cancelled:
                job.state = "cancelled"
            except Exception as e:
                # a workflow's own cancel exception (finetune_on_labels' should_stop) or
                # anything raised after the user cancelled: cancelled, not failed
                job.state = "cancelled" if job.cancelled() else self._failed(job, e)

    @staticmethod
    def _failed(job: Job, e: Exception) -> str:
        if isinstance(e, UnetkitError):  # bad input: the one-line message is for the user
            job.error = str(e)
        else:  # a bug: keep the server alive, log the traceback
            log.exception("job %s (%s) failed", job.id, job.kind, exc_info=e)
            job.error = f"{type(e).__name__}: {e}"
        return "failed"

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.state in ("done", "failed", "cancelled")]
        for job in sorted(finished, key=lambda j: j.created)[: max(0, len(finished) - self.keep)]:
            del self.jobs[job.id]
            shutil.rmtree(job.folder, ignore_errors=True)
