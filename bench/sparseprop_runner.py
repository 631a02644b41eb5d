"""Times SparseProp's sparse convolution, forward + backward, on the cases bench/bench_sparse_training.py passes; run
by that benchmark with the python of SparseProp's own venv (built by bench/build_sparseprop.sh):

    /tmp/sp/venv/bin/python bench/sparseprop_runner.py     # requests on stdin, see main()

Uses SparseProp the way its README does: `SparseConv2d` built from the masked dense weight (3x3, stride 1, padding 1),
called on NCHW input, gradients by autograd to the input and to its `W_val` parameter (the weight gradient at the
unmasked positions only). SparseProp has two kernels per layer, vectorised over the batch or over the output columns
(`vectorizing_over_on`); its `sparsify_conv2d_auto` picks one from a single timed call, here both are timed with the
median timer and the benchmark takes the faster, so SparseProp runs at its best. Each case is checked against dense
F.conv2d before it is timed. Uses only torch, SparseProp and bench/timing.py (plain Python), never this package.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sparseprop.modules import SparseConv2d
from sparseprop.modules.utils import from_sparse_format_conv2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conv_cases import case_tensors  # noqa: E402  (bench/conv_cases.py, torch only)
from timing import call_times_ms  # noqa: E402  (bench/timing.py, standard library only)


def max_abs_error(module: SparseConv2d, x, weight, mask, grad_out) -> float:
    """Largest difference from dense autograd over the output, the input gradient and the weight gradient (at the
    unmasked positions), relative to each tensor's largest magnitude."""
    xs = x.clone().requires_grad_()
    out = module(xs)
    grad_x, grad_values = torch.autograd.grad(out, (xs, module.W_val), grad_out)
    xd, wd = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out_d = F.conv2d(xd, wd * mask, padding=1)
    grad_xd, grad_wd = torch.autograd.grad(out_d, (xd, wd), grad_out)
    grad_w = from_sparse_format_conv2d(grad_values, module.W_idx, tuple(weight.shape))
    pairs = ((out, out_d), (grad_x, grad_xd), (grad_w, grad_wd * mask))
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in pairs)


class Case:
    """One layer case: SparseProp's two modules (vectorised over the batch, over the output columns), checked."""

    def __init__(self, batch: int, channels: int, size: int, density: float):
        x, weight, mask, grad_out = case_tensors(batch, channels, size, density)
        masked = weight * mask
        self.nnz = int(mask.sum())
        self.error = 0.0
        self.steps = {}
        for over_columns in (False, True):
            module = SparseConv2d(masked.clone(), padding=1, stride=1, vectorizing_over_on=over_columns)
            self.error = max(self.error, max_abs_error(module, x, masked, mask, grad_out))
            x_train = x.clone().requires_grad_()

            def step(module=module, x_train=x_train):
                out = module(x_train)
                torch.autograd.grad(out, (x_train, module.W_val), grad_out)

            self.steps["columns" if over_columns else "batch"] = step


def main() -> None:
    """Serves requests, one JSON object a line on stdin, one answer a line on stdout, so the benchmark can alternate
    rounds between its own candidates and SparseProp:
        {"op": "case", "case": [batch, channels, size, density]} -> {"nnz", "max_abs_error", "torch", "threads"}
        {"op": "time", "warmup": w, "repeats": r} -> {"batch": [ms of each call], "columns": [...]} (the last case)
    """
    case = None
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "case":
            case = Case(*request["case"])
            answer = {"nnz": case.nnz, "max_abs_error": case.error, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}
        elif request["op"] == "time":
            if case is None:
                raise ValueError("a 'time' request came before any 'case' request")
            answer = {name: call_times_ms(step, request["warmup"], request["repeats"])
                      for name, step in case.steps.items()}
        else:
            raise ValueError(f"unknown op {request['op']!r}; expected 'case' or 'time'")
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
