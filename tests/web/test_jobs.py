"""The job runner alone: states, errors, cancelling queued and running jobs, old jobs."""

from __future__ import annotations

import threading
import time

from unetkit.errors import DataError
from unetkit.web.jobs import JobRunner


def wait_state(job, states=("done", "failed", "cancelled")):
    for _ in range(2000):  # polls, not wall-clock
        if job.state in states:
            return job.state
        time.sleep(0.01)
    raise AssertionError(job.to_dict())


def test_results_errors_and_old_jobs(tmp_path):
    runner = JobRunner(tmp_path, workers=1, keep=2)
    try:
        ok = runner.submit("segment", lambda job: {"count": 3})
        bad = runner.submit("segment", lambda job: (_ for _ in ()).throw(DataError("x.png: bad")))
        bug = runner.submit("segment", lambda job: 1 / 0)
        assert [wait_state(j) for j in (ok, bad, bug)] == ["done", "failed", "failed"]
        assert ok.result == {"count": 3} and bad.error == "x.png: bad"
        assert bug.error.startswith("ZeroDivisionError")
        assert ok.folder.is_dir() and ok.folder.parent == tmp_path
        last = runner.submit("segment", lambda job: {})
        wait_state(last)
        # only the newest `keep` finished jobs stay, their folders with them
        assert runner.get(ok.id) is None and not ok.folder.exists()
        assert runner.get(bug.id) is bug and bug.folder.is_dir()
    finally:
        runner.shutdown()


def test_cancel_a_running_and_a_queued_job(tmp_path):
    runner = JobRunner(tmp_path, workers=1)
    started, ran = threading.Event(), []

    def slow(job):
        started.set()
        for i in range(10_000):
            job.progress(i, 10_000)  # raises Cancelled once cancelled
            time.sleep(0.001)
        return {}

    try:
        running = runner.submit("generate", slow)
        queued = runner.submit("generate", lambda job: ran.append(job.id) or {})
        assert started.wait(60)
        runner.cancel(queued.id)
        runner.cancel(running.id)
        assert wait_state(running) == "cancelled" and running.done < 9_999
        assert wait_state(queued) == "cancelled" and ran == []
        after = runner.submit("generate", lambda job: {"ok": True})
        assert wait_state(after) == "done"  # the worker is free again
    finally:
        runner.shutdown()
