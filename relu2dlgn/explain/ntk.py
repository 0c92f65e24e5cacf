"""The value network's tangent kernel (NTK) under fixed gates:

    Theta(x, x') = sum_k < d f_k(x) / d theta, d f_k(x') / d theta >

summed over the output units ``k``, ``theta`` the value network's parameters (all of them, or those named by
``params``), the gates fixed at the eval-mode gating network's hard gates of each example (so ``x`` and ``x'``
each bring their own gates). Per-example Jacobians come from ``torch.func`` (vmap over jacrev, ``chunk``
examples at a time); see :mod:`relu2dlgn.explain.tangent`.

**How it relates to the NPK** (:func:`relu2dlgn.explain.npk`). For a fully-connected value network of ``d``
weight layers without biases, gates that do not depend on the value weights (a DLGN's separate gating
network), and value weights drawn i.i.d. with mean 0 and variance ``sigma^2`` (the NeurIPS 2020 paper's
assumptions, its Theorem 5.1 with Bernoulli +-sigma weights), the expectation over the weights is

    E[Theta(x, x')] = d * sigma^(2(d-1)) * K(x, x')

because the output is ``sum_p x[p.start] A_p(x) prod_{e in p} w_e``: the derivative by one weight keeps the
paths through it, and in the expectation of a product of two such sums only the terms with the *same* path
survive, each with ``sigma^(2(d-1))`` from the other ``d-1`` weights, once per layer. It does **not** hold in
general: after training (weights are no longer independent of the gates or of each other), with weight
sharing (a convolution kernel weight lies on many edges of one path's layer, so different paths share weights
and cross terms survive), with biases (bias paths have fewer weights, so different powers of sigma) or with
batch norm. The NPK depends on the gates only; the NTK also on the weights.

Example::

    theta = explain.ntk(dlgn, x)                       # (n, n)
    theta12 = explain.ntk(dlgn, x, x2)                 # (n, m)
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import InputError
from .common import require_dlgn
from .tangent import per_example_gradients


def ntk(dlgn: Any, x: Tensor, x2: Tensor | None = None, *, params: Sequence[str] | None = None, chunk: int = 16,
        max_bytes: int = 2 ** 31, progress: bool = False) -> Tensor:
    """The tangent kernel ``Theta[i, j]`` of the value network (gates fixed) between ``x[i]`` and ``x2[j]``
    (``x2`` defaults to ``x``), in float64.

    ``params``: parameter-name prefixes of ``dlgn.value`` to differentiate by (default: all). Raises
    :class:`~relu2dlgn.errors.ExplainError` for a model that is not converted and
    :class:`~relu2dlgn.errors.InputError` when the Jacobians would exceed ``max_bytes``.
    """
    dlgn = require_dlgn(dlgn, "ntk")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"ntk: chunk must be a positive integer, got {chunk!r}")
    kw = dict(reduce="jacobian", params=params, chunk=chunk, max_bytes=max_bytes, progress=progress, desc="ntk")
    j1 = per_example_gradients(dlgn, x, **kw).values.to(torch.float64)
    j2 = j1 if x2 is None else per_example_gradients(dlgn, x2, **kw).values.to(torch.float64)
    return torch.einsum("icd,jcd->ij", j1, j2)
