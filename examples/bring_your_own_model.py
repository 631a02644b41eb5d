"""Bring your own model: a torchvision-style ResNet18 of your own, pruned with torch.nn.utils.prune, through
`ptd import` -> prune -> design -> distill (a short run) -> sparsify.

    GOMP_CPU_AFFINITY="0 1" python examples/bring_your_own_model.py                    # real size (Fashion-MNIST)
    python examples/bring_your_own_model.py --train-subset 2000 --out runs/byo_quick   # a quicker look

(Full-width ResNet18 training on a CPU takes a while: every epoch of the pipeline's stages also evaluates the
10 000 test images. --data-root accepts any folder with the four Fashion-MNIST idx .gz files.)

Run it from the repository root: the pipeline imports the model's constructor, examples.user_models:resnet18, from
the working directory (your own package works the same way: `--model my_package.models:my_resnet`).

1. Your model and your training: here the full-width torchvision-style ResNet18 (11 M parameters, one input channel
   for Fashion-MNIST) is trained for one epoch with a plain PyTorch loop.
2. Your pruning: torch.nn.utils.prune.global_unstructured, L1, 50% of the convolution weights.
3. `ptd import` turns the state dict (weight_orig / weight_mask) into a model folder.
4. `ptd run` with configs/byo_resnet18_fmnist.toml and teacher.checkpoint = that folder: the pipeline prunes further
   to 59% and 79% (retraining with learning-rate rewinding), designs a student per target from the graph of your
   model (one width per residual stage, the quadratic rule), and distils it.
5. `ptd_sparse.sparsify` turns the 79%-pruned teacher into its inference form (BatchNorm folded, ReLU fused where it
   is applied once, sparse kernels where measured faster); its logits match the dense model's. Timed at batch 1, 64.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import ptd_sparse
from ptd_sparse import cli
from ptd_sparse.data import load_dataset, resolve_root
from ptd_sparse.pipeline.checkpoint import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import user_models  # noqa: E402  (your own model code)

KWARGS = "{num_classes = 10, in_channels = 1}"  # what `ptd import --kwargs` passes to the constructor


def train_one_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 128) -> None:
    """The user's own training: plain SGD over the images once."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    order = torch.randperm(len(images))
    for start in range(0, len(images), batch):
        index = order[start:start + batch]
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/byo_resnet18"))
    parser.add_argument("--data-root", default="", help="Fashion-MNIST folder (default: the Debian package's)")
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=1, help="distillation epochs (the short run)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    # 1. The user's model and training (the pipeline normalises images the same way: (x - mean) / std).
    data = load_dataset("fashion_mnist", resolve_root(args.data_root), 0.1, 0, args.train_subset or None)
    images = (data.train.images.float() / 255 - data.mean[0]) / data.std[0]
    images = images.reshape(len(images), 1, 28, 28)
    model = user_models.resnet18(num_classes=10, in_channels=1)
    train_one_epoch(model, images, data.train.labels.long())

    # 2. The user's pruning, with torch.nn.utils.prune.
    convs = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=0.5)
    torch.save(model.state_dict(), args.out / "pruned_state.pt")

    # 3. ptd import (the same as the `ptd import ...` command line).
    imported = args.out / "imported"
    cli.main(["import", str(args.out / "pruned_state.pt"), "--model", "examples.user_models:resnet18",
              "--kwargs", KWARGS, "--in-channels", "1", "--image-size", "28", "--out", str(imported)])

    # 4. ptd run: prune further, design, distil (short), report.
    run = args.out / "run"
    # teacher.kwargs must be those of the import (the full width); the preset's fixed student is half as wide.
    overrides = [f"teacher.checkpoint={json.dumps(str(imported))}", f"teacher.kwargs={KWARGS}",
                 "student.kwargs={num_classes = 10, in_channels = 1, base_width = 32}",
                 f"data.train_subset={args.train_subset}",
                 f"data.root={json.dumps(args.data_root)}", f"distill.epochs={args.epochs}", "distill.milestones=[]",
                 "distill.variants=['student_ce', 'kd_pruned', 'designed_kd_pruned']", "run.progress=false"]
    cli.main(["run", "--config", "configs/byo_resnet18_fmnist.toml", "--out", str(run)] +
             [item for override in overrides for item in ("--set", override)])
    designs = json.loads((run / "design" / "students.json").read_text())
    print(designs["sparsity_0.79"]["table"])

    # 5. sparsify the 79%-pruned teacher; the same logits, timed against its dense eager form.
    teacher, _ = load_model(run / "prune" / "sparsity_0.79" / "model")
    teacher.eval()
    fast = ptd_sparse.sparsify(teacher)
    for batch in (1, 64):
        x = images[:batch].clone()
        with torch.no_grad():
            fast(x)  # the first call of a batch size measures each layer's route
            torch.testing.assert_close(fast(x), teacher(x), atol=1e-4, rtol=1e-4)
            dense_ms, sparse_ms = median_ms(lambda: teacher(x)), median_ms(lambda: fast(x))
        print(f"batch {batch}: pruned teacher eager (masked layers) {dense_ms:.1f} ms, sparsified {sparse_ms:.1f} ms")
    print(f"report: {run / 'report' / 'summary.md'}")


if __name__ == "__main__":
    main()
