"""Data dependence in a traced graph: which nodes carry data derived from the model's inputs (or from chosen
nodes).

Shape queries (``x.size()``, ``x.shape``) and tensors made from shapes only (``zeros_like``) carry none. It follows
storage, not only uses: a tensor that an in-place op, ``out=`` or index assignment fills with dependent data is
dependent from then on, and so are its aliases (:mod:`relu2dlgn.aliases`, conservatively: every alias, also where
it is read before the write).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .aliases import alias_analysis, is_shape_query, written_input

_SHAPE_ONLY_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, len}
_SHAPE_ONLY_METHODS = {"new_zeros", "new_ones", "new_empty"}


def shape_only(node: fx.Node) -> bool:
    """A shape query, or a tensor made from a shape only (``zeros_like``)."""
    if is_shape_query(node):
        return True
    if node.op == "call_method":
        return node.target in _SHAPE_ONLY_METHODS
    if node.op == "call_function":
        return node.target in _SHAPE_ONLY_FUNCTIONS
    return False


def input_dependence(graph: fx.Graph, modules: dict[str, Any]) -> dict[fx.Node, bool]:
    """Which nodes carry data derived from the graph's inputs. Shape queries and tensors made from shapes do
    not; a tensor that a later op fills with input-dependent data in place does from then on (so do all its
    aliases)."""
    return _propagate(graph, modules, {n for n in graph.nodes if n.op == "placeholder"})


def downstream(graph: fx.Graph, modules: dict[str, Any], sources: set[fx.Node]) -> set[fx.Node]:
    """The nodes whose data depends on the output of one of ``sources`` (themselves included), through uses
    and through in-place writes."""
    dep = _propagate(graph, modules, sources)
    return {n for n, d in dep.items() if d}


def _propagate(graph: fx.Graph, modules: dict[str, Any], sources: set[fx.Node]) -> dict[fx.Node, bool]:
    group, _ = alias_analysis(graph, modules)
    tainted: set[int] = set()
    dep: dict[fx.Node, bool] = {}

    def carries(n: fx.Node) -> bool:
        return dep.get(n, False) or group.get(n) in tainted

    for node in graph.nodes:
        if node in sources:
            dep[node] = True
        elif node.op in ("placeholder", "get_attr", "output") or shape_only(node):
            dep[node] = False
        else:
            dep[node] = any(carries(n) for n in node.all_input_nodes)
        written = written_input(node, modules)
        if written is not None and dep[node]:
            tainted.add(group[written])
    for node in graph.nodes:  # a tensor read after the write (conservatively: every alias of it)
        if group.get(node) in tainted and node.op != "output" and not is_shape_query(node):
            dep[node] = True
    return dep


# --------------------------------------------------------------------------------------------------
