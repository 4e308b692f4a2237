"""The per-step record as JSON lines: one object per logged step, written at an interval.

A line holds the keys of :data:`METRICS_FIELDS`, in that order::

    {"step": 120, "total_norm": 3.52, "threshold": 1.87, "clip_coef": 0.531,
     "clipped": true, "skipped": false, "time": 1767225600.25}

* ``step`` (int): the clipper's step count, this step included (1 for the first step);
  a resumed run goes on counting from its checkpoint;
* ``total_norm`` (float or ``null``): the global gradient norm before clipping;
  ``null`` when it was NaN or inf (and the step was skipped);
* ``threshold`` (float or ``null``): this step's clipping threshold; ``null`` when
  nothing bounded the gradients (``inf``: an empty window, ZClip between spikes);
* ``clip_coef`` (float): the factor the gradients were multiplied by, in [0, 1]
  (1 on a skipped step);
* ``clipped`` (bool or ``null``): the method changed the gradients this step; ``null``
  for the methods that cannot tell without another reduction (``value``,
  ``coordinate_wise``, ``agc``);
* ``skipped`` (bool): the norm was NaN/inf and the update was skipped on every rank;
* ``time`` (float): when the line was written, in seconds since the Unix epoch.

The first six are :meth:`distclip.ClipStats.as_record`; JSON has no NaN or infinity,
so non-finite floats are written as ``null`` and every line is strict JSON (``jq``,
``pandas.read_json(lines=True)`` and any JSON parser read it). A caller may add keys
of its own (``writer.write(stats, loss=0.25)``), after these.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from distclip._checks import is_int
from distclip.clippers.stats import RECORD_FIELDS, ClipStats

__all__ = ["METRICS_FIELDS", "MetricsWriter", "read_metrics"]

#: The keys of every line, in order: :data:`~distclip.clippers.stats.RECORD_FIELDS` and ``time``.
METRICS_FIELDS = (*RECORD_FIELDS, "time")

_Scalar = int | float | str | bool | None

#: What each key of :data:`METRICS_FIELDS` may hold, for :func:`read_metrics`.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "total_norm": (int, float, type(None)),
    "threshold": (int, float, type(None)),
    "clip_coef": (int, float),
    "clipped": (bool, type(None)),
    "skipped": (bool,),
    "time": (int, float),
}


def _json_scalar(value: Any) -> _Scalar:
    """``value`` as strict JSON allows it: non-finite floats become ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value  # type: ignore[no-any-return]


def _process_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class MetricsWriter:
    """Append :meth:`~distclip.ClipStats.as_record` to a JSON-lines file every ``every`` steps.

    The record is the same on every rank (it comes from the global norm), so only one
    process writes: rank 0 by default. A step is written when its ``step`` is a
    multiple of ``every``; only then are its values copied to the host (one copy, see
    :meth:`~distclip.ClipStats.as_record`). Each line is flushed as it is written, so
    a job that dies keeps what it logged.

    Args:
        path: the file; its folder is created. Replaced unless ``append``.
        every: write every ``every``-th step (>= 1); 1 writes every step.
        rank: this process's rank, if known (a framework's global rank); ``None``
            reads it from ``torch.distributed`` (0 without a process group).
        append: add to an existing file (a resumed run) instead of replacing it.

    Raises:
        TypeError: ``path`` is not a string or path; ``every`` or ``rank`` not an int.
        ValueError: ``every`` < 1 or ``rank`` < 0.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        every: int = 1,
        rank: int | None = None,
        append: bool = False,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if not is_int(every):
            raise TypeError(f"every must be an int >= 1, got {type(every).__name__}")
        if every < 1:
            raise ValueError(f"every must be an int >= 1 (1 writes every step), got {every}")
        if rank is not None and not is_int(rank):
            raise TypeError(f"rank must be an int >= 0 or None, got {type(rank).__name__}")
        if rank is not None and rank < 0:
            raise ValueError(f"rank must be an int >= 0 or None, got {rank}")
        self.path = Path(path)
        self.every = every
        self.rank = _process_rank() if rank is None else rank
        self._append = append
        self._file: IO[str] | None = None
        self.num_written = 0

    @property
    def writes(self) -> bool:
        """True in the process that writes (rank 0)."""
        return self.rank == 0

    def due(self, stats: ClipStats | None) -> bool:
        """True when ``stats`` is a step this writer writes (no host read)."""
        return self.writes and stats is not None and stats.step % self.every == 0

    def write(self, stats: ClipStats | None, **extra: Any) -> dict[str, _Scalar] | None:
        """Write ``stats`` as one line if it is due; return the line's dict, or ``None``.

        ``stats`` may be ``None`` (before the first step): nothing is written.

        Args:
            stats: the step's :class:`~distclip.ClipStats` (``optimizer.last_clip``).
            **extra: further keys, after the schema's: plain ``int``, ``float``, ``str``,
                ``bool`` or ``None`` values (read them to the host yourself, at the
                interval).

        Raises:
            ValueError: an extra key is one of :data:`METRICS_FIELDS`.
            TypeError: an extra value is not a plain scalar.
        """
        for key, value in extra.items():
            if key in METRICS_FIELDS:
                raise ValueError(
                    f"extra key {key!r} is one of the schema's keys {METRICS_FIELDS}; name it "
                    "differently"
                )
            if not isinstance(value, (int, float, str, bool, type(None))):
                raise TypeError(
                    f"extra value {key}={type(value).__name__} must be an int, float, str, bool "
                    "or None (convert tensors with float(...) at the logging interval)"
                )
        if not self.due(stats):
            return None
        assert stats is not None  # due() is False for None
        record: dict[str, _Scalar] = dict(stats.as_record())
        record["time"] = time.time()
        record.update(extra)
        line = {key: _json_scalar(value) for key, value in record.items()}
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a" if self._append else "w", encoding="utf-8")
        self._file.write(json.dumps(line, allow_nan=False) + "\n")
        self._file.flush()
        self.num_written += 1
        return line

    def close(self) -> None:
        """Close the file (a later :meth:`write` appends to it)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._append = True

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (non-finite values are written as null)")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines metrics file, checked against the schema.

    Blank lines are ignored. Keys beyond :data:`METRICS_FIELDS` are kept.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` holds no record, or a line is not a JSON object with every
            key of :data:`METRICS_FIELDS` of the documented type (the message names the
            file and the line).
    """
    path = Path(path)
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line, parse_constant=_reject_constant)
            except ValueError as err:
                raise ValueError(f"{where}: not a JSON line ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            missing = [key for key in METRICS_FIELDS if key not in record]
            if missing:
                raise ValueError(
                    f"{where}: missing key(s) {missing}; a distclip metrics line has "
                    f"{list(METRICS_FIELDS)}"
                )
            for key, types in _FIELD_TYPES.items():
                value = record[key]
                wrong_bool = isinstance(value, bool) and bool not in types
                if wrong_bool or not isinstance(value, types):
                    allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                    raise ValueError(f"{where}: {key} must be {allowed}, got {value!r}")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no metrics records (an empty file?)")
    return records
