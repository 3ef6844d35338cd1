"""Dask for the block-wise workflows: a client for ``--cluster`` and tasks with progress.

``dask_client("local:N")`` starts a ``distributed.LocalCluster`` on 127.0.0.1 (N workers,
one thread each); ``dask_client("tcp://HOST:PORT")`` joins a running ``dask scheduler``;
``None`` runs everything in this process. ``run_tasks`` maps a function over tasks on
the client's workers (or here) and reports progress.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from unetkit.errors import ConfigError, DataError

__all__ = ["WORKER_MODULES", "Progress", "dask_client", "local_worker_config", "run_tasks"]

Progress = Callable[[str, int, int], None]

#: imported by every ``local:N`` worker as it starts (``dask worker --preload`` for a
#: cluster of your own): torch and the block tasks load once per worker, in parallel,
#: before the first block instead of inside it
WORKER_MODULES = ("unetkit.workflows.block_tasks",)


# --- cluster -----------------------------------------------------------------------------
@contextlib.contextmanager
def dask_client(
    cluster: str | None,
    *,
    timeout: float = 10.0,
    processes: bool = True,
    dashboard: str | None = "127.0.0.1:0",
) -> Iterator[Any]:
    """A ``distributed.Client`` for ``--cluster`` (None: yields None, run in-process).

    Args:
        cluster: ``local:N`` (a ``LocalCluster`` on 127.0.0.1, N workers, one thread each,
            :data:`WORKER_MODULES` preloaded, :func:`local_worker_config`) or
            ``tcp://HOST:PORT`` (an existing ``dask scheduler``).
        timeout: seconds to wait for the scheduler.
        processes: local workers as processes (True) or threads of this process.
        dashboard: the local cluster's dashboard address (None: no dashboard).
    """
    if cluster is None:
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    if cluster.startswith("local:"):
        n = cluster.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--cluster {cluster}: expected local:N with N >= 1 workers")
        with (
            dask.config.set(local_worker_config()),
            LocalCluster(
                n_workers=int(n),
                threads_per_worker=1,
                host="127.0.0.1",
                processes=processes,
                dashboard_address=dashboard,
                preload=list(WORKER_MODULES),
            ) as lc,
            Client(lc) as client,
        ):
            yield client
        return
    if not cluster.startswith("tcp://"):
        raise ConfigError(f"--cluster {cluster}: expected local:N or tcp://HOST:PORT")
    try:
        client = Client(cluster, timeout=timeout)
    except ValueError as e:  # distributed's parser: "missing port number in address ''"
        raise ConfigError(f"--cluster {cluster}: {e}; expected tcp://HOST:PORT") from None
    except (OSError, TimeoutError) as e:
        raise DataError(
            f"--cluster {cluster}: no Dask scheduler answered within {timeout:g} s "
            "(start one with `dask scheduler` and workers with `dask worker ADDRESS`)"
        ) from e
    with client:
        yield client


def local_worker_config() -> dict[str, Any]:
    """Dask settings for the workers of ``local:N``, tuned for model inference.

    * Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also turns
      off glibc's dynamic mmap threshold: every tensor over 128 KiB a convolution
      allocates is then a fresh ``mmap`` whose pages are faulted in and zeroed again.
      Measured on a 2048² image (one worker): 3.0-3.4 s of system CPU with it, 0.7-1.1 s
      without, of 8-9 s in all. The other settings (one OpenMP/MKL/OpenBLAS thread) stay.
    * The statistical profiler samples every worker thread each 10 ms (about 8 % of a
      worker's CPU here); the dashboard's task stream and progress do not need it.
    """
    import distributed  # noqa: F401  (registers its defaults in dask.config)
    from dask import config

    environ = dict(config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return {
        "distributed.nanny.pre-spawn-environ": environ,
        "distributed.worker.profile.enabled": False,
    }


def run_tasks(
    client: Any, fn: Callable, items: list, stage: str, progress: Progress | None
) -> list:
    """``fn(*item)`` for each item on the client's workers (None: here, in order); the
    results in the items' order. ``progress(stage, done, total)`` after each task."""
    if progress:
        progress(stage, 0, len(items))
    if client is None:
        results = []
        for i, item in enumerate(items):
            results.append(fn(*item))
            if progress:
                progress(stage, i + 1, len(items))
        return results
    from distributed import as_completed

    if not items:
        return []
    futures = client.map(fn, *zip(*items, strict=True), pure=False)  # one message, not N
    for done, _ in enumerate(as_completed(futures), 1):
        if progress:
            progress(stage, done, len(items))
    return client.gather(futures)
