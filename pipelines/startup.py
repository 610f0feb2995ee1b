"""Where a run's replicas run, and their start-up off the clock.

Two decisions, made before anything is written:

- **The driver lane or Ray** (`lane_resources`). A run that would start its own
  embedded Ray with CPU replicas (no address, no Ray session in this process,
  no GPU used, `replicas: auto`) is done in the driver process
  (`pipelines.lane`) when one replica does as well as what Ray would run: when
  Ray would run a single replica anyway (the data-bound 64->16->1 model on a
  machine of up to 4 CPUs: `cluster.auto_cpus`), whatever the job's size, and
  for any model when the job is small (`LANE_MAX_ROWS`) or the machine has at
  most `LANE_ALL_CPUS` CPUs and `cpus_per_replica` is left to `auto`. Measured on
  a busy 2-core machine (README, "Performance"): on the data-bound job at 6.4M
  rows the whole `batch-infer run` process took 5.1 s in the lane against 8.3 s
  for the same run through the API with Ray already up (16.2 s with its own
  embedded Ray), the same CPU work without Ray's start (~5-10 s) or an actor's.
  Where Ray runs one replica per CPU (the compute-bound 64->256->256->1 model),
  measured on a quiet 2-core machine (CLI whole process, interleaved, medians):
  2M rows 4.36 s in a 2-core lane against 9.27 s with Ray's two replicas, 8M
  rows 11.15 s against 15.25 s. On more CPUs than that, where one process's
  torch threads and Python loop would have to feed every core, a long run of
  such a model still starts Ray (not measured here: no such machine). A lane
  run of many tiny shards has its replica's work done by one child process
  per CPU (`lane_processes`), still without Ray.
- **Ray started while the driver plans** (`Startup`). A run that will use Ray
  (a cluster address or `RAY_ADDRESS`, a Ray session in this process, GPUs, or
  an exact `replicas` count) connects and creates its replicas on a thread of
  its own as soon as planning sees work (a listed file not wholly committed), so
  the connection, the actors' start, `import torch`, the model load and a GPU's
  CUDA context overlap the footer reads and the rest of planning. The replicas
  are created with the job as far as it is known then (`ReplicaJob.provisional`)
  and given the planned job before their first shard (`Replica.configure`). A
  run that plans no work (an unchanged tick) never starts Ray; one that is
  refused while it plans (exit 2, or exit 3 on a held lock) stops what was
  started before it returns: the replicas are killed, an embedded Ray shut down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from pipelines.config import JobConfig
from basis.storage import absolute

logger = logging.getLogger(__name__)

LANE_ALL_CPUS = 4.0  # up to this many CPUs, one in-process replica of every core does what Ray's would (module doc)
LANE_PROCESS_SHARDS = 2_000  # from this many tiny shards, the lane's replicas run in child processes
JOIN_SECONDS = 120.0  # how long a refused run waits for a start in flight (a connection, `ray.init`) to end


def _ray_session_up() -> bool:
    ray = sys.modules.get("ray")  # never imported here just to ask
    return ray is not None and ray.is_initialized()


def embedded_cpu_possible(cfg: JobConfig, view: Any = None) -> Any:
    """This machine as an embedded Ray would see it (`view`, default `cluster.local_view`) when the run may be
    done in the driver lane (its own embedded Ray, CPU replicas, `replicas: auto`), else None: it uses Ray."""
    if cfg.address or os.environ.get("RAY_ADDRESS") or _ray_session_up() or cfg.replicas is not None:
        return None
    if view is None:
        from pipelines.cluster import local_view

        view = local_view()
    if cfg.gpus_per_replica or (cfg.gpus_per_replica is None and view.totals.get("GPU", 0.0) > 0):
        return None
    return view


def lane_resources(cfg: JobConfig, rows: int, shards: int, layers: tuple[tuple[int, int, bool], ...],
                   view: Any = None) -> Any:
    """The lane replica's `ReplicaResources` when this run is done in the driver (`pipelines.lane`), else None.

    See the module doc for when. `view`: this machine (default `cluster.local_view`). The
    replica's shape is checked against it as Ray would check it, so what can never fit is
    refused (`ResourceError`) before anything is written.

    Example:
        >>> from pipelines.cluster import ClusterView, Node
        >>> two = ClusterView((Node("n", "h", {"CPU": 2.0}),))
        >>> cfg = JobConfig.from_dict({"model": "m", "input": "i", "output": "o"})
        >>> lane_resources(cfg, 32_000_000, 16, ((64, 16, True), (16, 1, True)), two).num_cpus
        2.0
    """
    from pipelines.cluster import plan_replicas
    from pipelines.lane import LANE_MAX_ROWS

    view = embedded_cpu_possible(cfg, view)
    if view is None:
        return None
    cpu_only = cfg.replace(gpus_per_replica=0)
    lane = plan_replicas(cpu_only, shards, view)  # one replica: all a replica may use here
    if rows <= LANE_MAX_ROWS or (cfg.cpus_per_replica is None and view.totals.get("CPU", 0.0) <= LANE_ALL_CPUS):
        return lane
    if plan_replicas(cpu_only, shards, view, layers).most > 1:
        return None  # Ray would run several replicas: on many cores they beat one process
    return lane


def lane_on_numpy(rows: int, shards: int, batch_rows: int) -> bool:
    """Whether the lane's fp32 forward runs on numpy (`workers.cpu_forward`) rather than torch: for a small
    job (`import torch` would be most of its time) and for shards of less than a forward batch on average
    (tiny files: torch's kernels win only on full batches; its import and ~250 MiB would stay). Measured
    on a busy 2-core box: 6.4M data-bound rows in 16 files took 4.6 s of CPU on torch against 6.6 s on
    numpy; 20,000 files of 100 rows 27 s on numpy against 30 s on torch (driver peak RSS 232 against 480
    MiB)."""
    from pipelines.lane import LANE_MAX_ROWS

    return rows <= LANE_MAX_ROWS or rows < shards * batch_rows


def lane_processes(cpus: float, rows: int, shards: int, batch_rows: int) -> int:
    """How many child processes run the lane's replicas (`pipelines.lane_processes`), one per CPU; 0: its one
    replica runs in the driver process. Children for a run of at least `LANE_PROCESS_SHARDS` shards of less
    than a forward batch on average (tiny files): each shard is mostly Python, so one interpreter's lock
    bounds the lane at about one core (two work threads in the driver gave nothing: 661 against 670
    shards/s), while a child starts in ~0.3 s (Ray's replicas: 5-10 s, and Ray's memory in the driver).
    A small job and a few big files keep the replica in the driver (no start at all; a big file's
    decode and forward already use every core on one replica).

    Example:
        >>> lane_processes(2.0, 1_000_000, 10_000, 65_536), lane_processes(2.0, 500, 5, 65_536)
        (2, 0)
    """
    if int(cpus) < 2 or shards < LANE_PROCESS_SHARDS or rows >= shards * batch_rows:
        return 0
    return int(cpus)


class Startup:
    """Ray and the run's replicas, started on a thread while the driver plans (see the module doc).

    Example:
        >>> with Startup(cfg) as startup:  # doctest: +SKIP
        ...     p = prepare(cfg, on_work=startup.begin)
        ...     connection, view, pool = startup.wait(p.model, p.input, p.sink, len(p.todo))
    """

    def __init__(self, cfg: JobConfig, *, early: bool | None = None, metrics: Any = None) -> None:
        """`early`: start as soon as planning sees work (default: when the run is sure to use Ray)."""
        self.cfg = cfg
        self.early = early if early is not None else embedded_cpu_possible(cfg) is None
        self.metrics = metrics
        self.connection: Any = None  # cluster.Connection
        self.view: Any = None  # cluster.ClusterView
        self.pool: Any = None  # pool.ReplicaPool of the replicas started early (None: none were)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stack = contextlib.ExitStack()
        self._handed = False
        self._ready = threading.Event()  # the thread's start is done (or failed)
        self._release = threading.Event()  # the run is over: the thread shuts Ray down and ends

    def __enter__(self) -> Startup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def begin(self, model: Any, source: Any, sink: Any, shards: int) -> None:
        """Planning saw work (about `shards` shards): start Ray and the replicas now, once, if early."""
        if self.early and self._thread is None:
            self._start_thread(model, source, sink, shards)

    def wait(self, model: Any, source: Any, sink: Any, shards: int) -> tuple[Any, Any, Any]:
        """The connection, the cluster's view and the replicas started early (None if none), starting now
        what planning did not start; raises what the start raised (`ClusterConnectError`, `ConfigError`,
        `ResourceError`). The caller's scheduler then owns the pool; Ray stays up until `close`."""
        if self._thread is None:  # planning saw no work early (or this run starts Ray only now): here, now
            sigterm = signal.getsignal(signal.SIGTERM)
            try:
                self._connect(model, source, sink, shards, replicas=False)
            finally:
                _restore_sigterm(sigterm)
        else:
            self._ready.wait()
            _restore_sigterm(signal.getsignal(signal.SIGTERM))  # Ray's core worker put absl's before it
            if self._error is not None:
                raise self._error
        self._handed = True
        return self.connection, self.view, self.pool

    def _start_thread(self, model: Any, source: Any, sink: Any, shards: int, *, replicas: bool = True) -> None:
        self._thread = threading.Thread(target=self._start, args=(model, source, sink, shards, replicas),
                                        name="batch-infer-startup", daemon=True)
        self._thread.start()

    def _start(self, model: Any, source: Any, sink: Any, shards: int, replicas: bool) -> None:
        """The thread that starts Ray stays until the run is over and shuts it down: an embedded Ray's
        processes are bound to the thread that started them (PR_SET_PDEATHSIG), not to the process."""
        try:
            self._connect(model, source, sink, shards, replicas)
        except BaseException as exc:  # noqa: BLE001 - raised in the driver's thread by `wait`
            self._error = exc
        finally:
            self._ready.set()
        self._release.wait()
        self._stack.close()

    def _connect(self, model: Any, source: Any, sink: Any, shards: int, replicas: bool) -> None:
        from pipelines.cluster import check_shared_storage, connect, observe, plan_replicas

        cfg = self.cfg
        off_main = threading.current_thread() is not threading.main_thread()
        with _quiet_sigterm_warning(off_main):
            self.connection = self._stack.enter_context(connect(cfg))
        self.view = observe(embedded=self.connection.embedded)
        check_shared_storage(cfg, self.view, replica_paths(cfg, model, source, sink))
        if not replicas:
            return
        import ray

        from pipelines.pool import ReplicaPool
        from workers.replica import Replica

        resources = plan_replicas(cfg, max(1, shards), self.view, model.layers)
        job = provisional_job(cfg, model, source, sink, resources.num_cpus)
        pool = ReplicaPool(job, resources, max_attempts=cfg.max_attempts, actor=ray.remote(Replica),
                           metrics=self.metrics)
        self.pool = pool
        pool.start()
        logger.debug("started %d replica(s) while planning", len(pool.slots))

    def close(self) -> None:
        """Stop what was started and not handed over (a refused run), then Ray if this run started it."""
        thread = self._thread
        if thread is not None and not self._ready.wait(JOIN_SECONDS):
            logger.warning("Ray's start did not end within %g s; leaving it", JOIN_SECONDS)
            return  # a connection that does not end: the process exits without it
        if self.pool is not None:  # not taken over by a scheduler (which stops its replicas itself)
            stopped = len(self.pool.alive())
            self.pool.close()
            if not self._handed:
                logger.info("stopped %d replica(s) started while planning: the run ended before it ran a shard",
                            stopped)
        if thread is None:
            self._stack.close()
            return
        self._release.set()
        thread.join(JOIN_SECONDS)


def _restore_sigterm(handler: Any) -> None:
    """Give SIGTERM back to the handler it had before Ray started (the CLI's: unwind like Ctrl-C, exit 130).

    `ray.init` on the main thread installs its own, which exits 1 at once (an embedded Ray's also
    kills its processes), under Ray's fatal-signal handler that logs and aborts: the lock, the
    autoscaler request and the journal's last segment were left behind. Started on a thread of
    its own, while the driver plans, it installs no Python handler, but its core worker still puts
    that fatal-signal handler (absl's) in front of the process's: it logs, hands the signal on, and
    arms a 3 s SIGALRM that aborts, so a run that took longer to unwind exited -6 with its lock left.
    Set again from the main thread, Python's handler is SIGTERM's only one.
    """
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def replica_paths(cfg: JobConfig, model: Any, source: Any, sink: Any) -> dict[str, str]:
    """What every replica opens, for `cluster.check_shared_storage`."""
    models = {f"model {name!r}": absolute(uri) for name, uri in (cfg.model_set or {}).items()}
    return {**(models or {"model": absolute(cfg.model)}), "input": source.replica_uri, "output": sink.uri}


def provisional_job(cfg: JobConfig, model: Any, source: Any, sink: Any, cpus: float) -> Any:
    """A `ReplicaJob` with all a replica needs to start and load its model, before the plan says the rest
    (`Replica.configure` gives it the planned job: columns, generation, the job's digest)."""
    from workers.replica_job import ReplicaJob

    members = _members(cfg, model)
    return ReplicaJob(
        model=members[0][1] if members else absolute(cfg.model), model_sha256=model.sha256,
        input=source.replica_uri, output=sink.uri, features=(), passthrough=(), list_column=False,
        width=model.in_features, prediction_column=cfg.prediction_column or "", keep_features=cfg.keep_features,
        activation=cfg.activation, output_activation=cfg.output_activation, precision=cfg.precision,
        batch_size=cfg.batch_size, invalid_rows=cfg.invalid_rows, cpus=cpus, categorical=tuple(cfg.categorical or ()),
        models=tuple((name, uri, sha256) for name, uri, sha256 in members), provisional=True)


def _members(cfg: JobConfig, model: Any) -> Sequence[tuple[str, str, str]]:
    if cfg.model_set is None:
        return ()
    return tuple((name, spec.uri, spec.sha256) for name, spec in model.members)


@contextlib.contextmanager
def _quiet_sigterm_warning(enabled: bool) -> Any:
    """`ray.init` off the main thread warns that it set no SIGTERM handler: the run keeps its own (the CLI's)."""
    if not enabled:
        yield
        return
    worker_logger = logging.getLogger("ray._private.worker")

    def drop(record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()

    worker_logger.addFilter(drop)
    try:
        yield
    finally:
        worker_logger.removeFilter(drop)
