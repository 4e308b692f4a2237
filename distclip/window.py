"""A fixed-size ring buffer of past global norms, held on the gradients' device.

The window changes only through :meth:`NormWindow.push_`, which takes a globally
reduced norm and a globally decided ``accept`` flag, so it is identical on every rank
by construction. Nothing here reads a value back to the host.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distclip._checks import is_int, refuse_meta
from distclip.functional.quantile import QuantileTable, quantile_table, sorted_prefix_quantile

__all__ = ["COUNT_DTYPES", "NormWindow"]

#: dtypes a saved count may have (``bool`` is not a count).
COUNT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class NormWindow:
    """The last ``size`` accepted norms, oldest overwritten first.

    State: ``values`` (``size`` entries; the first ``min(num_seen, size)`` are valid,
    the others ``+inf``) and ``num_seen`` (0-dim int64: norms accepted so far). The next
    norm goes to position ``num_seen % size``. Both live on ``device``; ``values`` has
    ``dtype`` (the dtype of the norms: float32, or float64 where norms are float64).

    ``values`` is a view of a buffer one entry longer: a rejected norm is written to
    that last entry instead of being selected away (one op fewer per step), and it
    takes no part in the quantile.
    """

    def __init__(
        self, size: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        if not is_int(size):
            raise TypeError(f"window size must be an integer >= 1, got {size!r}")
        if size < 1:
            raise ValueError(f"window size must be an integer >= 1, got {size!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"window dtype must be a floating-point dtype, got {dtype}")
        self.size = size
        self._set_buffer(torch.full((size + 1,), float("inf"), dtype=dtype, device=device))
        self.num_seen = torch.zeros((), dtype=torch.long, device=device)
        self._tables: dict[float, QuantileTable] = {}
        #: Where a rejected norm goes: the buffer's last entry, outside ``values``.
        self._discard = torch.full((), size, dtype=torch.long, device=device)

    def _set_buffer(self, buffer: Tensor) -> None:
        self._buffer = buffer
        # One view made here, not one per step.
        self._values = buffer[: self.size]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_values"]  # a view of the buffer: made again, never copied apart from it
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._set_buffer(self._buffer)

    @property
    def values(self) -> Tensor:
        """The ``size`` window entries (a live view): valid ones first, then ``+inf``."""
        return self._values

    def push_(self, norm: Tensor, accept: Tensor) -> None:
        """Append the 0-dim ``norm`` where the 0-dim bool ``accept`` is true.

        A rejected norm leaves the window exactly as it was (same values, same
        count). No host synchronisation: the position is a device tensor.
        """
        position = torch.where(accept, torch.remainder(self.num_seen, self.size), self._discard)
        self._buffer.index_put_((position,), norm.to(self._buffer.device, self._buffer.dtype))
        self.num_seen.add_(accept.to(self.num_seen.device))

    def num_valid(self) -> Tensor:
        """``min(num_seen, size)`` as a 0-dim tensor."""
        return self.num_seen.clamp(max=self.size)

    def quantile(self, q: float) -> Tensor:
        """q-quantile (linear interpolation) of the valid entries; ``+inf`` if none.

        The interpolation table of ``q`` is made on the device at the first call.
        """
        table = self._tables.get(q)
        if table is None:
            table = quantile_table(
                self.size, q, dtype=self._buffer.dtype, device=self._buffer.device
            )
            self._tables[q] = table
        return sorted_prefix_quantile(self._values.sort().values, self.num_valid(), table)

    def chronological(self) -> Tensor:
        """The valid entries, oldest first (synchronises: for tests and logging)."""
        num_seen = int(self.num_seen)
        if num_seen <= self.size:
            return self.values[:num_seen].clone()
        return torch.roll(self.values, -(num_seen % self.size)).clone()

    def reset(self) -> None:
        """Forget every norm (the tensors stay allocated on their device)."""
        self._buffer.fill_(float("inf"))
        self.num_seen.zero_()

    def state_dict(self) -> dict[str, Any]:
        """``{"size": int, "values": Tensor, "num_seen": Tensor}`` (live tensors)."""
        return {"size": self.size, "values": self.values, "num_seen": self.num_seen}

    def validate_state_dict(self, state: Any) -> None:
        """Raise ``TypeError``/``ValueError`` if ``state`` cannot be loaded into this window.

        Checks the type of ``state``, the saved size against this window's, the shape,
        dtype and device of both tensors, ``num_seen >= 0``, and that every valid entry
        is finite in this window's dtype. Reads the tensors on the host (a load is not
        on the hot path).
        """
        if not isinstance(state, dict):
            raise TypeError(f"a window state must be a dict, got {type(state).__name__}")
        missing = [key for key in ("size", "values", "num_seen") if key not in state]
        if missing:
            raise ValueError(
                f"the window state misses {', '.join(map(repr, missing))}; it needs 'size', "
                "'values' and 'num_seen' (as NormWindow.state_dict() writes them)"
            )
        size = state["size"]
        if not is_int(size):
            raise ValueError(f"the saved window 'size' must be an int >= 1, got {size!r}")
        if size != self.size:
            raise ValueError(
                f"the saved window holds {size} norms but this clipper's window is "
                f"{self.size}; build the clipper with window={size} to resume from it"
            )
        values, num_seen = state["values"], state["num_seen"]
        if (
            not isinstance(values, Tensor)
            or tuple(values.shape) != (self.size,)
            or not values.is_floating_point()
        ):
            described = (
                f"a {values.dtype} tensor of shape {tuple(values.shape)}"
                if isinstance(values, Tensor)
                else type(values).__name__
            )
            raise ValueError(
                f"window 'values' must be a floating-point tensor of shape ({self.size},), "
                f"got {described}"
            )
        if not isinstance(num_seen, Tensor) or tuple(num_seen.shape) != ():
            raise ValueError(
                f"window 'num_seen' must be a 0-dim integer tensor >= 0, got {num_seen!r:.80}"
            )
        if num_seen.dtype not in COUNT_DTYPES:
            raise ValueError(
                f"window 'num_seen' must be a 0-dim integer tensor >= 0, got dtype {num_seen.dtype}"
            )
        for name, tensor in (("values", values), ("num_seen", num_seen)):
            refuse_meta(f"window {name!r}", tensor, "; load a checkpoint with real tensors")
        seen = int(num_seen)
        if seen < 0:
            raise ValueError(f"window 'num_seen' must be a 0-dim integer tensor >= 0, got {seen}")
        valid = values[: min(seen, self.size)].to(self.values.dtype)
        if not bool(torch.isfinite(valid).all()):
            raise ValueError(
                "window 'values' holds a NaN or inf among its valid entries (in "
                f"{self.values.dtype}); a window only ever holds finite norms"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (validated first; nothing changes on error).

        The tensors are copied onto this window's device and dtype (a floating-point
        state of another precision is cast, as ``torch.optim.Optimizer.load_state_dict``
        casts floating-point state to the parameter's dtype). Entries past the valid
        ones are set to ``+inf`` whatever the checkpoint holds there.
        """
        self.validate_state_dict(state)
        buffer = torch.full_like(self._buffer, float("inf"))
        num_valid = min(int(state["num_seen"]), self.size)
        buffer[:num_valid] = state["values"].detach()[:num_valid].to(buffer.device, buffer.dtype)
        num_seen = state["num_seen"].detach().to(buffer.device, torch.long, copy=True)
        self._set_buffer(buffer)
        self.num_seen = num_seen
