"""Running the main job: the steps in order, the resolved config and the run state written next to the
artifacts, ``--resume`` from the last finished step, and the closing table."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError
from ..options import load_file, save_file, to_dict
from ..training.checkpoint import CHECKPOINT_DIR
from ..utils.threads import job_device, job_threads, torch_threads
from .config import RunConfig
from .state import STATE_FILE, RunState
from .steps import SOURCE_DIR, STEPS, Context

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


@dataclass
class RunResult:
    """What a run did: each step's record (``steps["finetune"]["accuracy"]``, ...), where it wrote, how long."""

    out_dir: str
    config_file: str
    steps: dict[str, dict[str, Any]]
    seconds: float

    def rows(self) -> list[tuple[str, str, str]]:
        """The closing table: ``(what, value, artifact)``."""
        s = self.steps
        src, conv, ft, ex = (s.get(k, {}) for k in ("source", "convert", "finetune", "export"))

        def pct(v: Any) -> str:
            return f"{100 * v:.2f} %" if isinstance(v, (int, float)) else "-"

        rows = [("source network accuracy", pct(src.get("accuracy")),
                 src.get("weights", "") + (" (trained here)" if src.get("trained_here") else "")),
                ("DLGN accuracy right after conversion (hard gates)", pct(conv.get("accuracy")),
                 f"{conv.get('sites', '?')} gate sites"),
                ("DLGN accuracy after fine-tuning (hard gates)", pct(ft.get("accuracy")), ft.get("model", "")),
                ("gate agreement with the source", pct(ft.get("gate_agreement")), ft.get("metrics", ""))]
        if ex:
            parity = f"max |err| {ex['max_abs_error']:.2g} ({ex['relative_error']:.2g} of max|y|), " \
                     f"{'verified' if ex.get('verified') else 'NOT verified'}" if ex.get("max_abs_error") is not None \
                else "not verified"
            rows.append(("ONNX parity (onnxruntime vs PyTorch)", parity, ", ".join(ex.get("onnx", []))))
            if "latency_ratio" in ex:
                ms = ex["latency_ms"]
                rows.append((f"ONNX latency vs the source's ONNX (batch {ex['latency_batch']}, "
                             f"{ex['latency_threads']} thread)", f"{ex['latency_ratio']:.2f}x "
                             f"({ms['dlgn']:.1f} vs {ms['source']:.1f} ms)", ex.get("source_onnx", "")))
        if "report" in s:
            r = s["report"]
            npk = f"NPK label alignment {r['npk_alignment']:.3f}" if r.get("npk_alignment") is not None else ""
            rows.append(("interpretability report", npk, r.get("report", "")))
        rows.append(("resolved config (repeat with --config)", "", self.config_file))
        return rows

    def table(self) -> str:
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"relu2dlgn run: {len(self.steps)} steps in {self.seconds:.0f} s, artifacts in {self.out_dir}"]
        lines += [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]
        return "\n".join(lines)


def _check_resumable(cfg: RunConfig, path: str) -> None:
    """A resumed run must have the options it started with (``resume`` aside)."""
    saved = load_file(path)
    now = to_dict(dataclasses.replace(cfg, resume=False))
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise OptionError(f"--resume: the options differ from those the run in {os.path.dirname(path)} started "
                          f"with (in {', '.join(diff)}); run with --config {path} --resume, or without --resume "
                          f"to start over")


def _fresh(out: str) -> None:
    """Start over in ``out``: forget the finished steps and the checkpoints of an earlier run there."""
    for stale in (STATE_FILE,):
        if os.path.exists(os.path.join(out, stale)):
            log.warning("%s holds an earlier run: starting over (--resume continues it instead)", out)
            os.remove(os.path.join(out, stale))
    for d in (os.path.join(out, CHECKPOINT_DIR), os.path.join(out, SOURCE_DIR, CHECKPOINT_DIR)):
        shutil.rmtree(d, ignore_errors=True)


def run(cfg: RunConfig) -> RunResult:
    """Run the main job (see :mod:`relu2dlgn.pipeline`); returns each step's record and the closing table."""
    start = time.perf_counter()
    out = cfg.out_dir
    config_file = os.path.join(out, CONFIG_FILE)
    resuming = cfg.resume and os.path.exists(os.path.join(out, STATE_FILE))
    if cfg.resume and os.path.exists(config_file):
        _check_resumable(cfg, config_file)
    os.makedirs(out, exist_ok=True)
    if not resuming:
        _fresh(out)
    save_file(config_file, to_dict(dataclasses.replace(cfg, resume=False, out=out)))
    state = RunState.load(out) if resuming else RunState(out)
    with torch_threads(job_threads(cfg.threads, job_device(cfg.training.runtime.device))):
        ctx = Context(cfg, resuming)
        for i, (name, step) in enumerate(STEPS, 1):
            if state.done(name):
                log.info("step %d/%d %s: finished earlier (resumed run)", i, len(STEPS), name)
                continue
            log.info("step %d/%d %s ...", i, len(STEPS), name)
            tick = time.perf_counter()
            record = step(ctx)
            record["seconds"] = time.perf_counter() - tick
            state.record(name, record)
    return RunResult(out, config_file, state.steps, time.perf_counter() - start)
