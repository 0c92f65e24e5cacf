"""Gradient similarity (Rácz & Daróczy, arXiv 2110.13581): inputs compared through their gradients.

The feature of an input is ``phi(x) = d (sum_k f_k(x)) / d theta`` — the gradient of the logits summed over the
classes (the authors' code sums the per-class gradients) with respect to the parameters (a converted model's
value network with its gates fixed, or a plain network's parameters; :mod:`.tangent`). A metric on parameter
space turns two features into a similarity:

* ``"euclidean"``: ``S(x, x') = <phi(x), phi(x')>``;
* ``"block"``: each parameter tensor is a block; ``S = mean over blocks b of cos(phi_b(x), phi_b(x'))``, so
  every layer weighs the same whatever its size or gradient scale;
* ``"sparse"``: keep the coordinates that separate the classes of a *training split*: the per-coordinate gap
  ``mean_{same-class pairs} phi_i[c] phi_j[c] - mean_{different-class pairs} phi_i[c] phi_j[c]`` (whose sum over
  ``c`` is the Euclidean gap) must be positive (``keep=None``; above 1e-9 of the largest gap, so that round-off
  does not decide for a coordinate whose gap is 0, such as a bias gradient that is 1 for every input) or among
  the largest fraction ``keep``;
  ``S = cos(phi_M(x), phi_M(x'))`` on the kept coordinates ``M``.

With labels, the examples are split per class (``train_fraction`` to the training split, fixed ``seed``);
on the evaluation split the result gives

* ``gap = same_mean - different_mean``: mean similarity of same-class pairs (``i != j``) minus that of
  different-class pairs;
* ``ncm_accuracy``: a nearest-class-mean classifier built on the similarity — an evaluation example goes to
  the class whose training examples it is most similar to on average;
* ``model_accuracy``: the network's own accuracy (arg max of its output; hard gates for a DLGN).

Example::

    s = explain.gradient_similarity(model, x, y, metric="sparse")
    s.gap, s.ncm_accuracy, s.model_accuracy, s.matrix.shape       # (n, n)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from ..data import stratified_split
from ..dlgn import DLGN
from ..errors import InputError, OptionError
from ..utils.modes import eval_mode
from .tangent import Features, per_example_gradients

Metric = Literal["euclidean", "block", "sparse"]
METRICS = ("euclidean", "block", "sparse")


@dataclass
class Similarity:
    """The similarity matrix over all examples and, with labels, its class statistics on the evaluation split."""

    matrix: Tensor
    metric: str
    labels: Tensor | None
    train_index: Tensor
    eval_index: Tensor
    gap: float | None
    same_mean: float | None
    different_mean: float | None
    ncm_accuracy: float | None
    model_accuracy: float | None
    dims: int
    kept: int

    def pairs(self) -> tuple[Tensor, Tensor]:
        """Similarities of the evaluation split's same-class pairs (``i < j``) and different-class pairs."""
        if self.labels is None:
            raise InputError("pairs() needs labels")
        e = self.eval_index
        S, y = self.matrix[e][:, e], self.labels[e]
        upper = torch.triu(torch.ones_like(S, dtype=torch.bool), 1)
        same = (y[:, None] == y[None, :]) & upper
        return S[same], S[~(y[:, None] == y[None, :]) & upper]

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "examples": int(self.matrix.shape[0]), "train": int(self.train_index.numel()),
                "eval": int(self.eval_index.numel()), "gap": self.gap, "same_mean": self.same_mean,
                "different_mean": self.different_mean, "ncm_accuracy": self.ncm_accuracy,
                "model_accuracy": self.model_accuracy, "dims": self.dims, "kept": self.kept}


def _coordinate_gaps(F: Tensor, y: Tensor) -> Tensor:
    """Per coordinate: mean over same-class pairs of ``F_i F_j`` minus mean over different-class pairs."""
    total = F.sum(0)
    same_sum = torch.zeros_like(total)
    class_sq = torch.zeros_like(total)
    same_pairs = 0
    for c in torch.unique(y):
        Fc = F[y == c]
        s = Fc.sum(0)
        same_sum += (s * s - (Fc * Fc).sum(0)) / 2
        class_sq += s * s
        same_pairs += Fc.shape[0] * (Fc.shape[0] - 1) // 2
    n = F.shape[0]
    diff_pairs = (n * n - sum(int((y == c).sum()) ** 2 for c in torch.unique(y))) // 2
    if same_pairs == 0 or diff_pairs == 0:
        raise InputError("the sparse metric needs a training split with two examples of some class and two classes")
    return same_sum / same_pairs - (total * total - class_sq) / 2 / diff_pairs


def _normalize_rows(F: Tensor) -> Tensor:
    """Each row divided by its norm (computed in float64); zero rows stay zero. Keeps ``F``'s dtype."""
    norms = torch.linalg.vector_norm(F, dim=1, keepdim=True, dtype=torch.float64)
    inverse = torch.where(norms > 0, 1 / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(norms))
    return F * inverse.to(F.dtype)


def _gram(F: Tensor, columns: int = 2 ** 20) -> Tensor:
    """``F F^T`` in float64, ``columns`` feature coordinates at a time (bounded extra memory)."""
    S = torch.zeros(F.shape[0], F.shape[0], dtype=torch.float64)
    for s in range(0, F.shape[1], columns):
        part = F[:, s:s + columns].to(torch.float64)
        S += part @ part.T
    return S


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float | None:
    with eval_mode(model), torch.no_grad():
        out = model.run(x, hard=True).output if isinstance(model, DLGN) else model(x)
    if not isinstance(out, Tensor) or out.dim() != 2:
        return None
    return float((out.argmax(1).cpu() == y.cpu()).double().mean())


