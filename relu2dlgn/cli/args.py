"""Command-line flags generated from option dataclasses, ``--config FILE``, and shape arguments.

Every flag comes from one :func:`relu2dlgn.options.option` field: its name (``lr`` → ``--lr``, unless the
field names its ``flags``), type (``Literal`` → ``choices``; ``bool`` → ``--x/--no-x``; ``tuple[int, ...]`` →
``3,224,224``; ``int | str`` → an integer if the text is one), default and help. Precedence when resolving: the
field's default < ``--config FILE`` < a flag given on the command line.
"""
from __future__ import annotations

import argparse
import types
from typing import Any, TypeVar, Union, get_args, get_origin

import torch
from torch import nn

from .. import options as O
from ..errors import InputError, Relu2DlgnError

T = TypeVar("T")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` or ``"3x224x224"`` → ``(3, 224, 224)``; every size a positive integer."""
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3,224,224, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive sizes like 3,224,224, got {text!r}")
    return dims


def int_or_str(text: str) -> int | str:
    """``"1"`` → ``1`` (an index), anything else as is (a key): the type of ``int | str`` options."""
    try:
        return int(text)
    except ValueError:
        return text


def _flag_kwargs(leaf: O.LeafOption, default: Any) -> dict[str, Any]:
    tp, _ = O.unwrap_optional(leaf.type)
    members = O.choices(tp)
    text = leaf.help + ("" if default in (None, False, True, "") else f" (default: {default})")
    kw: dict[str, Any] = {"help": text, "default": argparse.SUPPRESS}
    if leaf.field.metadata.get("metavar"):
        kw["metavar"] = leaf.field.metadata["metavar"]
    if members is not None:
        kw.update(choices=members, type=type(members[0]))
    elif tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif get_origin(tp) is tuple:
        kw.update(type=parse_shape, metavar=kw.get("metavar", "C,H,W"))
    elif tp in (int, float, str):
        kw["type"] = tp
    elif get_origin(tp) in (Union, types.UnionType) and set(get_args(tp)) == {int, str}:
        kw["type"] = int_or_str
    return kw


def add_options(parser: argparse.ArgumentParser | Any, cls: type, *, skip: tuple[str, ...] = (),
                grouped: bool = True, flags: dict[str, tuple[str, ...]] | None = None) -> None:
    """Add a flag for every command-line option of ``cls`` (groups become argument groups); ``skip`` leaves
    options out, ``flags`` overrides an option's flags for this command (``{"model": ("--model",)}``)."""
    groups: dict[tuple[str, ...], Any] = {}
    defaults = O.flat(cls())  # a composed config may set its own defaults for a group
    for leaf in O.flat_fields(cls):
        if leaf.name in skip or not leaf.field.metadata.get("cli", True):
            continue
        target = parser
        if grouped and leaf.path:
            target = groups.get(leaf.path) or groups.setdefault(
                leaf.path, parser.add_argument_group(".".join(leaf.path)))
        names = (flags or {}).get(leaf.name) or leaf.field.metadata.get("flags") or \
            ("--" + leaf.name.replace("_", "-"),)
        kw = _flag_kwargs(leaf, defaults[leaf.name])
        if names[0].startswith("-"):
            target.add_argument(*names, dest=leaf.name, **kw)
        else:
            target.add_argument(leaf.name, nargs="?", **kw)


def add_command(sub: Any, name: str, options: type, run: Any, *, help: str, description: str | None = None,
                **add_options_kw: Any) -> argparse.ArgumentParser:
    """Register command ``name``: its flags from ``options`` (see :func:`add_options`), ``--config``, and
    ``run(args) -> exit code`` as what it does."""
    parser = sub.add_parser(name, help=help, description=description or help)
    add_options(parser, options, **add_options_kw)
    add_config_flag(parser)
    parser.set_defaults(func=run)
    return parser


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML, YAML or JSON file setting any option (flags given here override it)")


def resolve(cls: type[T], args: argparse.Namespace, *, what: str = "option") -> T:
    """The options of ``cls``: defaults, then ``args.config`` (a file), then the flags given in ``args``."""
    config = getattr(args, "config", None)
    base = O.from_dict(cls, O.load_file(config), what=what, source=config) if config else None
    given = {leaf.name: getattr(args, leaf.name) for leaf in O.flat_fields(cls) if hasattr(args, leaf.name)}
    return O.from_flat(cls, base, what=what, **given)


def shape_flag(size: tuple[int, ...]) -> str:
    """``(3, 32)`` → ``"--input-size 3,32"``, how an error names the flag the user gave."""
    return "--input-size " + ",".join(str(d) for d in size)


def check_example_runs(model: nn.Module, example: tuple[torch.Tensor, ...], size: tuple[int, ...]) -> None:
    """Run ``model`` (its modes preserved, no gradients) on the example made from ``--input-size``; whatever
    it raises becomes one :class:`InputError` naming the flag, the shape and the model's complaint."""
    from ..utils.modes import eval_mode
    try:
        with torch.no_grad(), eval_mode(model):
            model(*example)
    except Relu2DlgnError:
        raise
    except Exception as exc:  # the model's own error: shape, channels, rank
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"{shape_flag(size)}: {type(model).__name__} cannot run on an example input of shape "
                         f"{tuple(example[0].shape)} ({type(exc).__name__}: {text})") from None
