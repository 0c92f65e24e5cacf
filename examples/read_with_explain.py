"""Read a DLGN with the instruments of relu2dlgn.explain: gate statistics, gate agreement with the source, the
neural path kernel, exact gate templates, gradient similarity — and the whole report (PNGs + JSON + Markdown).

    python examples/read_with_explain.py [--epochs 3] [--out out/example-report]
"""
from __future__ import annotations

import argparse

import torch

import relu2dlgn
from relu2dlgn import explain
from relu2dlgn.data import load_data, make_loader
from relu2dlgn.training import train_classifier
from relu2dlgn.zoo import create_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:resnet10t")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--out", default="out/example-report")
    args = parser.parse_args(argv)

    data = load_data("digits", image_size=args.size)                   # offline: scikit-learn's 8x8 digits
    train, val = make_loader(data.train, 64, train=True), make_loader(data.val, 128, train=False)
    torch.manual_seed(0)
    source = create_model(args.model, num_classes=10)
    train_classifier(source, train, val, epochs=args.epochs, lr=2e-3, progress=False)
    dlgn = relu2dlgn.convert(source.eval(), example_inputs=data.example_inputs())
    relu2dlgn.finetune(dlgn, train, val, teacher=source, epochs=args.epochs, progress=False)
    dlgn.eval()

    stats = explain.gate_stats(dlgn, val)                              # per site: on fraction, dead units, entropy
    agree = explain.gate_agreement(dlgn, source, val)                  # how often the DLGN's gates equal the source's
    x, y = next(iter(val))
    x, y = x[:args.examples], y[:args.examples]
    K = explain.npk(dlgn, x)                                           # (n, n) neural path kernel, exact
    alignment = explain.kernel_alignment(K, y)
    templates = explain.gate_templates(dlgn, site=0)                   # exact affine maps of site 0's pre-activations
    print(f"gates on: {stats.on_fraction:.2f}; agreement with the source: {agree.overall:.3f}; "
          f"NPK label alignment of {len(x)} examples: {alignment:.3f}; site-0 templates {tuple(templates.weights.shape)}")
    result = explain.report(dlgn, val, args.out, source=source, npk_examples=args.examples,
                            similarity_examples=2 * args.examples, progress=False)
    print(result)
    return {"on_fraction": stats.on_fraction, "agreement": agree.overall, "alignment": alignment,
            "figures": sorted(result.figures)}


if __name__ == "__main__":
    main()
