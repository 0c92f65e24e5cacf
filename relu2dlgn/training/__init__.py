"""Fine-tuning a converted DLGN: ``relu2dlgn.finetune(dlgn, train_loader, val_loader, teacher=model)``.

The package is cut by job: :mod:`.config` (every option, in typed groups), :mod:`.losses` (the objective),
:mod:`.schedules` (beta and learning rate), :mod:`.teacher` (the source network's output and pre-activations),
:mod:`.optim`, :mod:`.bn` (batch-norm re-estimation), :mod:`.batches`, :mod:`.metrics`, :mod:`.checkpoint`,
:mod:`.rng`, :mod:`.distributed` (torchrun), :mod:`.student` (what is trained: a DLGN or a plain classifier),
:mod:`.trainer` (the loop), :mod:`.api` (the front ends) and :mod:`.job` (``relu2dlgn finetune`` from specs).
"""
from ..errors import NonFiniteLossError
from .api import evaluate, finetune, fresh_dlgn, train_classifier
from .bn import recalibrate_bn
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import DistillOptions, FinetuneConfig, GateOptions, OptimOptions, OutputOptions, RuntimeOptions
from .distributed import init_distributed
from .losses import kd_loss, site_gate_terms
from .results import FinetuneResult
from .schedules import beta_at, lr_factor
from .student import ClassifierStudent, DLGNStudent, Student, as_student
from .teacher import DLGNTeacher, Teacher, TeacherTap, make_teacher, match_sites
from .trainer import Trainer

__all__ = [
    "finetune", "fresh_dlgn", "train_classifier", "evaluate", "Trainer", "FinetuneConfig", "FinetuneResult", "OptimOptions", "GateOptions",
    "DistillOptions", "RuntimeOptions", "OutputOptions", "recalibrate_bn", "Teacher", "TeacherTap",
    "DLGNTeacher", "make_teacher", "match_sites", "kd_loss", "site_gate_terms", "beta_at", "lr_factor",
    "Student", "DLGNStudent", "ClassifierStudent", "as_student", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "init_distributed", "NonFiniteLossError",
]
