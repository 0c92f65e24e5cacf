"""The converted model: a gating graph, a value graph and the gates between them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import InputError
from .gates import make_gate
from .sites import GateSite, Nonlinearity

MODES = ("dlgn", "dgn")
VALUE_INPUTS = ("input", "ones")
POOLS = ("gate", "avg")


@dataclass
class InputSpec:
    """What the converted model expects of one input (checked at call time)."""

    name: str
    rank: int | None
    example_shape: tuple[int, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rank": self.rank,
                "example_shape": list(self.example_shape) if self.example_shape else None}


@dataclass
class ConversionReport:
    """What the conversion found, kept, refused or specialised."""

    mode: str
    value_input: str
    pool: str
    strict: bool
    source: str
    sites: list[GateSite] = field(default_factory=list)
    nonlinear_kept: list[Nonlinearity] = field(default_factory=list)
    hidden: list[tuple[str, str]] = field(default_factory=list)
    specialised: list[str] = field(default_factory=list)
    pool_standins: list[str] = field(default_factory=list)
    train_differs: str | None = None

    def kind_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.sites:
            counts[s.kind] = counts.get(s.kind, 0) + 1
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "value_input": self.value_input, "pool": self.pool, "strict": self.strict,
                "source": self.source, "num_sites": len(self.sites), "kinds": self.kind_counts(),
                "nonlinear_kept": [str(n) for n in self.nonlinear_kept],
                "hidden": [f"{p}: {r}" for p, r in self.hidden], "specialised": self.specialised,
                "pool_standins": self.pool_standins, "train_differs": self.train_differs}

    def __str__(self) -> str:
        lines = [f"relu2dlgn conversion of {self.source}: mode={self.mode} value_input={self.value_input} "
                 f"pool={self.pool} strict={self.strict}",
                 f"{len(self.sites)} gate sites: " + ", ".join(f"{k}={v}" for k, v in self.kind_counts().items())]
        lines.append(site_table(self.sites))
        if self.train_differs:
            lines.append(f"note: the source's forward differs between train() and eval() from module "
                         f"'{self.train_differs}' on; the converted graphs follow eval() in both modes")
        for title, items in (("kept nonlinearities (not gates)", [str(n) for n in self.nonlinear_kept]),
                             ("opaque leaf modules hiding activations", [f"{p}: {r}" for p, r in self.hidden]),
                             ("max-pools replaced by average pooling in both graphs", self.pool_standins),
                             ("shape specialisations (checked at call time)", self.specialised)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  - {i}" for i in items]
        return "\n".join(lines)


def site_table(sites: Sequence[GateSite]) -> str:
    """A fixed-width table of gate sites: index, kind, module path, op, in-place, shape."""
    header = ("idx", "kind", "module path", "op", "node", "shape")
    rows = [(str(s.index), s.kind, s.module_path or "<root>", s.op + (" [in-place]" if s.inplace else ""),
             s.node, "x".join(map(str, s.shape)) if s.shape else "-") for s in sites]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


class DLGN(nn.Module):
    """A deep (linearly) gated network: ``forward(x) = value(value_input(x), *gates(x))``.

    * ``gating``: ``fx.GraphModule``, input(s) -> tuple of pre-activations ``q_i``, one per gate site;
    * ``gates(x)``: ``make_gate(site_i, q_i)`` — soft (``sigmoid(beta q)`` and its equivalents) in
      ``train()`` mode, hard (``1(q > 0)``, arg-max indices for max-pool) in ``eval()`` mode;
    * ``value``: ``fx.GraphModule``, ``(value input(s), *gates)`` -> the source model's output structure.

    ``value_input="input"`` feeds ``x`` to the value network, ``"ones"`` a tensor of ones shaped like ``x``.
    """

    def __init__(self, gating: fx.GraphModule, value: fx.GraphModule, sites: Sequence[GateSite], *, mode: str,
                 value_input: str, beta: float, pool: str, report: ConversionReport,
                 input_specs: Sequence[InputSpec]):
        super().__init__()
        self.gating = gating
        self.value = value
        self.sites: tuple[GateSite, ...] = tuple(sites)
        self._specs = [s.spec for s in self.sites]
        self.mode = mode
        self.value_input = value_input
        self.pool = pool
        self.report = report
        self.input_specs = list(input_specs)
        self.beta = beta

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

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, value_input={self.value_input!r}, pool={self.pool!r}, beta={self.beta}, " \
               f"sites={len(self.sites)}"

    # -- checks ---------------------------------------------------------------------------------------
    def _reference_tensor(self) -> torch.Tensor | None:
        for t in self.gating.parameters():
            return t
        for t in self.value.parameters():
            return t
        return None

    def check_inputs(self, inputs: Sequence[Any]) -> None:
        """Raise :class:`InputError` naming the input and what is wrong with it."""
        if len(inputs) != len(self.input_specs):
            names = ", ".join(s.name for s in self.input_specs)
            raise InputError(f"{type(self).__name__} expects {len(self.input_specs)} input(s) ({names}), "
                             f"got {len(inputs)}")
        ref = self._reference_tensor()
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
                if x.is_floating_point() and x.dtype != ref.dtype and not torch.is_autocast_enabled(x.device.type):
                    raise InputError(f"input {i} ('{spec.name}') has dtype {x.dtype} but the model's parameters "
                                     f"are {ref.dtype}; convert one of them (x.to({ref.dtype}) or model.to(...))")

    # -- forward ---------------------------------------------------------------------------------------
    def pre_activations(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The gating network's pre-activation ``q_i`` at every gate site."""
        self.check_inputs(inputs)
        return tuple(self.gating(*inputs))

    def gates(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The gates the value network consumes: soft in train mode, hard in eval mode."""
        hard = not self.training
        qs = self.pre_activations(*inputs)
        return tuple(make_gate(spec, q, self._beta, hard) for spec, q in zip(self._specs, qs))

    def value_inputs(self, *inputs: Any) -> tuple[Any, ...]:
        """``inputs`` themselves, or tensors of ones shaped like them (``value_input="ones"``)."""
        if self.value_input == "ones":
            return tuple(torch.ones_like(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                         for x in inputs)
        return tuple(inputs)

    def forward(self, *inputs: Any) -> Any:
        gates = self.gates(*inputs)
        return self.value(*self.value_inputs(*inputs), *gates)

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Save to directory ``path`` (config.json, model.safetensors, graphs.pt), atomically."""
        from .serialize import save
        save(self, path)
