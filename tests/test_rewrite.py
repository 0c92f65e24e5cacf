"""rewrite.py on hand-built torch.fx graphs: alias analysis, pruning, clone dropping, input protection, and the
gating / value graphs of small captured models.

References are computed independently of the code under test: storage sharing and mutations are *observed*
by running the graph node by node (``Observe``), pruned graphs are compared with the unpruned graph on the same
input, module calls are counted, and the gating / value graphs are compared with hand-written eager models.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from relu2dlgn.capture import _check_specialisation, capture
from relu2dlgn.errors import SpecialisationError
from relu2dlgn.rewrite import (alias_analysis, build_gating, build_value, drop_needless_clones, protect_inputs,
                               prune)
from relu2dlgn.sites import find_sites
from _models import MutatesAfterSite, randomize_bn


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

class CountingConv(nn.Conv2d):
    """A 1x1 convolution that counts its calls (reference for "pruned code is not run"). Still a conv module,
    so the alias analysis knows its output is fresh storage."""

    def __init__(self, channels=3, seed=0):
        torch.manual_seed(seed)
        super().__init__(channels, channels, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


class B:
    """Tiny builder for hand-written graphs; ``modules`` is the dict capture() would produce."""

    def __init__(self, modules=None):
        self.g = fx.Graph()
        self.modules = dict(modules or {})

    def input(self, name="x"):
        return self.g.placeholder(name)

    def mod(self, target, *args):
        return self.g.call_module(target, args)

    def fn(self, f, *args, **kwargs):
        return self.g.call_function(f, args, kwargs)

    def meth(self, name, *args, **kwargs):
        return self.g.call_method(name, args, kwargs)

    def out(self, value):
        self.g.output(value)
        return self


def gm(g, modules):
    return fx.GraphModule(dict(modules), g)


class Observe(fx.Interpreter):
    """Runs a graph node by node, keeping every value, and records which earlier values each node changed."""

    def __init__(self, module):
        super().__init__(module, garbage_collect_values=False)
        self.changed: dict[fx.Node, set[fx.Node]] = {}

    def run_node(self, n):
        before = {m: v.clone() for m, v in self.env.items() if isinstance(v, torch.Tensor)}
        out = super().run_node(n)
        self.changed[n] = {m for m, v in before.items() if not torch.equal(self.env[m], v)}
        return out


def observe(g, modules, *inputs):
    obs = Observe(gm(g, modules))
    with torch.no_grad():
        obs.run(*inputs)
    return obs


def storage(t):
    return t.untyped_storage().data_ptr()


def assert_alias_sound(g, modules, *inputs):
    """The analysis is a sound over-approximation of what running the graph shows: tensors that share storage
    are in one group, and every node that changed an earlier tensor is recorded as a mutation of its group."""
    group, mutations = alias_analysis(g, modules)
    obs = observe(g, modules, *inputs)
    tensors = {n: v for n, v in obs.env.items() if isinstance(v, torch.Tensor) and v.numel()}
    for a, va in tensors.items():
        for b, vb in tensors.items():
            if storage(va) == storage(vb):
                assert group[a] == group[b], f"{a.name} and {b.name} share storage but not a group"
    recorded = dict(mutations)
    for n, changed in obs.changed.items():
        if changed:
            assert n in recorded, f"{n.name} mutated {sorted(m.name for m in changed)} but is not recorded"
            assert all(group[m] == recorded[n] for m in changed)
    return group, mutations, obs


def names(g):
    """The graph as a list of op names (placeholder name, module target, method name, function name)."""
    return [n.target if isinstance(n.target, str) else n.target.__name__ for n in g.nodes if n.op != "output"]


def _x(shape=(2, 3, 4, 4), seed=0):
    torch.manual_seed(seed)
    return torch.randn(shape)


def _conv(cin=3, cout=3, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 1)


# --------------------------------------------------------------------------------------------------
# alias_analysis
# --------------------------------------------------------------------------------------------------

def _alias_graph():
    b = B({"conv": _conv(), "conv2": _conv(seed=1), "act": nn.ReLU(inplace=True)})
    x = b.input()
    y = b.mod("conv", x)
    n = {"x": x, "y": y}
    n["view"] = b.meth("view", y, -1)
    n["reshape"] = b.meth("reshape", y, 2, -1)
    n["transpose"] = b.meth("transpose", y, 1, 2)
    n["getitem"] = b.fn(operator.getitem, y, 0)
    n["flatten"] = b.meth("flatten", y, 1)
    n["view_of_view"] = b.meth("view", n["reshape"], -1)
    n["conv2"] = b.mod("conv2", y)
    n["add"] = b.fn(operator.add, y, 1.0)
    n["cat"] = b.fn(torch.cat, (y, y), 1)
    n["clone"] = b.meth("clone", y)
    n["add_"] = b.meth("add_", n["view"], 1.0)                 # mutates y through a view
    n["iadd"] = b.fn(operator.iadd, n["add"], 2.0)             # mutates the fresh `add`
    n["act"] = b.mod("act", n["cat"])                          # in-place module on the fresh `cat`
    n["mul_"] = b.meth("mul_", n["getitem"], 3.0)              # mutates y again, through getitem
    b.out((y, n["add"], n["cat"], n["clone"], n["conv2"]))
    return b, n


def test_alias_views_share_their_inputs_group():
    """view / reshape / transpose / getitem / flatten (and a view of a view) are in their input's storage
    group; running the graph confirms that they really share its storage."""
    b, n = _alias_graph()
    group, _, obs = assert_alias_sound(b.g, b.modules, _x())
    for k in ("view", "reshape", "transpose", "getitem", "flatten", "view_of_view"):
        assert group[n[k]] == group[n["y"]], k
        assert storage(obs.env[n[k]]) == storage(obs.env[n["y"]]), k


def test_alias_fresh_ops_start_new_groups():
    """A conv module, add, cat and clone return new storage (observed) and each starts its own group, distinct
    from the input's and from each other."""
    b, n = _alias_graph()
    group, _, obs = assert_alias_sound(b.g, b.modules, _x())
    fresh = ["x", "y", "conv2", "add", "cat", "clone"]
    assert len({group[n[k]] for k in fresh}) == len(fresh)
    assert len({storage(obs.env[n[k]]) for k in fresh}) == len(fresh)


