"""What an experiment returns and writes: its protocol, its rows (one value per seed, reported as mean ± std),
the paper's claim and number beside ours, a verdict, and the files (``NAME.json``, ``NAME.md``, ``NAME.png``).

Statistics: ``mean`` is the arithmetic mean over the seeds, ``std`` the sample standard deviation (``n - 1``;
0 for a single seed). Accuracies are fractions in the JSON and percentages in the Markdown.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..utils.fs import atomic_write_text


@dataclass
class Row:
    """One line of an experiment's table: what was measured (``name``), one value per seed (``values``), how it
    was obtained (``note``: what was trained or frozen), the paper's number for it, if there is one, and the
    training runs behind it (``runs``: seed, accuracy, final validation loss, seconds)."""

    name: str
    values: list[float]
    note: str = ""
    paper: str = ""
    unit: str = "accuracy"
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")

    @property
    def std(self) -> float:
        n = len(self.values)
        if n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (n - 1))

    def formatted(self) -> str:
        """``97.33 ± 0.41 %`` (accuracy, several seeds), ``97.33 %`` (one value), ``0.512 ± 0.010`` (others)."""
        if not self.values:
            return "n/a"
        if self.unit == "accuracy":
            text = f"{100 * self.mean:.2f}"
            return (text + (f" ± {100 * self.std:.2f}" if len(self.values) > 1 else "")) + " %"
        text = f"{self.mean:.3f}"
        return text + (f" ± {self.std:.3f}" if len(self.values) > 1 else "")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mean": self.mean, "std": self.std, "values": list(self.values),
                "n": len(self.values), "unit": self.unit, "note": self.note, "paper": self.paper, "runs": self.runs}


@dataclass
class ExperimentResult:
    """An experiment's outcome. ``headline``: our number for the claim in one phrase; ``paper``: the paper's
    number or statement; ``verdict``: whether ours agrees with the claim, and by which criterion."""

    name: str
    claim: str
    reference: str
    protocol: dict[str, Any]
    rows: list[Row]
    headline: str
    paper: str
    verdict: str
    agrees: bool | None
    out: str
    figure: str | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> Row:
        """The row called ``name`` (KeyError if there is none)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return {"experiment": self.name, "claim": self.claim, "reference": self.reference, "paper": self.paper, "headline": self.headline,
                "verdict": self.verdict, "agrees": self.agrees, "protocol": self.protocol,
                "rows": [r.as_dict() for r in self.rows], "figure": self.figure, "seconds": self.seconds,
                "details": self.details}

    def markdown(self, figure_link: str | None = None) -> str:
        """The experiment's table in Markdown: claim, protocol, rows, verdict, figure."""
        lines = [f"## `{self.name}`", "", f"**Claim** ({self.reference}): {self.claim}", "",
                 "**Protocol.** " + "; ".join(f"{k}: {_text(v)}" for k, v in self.protocol.items()), "",
                 "| row | ours | n | paper | how |", "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.name} | {r.formatted()} | {len(r.values)} | {r.paper or ''} | {r.note} |")
        lines += ["", f"**Ours:** {self.headline}. **Paper:** {self.paper}. **Verdict:** {self.verdict} "
                      f"({self.seconds:.0f} s)"]
        link = figure_link if figure_link is not None else (os.path.basename(self.figure) if self.figure else None)
        if link:
            lines += ["", f"![{self.name}]({link})"]
        return "\n".join(lines) + "\n"

    def write(self) -> dict[str, str]:
        """Write ``OUT/NAME.json`` and ``OUT/NAME.md``; returns their paths."""
        os.makedirs(self.out, exist_ok=True)
        paths = {"json": os.path.join(self.out, f"{self.name}.json"), "md": os.path.join(self.out, f"{self.name}.md")}
        atomic_write_text(paths["json"], json.dumps(self.as_dict(), indent=1, default=_jsonable) + "\n")
        atomic_write_text(paths["md"], self.markdown())
        return paths

    def __str__(self) -> str:
        return f"{self.name}: {self.headline} (paper: {self.paper}) -> {self.verdict}"


def _text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)
