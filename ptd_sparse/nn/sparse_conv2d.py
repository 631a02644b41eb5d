"""SparseConv2d: a convolution whose weight is stored only as its nonzeros (the canonical CSR format)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptd_sparse import _format_checks
from ptd_sparse._extension import extension_problem
from ptd_sparse._validation import pair
from ptd_sparse.backends import DENSE, SPARSE_CONV, choose_backend, requested_backend
from ptd_sparse.conv_geometry import output_memory_format
from ptd_sparse.fingerprint import content_key, version_of, weight_key
from ptd_sparse.functional import sparse_conv2d_indexed
from ptd_sparse.native import sparse_conv2d as native_sparse_conv2d
from ptd_sparse.nn import measured_route
from ptd_sparse.nn.pooling import MaxPool2d
from ptd_sparse.nn.tracing import tracing as _tracing
from ptd_sparse.pattern import ConvPattern, SparseConvWeight, dense_weight, transposed_view

_logger = logging.getLogger("ptd_sparse")

# The parts of ConvPattern that SparseConv2d derives instead of holding (see its docstring).
DERIVED_INDEX_NAMES = ("t_ptr", "t_rows", "t_perm", "flat_index")
# The sparse backend whose forward reads the compact (int16) col_idx; every other reader gets it as int32.
COMPACT_INDEX_BACKEND = "cpu"


def column_dtype(weight_shape, device: torch.device, training: bool) -> torch.dtype:
    """The dtype SparseConv2d holds col_idx in: in eval mode on a CPU, int16 where every column
    (c_in * KH + kh) * KW + kw of the weight is below 2^15 (any convolution up to 3640 input channels at 3x3), 6 bytes
    per float32 nonzero instead of 8; int32, the canonical format, elsewhere: in training mode (whose backward kernels
    and DDP's gloo broadcasts read int32) and on GPUs (whose kernels read int32)."""
    c_out, c_in, kh, kw = weight_shape
    fits = c_in * kh * kw <= torch.iinfo(torch.int16).max + 1
    return torch.int16 if device.type == "cpu" and fits and not training else torch.int32


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


class SparseConv2d(nn.Module):
    """Convolution with a SparseConvWeight: pattern tensors as buffers, the nonzero `values` [nnz] as a parameter
    (so they can be fine-tuned), optional bias. Memory and work scale with the nonzeros.

    With the automatic backend (backend=None, no PTD_BACKEND), an inference call (no gradient wanted) runs one of
    four routes (ptd_sparse.nn.measured_route): the sparse kernel, F.conv2d on the dense weight in NCHW or in
    channels_last, or (float32 on CPUs) oneDNN with the weight prepacked once and the ReLU fused. `route` (or
    `set_routes`, or sparsify's `routes`) says how the route is chosen: measured per shape bucket (None, "measure"),
    by the deterministic density rule ("density"), fixed (a route name), or from a saved plan. Every route returns
    the caller's layout. Calls that want gradients take the fixed route, else the sparse kernel or the dense route by
    the density crossover for their batch size. backend="dense" (or PTD_BACKEND=dense) always takes the dense route.
    A grouped or depthwise sparse_weight (groups > 1) runs the same sparse kernels (ptd_sparse.pattern), and its
    dense routes run F.conv2d with groups. Weights derived for the dense routes are keyed on the contents of values
    and pattern (ptd_sparse.fingerprint), so no way of changing values leaves a stale copy in use.

    `max_pool` (None, or a ptd_sparse.nn.MaxPool2d that sparsify moves here when it is the only reader of this
    layer's output) is applied to every route's output. An inference call that goes straight to the CPU forward
    operator runs ptd_sparse_kernels::conv_forward_max_pool instead, which pools in the kernel's epilogue where the
    forward's layout allows it (the wide layout, any window; the tiled layout's row-pair tiles, 2x2): a ResNet stem's
    full-size output (64 x 112 x 112 floats an image) is then never written (64 images, channels_last, density 0.1:
    77 -> 47 ms, Xeon).

    Held: values, row_ptr and col_idx, what the forward kernels read: in eval mode on a CPU col_idx is int16 where the
    weight's columns allow it (column_dtype), 6 bytes per float32 nonzero; state dicts hold it as int32, the canonical
    format (ptd_sparse.pattern), and so does a module in training mode or on a GPU. The transposed view that the input
    gradient needs (ptd_sparse.pattern.transposed_view, 8 more bytes per nonzero) and col_idx as int32 are derived on
    the first call that wants gradients and kept until the module is put in eval mode; calls that want none pass an
    empty view. The flat positions of the nonzeros in the dense weight are derived only while a dense weight is
    built."""

    route_policy: str = measured_route.MEASURE  # what a module unpickled from an older save lacks
    _index_views: tuple[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] | None = None

    def __init__(self, sparse_weight: SparseConvWeight, bias: Tensor | None = None, stride=1, padding=0,
                 dilation=1, backend: str | None = None, relu: bool = False, route: str | None = None):
        super().__init__()
        self.weight_shape = sparse_weight.shape  # full [C_out, C_in, KH, KW], what the kernels see
        self.groups = sparse_weight.groups
        self.register_buffer("row_ptr", sparse_weight.pattern.row_ptr)
        self.register_buffer("col_idx", sparse_weight.pattern.col_idx)  # int32 while training (see column_dtype)
        self.values = nn.Parameter(sparse_weight.values.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.stride, self.padding, self.dilation = pair(stride, "stride", 1), pair(padding, "padding", 0), \
            pair(dilation, "dilation", 1)
        self.backend = backend
        self.relu = relu  # max(0, .) fused into the kernel's epilogue
        self.max_pool = None  # the max-pool fused after it (see the class docstring)
        self._density = sparse_weight.density
        # How inference calls choose their route (measured_route: "measure", "density" or a route name).
        self.route_policy = measured_route.check_policy(route)
        # The route of each input shape bucket (measured_route.shape_key -> route name), measured or loaded from a
        # plan; not saved in the state dict, as it describes one machine.
        self._routes: dict[tuple, str] = {}
        # Weights derived from values for the dense routes, on CPUs only (on GPUs the scatter costs less than
        # checking a cache): (_weight_key(), {NCHW: False / channels_last: True -> weight})
        # and (content key, prepacked oneDNN weight). Keyed on the contents, never on version counters, which fused
        # optimizers and .data edits do not move; dropped by deepcopy and pickling (__getstate__).
        self._dense_cache: tuple[tuple, dict[bool, Tensor]] | None = None
        self._prepacked: tuple[tuple, Tensor] | None = None
        # (_pattern_key(), (t_ptr, t_rows, t_perm)) while calls that want gradients run (see the class docstring).
        self._index_views = None

    def keep_dense_copy(self) -> None:
        """Build the dense weight now (it is otherwise built by the first call that takes a dense route), so calls
        whose route is dense start without that cost (on CPUs; other devices scatter it per call). The copy follows
        the values: it is rebuilt whenever their contents change, however they were changed."""
        if self.values.device.type == "cpu":
            with torch.no_grad():
                self._cached_dense_weight()

    def _pattern_key(self) -> tuple:
        # On a CPU the pattern's contents: `.data` edits, NumPy writes and load_state_dict under inference mode move
        # no version counter, and a freed buffer's address is reused (eval() builds a new col_idx). Elsewhere, where
        # hashing would copy the pattern to the host, the buffers' address and version counter.
        if self.row_ptr.device.type == "cpu":
            return content_key(self.row_ptr, self.col_idx)
        return tuple(item for index in (self.row_ptr, self.col_idx) for item in (index.data_ptr(), version_of(index)))

    def _weight_key(self) -> tuple:
        # The contents of values (what optimizers and users change, in place or not) and of the pattern.
        return weight_key(self.values, self.row_ptr, self.col_idx)

    def _canonical_col_idx(self) -> Tensor:
        """col_idx as int32, the canonical format (the buffer itself where it is held so)."""
        return self.col_idx if self.col_idx.dtype == torch.int32 else self.col_idx.to(torch.int32)

    def _training_indices(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(col_idx as int32, t_ptr, t_rows, t_perm) for calls that want gradients, derived once per pattern and kept
        until eval(). While tracing or compiling they are derived in the graph (a traced graph can neither key a
        cache on buffer addresses nor write module state)."""
        if _tracing():
            return (self._canonical_col_idx(), *transposed_view(self.row_ptr, self.col_idx, self.weight_shape))
        key = self._pattern_key()
        if self._index_views is not None and self._index_views[0] == key:
            return self._index_views[1]
        with torch.inference_mode(False), torch.no_grad():
            view = (self._canonical_col_idx(), *transposed_view(self.row_ptr, self.col_idx, self.weight_shape))
        self._index_views = (key, view)
        return view

    def _indices(self, wants_grad: bool, backend: str) -> tuple[Tensor, ...]:
        """The index tensors of a sparse kernel call on `backend`: row_ptr, col_idx and the transposed view, which is
        empty when no gradient is wanted (only the input gradient reads it). col_idx goes in its compact form only
        to the CPU kernels' forward; other backends get it as int32."""
        if wants_grad:
            return (self.row_ptr, *self._training_indices())
        absent = self.row_ptr.new_empty(0)
        col_idx = self.col_idx if backend == COMPACT_INDEX_BACKEND else self._canonical_col_idx()
        return self.row_ptr, col_idx, absent, absent, absent

    def _scatter_dense(self) -> Tensor:
        """The dense (grouped) weight holding values at the pattern's positions (differentiable in values)."""
        return dense_weight(self.values, self.row_ptr, self.col_idx, list(self.weight_shape), self.groups)

    def train(self, mode: bool = True) -> "SparseConv2d":
        # Eval mode marks an inference model: the transposed view is dropped and col_idx goes compact, so it holds
        # only what its routes read.
        if not mode:
            self._index_views = None
        super().train(mode)
        self._hold_columns_in_device_form()
        return self

    def _cached_dense_weight(self, channels_last: bool = False) -> Tensor:
        """The dense weight in NCHW or channels_last, cached (CPU only) while values and pattern hold the same bytes.
        Made outside inference mode, so a weight first built under torch.inference_mode can serve later calls that
        record autograd."""
        key = self._weight_key()
        if self._dense_cache is not None and self._dense_cache[0] == key and channels_last in self._dense_cache[1]:
            return self._dense_cache[1][channels_last]  # without entering the grad modes (see _prepacked_weight)
        with torch.inference_mode(False), torch.no_grad():
            if self._dense_cache is None or self._dense_cache[0] != key:
                self._dense_cache = (key, {})
            weights = self._dense_cache[1]
            if channels_last not in weights:
                dense = weights[False] if False in weights else self._scatter_dense()
                weights[channels_last] = dense.contiguous(memory_format=torch.channels_last) if channels_last \
                    else dense
        return weights[channels_last]

    def _dense_weight(self, channels_last: bool = False) -> Tensor:
        """The dense weight for this call. With gradients wanted for values, while tracing or compiling, or off the
        CPU, it is scattered from them anew inside the graph (a cached weight would carry no gradient, a traced graph
        would hold it as a constant, and on a GPU the scatter costs less than checking a cache); otherwise the cached
        copy."""
        if (torch.is_grad_enabled() and self.values.requires_grad) or _tracing() or self.values.device.type != "cpu":
            weight = self._scatter_dense()
            return weight.contiguous(memory_format=torch.channels_last) if channels_last else weight
        return self._cached_dense_weight(channels_last)

    def __getstate__(self):
        # The derived weights are dropped (rebuilt on the next call): a prepacked oneDNN tensor cannot be copied or
        # pickled at all, and a copy that kept them would only duplicate what values already hold.
        state = self.__dict__.copy()
        state["_dense_cache"] = None
        state["_prepacked"] = None
        state["_index_views"] = None
        return state

    def __setstate__(self, state):
        # An unpickled module (torch.load of a whole model, perhaps with map_location) takes its device's form.
        super().__setstate__(state)
        if "max_pool" not in self._modules and "max_pool" not in self.__dict__:  # saved before pools were fused
            self.max_pool = None
        self._hold_columns_in_device_form()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: Tensor | None = None, backend: str | None = None,
                  route: str | None = None) -> "SparseConv2d":
        """Compress `conv` (any groups, symmetric zero padding). Without a mask, the nonzero weights are kept."""
        padding = explicit_padding(conv)
        if padding is None:
            raise ValueError(f"SparseConv2d needs symmetric zero padding; got padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r}")
        weight = conv.weight.detach()
        sparse_weight = SparseConvWeight.from_dense(weight, mask, conv.groups)
        return cls(sparse_weight, conv.bias, conv.stride, padding, conv.dilation, backend, route=route)

    @property
    def sparse_weight(self) -> SparseConvWeight:
        """The weight as a SparseConvWeight (its full pattern derived from row_ptr and col_idx, which were validated
        when the module was built or its state loaded)."""
        pattern = ConvPattern._from_trusted_csr(self.weight_shape, self.row_ptr, self._canonical_col_idx(), self.groups)
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
        # Derived data that state dicts of other versions hold as buffers: the dense weight is dropped; the derived
        # indices are checked against the rest when present (a file that holds them inconsistent is corrupt), then
        # dropped.
        state_dict.pop(prefix + "dense_weight", None)
        derived = {name: state_dict.pop(prefix + name) for name in DERIVED_INDEX_NAMES if prefix + name in state_dict}
        held = {"row_ptr": self.row_ptr, "col_idx": self._canonical_col_idx(), "values": self.values}
        incoming = {name: state_dict.get(prefix + name, held[name]) for name in held}
        try:
            if derived and set(derived) != set(DERIVED_INDEX_NAMES):
                raise ValueError(f"the state holds {sorted(derived)} but not the rest of {DERIVED_INDEX_NAMES}")
            for name, tensor in {**incoming, **derived}.items():
                if not isinstance(tensor, Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            cpu = {name: tensor.detach().cpu() for name, tensor in {**incoming, **derived}.items()}
            if derived:
                _format_checks.check_pattern(self.weight_shape, *(cpu[name] for name in ConvPattern.index_names()),
                                             self.groups)
            else:
                _format_checks.check_csr(self.weight_shape, cpu["row_ptr"], cpu["col_idx"], self.groups)
            _format_checks.check_values(cpu["values"], cpu["col_idx"].numel(), torch.device("cpu"))
            bias = state_dict.get(prefix + "bias")
            if isinstance(bias, Tensor) and bias.is_floating_point():
                _format_checks.check_finite(bias.detach(), "bias")
        except (TypeError, ValueError) as error:
            raise type(error)(f"state dict of SparseConv2d {prefix.rstrip('.') or '(root)'} with weight shape "
                              f"{self.weight_shape}: {error}") from None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._hold_columns_in_device_form()  # load_state_dict(assign=True) puts the file's int32 tensor in place

    def _hold_columns_in_device_form(self) -> None:
        wanted = column_dtype(self.weight_shape, self.col_idx.device, self.training)
        if self.col_idx.dtype != wanted:
            self.col_idx = self.col_idx.to(wanted)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # col_idx in the canonical int32 format, whatever form this module holds: files and state dicts stay the
        # same on every device (ptd_sparse.pattern).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.col_idx.dtype != torch.int32:
            destination[prefix + "col_idx"] = self.col_idx.to(torch.int32)

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .cpu() and the like move col_idx in its dtype; it then takes the form of its new device.
        super()._apply(fn, recurse)
        self._hold_columns_in_device_form()
        return self

    def forward(self, input: Tensor) -> Tensor:
        requested = requested_backend(self.backend)
        if requested == DENSE:
            return self._run(measured_route.DENSE, input)
        if requested is not None or input.dim() != 4:
            return self._run(measured_route.SPARSE, input)
        if _tracing():
            # One route, chosen here without timing or caches, so the traced or exported graph is the same on every
            # trace and holds no stale constant.
            return self._run(self.static_route(), input)
        if self._wants_grad(input):
            return self._run(self._training_route(input), input)
        route = measured_route.runnable(self._inference_route(input), input)
        if route == measured_route.SPARSE and self.backend is None and self._takes_forward_operator(input):
            # No backend was asked for (requested_backend above), so the sparse route's is the device's automatic
            # choice, the cpu backend wherever the extension loads: _run would take the forward operator too, after
            # looking the backend up again (about 4 us of a 13 us call's Python, Xeon).
            return self._forward_operator(input)
        return self._run(route, input)

    def static_route(self) -> str:
        """The route of a traced, compiled or exported graph: the fixed route, else the one most buckets measured
        (sparse on a tie), else the density rule. The prepacked route runs as the dense one there (its weight is
        not a graph input)."""
        if self.route_policy in measured_route.ROUTES:
            route = self.route_policy
        elif self._routes:
            routes = list(self._routes.values())
            route = max(sorted(set(routes), key=lambda r: r != measured_route.SPARSE), key=routes.count)
        else:
            route = self.density_route(self.values.device, None)
        return measured_route.DENSE if route == measured_route.DENSE_PREPACKED else route

    def density_route(self, device: torch.device, batch: int | None = None) -> str:
        """The density rule's route on `device` (for a batch of `batch` images; None: any batch): the sparse kernel
        at or below the backend's density crossover, the dense route above it."""
        chosen = choose_backend(SPARSE_CONV, device, None, self._density, batch)
        return measured_route.DENSE if chosen == DENSE else measured_route.SPARSE

    def _training_route(self, input: Tensor) -> str:
        """A call that records autograd: a fixed route where one is set (the prepacked one, which has no backward,
        as the dense one), else the density rule for the batch."""
        if self.route_policy in measured_route.ROUTES:
            return measured_route.DENSE if self.route_policy == measured_route.DENSE_PREPACKED else self.route_policy
        return self.density_route(input.device, input.shape[0])

    def _inference_route(self, input: Tensor) -> str:
        if self.route_policy == measured_route.DENSITY:
            return self.density_route(input.device, None)
        if self.route_policy in measured_route.ROUTES and not self._routes:
            return self.route_policy
        key = measured_route.shape_key(input)
        route = self._routes.get(key)
        if route is not None:
            return route
        if self.route_policy != measured_route.MEASURE:
            # A plan that lacks this bucket: its nearest one, never a measurement.
            return self._routes[measured_route.nearest_key(self._routes, key)] if self._routes else self.route_policy
        if len(self._routes) >= measured_route.MAX_BUCKETS:
            nearest = measured_route.nearest_key(self._routes, key)
            _logger.debug("SparseConv2d %s: %d buckets measured; input %s takes the route of bucket %s",
                          self.weight_shape, len(self._routes), tuple(input.shape), nearest)
            return self._routes[nearest]
        return self._measure(key, input)

    def _runs_forward_only(self, backend: str, input: Tensor) -> bool:
        """Whether an inference call on `backend` goes straight to the CPU forward operator. The public function's
        argument checks and the differentiable operator's autograd layer cost about 9 us a call (the module's call
        of a 16-channel 2x2 layer at batch 1 took 28 us with them, 19 without, on a Xeon; a batch-1 CIFAR VGG19 ran
        6-8% faster without them), where the module has validated its own tensors once and the operator checks the
        geometry itself, each error naming the argument. Only inputs the public function would pass to that operator
        unchanged take this way: 4-D, on the CPU, of the weight's dtype, outside autocast and tracing; others take
        the public function and its messages."""
        return backend == COMPACT_INDEX_BACKEND and input.dim() == 4 and not _tracing() and \
            self._takes_forward_operator(input)

    def _takes_forward_operator(self, input: Tensor) -> bool:
        """The part of _runs_forward_only that the input and this process decide: on the CPU, of the weight's dtype,
        outside autocast, with the extension loaded."""
        return (input.device.type == "cpu" and input.dtype == self.values.dtype
                and not torch.is_autocast_enabled("cpu") and extension_problem() is None)

    def _forward_operator(self, input: Tensor) -> Tensor:
        """The CPU forward operator's output for an inference call (where _runs_forward_only holds), max-pooled in its
        epilogue where a pool is fused."""
        pool = self.max_pool
        if pool is None:
            return native_sparse_conv2d.forward_only(input, self.values, self.row_ptr, self.col_idx,
                                                     list(self.weight_shape), self.bias, self.stride, self.padding,
                                                     self.dilation, self.relu)
        return native_sparse_conv2d.forward_max_pool(
            input, self.values, self.row_ptr, self.col_idx, list(self.weight_shape), self.bias, self.stride,
            self.padding, self.dilation, self.relu, pool.kernel_size, pool.stride, pool.padding, pool.dilation)

    def _wants_grad(self, input: Tensor) -> bool:
        return torch.is_grad_enabled() and (input.requires_grad or self.values.requires_grad or
                                            (self.bias is not None and self.bias.requires_grad))

    def __setattr__(self, name, value):
        if name == "max_pool" and value is not None:
            # The fused operator reads the pool's window alone: only a pool that is exactly that window (floor mode,
            # no indices) gives every route the same result.
            if not isinstance(value, MaxPool2d):
                raise TypeError(f"max_pool must be a ptd_sparse.nn.MaxPool2d or None, got {type(value).__name__} "
                                f"(ptd_sparse.nn.MaxPool2d.of converts an nn.MaxPool2d in floor mode)")
        super().__setattr__(name, value)

    def _sparse_backend(self, input: Tensor) -> str:
        # The sparse kernel of the device's preferred backend, whatever the density: the sparse route is the sparse
        # one (no crossover applies; with density=None the automatic choice gives the sparse backend).
        return self.backend if self.backend is not None else choose_backend(SPARSE_CONV, input.device, None, None)

    def _run(self, route: str, input: Tensor) -> Tensor:
        """The route's output, max-pooled where a pool is fused (max_pool): in the forward kernel's epilogue where the
        call goes straight to it, else by the pool module after the convolution."""
        if route == measured_route.SPARSE and not self._wants_grad(input) \
                and self._runs_forward_only(self._sparse_backend(input), input):
            return self._forward_operator(input)
        pool = self.max_pool
        out = self._run_conv(route, input)
        return out if pool is None else pool(out)

    def _run_conv(self, route: str, input: Tensor) -> Tensor:
        # Every route returns its output in the caller's layout (NCHW, or channels_last when the input is), the
        # conversion inside the route and so inside its measured time. A route that handed back its own layout would
        # make the next layers, activations and residual additions pay for the change, uncounted: a torchvision-style
        # ResNet18 whose layers each picked their fastest route lost more in layout copies than the routes gained.
        caller_format = output_memory_format(input)
        if route == measured_route.SPARSE:
            backend = self._sparse_backend(input)
            indices = self._indices(self._wants_grad(input), backend)
            out = sparse_conv2d_indexed(input, self.values, indices, self.weight_shape, self._density, self.bias,
                                        self.stride, self.padding, self.dilation, backend=backend, relu=self.relu,
                                        groups=self.groups)
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

    def _prepacked_weight(self, input: Tensor) -> Tensor:
        """The dense weight in oneDNN's blocked layout for the prepacked route, reordered once (for the first input's
        shape; any shape runs on it) and rebuilt whenever values or pattern change, as the dense copy is. The grad
        modes are entered only to build it: entered on every call, they took ~10 us of a batch-1 layer's call."""
        key = self._weight_key()
        if self._prepacked is None or self._prepacked[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                weight = self._scatter_dense().detach().to_mkldnn()
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(weight, self.padding, self.stride, self.dilation,
                                                                   self.groups, list(input.shape))
            self._prepacked = (key, packed)
        return self._prepacked[1]

    @torch.no_grad()
    def _measure(self, key: tuple, input: Tensor) -> str:
        # A layer holds at most one dense form: once a bucket has chosen one, later buckets choose between it and the
        # sparse kernel (a second dense form would double the layer's memory for a difference of a few percent).
        offered = measured_route.routes_for(input)
        held = {route for route in self._routes.values() if route != measured_route.SPARSE} & set(offered)
        if held:
            offered = tuple(route for route in offered if route == measured_route.SPARSE or route in held)
        routes = {name: (lambda x, name=name: self._run(name, x)) for name in offered}
        best, seconds = measured_route.fastest(routes, input)
        self._routes[key] = best
        self._drop_unused_weights()
        _logger.debug("SparseConv2d %s density %.3f input %s: %s (%s)", self.weight_shape, self._density,
                      tuple(input.shape), best, ", ".join(f"{n} {1e3 * t:.3f} ms" for n, t in seconds.items()))
        return best

    def _drop_unused_weights(self) -> None:
        """Keep only the derived weights that the chosen routes read: memory stays at the nonzeros for a layer
        whose every bucket runs the sparse kernel, and at one dense form for a layer that runs dense."""
        used = set(self._routes.values()) | ({self.route_policy} & set(measured_route.ROUTES))
        if measured_route.DENSE_PREPACKED not in used:
            self._prepacked = None
        if self._dense_cache is not None:
            layouts = self._dense_cache[1]
            if measured_route.DENSE not in used:
                layouts.pop(False, None)
            if measured_route.DENSE_CHANNELS_LAST not in used:
                layouts.pop(True, None)
            if not layouts:
                self._dense_cache = None

    def set_routes(self, policy: str | None, table: dict[tuple, str] | None = None) -> None:
        """Fix how inference calls choose their route: `policy` as in measured_route (None: measure), and the route
        of each shape bucket (`table`, from a saved plan). Derived weights no route reads are dropped."""
        policy = measured_route.check_policy(policy)
        table = dict(table or {})
        for key, route in table.items():
            if route not in measured_route.ROUTES:
                raise ValueError(f"route of bucket {key} must be one of {measured_route.ROUTES}, got {route!r}")
        self.route_policy, self._routes = policy, table
        self._drop_unused_weights()

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