def test_alias_inplace_ops_are_mutations_of_their_first_arguments_group_in_order():
    """In-place ops (method, operator, module) are listed in graph order as mutations of their first
    argument's group; the observed mutations agree (each changed exactly tensors of that group)."""
    b, n = _alias_graph()
    group, mutations, obs = assert_alias_sound(b.g, b.modules, _x())
    assert mutations == [(n["add_"], group[n["y"]]), (n["iadd"], group[n["add"]]), (n["act"], group[n["cat"]]),
                         (n["mul_"], group[n["y"]])]
    # in-place results alias what they mutate
    for m, k in (("add_", "y"), ("iadd", "add"), ("act", "cat"), ("mul_", "y")):
        assert group[n[m]] == group[n[k]]
        assert storage(obs.env[n[m]]) == storage(obs.env[n[k]])
    # what running shows: add_ changed y and all its views, and nothing outside y's group
    assert obs.changed[n["add_"]] == {n[k] for k in ("y", "view", "reshape", "transpose", "getitem", "flatten",
                                                     "view_of_view")}


def test_alias_analysis_sees_out_keyword_mutation():
    """``torch.add(y, 1.0, out=y)`` writes into y: it must be recorded as a mutation of y's group."""
    b = B({"conv": _conv()})
    x = b.input()
    y = b.mod("conv", x)
    b.g.call_function(torch.add, (y, 1.0), {"out": y})
    b.out(b.meth("sum", y))
    assert_alias_sound(b.g, b.modules, _x())


# --------------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------------

def _pruned_vs_unpruned(build, *inputs):
    """Build the graph twice over the same modules; prune one; return both graphs' outputs and the pruned one."""
    ref_b = build()
    b = build(ref_b.modules)
    prune(b.g, b.modules)
    b.g.lint()
    with torch.no_grad():
        ref = gm(ref_b.g, ref_b.modules)(*[t.clone() for t in inputs])
        for m in b.modules.values():
            if isinstance(m, CountingConv):
                m.calls = 0
        out = gm(b.g, b.modules)(*[t.clone() for t in inputs])
    return b, out, ref


