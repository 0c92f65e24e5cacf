"""Convert a timm ResNet into a DGN and a DLGN, check what each computes, save and reload.

    python examples/convert_resnet.py [--model resnet18] [--size 128]
"""
from __future__ import annotations

import argparse

import timm
import torch

import relu2dlgn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default="out/example-dlgn")
    args = parser.parse_args()

    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(4, 3, args.size, args.size)

    dgn = relu2dlgn.convert(model, mode="dgn", value_input="input").eval()
    dlgn = relu2dlgn.convert(model, mode="dlgn").eval()
    with torch.no_grad():
        y, y_dgn, y_dlgn = model(x), dgn(x), dlgn(x)
        q = dlgn.pre_activations(x)
        gates = dlgn.gates(x)
    print(dlgn.report)
    print(f"DGN  vs source: max |diff| = {(y_dgn - y).abs().max():.3e}  (exact by construction)")
    print(f"DLGN vs source: top-1 agreement = {(y_dlgn.argmax(1) == y.argmax(1)).float().mean():.2f} "
          f"(before fine-tuning)")
    on = [g.float().mean().item() for g, s in zip(gates, dlgn.sites) if s.kind == "relu"]
    print(f"{len(q)} pre-activations; fraction of ReLU gates on: first {on[0]:.2f}, last {on[-1]:.2f}")

    dlgn.save(args.out)
    again = relu2dlgn.load(args.out)
    with torch.no_grad():
        assert torch.equal(again(x), y_dlgn)
    print(f"saved to {args.out} and reloaded: identical outputs")


if __name__ == "__main__":
    main()
