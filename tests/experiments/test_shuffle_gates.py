"""shuffle_gates: masks shuffled across examples are a permutation of the originals (the same multiset per site,
other sites untouched); layer-permuted masks are the other sites' masks exactly; the experiment's rows."""
from __future__ import annotations

import torch

from conftest import tiny_setup
from relu2dlgn import experiments as E
from relu2dlgn.experiments.shuffle_gates import (layer_permutation, permute_layers, same_shape_groups,
                                                 shuffle_examples)
from relu2dlgn.experiments.runs import gating_of


def _multiset(t: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct per-example masks of a site and how often each occurs (examples along ``dim``)."""
    rows = t.movedim(dim, 0).reshape(t.shape[dim], -1)
    return torch.unique(rows, dim=0, return_counts=True)


def test_masks_shuffled_across_examples_are_a_permutation_per_site(setup):
    dlgn = gating_of(setup, "learnt", "dgn")
    x = torch.stack([setup.data.val[i][0] for i in range(24)])
    gates = dlgn.gates(x, hard=True)
    shuffled = shuffle_examples(gates, dlgn.gate_specs, [0, 1], torch.Generator().manual_seed(0))
    for i in (0, 1):
        before, after = _multiset(gates[i]), _multiset(shuffled[i])
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])   # same multiset of masks
        assert not torch.equal(gates[i], shuffled[i])                                  # ... in another order
    assert shuffled[2] is gates[2]                                                     # unchosen site untouched
    assert gates[1].dtype == torch.int64                                               # max-pool: arg-max indices


def test_layer_permutation_hands_each_site_another_same_shaped_sites_masks(tmp_path):
    own = tiny_setup(tmp_path, model="_models:TwinNet")
    dlgn = own.convert(own.make_model())
    x = torch.stack([own.data.val[i][0] for i in range(8)])
    groups = same_shape_groups(dlgn, x)
    assert groups == [[0, 1], [3, 4]]          # relu, relu | maxpool | relu, relu
    perm = layer_permutation(len(dlgn.sites), groups, torch.Generator().manual_seed(0))
    assert perm == [1, 0, 2, 4, 3]             # a derangement within each pair: the swaps
    permuted = permute_layers(dlgn, perm)
    original, moved = dlgn.gates(x, hard=True), permuted.gates(x, hard=True)
    for i, p in enumerate(perm):
        assert torch.equal(moved[i], original[p])
    with torch.no_grad():   # the value network consumes the moved masks: same output as feeding them by hand
        expected = dlgn.value_forward((x,), tuple(original[p] for p in perm))
        assert torch.equal(permuted.eval()(x), expected)
    result = E.shuffle_gates(setup=own)
    names = [r.name for r in result.rows]
    for model in ("DLGN", "DGN"):
        for row in ("no shuffle", "layers permuted (evaluated)", "layers permuted, value net retrained",
                    "unpermuted, value net retrained"):
            assert f"{model}: {row}" in names
    assert result.details["DLGN"]["groups"] == [[0, 1], [3, 4]] and len(result.details["DGN"]["per_site"]) == 5
    assert result.agrees in (True, False)


def test_shuffle_gates_without_same_shaped_sites_says_so(setup):
    result = E.shuffle_gates(setup=setup)      # TinyNet: relu 8x12x12, maxpool, relu 16x6x6
    assert result.agrees is None and result.verdict.startswith("n/a")
    plain = result.row("DGN: no shuffle").mean
    assert abs(plain - setup.source_accuracy) < 1e-9   # the DGN computes exactly the source network
