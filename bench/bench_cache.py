"""Teacher-logit cache: precompute throughput, distillation epoch from the cache, and storage per view.

1. Precompute: `ptd_sparse.cache.build_cache` with the 90%-sparse teacher in its sparse inference form
   (sparsify: BatchNorm folded, ReLU fused, sparse kernels) against the same call with the same pruned teacher as
   plain eager PyTorch (nn.Conv2d on the masked weights, BatchNorm, ReLU): same data, views, batch and store, so the
   ratio is the teacher's. CIFAR VGG19 (100 classes, random weights and BatchNorm statistics) on 32x32 inputs, and
   the default Fashion-MNIST teacher (vgg_fmnist), each pruned by L1 magnitude globally and per layer. The two runs
   alternate and the medians are compared; the teacher's forward alone is timed the same way ("fwd only"), and
   once more with torch's max_pool2d in place of MaxPool2x2 ("torch pools": the share of the pooling rewrite). The one-time
   preparation of the inference form (sparsify and the per-layer choice of path, paid once per cache whatever its
   size) is printed on its own ("prepare s").
2. Distillation epoch (the default Fashion-MNIST run: fixed student, teacher pruned to 79%): one epoch of
   training.fit with the teacher on the fly (as `ptd distill` does without a cache), from a full fp16 cache and from
   a top-10 cache; beside them the teacher's forward over the same (already augmented) batches and the cache
   reads over the same batches, alone.
3. Storage: bytes per view of the top-10 cache of 100 classes written in 1.

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_cache.py
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ptd_sparse.cache import build_cache, make_spec, teacher_fingerprint
from ptd_sparse.cache.inference import inference_form
from ptd_sparse.cache.precompute import TUNING_BATCH
from ptd_sparse.nn import MaskedConv2d, MaskedLinear, MaxPool2x2
from ptd_sparse.data import Augmentation, Dataset, Split, apply_views, batches, load_dataset, normalize
from ptd_sparse.pipeline.models import build_model
from ptd_sparse.pipeline.pruning import prune_to
from ptd_sparse.pipeline.training import Context, Distillation, Schedule, fit
from timing import median_ms  # bench/timing.py


def pruned(name: str, in_channels: int, classes: int, size: int, sparsity: float, scope: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=classes, image_size=size).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    prune_to(model, sparsity, scope)
    return model


def plain_pytorch(model: nn.Module) -> nn.Module:
    """The same pruned network as plain eager PyTorch layers with the masked weights (what users run without this
    package)."""
    dense = copy.deepcopy(model).eval()
    for name, module in list(dense.named_modules()):
        if isinstance(module, MaskedConv2d):
            plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding, bias=module.bias is not None)
        elif isinstance(module, MaskedLinear):
            plain = nn.Linear(module.in_features, module.out_features)
        else:
            continue
        with torch.no_grad():
            plain.weight.copy_(module.weight * module.mask)
            if module.bias is not None:
                plain.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent) if parent else dense, child, plain)
    return dense


def synthetic_dataset(samples: int, channels: int, size: int, classes: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (samples, channels, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, classes, (samples,), generator=generator)
    split = Split(images, labels)
    return Dataset("synthetic", split, split.subset(torch.arange(8)), split.subset(torch.arange(8)), classes,
                   torch.full((channels,), 0.5), torch.full((channels,), 0.25))


def alternate(functions: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn `repeats` times (so drift of the machine hits all alike)."""
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def precompute_case(args, name: str, channels: int, classes: int, size: int, samples: int, form: str,
                    scope: str) -> dict:
    data = synthetic_dataset(samples, channels, size, classes)
    augmentation = Augmentation(4 if size == 32 else 2, True)
    teacher = pruned(name, channels, classes, size, 0.9, scope)
    dense = plain_pytorch(teacher)
    spec = make_spec(teacher_fingerprint(teacher), data, augmentation, views=1, form=form, k=10, temperature=10.0)
    scratch = Path(tempfile.mkdtemp())

    def build(model, tag):
        folder = scratch / tag
        shutil.rmtree(folder, ignore_errors=True)
        return build_cache(folder, model, data, spec, batch_size=args.batch, sparse=False)

    started = time.perf_counter()
    # What build_cache(sparse=True) does once per cache, timed on its own: sparsify with the density rule's routes.
    fast, _ = inference_form(teacher, normalize(data.train.images[:TUNING_BATCH], data))
    prepare_s = time.perf_counter() - started
    build(fast, "warm")
    seconds = alternate({"eager": lambda: build(dense, "eager"), "sparse": lambda: build(fast, "sparse")},
                        args.repeats)
    x = torch.randn(args.batch, channels, size, size)
    torch_pools = copy.deepcopy(fast)  # the same inference form with torch's max_pool2d, to show MaxPool2x2's share
    for path, module in list(torch_pools.named_modules()):
        if isinstance(module, MaxPool2x2):
            parent, _, child = path.rpartition(".")
            setattr(torch_pools.get_submodule(parent) if parent else torch_pools, child, nn.MaxPool2d(2))
    with torch.inference_mode():
        forward = alternate({"eager": lambda: dense(x), "sparse": lambda: fast(x),
                             "torch pools": lambda: torch_pools(x)}, args.repeats * 2)
    stored = sum(f.stat().st_size for f in (scratch / "sparse").glob("*.bin"))
    shutil.rmtree(scratch, ignore_errors=True)
    return {"model": name, "classes": classes, "scope": scope, "sparsity": 0.9, "samples": samples,
            "batch": args.batch, "form": form, "eager_samples_per_s": samples / seconds["eager"],
            "sparse_samples_per_s": samples / seconds["sparse"],
            "precompute_ratio": seconds["eager"] / seconds["sparse"],
            "forward_ratio": forward["eager"] / forward["sparse"],
            "forward_ratio_torch_pools": forward["eager"] / forward["torch pools"], "bytes_per_view": stored / samples,
            "prepare_s": prepare_s}


