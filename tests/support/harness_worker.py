"""The worker side of ``tests.support.harness``: one rank joins the group and serves calls.

Imports torch only inside :func:`worker_main`, so that a worker can set
``OMP_NUM_THREADS`` and friends before its first ``import torch``.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import importlib
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any, NoReturn

__all__ = ["HOST", "RemoteError", "describe", "leave", "worker_main"]

#: All ranks are on this machine: the rendezvous store listens on loopback.
HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RemoteError:
    """An exception raised by a function on one rank, as it arrives here."""

    rank: int
    type_name: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.type_name}: {self.message}\n{self.traceback}"


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when the parent dies; exit if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            pass
    if os.getppid() != parent_pid:
        os._exit(3)


def _resolve(module_name: str, qualname: str) -> Callable[..., Any]:
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target  # type: ignore[no-any-return]


def describe(rank: int, exc: BaseException) -> RemoteError:
    """``exc`` raised on ``rank``, as it is sent to the parent (a formatted traceback)."""
    return RemoteError(
        rank=rank,
        type_name=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=str(exc),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    )


def _serve(conn: Connection, rank: int) -> None:
    """Run calls until told to stop (or until the parent's end of the pipe closes)."""
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        _, call_id, module_name, qualname, args, kwargs = message
        try:
            value = _resolve(module_name, qualname)(*args, **kwargs)
            payload = pickle.dumps(("ok", call_id, value))
        except BaseException as exc:
            payload = pickle.dumps(("error", call_id, describe(rank, exc)))
        # Drop every reference the call left (models, optimizers) and collect its
        # reference cycles now, between calls, rather than at a random allocation of a
        # later call (possibly while gloo threads are mid-collective).
        message = args = kwargs = value = None
        gc.collect()
        conn.send_bytes(payload)
        del payload


def worker_main(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    conn: Connection,
    parent_pid: int,
    env: dict[str, str],
    collective_timeout_s: float,
) -> None:
    """Entry point of one rank: join the group, serve calls, leave cleanly."""
    _die_with_parent(parent_pid)
    # A native crash (SIGSEGV, SIGABRT from glibc's heap checks) prints every thread's
    # Python stack to stderr before the process dies: the call that crashed is named.
    faulthandler.enable(all_threads=True)
    # The parent handles Ctrl-C and stops (or kills) the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(env)
    exit_code = 0
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.TCPStore(
            HOST, port, is_master=False, timeout=timedelta(seconds=collective_timeout_s)
        )
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout_s),
        )
        del store
        conn.send_bytes(pickle.dumps(("ready", rank, None)))
        _serve(conn, rank)
    except BaseException as exc:
        exit_code = 1
        try:
            conn.send_bytes(pickle.dumps(("fatal", rank, describe(rank, exc))))
        except Exception:
            traceback.print_exc()
    finally:
        leave(exit_code)


def leave(exit_code: int) -> NoReturn:
    """Leave a worker process: drop garbage, destroy the process group, ``os._exit``.

    A gloo worker that runs the interpreter's normal shutdown can die of SIGABRT; a
    failed destroy turns a clean exit code into 2.
    """
    try:
        gc.collect()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        exit_code = exit_code or 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
