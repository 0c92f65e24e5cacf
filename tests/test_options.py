"""relu2dlgn.options and relu2dlgn.cli.args: one definition per option → validation, config files, flags."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Literal

import pytest

from relu2dlgn.cli.args import add_config_flag, add_options, parse_shape, resolve
from relu2dlgn.errors import OptionError
from relu2dlgn.options import (at_least, flat, flat_fields, from_dict, from_flat, group, load_file, option,
                               positive, save_file, to_dict)
from relu2dlgn.training import FinetuneConfig


@dataclass
class Inner:
    lr: float = option(1e-3, "learning rate", check=positive)
    kind: Literal["a", "b"] = option("a", "a kind")
    shape: tuple[int, ...] | None = option(None, "a shape")


@dataclass
class Outer:
    epochs: int = option(5, "epochs", check=at_least(1))
    flag: bool = option(True, "a switch")
    out: str | None = option(None, "where", flags=("--out",))
    inner: Inner = group(Inner, "inner options")


def test_flat_and_nested_round_trip():
    cfg = from_flat(Outer, lr=0.5, epochs=2, shape=(3, 4))
    assert cfg == Outer(epochs=2, inner=Inner(lr=0.5, shape=(3, 4)))
    d = to_dict(cfg)
    assert d == {"epochs": 2, "flag": True, "out": None, "inner": {"lr": 0.5, "kind": "a", "shape": [3, 4]}}
    assert from_dict(Outer, json.loads(json.dumps(d))) == cfg          # lists from files become tuples again
    assert flat(cfg) == {"epochs": 2, "flag": True, "out": None, "lr": 0.5, "kind": "a", "shape": (3, 4)}
    assert from_dict(Outer, {"lr": 0.25}).inner.lr == 0.25               # a group's option by its leaf name
    assert from_dict(Outer, {"inner": {"lr": 1}}).inner.lr == 1.0 and isinstance(
        from_dict(Outer, {"inner": {"lr": 1}}).inner.lr, float)


@pytest.mark.parametrize("values, message", [
    ({"lr": -1}, "option lr=-1.0: must be a finite number > 0"),
    ({"lr": float("nan")}, "option lr=nan: must be a finite number > 0"),
    ({"epochs": 0}, "option epochs=0: must be an integer >= 1"),
    ({"epochs": 2.5}, "option epochs=2.5: must be int"),
    ({"kind": "c"}, "option kind='c': must be 'a' | 'b'"),
    ({"flag": "yes"}, "option flag='yes': must be bool"),
    ({"lrate": 1}, "unknown option(s) lrate; valid: epochs, flag, kind, lr, out, shape"),
])
def test_bad_values_name_the_option(values, message):
    with pytest.raises(OptionError) as info:
        from_flat(Outer, **values)
    assert message in str(info.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    with pytest.raises(OptionError, match=r"unknown option 'speed' in cfg\.json"):
        from_dict(Outer, {"speed": 1}, source="cfg.json")
    with pytest.raises(OptionError, match="'inner' in cfg.json must be a table"):
        from_dict(Outer, {"inner": 3}, source="cfg.json")


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'epochs = 3\n[inner]\nlr = 0.1\nshape = [1, 2]\n'),
    (".yaml", "epochs: 3\ninner:\n  lr: 0.1\n  shape: [1, 2]\n"),
    (".json", '{"epochs": 3, "inner": {"lr": 0.1, "shape": [1, 2]}}'),
])
def test_config_files_in_three_formats(tmp_path, suffix, text):
    path = tmp_path / ("c" + suffix)
    path.write_text(text)
    assert from_dict(Outer, load_file(path)) == Outer(epochs=3, inner=Inner(lr=0.1, shape=(1, 2)))


def test_config_file_errors_and_atomic_save(tmp_path):
    with pytest.raises(OptionError, match="cannot read config file"):
        load_file(tmp_path / "missing.toml")
    (tmp_path / "c.ini").write_text("x=1")
    with pytest.raises(OptionError, match="unknown format '.ini'"):
        load_file(tmp_path / "c.ini")
    (tmp_path / "c.toml").write_text("epochs = ")
    with pytest.raises(OptionError, match="is not valid TOML"):
        load_file(tmp_path / "c.toml")
    save_file(tmp_path / "out.yaml", to_dict(Outer()))
    assert from_dict(Outer, load_file(tmp_path / "out.yaml")) == Outer()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ini", "c.toml", "out.yaml"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_options(p, Outer)
    add_config_flag(p)
    return p


def test_flags_are_generated_from_the_fields(tmp_path):
    p = _parser()
    args = p.parse_args(["--lr", "0.2", "--no-flag", "--kind", "b", "--shape", "3x8x8", "--out", "d"])
    assert resolve(Outer, args) == Outer(flag=False, out="d", inner=Inner(lr=0.2, kind="b", shape=(3, 8, 8)))
    assert resolve(Outer, p.parse_args([])) == Outer()                       # flags not given: the defaults
    with pytest.raises(SystemExit):
        p.parse_args(["--kind", "c"])                                        # Literal -> choices
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 7\ninner: {lr: 0.3}\n")
    args = p.parse_args(["--config", str(cfg), "--lr", "0.4"])
    assert resolve(Outer, args) == Outer(epochs=7, inner=Inner(lr=0.4))     # flag > file > default


def test_parse_shape():
    assert parse_shape("3,224,224") == (3, 224, 224) and parse_shape("1x28x28") == (1, 28, 28)
    for bad in ("3,32,", "0,0,0", "a,b", "-1,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shape(bad)


def test_finetune_config_leaf_names_are_unique_and_documented():
    leaves = flat_fields(FinetuneConfig)
    assert len({leaf.name for leaf in leaves}) == len(leaves) == 33
    assert all(leaf.help for leaf in leaves)


@dataclass
class _Export:
    verify: bool = option(True, "check the export")


@dataclass
class _Convert:
    verify: bool = option(True, "check the conversion", name="verify_conversion")


@dataclass
class _Both:
    conversion: _Convert = group(_Convert, "conversion")
    export: _Export = group(_Export, "export")


def test_a_leaf_name_other_than_the_field_name_keeps_composed_groups_apart():
    """Two groups with a field `verify`: one declares the leaf name `verify_conversion`, so keyword arguments,
    flags and top-level keys address each without ambiguity, while each group's section keeps its field name."""
    cfg = from_flat(_Both, verify_conversion=False)
    assert cfg == _Both(conversion=_Convert(verify=False))
    assert to_dict(cfg) == {"conversion": {"verify": False}, "export": {"verify": True}}
    assert from_dict(_Both, {"verify_conversion": False, "export": {"verify": False}}) == \
        _Both(_Convert(False), _Export(False))
    assert flat(cfg) == {"verify_conversion": False, "verify": True}
    with pytest.raises(OptionError, match=r"option verify_conversion=3: must be bool"):
        from_flat(_Both, verify_conversion=3)
    p = argparse.ArgumentParser()
    add_options(p, _Both)
    assert resolve(_Both, p.parse_args(["--no-verify-conversion"])) == _Both(_Convert(False), _Export(True))


