"""Every option of fine-tuning, defined once: small typed groups composed into :class:`FinetuneConfig`.

``finetune(dlgn, ..., lr=3e-3)`` addresses options by their leaf names; ``relu2dlgn finetune --lr 3e-3`` and a
config file (``optim: {lr: 3e-3}`` or top-level ``lr: 3e-3``) set the same field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..errors import OptionError
from ..options import (at_least, flat, fraction, fraction_below_one, from_flat, group, non_negative, option,
                       positive)

Optimizer = Literal["adamw", "sgd"]
BetaSchedule = Literal["constant", "geometric", "linear"]


@dataclass
class OptimOptions:
    """The optimiser and the learning-rate schedule (linear warm-up, then cosine decay to 0)."""

    optimizer: Optimizer = option("adamw", "adamw (fused kernels) or sgd (Nesterov momentum 0.9)")
    lr: float = option(1e-3, "learning rate of both networks", check=positive)
    weight_decay: float = option(0.05, "weight decay of both networks (none on biases and norms)",
                                 check=non_negative)
    gating_lr: float | None = option(None, "learning rate of the gating network (default: lr)", check=positive)
    value_lr: float | None = option(None, "learning rate of the value network (default: lr)", check=positive)
    gating_weight_decay: float | None = option(None, "weight decay of the gating network (default: weight_decay)",
                                               check=non_negative)
    value_weight_decay: float | None = option(None, "weight decay of the value network (default: weight_decay)",
                                              check=non_negative)
    warmup_fraction: float = option(0.05, "share of the steps with a linear learning-rate warm-up",
                                    check=fraction_below_one)
    max_grad_norm: float | None = option(None, "clip the global gradient norm to this (default: no clipping)",
                                         check=positive)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", check=fraction)


@dataclass
class GateOptions:
    """Soft-gate sharpness, frozen networks and batch-norm re-estimation."""

    beta_start: float | None = option(None, "soft-gate sharpness at the first step (default: dlgn.beta)",
                                      check=positive)
    beta_end: float | None = option(None, "soft-gate sharpness at the last step (default: 3x beta_start)",
                                    check=positive)
    beta_schedule: BetaSchedule = option("geometric", "how beta goes from beta_start to beta_end, per step")
    freeze_gating: bool = option(False, "fixed gates: train only the value network (gating weights and batch-norm "
                                        "statistics untouched; the value network sees hard gates)")
    freeze_value: bool = option(False, "train only the gating network")
    recalibrate_bn: int = option(20, "before epoch 1, re-estimate batch-norm statistics with hard gates on this "
                                     "many training batches (0: keep the source's)", check=at_least(0))


@dataclass
class DistillOptions:
    """Distillation from the source network (the teacher): logits and gate agreement."""

    distill: bool | None = option(None, "distil from the teacher (default: on when a teacher is given)")
    kd_weight: float = option(0.5, "weight a of the logit term: (1-a) CE + a T^2 KL", check=fraction)
    temperature: float = option(4.0, "temperature T of the logit term", check=positive)
    gate_weight: float = option(1.0, "weight of the gate-agreement term (0: off)", check=non_negative)


@dataclass
class RuntimeOptions:
    """Where and how the step runs."""

    device: str | None = option(None, "cuda, cuda:1 or cpu (default: CUDA when present)")
    amp: bool | None = option(None, "bf16 autocast (default: on CUDA)")
    channels_last: bool | None = option(None, "channels-last memory format (default: on CUDA for conv nets)")
    compile: bool = option(False, "torch.compile the training step")
    retain_memory: bool | None = option(None, "keep freed memory in the process instead of returning it to the OS "
                                              "after every step (glibc malloc thresholds, for the rest of the "
                                              "process; default: on for CPU jobs)")
    progress: bool = option(True, "progress bars")


@dataclass
class OutputOptions:
    """Files, resuming and seeding."""

    out_dir: str | None = option(None, "directory for metrics.jsonl, checkpoints/ and model/", flags=("--out",))
    resume: bool = option(False, "continue from the newest checkpoint in out_dir")
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep", check=at_least(1))
    seed: int | None = option(0, "seed of torch, random and numpy for a fresh run (each process adds its rank)")
    eval_before: bool = option(True, "evaluate before training and record it as epoch 0")


@dataclass
class FinetuneConfig:
    """Every knob of :class:`~relu2dlgn.training.Trainer`; the defaults are the recommended setting.

    Build one with keywords by leaf name (``FinetuneConfig.from_options(epochs=3, lr=3e-3)``), from a nested
    dictionary or config file (:func:`relu2dlgn.options.from_dict`), or field by field.
    """

    epochs: int = option(5, "training epochs", check=at_least(1))
    logits: int | str | None = option(None, "which output is the logits when the model returns several: its index "
                                            "(tuple output) or key (dict output); default: the output itself, which "
                                            "must then be one tensor", metavar="INDEX|KEY")
    optim: OptimOptions = group(OptimOptions, "optimiser and learning-rate schedule")
    gates: GateOptions = group(GateOptions, "soft gates, frozen networks, batch-norm re-estimation")
    distillation: DistillOptions = group(DistillOptions, "distillation from the source network")
    runtime: RuntimeOptions = group(RuntimeOptions, "device, precision, compilation, progress bars")
    output: OutputOptions = group(OutputOptions, "files, resume, seed")

    @classmethod
    def from_options(cls, base: "FinetuneConfig | None" = None, **options: Any) -> "FinetuneConfig":
        """A validated config with the given options (by leaf name) set on ``base`` or the defaults."""
        return from_flat(cls, base, what="finetune option", **options)

    def as_flat(self) -> dict[str, Any]:
        """``{leaf option name: value}``."""
        return flat(self)

    def check(self) -> None:
        """Rules between options (each option's own range is checked by :func:`relu2dlgn.options.validate`)."""
        if self.gates.freeze_gating and self.gates.freeze_value:
            raise OptionError("finetune option freeze_value=True: cannot freeze both the gating and the value "
                              "network (nothing would train)")
        if self.output.resume and not self.output.out_dir:
            raise OptionError("finetune option resume=True needs out_dir (where the checkpoints are)")
