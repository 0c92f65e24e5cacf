"""Options as typed dataclasses: one definition per option, read by validation, the CLI and config files.

An option is a dataclass field made with :func:`option` — its name, type (a ``Literal`` for a closed set),
default, help text and value check live in that one place. Related options form a small dataclass; a config
composes groups with :func:`group`. From that single definition:

* :func:`validate` checks every value (type, ``Literal`` membership, the field's check) and raises
  :class:`~relu2dlgn.errors.OptionError` naming the option, the value and what is accepted;
* :func:`to_dict` / :func:`from_dict` convert to and from nested dictionaries (one section per group), and
  :func:`load_file` / :func:`save_file` read TOML, YAML or JSON and write YAML or JSON;
* :func:`flat_fields` / :func:`from_flat` give the options by their (unique) leaf names, which is how
  keyword arguments (``finetune(dlgn, ..., lr=1e-3)``) and command-line flags (``--lr``) address them.

Example::

    @dataclass
    class Optim:
        lr: float = option(1e-3, "learning rate", check=positive)

    @dataclass
    class Config:
        epochs: int = option(5, "training epochs", check=at_least(1))
        optim: Optim = group(Optim, "optimiser")

    cfg = from_flat(Config, lr=0.1)              # Config(epochs=5, optim=Optim(lr=0.1))
    to_dict(cfg)                                 # {"epochs": 5, "optim": {"lr": 0.1}}
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
from dataclasses import MISSING, Field, dataclass, field
from typing import Any, Callable, Iterator, Literal, TypeVar, Union, get_args, get_origin

from .errors import OptionError
from .utils.fs import atomic_write_text

T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    """A value check with a description of what it accepts (``want``)."""

    test: Callable[[Any], bool]
    want: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:
            return False


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


positive = Check(lambda v: _finite(v) and v > 0, "a finite number > 0")
non_negative = Check(lambda v: _finite(v) and v >= 0, "a finite number >= 0")
fraction = Check(lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]")
fraction_below_one = Check(lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)")
positive_sizes = Check(lambda v: len(v) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                   for d in v), "positive sizes such as 3,224,224")


def at_least(n: int) -> Check:
    return Check(lambda v: v >= n, f"an integer >= {n}")


def option(default: Any, help: str, *, check: Check | None = None, flags: tuple[str, ...] = (),
           cli: bool = True, metavar: str | None = None, name: str | None = None) -> Any:
    """A dataclass field that is an option: ``default``, ``help``, an optional ``check`` of its value, the
    command-line ``flags`` (default ``--leaf-name``), ``cli=False`` for options with no flag, and ``name``:
    the option's leaf name where it must differ from the field name (two groups composed into one config may
    both have a field ``verify``; keyword arguments, flags and top-level config keys use the leaf name, the
    group's section in a config file uses the field name)."""
    meta = {"help": help, "check": check, "flags": tuple(flags), "cli": cli, "metavar": metavar, "name": name}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def group(cls: type, help: str, **defaults: Any) -> Any:
    """A dataclass field holding a group of options (a dataclass ``cls``), default-constructed with
    ``defaults`` (a composed config can set its own defaults for a group, e.g. a smaller batch)."""
    return field(default_factory=lambda: cls(**defaults), metadata={"help": help, "group": True})


def is_group(f: Field) -> bool:
    return bool(f.metadata.get("group"))


# --------------------------------------------------------------------------------------------------
# types
# --------------------------------------------------------------------------------------------------

def hints(cls: type) -> dict[str, Any]:
    """The resolved type annotations of a dataclass (string annotations evaluated)."""
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, globalns=vars(module) if module else None)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None`` / ``Optional[X]``, else ``(tp, False)``."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return tp, False


def choices(tp: Any) -> tuple[Any, ...] | None:
    """The members of a ``Literal`` type (after removing ``None``), else ``None``."""
    tp, _ = unwrap_optional(tp)
    return get_args(tp) if get_origin(tp) is Literal else None


