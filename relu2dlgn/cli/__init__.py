"""The command line: ``relu2dlgn inspect | finetune | export | explain ...`` (``python -m relu2dlgn.cli`` too)."""
from .main import build_parser, main

__all__ = ["main", "build_parser"]