def gradient_similarity(model: nn.Module, x: Tensor, y: Tensor | None = None, *, metric: Metric = "euclidean",
                        params: Sequence[str] | None = None, keep: float | None = None, train_fraction: float = 0.5,
                        seed: int = 0, chunk: int = 128, max_bytes: int = 2 ** 31,
                        progress: bool = False) -> Similarity:
    """Gradient similarity of the examples ``x`` (labels ``y``) under ``metric`` (see the module docstring).

    ``model``: a DLGN / DGN (value-network gradients, gates fixed) or any classifier ``nn.Module``.
    ``params``: parameter-name prefixes to differentiate by (default all). ``keep``: the sparse metric's
    fraction of coordinates (default: those with a positive gap). Without ``y`` only ``matrix`` is filled (and
    the sparse metric is refused). Raises :class:`~relu2dlgn.errors.OptionError` for an unknown metric and
    :class:`~relu2dlgn.errors.InputError` for labels that do not match ``x``.
    """
    return similarity_by_metric(model, x, y, metrics=(metric,), params=params, keep=keep,
                                train_fraction=train_fraction, seed=seed, chunk=chunk, max_bytes=max_bytes,
                                progress=progress)[metric]


def similarity_by_metric(model: nn.Module, x: Tensor, y: Tensor | None = None, *,
                         metrics: Sequence[Metric] = METRICS, params: Sequence[str] | None = None,
                         keep: float | None = None, train_fraction: float = 0.5, seed: int = 0, chunk: int = 128,
                         max_bytes: int = 2 ** 31, progress: bool = False) -> dict[str, Similarity]:
    """:func:`gradient_similarity` under several metrics, computing the gradient features once."""
    for metric in metrics:
        if metric not in METRICS:
            raise OptionError(f"gradient_similarity: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if keep is not None and not 0 < keep <= 1:
        raise OptionError(f"gradient_similarity: keep must be in (0, 1], got {keep!r}")
    if not 0 < train_fraction < 1:
        raise OptionError(f"gradient_similarity: train_fraction must be in (0, 1), got {train_fraction!r}")
    n = x.shape[0] if isinstance(x, Tensor) else 0
    if y is not None:
        y = torch.as_tensor(y).long().cpu()
        if y.dim() != 1 or y.numel() != n:
            raise InputError(f"gradient_similarity: {y.numel()} labels for {n} examples")
        train_list, eval_list = stratified_split(y, 1 - train_fraction, seed)
        train_idx, eval_idx = torch.tensor(train_list, dtype=torch.long), torch.tensor(eval_list, dtype=torch.long)
        if not len(train_idx) or not len(eval_idx):
            raise InputError("gradient_similarity: too few examples for a training and an evaluation split")
    elif "sparse" in metrics:
        raise InputError("gradient_similarity: the sparse metric needs labels y (it selects coordinates by class)")
    else:
        train_idx, eval_idx = torch.arange(n), torch.arange(n)
    feats = per_example_gradients(model, x, reduce="sum", params=params, chunk=chunk, max_bytes=max_bytes,
                                  progress=progress, desc="gradients")
    accuracy = _accuracy(model, x[eval_idx.to(x.device)], y[eval_idx]) if y is not None else None
    return {metric: _similarity(feats, metric, y, train_idx, eval_idx, keep, accuracy) for metric in metrics}


def _similarity(feats: Features, metric: str, y: Tensor | None, train_idx: Tensor, eval_idx: Tensor,
                keep: float | None, accuracy: float | None) -> Similarity:
    F = feats.values.cpu()
    n = F.shape[0]
    kept = F.shape[1]
    if metric == "euclidean":
        S = _gram(F)
    elif metric == "block":
        S, start = torch.zeros(n, n, dtype=torch.float64), 0
        for _, size in feats.blocks:
            S += _gram(_normalize_rows(F[:, start:start + size]))
            start += size
        S /= len(feats.blocks)
    else:
        assert y is not None
        gaps = _coordinate_gaps(F[train_idx].to(torch.float64), y[train_idx])
        if keep is None:  # positive beyond round-off (a constant coordinate has a gap of exactly 0 in theory)
            mask = gaps > 1e-9 * float(gaps.abs().max())
        else:
            mask = torch.zeros_like(gaps, dtype=torch.bool)
            mask[gaps.topk(max(1, int(round(keep * gaps.numel())))).indices] = True
        kept = int(mask.sum())
        S = _gram(_normalize_rows(F[:, mask]))
    result = Similarity(S, metric, y, train_idx, eval_idx, None, None, None, None, accuracy, F.shape[1], kept)
    if y is None:
        return result
    same, different = result.pairs()
    result.same_mean = float(same.mean()) if same.numel() else float("nan")
    result.different_mean = float(different.mean()) if different.numel() else float("nan")
    result.gap = result.same_mean - result.different_mean
    classes = torch.unique(y[train_idx])
    scores = torch.stack([S[eval_idx][:, train_idx[y[train_idx] == c]].mean(1) for c in classes], dim=1)
    result.ncm_accuracy = float((classes[scores.argmax(1)] == y[eval_idx]).double().mean())
    return result
