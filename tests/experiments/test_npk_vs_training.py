"""npk_vs_training: kernel alignment and the kernel classifier against closed forms and scikit-learn; the
per-epoch curve against an independent computation on the trained model; checkpoints removed afterwards."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from relu2dlgn import experiments as E
from relu2dlgn.explain import npk
from relu2dlgn.experiments.npk_vs_training import kernel_scores


def test_alignment_of_a_block_kernel_equals_its_closed_form():
    # a hand-made kernel: a on same-class pairs, b on the others; classes of sizes 3, 2, 1
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    a, b = 2.0, 0.5
    same = (y[:, None] == y[None, :]).double()
    K = a * same + b * (1 - same)
    n, S = 6, 3 ** 2 + 2 ** 2 + 1 ** 2
    closed = a * S / (np.sqrt(a ** 2 * S + b ** 2 * (n ** 2 - S)) * np.sqrt(S))   # <K,T> / (|K| |T|)
    assert kernel_scores(K, y)["alignment_raw"] == pytest.approx(closed, rel=1e-12)
    # cosine normalisation divides by sqrt(K_ii K_jj) = a: alignment unchanged (scale invariant)
    assert kernel_scores(K, y)["alignment"] == pytest.approx(closed, rel=1e-12)
    assert kernel_scores(same, y)["alignment"] == pytest.approx(1.0)


def test_kernel_classifier_matches_scikit_learn_kernel_ridge():
    from sklearn.kernel_ridge import KernelRidge
    g = torch.Generator().manual_seed(0)
    F = torch.randn(40, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    F[:, :3] += 1.5 * torch.nn.functional.one_hot(y, 3)
    F = F / F.norm(dim=1, keepdim=True)                 # unit rows: K is already cosine-normalised
    K = F @ F.T
    fit, test = np.arange(0, 40, 2), np.arange(1, 40, 2)
    ridge = KernelRidge(alpha=1e-3, kernel="precomputed").fit(K[fit][:, fit].numpy(), np.eye(3)[y[fit].numpy()])
    expected = (ridge.predict(K[test][:, fit].numpy()).argmax(1) == y[test].numpy()).mean()
    assert kernel_scores(K, y)["kernel_accuracy"] == pytest.approx(expected)
    assert expected > 0.5


def test_curves_are_measured_after_every_epoch(setup):
    result = E.npk_vs_training(setup=setup)
    seed = setup.cfg.seed_list()[0]
    epochs = setup.cfg.training.epochs
    x = torch.stack([setup.data.val[i][0] for i in range(setup.cfg.npk_examples)])
    y = torch.tensor([setup.data.val[i][1] for i in range(setup.cfg.npk_examples)])
    for key in (("scratch", seed), ("finetuned", "input", seed)):
        run = setup.memoised(key)
        assert [p["epoch"] for p in run.curve] == list(range(epochs + 1))
        # the last checkpoint is the trained model: its NPK scores, computed independently here
        K = npk(run.model, x).cpu()
        Y = torch.nn.functional.one_hot(y, 10).double()
        d = K.diagonal().sqrt()
        Kc = K / torch.outer(d, d)
        T = Y @ Y.T
        expected = float((Kc * T).sum() / (Kc.norm() * T.norm()))
        assert run.curve[-1]["alignment"] == pytest.approx(expected, rel=1e-9)
        out = setup.run_dir(f"{run.tag}-seed{seed}")
        assert os.path.exists(os.path.join(out, "metrics.jsonl"))
        assert not os.path.exists(os.path.join(out, "checkpoints"))    # removed once the kernels were computed
    assert len(result.details["curves"]["DLGN from scratch"]) == setup.cfg.seeds
    assert result.agrees in (True, False)
