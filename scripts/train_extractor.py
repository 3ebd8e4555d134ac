"""Train the embedded `lenet-mnist5k` feature extractor and write its weights + sha256 checksum.

    .venv/bin/python scripts/train_extractor.py            # about a minute on 2 CPU cores

Seeded; holds out a seeded-random 10% of mnist5k and prints the held-out
accuracy. Writes ganlib/extractors/lenet-mnist5k.safetensors (< 1 MB) and lenet-mnist5k.sha256.
Retraining changes the weights' checksum, which also invalidates cached real statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ganlib.data import load_images  # noqa: E402
from ganlib.errors import UserError, exit_on_user_error  # noqa: E402
from ganlib.extractors import lenet  # noqa: E402


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mnist5k as uint8 [5000, 1, 28, 28] and int64 labels [5000]."""
    image_set = load_images("mnist5k", 28, 1)
    return image_set.images, image_set.labels


def evaluate(net: lenet.LeNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (fraction) of `net` on uint8 images."""
    net.eval()
    with torch.no_grad():
        _, logits = net(lenet.to_lenet_input(images))
    return (logits.argmax(1) == labels).float().mean().item()


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8, help="passes over the 90%% training split")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, init and batch order")
    parser.add_argument("--out", type=Path, default=lenet.WEIGHTS_PATH, help="safetensors file to write")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise UserError(f"--epochs {args.epochs}, --batch-size {args.batch_size}, --lr {args.lr}: "
                        "expected positive values")

    torch.manual_seed(args.seed)
    images, labels = load_mnist5k()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    n_val = len(images) // 10
    val_idx, train_idx = order[:n_val], order[n_val:]
    x_train, y_train = images[train_idx], labels[train_idx]

    net = lenet.LeNet()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    batch_gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=batch_gen)
        losses = []
        for start in range(0, len(perm), args.batch_size):
            idx = perm[start:start + args.batch_size]
            x = lenet.to_lenet_input(x_train[idx])
            # Small random shifts (+-2 px) so features are robust to GAN samples' imprecise centring.
            shift = torch.randint(-2, 3, (2,), generator=batch_gen).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            _, logits = net(x)
            loss = F.cross_entropy(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        print(f"epoch {epoch + 1}/{args.epochs}  mean loss {sum(losses) / len(losses):.4f}  "
              f"held-out acc {evaluate(net, images[val_idx], labels[val_idx]):.4f}  "
              f"{time.perf_counter() - t0:.1f}s", flush=True)

    accuracy = evaluate(net, images[val_idx], labels[val_idx])
    with torch.no_grad():
        features, _ = net.eval()(lenet.to_lenet_input(x_train))
        net.feature_scale.fill_((features.pow(2).sum(1).mean() / features.shape[1]).rsqrt().item())
        dead = int(((features > 0).float().mean(0) < 0.01).sum())
    print(f"feature_scale {net.feature_scale.item():.4f}; {dead}/{features.shape[1]} features positive "
          "on < 1% of training images")
    meta = {"extractor": lenet.NAME, "dataset": "mnist5k", "heldout_fraction": "0.1",
            "heldout_accuracy": f"{accuracy:.4f}", "epochs": str(args.epochs), "seed": str(args.seed),
            "torch": torch.__version__}
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, out)
    checksum_path = out.with_suffix(".sha256")
    checksum_path.write_text(f"{lenet.sha256_of(out)}  {out.name}\n")
    print(json.dumps({"heldout_accuracy": round(accuracy, 4), "weights": str(out),
                      "bytes": out.stat().st_size, "train_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
