"""Which steps of a run have finished, with their results: ``OUT/run.json``, rewritten atomically after each
step, so that ``--resume`` continues a broken run from the last finished step."""
from __future__ import annotations

import json
import os
from typing import Any

from ..errors import LoadError
from ..utils.fs import atomic_write_text

STATE_FILE = "run.json"


class RunState:
    """The finished steps of the run in ``out_dir`` and what each recorded (JSON-serialisable results)."""

    def __init__(self, out_dir: str, steps: dict[str, dict[str, Any]] | None = None):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, STATE_FILE)
        self.steps: dict[str, dict[str, Any]] = dict(steps or {})

    @classmethod
    def load(cls, out_dir: str) -> "RunState":
        """The state saved in ``out_dir`` (empty if the run never finished a step)."""
        path = os.path.join(out_dir, STATE_FILE)
        if not os.path.exists(path):
            return cls(out_dir)
        try:
            with open(path) as f:
                data = json.load(f)
            steps = data["steps"]
            if not isinstance(steps, dict):
                raise TypeError("'steps' is not a table")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LoadError(f"{path}: unreadable run state ({exc}); delete it to start the run again") from None
        return cls(out_dir, steps)

    def done(self, step: str) -> bool:
        return step in self.steps

    def record(self, step: str, result: dict[str, Any]) -> None:
        """Mark ``step`` finished with ``result`` (written to disk at once)."""
        self.steps[step] = result
        atomic_write_text(self.path, json.dumps({"steps": self.steps}, indent=2) + "\n")
