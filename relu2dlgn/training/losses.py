"""The training objective's terms: logit distillation and per-site gate agreement.

For a batch with labels ``y``, DLGN logits ``z`` (soft gates ``sigmoid(beta q)``) and, with a teacher (the
source network), its logits ``t`` and its pre-activations ``q^T``::

    L = (1 - a) CE(z, y) + a T^2 KL(softmax(t / T) || softmax(z / T))          (logit distillation, "kd")
        + lambda * mean_i  L_gate,i                                               (gate agreement)

    L_gate,i = mean BCE(sigmoid(beta q_i), 1(q^T_i > 0))                          relu / leaky_relu / prelu
             = mean over both thresholds of BCE(sigmoid(beta (q_i - c)), 1(q^T_i > c)), c in {lo, hi}
                                                                                  hardtanh / relu6
             = mean CE(softmax over the window of beta q_i, arg max of q^T_i)     max-pool

so each site's soft gates are pulled towards the source network's own on/off pattern, every site weighted
equally. *Gate agreement* is the fraction of hard gate decisions (on/off, the linear piece, the max-pool arg
max) where the DLGN equals the teacher.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..gates import GateSpec, make_gate, max_pool_with_indices, pool_windows
from ..soft_maxpool import window_cross_entropy
from ..sites import GateSite
from .config import DistillOptions


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def site_gate_terms(spec: GateSpec, q: torch.Tensor, teacher: torch.Tensor, beta: float | torch.Tensor, *,
                    loss: bool = True, gate: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """One site's gate-agreement loss and agreement count against the teacher.

    ``teacher`` is the teacher's pre-activation ``q^T`` at the site, or its hard gate (a teacher made with
    ``targets=True``: :func:`relu2dlgn.gates.make_gate` with ``hard=True``, i.e. a boolean mask, a stacked pair
    for hardtanh, per-plane arg-max indices for max-pool).

    Loss (see the module docstring): the BCE of the soft gates ``sigmoid(beta (q - c))`` against the teacher's
    hard gate for each threshold ``c`` of the site (0 for the ReLU family; lo and hi for hardtanh), or for
    max-pool the cross-entropy of each window's soft-max ``softmax(beta q)`` against the teacher's arg max,
    ``logsumexp(beta q_window) - beta q_target``. Agreement: the number of hard gate decisions that equal the
    teacher's (on/off, the linear piece for hardtanh, the arg max for max-pool) and the number of decisions.

    ``gate``: the student's soft gate at the site as its forward pass made it (``make_gate(spec, q, beta,
    hard=False)``, the same ``beta``; what :meth:`relu2dlgn.DLGN.run` returns in ``gates``), which saves passes
    over the activations with the same value and gradient: a ReLU-family site's gradient is then ``beta (g - t) /
    n`` from the gate ``g`` (:class:`_GateBCE`); a max-pool site reads the window soft-max from it instead of
    unfolding the windows a second time (:func:`relu2dlgn.soft_maxpool.window_cross_entropy`: with ``m`` the
    student's arg max and ``t`` the teacher's, ``-log softmax_t = beta (q_m - q_t) - log softmax_m``, stable as
    ``softmax_m >= 1/K``; gradient ``beta (g - onehot(t))`` per window, folded back onto ``q``).

    Returns ``(loss or None, agreeing decisions, decisions)``.
    """
    q = q.float()
    target = teacher if not teacher.is_floating_point() else make_gate(spec, teacher.float(), 1.0, True)
    if spec.kind in ("relu", "leaky_relu", "prelu", "hardtanh"):
        if spec.kind == "hardtanh":
            z = torch.stack([q - spec.lo, q - spec.hi])
            agree = (make_gate(spec, q.detach(), 1.0, True) == target).all(0)
        else:
            z = q
            agree = (q.detach() <= 0) != target  # make_gate's not(q <= 0) == target, one pass fewer
            if loss and gate is not None and gate.is_floating_point():
                return _GateBCE.apply(q, gate, target, beta), _count(agree), agree.numel()
        value = F.binary_cross_entropy_with_logits(beta * z, _as_float(target, z.dtype)) if loss else None
        return value, _count(agree), agree.numel()
    if spec.kind == "maxpool":
        geo = spec.pool
        assert geo is not None
        with torch.no_grad():  # the student's hard gate (max-pool's own first-maximum rule)
            top, student = max_pool_with_indices(q.detach(), geo)
            agree = student == target
        if not loss:
            return None, _count(agree), agree.numel()
        if gate is not None and gate.is_floating_point():
            return window_cross_entropy(q, gate, top, target, beta, geo), _count(agree), agree.numel()
        scaled = q * beta
        top = top * beta  # window maxima: beta > 0
        # cross-entropy of each window's soft-max against the teacher's arg max: logsumexp minus the target's logit
        windows = pool_windows(scaled, geo, -math.inf)  # (N, C, K, *O)
        lse = top + (windows - top.unsqueeze(2)).exp().sum(2).log()
        picked = scaled.flatten(2).gather(2, target.flatten(2)).view(target.shape)
        value = (lse - picked).mean()
        return value, _count(agree), agree.numel()
    raise ValueError(f"unknown gate kind {spec.kind!r}")


class _GateBCE(torch.autograd.Function):
    """``BCE(sigmoid(beta q), t)`` averaged, for a soft gate ``g = sigmoid(beta q)`` that the forward pass already
    computed (a float32 gate as it is; a lower-precision one, from autocast, recomputed from ``q`` in float32).

    Value: ``(sum softplus(beta q) - beta q . t) / n``, with ``softplus(z) = relu(z) - log max(g, 1 - g)`` read
    from the gate: ``log`` of a number in [1/2, 1], exact to the rounding of ``g``, summed as the logs of products
    (:func:`_log_sum`). The value's error is that of the float32 sums (absolute, a few ``2^-24`` times the mean
    ``|beta q|``), as with ``softplus``, which is not called: its float32 CPU kernel (``log1p``) ran at 0.5 or at
    10 ns per element on the same VM from one hour to the next. ``q . t`` is a dot product (no mask pass; the
    boolean target is read as bytes, which converts to float several times faster than ``bool``).
    Gradient: ``beta (g - t) / n``."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, g: torch.Tensor, target: torch.Tensor,  # type: ignore[override]
                beta: float | torch.Tensor) -> torch.Tensor:
        t = _as_float(target, q.dtype)
        if g.dtype != torch.float32:
            g = torch.sigmoid(q * beta)
        if isinstance(beta, torch.Tensor) or beta <= 0:
            positive = F.relu(q * beta).sum()
        else:  # relu(beta q) = beta relu(q): no beta q pass
            positive = F.relu(q).sum() * beta
        larger = torch.rsub(g, 1.0)
        torch.maximum(larger, g, out=larger)
        softplus = positive - _log_sum(larger)
        ctx.save_for_backward(g, t)
        ctx.beta, ctx.n = beta, q.numel()
        return (softplus - torch.dot(q.reshape(-1), t.reshape(-1)) * beta) / max(q.numel(), 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        g, t = ctx.saved_tensors
        return torch.sub(g, t).mul_(grad * ctx.beta / max(ctx.n, 1)), None, None, None


def _log_sum(m: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``sum(log m)`` for float32 ``m`` in [1/2, 1], as the sum of the logs of products of ``chunk`` elements: no
    product falls below ``2^-64``, their roundings (``chunk 2^-24`` relative) add an error of the float32 sum's
    order, and a product is a tenth of the time of a ``log`` (1 ns per element on the 2-core AMD EPYC VM)."""
    flat = m.reshape(-1)
    whole = flat.numel() - flat.numel() % chunk
    total = flat[:whole].view(-1, chunk).prod(1).log_().sum()
    return total + flat[whole:].prod().log() if whole < flat.numel() else total


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as 0/1 of ``dtype`` (through a byte view: the ``bool`` -> float cast is not vectorised)."""
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).to(dtype)


def _count(mask: torch.Tensor) -> torch.Tensor:
    """The number of true elements of a boolean mask (an int32 sum where it cannot overflow: several times
    faster than the default int64 one)."""
    return mask.sum(dtype=torch.int32 if mask.numel() < 2 ** 31 else torch.int64)


def _gate_shape(spec: GateSpec, q: torch.Tensor) -> tuple[int, ...]:
    """The shape of a site's hard gate for pre-activation ``q``."""
    if spec.kind == "hardtanh":
        return (2,) + tuple(q.shape)
    if spec.kind == "maxpool":
        assert spec.pool is not None
        return tuple(q.shape[:2]) + spec.pool.output_size(q.shape[2:])
    return tuple(q.shape)


def describe_output(out: Any) -> str:
    """A short description of a model output's structure, for error messages."""
    if isinstance(out, torch.Tensor):
        return f"a {'' if out.is_floating_point() else str(out.dtype).replace('torch.', '') + ' '}tensor of shape " \
               f"{tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        inner = ", ".join(describe_output(o) for o in out[:4]) + (", ..." if len(out) > 4 else "")
        return f"a {type(out).__name__} of {len(out)} ({inner})"
    if isinstance(out, Mapping):
        return f"a dict with keys {', '.join(repr(k) for k in out)}"
    return f"a {type(out).__name__}"


def select_logits(out: Any, which: int | str | None = None, whose: str = "the model") -> torch.Tensor:
    """The logits tensor (N, classes, ...) of a classifier's output, as the ``logits`` option names it: the output
    itself (``None``: it must then be one tensor), element ``which`` of a tuple/list output (an ``int``), or
    ``out[which]`` of a dict output (a ``str``).

    Raises :class:`InputError` naming the output's structure and the option when the choice does not fit the
    output — in particular for a tuple or dict output without ``logits``: which element is the logits is
    ambiguous, and guessing (element 0 used to be taken) can train on the features."""
    option = f"finetune option logits={which!r}"
    if which is None:
        if not isinstance(out, torch.Tensor):
            raise InputError(f"{whose} returned {describe_output(out)}, not one logits tensor: say which output is "
                             f"the logits with the finetune option logits= (an index, e.g. logits=1 / --logits 1, or "
                             f"a dict key, e.g. logits='logits')")
        logits = out
    elif isinstance(which, int) and not isinstance(which, bool):
        if not isinstance(out, (tuple, list)):
            raise InputError(f"{option}: an index needs a tuple or list output, but {whose} returned "
                             f"{describe_output(out)}")
        if not -len(out) <= which < len(out):
            raise InputError(f"{option}: out of range; {whose} returned {describe_output(out)}")
        logits = out[which]
    else:
        if not isinstance(out, Mapping):
            raise InputError(f"{option}: a key needs a dict output, but {whose} returned {describe_output(out)}")
        if which not in out:
            raise InputError(f"{option}: {whose} returned a dict with no key {which!r} (keys: "
                             f"{', '.join(repr(k) for k in out)})")
        logits = out[which]
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 2:
        raise InputError(f"{option}: selects {describe_output(logits)} of {whose}'s output, not a floating-point "
                         f"logits tensor (N, classes)")
    return logits


class Objective:
    """The training objective of one DLGN (see the module docstring): cross-entropy, plus with a teacher the
    logit term (``use_kd``) and the gate-agreement term over the matched site ``pairs`` (``use_gate_loss``).

    Calling it returns ``(loss, parts)``; ``parts`` holds the detached terms (``loss``, ``ce``, ``kd``, ``gate``)
    and, with a teacher, the agreeing decisions and the decisions per pair (``agree``, ``decisions``)."""

    def __init__(self, sites: Sequence[GateSite], specs: Sequence[GateSpec], pairs: Sequence[tuple[int, int]],
                 options: DistillOptions, *, label_smoothing: float, use_kd: bool, use_gate_loss: bool):
        self.sites, self.specs, self.pairs = list(sites), list(specs), list(pairs)
        self.options = options
        self.label_smoothing = label_smoothing
        self.use_kd, self.use_gate_loss = use_kd, use_gate_loss
        self._checked = False

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, qs: Sequence[torch.Tensor], t_logits: torch.Tensor | None,
                 t_qs: Sequence[torch.Tensor] | None, beta: float, gates: Sequence[torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.options
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        parts = {"ce": ce.detach()}
        loss = ce
        if self.use_kd:
            assert t_logits is not None
            kd = kd_loss(logits, t_logits, d.temperature)
            loss = (1 - d.kd_weight) * ce + d.kd_weight * kd
            parts["kd"] = kd.detach()
        if t_qs is not None and self.pairs:
            terms = self.site_terms(qs, t_qs, beta, loss=self.use_gate_loss, gates=gates)
            parts.update(self.agreement(terms, logits.device))
            if self.use_gate_loss:
                g = torch.stack([t for t, _, _ in terms]).mean()  # type: ignore[misc]
                loss = loss + d.gate_weight * g
                parts["gate"] = g.detach()
        parts["loss"] = loss.detach()
        return loss, parts

    def site_terms(self, qs: Sequence[torch.Tensor], t_qs: Sequence[torch.Tensor], beta: float | torch.Tensor, *,
                   loss: bool, gates: Sequence[torch.Tensor] | None = None
                   ) -> list[tuple[torch.Tensor | None, torch.Tensor, int]]:
        """:func:`site_gate_terms` for every matched pair (shapes checked once, naming the site); ``gates``: the
        student's gates from the same forward pass, made with ``beta``."""
        if not self._checked:
            for i, j in self.pairs:
                expected = tuple(qs[i].shape) if t_qs[j].is_floating_point() else _gate_shape(self.specs[i], qs[i])
                if tuple(t_qs[j].shape) != expected:
                    s = self.sites[i]
                    what = "pre-activation" if t_qs[j].is_floating_point() else "gate"
                    raise InputError(f"site {i} ({s.kind} '{s.node}' at {s.module_path or '<root>'}): the DLGN's "
                                     f"pre-activation has shape {tuple(qs[i].shape)}, the teacher's {what} "
                                     f"{tuple(t_qs[j].shape)} (expected {expected}); the teacher is not the model "
                                     f"the DLGN was converted from")
            self._checked = True
        return [site_gate_terms(self.specs[i], qs[i], t_qs[j], beta, loss=loss, gate=None if gates is None else gates[i])
                for i, j in self.pairs]

    @staticmethod
    def agreement(terms: Sequence[tuple[Any, torch.Tensor, int]], device: torch.device) -> dict[str, torch.Tensor]:
        """``{"agree": agreeing decisions per pair, "decisions": decisions per pair}``."""
        return {"agree": torch.stack([a for _, a, _ in terms]),
                "decisions": torch.tensor([n for _, _, n in terms], device=device)}
