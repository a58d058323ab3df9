"""Where study jobs run: a local process pool (default) or Ray (a local instance, or a cluster by address).

Both run ``mergelab.study.jobs.run_job`` on every job not yet stored and yield ``(key, result)`` as jobs
finish, with a progress bar. A job's result does not depend on the executor (each job runs on one thread
with deterministic kernels and is keyed by content), so a study may be started on one and resumed on the other.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError
from mergelab.study.jobs import Job, run_job, stored

EXECUTORS = ("local", "ray")


def default_workers() -> int:
    """One worker per available core (jobs run on one thread each)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def execute(jobs: dict[str, Job], store: Path, executor: str = "local", workers: int | None = None,
            ray_address: str | None = None, device: str = "cpu",
            progress: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(key, result)`` for every job: stored ones first, then the others as they finish."""
    if executor not in EXECUTORS:
        raise MergelabError(f"Unknown executor {executor!r}; use one of: {', '.join(EXECUTORS)}.")
    from tqdm.auto import tqdm

    pending = {}
    for key, job in jobs.items():
        done = stored(store, key)
        if done is None:
            pending[key] = job
        else:
            yield key, done
    if not pending:
        return
    run = _run_ray if executor == "ray" else _run_local
    with tqdm(total=len(pending), desc=f"jobs ({executor})", disable=not progress) as bar:
        for key, result in run(pending, store, workers or default_workers(), ray_address, device):
            bar.update()
            yield key, result


def _run_local(pending: dict[str, Job], store: Path, workers: int, _address: str | None,
               device: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if workers == 1:
        for key, job in pending.items():
            yield key, run_job(job, key, store, device)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job, key, store, device): key for key, job in pending.items()}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _run_ray(pending: dict[str, Job], store: Path, workers: int, address: str | None,
             device: str) -> Iterator[tuple[str, dict[str, Any]]]:
    ray = connect_ray(address, workers)
    task = ray.remote(num_cpus=1, num_gpus=1 if device.startswith("cuda") else 0)(run_job)
    refs = {task.remote(job, key, str(store), device): key for key, job in pending.items()}
    remaining = list(refs)
    try:
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1)
            yield refs[ready[0]], ray.get(ready[0])
    finally:
        for ref in remaining:  # only unfinished tasks: cancelling finished ones trips a check in Ray 2.60
            ray.cancel(ref)
        if address is None:
            ray.shutdown()


def connect_ray(address: str | None, workers: int, timeout: float = 5.0):
    """``ray`` connected to the cluster at ``address`` (checked to answer within ``timeout`` seconds first),
    or to a new local instance with ``workers`` CPUs."""
    try:
        import ray
    except ImportError as exc:
        raise MergelabError("--executor ray needs Ray: pip install 'mergelab[ray]' (or 'ray[default]').") from exc
    if ray.is_initialized():
        return ray
    if address is None:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        return ray
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise MergelabError(f"The Ray cluster at {address} does not answer ({exc.strerror or exc}); start it with "
                            "'ray start --head' there, or leave out --ray-address for a local instance.") from exc
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray


def _host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``ray://host:port`` (Ray's default port 6379, its client port 10001)."""
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if not host:
        return rest, 10001 if client else 6379
    try:
        return host, int(port)
    except ValueError as exc:
        raise MergelabError(f"Ray address {address!r} is not host:port; write for example 10.0.0.5:6379.") from exc
