"""Models and helpers shared by the tests: small, random-init, with non-trivial batch-norm statistics."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial running statistics and affine parameters (eval is then not identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def build(spec: str) -> nn.Module:
    """timm:NAME / tv:NAME, random init, randomized BN stats, eval mode."""
    lib, name = spec.split(":")
    if lib == "timm":
        import timm
        m = timm.create_model(name, pretrained=False)
    else:
        import torchvision
        kwargs = {"aux_logits": False, "init_weights": True} if name == "inception_v3" else {}
        m = torchvision.models.get_model(name, weights=None, **kwargs)
    torch.manual_seed(0)
    return randomize_bn(m).eval()


def input_size(spec: str) -> int:
    return 80 if spec.endswith("inception_v3") else 64


class TinyNet(nn.Module):
    """A small conv net: conv-bn-relu, max-pool, conv-bn-relu, global pool, linear."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.relu(self.bn2(self.conv2(x)))  # one module, two call sites
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
