"""ptd-sparse in one page: a pruned convolution on sparse kernels, the fused KD loss, and sparsify for inference."""
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

import ptd_sparse
from ptd_sparse.nn import KDLoss, MaskedConv2d

torch.manual_seed(0)

# 1. A masked convolution: F.conv2d(x, weight * mask) computed from the nonzeros only.
x = torch.randn(8, 64, 16, 16)
weight = torch.randn(64, 64, 3, 3)
mask = torch.rand(weight.shape) < 0.05  # 95% of the weights pruned
out = ptd_sparse.masked_conv2d(x, weight, mask, padding=1)
print("masked_conv2d matches F.conv2d(x, weight * mask):",
      torch.allclose(out, F.conv2d(x, weight * mask, padding=1), atol=1e-4))

# 2. A drop-in pruned layer for training: the weight gradient is zero where the mask is zero.
conv = MaskedConv2d(64, 64, 3, padding=1)
conv.set_mask(mask)
conv(x).square().mean().backward()
print("MaskedConv2d: density", round(conv.density, 3), "| gradient outside the mask is zero:",
      bool((conv.weight.grad[~conv.mask] == 0).all()))

# 3. The fused KD loss of the paper (alpha 0.95, T 10) with its gradient computed in the same pass.
student = torch.randn(128, 100, requires_grad=True)
teacher = torch.randn(128, 100)
labels = torch.randint(0, 100, (128,))
loss = KDLoss(temperature=10.0, alpha=0.95)(student, teacher, labels)
loss.backward()
eager = 0.95 * 100 * F.kl_div(F.log_softmax(student / 10, 1), F.log_softmax(teacher / 10, 1),
                              reduction="batchmean", log_target=True) + 0.05 * F.cross_entropy(student, labels)
print(f"kd_loss {loss.item():.5f} vs eager composition {eager.item():.5f}")

# 4. sparsify: a model pruned with torch.nn.utils.prune, run with its convolutions stored sparse.
model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
convs = [(m, "weight") for m in model if isinstance(m, nn.Conv2d)]
prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=0.9)
sparse_model = ptd_sparse.sparsify(model)
images = torch.randn(4, 3, 32, 32)
print("sparsified model:", [type(m).__name__ for m in sparse_model][:3], "| same logits:",
      torch.allclose(sparse_model(images), model(images), atol=1e-4))
# fuse_graph: the same model's forward as an fx graph, ReLUs and residual additions fused into the kernels' epilogues
# where sparsify (which keeps the forward as written) cannot; checked against the model on the example.
graph_model = ptd_sparse.fuse_graph(sparse_model, example_input=images)
print("fused graph: same logits:", torch.allclose(graph_model(images), model(images), atol=1e-4))
