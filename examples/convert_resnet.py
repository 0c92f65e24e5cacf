"""Convert a timm ResNet into a DGN and a DLGN, inspect the gate sites, check what each computes, save and reload.

    python examples/convert_resnet.py [--model resnet18] [--size 128] [--out out/example-dlgn]
"""
from __future__ import annotations

import argparse

import timm
import torch

import relu2dlgn


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default="out/example-dlgn")
    args = parser.parse_args(argv)

    model = timm.create_model(args.model, pretrained=False).eval()     # or pretrained=True where you have the hub
    x = torch.randn(4, 3, args.size, args.size)

    dgn = relu2dlgn.convert(model, mode="dgn", value_input="input", example_inputs=x[:1]).eval()
    dlgn = relu2dlgn.convert(model, mode="dlgn", example_inputs=x[:1]).eval()
    print(dlgn.report)                                                 # the gate-site table
    with torch.no_grad():
        y, y_dgn = model(x), dgn(x)
        r = dlgn.run(x)                                                # output, pre-activations, gates
    print(f"DGN  vs source: max |diff| = {(y_dgn - y).abs().max():.3e}  (exact by construction)")
    print(f"DLGN vs source: top-1 agreement = {(r.output.argmax(1) == y.argmax(1)).float().mean():.2f} "
          f"(before fine-tuning)")
    on = [g.float().mean().item() for g, s in zip(r.gates, dlgn.sites) if s.kind == "relu"]
    print(f"{len(r.pre_activations)} gate sites; fraction of ReLU gates on: first {on[0]:.2f}, last {on[-1]:.2f}")

    dlgn.save(args.out)
    again = relu2dlgn.load(args.out)
    with torch.no_grad():
        assert torch.equal(again(x), r.output)
    print(f"saved to {args.out} and reloaded: identical outputs")
    return {"sites": len(dlgn.sites), "dgn_error": (y_dgn - y).abs().max().item()}


if __name__ == "__main__":
    main()
