"""Modules: MaskedConv2d / MaskedLinear (training pruned layers), SparseConv2d (a convolution stored sparse), KDLoss,
MaxPool2d / MaxPool2x2 (the inference form's max-pools)."""
from ptd_sparse.nn.kd_loss import KDLoss
from ptd_sparse.nn.masked_conv2d import MaskedConv2d
from ptd_sparse.nn.masked_linear import MaskedLinear
from ptd_sparse.nn.pooling import MaxPool2d, MaxPool2x2
from ptd_sparse.nn.sparse_conv2d import SparseConv2d

__all__ = ["KDLoss", "MaskedConv2d", "MaskedLinear", "MaxPool2d", "MaxPool2x2", "SparseConv2d"]
