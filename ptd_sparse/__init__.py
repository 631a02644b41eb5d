"""ptd-sparse: prune, then distill (Park & No, ECCV 2022) with real sparse kernels.

Operators (each with the backends reference / cpu / cuda / triton, see ptd_sparse.backends):
    masked_conv2d(input, weight, mask, ...)      == F.conv2d(input, weight * mask, ...), sparse kernels
    sparse_conv2d(input, sparse_weight, ...)     convolution with a SparseConvWeight (canonical CSR)
    kd_loss(student_logits, teacher_logits, ...) fused temperature-softmax distillation loss; the teacher may be
                                                 a TopKTeacher (its k largest classes, see topk_teacher)
Modules: ptd_sparse.nn.MaskedConv2d, ptd_sparse.nn.SparseConv2d, ptd_sparse.nn.KDLoss; sparsify(model), and its
inference routes saved and loaded as plans (route_plan, save_route_plan, load_route_plan); fuse_graph(model): a
sparsified model's forward as an fx graph with its ReLUs and residual additions fused.
export(model, "model.onnx", example_input): a pruned model to ONNX, pruned weights as zeros (ptd_sparse.onnx_export).
"""
from ptd_sparse import nn
from ptd_sparse.backends import BACKENDS, choose_backend
from ptd_sparse.functional import kd_loss, masked_conv2d, sparse_conv2d
from ptd_sparse.fuse_graph import fuse_graph
from ptd_sparse.pattern import ConvPattern, SparseConvWeight
from ptd_sparse.route_plan import load_route_plan, route_plan, save_route_plan
from ptd_sparse.sparsify import sparsify
from ptd_sparse.topk_teacher import TopKTeacher, topk_teacher


def design_student(*args, **kwargs):
    """The student of a pruned teacher, any traceable CNN: .module (ready to train), .plan (its widths), .report.
    See ptd_sparse.pipeline.design.design_student (imported lazily: the pipeline is optional for kernel users)."""
    from ptd_sparse.pipeline.design import design_student as rule

    return rule(*args, **kwargs)


def export(*args, **kwargs):
    """See ptd_sparse.onnx_export.export (imported lazily: it needs the optional onnx package, and it reads a run's
    model folders through the pipeline's checkpoint loader)."""
    from ptd_sparse.onnx_export import export as to_onnx

    return to_onnx(*args, **kwargs)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "ConvPattern", "SparseConvWeight", "choose_backend", "kd_loss", "masked_conv2d", "nn",
           "sparse_conv2d", "sparsify", "fuse_graph", "design_student", "export", "route_plan", "save_route_plan",
           "load_route_plan", "TopKTeacher", "topk_teacher"]
