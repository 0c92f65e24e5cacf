"""dlgn_vs_dnn: every row trained for the same epochs; the ReLU-network row is exactly what train_classifier gives
the architecture from the same seed, run independently here."""
from __future__ import annotations

import torch

from _models import TinyNet
from relu2dlgn import experiments as E
from relu2dlgn.training import FinetuneConfig, train_classifier


def test_rows_are_trained_for_the_same_epochs_and_match_an_independent_run(setup):
    result = E.dlgn_vs_dnn(setup=setup)
    seed = setup.cfg.seed_list()[0]
    epochs = setup.cfg.training.epochs
    runs = [setup.memoised(key) for key in (("relu scratch", seed), ("scratch", seed), ("finetuned", "input", seed))]
    assert all([h["epoch"] for h in run.history] == list(range(epochs + 1)) for run in runs)
    torch.manual_seed(seed)
    model = TinyNet(num_classes=10)
    config = FinetuneConfig.from_options(setup.cfg.training, seed=seed)
    reference = train_classifier(model, setup.train_loader, setup.val_loader, config=config)
    relu_row = result.rows[1]
    assert relu_row.values == [reference.final["val_acc"]]
    assert result.rows[0].values == [setup.source_accuracy]
    scratch = setup.memoised(("scratch", seed)).model
    assert scratch.mode == "dlgn" and scratch.value_input == "input"
    assert result.agrees == (result.rows[2].mean > 0.835 * relu_row.mean)
