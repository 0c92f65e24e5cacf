"""Private helpers shared by the package: atomic file writes, module-mode context managers, torch.fx leaves."""
