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

__all__ = ["Progress", "dask_client", "run_tasks"]

Progress = Callable[[str, int, int], None]


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
        cluster: ``local:N`` (a ``LocalCluster`` on 127.0.0.1, N workers, one thread each)
            or ``tcp://HOST:PORT`` (an existing ``dask scheduler``).
        timeout: seconds to wait for the scheduler.
        processes: local workers as processes (True) or threads of this process.
        dashboard: the local cluster's dashboard address (None: no dashboard).
    """
    if cluster is None:
        yield None
        return
    from distributed import Client, LocalCluster

    if cluster.startswith("local:"):
        n = cluster.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--cluster {cluster}: expected local:N with N >= 1 workers")
        with (
            LocalCluster(
                n_workers=int(n),
                threads_per_worker=1,
                host="127.0.0.1",
                processes=processes,
                dashboard_address=dashboard,
            ) as lc,
            Client(lc) as client,
        ):
            yield client
        return
    if not cluster.startswith("tcp://"):
        raise ConfigError(f"--cluster {cluster}: expected local:N or tcp://HOST:PORT")
    try:
        client = Client(cluster, timeout=timeout)
    except (OSError, TimeoutError) as e:
        raise DataError(
            f"--cluster {cluster}: no Dask scheduler answered within {timeout:g} s "
            "(start one with `dask scheduler` and workers with `dask worker ADDRESS`)"
        ) from e
    with client:
        yield client


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