def test_prune_removes_dead_tail():
    """Everything after the last needed value (a module, a method chain) is removed and not run; the output is
    unchanged and equals the eager computation."""
    conv, tail = _conv(), CountingConv(seed=1)

    def build(mods=None):
        b = B(mods or {"conv": conv, "tail": tail})
        x = b.input()
        y = b.mod("conv", x)
        s = b.meth("sum", y)
        d = b.mod("tail", y)
        r = b.meth("relu", d)
        b.meth("mean", r)
        return b.out(s)

    x = _x()
    b, out, ref = _pruned_vs_unpruned(build, x)
    assert names(b.g) == ["x", "conv", "sum"]
    assert tail.calls == 0
    assert torch.equal(out, ref) and torch.equal(out, conv(x).sum())


def test_prune_keeps_inplace_op_through_a_view_though_its_result_is_unused():
    """The issue's case: ``y = conv(x); v = y.view(-1); v.add_(1); out = y.sum()``. Nothing uses add_'s result,
    but it changes y through the view: prune keeps it, and the pruned graph equals the unpruned one and the
    eager computation (conv(x) + 1).sum()."""
    conv = _conv()

    def build(mods=None):
        b = B(mods or {"conv": conv})
        x = b.input()
        y = b.mod("conv", x)
        v = b.meth("view", y, -1)
        b.meth("add_", v, 1.0)
        return b.out(b.meth("sum", y))

    x = _x()
    b, out, ref = _pruned_vs_unpruned(build, x)
    assert names(b.g) == ["x", "conv", "view", "add_", "sum"]
    assert torch.equal(out, ref)
    with torch.no_grad():
        assert torch.allclose(out, (conv(x) + 1).sum())
        assert not torch.allclose(out, conv(x).sum())      # the mutation matters


MUTATORS = {
    "Tensor.add_ on transpose": lambda b, y: b.meth("add_", b.meth("transpose", y, 2, 3), 1.0),
    "operator.iadd on getitem": lambda b, y: b.fn(operator.iadd, b.fn(operator.getitem, y, 0), 2.0),
    "nn.ReLU(inplace) on flatten": lambda b, y: b.mod("act", b.meth("flatten", y, 1)),
    "F.relu(inplace=True)": lambda b, y: b.fn(F.relu, y, inplace=True),
    "Tensor.mul_ directly": lambda b, y: b.meth("mul_", y, -1.0),
}


@pytest.mark.parametrize("mutate", MUTATORS.values(), ids=MUTATORS.keys())
def test_prune_keeps_every_form_of_inplace_op_on_a_needed_tensor(mutate):
    """A result-less in-place op (method, operator, module, F function) on a needed tensor or an alias of it
    survives pruning, and the pruned graph computes what the unpruned one does."""
    conv = _conv()

    def build(mods=None):
        b = B(mods or {"conv": conv, "act": nn.ReLU(inplace=True)})
        x = b.input()
        y = b.mod("conv", x)
        mutate(b, y)
        return b.out(b.meth("sum", y))

    x = _x()
    b, out, ref = _pruned_vs_unpruned(build, x)
    assert len(list(b.g.nodes)) == len(list(build().g.nodes))   # nothing removed
    assert torch.equal(out, ref)
    with torch.no_grad():
        assert not torch.equal(out, conv(x).sum())                # and the mutation did change the output


def test_prune_follows_mutations_to_a_fixpoint():
    """``w = conv2(x); w.mul_(2); y.add_(w)``: y.add_ is kept because y is needed, which makes w needed, which
    makes w.mul_ (earlier in the graph) needed too. A dead branch with its own in-place op is removed."""
    conv, conv2, dead = _conv(), CountingConv(seed=1), CountingConv(seed=2)

    def build(mods=None):
        b = B(mods or {"conv": conv, "conv2": conv2, "dead": dead})
        x = b.input()
        y = b.mod("conv", x)
        w = b.mod("conv2", x)
        b.meth("mul_", w, 2.0)
        d = b.mod("dead", x)
        b.meth("add_", d, 1.0)
        b.meth("add_", y, w)
        return b.out(b.meth("sum", y))

    x = _x()
    b, out, ref = _pruned_vs_unpruned(build, x)
    assert names(b.g) == ["x", "conv", "conv2", "mul_", "add_", "sum"]
    assert conv2.calls == 1 and dead.calls == 0
    assert torch.equal(out, ref)
    with torch.no_grad():
        assert torch.allclose(out, (conv(x) + 2 * nn.Conv2d.forward(conv2, x)).sum())


