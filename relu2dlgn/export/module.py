"""The ``nn.Module`` that is exported, the ONNX names of its inputs and outputs, and the checks of what the
ONNX operators can express."""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..dlgn import DLGN
from ..errors import ExportError
from ..gates import make_gate
from ..utils.modes import eval_mode

__all__ = ["ExportModule", "output_names", "unique_names", "check_ceil_mode"]


class ExportModule(nn.Module):
    """``part="fused"``: inputs -> (*outputs, *gates?); ``"gating"``: inputs -> gates;
    ``"value"``: (*inputs, *gates) -> outputs. Hard gates (eval mode) only."""

    def __init__(self, dlgn: DLGN, part: str, gates_output: bool = False):
        super().__init__()
        self.part = part
        self.gates_output = gates_output
        self.num_inputs = len(dlgn.input_specs)
        if part in ("fused", "gating"):
            self.gating = dlgn.gating
        if part in ("fused", "value"):
            self.value = dlgn.value
        self._specs = list(dlgn.gate_specs)
        self._beta = dlgn.beta
        self._value_inputs = dlgn.value_inputs  # a bound method: not registered as a submodule

    def _gates(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        qs = self.gating(*inputs)
        return tuple(make_gate(spec, q, self._beta, True) for spec, q in zip(self._specs, qs))

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.part == "gating":
            return self._gates(args)
        if self.part == "value":
            inputs, gates = args[:self.num_inputs], args[self.num_inputs:]
        else:
            inputs = args
            gates = self._gates(inputs)
        outputs = tuple(pytree.tree_leaves(self.value(*self._value_inputs(*inputs), *gates)))
        if self.part == "fused" and self.gates_output:
            return outputs + gates
        return outputs


def output_names(example_out: Any) -> list[str]:
    leaves = pytree.tree_flatten_with_path(example_out)[0]
    if len(leaves) == 1:
        return ["output"]
    names = []
    for i, (keypath, _) in enumerate(leaves):
        parts = []
        for k in keypath:
            key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", i)))
            parts.append(re.sub(r"\W+", "_", str(key)).strip("_"))
        names.append("_".join(["output", *parts]) if parts else f"output_{i}")
    return names


def unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        else:
            seen[n] = 0
        out.append(n)
    return out



def check_ceil_mode(dlgn: DLGN, examples: tuple) -> None:
    """Refuse max-pool sites whose ``ceil_mode`` window count PyTorch and ONNX compute differently.

    PyTorch drops a last window that would start in the right padding (``(out - 1) * stride >= size +
    padding``); ONNX's ``MaxPool``/``AveragePool`` keep it, so the exported shapes would not match."""
    sites = [s for s in dlgn.sites if s.kind == "maxpool" and s.params["ceil_mode"]]
    if not sites:
        return
    with eval_mode(dlgn), torch.no_grad():
        qs = dlgn.pre_activations(*examples)
    for site in sites:
        geo = site.spec.pool
        for size, k, st, p, d in zip(qs[site.index].shape[2:], geo.kernel_size, geo.stride, geo.padding,
                                     geo.dilation):
            out = -(-(size + 2 * p - d * (k - 1) - 1) // st) + 1
            if (out - 1) * st >= size + p:
                raise ExportError(
                    f"max-pool site {site.index} ({site.op} at module '{site.module_path or '<root>'}'): "
                    f"ceil_mode=True with kernel {k}, stride {st}, padding {p} on a size-{size} axis: PyTorch drops "
                    f"the last window (it would start in the padding), ONNX keeps it, so the exported shapes "
                    f"would differ. Use ceil_mode=False (with explicit padding) in the source model to export.")
