"""``relu2dlgn inspect MODEL``: the gate-site table of a model."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from ..capture import default_example_inputs
from ..convert import ConvertOptions, convert
from ..errors import OptionError
from ..options import group, option
from ..zoo import ModelOptions, create_model
from .args import add_config_flag, add_options, resolve


@dataclass
class InspectOptions:
    source: ModelOptions = group(ModelOptions, "the model")
    conversion: ConvertOptions = group(ConvertOptions, "conversion")
    input_size: tuple[int, ...] | None = option(None, "C,H,W of the example input (default: the model's own)")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="print the gate-site table of a model",
                       description="Convert MODEL and print its gate sites (index, kind, module path, op, shape).")
    add_options(p, InspectOptions)
    add_config_flag(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    opts = resolve(InspectOptions, args)
    model = create_model(_required(opts.source.model), checkpoint=opts.source.checkpoint).eval()
    example = (torch.randn(1, *opts.input_size),) if opts.input_size else default_example_inputs(model)
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
