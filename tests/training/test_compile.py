"""finetune(..., compile=True): one step through torch.compile (inductor on this machine's CPU) equals the eager
step. Skipped, saying why, where inductor cannot compile (no C++ compiler, unsupported platform)."""
from __future__ import annotations

import copy

import pytest
import torch

import relu2dlgn
from _models import TinyNet
from relu2dlgn.training import FinetuneConfig, Trainer


def _inductor_works() -> str | None:
    try:
        fn = torch.compile(lambda t: t * 2 + 1, backend="inductor")
        fn(torch.ones(3))
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot compile here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def test_one_compiled_step_equals_the_eager_step():
    why = _inductor_works()
    if why:
        pytest.skip(f"torch.compile's inductor backend cannot compile on this machine ({why})")
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    dlgn = relu2dlgn.convert(model, example_inputs=(x[:2],))
    runs = {}
    for compiled in (False, True):
        student = copy.deepcopy(dlgn)
        cfg = FinetuneConfig.from_options(epochs=1, progress=False, recalibrate_bn=0, eval_before=False,
                                          device="cpu", compile=compiled, seed=0)
        trainer = Trainer(student, [(x, y)], teacher=copy.deepcopy(model), config=cfg)
        rec = trainer.train_epoch(1)
        runs[compiled] = (rec, student)
    (eager, e_model), (comp, c_model) = runs[False], runs[True]
    assert abs(eager["train_loss"] - comp["train_loss"]) < 1e-4 * max(1.0, abs(eager["train_loss"]))
    # the step's gradients (still in .grad after the update); Adam's first update is lr * sign(grad), so the
    # updated weights differ wherever a gradient is within rounding of 0
    for (name, a), b in zip(e_model.named_parameters(), c_model.parameters()):
        assert a.grad is not None and b.grad is not None, name
        assert (a.grad - b.grad).abs().max() <= 1e-4 * a.grad.abs().max() + 1e-7, name
