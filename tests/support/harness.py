"""A process group of N CPU ranks (gloo) that stays up and runs many checks.

Starting processes (and importing torch in each) is the expensive part of a
distributed test on a small machine, so a :class:`ProcessGroupHarness` starts its
workers once (see the fixtures in ``tests/conftest.py``) and then runs any number of
functions in them::

    with ProcessGroupHarness(world_size=2) as group:
        per_rank = group.run(workers_ddp.train, spec)   # [rank 0's result, rank 1's]
    assert group.exitcodes == [0, 0]

How it works:

* workers are ``spawn``-ed (never forked: a forked torch is not safe); each one joins
  a gloo process group through a ``TCPStore`` that *this* process serves on a port
  the OS picked, so there is no race for a free port;
* :meth:`ProcessGroupHarness.run` sends a function reference (module + qualified
  name, so the function must live in an importable module, not in a test file's
  ``<locals>``) and its arguments to every rank over one pipe per rank, and waits
  for every rank's answer with a deadline: a hung collective fails the test after
  ``timeout`` seconds instead of hanging CI. A rank's exception comes back as a
  formatted traceback and is raised here as :class:`WorkerError`;
* after a timeout or a dead worker the group is killed and marked broken; the next
  ``run`` starts a fresh group, so one failing test does not fail the rest;
* a worker killed by a signal the harness did not send (SIGSEGV, or SIGABRT from
  glibc's heap checks) died of a crash in native code underneath (torch, gloo: the
  code under test is pure Python). Its stack goes to stderr (``faulthandler``) and the
  call is rerun once on a fresh group, with a ``RuntimeWarning``; a second crash fails;
* :meth:`ProcessGroupHarness.close` asks every worker to stop: the worker drops its
  references, calls ``dist.destroy_process_group()`` in ``finally:`` and leaves with
  ``os._exit`` (a gloo worker that runs the interpreter's normal shutdown can die of
  SIGABRT). ``exitcodes`` then holds every worker's exit status (0 = clean);
* workers never outlive this process: they die with it (``PR_SET_PDEATHSIG`` on
  Linux), stop when their pipe closes, and an ``atexit`` hook kills any left over.

The worker side is ``harness_worker``. Both import torch only inside functions, so
that a worker can set ``OMP_NUM_THREADS`` and friends before its first ``import torch``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pickle
import signal
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from tests.support.harness_worker import HOST, RemoteError, leave, worker_main

__all__ = [
    "DEFAULT_TIMEOUT",
    "GroupTimeoutError",
    "ProcessGroupHarness",
    "RemoteError",
    "WorkerCrashError",
    "WorkerError",
    "leave",
]

#: Seconds a :meth:`ProcessGroupHarness.run` may take before the group is declared hung.
DEFAULT_TIMEOUT = 120.0

#: Environment of every worker, set before it imports torch (a 2-core machine).
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    # gloo picks its network interface from the host name unless told; all ranks
    # are on this machine, so loopback is the one that always works.
    "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
}


class WorkerError(RuntimeError):
    """A function raised on some rank, a worker died, or the group could not start.

    ``errors`` holds the :class:`RemoteError` of every rank that raised.
    """

    def __init__(self, message: str, errors: list[RemoteError] | None = None) -> None:
        self.errors = list(errors or [])
        details = "".join(f"\n--- {error}" for error in self.errors)
        super().__init__(message + details)


class GroupTimeoutError(WorkerError):
    """Some rank did not answer within the deadline (a hung collective, usually)."""


class WorkerCrashError(WorkerError):
    """A worker was killed by a signal the harness did not send (a native crash).

    distclip and the test workers are pure Python, so a SIGSEGV or a SIGABRT from
    glibc's heap checks comes from native code underneath (torch, gloo). ``signal``
    is the signal's number.
    """

    def __init__(self, message: str, signal: int, errors: list[RemoteError] | None = None):
        self.signal = signal
        super().__init__(message, errors)


# --------------------------------------------------------------------------- parent side
_LIVE: weakref.WeakSet[ProcessGroupHarness] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for harness in list(_LIVE):
        harness.kill()


class ProcessGroupHarness:
    """N spawned ranks in one gloo process group; see the module docstring.

    Args:
        world_size: how many ranks.
        backend: the ``torch.distributed`` backend (gloo: CPU only).
        timeout: default deadline in seconds of :meth:`run`.
        start_timeout: deadline in seconds for every rank to join the group.
        collective_timeout_s: the process group's own timeout (a collective that
            waits longer raises in the worker); longer than ``timeout`` so the
            harness's deadline is what a test sees.
        error_grace: once a rank has raised, seconds to wait for the other ranks'
            answers (they are often stuck in a collective the failed rank never
            entered) before the group is killed.
        crash_reruns: how many times :meth:`run` reruns a call, on a fresh group,
            after a worker died of a native crash (:class:`WorkerCrashError`); each
            rerun is reported with a ``RuntimeWarning``. Python errors, exits and
            timeouts are never rerun.
    """

    def __init__(
        self,
        world_size: int = 2,
        *,
        backend: str = "gloo",
        timeout: float = DEFAULT_TIMEOUT,
        start_timeout: float = DEFAULT_TIMEOUT,
        collective_timeout_s: float = 300.0,
        error_grace: float = 10.0,
        crash_reruns: int = 1,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.collective_timeout_s = collective_timeout_s
        self.error_grace = error_grace
        self.crash_reruns = crash_reruns
        self.crash_reports: list[str] = []
        self.starts = 0
        self.exitcodes: list[int | None] | None = None
        self._processes: list[Any] = []
        self._conns: list[Connection] = []
        self._store: Any = None
        self._broken = False
        self._call_ids = itertools.count()

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        """True while a started, healthy group is up."""
        return bool(self._processes) and not self._broken

    @property
    def broken(self) -> bool:
        """True after a timeout or a dead worker killed the group (until the next start)."""
        return self._broken

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [p.pid for p in self._processes]

    def start(self) -> ProcessGroupHarness:
        """Spawn the workers and wait until every rank has joined the process group."""
        if self._processes:
            raise RuntimeError("the group is already started; close() it first")
        import torch.distributed as dist
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._broken = False
        self.exitcodes = None
        self.starts += 1
        # This process serves the rendezvous store on a port the OS chooses: no race.
        self._store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)
        port = self._store.port
        _LIVE.add(self)
        for rank in range(self.world_size):
            parent_end, child_end = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=worker_main,
                args=(
                    rank,
                    self.world_size,
                    port,
                    self.backend,
                    child_end,
                    os.getpid(),
                    WORKER_ENV,
                    self.collective_timeout_s,
                ),
                name=f"distclip-test-rank{rank}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self._processes.append(process)
            self._conns.append(parent_end)
        try:
            self._collect(None, ready=True, timeout=self.start_timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def close(self, timeout: float = 60.0) -> list[int | None]:
        """Stop every worker and return their exit codes (0 = left cleanly).

        A worker that does not exit within ``timeout`` seconds is killed (its code is
        then negative). Closing a broken or closed group only reaps its processes.
        """
        if not self._processes:
            return list(self.exitcodes or [])
        if not self._broken:
            stop = pickle.dumps(("stop",))
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.send_bytes(stop)
            deadline = time.monotonic() + timeout
            for process in self._processes:
                process.join(max(0.0, deadline - time.monotonic()))
        return self.kill()

    def kill(self) -> list[int | None]:
        """Kill whatever workers are still alive, reap them all, return exit codes."""
        for process in self._processes:
            if process.is_alive():
                process.kill()
        for process in self._processes:
            process.join(10.0)
        if self._processes:
            self.exitcodes = [p.exitcode for p in self._processes]
        for conn in self._conns:
            conn.close()
        self._processes, self._conns, self._store = [], [], None
        _LIVE.discard(self)
        return list(self.exitcodes or [])

    def __enter__(self) -> ProcessGroupHarness:
        return self.start() if not self._processes else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ run
    def run(
        self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> list[Any]:
        """Call ``fn(*args, **kwargs)`` on every rank at once; return the results by rank.

        ``fn`` must be importable by module path (a module-level function). Starts a
        fresh group if the last one broke.

        A worker that dies of a native crash (:class:`WorkerCrashError`) has the call
        rerun on a fresh group, up to ``crash_reruns`` times, each with a
        ``RuntimeWarning`` (and a line in ``crash_reports``); the rerun must then pass
        on its own.

        Raises:
            WorkerError: ``fn`` raised on some rank (every rank's traceback included)
                or a worker died; the group is killed if it can no longer be trusted.
            WorkerCrashError: a worker died of a native crash in every try.
            GroupTimeoutError: some rank did not answer within ``timeout`` seconds
                (default: the harness's); the group is killed.
        """
        module_name = getattr(fn, "__module__", None)
        qualname = getattr(fn, "__qualname__", "")
        if not module_name or module_name == "__main__" or "<locals>" in qualname:
            raise ValueError(
                f"{fn!r} cannot be sent to a worker: use a module-level function of an "
                "importable module"
            )
        for rerun in itertools.count():
            try:
                return self._call(module_name, qualname, args, kwargs, timeout)
            except WorkerCrashError as crash:
                if rerun >= self.crash_reruns:
                    raise
                report = f"{crash.args[0]}; rerunning {module_name}.{qualname} on a fresh group"
                self.crash_reports.append(report)
                warnings.warn(report, RuntimeWarning, stacklevel=2)
        raise AssertionError("unreachable")

    def _call(
        self,
        module_name: str,
        qualname: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> list[Any]:
        """One call on every rank (a fresh group first if the last one broke)."""
        if self._broken or not self._processes:
            if self._processes:
                self.kill()
            self.start()
        call_id = next(self._call_ids)
        payload = pickle.dumps(("call", call_id, module_name, qualname, args, kwargs))
        for conn in self._conns:
            conn.send_bytes(payload)
        return self._collect(
            call_id, ready=False, timeout=self.timeout if timeout is None else timeout
        )

    def _collect(self, call_id: int | None, *, ready: bool, timeout: float) -> list[Any]:
        """Wait for one answer per rank (results, or 'ready' at start-up)."""
        n = self.world_size
        results: list[Any] = [None] * n
        errors: list[RemoteError] = []
        pending = set(range(n))
        start = time.monotonic()
        deadline = start + timeout
        what = "join the process group" if ready else f"answer call {call_id}"
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(pending)
                self._abort()
                raise GroupTimeoutError(
                    f"rank(s) {missing} did not {what} within {timeout:.0f} s (a hung "
                    "collective?); the group was killed",
                    errors,
                )
            waitables: dict[Any, tuple[str, int]] = {}
            for rank in pending:
                waitables[self._conns[rank]] = ("conn", rank)
                waitables[self._processes[rank].sentinel] = ("died", rank)
            for obj in wait(list(waitables), timeout=remaining):
                kind, rank = waitables[obj]
                if rank not in pending:
                    continue
                conn = self._conns[rank]
                try:
                    if kind == "died" and not conn.poll():
                        raise EOFError
                    message = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError) as exc:
                    self._processes[rank].join(10.0)  # a closed pipe: the rank is exiting
                    self._abort()
                    code = self.exitcodes[rank] if self.exitcodes else None
                    message = f"rank {rank} died (exit code {code}) while expected to {what}"
                    if code is not None and code < 0 and -code != signal.SIGKILL:
                        name = signal.Signals(-code).name
                        raise WorkerCrashError(
                            f"{message}: killed by {name}, a native crash (its stack is "
                            "in the captured stderr)",
                            -code,
                            errors,
                        ) from exc
                    raise WorkerError(message, errors) from exc
                status = message[0]
                if status == "fatal":
                    errors.append(message[2])
                    self._abort()
                    raise WorkerError(f"rank {rank} failed and left the group", errors)
                if ready:
                    if status != "ready":
                        self._abort()
                        raise WorkerError(f"rank {rank} sent {status!r} instead of 'ready'")
                elif message[1] != call_id:
                    self._abort()
                    raise WorkerError(f"rank {rank} answered call {message[1]}, not {call_id}")
                elif status == "ok":
                    results[rank] = message[2]
                else:
                    errors.append(message[2])
                    # The other ranks may wait in a collective this rank never entered.
                    deadline = min(deadline, time.monotonic() + self.error_grace)
                pending.discard(rank)
        if errors:
            errors.sort(key=lambda e: e.rank)
            raise WorkerError(
                f"call {call_id} raised on rank(s) {[e.rank for e in errors]}", errors
            )
        return results

    def _abort(self) -> None:
        self._broken = True
        self.kill()
        self._broken = True


def running_group(world_size: int, **options: Any) -> Iterator[ProcessGroupHarness]:
    """Body of a module-scoped fixture: a started group, closed after, exit codes all 0.

    ``options`` go to :class:`ProcessGroupHarness`. A group that broke during the
    module (a killed worker) is not checked at the end: its test already failed.
    """
    group = ProcessGroupHarness(world_size=world_size, **options)
    try:
        group.start()
        yield group
    finally:
        was_healthy = group.running
        exitcodes = group.close()
    if was_healthy:
        expected = [0] * world_size
        assert exitcodes == expected, f"workers did not exit cleanly: exit codes {exitcodes}"
