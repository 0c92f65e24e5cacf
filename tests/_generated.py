"""A hypothesis strategy for random but valid conv nets that mix every gate form the converter supports (and,
with ``plans(ops=True)``, operations from the broad list of _ops.py inserted between them).

A model is a *plan*: a list of steps interpreted by :class:`GenNet.forward` (so torch.fx traces through the
Python loop over it). Steps carry their own modules in ``self.mods`` (an ``nn.ModuleList``); ``planted`` is the
number of gate call sites the plan contains — the independent reference for the site count.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from _ops import OPS

RELU_FORMS = ["module", "module_inplace", "functional", "functional_inplace", "torch", "torch_", "method",
              "method_", "method_unused_", "shared"]
GATES = ["relu", "leaky", "prelu", "relu6", "hardtanh", "maxpool"]


@dataclass
class Plan:
    in_chans: int
    size: int
    steps: list[tuple] = field(default_factory=list)
    tuple_output: bool = False
    planted: int = 0


class GenNet(nn.Module):
    """Interprets a :class:`Plan`. Shapes are tracked while building so every step is valid."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan
        self.mods = nn.ModuleList()
        self.shared_relu = nn.ReLU()
        self.blocks = nn.ModuleList()
        self.index: list[int | None] = []
        c = plan.in_chans
        for step in plan.steps:
            kind = step[0]
            idx = None
            if kind == "conv":
                _, cout, k, stride = step
                self.mods.append(nn.Conv2d(c, cout, k, stride, padding=k // 2))
                c = cout
                idx = len(self.mods) - 1
            elif kind == "bn":
                bn = nn.BatchNorm2d(c)
                g = torch.Generator().manual_seed(len(self.mods))
                with torch.no_grad():
                    bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                    bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
                self.mods.append(bn)
                idx = len(self.mods) - 1
            elif kind == "gate":
                _, gate, form = step[:3]
                mod = {"relu": lambda: nn.ReLU(inplace=form == "module_inplace"),
                       "leaky": lambda: nn.LeakyReLU(0.1, inplace=form == "module_inplace"),
                       "prelu": lambda: nn.PReLU(c if form == "channel" else 1, init=0.2),
                       "relu6": lambda: nn.ReLU6(inplace=form == "module_inplace"),
                       "hardtanh": lambda: nn.Hardtanh(-0.5, 0.8, inplace=form == "module_inplace"),
                       "maxpool": lambda: nn.MaxPool2d(*step[3][:4], ceil_mode=step[3][4])}[gate]()
                self.mods.append(mod)
                idx = len(self.mods) - 1
            elif kind == "loop":
                _, n, cout = step
                block = nn.ModuleList(nn.Sequential(nn.Conv2d(c if i == 0 else cout, cout, 3, padding=1),
                                                    nn.ReLU()) for i in range(n))
                self.blocks.append(block)
                c = cout
                idx = len(self.blocks) - 1
            elif kind == "concat":
                c = c + step[2]
            elif kind == "head":
                self.mods.append(nn.Linear(c, step[1]))
                idx = len(self.mods) - 1
            elif kind == "op" and OPS[step[1]].make is not None:
                self.mods.append(OPS[step[1]].make(c))
                idx = len(self.mods) - 1
            self.index.append(idx)

    def forward(self, x):
        stash: list[torch.Tensor] = []
        feats = None
        for step, idx in zip(self.plan.steps, self.index):
            kind = step[0]
            if kind in ("conv", "bn"):
                x = self.mods[idx](x)
            elif kind == "gate":
                x = _apply_gate(self, step, idx, x)
            elif kind == "avgpool":
                x = F.avg_pool2d(x, 2, ceil_mode=True)
            elif kind == "stash":
                stash.append(x)
            elif kind == "add":
                x = x + stash[step[1]]
            elif kind == "iadd":
                x += stash[step[1]]
            elif kind == "concat":
                x = torch.cat([x, stash[step[1]]], dim=1)
            elif kind == "loop":
                for layer in self.blocks[idx]:
                    x = layer(x)
            elif kind == "scale":
                x = x * step[1] + step[2]
            elif kind == "op":
                x = OPS[step[1]].apply(self.mods[idx] if idx is not None else None, x)
            elif kind == "head":
                feats = x.mean((2, 3))
                x = self.mods[idx](torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if self.plan.tuple_output:
            return x, feats
        return x


def _apply_gate(net: GenNet, step: tuple, idx: int, x: torch.Tensor) -> torch.Tensor:
    gate, form = step[1], step[2]
    mod = net.mods[idx]
    if gate == "relu":
        if form in ("module", "module_inplace"):
            return mod(x)
        if form == "shared":
            return net.shared_relu(x)
        if form == "functional":
            return F.relu(x)
        if form == "functional_inplace":
            return F.relu(x, inplace=True)
        if form == "torch":
            return torch.relu(x)
        if form == "torch_":
            return torch.relu_(x)
        if form == "method":
            return x.relu()
        if form == "method_":
            return x.relu_()
        if form == "method_unused_":
            x.relu_()
            return x
    if gate == "leaky":
        if form.startswith("module"):
            return mod(x)
        return F.leaky_relu_(x, 0.2) if form == "functional_inplace" else F.leaky_relu(x, 0.05)
    if gate == "prelu":
        return mod(x) if form in ("module", "channel") else F.prelu(x, mod.weight)
    if gate == "relu6":
        return mod(x) if form.startswith("module") else F.relu6(x * 3)
    if gate == "hardtanh":
        if form.startswith("module"):
            return mod(x)
        return F.hardtanh_(x, -1.0, 0.5) if form == "functional_inplace" else F.hardtanh(x, -0.3, 1.2)
    if gate == "maxpool":
        return mod(x) if form == "module" else F.max_pool2d(x, *step[3])
    raise AssertionError(step)


@st.composite
def plans(draw, max_steps: int = 14, ops: bool = False) -> Plan:
    """Random valid plans: conv/bn/gates/pools/residual adds (also in place)/concat/loops/tuple outputs; with
    ``ops``, also operations of _ops.OPS (at least one)."""
    in_chans = draw(st.integers(1, 3))
    size = draw(st.integers(6, 14))
    plan = Plan(in_chans, size)
    c, h = in_chans, size
    stash: list[tuple[int, int]] = []
    n = draw(st.integers(2, max_steps))
    for _ in range(n):
        kind = draw(st.sampled_from(["conv", "conv", "bn", "gate", "gate", "gate", "stash", "merge", "loop",
                                     "avgpool", "scale"] + ["op"] * (3 if ops else 0)))
        if kind == "conv":
            cout = draw(st.integers(2, 6))
            k = draw(st.sampled_from([1, 3]))
            stride = draw(st.sampled_from([1, 1, 2])) if h >= 4 else 1
            plan.steps.append(("conv", cout, k, stride))
            c, h = cout, (h + 2 * (k // 2) - k) // stride + 1
        elif kind == "bn":
            plan.steps.append(("bn",))
        elif kind == "gate":
            gate = draw(st.sampled_from(GATES))
            if gate == "relu":
                form = draw(st.sampled_from(RELU_FORMS))
            elif gate == "prelu":
                form = draw(st.sampled_from(["module", "channel", "functional"]))
            elif gate == "maxpool":
                form = draw(st.sampled_from(["module", "functional"]))
            else:
                form = draw(st.sampled_from(["module", "module_inplace", "functional", "functional_inplace"]))
            if gate == "maxpool":
                k = draw(st.integers(1, min(3, h)))
                s = draw(st.integers(1, 2))
                p = draw(st.integers(0, k // 2))
                d = draw(st.integers(1, 2)) if h >= 2 * (k - 1) + 1 + 1 else 1
                ceil = draw(st.booleans())
                if (h + 2 * p - d * (k - 1) - 1) < 0:
                    continue
                geo = (k, s, p, d, ceil)
                num = h + 2 * p - d * (k - 1) - 1
                out = (-(-num // s) if ceil else num // s) + 1
                if ceil and (out - 1) * s >= h + p:
                    out -= 1
                if out < 1:
                    continue
                plan.steps.append(("gate", gate, form, geo))
                h = out
            else:
                plan.steps.append(("gate", gate, form))
            plan.planted += 1
        elif kind == "stash":
            plan.steps.append(("stash",))
            stash.append((c, h))
        elif kind == "merge":
            matches = [i for i, (sc, sh) in enumerate(stash) if sh == h]
            if not matches:
                continue
            i = draw(st.sampled_from(matches))
            sc, _ = stash[i]
            op = draw(st.sampled_from(["add", "iadd", "concat"])) if sc == c else "concat"
            plan.steps.append((op, i) if op != "concat" else ("concat", i, sc))
            if op == "concat":
                c += sc
        elif kind == "loop":
            reps = draw(st.integers(1, 3))
            cout = draw(st.integers(2, 5))
            plan.steps.append(("loop", reps, cout))
            c = cout
            plan.planted += reps
        elif kind == "avgpool":
            if h >= 2:
                plan.steps.append(("avgpool",))
                h = (h + 1) // 2
        elif kind == "scale":
            plan.steps.append(("scale", draw(st.sampled_from([0.5, 2.0, -1.0])), draw(st.sampled_from([0.0, 0.3]))))
        elif kind == "op":
            plan.steps.append(("op", draw(st.sampled_from(sorted(OPS)))))
    if ops and not any(step[0] == "op" for step in plan.steps):
        plan.steps.append(("op", draw(st.sampled_from(sorted(OPS)))))
    if plan.planted == 0:
        plan.steps.append(("gate", "relu", "functional"))
        plan.planted += 1
    plan.steps.append(("head", draw(st.integers(2, 4))))
    plan.tuple_output = draw(st.booleans())
    return plan
