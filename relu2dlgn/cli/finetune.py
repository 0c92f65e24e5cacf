"""``relu2dlgn finetune MODEL --data SPEC ...``: convert a model and fine-tune the DLGN (torchrun: DDP)."""
from __future__ import annotations

import argparse
from typing import Any

from ..training.job import CONFIG_FILE, FinetuneJob, run_finetune_job
from .args import add_command, resolve


def add_parser(sub: Any) -> argparse.ArgumentParser:
    return add_command(
        sub, "finetune", FinetuneJob, run, help="convert a model and fine-tune the DLGN on a dataset",
        description=f"Convert MODEL into a DLGN and fine-tune it; the resolved options are written to "
                    f"OUT/{CONFIG_FILE} (--config OUT/{CONFIG_FILE} repeats the run). Several GPUs: "
                    f"torchrun --nproc_per_node=N -m relu2dlgn.cli finetune ...")


def run(args: argparse.Namespace) -> int:
    result = run_finetune_job(resolve(FinetuneJob, args))
    print(result.summary)
    return 0
