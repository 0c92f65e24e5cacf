"""Gradient features equal torch.autograd.grad example by example (source network and DLGN); the three metrics,
the gap and the nearest-class-mean accuracy equal brute-force computations from those reference features."""
from __future__ import annotations

import itertools

import pytest
import torch

import relu2dlgn
from _models import TinyNet, randomize_bn
from relu2dlgn import explain
from relu2dlgn.errors import InputError, OptionError

D = torch.float64


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    src = randomize_bn(TinyNet(num_classes=3)).to(D).eval()
    x = torch.randn(18, 3, 8, 8, dtype=D)
    y = torch.arange(18) % 3
    dlgn = relu2dlgn.convert(src, example_inputs=x[:2]).eval()
    return src, dlgn, x, y


def reference_features(model, x):
    """grad of the summed outputs, one example at a time (value-network parameters for a DLGN)."""
    dlgn = isinstance(model, relu2dlgn.DLGN)
    params = list((model.value if dlgn else model).parameters())
    rows = []
    for i in range(x.shape[0]):
        out = model.run(x[i:i + 1], hard=True).output if dlgn else model(x[i:i + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(out.sum(), params)]))
    return torch.stack(rows), [p.numel() for p in params]


@pytest.mark.parametrize("which", ["source", "dlgn"])
def test_features_equal_autograd_per_example(setup, which):
    src, dlgn, x, _ = setup
    model = src if which == "source" else dlgn
    F, _ = reference_features(model, x)
    got = explain.per_example_gradients(model, x, chunk=5)
    torch.testing.assert_close(got.values, F, rtol=1e-10, atol=1e-12)


def _cos(a, b):
    na, nb = a.norm(), b.norm()
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def test_metrics_gap_and_nearest_class_mean(setup):
    src, dlgn, x, y = setup
    F, sizes = reference_features(dlgn, x)
    results = explain.similarity_by_metric(dlgn, x, y)
    tr, ev = results["euclidean"].train_index, results["euclidean"].eval_index
    assert sorted(tr.tolist() + ev.tolist()) == list(range(18)) and len(ev) == 9
    blocks = list(torch.split(F, sizes, dim=1))
    # sparse: per-coordinate gap over the training split's pairs, by brute force
    pairs = list(itertools.combinations(tr.tolist(), 2))
    same = [(i, j) for i, j in pairs if y[i] == y[j]]
    diff = [(i, j) for i, j in pairs if y[i] != y[j]]
    gap_c = sum(F[i] * F[j] for i, j in same) / len(same) - sum(F[i] * F[j] for i, j in diff) / len(diff)
    M = gap_c > 1e-9 * gap_c.abs().max()
    ref = {
        "euclidean": lambda i, j: float(F[i] @ F[j]),
        "block": lambda i, j: sum(_cos(b[i], b[j]) for b in blocks) / len(blocks),
        "sparse": lambda i, j: _cos(F[i][M], F[j][M]),
    }
    with torch.no_grad():
        pred = dlgn(x[ev]).argmax(1)
    for metric, s in results.items():
        S = torch.tensor([[ref[metric](i, j) for j in range(18)] for i in range(18)], dtype=D)
        torch.testing.assert_close(s.matrix, S, rtol=1e-9, atol=1e-9)
        e_pairs = list(itertools.combinations(ev.tolist(), 2))
        s_same = [S[i, j] for i, j in e_pairs if y[i] == y[j]]
        s_diff = [S[i, j] for i, j in e_pairs if y[i] != y[j]]
        assert s.gap == pytest.approx(float(sum(s_same) / len(s_same) - sum(s_diff) / len(s_diff)), rel=1e-9)
        ncm = [max(range(3), key=lambda c: float(S[e, [t for t in tr.tolist() if y[t] == c]].mean())) for e in ev]
        assert s.ncm_accuracy == pytest.approx(float((torch.tensor(ncm) == y[ev]).double().mean()))
        assert s.model_accuracy == pytest.approx(float((pred == y[ev]).double().mean()))
    assert results["sparse"].kept == int(M.sum()) and results["sparse"].dims == F.shape[1]
    single = explain.gradient_similarity(src, x, y, metric="sparse", keep=0.1)
    assert single.kept == round(0.1 * single.dims)


def test_bad_arguments(setup):
    src, dlgn, x, y = setup
    with pytest.raises(OptionError, match="metric must be one of euclidean, block, sparse"):
        explain.gradient_similarity(dlgn, x, y, metric="cosine")
    with pytest.raises(InputError, match="needs labels"):
        explain.gradient_similarity(dlgn, x, metric="sparse")
    with pytest.raises(InputError, match="17 labels for 18 examples"):
        explain.gradient_similarity(dlgn, x, y[:17])
    with pytest.raises(InputError, match="no parameter matches"):
        explain.gradient_similarity(dlgn, x, y, params=["head"])
    with pytest.raises(InputError, match="restrict them with params"):
        explain.gradient_similarity(src, x, y, max_bytes=1000)
    assert explain.gradient_similarity(src, x).gap is None  # no labels: the matrix only
