"""The float32 CPU kernel sets of one portable build side by side (PTD_CPU_ISA=baseline / avx2 / avx512, each this
CPU runs), optionally against other builds (e.g. an older `-march=native` build): kernel-level times of the sparse
convolution and the fused KD loss.

The kernel set is chosen once per process, so every configuration runs in its own process; rounds alternate between
the configurations (so drift on a shared machine hits all of them alike) and the figure is the median over rounds of
each round's median call time.

    GOMP_CPU_AFFINITY="0 1" OMP_NUM_THREADS=2 python bench/bench_cpu_isa.py [--rounds 7] \\
        [--other-build native=/path/to/another/checkout/with/its/built/extension]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512_vnni")
# (name, kind, arguments): conv = (batch, channels, size, density); kd = (rows, classes).
CASES = (
    ("conv fwd 128x128@16x16 b16 d0.10", "conv_fwd", (16, 128, 16, 0.10)),
    ("conv f+b 128x128@16x16 b16 d0.10", "conv_fb", (16, 128, 16, 0.10)),
    ("conv fwd 64x64@32x32 b16 d0.10", "conv_fwd", (16, 64, 32, 0.10)),
    ("conv fwd 512x512@4x4 b16 d0.10 (batch-inner)", "conv_fwd", (16, 512, 4, 0.10)),
    ("kd f+b 256x100", "kd", (256, 100)),
    ("kd f+b 128x1000", "kd", (128, 1000)),
)


def child(repeats: int) -> None:
    """One round in this process: prints {case: median ms} as JSON."""
    import torch

    import ptd_sparse
    import ptd_sparse._extension as extension
    from ptd_sparse.pattern import ConvPattern
    sys.path.insert(0, str(HERE))
    from timing import median_ms

    ops = extension.kernels()
    results = {"isa": extension.cpu_kernel_isa() if hasattr(extension, "cpu_kernel_isa") else "(not reported)"}
    g = torch.Generator().manual_seed(0)
    for name, kind, args in CASES:
        if kind.startswith("conv"):
            batch, channels, size, density = args
            x = torch.randn(batch, channels, size, size, generator=g)
            weight = torch.randn(channels, channels, 3, 3, generator=g)
            p = ConvPattern.from_mask(torch.rand(weight.shape, generator=g) < density)
            values = p.gather(weight).contiguous()
            shape, one = list(weight.shape), [1, 1]
            grad_out = torch.randn(batch, channels, size, size, generator=g)

            def run():
                ops.conv_forward(x, values, p.row_ptr, p.col_idx, shape, None, one, one, one, False)
                if kind == "conv_fb":
                    ops.conv_backward_input(grad_out, values, p.col_idx, p.t_ptr, p.t_rows, p.t_perm, shape,
                                            list(x.shape), one, one, one)
                    ops.conv_backward_values(grad_out, x, p.row_ptr, p.col_idx, shape, one, one, one)
        else:
            rows, classes = args
            s = torch.randn(rows, classes, generator=g)
            t = torch.randn(rows, classes, generator=g)
            y = torch.randint(0, classes, (rows,), generator=g)

            def run():
                ops.kd_loss(s, t, y, 4.0, 0.9, 2, -100, True)
        results[name] = median_ms(run, warmup=3, repeats=repeats)
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--other-build", action="append", default=[], metavar="LABEL=PATH",
                        help="a source tree whose ptd_sparse (with its built _C) to time too, with its own choice")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.repeats)

    sys.path.insert(0, str(ROOT))
    import ptd_sparse._extension as extension
    configs = [(f"this build, {isa}", str(ROOT), isa) for isa in extension.cpu_kernel_isas()]
    for spec in args.other_build:
        label, _, path = spec.rpartition("=")  # the label may hold "=" (-march=native)
        if not path:
            parser.error(f"--other-build must be LABEL=PATH, got {spec!r}")
        configs.append((label, str(Path(path).resolve()), None))

    times: dict[str, dict[str, list[float]]] = {label: {name: [] for name, _, _ in CASES} for label, _, _ in configs}
    reported = {}
    for _ in range(args.rounds):
        for label, path, isa in configs:
            env = {k: v for k, v in os.environ.items() if k not in ("PTD_CPU_ISA", "PYTHONPATH")}
            env["PYTHONPATH"] = path
            if isa:
                env["PTD_CPU_ISA"] = isa
            done = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)], env=env,
                                  capture_output=True, text=True, cwd=path)
            if done.returncode != 0:
                raise SystemExit(f"{label}: {done.stderr.strip().splitlines()[-1]}")
            round_result = json.loads(done.stdout.strip().splitlines()[-1])
            reported[label] = round_result.pop("isa")
            for name, ms in round_result.items():
                times[label][name].append(ms)

    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    vector = " ".join(f for f in VECTOR_FLAGS if f in flags) or "unknown"
    print(f"CPU vector extensions: {vector}; this build: {extension.build_flags()}; "
          f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
          f"GOMP_CPU_AFFINITY={os.environ.get('GOMP_CPU_AFFINITY', '-')}; {args.rounds} rounds")
    labels = [label for label, _, _ in configs]
    print("| case | " + " | ".join(f"{label} (ms)" for label in labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    summary = {}
    for name, _, _ in CASES:
        row = {label: statistics.median(times[label][name]) for label in labels}
        summary[name] = row
        print(f"| {name} | " + " | ".join(f"{row[label]:.3f}" for label in labels) + " |")
    out = HERE / "results" / "cpu_isa.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"cpu_vector_extensions": vector, "build_flags": extension.build_flags(),
                               "kernel_sets": reported, "median_ms": summary, "raw_ms": times}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