def _type_ok(value: Any, tp: Any) -> bool:
    tp, optional = unwrap_optional(tp)
    if value is None:
        return optional
    members = choices(tp)
    if members is not None:
        return value in members
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(tp))
    if origin in (tuple, list):
        inner = [a for a in get_args(tp) if a is not Ellipsis]
        return isinstance(value, (tuple, list)) and all(_type_ok(v, inner[0]) for v in value) if inner else \
            isinstance(value, (tuple, list))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is Any:
        return True
    return isinstance(value, tp) if isinstance(tp, type) else True


def _describe_type(tp: Any) -> str:
    tp, optional = unwrap_optional(tp)
    members = choices(tp)
    if members:
        text = " | ".join(repr(m) for m in members)
    elif get_origin(tp) in (Union, types.UnionType):
        text = " | ".join(getattr(a, "__name__", str(a)) for a in get_args(tp))
    else:
        text = getattr(tp, "__name__", str(tp))
    return text + (" or None" if optional else "")


# --------------------------------------------------------------------------------------------------
# walking a config
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LeafOption:
    """One option of a (nested) config class: its leaf name, the groups leading to it, field and type (the
    field's own name is ``field.name``; the leaf name is the same unless the option declares another)."""

    name: str
    path: tuple[str, ...]
    field: Field
    type: Any

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def flat_fields(cls: type, prefix: tuple[str, ...] = ()) -> list[LeafOption]:
    """Every leaf option of ``cls`` (groups expanded), in definition order. Leaf names must be unique."""
    out: list[LeafOption] = []
    tps = hints(cls)
    for f in dataclasses.fields(cls):
        if is_group(f):
            out += flat_fields(tps[f.name], prefix + (f.name,))
        else:
            out.append(LeafOption(f.metadata.get("name") or f.name, prefix, f, tps[f.name]))
    if not prefix:
        seen: dict[str, tuple[str, ...]] = {}
        for leaf in out:
            if leaf.name in seen:
                raise TypeError(f"{cls.__name__}: option name '{leaf.name}' is used in two groups "
                                f"({'.'.join(seen[leaf.name]) or '<top>'} and {'.'.join(leaf.path) or '<top>'})")
            seen[leaf.name] = leaf.path
    return out


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        obj = getattr(obj, p)
    return obj


def flat(obj: Any) -> dict[str, Any]:
    """``{leaf name: value}`` of a config instance."""
    return {leaf.name: getattr(_get(obj, leaf.path), leaf.field.name) for leaf in flat_fields(type(obj))}


def from_flat(cls: type[T], base: T | None = None, *, what: str = "option", **values: Any) -> T:
    """A config of class ``cls`` (a copy of ``base``, or the defaults) with options set by leaf name.

    Unknown names raise :class:`OptionError` listing the valid ones. The result is validated."""
    leaves = {leaf.name: leaf for leaf in flat_fields(cls)}
    unknown = sorted(set(values) - set(leaves))
    if unknown:
        raise OptionError(f"unknown {what}(s) {', '.join(unknown)}; valid: {', '.join(sorted(leaves))}")
    nested: dict[str, Any] = to_dict(base) if base is not None else {}
    for name, value in values.items():
        d = nested
        for p in leaves[name].path:
            d = d.setdefault(p, {})
        d[leaves[name].field.name] = value
    return from_dict(cls, nested, what=what)


