"""The converted model: a gating graph, a value graph and the gates between them.

:meth:`DLGN.run` is the one place where the two graphs are run together; ``forward``, the fine-tuning loop,
the teacher, ONNX export and the interpretability instruments all go through it (or through its two halves,
:meth:`DLGN.gates` and :meth:`DLGN.value_forward`, where they need only one of them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from . import serialize
from ._version import __version__
from .errors import InputError, LoadError
from .gates import GateSpec, make_gate
from .report import ConversionReport, InputSpec
from .sites import GateSite
from .types import Mode, Pool, ValueInput


@dataclass
class DLGNOutput:
    """What :meth:`DLGN.run` returns: the model's output (the source model's output structure), the gating
    network's pre-activation at every gate site, and the gates the value network consumed."""

    output: Any
    pre_activations: tuple[torch.Tensor, ...]
    gates: tuple[torch.Tensor, ...]


_FLOAT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.modules.batchnorm._NormBase, nn.LayerNorm,
                 nn.GroupNorm)


class DLGN(nn.Module):
    """A deep (linearly) gated network: ``forward(x) = value(value_input(x), *gates(x))``.

    * ``gating``: ``fx.GraphModule``, input(s) -> tuple of pre-activations ``q_i``, one per gate site;
    * gates: ``make_gate(site_i, q_i)`` — soft (``sigmoid(beta q)`` and its equivalents) in ``train()`` mode,
      hard (``1(q > 0)``, arg-max indices for max-pool) in ``eval()`` mode, or as :meth:`run` is told;
    * ``value``: ``fx.GraphModule``, ``(value input(s), *gates)`` -> the source model's output structure.

    ``value_input="input"`` feeds ``x`` to the value network, ``"ones"`` a tensor of ones shaped like ``x``.
    ``leaf_modules``: the module types / paths the conversion kept opaque; the fine-tuning teacher (the source
    network) is traced with them.

    Example::

        dlgn = relu2dlgn.convert(model)
        out = dlgn.run(x, hard=True)          # DLGNOutput(output, pre_activations, gates)
        out.output, out.pre_activations[3], out.gates[3]
    """

    def __init__(self, gating: fx.GraphModule, value: fx.GraphModule, sites: Sequence[GateSite], *, mode: Mode,
                 value_input: ValueInput, beta: float, pool: Pool, report: ConversionReport,
                 input_specs: Sequence[InputSpec], leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        self.gating = gating
        self.value = value
        self.sites: tuple[GateSite, ...] = tuple(sites)
        self._gate_specs = tuple(s.spec for s in self.sites)
        self.mode = mode
        self.value_input = value_input
        self.pool = pool
        self.report = report
        self.input_specs = list(input_specs)
        self.beta = beta
        self.leaf_modules: tuple[type | str, ...] = tuple(leaf_modules)

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_specs" in state:  # saved by relu2dlgn 0.1 (format version 1)
            state["_gate_specs"] = tuple(state.pop("_specs"))
        state.setdefault("leaf_modules", ())
        super().__setstate__(state)

    # -- configuration -------------------------------------------------------------------------------
    @property
    def beta(self) -> float:
        """Soft-gate sharpness: train-mode gates are ``sigmoid(beta * q)`` (softmax(beta q) for max-pool)."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        value = float(value)
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"beta must be a finite positive number, got {value}")
        self._beta = value

    @property
    def gate_specs(self) -> tuple[GateSpec, ...]:
        """What each site's gate computation needs (kind, hardtanh bounds, pool geometry), in site order."""
        return self._gate_specs

    def _first_tensor(self) -> torch.Tensor | None:
        for t in self.parameters():
            return t
        for t in self.buffers():
            return t
        return None

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (CPU for a model without any)."""
        t = self._first_tensor()
        return t.device if t is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's floating-point parameters (the default dtype for a model without any)."""
        for t in self.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, value_input={self.value_input!r}, pool={self.pool!r}, beta={self.beta}, " \
               f"sites={len(self.sites)}"

    # -- checks ---------------------------------------------------------------------------------------
    def check_inputs(self, inputs: Sequence[Any]) -> None:
        """Raise :class:`InputError` naming the input and what is wrong with it (count, rank, device, dtype: a
        floating-point input of another precision than the model's, or an integer / bool input to a layer that
        needs floating point)."""
        if len(inputs) != len(self.input_specs):
            names = ", ".join(s.name for s in self.input_specs)
            raise InputError(f"{type(self).__name__} expects {len(self.input_specs)} input(s) ({names}), "
                             f"got {len(inputs)}")
        ref = self._first_tensor()
        for i, (x, spec) in enumerate(zip(inputs, self.input_specs)):
            if not isinstance(x, torch.Tensor):
                continue
            if spec.rank is not None and x.dim() != spec.rank:
                example = f" such as {spec.example_shape}" if spec.example_shape else ""
                raise InputError(f"input {i} ('{spec.name}') must have rank {spec.rank} (a batch{example}), "
                                 f"got shape {tuple(x.shape)}")
            if ref is not None:
                if x.device != ref.device:
                    raise InputError(f"input {i} ('{spec.name}') is on {x.device} but the model is on "
                                     f"{ref.device}; move one of them (model.to(device) or x.to(device))")
                dtype = self.dtype
                if not x.is_floating_point() and ref.is_floating_point():
                    reader = self._float_reader(i)
                    if reader is not None:
                        raise InputError(f"input {i} ('{spec.name}') has dtype {x.dtype} but the layer that reads it, "
                                         f"{reader}, needs floating point ({dtype}); convert it (x.to({dtype}))")
                if x.is_floating_point() and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
                    raise InputError(f"input {i} ('{spec.name}') has dtype {x.dtype} but the model's parameters "
                                     f"are {dtype}; convert one of them (x.to({dtype}) or model.to(...))")

    def _float_reader(self, index: int) -> str | None:
        """The first layer reading input ``index`` directly if it needs a floating-point input (convolution,
        linear, normalisation), as ``"path (Type)"``; ``None`` when no such layer reads it (an embedding does)."""
        placeholders = [n for n in self.gating.graph.nodes if n.op == "placeholder"]
        if index >= len(placeholders):
            return None
        todo, seen = list(placeholders[index].users), set()
        while todo:
            node = todo.pop(0)
            if node in seen:
                continue
            seen.add(node)
            if node.op == "call_method" and node.target in ("clone", "contiguous"):
                todo += list(node.users)
            elif node.op == "call_module":
                m = self.gating.get_submodule(str(node.target))
                if isinstance(m, _FLOAT_LAYERS):
                    return f"{node.target} ({type(m).__name__})"
        return None

    # -- running the two graphs ---------------------------------------------------------------------------
    def pre_activations(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The gating network's pre-activation ``q_i`` at every gate site."""
        self.check_inputs(inputs)
        return tuple(self.gating(*inputs))

    def gates_of(self, pre_activations: Sequence[torch.Tensor], *, hard: bool | None = None,
                 beta: float | torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The gates for given pre-activations: hard (``hard=True``, or ``None`` in eval mode) or soft with
        sharpness ``beta`` (default ``self.beta``; a 0-d tensor keeps ``torch.compile`` from recompiling)."""
        hard = (not self.training) if hard is None else hard
        b = self._beta if beta is None else beta
        return tuple(make_gate(spec, q, b, hard) for spec, q in zip(self._gate_specs, pre_activations))

    def gates(self, *inputs: torch.Tensor, hard: bool | None = None,
              beta: float | torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The gates the value network consumes: soft in train mode, hard in eval mode (or as ``hard`` says)."""
        return self.gates_of(self.pre_activations(*inputs), hard=hard, beta=beta)

    def value_inputs(self, *inputs: Any) -> tuple[Any, ...]:
        """``inputs`` themselves, or tensors of ones shaped like them (``value_input="ones"``)."""
        if self.value_input == "ones":
            return tuple(torch.ones_like(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                         for x in inputs)
        return tuple(inputs)

    def value_forward(self, inputs: Sequence[Any], gates: Sequence[torch.Tensor]) -> Any:
        """The value network on the model's inputs (turned into value inputs) with the given gates."""
        return self.value(*self.value_inputs(*inputs), *gates)

    def run(self, *inputs: Any, hard: bool | None = None, beta: float | torch.Tensor | None = None) -> DLGNOutput:
        """Run gating network → gates → value network and return all three.

        ``hard``: ``None`` follows the module's mode (soft gates in ``train()``, hard in ``eval()``); ``True`` /
        ``False`` force hard / soft gates whatever the mode (batch norm still follows the mode).
        ``beta``: soft-gate sharpness for this call (default ``self.beta``).
        """
        qs = self.pre_activations(*inputs)
        gates = self.gates_of(qs, hard=hard, beta=beta)
        return DLGNOutput(self.value_forward(inputs, gates), qs, gates)

    def forward(self, *inputs: Any) -> Any:
        return self.run(*inputs).output

    # -- persistence -----------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The JSON-serialisable description saved next to the weights (format version, options, sites)."""
        return {
            "format_version": serialize.FORMAT_VERSION,
            "relu2dlgn_version": __version__,
            "mode": self.mode, "value_input": self.value_input, "pool": self.pool, "beta": self.beta,
            "training": self.training,
            "inputs": [s.as_dict() for s in self.input_specs],
            "sites": [s.as_dict() for s in self.sites],
            "report": self.report.as_dict(),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Save to directory ``path`` (config.json, model.safetensors, graphs.pt), atomically; see
        :mod:`relu2dlgn.serialize`."""
        serialize.write_model(self, self.config(), path)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DLGN:
    """Load a DLGN saved with :meth:`DLGN.save`. Raises :class:`LoadError` naming the file and the problem."""
    model, config = serialize.read_model(path, map_location)
    graphs = os.path.join(os.fspath(path), serialize.GRAPHS)
    if not isinstance(model, DLGN):
        raise LoadError(f"{graphs}: does not hold a DLGN (found {type(model).__name__})")
    _check_config(model, config, os.path.join(os.fspath(path), serialize.CONFIG), graphs)
    return model


_CONFIG_KEYS = ("mode", "value_input", "pool", "beta", "training", "inputs", "sites")


def _check_config(model: DLGN, config: dict[str, Any], config_path: str, graphs_path: str) -> None:
    """:class:`LoadError` if ``config.json`` says something else than the saved graphs (an edited config: the
    graphs are what runs, so an edit would be silently ignored)."""
    actual = model.config()
    for key in _CONFIG_KEYS:
        if key in config and config[key] != actual[key]:
            shown = lambda v: (repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "...")  # noqa: E731
            raise LoadError(f"{config_path}: {key}={shown(config[key])} disagrees with the saved graphs "
                            f"({graphs_path}: {key}={shown(actual[key])}); the config was edited or damaged after the "
                            f"save. Restore it, or load, set the attribute and save again")

