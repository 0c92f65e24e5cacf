"""Fine-tune a converted DLGN with your own data loader (any iterable of (inputs, class indices) batches).

Here the "own data" is a tensor dataset of random images whose class is decided by their mean brightness;
replace it with your Dataset/DataLoader. A source network is trained first (any trained ReLU model will do),
then converted, then fine-tuned with distillation from it.

    python examples/finetune_own_data.py [--epochs 3] [--out out/example-finetune]
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

import relu2dlgn
from relu2dlgn.training import train_classifier
from relu2dlgn.zoo import create_model


def my_data(n: int, size: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    x += torch.linspace(-1, 1, 4)[torch.randint(0, 4, (n,), generator=g)].view(n, 1, 1, 1)
    y = torch.bucketize(x.mean((1, 2, 3)), torch.tensor([-0.5, 0.0, 0.5]))     # 4 classes by brightness
    return TensorDataset(x, y)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:resnet10t")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="out/example-finetune")
    args = parser.parse_args(argv)

    train = DataLoader(my_data(args.n, args.size, 0), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(my_data(args.n // 4, args.size, 1), batch_size=128)

    torch.manual_seed(0)
    source = create_model(args.model, num_classes=4)
    train_classifier(source, train, val, epochs=args.epochs, lr=3e-3, progress=False)
    source.eval()

    dlgn = relu2dlgn.convert(source, mode="dlgn", example_inputs=next(iter(val))[0][:2])
    result = relu2dlgn.finetune(dlgn, train, val, teacher=source, epochs=args.epochs, out_dir=args.out,
                                progress=False)
    print(result.summary)
    return {"val_acc": result.final["val_acc"], "agreement": result.final["val_gate_agreement"]}


if __name__ == "__main__":
    main()
