"""``relu2dlgn experiment NAME [MODEL_OR_RUN_DIR] --data digits --out results/NAME``: one of the papers'
experiments on a converted model (``all``: the six, with ``OUT/summary.md``).

MODEL_OR_RUN_DIR is a model spec (``timm:NAME``, ``torchvision:NAME``, ``package.module:factory``; trained here
on the data unless ``--checkpoint`` is given; default: the main job's ``timm:resnet10t``) or the directory of a
``relu2dlgn run`` or ``relu2dlgn finetune`` run: its source network (``config.yaml``'s ``source.model`` with
``source.checkpoint``, or the ``source/model/model.safetensors`` that ``relu2dlgn run`` trained) and its data
options are reused, and ``fixed_gates`` / ``shuffle_gates`` take its fine-tuned DLGN (``model/``) as the learnt
DLGN. ``--quick`` is a smoke budget (one seed, one short epoch).
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from ..experiments import EXPERIMENTS, ExperimentConfig, Setup
from ..experiments.suite import FUNCTIONS, run_all, summary_rows
from ..options import flat_fields, load_file
from .args import add_config_flag, add_options, resolve

SKIP = ("out_dir", "resume", "freeze_gating", "freeze_value", "distill", "keep_checkpoints")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("experiment", help="the papers' experiments on a converted model (table + figure)",
                       description=__doc__.split("\n\n")[0].replace("``", "") if __doc__ else None,
                       epilog=__doc__.split("\n\n", 1)[1].replace("``", "") if __doc__ else None)
    p.add_argument("experiment", choices=list(EXPERIMENTS) + ["all"], help="which experiment ('all': the six)")
    add_options(p, ExperimentConfig, skip=SKIP)
    add_config_flag(p)
    p.set_defaults(func=run)
    return p


def given_options(args: argparse.Namespace) -> set[str]:
    """The option names set on the command line or in ``--config`` (a run directory fills in the others)."""
    names = {leaf.name for leaf in flat_fields(ExperimentConfig) if hasattr(args, leaf.name)}
    if getattr(args, "config", None):
        data = load_file(args.config)
        names |= set(data) | {k for v in data.values() if isinstance(v, dict) for k in v}
    return names


def run(args: argparse.Namespace) -> int:
    cfg = resolve(ExperimentConfig, args, what="experiment option")
    name = args.experiment
    out = cfg.out or os.path.join("results", name)
    setup = Setup(cfg, out, given=given_options(args))
    if name == "all":
        results = run_all(setup=setup)
        for row in summary_rows(results):
            print(f"{row[0]}: {row[3]} | paper: {row[2]} | {row[4]}")
        print(f"summary: {os.path.join(out, 'summary.md')}")
    else:
        result = FUNCTIONS[name](setup=setup)
        print(result.markdown())
        print(f"files: {', '.join(os.path.join(out, name + ext) for ext in ('.json', '.md', '.png'))}")
    return 0
