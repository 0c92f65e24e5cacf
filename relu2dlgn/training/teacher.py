"""The teacher: the source network's output and, at every gate site, its pre-activation or its hard gate, in one
forward pass.

Anything that satisfies :class:`Teacher` can teach: :class:`TeacherTap` wraps a source network (what
``finetune(dlgn, ..., teacher=model)`` does), :class:`DLGNTeacher` a DLGN or DGN. Sites are matched by the
source-graph node name (:func:`match_sites`), which a DLGN converted from the same architecture shares.

With ``targets=True`` (what the trainer uses) a teacher returns each site's *hard gate* instead of its
pre-activation (:func:`relu2dlgn.gates.make_gate`: a boolean mask, a stacked pair for hardtanh, per-plane arg-max
indices for max-pool): the training targets, computed in the forward pass itself. The tap then needs no copy of
any pre-activation, and a max-pool site's arg max comes from the source's own max-pool call (called with
``return_indices=True`` in its place) rather than from a second pass over the windows.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import torch
import torch.fx as fx
from torch import nn

from ..capture import capture
from ..dlgn import DLGN
from ..errors import InputError
from ..gates import GateSpec, PoolGeometry, make_gate, max_pool_with_indices
from ..rewrite import alias_analysis, drop_needless_clones
from ..sites import find_sites
from ..utils.modes import eval_mode


@runtime_checkable
class Teacher(Protocol):
    """What the trainer reads from a teacher: calling it returns ``(output, per-site tensors)`` — pre-activations,
    or hard gates for a teacher made with ``targets=True``; ``site_nodes`` and ``site_kinds`` name and classify
    its gate sites in that order."""

    site_nodes: Sequence[str]
    site_kinds: Sequence[str]

    def __call__(self, *inputs: torch.Tensor) -> tuple[Any, tuple[torch.Tensor, ...]]: ...


class TeacherTap(nn.Module):
    """The source network, returning ``(output, (q_0, ..., q_{n-1}))``: its output and the pre-activation at
    every gate site, in one forward pass (a DGN's gating graph would give the ``q_i`` but not the output).

    ``site_nodes[i]`` is the source-graph node name of site ``i`` — the same names a DLGN converted from the
    same architecture has in ``dlgn.sites[j].node``, which is how sites are matched. The tap shares the
    source's parameters and modules (it is a view, not a copy) and never changes their train/eval flags.
    """

    def __init__(self, model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None,
                 leaf_modules: Iterable[type | str] = (), *, targets: bool = False):
        super().__init__()
        cap = capture(model, example_inputs, leaf_modules)
        sites, _ = find_sites(cap.graph, cap.modules)
        g = fx.Graph()
        val_map: dict[fx.Node, fx.Node] = {}
        out = g.graph_copy(cap.graph, val_map)
        captures = []
        for node, c in sites:
            at, q = val_map[node], val_map[c.input]
            with g.inserting_before(at):
                if not targets:
                    captures.append(g.call_method("clone", (q,)))
                elif c.kind == "maxpool":  # the source's own max-pool, with its indices
                    p = c.params
                    pooled = g.call_function(_max_pool_with_indices, (q, p["ndim"], tuple(p["kernel_size"]),
                                                                      tuple(p["stride"]), tuple(p["padding"]),
                                                                      tuple(p["dilation"]), bool(p["ceil_mode"])))
                    captures.append(g.call_function(operator.getitem, (pooled, 1)))
                    at.replace_all_uses_with(g.call_function(operator.getitem, (pooled, 0)))
                    g.erase_node(at)
                else:  # before the site: an in-place activation has not yet overwritten q
                    captures.append(g.call_function(_hard_gate, (q, c.kind, float(c.params.get("lo", 0.0)),
                                                                 float(c.params.get("hi", 0.0)))))
        g.output((out, tuple(captures)))
        if not targets:
            drop_needless_clones(g, captures, cap.modules)
        group, mutations = alias_analysis(g, cap.modules)
        inputs = {group[n] for n in g.nodes if n.op == "placeholder"}
        # a source whose first ops work in place on its input would change the batch the DLGN then sees
        self.mutates_input = any(grp in inputs for _, grp in mutations)
        targets = {n.target for n in g.nodes if n.op in ("call_module", "get_attr")}
        self.graph_module = fx.GraphModule({t: cap.modules[t] for t in targets}, g, class_name="TeacherTap")
        self.site_nodes = [node.name for node, _ in sites]
        self.site_kinds = [c.kind for _, c in sites]
        self.targets = targets

    def forward(self, *inputs: torch.Tensor) -> tuple[Any, tuple[torch.Tensor, ...]]:
        if self.mutates_input:
            inputs = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)
        with eval_mode(self.graph_module):  # the source's own modules: their flags are restored after the call
            out, qs = self.graph_module(*inputs)
        return out, tuple(qs)


def _hard_gate(q: torch.Tensor, kind: str, lo: float, hi: float) -> torch.Tensor:
    """The hard gate of a ReLU-family or hardtanh site (:func:`relu2dlgn.gates.make_gate`)."""
    return make_gate(GateSpec(kind, lo, hi), q, 1.0, True)  # type: ignore[arg-type]


def _max_pool_with_indices(q: torch.Tensor, ndim: int, kernel_size: tuple[int, ...], stride: tuple[int, ...],
                           padding: tuple[int, ...], dilation: tuple[int, ...], ceil_mode: bool) -> Any:
    """``(values, per-plane arg-max indices)`` of a max-pool site: the indices are its hard gate."""
    return max_pool_with_indices(q, PoolGeometry(ndim, kernel_size, stride, padding, dilation, ceil_mode))


class DLGNTeacher(nn.Module):
    """A DLGN (or DGN) used as teacher: its hard-gate output and its gating pre-activations (its hard gates with
    ``targets=True``)."""

    def __init__(self, dlgn: DLGN, *, targets: bool = False):
        super().__init__()
        self.dlgn = dlgn
        self.site_nodes = [s.node for s in dlgn.sites]
        self.site_kinds = [s.kind for s in dlgn.sites]
        self.targets = targets

    def forward(self, *inputs: torch.Tensor) -> tuple[Any, tuple[torch.Tensor, ...]]:
        r = self.dlgn.run(*inputs, hard=True)
        return r.output, (r.gates if self.targets else r.pre_activations)


def make_teacher(teacher: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None,
                 leaf_modules: Iterable[type | str] = (), *, targets: bool = False) -> Teacher:
    """Wrap a source network (or a DLGN/DGN) so that calling it returns ``(output, pre-activations)`` — or
    ``(output, hard gates)`` with ``targets=True``; a :class:`Teacher` is returned as is. ``leaf_modules`` must be
    those the DLGN was converted with."""
    if isinstance(teacher, (TeacherTap, DLGNTeacher)):
        return teacher
    if isinstance(teacher, DLGN):
        return DLGNTeacher(teacher, targets=targets)
    if not isinstance(teacher, nn.Module):
        if isinstance(teacher, Teacher):
            return teacher
        raise InputError(f"teacher must be an nn.Module (the source network), got {type(teacher).__name__}")
    return TeacherTap(teacher, example_inputs, leaf_modules, targets=targets)


def match_sites(dlgn: DLGN, teacher_nodes: Sequence[str], teacher_kinds: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs ``(dlgn site index, teacher site index)`` matched by source node name; every DLGN site must have
    a teacher site of the same kind (a DLGN converted with ``pool="avg"`` simply has no max-pool sites)."""
    where = {n: i for i, n in enumerate(teacher_nodes)}
    pairs, missing = [], []
    for site in dlgn.sites:
        j = where.get(site.node)
        if j is None or teacher_kinds[j] != site.kind:
            missing.append(f"site {site.index} ({site.kind} '{site.node}' at {site.module_path or '<root>'})")
        else:
            pairs.append((site.index, j))
    if missing:
        more = " ..." if len(missing) > 4 else ""
        names = ", ".join(teacher_nodes[:6]) + (" ..." if len(teacher_nodes) > 6 else "")
        raise InputError(
            f"the teacher's gate sites do not match the DLGN's: {len(missing)} DLGN site(s) have no teacher site "
            f"of the same name and kind: {', '.join(missing[:4])}{more}. The teacher has {len(teacher_nodes)} "
            f"sites ({names}). Pass the model the DLGN was converted from (same architecture, same leaf_modules).")
    return pairs
