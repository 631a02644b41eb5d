"""SparseConv2d: a convolution whose weight is stored only as its nonzeros (the canonical CSR format)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptd_sparse import _format_checks
from ptd_sparse._validation import pair
from ptd_sparse.backends import DENSE, SPARSE_CONV, choose_backend, requested_backend
from ptd_sparse.functional import pattern_indices, sparse_conv2d_indexed
from ptd_sparse.nn import measured_route
from ptd_sparse.pattern import ConvPattern, SparseConvWeight

_logger = logging.getLogger("ptd_sparse")


def explicit_padding(conv: nn.Conv2d) -> list[int] | None:
    """conv's zero padding as [pad_h, pad_w], or None when it cannot be written so (asymmetric 'same', or a
    non-zero padding mode)."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return [0, 0]
    if conv.padding == "same":
        left_w, right_w, left_h, right_h = conv._reversed_padding_repeated_twice
        return [left_h, left_w] if (left_h, left_w) == (right_h, right_w) else None
    return list(conv.padding)


def is_channels_last(input: Tensor) -> bool:
    """Whether a 4-d `input` is laid out channels_last (and not also plain contiguous, as 1x1 maps or one channel
    are)."""
    return input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)


class SparseConv2d(nn.Module):
    """Convolution with a SparseConvWeight: pattern tensors as buffers, the nonzero `values` [nnz] as a parameter
    (so they can be fine-tuned), optional bias. Memory and work scale with the nonzeros.

    With the automatic backend (backend=None, no PTD_BACKEND), an inference call (no gradient wanted) runs whichever
    of its routes was fastest on the first call of its shape bucket (ptd_sparse.nn.measured_route): the sparse
    kernel, F.conv2d on the dense weight in NCHW or in channels_last, or (float32 on CPUs) oneDNN with the weight
    prepacked once and the ReLU fused. Every route returns the caller's layout. Calls that want gradients take the sparse
    kernel, or the dense route above the density crossover for their batch size. backend="dense" (or
    PTD_BACKEND=dense) always takes the dense route. A grouped or depthwise sparse_weight (groups > 1) runs the
    same sparse kernels (ptd_sparse.pattern), and its dense routes run F.conv2d with groups, so the measurement
    compares the sparse kernel with PyTorch's own grouped convolution."""

    def __init__(self, sparse_weight: SparseConvWeight, bias: Tensor | None = None, stride=1, padding=0,
                 dilation=1, backend: str | None = None, relu: bool = False):
        super().__init__()
        self.weight_shape = sparse_weight.shape  # full [C_out, C_in, KH, KW], what the kernels see
        self.groups = sparse_weight.groups
        for name in ConvPattern.index_names():
            self.register_buffer(name, getattr(sparse_weight.pattern, name))
        self.values = nn.Parameter(sparse_weight.values.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.stride, self.padding, self.dilation = pair(stride, "stride", 1), pair(padding, "padding", 0), \
            pair(dilation, "dilation", 1)
        self.backend = backend
        self.relu = relu  # max(0, .) fused into the kernel's epilogue
        self._density = sparse_weight.density
        # The dense weight of the calls that the automatic choice sends to the dense route (above the crossover for
        # their batch size), built on first use and reused while values and pattern are unchanged: (key, weight).
        self._dense_cache: tuple[tuple, dict[bool, Tensor]] | None = None
        # The measured route of each input shape bucket (measured_route.shape_key -> route name); not saved in the
        # state dict, as it describes this machine.
        self._routes: dict[tuple, str] = {}
        # The prepacked oneDNN weight of the dense_prepacked route: (key as for the dense copy, weight), or None.
        self._prepacked: tuple[tuple, Tensor] | None = None

    def keep_dense_copy(self) -> None:
        """Build the dense weight now (it is otherwise built by the first call that takes the dense route), so calls
        whose batch makes the dense kernel faster (by the measured crossover, ptd_sparse.backends.dense_crossover)
        start without that cost. The copy follows the values: it is rebuilt whenever they change."""
        with torch.no_grad():
            self._cached_dense_weight()

    def _dense_key(self) -> tuple:
        # In-place updates (optimizer steps, load_state_dict) move a tensor's version counter; .to() and .half()
        # change its storage, device or dtype.
        # Inference tensors (made under torch.inference_mode) track no version; they cannot be edited in place
        # outside inference mode either, so their storage identifies them.
        return tuple((-1 if t.is_inference() else t._version, t.data_ptr(), t.device, t.dtype)
                     for t in (self.values, self.flat_index))

    def _cached_dense_weight(self, channels_last: bool = False) -> Tensor:
        """The cached dense weight, in NCHW or channels_last (both kept once made: each is read on every call of
        its route, and converting per call would copy the whole weight)."""
        key = self._dense_key()
        if self._dense_cache is None or self._dense_cache[0] != key:
            self._dense_cache = (key, {False: self.sparse_weight.to_dense().detach()})
        weights = self._dense_cache[1]
        if channels_last not in weights:
            weights[channels_last] = weights[False].contiguous(memory_format=torch.channels_last)
        return weights[channels_last]

    def _dense_weight(self, channels_last: bool = False) -> Tensor:
        """The dense weight for this call. With gradients wanted for values it is scattered from them anew, as part
        of the autograd graph (values change every step, and a weight cached across calls would carry no gradient);
        otherwise the cached copy, rebuilt only when values or pattern changed."""
        if torch.is_grad_enabled() and self.values.requires_grad:
            weight = self.sparse_weight.to_dense()
            return weight.contiguous(memory_format=torch.channels_last) if channels_last else weight
        return self._cached_dense_weight(channels_last)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: Tensor | None = None, backend: str | None = None) -> "SparseConv2d":
        """Compress `conv` (any groups, symmetric zero padding). Without a mask, the nonzero weights are kept."""
        padding = explicit_padding(conv)
        if padding is None:
            raise ValueError(f"SparseConv2d needs symmetric zero padding; got padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r}")
        weight = conv.weight.detach()
        sparse_weight = SparseConvWeight.from_dense(weight, mask, conv.groups)
        return cls(sparse_weight, conv.bias, conv.stride, padding, conv.dilation, backend)

    @property
    def sparse_weight(self) -> SparseConvWeight:
        # The buffers were validated when the module was built or its state loaded; forward reads this every call.
        pattern = ConvPattern._trusted(self.weight_shape, *(getattr(self, name) for name in ConvPattern.index_names()),
                                       groups=self.groups)
        return SparseConvWeight._trusted(pattern, self.values)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        return self._density

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checked before anything is copied: a corrupt pattern must neither reach the kernels nor half-overwrite
        # this module's buffers. Missing entries (strict=False) are taken from the module, so the combination that
        # would result is what is checked.
        state_dict.pop(prefix + "dense_weight", None)  # derived data, saved as a buffer by earlier versions
        incoming = {name: state_dict.get(prefix + name, getattr(self, name))
                    for name in ConvPattern.index_names() + ("values",)}
        try:
            for name, tensor in incoming.items():
                if not isinstance(tensor, Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            cpu = {name: tensor.detach().cpu() for name, tensor in incoming.items()}
            _format_checks.check_pattern(self.weight_shape, *(cpu[name] for name in ConvPattern.index_names()),
                                         self.groups)
            _format_checks.check_values(cpu["values"], cpu["col_idx"].numel(), torch.device("cpu"))
            bias = state_dict.get(prefix + "bias")
            if isinstance(bias, Tensor) and bias.is_floating_point():
                _format_checks.check_finite(bias.detach(), "bias")
        except (TypeError, ValueError) as error:
            raise type(error)(f"state dict of SparseConv2d {prefix.rstrip('.') or '(root)'} with weight shape "
                              f"{self.weight_shape}: {error}") from None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        requested = requested_backend(self.backend)
        if requested == DENSE:
            return self._run(measured_route.DENSE, input)
        automatic = requested is None
        if automatic and input.dim() == 4 and not torch.compiler.is_compiling() and not self._wants_grad(input):
            key = measured_route.shape_key(input)
            route = self._routes.get(key)
            if route is None:
                route = self._measure(key, input)
            return self._run(route, input)
        batch = input.shape[0] if input.dim() == 4 else 1
        # The automatic choice's dense route runs F.conv2d on this module's cached dense weight; an explicit backend
        # (reference included: the oracle) always goes through the operator.
        if automatic and not torch.compiler.is_compiling() and \
                choose_backend(SPARSE_CONV, input.device, self.backend, self._density, batch) == DENSE:
            return self._run(measured_route.DENSE, input)
        return self._run(measured_route.SPARSE, input)

    def _wants_grad(self, input: Tensor) -> bool:
        return torch.is_grad_enabled() and (input.requires_grad or self.values.requires_grad or
                                            (self.bias is not None and self.bias.requires_grad))

    def _run(self, route: str, input: Tensor) -> Tensor:
        # Every route returns its output in the caller's layout (NCHW, or channels_last when the input is), the
        # conversion inside the route and so inside its measured time. A route that handed back its own layout would
        # make the next layers, activations and residual additions pay for the change, uncounted: a torchvision-style
        # ResNet18 whose layers each picked their fastest route lost more in layout copies than the routes gained.
        caller_format = torch.channels_last if is_channels_last(input) else torch.contiguous_format
        if route == measured_route.SPARSE:
            # The sparse kernel of the device's preferred backend, whatever the density: this route is the sparse
            # one (no crossover applies; with density=None the automatic choice gives the sparse backend).
            backend = self.backend if self.backend is not None else \
                choose_backend(SPARSE_CONV, input.device, None, None)
            out = sparse_conv2d_indexed(input, self.values, pattern_indices(self), self.weight_shape, self._density,
                                        self.bias, self.stride, self.padding, self.dilation, backend=backend,
                                        relu=self.relu, groups=self.groups)
            return out.contiguous(memory_format=caller_format) if out.dim() == 4 else out
        if route == measured_route.DENSE_PREPACKED:
            out = torch.ops.mkldnn._convolution_pointwise(
                input.contiguous(memory_format=torch.channels_last), self._prepacked_weight(input), self.bias,
                self.padding, self.stride, self.dilation, self.groups, "relu" if self.relu else "none", [], "")
            return out.contiguous(memory_format=caller_format)
        channels_last = route == measured_route.DENSE_CHANNELS_LAST
        if channels_last:
            # oneDNN's NHWC kernels; at small batches its NCHW path may fall back to a slow direct convolution.
            input = input.contiguous(memory_format=torch.channels_last)
        weight = self._dense_weight(channels_last)
        out = F.conv2d(input, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        out = out.relu_() if self.relu and not out.requires_grad else (F.relu(out) if self.relu else out)
        return out.contiguous(memory_format=caller_format) if out.dim() == 4 else out

    @torch.no_grad()
    def _prepacked_weight(self, input: Tensor) -> Tensor:
        """The dense weight in oneDNN's blocked layout for the prepacked route, reordered once (for the first input's
        shape; any shape runs on it) and rebuilt only when values or pattern change, as the dense copy is."""
        key = self._dense_key()
        if self._prepacked is None or self._prepacked[0] != key:
            weight = self._cached_dense_weight().to_mkldnn()
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(weight, self.padding, self.stride, self.dilation,
                                                               self.groups, list(input.shape))
            self._prepacked = (key, packed)
        return self._prepacked[1]

    @torch.no_grad()
    def _measure(self, key: tuple, input: Tensor) -> str:
        routes = {name: (lambda x, name=name: self._run(name, x)) for name in measured_route.routes_for(input)}
        best, seconds = measured_route.fastest(routes, input)
        self._routes[key] = best
        if measured_route.DENSE_PREPACKED not in self._routes.values():
            self._prepacked = None
        if best == measured_route.SPARSE:
            self._dense_cache = None  # the dense weight is not needed by this bucket: keep memory at the nonzeros
        _logger.debug("SparseConv2d %s density %.3f input %s: %s (%s)", self.weight_shape, self._density,
                      tuple(input.shape), best, ", ".join(f"{n} {1e3 * t:.3f} ms" for n, t in seconds.items()))
        return best

    @property
    def routes(self) -> dict[tuple, str]:
        """The measured route of each input shape bucket seen so far (see ptd_sparse.nn.measured_route)."""
        return dict(self._routes)

    def extra_repr(self) -> str:
        c_out, c_in, kh, kw = self.weight_shape
        return (f"{c_in}, {c_out}, kernel_size=({kh}, {kw}), stride={tuple(self.stride)}, "
                f"padding={tuple(self.padding)}, dilation={tuple(self.dilation)}, "
                + (f"groups={self.groups}, " if self.groups != 1 else "") + f"bias={self.bias is not None}, "
                f"nnz={self.nnz}, density={self.density:.4f}" + (", relu" if self.relu else ""))