def test_prune_removes_inplace_op_on_a_dead_tensor():
    """An in-place op whose tensor nothing needs is removed with that tensor, and its producer is not run."""
    conv, dead = _conv(), CountingConv(seed=1)

    def build(mods=None):
        b = B(mods or {"conv": conv, "dead": dead})
        x = b.input()
        y = b.mod("conv", x)
        d = b.mod("dead", x)
        v = b.meth("view", d, -1)
        b.meth("add_", v, 1.0)
        b.fn(F.relu, d, inplace=True)
        return b.out(b.meth("sum", y))

    x = _x()
    b, out, ref = _pruned_vs_unpruned(build, x)
    assert names(b.g) == ["x", "conv", "sum"]
    assert dead.calls == 0
    assert torch.equal(out, ref) and torch.equal(out, conv(x).sum())


def test_prune_keeps_inplace_op_on_an_input_and_unused_inputs():
    """Placeholders are always kept (the signature does not change), and so is an in-place op on an input
    even when the output does not read it: the caller sees the mutation, as with the unpruned graph."""
    def build(mods=None):
        b = B(mods or {})
        x, unused = b.input("x"), b.input("unused")
        b.meth("add_", x, 1.0)
        return b.out(b.meth("sum", unused))

    b = build()
    prune(b.g, b.modules)
    assert names(b.g) == ["x", "unused", "add_", "sum"]
    x, u = _x(), _x(seed=1)
    x0 = x.clone()
    out = gm(b.g, b.modules)(x, u)
    assert torch.equal(x, x0 + 1) and torch.equal(out, u.sum())


def _guarded(mods=None):
    """y = conv(x); a specialisation guard and a torch._assert on y's batch size (result-less nodes depending
    only on shape queries of y); a guard on the shape of a dead tensor; output y.sum()."""
    b = B(mods or {"conv": _conv(), "dead": CountingConv(seed=1)})
    x = b.input()
    y = b.mod("conv", x)
    shape = b.fn(getattr, y, "shape")
    n = b.fn(operator.getitem, shape, 0)
    b.fn(_check_specialisation, n, 2, "block", "model.py:1: if x.shape[0] == 2", "(2, 3, 4, 4)")
    ok = b.fn(operator.eq, b.meth("size", y, 0), 2)
    b.fn(torch._assert, ok, "batch must be 2")
    d = b.mod("dead", x)
    b.fn(_check_specialisation, b.meth("size", d, 1), 3, "dead", "model.py:2", "(2, 3, 4, 4)")
    return b.out(b.meth("sum", y))


def test_prune_keeps_guards_with_their_scalar_cone():
    """Result-less guards whose inputs are only shape queries / comparisons of needed nodes are kept with that
    scalar cone: the pruned graph still refuses a batch of 3 exactly as the unpruned one does, and agrees with
    it on a batch of 2. A guard on a dead tensor's shape goes with that tensor (which is then not run)."""
    b = _guarded()
    prune(b.g, b.modules)
    assert names(b.g) == ["x", "conv", "getattr", "getitem", "_check_specialisation", "size", "eq", "_assert",
                          "sum"]
    pruned, full = gm(b.g, b.modules), gm(_guarded(b.modules).g, b.modules)
    for model in (pruned, full):
        with pytest.raises(SpecialisationError, match="block"):
            model(_x((3, 3, 4, 4)))
    x = _x()
    b.modules["dead"].calls = 0
    assert torch.equal(pruned(x), full(x))
    assert b.modules["dead"].calls == 1            # only the unpruned graph ran it

    # the torch._assert guard alone also survives (take out the first guard)
    b = _guarded()
    first = next(n for n in b.g.nodes if n.target is _check_specialisation)
    b.g.erase_node(first)
    prune(b.g, b.modules)
    assert "_assert" in names(b.g) and "eq" in names(b.g)
    with pytest.raises(AssertionError, match="batch must be 2"):
        gm(b.g, b.modules)(_x((3, 3, 4, 4)))


def test_prune_keeps_out_keyword_mutation():
    """``torch.add(y, 1.0, out=y)`` (result unused) changes y, which the output reads: prune must keep it."""
    conv = _conv()

    def build(mods=None):
        b = B(mods or {"conv": conv})
        x = b.input()
        y = b.mod("conv", x)
        b.g.call_function(torch.add, (y, 1.0), {"out": y})
        return b.out(b.meth("sum", y))

    b, out, ref = _pruned_vs_unpruned(build, _x())
    assert torch.equal(out, ref)