def precompute_rows(args) -> list[dict]:
    cases = [("vgg19", 3, 100, 32, args.cifar_samples, "topk"), ("vgg_fmnist", 1, 10, 28, args.fmnist_samples, "full")]
    rows = []
    for case in cases:
        for scope in ("global", "layer"):
            row = precompute_case(args, *case, scope)
            rows.append(row)
            print(f"{row['model']:>10} {scope:>6} {row['eager_samples_per_s']:>10.1f} "
                  f"{row['sparse_samples_per_s']:>10.1f} {row['precompute_ratio']:>8.2f} {row['forward_ratio']:>8.2f} "
                  f"{row['forward_ratio_torch_pools']:>11.2f} "
                  f"{row['bytes_per_view']:>8.1f} {row['prepare_s']:>9.2f}", flush=True)
    return rows


def fashion_mnist(train: int) -> Dataset:
    try:
        data = load_dataset("fashion_mnist", None, 0.1, 0, train)
        source = "Fashion-MNIST"
    except FileNotFoundError:
        data = synthetic_dataset(train, 1, 28, 10)
        source = "synthetic 28x28"
    small = torch.arange(256)
    data.val, data.test = data.val.subset(small), data.test.subset(small)
    data.name = f"{data.name} ({source})"
    return data


def distill_rows(args) -> dict:
    data = fashion_mnist(args.distill_samples)
    augmentation = Augmentation(2, True)
    teacher = pruned("vgg_fmnist", 1, 10, 28, 0.79, "global")
    scratch = Path(tempfile.mkdtemp())
    caches = {}
    for form in ("full", "topk"):
        spec = make_spec(teacher_fingerprint(teacher), data, augmentation, views=1, form=form, k=10,
                         temperature=10.0)
        caches[form] = build_cache(scratch / form, teacher, data, spec, batch_size=256)
    schedule = Schedule(epochs=1, lr=0.05, weight_decay=5e-4, batch_size=128)

    def epoch(distillation):
        def run():
            torch.manual_seed(0)
            student = build_model("vgg_fmnist", [16, "M", 32, "M", 64, "M"], in_channels=1, image_size=28)
            log = scratch / "metrics.jsonl"
            log.unlink(missing_ok=True)
            state = scratch / "state.pt"
            state.unlink(missing_ok=True)
            ctx = Context(data, augmentation, torch.device("cpu"), progress=False, metrics_path=log)
            fit(student, ctx, schedule, state, "bench", distillation)
            return json.loads(log.read_text().splitlines()[0])["seconds"]
        return run

    inputs = [normalize(apply_views(images, caches["full"].views(index, 0), 2), data)
              for index, images, _ in batches(data.train, 128, True)]

    def teacher_forward():  # what the cache saves: the teacher's forward on inputs the student needs anyway
        with torch.no_grad():
            for x in inputs:
                teacher(x)

    def cache_reads():
        for index, _, _ in batches(data.train, 128, True):
            caches["topk"].views(index, 0)
            caches["topk"].teacher(index, 0)

    modes = {"on the fly": epoch(Distillation(teacher, 0.95, 10.0)),
             "cache fp16": epoch(Distillation(None, 0.95, 10.0, caches["full"])),
             "cache top-10": epoch(Distillation(None, 0.95, 10.0, caches["topk"]))}
    for fn in modes.values():
        fn()  # warm-up: first calls derive the sparse patterns' layouts and start the thread pool
    measured = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, fn in modes.items():
            measured[name].append(fn())
    result = {name: statistics.median(v) for name, v in measured.items()}
    result["teacher forward"] = median_ms(teacher_forward, 1, args.repeats) / 1e3
    result["cache reads"] = median_ms(cache_reads, 1, args.repeats) / 1e3
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"\ndistillation epoch, {len(data.train)} images of {data.name}, batch 128, fixed student, teacher at 79%")
    for name, seconds in result.items():
        print(f"{name:>16} {seconds:>8.2f} s")
    saved = result["on the fly"] - result["cache fp16"]
    print(f"saved by the cache {saved:.2f} s = {saved / result['teacher forward']:.2f} x the teacher's forward; "
          f"cache reads {100 * result['cache reads'] / result['cache fp16']:.1f}% of the cached epoch")
    return {"images": len(data.train), "data": data.name, "seconds": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar-samples", type=int, default=512)
    parser.add_argument("--fmnist-samples", type=int, default=4096)
    parser.add_argument("--distill-samples", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-distill", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cache.json")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"teacher cache, float32, torch {torch.__version__}, {threads} threads, "
          f"GOMP_CPU_AFFINITY={os.environ.get('GOMP_CPU_AFFINITY', 'unset')}, batch {args.batch}")
    print(f"{'teacher':>10} {'prune':>6} {'eager/s':>10} {'sparse/s':>10} {'ratio':>8} {'fwd only':>8} {'torch pools':>11} "
          f"{'B/view':>8} {'prepare s':>9}")
    rows = precompute_rows(args)
    distill = None if args.skip_distill else distill_rows(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": {"torch": torch.__version__, "threads": threads,
                                             "pinning": os.environ.get("GOMP_CPU_AFFINITY", "unset")},
                                    "precompute": rows, "distill": distill}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
