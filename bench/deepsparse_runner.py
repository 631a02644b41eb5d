"""Times an ONNX model in Neural Magic DeepSparse; run by bench/bench_network.py with the python of a separate venv
(DeepSparse 1.8.0 needs numpy<2 and onnx<1.15):

    python3 -m venv /tmp/ds && /tmp/ds/bin/pip install deepsparse-1.8.0-*.whl "numpy<2" "onnx<1.15" onnxruntime
    bench_network.py --deepsparse-python /tmp/ds/bin/python

Prints one JSON line: {"median_ms": ...}. Uses only deepsparse and numpy, never this package.
"""
import json
import statistics
import sys
import time

import numpy as np
from deepsparse import compile_model


def main() -> None:
    path, batch, cores, warmup, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
        int(sys.argv[5])
    engine = compile_model(path, batch_size=batch, num_cores=cores)
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    for _ in range(warmup):
        engine.run([x])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.run([x])
        times.append(time.perf_counter() - start)
    print(json.dumps({"median_ms": 1e3 * statistics.median(times)}))


if __name__ == "__main__":
    main()