# --------------------------------------------------------------------------------------------------
# drop_needless_clones
# --------------------------------------------------------------------------------------------------

def _clone_graph(after):
    """y = conv(x); c = y.clone(); <after(b, y)>; output (c, y.sum()). Returns the builder and the clone."""
    b = B({"conv": _conv(), "act": nn.ReLU(inplace=True)})
    x = b.input()
    y = b.mod("conv", x)
    c = b.meth("clone", y)
    after(b, y)
    b.out((c, b.meth("sum", y)))
    return b, c


CLONE_CASES = {
    # name: (ops after the clone, clone must stay)
    "no later mutation": (lambda b, y: b.meth("relu", y), False),
    "later add_": (lambda b, y: b.meth("add_", y, 1.0), True),
    "later add_ through a view": (lambda b, y: b.meth("add_", b.meth("view", y, -1), 1.0), True),
    "later in-place module through getitem": (lambda b, y: b.mod("act", b.fn(operator.getitem, y, 1)), True),
    "later iadd through reshape": (lambda b, y: b.fn(operator.iadd, b.meth("reshape", y, 2, -1), 1.0), True),
    "mutation of an unrelated fresh tensor": (lambda b, y: b.meth("add_", b.fn(operator.add, y, 0.0), 1.0), False),
}


@pytest.mark.parametrize("case", CLONE_CASES.values(), ids=CLONE_CASES.keys())
def test_drop_needless_clones(case):
    """A captured pre-activation's clone is dropped exactly when no later in-place op can overwrite its source
    (directly or through an alias). Either way the captured value equals the source's value at the site
    (eager conv(x)), so the clone was kept wherever it mattered."""
    after, keep = case
    b, c = _clone_graph(after)
    drop_needless_clones(b.g, [c], b.modules)
    b.g.lint()
    clones = [n for n in b.g.nodes if n.op == "call_method" and n.target == "clone"]
    assert (clones == [c]) == keep and (clones == []) == (not keep)
    x = _x()
    with torch.no_grad():
        captured, _ = gm(b.g, b.modules)(x)
        assert torch.equal(captured, b.modules["conv"](x))


def test_drop_needless_clones_ignores_mutations_before_the_clone():
    """An in-place op *before* the capture cannot overwrite the captured value: the clone is dropped, and the
    captured value is the mutated one (conv(x) + 1), as at the site."""
    b = B({"conv": _conv()})
    x = b.input()
    y = b.mod("conv", x)
    b.meth("add_", y, 1.0)
    c = b.meth("clone", y)
    b.out((c,))
    drop_needless_clones(b.g, [c], b.modules)
    assert "clone" not in names(b.g)
    x = _x()
    with torch.no_grad():
        assert torch.allclose(gm(b.g, b.modules)(x)[0], b.modules["conv"](x) + 1)


def test_drop_needless_clones_keeps_clone_of_input_mutated_later():
    """The source may be an input: a later in-place op on it keeps the clone."""
    b = B()
    x = b.input()
    c = b.meth("clone", x)
    b.meth("relu_", x)
    b.out((c,))
    drop_needless_clones(b.g, [c], b.modules)
    assert "clone" in names(b.g)
    x = _x()
    assert torch.equal(gm(b.g, b.modules)(x.clone())[0], x)


# --------------------------------------------------------------------------------------------------
# protect_inputs
# --------------------------------------------------------------------------------------------------

def _two_inputs(mutate_x):
    b = B()
    x, w = b.input("x"), b.input("w")
    mutate_x(b, x)
    b.out(b.fn(operator.add, b.fn(operator.mul, x, 2.0), w))
    return b


@pytest.mark.parametrize("mutate", [
    lambda b, x: b.meth("add_", x, 1.0),
    lambda b, x: b.meth("mul_", b.meth("view", x, -1), -1.0),
    lambda b, x: b.fn(torch.relu_, b.fn(operator.getitem, x, 0)),
], ids=["add_", "mul_ through view", "relu_ through getitem"])
def test_protect_inputs_clones_a_mutated_input(mutate):
    """An input that an in-place op mutates (directly or through a view) is cloned once at the top: after
    running, the caller's tensor is unchanged, and the output is what the unprotected graph computes on a copy.
    The input that is not mutated is not cloned."""
    b = _two_inputs(mutate)
    protect_inputs(b.g, b.modules)
    b.g.lint()
    clones = [n for n in b.g.nodes if n.op == "call_method" and n.target == "clone"]
    assert len(clones) == 1 and clones[0].args[0].name == "x"
    assert [n.name for n in clones[0].args[0].users] == [clones[0].name]    # everything else reads the copy
    x, w = _x(), _x(seed=1)
    x0, w0 = x.clone(), w.clone()
    out = gm(b.g, b.modules)(x, w)
    assert torch.equal(x, x0) and torch.equal(w, w0)
    ref = gm(_two_inputs(mutate).g, {})(x0.clone(), w0)
    assert torch.equal(out, ref)


