"""``relu2dlgn explain PATH --data digits --out report/``: the interpretability report of a saved model.

PATH is a directory written by ``dlgn.save`` (it holds ``config.json``) or a ``relu2dlgn finetune`` run
(``model/`` and ``config.yaml``). For a run, the data options default to the run's own (same image size and
channels as the model was trained on), and the source network is rebuilt from ``config.yaml``'s
``source.model`` / ``source.checkpoint`` for gate agreement when the checkpoint exists. For a bare model
directory the image size and channels default to the model's recorded input shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from ..data import DataOptions, load_data, make_loader
from ..dlgn import DLGN, load
from ..errors import LoadError, OptionError
from ..explain.report import ReportOptions, report
from ..options import group, load_file, option
from ..serialize import CONFIG
from ..training.checkpoint import MODEL_DIR
from ..training.job import CONFIG_FILE
from ..training.student import ClassifierStudent
from ..pipeline.steps import SOURCE_DIR
from ..zoo import create_model
from .args import add_command, resolve

log = logging.getLogger(__name__)


@dataclass
class ExplainOptions:
    """What ``relu2dlgn explain`` reads and how much of it."""

    path: str | None = option(None, "a saved DLGN directory (config.json) or a finetune run directory (model/, "
                                    "config.yaml)", flags=("path",))
    dataset: DataOptions = group(DataOptions, "the data (default for a run: the run's data options)")
    out: str | None = option(None, "report directory (default: PATH/explain)")
    split: Literal["val", "train"] = option("val", "which split of the data to read")
    template_sites: str | None = option(None, "comma-separated site indices for template grids (default: first, "
                                              "middle and last)", metavar="I,J,K")
    source: bool = option(True, "rebuild a run's source network for gate agreement (--no-source: skip)")
    progress: bool = option(True, "progress bars")
    report: ReportOptions = group(ReportOptions, "the report")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    return add_command(sub, "explain", ExplainOptions, run,
                       help="write the interpretability report of a saved DLGN or finetune run",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)


def _model_dir(path: str) -> tuple[str, dict[str, Any] | None]:
    """The saved model's directory and the run's config (``None`` for a bare model directory)."""
    if os.path.isfile(os.path.join(path, CONFIG)):
        run_dir = os.path.dirname(os.path.abspath(path))
        run_cfg = os.path.join(run_dir, CONFIG_FILE)
        inside_run = os.path.basename(os.path.abspath(path)) == MODEL_DIR and os.path.isfile(run_cfg)
        return path, (load_file(run_cfg) if inside_run else None)
    model_dir = os.path.join(path, MODEL_DIR)
    if os.path.isfile(os.path.join(model_dir, CONFIG)):
        cfg = os.path.join(path, CONFIG_FILE)
        return model_dir, (load_file(cfg) if os.path.isfile(cfg) else None)
    raise LoadError(f"'{path}' is neither a saved DLGN (no {CONFIG}) nor a finetune run (no {MODEL_DIR}/{CONFIG})")


def _given(args: argparse.Namespace) -> set[str]:
    """Option names set on the command line or in --config."""
    names = {k for k in vars(args)}
    if getattr(args, "config", None):
        data = load_file(args.config)
        names |= set(data) | {k for v in data.values() if isinstance(v, dict) for k in v}
    return names


def _data_options(opts: ExplainOptions, args: argparse.Namespace, dlgn: DLGN,
                  run_cfg: dict[str, Any] | None) -> DataOptions:
    """The data options: given ones win, then the run's, then the model's recorded input shape."""
    given = _given(args)
    d = opts.dataset
    fields = {f.name for f in dataclasses.fields(DataOptions)}
    if run_cfg and isinstance(run_cfg.get("dataset"), dict):
        keep = {k: v for k, v in run_cfg["dataset"].items() if k in fields and k not in given}
        d = dataclasses.replace(d, **keep)
    example = dlgn.input_specs[0].example_shape if dlgn.input_specs else None
    if example and len(example) == 4:
        if d.channels is None and "channels" not in given and example[1] in (1, 3):
            d = dataclasses.replace(d, channels=int(example[1]))
        if d.image_size is None and "image_size" not in given:
            d = dataclasses.replace(d, image_size=int(example[2]))
    return d


def _source(run_cfg: dict[str, Any] | None, run_dir: str, num_classes: int, in_chans: int) -> Any:
    if not run_cfg:
        return None
    src = run_cfg.get("source") or {}
    model, checkpoint = src.get("model"), src.get("checkpoint")
    trained_here = os.path.join(run_dir, SOURCE_DIR, MODEL_DIR, ClassifierStudent.WEIGHTS)
    if not checkpoint and os.path.exists(trained_here):  # a relu2dlgn run trained its source itself
        checkpoint = trained_here
    if not model or not checkpoint:
        log.info("explain: the run has no source checkpoint; gate agreement skipped")
        return None
    if not os.path.exists(checkpoint):
        log.warning("explain: the run's source checkpoint '%s' does not exist here; gate agreement skipped",
                    checkpoint)
        return None
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if in_chans != 3:
        kwargs["in_chans"] = in_chans
    return create_model(model, checkpoint=checkpoint, **kwargs).eval()


def _sites(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise OptionError(f"option template_sites={text!r}: expected site indices like 0,5,11") from None


def run(args: argparse.Namespace) -> int:
    opts = resolve(ExplainOptions, args)
    if not opts.path:
        raise OptionError("a model directory is required: PATH on the command line, or 'path' in the config file")
    sites = _sites(opts.template_sites)
    model_dir, run_cfg = _model_dir(opts.path)
    dlgn = load(model_dir).eval()
    d = _data_options(opts, args, dlgn, run_cfg)
    data = load_data(d.data, d.data_root, image_size=d.image_size, channels=d.channels, download=d.download,
                     augment=False)
    dataset = data.val if opts.split == "val" else data.train
    loader = make_loader(dataset, d.batch_size, train=False, workers=d.workers or 0)
    run_dir = os.path.dirname(os.path.abspath(model_dir))
    source = _source(run_cfg, run_dir, data.num_classes, data.in_chans) if opts.source else None
    out = opts.out or os.path.join(opts.path, "explain")
    result = report(dlgn, loader, out, source=source, template_sites=sites, progress=opts.progress,
                    **dataclasses.asdict(opts.report))
    print(result)
    return 0
