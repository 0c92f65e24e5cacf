"""The options of the papers' experiments (``relu2dlgn experiment NAME``), composed from the existing groups:
the source network and how it is trained (the main job's), the data, and every training run (fine-tuning's
options, with the experiments' own defaults), plus the experiments' budget.

Every training run of every experiment uses ``training`` (optimiser, learning rate, schedule, beta, device,
...) with ``epochs`` epochs; the experiments themselves set what they vary (frozen networks, distillation, seed,
output files), so those options are refused here. ``--quick`` is the smoke budget: one seed, one short epoch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from ..data import DataOptions
from ..errors import OptionError
from ..options import at_least, group, option
from ..pipeline.config import DEFAULT_MODEL, SourceTraining
from ..training.config import FinetuneConfig, OptimOptions
from ..zoo import ModelOptions

ExperimentName = Literal["fixed_gates", "random_gates", "constant_input", "shuffle_gates", "dlgn_vs_dnn",
                         "npk_vs_training"]
EXPERIMENTS: tuple[str, ...] = get_args(ExperimentName)

# what --quick sets (one seed, one short epoch, a small kernel)
QUICK = {"seeds": 1, "epochs": 1, "source_epochs": 1, "train_examples": 256, "npk_examples": 32}

# options the experiments set themselves, per run
_SET_BY_EXPERIMENTS = ("out_dir", "resume", "freeze_gating", "freeze_value", "distill", "keep_checkpoints")


@dataclass
class ExperimentConfig:
    """Everything the experiments need: which source network, which data, the budget of every training run.

    ``model`` is a model spec (``timm:NAME``, ...; trained here on the data unless ``checkpoint`` is given) or
    the directory of a ``relu2dlgn run`` / ``relu2dlgn finetune`` run (its source network and data options are
    reused, and its fine-tuned DLGN where an experiment needs one).
    """

    out: str | None = option(None, "output directory (default results/<experiment>)")
    seeds: int = option(3, "independent runs of every trained row (mean ± std over them); run k uses seed + k",
                        check=at_least(1))
    train_examples: int | None = option(None, "train on the first N training examples only (default: all)",
                                        check=at_least(1))
    npk_examples: int = option(128, "validation examples in each NPK of npk_vs_training (kernel classifier: fitted "
                                   "on the even-indexed half, scored on the odd-indexed half)", check=at_least(4))
    shuffle_sites: str | None = option(None, "shuffle_gates: comma-separated site indices shuffled together across "
                                             "examples (default: all sites)", metavar="I,J,K")
    threads: int | None = option(None, "torch intra-op threads of the process (default: 1 when training on the CPU "
                                       "— small models, shared cores; torch's own on a GPU)", check=at_least(1))
    quick: bool = option(False, "smoke budget: 1 seed, 1 epoch on 256 training examples, 1 source epoch, "
                                "32-example kernels (overrides those options)")
    source: ModelOptions = group(ModelOptions, "the source network: a model spec, or a run directory",
                                 model=DEFAULT_MODEL)
    source_training: SourceTraining = group(SourceTraining, "training the source (without --checkpoint)")
    dataset: DataOptions = group(DataOptions, "the data (default for a run directory: the run's)", batch_size=64)
    training: FinetuneConfig = group(FinetuneConfig, "every training run of the experiments", epochs=2,
                                     optim=OptimOptions(lr=2e-3))

    def check(self) -> None:
        t = self.training
        set_here = {"out_dir": t.output.out_dir is not None, "resume": t.output.resume,
                    "freeze_gating": t.gates.freeze_gating, "freeze_value": t.gates.freeze_value,
                    "distill": t.distillation.distill is not None, "keep_checkpoints": t.output.keep_checkpoints != 2}
        given = [name for name in _SET_BY_EXPERIMENTS if set_here[name]]
        if given:
            raise OptionError(f"experiment option(s) {', '.join(given)}: the experiments set these themselves per "
                              f"run (see each experiment's protocol); use --out for the output directory")
        if self.shuffle_sites is not None:
            site_list(self.shuffle_sites)

    @property
    def base_seed(self) -> int:
        return self.training.output.seed or 0

    def seed_list(self) -> list[int]:
        """The seeds of the runs of every trained row: ``seed, seed + 1, ...``."""
        return [self.base_seed + k for k in range(self.seeds)]

    def effective(self) -> "ExperimentConfig":
        """The config with ``quick``'s smoke budget applied (itself when ``quick`` is off)."""
        if not self.quick:
            return self
        training = dataclasses.replace(self.training, epochs=QUICK["epochs"])
        source_training = dataclasses.replace(self.source_training, source_epochs=QUICK["source_epochs"])
        return dataclasses.replace(self, seeds=QUICK["seeds"], train_examples=QUICK["train_examples"],
                                   npk_examples=min(self.npk_examples, QUICK["npk_examples"]), training=training,
                                   source_training=source_training)


def site_list(text: str) -> list[int]:
    """``"0,3,5"`` → ``[0, 3, 5]``; :class:`OptionError` for anything else."""
    try:
        sites = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise OptionError(f"option shuffle_sites={text!r}: expected site indices like 0,3,5") from None
    if not sites:
        raise OptionError(f"option shuffle_sites={text!r}: names no site")
    return sites
