"""torch.fx helpers."""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch.fx as fx

F = TypeVar("F", bound=Callable[..., Any])


def fx_leaf(fn: F) -> F:
    """Make ``fn`` a leaf for torch.fx: called with proxies it records one ``call_function`` node instead of
    being traced through (GraphModule unpickling re-traces the generated code, and these bodies branch)."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        for a in args:
            if isinstance(a, fx.Proxy):
                return a.tracer.create_proxy("call_function", wrapper, args, {})
        return fn(*args)

    return wrapper  # type: ignore[return-value]