def to_dict(obj: Any) -> dict[str, Any]:
    """Nested ``{field: value}`` with one sub-dictionary per group; tuples become lists."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if is_group(f):
            out[f.name] = to_dict(v)
        else:
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def from_dict(cls: type[T], data: dict[str, Any], *, what: str = "option", source: str | None = None) -> T:
    """Build and validate ``cls`` from a nested dictionary; a group's options may also be given at the top
    level by their leaf names. Unknown keys raise :class:`OptionError` naming them (and ``source``)."""
    where = f" in {source}" if source else ""
    if not isinstance(data, dict):
        raise OptionError(f"expected a table of {what}s{where}, got {type(data).__name__}")
    leaves = {leaf.name: leaf for leaf in flat_fields(cls)}
    tps = hints(cls)
    kwargs: dict[str, Any] = {}
    sub: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        f = next((f for f in dataclasses.fields(cls) if f.name == key), None)
        if f is not None and is_group(f):
            if not isinstance(value, dict):
                raise OptionError(f"'{key}'{where} must be a table of {what}s, got {value!r}")
            sub.setdefault(key, {}).update(value)
        elif f is not None:
            kwargs[key] = _coerce(value, tps[key])
        elif key in leaves and not leaves[key].path:
            kwargs[leaves[key].field.name] = _coerce(value, tps[leaves[key].field.name])
        elif key in leaves:
            d = sub.setdefault(leaves[key].path[0], {})
            for p in leaves[key].path[1:]:
                d = d.setdefault(p, {})
            d[leaves[key].field.name] = value
        else:
            raise OptionError(f"unknown {what} '{key}'{where}; valid: {', '.join(sorted(leaves))}")
    for name, values in sub.items():
        group_field = next(f for f in dataclasses.fields(cls) if f.name == name)
        defaults = to_dict(group_field.default_factory())  # the composed config's own defaults for the group
        kwargs[name] = from_dict(tps[name], _merged(defaults, values), what=what, source=source)
    obj = cls(**kwargs)
    validate(obj, what=what, source=source)
    return obj


def _merged(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``values`` laid over it, sub-tables merged key by key (a group's defaults stay where the
    given table does not set them)."""
    out = dict(base)
    for key, value in values.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _coerce(value: Any, tp: Any) -> Any:
    """Lists from files become tuples where the field is a tuple; ints become floats for float fields."""
    inner, _ = unwrap_optional(tp)
    if isinstance(value, list) and get_origin(inner) is tuple:
        return tuple(value)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def validate(obj: Any, *, what: str = "option", source: str | None = None) -> None:
    """Check every option's type, ``Literal`` membership and check; then the class's own ``check()`` (for
    rules between options), if it has one. Raises :class:`OptionError` naming the option."""
    where = f" (in {source})" if source else ""
    tps = hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if is_group(f):
            validate(value, what=what, source=source)
            continue
        tp = tps[f.name]
        name = f.metadata.get("name") or f.name
        if not _type_ok(value, tp):
            raise OptionError(f"{what} {name}={value!r}{where}: must be {_describe_type(tp)}")
        check: Check | None = f.metadata.get("check")
        if check is not None and value is not None and not check(value):
            raise OptionError(f"{what} {name}={value!r}{where}: must be {check.want}")
    rules = getattr(obj, "check", None)
    if callable(rules):
        rules()


def iter_groups(obj: Any) -> Iterator[tuple[str, Any]]:
    """``(name, group instance)`` for each group field of a config instance."""
    for f in dataclasses.fields(obj):
        if is_group(f):
            yield f.name, getattr(obj, f.name)


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------

def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``) config file into a dictionary.

    Raises :class:`OptionError` naming the file for a missing file, an unknown suffix or a syntax error."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise OptionError(f"cannot read config file '{path}': {exc.strerror or exc}") from None
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(raw.decode())
        elif suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(raw.decode()) or {}
        elif suffix == ".json":
            data = json.loads(raw.decode())
        else:
            raise OptionError(f"config file '{path}': unknown format '{suffix}' (use .toml, .yaml or .json)")
    except OptionError:
        raise
    except Exception as exc:
        raise OptionError(f"config file '{path}' is not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise OptionError(f"config file '{path}' must hold a table of options, got {type(data).__name__}")
    return data


def save_file(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` atomically as YAML (``.yaml``/``.yml``) or JSON (``.json``)."""
    path = os.fspath(path)
    if path.endswith((".yaml", ".yml")):
        import yaml
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    elif path.endswith(".json"):
        text = json.dumps(data, indent=2) + "\n"
    else:
        raise OptionError(f"cannot write config '{path}': use a .yaml or .json name")
    atomic_write_text(path, text)
