"""The ``nn.Module`` that is exported, the ONNX names of its inputs and outputs, and the checks of what the
ONNX operators can express."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..dlgn import DLGN
from ..errors import ExportError
from ..utils.modes import eval_mode

__all__ = ["PARTS", "ExportModule", "output_names", "unique_names", "check_ceil_mode"]


PARTS = ("fused", "gating", "value")


class ExportModule(nn.Module):
    """What is exported, hard gates only, through the DLGN's own path (:meth:`DLGN.run` and its two halves):

    * ``part="fused"``: inputs -> (*outputs, *gates if ``gates_output``);
    * ``"gating"``: inputs -> gates;
    * ``"value"``: (*inputs, *gates) -> outputs.

    Outputs are the leaves of the source model's output structure, in ``pytree`` order."""

    def __init__(self, dlgn: DLGN, part: str, gates_output: bool = False):
        super().__init__()
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.part = part
        self.gates_output = gates_output
        self.num_inputs = len(dlgn.input_specs)
        # Registered: the graphs this part runs, under their names in the DLGN, so that the ONNX initialisers keep
        # the DLGN's parameter names (gating.conv1.weight, ...) and a gating file lifts no value weights. The DLGN
        # itself stays outside the module tree (object.__setattr__): it is only called, and its graphs are these.
        if part in ("fused", "gating"):
            self.gating = dlgn.gating
        if part in ("fused", "value"):
            self.value = dlgn.value
        object.__setattr__(self, "dlgn", dlgn)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.part == "gating":
            return self.dlgn.gates(*args, hard=True)
        if self.part == "value":
            inputs, gates = args[:self.num_inputs], args[self.num_inputs:]
            return tuple(pytree.tree_leaves(self.dlgn.value_forward(inputs, gates)))
        run = self.dlgn.run(*args, hard=True)
        outputs = tuple(pytree.tree_leaves(run.output))
        return outputs + run.gates if self.gates_output else outputs


def output_names(example_out: Any) -> list[str]:
    """ONNX names of the model's output leaves: ``output`` for a single one, else ``output_<key path>``."""
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
    """``names`` with repeats suffixed ``_1``, ``_2``, ... (ONNX input names must be unique)."""
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
