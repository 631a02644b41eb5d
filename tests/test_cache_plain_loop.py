"""The teacher-logit cache serves a plain PyTorch training loop: examples/cache_plain_loop.py precomputes a cache
with ptd_sparse.cache and replays it in a hand-written loop, and no module of ptd_sparse.pipeline is imported on the
way (checked in a fresh interpreter, since this test process imports the pipeline elsewhere)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, runpy, sys
example = runpy.run_path(sys.argv[1])
losses = example["main"](sys.argv[2], samples=96, epochs=2, views=2, batch_size=32)
print(json.dumps({"losses": losses, "pipeline": sorted(m for m in sys.modules if m.startswith("ptd_sparse.pipeline")),
                  "cache": "ptd_sparse.cache.replay" in sys.modules}))
"""


def test_the_cache_example_trains_without_importing_the_pipeline(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "examples" / "cache_plain_loop.py"),
                             str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["cache"] and report["pipeline"] == []
    assert len(report["losses"]) == 2 and all(math.isfinite(loss) for loss in report["losses"])
    assert (tmp_path / "cache" / "manifest.json").is_file()
