"""``relu2dlgn.convert``: capture → gate sites → rewrite → :class:`~relu2dlgn.DLGN`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .capture import Captured, capture, default_example_inputs
from .context import unwrap_compiled
from .dlgn import DLGN
from .errors import ConversionError, Relu2DlgnError
from .options import option, positive
from .report import ConversionReport, InputSpec
from .rewrite import build_gating, build_value
from .dependence import downstream
from .sites import Classified, GateSite, Nonlinearity, find_sites
from .types import MODES, POOLS, VALUE_INPUTS, Mode, Pool, ValueInput
from .utils.modes import eval_mode
from .verify import verify as verify_conversion

DEFAULT_BETA = 10.0


@dataclass
class ConvertOptions:
    """The options of :func:`convert` that a command line or config file sets (same names and defaults)."""

    mode: Mode = option("dlgn", "dlgn: the gating network is deep linear; dgn: it is the source network")
    value_input: ValueInput = option("input", "what the value network is fed: the input, or ones")
    beta: float = option(DEFAULT_BETA, "soft-gate sharpness sigmoid(beta q) in training", check=positive)
    pool: Pool = option("gate", "DLGN max-pool: a gate (arg max), or average pooling in both networks")
    strict: bool = option(True, "refuse nonlinearities that are not gates (DLGN); --no-strict keeps them")
    verify: bool = option(True, "check numerically that the conversion did what it claims "
                                "(--no-verify-conversion skips it)", name="verify_conversion")


def convert(
    model: nn.Module,
    mode: Mode = "dlgn",
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    value_input: ValueInput = "input",
    beta: float = DEFAULT_BETA,
    pool: Pool = "gate",
    strict: bool = True,
    leaf_modules: Iterable[type | str] = (),
    verify: bool = True,
) -> DLGN:
    """Convert a ReLU network into a DGN or DLGN (gating graph + value graph), starting from its weights.

    Args:
        model: any torch.fx-traceable ``nn.Module`` (timm, torchvision, your own). It is not modified.
        mode: ``"dlgn"`` — the gating network is a deep *linear* network (every gate site's activation
            removed, max-pooling replaced by a linear stand-in), so in eval mode each pre-activation is an
            affine function of the input; ``"dgn"`` — the gating network is the source network itself.
        example_inputs: input(s) used to resolve shape-dependent Python control flow and to record the
            expected input rank (default: timm's ``pretrained_cfg['input_size']`` when needed).
        value_input: ``"input"`` (x) or ``"ones"`` (a constant tensor of ones shaped like x). Default:
            ``"input"`` — with it a DGN reproduces the source model and a DLGN starts close to it;
            ``"ones"`` is the papers' experiment that all information flows through the gates.
        beta: soft-gate sharpness for training (``sigmoid(beta q)``); change later with ``dlgn.beta = ...``.
        pool: DLGN only: ``"gate"`` — max-pool is a gate (arg-max of the gating net's pre-pool tensor picks
            what the value net passes; soft-max weights in training) while the gating net continues with
            average pooling; ``"avg"`` — average pooling in both networks (the authors' choice).
        strict: DLGN only: raise :class:`ConversionError` listing every operation that is neither a gate nor
            on the allow-list of affine operations (:mod:`relu2dlgn.affine`): sigmoid, softmax, GELU, products of
            two input-dependent tensors, opaque leaf modules, ... ``False`` keeps them and records them in
            ``dlgn.report``. DGN keeps (and reports) them always.
        leaf_modules: module types or module paths to keep opaque (not traced into); remembered as
            ``dlgn.leaf_modules`` (fine-tuning traces the teacher with them).
        verify: check numerically what was built (:mod:`relu2dlgn.verify`): DLGN — in float64 on random inputs
            shaped like the example, every gating pre-activation is affine in the input and the value graph
            is affine in its value input for fixed gates (eval mode); DGN — it reproduces the source model.
            Raises :class:`ConversionError` naming the first site that fails. ``False`` skips the check.

    Returns:
        a :class:`DLGN`; ``dlgn(x) == dlgn.value(value_input(x), *dlgn.gates(x))``. Its ``state_dict`` mirrors
        the source's parameter names under ``gating.`` and ``value.``. It is in the source model's mode.
    """
    if not isinstance(model, nn.Module):
        raise ConversionError(f"convert() expects an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ConversionError(f"mode must be one of {MODES}, got {mode!r}")
    if value_input not in VALUE_INPUTS:
        raise ConversionError(f"value_input must be one of {VALUE_INPUTS}, got {value_input!r}")
    if pool not in POOLS:
        raise ConversionError(f"pool must be one of {POOLS}, got {pool!r}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    model = unwrap_compiled(model)
    _check_model(model)
    leaf_modules = tuple(leaf_modules)
    try:
        return _convert(model, mode, example_inputs, value_input, beta, pool, strict, leaf_modules, verify)
    except Relu2DlgnError:
        raise
    except Exception as exc:  # every error convert raises is a Relu2DlgnError
        raise ConversionError(f"converting {type(model).__name__} failed unexpectedly: {type(exc).__name__}: {exc}. "
                              f"This is a relu2dlgn defect; please report it with the model") from exc


def _convert(model: nn.Module, mode: Mode, example_inputs: Sequence[torch.Tensor] | None, value_input: ValueInput,
             beta: float, pool: Pool, strict: bool, leaf_modules: Iterable[type | str], verify: bool) -> DLGN:
    cap = capture(model, example_inputs, leaf_modules)
    sites, nonlinear = find_sites(cap.graph, cap.modules)
    linear = mode == "dlgn"
    standins: list[tuple[fx.Node, Classified]] = []
    if linear and pool == "avg":
        standins = [(n, c) for n, c in sites if c.kind == "maxpool"]
        sites = [(n, c) for n, c in sites if c.kind != "maxpool"]
    source = type(model).__name__
    if linear and strict and (nonlinear or cap.hidden):
        named = {n.module_path for n in nonlinear}
        problems = [str(n) for n in nonlinear] + [f"{p}: {r}" for p, r in cap.hidden if p not in named]
        raise ConversionError(
            f"strict DLGN conversion of {source}: {len(problems)} operation{' is' if len(problems) == 1 else 's are'} "
            f"neither gates nor known to be affine, so the gating network would not be linear:\n  - " +
            "\n  - ".join(problems) + "\nUse strict=False to keep them (reported in dlgn.report), or mode='dgn'."
        )
    if not sites:
        raise ConversionError(
            f"{source} has no gate site: no ReLU / LeakyReLU / PReLU / ReLU6 / Hardtanh / max-pool call was "
            f"found in its traced graph" + (f" (opaque leaves: {', '.join(p for p, _ in cap.hidden)})"
                                             if cap.hidden else "")
        )

    gating = build_gating(cap.graph, cap.modules, sites, standins, linear)
    value = build_value(cap.graph, cap.modules, sites, standins)
    records = [GateSite(i, c.kind, n.name, n.meta.get("module_path", ""), c.op, c.inplace, dict(c.params))
               for i, (n, c) in enumerate(sites)]
    report = ConversionReport(mode=mode, value_input=value_input, pool=pool if linear else "gate", strict=strict,
                              source=source, sites=records, nonlinear_kept=nonlinear, hidden=cap.hidden,
                              specialised=[f"{g.module_path or '<root>'}: {g.where} == {g.expected!r}"
                                           for g in cap.guards],
                              pool_standins=[f"{c.op} at {n.meta.get('module_path', '') or '<root>'}"
                                             for n, c in standins],
                              train_differs=cap.train_differs, fixed_arguments=tuple(cap.fixed))
    dlgn = DLGN(gating, value, records, mode=mode, value_input=value_input, beta=beta, pool=report.pool,
                report=report, input_specs=_input_specs(cap, model), leaf_modules=leaf_modules)
    dlgn.train(model.training)
    if verify:
        report.verified = _verify(dlgn, model, cap, sites, nonlinear)
    if example_inputs is not None:
        _record_shapes(dlgn, tuple(example_inputs))
    return dlgn


def _verify(dlgn: DLGN, model: nn.Module, cap: Captured, sites: list[tuple[fx.Node, Classified]],
            nonlinear: list[Nonlinearity]) -> str:
    """Run :func:`relu2dlgn.verify.verify`; sites downstream of a kept nonlinearity are not checked."""
    examples = cap.example_inputs
    if examples is None:
        with torch.random.fork_rng(devices=[]):  # only their shapes are used: leave the caller's RNG alone
            examples = default_example_inputs(model)
        if examples is not None:
            device = dlgn.device
            examples = tuple(e.to(device) for e in examples)
    unchecked: set[int] = set()
    if nonlinear:
        names = {n.node for n in nonlinear}
        after = downstream(cap.graph, cap.modules, {n for n in cap.graph.nodes if n.name in names})
        unchecked = {i for i, (_, c) in enumerate(sites) if c.input in after}
    return verify_conversion(dlgn, model, examples, unchecked_sites=unchecked, check_value=not nonlinear)


def _check_model(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise ConversionError(f"parameter/buffer '{name}' is on the meta device (no data); materialise the "
                                  f"model first (model.to_empty(device='cpu') and load its weights)")


def _input_specs(cap: Captured, model: nn.Module) -> list[InputSpec]:
    placeholders = [n for n in cap.graph.nodes if n.op == "placeholder"]
    examples = cap.example_inputs
    if examples is None:
        with torch.random.fork_rng(devices=[]):  # only their shapes are used: leave the caller's RNG alone
            examples = default_example_inputs(model) if _has_cfg(model) else None
    specs = []
    for i, p in enumerate(placeholders):
        ex = examples[i] if examples is not None and i < len(examples) else None
        if isinstance(ex, torch.Tensor):
            specs.append(InputSpec(p.target, ex.dim(), tuple(ex.shape)))
        else:
            specs.append(InputSpec(p.target, _rank_from_users(p, cap.modules)))
    return specs


def _has_cfg(model: nn.Module) -> bool:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    return isinstance(cfg, dict) and bool(cfg.get("input_size"))


def _rank_from_users(p: fx.Node, modules: dict) -> int | None:
    """The batched input rank implied by the first layer that reads the input (conv: 2 + spatial dims)."""
    for user in p.users:
        if user.op == "call_module" and user.args and user.args[0] is p:
            m = modules.get(user.target)
            if isinstance(m, nn.modules.conv._ConvNd):
                return 2 + len(m.kernel_size)
    return None


def _record_shapes(dlgn: DLGN, examples: tuple) -> None:
    with eval_mode(dlgn), torch.no_grad():
        qs = dlgn.gating(*examples)
    for site, q in zip(dlgn.sites, qs):
        shape = tuple(q.shape)
        if site.kind == "maxpool":
            shape = shape[:2] + site.spec.pool.output_size(shape[2:])
        site.shape = shape
