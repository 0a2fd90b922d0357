"""Where a sweep's units run (eval.units): in this process, one after the other, or on a Ray cluster.

Both hand each unit's results to `write` in the order of the plan, so the files they leave are the same.

Ray (`pip install minipythia[ray]`) is an optional extra, imported only by `--ray`. Without an address a local
cluster of `workers` CPUs is started for the run and stopped when it ends, on an error or Ctrl-C too. It stays
on loopback: on Linux Ray binds its services to the machine's network address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (measured with ray 2.60: with it every component binds to 127.0.0.1;
`_node_ip_address="127.0.0.1"` alone is resolved back to the network address). Usage statistics are off and
no dashboard is started. With an address, units go to that cluster (`ray start --head` on one node, `ray
start --address HEAD:6379` on the others); each node needs minipythia installed and the checkpoint reachable
(the hub or its cache, or a shared filesystem for a local directory).

A unit asks Ray for one CPU, or one GPU when the model runs on CUDA; a worker loads each model once and keeps
the last one. Units whose worker died (a node lost, a process killed) are retried by Ray up to
UNIT_RETRIES times; a unit that raises fails the sweep with its error, after what finished has been written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from tqdm import tqdm

from minipythia.compressors.registry import FILE_POLICY_PACKAGE

from .units import Done, Unit, Windows, run_unit

UNIT_RETRIES = 2
LOOPBACK = "127.0.0.1"
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass
class ModelSource:
    """What a worker loads a member's model from (eval.sweep resolved it: an absolute directory)."""
    directory: str
    dtype: str
    device: str


@dataclass
class Job:
    """One sweep's units, what runs them (the model's source, the windows, meta) and where results go."""
    units: list[Unit]
    source: ModelSource
    windows: Windows
    meta: dict
    write: Callable[[Done], None]


def run_serial(units: list[Unit], model, windows: Windows, meta: dict, write: Callable[[Done], None]):
    """Every unit in this process, in order, on the model already loaded."""
    for unit in tqdm(units, desc="units", unit="unit", file=sys.stderr, disable=len(units) < 2):
        write(run_unit(unit, model, windows, meta))


def _terminated(signum, frame):
    print("terminated: stopping the Ray cluster; the same command resumes", file=sys.stderr)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def no_api_server():
    """A local cluster without Ray's API server: even with include_dashboard=False, ray.init starts
    dashboard.py (its usage-stats module only, with RAY_USAGE_STATS_ENABLED=0 nothing) listening on
    127.0.0.1:8265. Ray has no option to leave it out, and runs without it as on a minimal install, whose
    dashboard cannot start: Node.start_api_server is skipped while the cluster starts."""
    from ray._private.node import Node

    start = Node.start_api_server

    def skipped(self, *args, **kwargs):
        self._webui_url = None  # read later, as a minimal install leaves it

    Node.start_api_server = skipped
    try:
        yield
    finally:
        Node.start_api_server = start