def test_protect_inputs_leaves_unmutated_inputs_alone():
    """A graph whose in-place ops touch no input (only a fresh tensor) is unchanged, and running it leaves the
    caller's tensors as they were."""
    b = B()
    x, w = b.input("x"), b.input("w")
    s = b.fn(operator.add, x, w)
    b.meth("relu_", s)
    b.out(s)
    before = b.g.python_code("self").src
    protect_inputs(b.g, b.modules)
    assert b.g.python_code("self").src == before
    x, w = _x(), _x(seed=1)
    x0, w0 = x.clone(), w.clone()
    out = gm(b.g, b.modules)(x, w)
    assert torch.equal(x, x0) and torch.equal(w, w0) and torch.equal(out, (x0 + w0).clamp_min(0))


# --------------------------------------------------------------------------------------------------
# build_gating / build_value on small captured models
# --------------------------------------------------------------------------------------------------

class Src(nn.Module):
    """Four gate sites (in-place module with an alias, max-pool, leaky ReLU, torch.relu_) and a tail after the
    last one."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.bn(self.conv1(x))
        skip = y
        y = self.act(y)                               # site 0: in place, `skip` sees the activation too
        y = self.pool(y + skip)                       # site 1
        z = F.leaky_relu(self.conv2(y), 0.1)          # site 2
        z = torch.relu_(self.conv3(z) + 0.25)         # site 3
        return self.fc(z.mean((2, 3)))                # tail after the last site


class SrcLinearPreActs(nn.Module):
    """Hand-written reference for the DLGN gating graph of ``Src``: activations removed (identity), max-pool
    replaced by average pooling of the same geometry, returning the pre-activation of every site."""

    def __init__(self, src: Src):
        super().__init__()
        self.src = src

    def forward(self, x):
        s = self.src
        q0 = s.bn(s.conv1(x))
        q1 = q0 + q0
        q2 = s.conv2(F.avg_pool2d(q1, 3, 2, 1, False, count_include_pad=False))
        q3 = s.conv3(q2) + 0.25
        return q0, q1, q2, q3


class SrcPreActs(nn.Module):
    """Hand-written reference for the DGN gating graph of ``Src``: the source's pre-activations."""

    def __init__(self, src: Src):
        super().__init__()
        self.src = src

    def forward(self, x):
        s = self.src
        q0 = s.bn(s.conv1(x))
        a0 = F.relu(q0)
        q1 = a0 + a0
        q2 = s.conv2(F.max_pool2d(q1, 3, 2, 1))
        q3 = s.conv3(F.leaky_relu(q2, 0.1)) + 0.25
        return q0, q1, q2, q3


def _src():
    torch.manual_seed(0)
    return randomize_bn(Src()).eval()


def _build(model, linear):
    cap = capture(model)
    sites, _ = find_sites(cap.graph, cap.modules)
    return cap, sites, build_gating(cap.graph, cap.modules, sites, [], linear)


_ACTIVATION_TARGETS = {F.relu, torch.relu, torch.relu_, F.leaky_relu, F.leaky_relu_, F.hardtanh, F.relu6,
                       F.max_pool1d, F.max_pool2d, F.max_pool3d, F.prelu}


def test_dlgn_gating_graph_has_no_activation_and_no_tail():
    """DLGN gating graph of Src: no activation or max-pool node (functions, methods or modules) remains, nothing
    of the tail after the last site (mean, fc) is left, every node feeds the output, and the needless
    pre-activation clones are gone (no in-place op is left to overwrite them)."""
    model = _src()
    _, sites, gating = _build(model, linear=True)
    assert len(sites) == 4
    graph = gating.graph
    for n in graph.nodes:
        assert not (n.op == "call_function" and n.target in _ACTIVATION_TARGETS), n.format_node()
        assert not (n.op == "call_method" and n.target in ("relu", "relu_", "mean", "clone")), n.format_node()
        if n.op == "call_module":
            assert n.target in ("conv1", "bn", "conv2", "conv3"), n.format_node()
    output = next(n for n in graph.nodes if n.op == "output")
    live, stack = set(), [output]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    assert live == set(graph.nodes)


