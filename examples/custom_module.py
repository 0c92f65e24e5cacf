"""Your own nn.Module with functional ReLUs, an in-place ReLU, a LeakyReLU and max-pooling: every call site
becomes a gate, including a module called twice; strict DLGN conversion checks that the gating network is
affine in the input.

    python examples/custom_module.py
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import relu2dlgn


class MyNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.act = nn.ReLU(inplace=True)           # called twice: two gate sites
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)                    # functional ReLU + max-pool
        x = self.act(self.conv2(x))
        identity = x
        x = self.act(self.conv3(x)) + identity                         # the same module, second call
        x = F.leaky_relu(x, 0.1)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = MyNet().eval()
    x = torch.randn(4, 3, args.size, args.size)
    dlgn = relu2dlgn.convert(model, mode="dlgn", example_inputs=x[:1])
    print(dlgn.report)
    dgn = relu2dlgn.convert(model, mode="dgn").eval()
    with torch.no_grad():
        err = (dgn(x) - model(x)).abs().max().item()
    print(f"{len(dlgn.sites)} gate sites ({dlgn.report.kind_counts()}); DGN vs source max |diff| = {err:.1e}")
    return {"kinds": dlgn.report.kind_counts(), "dgn_error": err}


if __name__ == "__main__":
    main()