class RayCluster:
    """A Ray session for one sweep: `with RayCluster(address, workers) as cluster: cluster.run(...)`."""

    def __init__(self, address: str | None, workers: int | None):
        if workers is not None and workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        if address is not None and workers is not None:
            raise ValueError("--workers sizes a local cluster; an existing one (--ray ADDRESS) has its own: leave "
                             "--workers out")
        self.address, self.workers = address, workers or os.cpu_count() or 1
        self.ray = None

    def __enter__(self) -> "RayCluster":
        # Set for Ray and the processes it starts, and put back as they were when the session ends.
        self.saved_env = {k: os.environ.get(k) for k in LOCAL_RAY_ENV}
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.address is None:
            os.environ.update(LOCAL_RAY_ENV)  # before Ray is imported: it reads them then
        try:
            import ray
        except ImportError:
            self._restore_env()
            raise ValueError("--ray needs Ray: pip install 'minipythia[ray]'") from None
        self.ray = ray
        if self.address is None:
            # Ray reads the variable once, when it is first imported: set what it read, had it been imported before.
            from ray._private import ray_constants

            self.saved_constant = ray_constants.ENABLE_RAY_CLUSTER
            ray_constants.ENABLE_RAY_CLUSTER = False
            with no_api_server():
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            bound = self.node_address()
            if bound != LOOPBACK:  # never a cluster reachable from the network by accident
                ray.shutdown()
                self._restore_env()
                raise RuntimeError(f"the local Ray cluster bound {bound}, not {LOOPBACK}; it was stopped (this Ray "
                                   f"version may not honour RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)")
        else:
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError) as e:
                self._restore_env()
                raise ValueError(f"--ray {self.address}: cannot join that Ray cluster ({str(e).splitlines()[0]}); "
                                 f"start one with `ray start --head` or give its address (HEAD:6379)") from None
        self.remote = ray.remote(max_retries=UNIT_RETRIES)(_run_on_worker)
        # Ray's core installs a handler that prints its C++ stack on SIGTERM and kills the driver on the spot:
        # ours stops the sweep as Ctrl-C does, through __exit__, so the cluster stops and nothing is printed but
        # one line.
        self.saved_sigterm = None
        if threading.current_thread() is threading.main_thread():
            self.saved_sigterm = signal.signal(signal.SIGTERM, _terminated)
        return self

    def __exit__(self, *exc):
        try:
            self.ray.shutdown()  # a local cluster stops with it; from a remote one the driver disconnects
        finally:
            if self.saved_sigterm is not None:
                signal.signal(signal.SIGTERM, self.saved_sigterm)
            self._restore_env()

    def _restore_env(self):
        if getattr(self, "saved_constant", None) is not None:
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = self.saved_constant
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def node_address(self) -> str:
        return self.ray.util.get_node_ip_address()

    def run(self, jobs: list[Job]):
        """Every unit of every job (the sweeps of several models and revisions at once) on the cluster; each
        job's results written in its plan's order, as soon as those before them are."""
        ray = self.ray
        # Policies loaded from .py files are not importable on a worker: they travel by value, with the units;
        # policies of importable modules are imported there by name.
        for name, module in list(sys.modules.items()):
            if name.startswith(FILE_POLICY_PACKAGE + "."):
                ray.cloudpickle.register_pickle_by_value(module)
        position = {}  # ref -> (job, unit index)
        for j, job in enumerate(jobs):
            resources = dict(num_cpus=1, num_gpus=1) if job.source.device.startswith("cuda") else dict(num_cpus=1)
            remote = self.remote.options(**resources)
            for i, unit in enumerate(job.units):
                position[remote.remote(unit, job.source, job.windows, job.meta)] = (j, i)
        finished: dict[tuple[int, int], Done] = {}
        next_to_write = [0] * len(jobs)
        pending = list(position)
        bar = tqdm(total=len(pending), desc="units", unit="unit", file=sys.stderr)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    j, i = position[ref]
                    finished[j, i] = _result(ray, ref, jobs[j].units[i])
                    bar.update(1)
                    while (j, next_to_write[j]) in finished:
                        jobs[j].write(finished.pop((j, next_to_write[j])))
                        next_to_write[j] += 1
        except BaseException:  # an error or Ctrl-C: what is still queued or running is not wanted any more
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()


def _result(ray, ref, unit: Unit) -> Done:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.as_instanceof_cause()
        if isinstance(cause, ValueError):  # our one-line errors stay one line
            raise ValueError(f"{unit.name}: {cause.args[0] if cause.args else cause}") from None
        raise


# The model a worker process holds: (directory, dtype, device) -> Pythia, the last one only.
_loaded: dict[tuple, object] = {}


def _run_on_worker(unit: Unit, source: ModelSource, windows: Windows, meta: dict) -> Done:
    from minipythia.cli import load_for_inference

    key = (source.directory, source.dtype, source.device)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = load_for_inference(source.directory, source.dtype, source.device)
    return run_unit(unit, _loaded[key], windows, meta)