def test_dlgn_gating_equals_hand_written_linear_model_and_is_affine():
    """The DLGN gating graph evaluated on x equals the hand-written source-without-activations model (max-pool
    as average pooling), and is affine in x (float64)."""
    model = _src()
    _, _, gating = _build(model, linear=True)
    ref = SrcLinearPreActs(model)
    x = _x((2, 2, 6, 6))
    with torch.no_grad():
        got, want = gating(x), ref(x)
        assert len(got) == len(want) == 4
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
        g64 = gating.double()
        x1, x2 = x.double(), _x((2, 2, 6, 6), seed=5).double()
        for m, a, b in zip(g64(0.3 * x1 + 0.7 * x2), g64(x1), g64(x2)):
            assert torch.allclose(m, 0.3 * a + 0.7 * b, rtol=1e-10, atol=1e-10)


def test_dgn_gating_captures_preactivations_before_inplace_sites():
    """DGN gating graph of Src returns exactly the source's pre-activations (hand-written), including q0, which
    the in-place activation overwrites right after the site; and the caller's input is untouched."""
    model = _src()
    _, _, gating = _build(model, linear=False)
    x = _x((2, 2, 6, 6))
    x0 = x.clone()
    with torch.no_grad():
        got, want = gating(x), SrcPreActs(model)(x)
    assert torch.equal(x, x0)
    assert (want[0] < 0).any()                   # the in-place ReLU would have changed it
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_dgn_value_graph_with_hard_gates_equals_source_exactly():
    """The value graph fed hard gates built by hand from the source's pre-activations (1(q > 0), arg-max
    indices of each pool window) reproduces the source model bit for bit (DGN, value input = x)."""
    model = _src()
    cap, sites, _ = _build(model, linear=False)
    value = build_value(cap.graph, cap.modules, sites, [])
    assert [n.target for n in value.graph.nodes if n.op == "placeholder"] == ["x", "gate_0", "gate_1", "gate_2",
                                                                                "gate_3"]
    x = _x((2, 2, 6, 6))
    with torch.no_grad():
        q0, q1, q2, q3 = SrcPreActs(model)(x)
        gates = [(q0 > 0).float(), F.max_pool2d(q1, 3, 2, 1, return_indices=True)[1], (q2 > 0).float(), (q3 > 0).float()]
        for g in (gates[0], gates[2], gates[3]):
            assert 0 < g.mean() < 1                      # every ReLU-type site is really gating: not vacuous
        out = value(x.clone(), *gates)
        assert torch.equal(out, model(x.clone()))
        # the gates matter: flipping the first site's gate changes the output
        assert not torch.equal(value(x.clone(), 1 - gates[0], *gates[1:]), out)


def test_gating_keeps_the_clone_a_later_inplace_op_needs():
    """MutatesAfterSite: ``z = relu(y); y.add_(1); w = relu(y)``. In both modes the first pre-activation is
    conv(x) (captured before the add_) and the second conv(x) + 1; in DLGN mode exactly one clone is kept."""
    torch.manual_seed(0)
    model = MutatesAfterSite().eval()
    x = _x((2, 3, 5, 5))
    with torch.no_grad():
        q = model.conv(x)
        for linear in (True, False):
            _, _, gating = _build(model, linear)
            q0, q1 = gating(x)
            assert torch.equal(q0, q) and torch.allclose(q1, q + 1)
            if linear:
                assert sum(n.target == "clone" for n in gating.graph.nodes) == 1


def test_gating_graph_does_not_mutate_the_callers_input():
    """An in-place activation applied to the model input: the DGN gating graph clones the input, so the caller's
    tensor is unchanged and the first pre-activation is the input itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(1, 2, 1), nn.ReLU()).eval()
    _, _, gating = _build(model, linear=False)
    x = _x((2, 1, 4, 4))
    x0 = x.clone()
    with torch.no_grad():
        q0, q1 = gating(x)
        assert torch.equal(x, x0)
        assert torch.equal(q0, x0) and torch.equal(q1, model[1](F.relu(x0)))