@dataclass
class Composed:
    """A config that sets its own defaults for a group (as RunConfig does for fine-tuning: 3 epochs)."""

    inner: Inner = group(Inner, "inner options", lr=0.25, kind="b")


def test_setting_one_option_of_a_group_keeps_the_composed_defaults_of_the_others(tmp_path):
    """Regression: `relu2dlgn run --lr 3e-3` trained 5 epochs (FinetuneConfig's default), not the run's 3."""
    assert from_flat(Composed, shape=(1,)).inner == Inner(lr=0.25, kind="b", shape=(1,))
    assert from_dict(Composed, {"inner": {"shape": [2]}}).inner == Inner(lr=0.25, kind="b", shape=(2,))
    assert from_dict(Composed, {"shape": [2]}).inner == Inner(lr=0.25, kind="b", shape=(2,))
    from relu2dlgn.pipeline import RunConfig
    cfg = from_flat(RunConfig, lr=3e-3, data="digits")
    assert (cfg.training.epochs, cfg.dataset.batch_size, cfg.training.optim.lr) == (3, 64, 3e-3)
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  lr: 0.003\n")
    parser = argparse.ArgumentParser()
    add_options(parser, RunConfig, skip=("out_dir", "resume"), flags={"model": ("--model",)})
    add_config_flag(parser)
    resolved = resolve(RunConfig, parser.parse_args(["--config", str(path)]))
    assert (resolved.training.epochs, resolved.training.optim.lr) == (3, 0.003)
