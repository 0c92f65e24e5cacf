"""``relu2dlgn inspect MODEL``: the gate-site table of a model."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from ..capture import default_example_inputs
from ..convert import ConvertOptions, convert
from ..errors import OptionError
from ..options import group, option, positive_sizes
from ..zoo import ModelOptions, create_model
from .args import add_command, check_example_runs, resolve


@dataclass
class InspectOptions:
    source: ModelOptions = group(ModelOptions, "the model")
    conversion: ConvertOptions = group(ConvertOptions, "conversion")
    input_size: tuple[int, ...] | None = option(None, "C,H,W of the example input (default: the model's own)",
                                                check=positive_sizes)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    return add_command(sub, "inspect", InspectOptions, run, help="print the gate-site table of a model",
                       description="Convert MODEL and print its gate sites (index, kind, module path, op, shape).")


def run(args: argparse.Namespace) -> int:
    opts = resolve(InspectOptions, args)
    model = create_model(_required(opts.source.model), checkpoint=opts.source.checkpoint).eval()
    example = (torch.randn(1, *opts.input_size),) if opts.input_size else default_example_inputs(model)
    if opts.input_size:
        check_example_runs(model, example, opts.input_size)
    c = opts.conversion
    dlgn = convert(model, mode=c.mode, example_inputs=example, pool=c.pool, strict=c.strict,
                   value_input=c.value_input, beta=c.beta, verify=c.verify)
    print(dlgn.report)
    if example is not None:
        print(f"shape: each site's output for an example input of shape {tuple(example[0].shape)}")
    return 0


def _required(model: str | None) -> str:
    if not model:
        raise OptionError("a model is required: MODEL on the command line, or 'model' in the config file")
    return model
