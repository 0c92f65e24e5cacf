"""Rewrite: one traced graph → a gating graph and a value graph, joined by one gate per site.

* **gating graph** ``(*inputs) -> (q_0, ..., q_{n-1})``: the pre-activation of every gate site.  In DGN mode
  the source network's nonlinearities are kept; in DLGN mode every gate site's activation is removed (the
  site becomes the identity: its input itself for an in-place activation, a copy of it for an out-of-place
  one that a later in-place op writes into) and max-pooling is replaced by its linear stand-in (average
  pooling of the same geometry), so each ``q_i`` is an affine function of the input in eval mode.  The part of the graph
  after the last site is dead and removed.
* **value graph** ``(*value_inputs, gate_0, ..., gate_{n-1}) -> output``: the source graph with each site
  replaced by the application of its gate to the value (see :mod:`relu2dlgn.gates`); in-place sites stay
  in place (``v.mul_(g)``) so that tensors aliasing the activated one see the same values as in the source.

In-place ops are never dropped: torch.fx's dead-code elimination does not see that ``y.add_(1)`` changes
``y``, so pruning here keeps every in-place op that mutates a tensor the kept graph reads.  A captured
pre-activation that a later in-place op could overwrite is cloned at the site.
"""
from __future__ import annotations

import copy
import operator
from typing import Any

import torch.fx as fx

from . import gates as G
from .aliases import alias_analysis, is_fresh
from .sites import Classified

def _copy_graph(graph: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    new = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, val_map)
    new.output(out)
    return new, val_map


def _pool_args(c: Classified) -> tuple:
    p = c.params
    return (p["ndim"], tuple(p["kernel_size"]), tuple(p["stride"]), tuple(p["padding"]), tuple(p["dilation"]),
            p["ceil_mode"])


def _standin(graph: fx.Graph, node: fx.Node, c: Classified) -> fx.Node:
    with graph.inserting_before(node):
        new = graph.call_function(G.avg_pool_standin, (c.input, *_pool_args(c)))
    new.meta = dict(node.meta)
    return new


def _replace(g: fx.Graph, val_map: dict[fx.Node, fx.Node], source_node: fx.Node, repl: fx.Node) -> None:
    """Replace the copy of ``source_node`` by ``repl`` everywhere, and remember it for later look-ups."""
    n = val_map[source_node]
    n.replace_all_uses_with(repl)
    g.erase_node(n)
    val_map[source_node] = repl


def _replace_standins(g: fx.Graph, val_map: dict[fx.Node, fx.Node],
                      standins: list[tuple[fx.Node, Classified]]) -> None:
    for node, c in standins:
        _replace(g, val_map, node, _standin(g, val_map[node], _remap(c, val_map)))


def _remap(c: Classified, val_map: dict[fx.Node, fx.Node]) -> Classified:
    weight = val_map[c.weight] if isinstance(c.weight, fx.Node) else c.weight
    return Classified(c.kind, c.op, c.inplace, val_map[c.input], c.params, weight)


def build_gating(graph: fx.Graph, modules: dict[str, Any], sites: list[tuple[fx.Node, Classified]],
                 standins: list[tuple[fx.Node, Classified]], linear: bool) -> fx.GraphModule:
    g, val_map = _copy_graph(graph)
    clones: list[fx.Node] = []
    captures: list[fx.Node] = []
    for node, c in sites:
        n, c = val_map[node], _remap(c, val_map)
        with g.inserting_before(n):
            cap = g.call_method("clone", (c.input,))
        cap.meta = {"module_path": n.meta.get("module_path", ""), "capture": True}
        captures.append(cap)
        if linear:
            if c.kind == "maxpool":
                repl = _standin(g, n, c)
            elif c.inplace:     # an in-place activation returns its input: without it, the input itself
                repl = c.input
            else:               # an out-of-place one returns a new tensor: ops on it must not reach its input
                with g.inserting_before(n):
                    repl = g.call_method("clone", (c.input,))
                repl.meta = dict(n.meta)
                clones.append(repl)
            _replace(g, val_map, node, repl)
    _replace_standins(g, val_map, standins)
    output = next(n for n in reversed(g.nodes) if n.op == "output")
    output.args = (tuple(captures),)
    protect_inputs(g, modules)

    drop_needless_clones(g, captures + clones, modules)
    prune(g, modules)
    return _graph_module(g, modules, "Gating")


def drop_needless_clones(g: fx.Graph, clones: list[fx.Node], modules: dict[str, Any]) -> None:
    """Replace each ``x.clone()`` in ``clones`` by ``x`` unless an in-place op after the clone could write into
    ``x`` or into the clone (either would then be seen through the other): a pre-activation captured at its
    site, or the new tensor an out-of-place activation returned before the DLGN removed it."""
    group, mutations = alias_analysis(g, modules)
    order = {n: i for i, n in enumerate(g.nodes)}
    for clone in clones:
        src = clone.args[0]
        if not any(order[m] > order[clone] and grp in (group[src], group[clone]) for m, grp in mutations):
            clone.replace_all_uses_with(src)
            g.erase_node(clone)


