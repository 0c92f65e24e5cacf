"""Closed sets of option values, as ``Literal`` types (and their members, for validation and CLI choices)."""
from __future__ import annotations

from typing import Literal, get_args

GateKind = Literal["relu", "leaky_relu", "prelu", "hardtanh", "maxpool"]
"""What a gate site is: the ReLU family, LeakyReLU, PReLU, Hardtanh/ReLU6, or max-pooling."""

Mode = Literal["dlgn", "dgn"]
"""``"dlgn"``: the gating network is a deep linear network; ``"dgn"``: it is the source network itself."""

ValueInput = Literal["input", "ones"]
"""What the value network is fed: the input itself, or a tensor of ones shaped like it."""

Pool = Literal["gate", "avg"]
"""DLGN max-pooling: a gate (arg max of the gating net's pre-pool tensor), or average pooling in both nets."""

GATE_KINDS: tuple[str, ...] = get_args(GateKind)
MODES: tuple[str, ...] = get_args(Mode)
VALUE_INPUTS: tuple[str, ...] = get_args(ValueInput)
POOLS: tuple[str, ...] = get_args(Pool)
