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


from helpers import rel_err  # noqa: F401  (re-exported: older tests import it from here)


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


class AllForms(nn.Module):
    """Every gate form the converter supports: module, functional, method, in-place, reused module, all
    piecewise-linear activations and max-pool geometries. ``SITES`` is the number of gate call sites."""

    SITES = 23

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(6 if i else 3, 6, 3, padding=1) for i in range(10))
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.leaky = nn.LeakyReLU(0.1)
        self.prelu = nn.PReLU(6)
        self.prelu_weight = nn.Parameter(torch.full((6,), 0.3))
        self.relu6 = nn.ReLU6()
        self.htanh = nn.Hardtanh(-0.5, 0.7, inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.pool_dilated = nn.MaxPool2d(2, 1, 0, dilation=2)
        self.head = nn.Linear(6, 5)
        for conv in self.convs:  # keep the signal alive through a deep linear chain
            nn.init.kaiming_normal_(conv.weight, nonlinearity="linear")

    def forward(self, x):
        c = self.convs
        x = self.relu(c[0](x))                       # 1 nn.ReLU
        x = F.relu(c[1](x))                          # 2 F.relu
        x = torch.relu(c[2](x))                      # 3 torch.relu
        y = c[3](x)
        y.relu_()                                    # 4 Tensor.relu_ (result unused: mutation only)
        x = x + y
        x = c[4](x).relu()                           # 5 Tensor.relu
        x = torch.relu_(c[5](x))                     # 6 torch.relu_
        x = F.relu(c[6](x), inplace=True)            # 7 F.relu(inplace=True)
        z = self.bn(c[7](x))
        identity = z
        z = self.relu_inplace(z)                     # 8 nn.ReLU(inplace=True): identity sees it too
        x = z + identity
        x = self.relu(c[8](x))                       # 9 the same nn.ReLU module, second call site
        x = self.leaky(x)                            # 10 nn.LeakyReLU
        x = F.leaky_relu(x, 0.2)                     # 11 F.leaky_relu
        x = self.prelu(x)                            # 12 nn.PReLU
        x = F.prelu(x, self.prelu_weight)            # 13 F.prelu
        x = self.relu6(c[9](x) * 4)                  # 14 nn.ReLU6
        x = F.relu6(x - 1)                           # 15 F.relu6
        x = self.htanh(x - 0.5)                      # 16 nn.Hardtanh(inplace=True)
        x = F.hardtanh(x * 3, -1.0, 2.0)             # 17 F.hardtanh
        x = F.leaky_relu_(x - 0.1, 0.05)             # 18 F.leaky_relu_
        x = self.pool(x)                             # 19 nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        x = F.max_pool2d(x, 2, 1, 1)                 # 20 F.max_pool2d
        x = self.pool_dilated(x)                     # 21 nn.MaxPool2d(dilation=2)
        s = F.max_pool1d(x.flatten(2), 3, 2)         # 22 F.max_pool1d
        s = F.hardtanh_(s, -2.0, 2.0)                # 23 F.hardtanh_
        return self.head(s.mean(-1)), x.sum()


class Pool3d(nn.Module):
    """3-d convolution + max-pool gates."""

    SITES = 3

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.pool = nn.MaxPool3d(2, 2, ceil_mode=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x)))
        x = F.max_pool3d(x, 2, 1, 1)
        return self.fc(x.mean((2, 3, 4)))


class MutatesAfterSite(nn.Module):
    """A pre-activation that an in-place op overwrites after the site: the gating net must capture it first."""

    SITES = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        z = torch.relu(y)
        y.add_(1.0)
        w = F.relu(y)
        return self.fc((z + w).mean((2, 3)))


def source_net(seed: int = 0) -> nn.Module:
    """A small random source network (TinyNet, 10 classes) with non-trivial batch-norm statistics, eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(TinyNet(num_classes=10), seed).eval()


class TwinNet(nn.Module):
    """Two pairs of same-shaped ReLU sites around a max-pool (sites: relu, relu, maxpool, relu, relu): the masks
    of each pair are interchangeable, so the layer order of its gates can be permuted."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv4 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        return self.fc(x.mean((2, 3)))