def protect_inputs(g: fx.Graph, modules: dict[str, Any]) -> None:
    """Clone every input that an in-place op of the gating graph could mutate: the caller's tensor is the
    value network's input too, and must reach it as the source model would have seen it."""
    group, mutations = alias_analysis(g, modules)
    mutated = {grp for _, grp in mutations}
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    for ph in placeholders:
        if group[ph] in mutated:
            with g.inserting_after(placeholders[-1]):
                copy_ = g.call_method("clone", (ph,))
            ph.replace_all_uses_with(copy_, delete_user_cb=lambda user: user is not copy_)


def prune(g: fx.Graph, modules: dict[str, Any]) -> None:
    """Remove what the outputs do not need, keeping in-place ops on needed tensors, guards/asserts and
    grad-mode switches."""
    group, mutations = alias_analysis(g, modules)
    nodes = list(g.nodes)
    needed: set[fx.Node] = set()

    def need(n: fx.Node) -> None:
        stack = [n]
        while stack:
            x = stack.pop()
            if x not in needed:
                needed.add(x)
                stack.extend(x.all_input_nodes)

    for n in nodes:
        if n.op in ("output", "placeholder") or n.meta.get("grad_mode"):  # grad-mode switches: context.py
            need(n)
    changed = True
    while changed:
        changed = False
        needed_groups = {group[n] for n in needed if n in group}
        for m, grp in mutations:
            if m not in needed and grp in needed_groups:
                need(m)
                changed = True
        for n in nodes:
            if n not in needed and not n.users and n.op != "output" and not is_fresh(n, modules):
                cone = _scalar_cone(n, needed)
                if cone is not None:
                    need(n)
                    changed = True
    for n in reversed(nodes):
        if n not in needed:
            g.erase_node(n)


_SCALAR_FUNCTIONS = {getattr, len, max, min, operator.getitem, operator.lt, operator.le, operator.gt, operator.ge,
                     operator.eq, operator.ne, operator.and_, operator.or_, operator.not_, operator.add,
                     operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod}


def _scalar_cone(n: fx.Node, needed: set[fx.Node]) -> set[fx.Node] | None:
    """The not-yet-needed ancestors of a result-less node (a guard or an assert) if they are all cheap scalar
    ops (shape queries, comparisons) on needed nodes; ``None`` if it depends on other computation."""
    cone: set[fx.Node] = set()
    stack = list(n.all_input_nodes)
    if not stack:
        return None
    while stack:
        x = stack.pop()
        if x in needed or x in cone:
            continue
        scalar = (x.op == "call_function" and x.target in _SCALAR_FUNCTIONS) or (
            x.op == "call_method" and x.target in ("size", "dim", "numel"))
        if not scalar:
            return None
        cone.add(x)
        stack.extend(x.all_input_nodes)
    return cone


def build_value(graph: fx.Graph, modules: dict[str, Any], sites: list[tuple[fx.Node, Classified]],
                standins: list[tuple[fx.Node, Classified]]) -> fx.GraphModule:
    g, val_map = _copy_graph(graph)
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    last = placeholders[-1]
    gate_inputs: list[fx.Node] = []
    for i in range(len(sites)):
        with g.inserting_after(last):
            last = g.placeholder(f"gate_{i}")
        gate_inputs.append(last)
    extra_modules: dict[str, Any] = {}
    for (node, c), gate in zip(sites, gate_inputs):
        n, c = val_map[node], _remap(c, val_map)
        with g.inserting_before(n):
            if c.kind == "relu":
                new = g.call_function(G.gate_relu_ if c.inplace else G.gate_relu, (c.input, gate))
            elif c.kind == "leaky_relu":
                fn = G.gate_leaky_relu_ if c.inplace else G.gate_leaky_relu
                new = g.call_function(fn, (c.input, gate, c.params["negative_slope"]))
            elif c.kind == "prelu":
                weight = c.weight
                if isinstance(weight, str):
                    extra_modules[weight] = modules[weight.rsplit(".", 1)[0]].weight
                    weight = g.get_attr(weight)
                new = g.call_function(G.gate_prelu, (c.input, gate, weight))
            elif c.kind == "hardtanh":
                fn = G.gate_hardtanh_ if c.inplace else G.gate_hardtanh
                new = g.call_function(fn, (c.input, gate, c.params["lo"], c.params["hi"]))
            elif c.kind == "maxpool":
                new = g.call_function(G.gate_maxpool, (c.input, gate, *_pool_args(c)))
            else:  # pragma: no cover - classify_gate only returns the kinds above
                raise AssertionError(c.kind)
        new.meta = dict(n.meta)
        _replace(g, val_map, node, new)
    _replace_standins(g, val_map, standins)
    return _graph_module(g, {**modules, **extra_modules}, "Value")


def _graph_module(g: fx.Graph, modules: dict[str, Any], name: str) -> fx.GraphModule:
    g.lint()
    targets = sorted({n.target for n in g.nodes if n.op in ("call_module", "get_attr")})
    root = copy.deepcopy({t: modules[t] for t in targets})
    return fx.GraphModule(root, g, class_name=name)
