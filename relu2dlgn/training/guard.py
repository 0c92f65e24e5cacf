"""Finiteness guards of a training run: no NaN/inf state survives in memory, in a checkpoint or in ``model/``.

Two faults get past a loss check, and this module catches both:

* the forward of a batch with NaN/inf inputs updates the batch-norm running statistics *before* its loss is
  known to be non-finite. :class:`StepGuard` copies those statistics before every step and puts them back
  when the step is refused, so the in-memory model is exactly as it was before the batch (no weight changed:
  the optimiser step is skipped);
* a NaN/inf that reaches a parameter or buffer without making the loss non-finite (an inf written into a
  running mean — batch norm trains on batch statistics, so only evaluation sees it —, an overflowing update).
  :meth:`StepGuard.check_state` looks at every floating-point parameter and buffer at the end of each epoch;
  when one is not finite it restores the copy of the whole state taken at the end of the last good epoch (a
  CPU copy, one model's worth of memory) and raises.

:func:`non_finite_names` is the shared test; :func:`relu2dlgn.training.checkpoint.save_checkpoint` refuses a
non-finite state with it, so checkpoint rotation never removes the newest finite checkpoint for a bad one.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from ..errors import NonFiniteLossError
from .distributed import all_reduce_sum

log = logging.getLogger(__name__)


def non_finite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an inf (one device synchronisation)."""
    floats = [(k, t) for k, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return []
    with torch.no_grad():
        flags = torch.stack([torch.isfinite(t.detach()).all().to(floats[0][1].device) for _, t in floats])
    return [k for (k, _), ok in zip(floats, flags.tolist()) if not ok]


def non_finite_loss(where: str, loss: torch.Tensor, norm: torch.Tensor, beta: float | None, restored: bool,
                    checkpoint: str | None) -> NonFiniteLossError:
    """The error for a refused step ``where`` (e.g. ``"at epoch 2, batch 4/6 (global step 10)"``): its loss and
    gradient norm, what the in-memory model is now (``restored``: the running statistics were put back) and the
    newest checkpoint on disk."""
    last = (f"The last good checkpoint is intact: {checkpoint} (resume with --resume / resume=True, e.g. with a "
            f"lower learning rate)." if checkpoint else "No checkpoint was written (no out_dir, or before epoch 1).")
    memory = ("The in-memory model is as it was before this batch: no weight was changed and the batch-norm "
              "statistics its forward had updated were restored." if restored else
              "The in-memory model is as it was before this batch (no weight was changed).")
    return NonFiniteLossError(
        f"non-finite loss {where}: loss={loss.item():.4g}, gradient norm={norm.item():.4g}, beta={beta}. Training "
        f"stopped before this update was applied. {memory} {last} Check the inputs for NaN/inf, or lower lr / "
        f"beta_end, or set max_grad_norm.")


def _statistics_modules(module: nn.Module) -> list[nn.Module]:
    """The modules whose forward updates their buffers: normalisation layers with running statistics."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


class StepGuard:
    """Snapshots of one model's state that a refused step or epoch is rolled back to (see the module docstring).

    ``snapshot_step()`` before each step and ``restore_step()`` when it is refused; ``keep_good_state()`` after
    each epoch that passed :meth:`check_state`, which rolls back to that state."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._norms = _statistics_modules(module)
        self._saved: list[torch.Tensor] | None = None
        self._good: dict[str, torch.Tensor] | None = None
        self.good_epoch: int | None = None

    # -- per step: the running statistics ----------------------------------------------------------------
    def _live(self) -> list[torch.Tensor]:
        return [b for m in self._norms for _, b in m.named_buffers(recurse=False) if b is not None]

    @torch.no_grad()
    def snapshot_step(self) -> None:
        """Copy the running statistics (into the same buffers as last time when their shapes still fit)."""
        live = self._live()
        saved = self._saved
        if saved is None or len(saved) != len(live) or any(
                s.shape != b.shape or s.dtype != b.dtype or s.device != b.device for s, b in zip(saved, live)):
            self._saved = [b.detach().clone() for b in live]
        elif live:
            torch._foreach_copy_(saved, live)

    @torch.no_grad()
    def restore_step(self) -> bool:
        """Put back the statistics of the last :meth:`snapshot_step`; ``True`` if there were any."""
        live = self._live()
        if not live or self._saved is None or len(self._saved) != len(live):
            return False
        for b, s in zip(live, self._saved):
            b.copy_(s)
        return True

    # -- per epoch: the whole state ------------------------------------------------------------------------
    @torch.no_grad()
    def keep_good_state(self, epoch: int) -> None:
        """Remember the current state (a CPU copy) as the last good one, reached at the end of ``epoch``."""
        self._good = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        self.good_epoch = epoch

    def check_state(self, when: str, checkpoint: str | None) -> None:
        """Raise :class:`NonFiniteLossError` if a parameter or buffer holds a NaN/inf (on any process), after
        restoring the last good state kept by :meth:`keep_good_state`. ``when`` says where in the run (e.g.
        ``"after epoch 2"``), ``checkpoint`` is the newest checkpoint on disk (named in the message)."""
        bad = non_finite_names(self.module.state_dict())
        if not all_reduce_sum(torch.tensor([float(len(bad))], device=self._device())).item():
            return
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") if bad else \
            "(on another process)"
        if self._good is not None:
            self.module.load_state_dict(self._good)
            restored = (f"The in-memory model was restored to its state at the end of epoch {self.good_epoch}"
                        if self.good_epoch else "The in-memory model was restored to its state before training")
        else:
            restored = "No good state was kept, so the in-memory model is left as it is"
        kept = (f"The newest checkpoint is finite and intact: {checkpoint} (resume with --resume / resume=True)."
                if checkpoint else "No checkpoint was written (no out_dir, or before the first one).")
        log.error("non-finite model state %s: %s", when, names)
        raise NonFiniteLossError(
            f"non-finite model state {when}: {names} hold NaN/inf although the loss stayed finite (a corrupted "
            f"buffer or an overflowing update). Training stopped before validation and the checkpoint; no model/ "
            f"was written. {restored}. {kept}")

    def _device(self) -> torch.device:
        for t in self.module.parameters():
            return t.device
        return torch.device("cpu")
