"""Running code as plain Python when ``torch.compile`` traces its caller.

Some steps must not be traced by Dynamo: a seeded ``torch.Generator`` cannot be
created in a graph, and (torch 2.13) an attribute assigned to a
``torch.optim.Optimizer`` inside a traced frame is never written back to the real
object. :func:`eager_only` runs such a function eagerly under ``torch.compile``
(one graph break at the call) and costs one flag check otherwise. It does not import
``torch._dynamo`` (about 2 s) unless a compilation is already running.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

__all__ = ["eager_only"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def eager_only(*, recursive: bool = True) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorator: the function runs as plain Python even inside ``torch.compile``.

    Outside a compilation the function is called directly. While Dynamo traces a
    caller, the call becomes a graph break and the function runs eagerly (with
    ``recursive=False`` only its own frame is left untraced; Dynamo may still
    compile the functions it calls).

    Args:
        recursive: also leave untraced every function the decorated one calls.
    """

    def decorate(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(fn)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            if torch.compiler.is_compiling():
                disabled: Callable[_P, _R] = torch.compiler.disable(fn, recursive=recursive)
                return disabled(*args, **kwargs)
            return fn(*args, **kwargs)

        return wrapper

    return decorate
