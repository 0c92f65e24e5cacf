"""explain.report: the files it writes, and its numbers equal the instruments called directly."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import relu2dlgn
from _models import TinyNet, randomize_bn
from relu2dlgn import explain
from relu2dlgn.data import load_data
from relu2dlgn.errors import ExplainError, OptionError
from relu2dlgn.explain.report import default_template_sites

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits():
    data = load_data("digits", image_size=16, augment=False)
    return Subset(data.val, range(96))


def test_report_files_and_numbers(tmp_path, digits):
    torch.manual_seed(0)
    src = randomize_bn(TinyNet()).eval()
    loader = DataLoader(digits, batch_size=32)
    x, y = next(iter(DataLoader(digits, batch_size=96)))
    dlgn = relu2dlgn.convert(src, example_inputs=x[:2]).eval()
    r = explain.report(dlgn, loader, tmp_path, source=src, npk_examples=12, similarity_examples=60, progress=False)
    names = {"gates.png", "npk.png", "similarity.png", "report.json", "report.md"} | \
        {f"templates_site{s}.png" for s in default_template_sites(dlgn)}
    assert names <= set(os.listdir(tmp_path))
    for f in r.figures.values():
        assert open(f, "rb").read(8) == PNG
    numbers = json.loads((tmp_path / "report.json").read_text())
    assert numbers["gate_stats"]["on_fraction"] == pytest.approx(explain.gate_stats(dlgn, loader).on_fraction)
    assert numbers["agreement"]["overall"] == pytest.approx(explain.gate_agreement(dlgn, src, loader).overall)
    K = explain.npk(dlgn, x[:12])
    assert numbers["npk"]["alignment"] == pytest.approx(explain.kernel_alignment(K, y[:12]))
    params = numbers["similarity_params"]
    s = explain.gradient_similarity(src, x[:60], y[:60], metric="block", params=params)
    assert numbers["similarity"]["source"]["block"]["gap"] == pytest.approx(s.gap)
    md = (tmp_path / "report.md").read_text()
    assert all(f"]({os.path.basename(f)})" in md for f in r.figures.values())
    assert f"{numbers['agreement']['overall']:.4g}" in md and "report.md" in str(r)


def test_report_refuses_bad_requests(tmp_path):
    dlgn = relu2dlgn.convert(TinyNet().eval(), example_inputs=torch.randn(2, 3, 8, 8))
    with pytest.raises(OptionError, match="site=7 is out of range"):
        explain.report(dlgn, [torch.randn(4, 3, 8, 8)], tmp_path, template_sites=[7], progress=False)
    with pytest.raises(ExplainError, match="needs a converted model"):
        explain.report(TinyNet(), [torch.randn(4, 3, 8, 8)], tmp_path, progress=False)
