"""What the trainer trains: a :class:`Student` adapts a DLGN (gates, soft/hard, beta, two networks) or a plain
classifier (the ReLU source network itself) to the one training loop.

The loop never asks which it has: it calls :meth:`Student.forward` for a step (soft gates) and for evaluation
(hard gates), takes the trainable networks from :attr:`Student.networks`, anneals :attr:`Student.beta` when
there is one, and saves with :meth:`Student.save`.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..dlgn import DLGN
from ..errors import InputError
from ..gates import GateSpec
from ..sites import GateSite
from ..utils.fs import atomic_dir


class Student:
    """The common interface (see the module docstring); :func:`as_student` picks the implementation."""

    module: nn.Module
    sites: tuple[GateSite, ...] = ()
    gate_specs: tuple[GateSpec, ...] = ()

    @property
    def networks(self) -> dict[str, nn.Module]:
        """The trainable parts by name (parameter groups, freezing and batch-norm re-estimation use them)."""
        raise NotImplementedError

    @property
    def beta(self) -> float | None:
        """Soft-gate sharpness, or ``None`` for a network without gates."""
        return None

    @beta.setter
    def beta(self, value: float) -> None:
        raise InputError(f"{type(self.module).__name__} has no gates, so no beta")

    def forward(self, inputs: Sequence[Any], *, hard: bool, beta: torch.Tensor | float | None = None
                ) -> tuple[Any, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """``(output, pre-activations, gates)``; soft gates with ``beta`` unless ``hard``."""
        raise NotImplementedError

    def save(self, path: str) -> None:
        """Save the trained network to directory ``path`` (atomically)."""
        raise NotImplementedError


class DLGNStudent(Student):
    """A DLGN: ``gating`` and ``value`` networks, soft gates in training, hard gates in evaluation."""

    def __init__(self, dlgn: DLGN):
        self.module = dlgn
        self.sites = dlgn.sites
        self.gate_specs = dlgn.gate_specs

    @property
    def networks(self) -> dict[str, nn.Module]:
        return {"gating": self.module.gating, "value": self.module.value}

    @property
    def beta(self) -> float | None:
        return self.module.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.module.beta = value

    def forward(self, inputs: Sequence[Any], *, hard: bool, beta: torch.Tensor | float | None = None
                ) -> tuple[Any, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        r = self.module.run(*inputs, hard=hard, beta=beta)
        return r.output, r.pre_activations, r.gates

    def save(self, path: str) -> None:
        self.module.save(path)


class ClassifierStudent(Student):
    """A plain classifier (e.g. the ReLU source network before conversion): one network, no gates. Saved as
    ``PATH/model.safetensors`` (its ``state_dict``), loadable with ``relu2dlgn.zoo.load_weights``."""

    WEIGHTS = "model.safetensors"

    def __init__(self, model: nn.Module):
        self.module = model

    @property
    def networks(self) -> dict[str, nn.Module]:
        return {"model": self.module}

    def forward(self, inputs: Sequence[Any], *, hard: bool, beta: torch.Tensor | float | None = None
                ) -> tuple[Any, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        return self.module(*inputs), (), ()

    def save(self, path: str) -> None:
        from safetensors.torch import save_model

        with atomic_dir(path) as tmp:
            save_model(self.module, os.path.join(tmp, self.WEIGHTS))


def as_student(model: nn.Module | Student) -> Student:
    """A :class:`Student` for a DLGN or a plain ``nn.Module`` classifier."""
    if isinstance(model, Student):
        return model
    if isinstance(model, DLGN):
        return DLGNStudent(model)
    if isinstance(model, nn.Module):
        return ClassifierStudent(model)
    raise InputError(f"the trainer trains a relu2dlgn.DLGN or an nn.Module classifier, got {type(model).__name__}")


def trainable(networks: Iterable[nn.Module]) -> list[nn.Parameter]:
    return [p for net in networks for p in net.parameters() if p.requires_grad]


class StepModule(nn.Module):
    """What DistributedDataParallel wraps: one forward of the DLGN returning (output, pre-activations, gates).

    ``beta``: under torch.compile a 0-d tensor, not the Python float ``dlgn.beta``, so that it does not recompile
    every time the schedule changes it; eager, the float (the soft max-pool gate then scales ``q`` inside its
    window buffer). With frozen gating the gates are hard (the gating network is in eval mode and has no trainable
    parameter)."""

    def __init__(self, student: Student, frozen_gating: bool):
        super().__init__()
        self.model = student.module  # registered, so that DDP sees the parameters
        self.student = student
        self.frozen_gating = frozen_gating

    def forward(self, beta: torch.Tensor | float, *inputs: Any
                ) -> tuple[Any, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        return self.student.forward(inputs, hard=self.frozen_gating, beta=beta)
