"""Command line: ``relu2dlgn inspect | finetune | export``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from .errors import Relu2DlgnError


def _input_size(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-size must look like 3,224,224, got {text!r}") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the gate-site table of a model (index, kind, module path, op, shape for an example input)."""
    from .capture import default_example_inputs
    from .convert import convert
    from .zoo import create_model

    model = create_model(args.model, checkpoint=args.checkpoint).eval()
    if args.input_size:
        example = (torch.randn(1, *args.input_size),)
    else:
        example = default_example_inputs(model)
    dlgn = convert(model, mode=args.mode, example_inputs=example, pool=args.pool, strict=not args.no_strict,
                   value_input=args.value_input)
    print(dlgn.report)
    if example is not None:
        print(f"shape: each site's output for an example input of shape {tuple(example[0].shape)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relu2dlgn", description="Convert ReLU networks into DLGNs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print the gate-site table of a model")
    p.add_argument("model", help="timm:NAME, torchvision:NAME or package.module:factory")
    p.add_argument("--mode", choices=("dlgn", "dgn"), default="dlgn")
    p.add_argument("--pool", choices=("gate", "avg"), default="gate")
    p.add_argument("--value-input", choices=("input", "ones"), default="input")
    p.add_argument("--no-strict", action="store_true", help="keep (and list) nonlinearities that are not gates")
    p.add_argument("--input-size", type=_input_size, default=None, help="C,H,W of the example input")
    p.add_argument("--checkpoint", default=None, help="weights of the source model (.safetensors or .pt)")
    p.set_defaults(func=cmd_inspect)

    from .train import add_finetune_parser
    add_finetune_parser(sub)
    from .cli_export import add_export_parser
    add_export_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Relu2DlgnError as exc:
        print(f"relu2dlgn {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
