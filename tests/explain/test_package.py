"""``from relu2dlgn import explain`` works as a subpackage import, without entering relu2dlgn's pinned __all__ and
without importing matplotlib (only drawing does)."""
from __future__ import annotations

import subprocess
import sys

import relu2dlgn


def test_subpackage_import_and_exports():
    code = ("import sys; from relu2dlgn import explain; "
            "assert 'matplotlib' not in sys.modules, 'importing explain imported matplotlib'; "
            "print(' '.join(explain.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {"gate_stats", "gate_agreement", "npk", "ntk", "gate_templates", "gradient_similarity", "report"} <= set(out)
    assert "explain" not in relu2dlgn.__all__
    from relu2dlgn import explain
    assert all(hasattr(explain, name) for name in explain.__all__)
