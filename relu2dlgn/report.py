"""What a conversion found: the gate sites, kept nonlinearities, opaque leaves, specialisations, and what each
input must look like. Printing a :class:`ConversionReport` shows the site table."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .sites import GateSite, Nonlinearity


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
    # added in 0.2: class-level defaults, so that reports unpickled from older saves have them
    fixed_arguments: tuple[str, ...] = ()
    verified: str | None = None

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
                "pool_standins": self.pool_standins, "train_differs": self.train_differs,
                "fixed_arguments": list(self.fixed_arguments), "verified": self.verified}

    def __str__(self) -> str:
        lines = [f"relu2dlgn conversion of {self.source}: mode={self.mode} value_input={self.value_input} "
                 f"pool={self.pool} strict={self.strict}",
                 f"{len(self.sites)} gate sites: " + ", ".join(f"{k}={v}" for k, v in self.kind_counts().items())]
        lines.append(site_table(self.sites))
        if self.train_differs:
            lines.append(f"note: the source's forward differs between train() and eval() from module "
                         f"'{self.train_differs}' on; the converted graphs follow eval() in both modes")
        if self.verified:
            lines.append(f"verified: {self.verified}")
        for title, items in (("kept nonlinearities (not gates)", [str(n) for n in self.nonlinear_kept]),
                             ("opaque leaf modules hiding activations", [f"{p}: {r}" for p, r in self.hidden]),
                             ("max-pools replaced by average pooling in both graphs", self.pool_standins),
                             ("shape specialisations (checked at call time)", self.specialised),
                             ("forward arguments fixed at their default", list(self.fixed_arguments))):
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
