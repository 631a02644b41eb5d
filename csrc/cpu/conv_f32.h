// The float32 fast paths of the sparse convolution (the kernels of wide_conv_f32.h applied to the operator's
// tensors): forward, backward-data and backward-weight, each choosing between the wide and the batch-innermost
// layout. Entry points return false when the geometry does not suit either layout; the caller
// (sparse_conv2d_cpu.cpp) then runs its generic loops.
//
// Compiled once per instruction set, like wide_conv_f32.h: included only by csrc/cpu/isa/kernels_body.h.
#ifndef PTD_ISA_VECTOR_BYTES
#error "conv_f32.h is compiled per instruction set: include csrc/cpu/isa/kernels_body.h instead"
#endif

// Packed-image offset of every weight column (c_in, kh, kw) for either packing (wide::PackedGeometry or
// batch_inner::Geometry), tap (kh, kw) flipped when `flipped` (the data gradient's kernel) and the channel term left
// out when `without_channel`. A table of C_in * KH * KW entries built per call makes each nonzero's tap one load:
// decoding every column with three integer divisions cost more than the arithmetic itself at batch 1, where each
// tap is applied to a few dozen outputs only. Both packings' offsets are linear in the channel, so each tap's
// spatial term is computed once (with the packing's divisions by the stride) and the channels add multiples of one
// stride: computed per channel and tap, the divisions took ~7 us of a 512-channel layer's call at batch 1.
template <typename Packing>
std::vector<int32_t> column_offsets(const ConvGeometry& g, const Packing& p, bool flipped, bool without_channel) {
  const int64_t taps = g.taps();
  std::vector<int32_t> table(g.in_channels * taps);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh)
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t th = (flipped ? g.kernel_h - 1 - kh : kh) * g.dil_h;
      const int64_t tw = (flipped ? g.kernel_w - 1 - kw : kw) * g.dil_w;
      table[kh * g.kernel_w + kw] = p.tap_offset(0, th, tw);
    }
  const int32_t channel_stride = without_channel ? 0 : p.tap_offset(1, 0, 0) - p.tap_offset(0, 0, 0);
  for (int64_t c = 1; c < g.in_channels; ++c)
    for (int64_t t = 0; t < taps; ++t) table[c * taps + t] = table[(c - 1) * taps + t] + channel_stride;
  return table;
}

// Runs f(columns) with col_idx's entries as const int32_t* (the canonical format) or const int16_t* (the compact
// form an inference SparseConv2d holds on a CPU where every column is below 32768: 6 bytes per nonzero with its
// float32 value instead of 8). Only the forward reads the compact form; the backward entry points widen it.
template <typename F>
auto with_columns(const at::Tensor& col_idx, F f) {
  if (col_idx.scalar_type() == at::kShort) return f(col_idx.const_data_ptr<int16_t>());
  return f(col_idx.const_data_ptr<int32_t>());
}

// Entries per task of the tap-list builders: a 512-channel layer at density 0.1 has 236k taps.
constexpr int64_t kTapGrain = 32768;

// Runs kernel(taps) with the forward's or the weight gradient's taps (values null where only the offsets are read).
// Where each tap serves few outputs (batch 1 on small maps: a 512-channel 2x2 layer applies its 236k taps to 4 outputs
// each), the kernel reads the CSR arrays directly, each column's offset looked up in a table of C_in * KH * KW
// entries, and nothing per nonzero is built. Elsewhere a list of (offset, value) taps is built first, in parallel: the
// kernels pass over a row's taps once per block of outputs, and one lookup per pass costs more (3-7% at batch 64,
// measured) than the list, whose build is then a small part of the call.
constexpr int64_t kListedTapsMinOutputs = 256;

template <typename Packing, typename Kernel>
void with_csr_taps(const at::Tensor* values, const at::Tensor& col_idx, const ConvGeometry& g, const Packing& p,
                   Kernel kernel) {
  const std::vector<int32_t> table = column_offsets(g, p, false, false);
  const float* value_ptr = values ? values->const_data_ptr<float>() : nullptr;
  if (g.batch * g.out_h * g.out_w < kListedTapsMinOutputs) {
    with_columns(col_idx, [&](auto columns) { kernel(wide::CsrTaps{columns, value_ptr, table.data()}); });
    return;
  }
  // Only the list's build reads the columns, so the kernel over the list has one instantiation and one call site
  // whatever their type.
  wide::TapList listed(col_idx.numel());
  with_columns(col_idx, [&](auto columns) {
    const wide::CsrTaps csr{columns, value_ptr, table.data()};
    at::parallel_for(0, col_idx.numel(), kTapGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) listed[e] = {csr.offset(e), value_ptr ? csr.value(e) : 0.0f};
    });
  });
  kernel(wide::ListedTaps{listed.data()});
}

// The data gradient of a stride-1 convolution is a convolution of grad_output with the transposed, flipped kernel
// and padding (K - 1) * dilation - padding; its rows are the transposed pattern's input channels and its channels
// the output channels (t_rows). Packed offsets are linear in the channel, so a tap is the flipped (kh, kw) term from
// the table plus the output channel's stride.
template <typename Packing>
wide::TapList transposed_flipped_taps(const at::Tensor& vals, const at::Tensor& cols, const at::Tensor& tr,
                                      const at::Tensor& tperm, const ConvGeometry& g, const Packing& p) {
  const float* v_ptr = vals.const_data_ptr<float>();
  const int32_t* col_ptr = cols.const_data_ptr<int32_t>();
  const int32_t* tr_ptr = tr.const_data_ptr<int32_t>();
  const int32_t* perm_ptr = tperm.const_data_ptr<int32_t>();
  const std::vector<int32_t> spatial = column_offsets(g, p, true, true);
  const int64_t channel_stride = p.tap_offset(1, 0, 0);
  wide::TapList taps(vals.numel());
  at::parallel_for(0, vals.numel(), kTapGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int32_t e = perm_ptr[j];
      taps[j] = {static_cast<int32_t>(tr_ptr[j] * channel_stride + spatial[col_ptr[e]]), v_ptr[e]};
    }
  });
  return taps;
}

inline int64_t data_grad_pad_h(const ConvGeometry& g) { return (g.kernel_h - 1) * g.dil_h - g.pad_h; }
inline int64_t data_grad_pad_w(const ConvGeometry& g) { return (g.kernel_w - 1) * g.dil_w - g.pad_w; }

// The layout of a forward's input or output: the operator (sparse_conv2d_cpu.cpp) passes tensors contiguous in NCHW
// or, where it was given channels_last, in NHWC (a tensor contiguous in both, a 1x1 map, has the same strides either
// way).
inline wide::Layout activation_layout(const at::Tensor& t) {
  return wide::Layout::of(!t.is_contiguous(), t.size(1), t.size(2) * t.size(3));
}

inline wide::Layout nchw_layout(int64_t channels, int64_t h, int64_t w) { return wide::Layout::nchw(channels, h * w); }

inline wide::PackedGeometry input_packing(const ConvGeometry& g) {
  wide::PackedGeometry p = wide::packed_geometry(g.in_channels, g.in_h, g.in_w, g.pad_h, g.pad_w, g.stride_h,
                                                 g.stride_w, g.out_h, g.out_w);
  p.used_h = wide::phases_read(g.kernel_h, g.dil_h, g.stride_h);
  p.used_w = wide::phases_read(g.kernel_w, g.dil_w, g.stride_w);
  return p;
}

// Small feature maps with enough images go batch-innermost (see batch_inner in wide_conv_f32.h); the threshold is
// where the wide layout's discarded columns start to dominate (bench/bench_sparse_conv2d.py).
constexpr int64_t kBatchInnerMaxPositions = 64;
constexpr int64_t kBatchInnerMinBatch = 16;

inline batch_inner::Geometry batch_inner_packing(const ConvGeometry& g) {
  return {g.in_channels, g.in_h + 2 * g.pad_h, g.in_w + 2 * g.pad_w, batch_inner::images_per_block(g.batch)};
}

inline bool use_batch_inner(const ConvGeometry& g) {
  return g.out_h * g.out_w <= kBatchInnerMaxPositions && g.batch >= kBatchInnerMinBatch &&
         batch_inner::fits_int32(batch_inner_packing(g));
}

inline void conv_forward_batch_inner_f32(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& rp,
                                         const at::Tensor& cols, const float* bias, bool relu, const ConvGeometry& g,
                                         at::Tensor& out) {
  const batch_inner::Geometry p = batch_inner_packing(g);
  const at::Tensor packed = batch_inner::pack(x.const_data_ptr<float>(), activation_layout(x), g.batch, g.in_h,
                                              g.in_w, g.pad_h, g.pad_w, p);
  with_csr_taps(&vals, cols, g, p, [&](auto taps) {
    batch_inner::sparse_rows(packed.const_data_ptr<float>(), p, taps, rp.const_data_ptr<int32_t>(), g.out_channels,
                             g.batch, g.out_h, g.out_w, g.stride_h, g.stride_w, bias, relu, activation_layout(out),
                             out.mutable_data_ptr<float>());
  });
}

// Data gradient, batch-innermost: the flipped transposed kernel over grad_output padded by (K - 1) * dilation - pad.
inline void conv_backward_input_batch_inner_f32(const at::Tensor& go, const at::Tensor& vals, const at::Tensor& cols,
                                                const at::Tensor& tp, const at::Tensor& tr, const at::Tensor& tperm,
                                                const ConvGeometry& g, at::Tensor& grad_input) {
  const int64_t pad_h = data_grad_pad_h(g), pad_w = data_grad_pad_w(g);
  const batch_inner::Geometry p{g.out_channels, g.out_h + 2 * pad_h, g.out_w + 2 * pad_w,
                                batch_inner::images_per_block(g.batch)};
  const at::Tensor packed = batch_inner::pack(go.const_data_ptr<float>(), g.batch, g.out_h, g.out_w, pad_h, pad_w, p);
  const wide::TapList listed = transposed_flipped_taps(vals, cols, tr, tperm, g, p);
  const wide::ListedTaps taps{listed.data()};
  batch_inner::sparse_rows(packed.const_data_ptr<float>(), p, taps, tp.const_data_ptr<int32_t>(), g.in_channels,
                           g.batch, g.in_h, g.in_w, 1, 1, nullptr, false, nchw_layout(g.in_channels, g.in_h, g.in_w),
                           grad_input.mutable_data_ptr<float>());
}

// The weight gradient's operands in an images-innermost packing `p` (batch-innermost or tiled): the input padded as
// the forward packs it, grad_output unpadded with the same images per block.
inline std::pair<at::Tensor, at::Tensor> pack_weight_gradient_operands(const at::Tensor& go, const at::Tensor& x,
                                                                       const ConvGeometry& g,
                                                                       const batch_inner::Geometry& p) {
  return {batch_inner::pack(x.const_data_ptr<float>(), g.batch, g.in_h, g.in_w, g.pad_h, g.pad_w, p),
          batch_inner::pack(go.const_data_ptr<float>(), g.batch, g.out_h, g.out_w, 0, 0,
                            {g.out_channels, g.out_h, g.out_w, p.images})};
}

inline void conv_backward_values_batch_inner_f32(const at::Tensor& go, const at::Tensor& x, const at::Tensor& rp,
                                                 const at::Tensor& cols, const ConvGeometry& g,
                                                 at::Tensor& grad_values) {
  const batch_inner::Geometry p = batch_inner_packing(g);
  const auto [packed_x, packed_go] = pack_weight_gradient_operands(go, x, g, p);
  with_csr_taps(nullptr, cols, g, p, [&](auto taps) {  // offsets only
    batch_inner::grad_values(packed_x.const_data_ptr<float>(), p, packed_go.const_data_ptr<float>(), taps,
                             rp.const_data_ptr<int32_t>(), g.out_channels, g.batch, g.out_h, g.out_w, g.stride_h,
                             g.stride_w, grad_values.mutable_data_ptr<float>());
  });
}

// The tiled path (tiled_conv_f32.h) where its batch blocks waste at most a sixth of their images on padding: on
// small maps (8x8 to 2x2: 1.1-1.6x faster than the wide layout, batch 64), and, for the forward and the data
// gradient, on maps up to 64x64 whose rows hold at least kTiledMinTapsPerRow taps. There, with its row tiles and
// chunks of input channels, it measured 1.2-1.75x faster than the wide layout (128@16x16 and 128@28x28 at density
// 0.1, 64@32x32 at 0.32 and 0.66, 256@14x14 at 0.1); with shorter rows it was level or slower (64@32x32 and 64@56x56
// at 0.1, 58 taps per row: 0.9-1.0x), its per-row tile writes no longer small beside the row's work
// (docs/benchmarks.md, "Kernel roofline").
constexpr int64_t kTiledMaxPositions = 64 * 64, kTiledMinTapsPerRow = 96;

inline bool tiled_batch_fits(const batch_inner::Geometry& p, const ConvGeometry& g) {
  return 5 * p.blocks(g.batch) * p.images <= 6 * g.batch && batch_inner::fits_int32(p);
}

inline bool tiled_map_suits(int64_t positions, int64_t nnz, int64_t rows) {
  return positions <= kBatchInnerMaxPositions ||
         (positions <= kTiledMaxPositions && nnz >= kTiledMinTapsPerRow * rows);
}

inline batch_inner::Geometry tiled_packing(const ConvGeometry& g) {
  return tiled::packing(g.in_channels, g.in_h + 2 * g.pad_h, g.in_w + 2 * g.pad_w, g.out_h * g.out_w);
}

inline bool use_tiled_forward(const ConvGeometry& g, int64_t nnz) {
  return tiled_map_suits(g.out_h * g.out_w, nnz, g.out_channels) && tiled_batch_fits(tiled_packing(g), g);
}

// The weight gradient keeps the small maps only (its larger maps have not been measured on this path).
inline bool use_tiled_weight_gradient(const ConvGeometry& g) {
  return g.out_h * g.out_w <= kBatchInnerMaxPositions && tiled_batch_fits(tiled_packing(g), g);
}

// The tiled kernels' chunks of input channels (tiled::forward_tiles) for taps under the pointers `ptr` (one row per
// output channel of the call: row_ptr for the forward, t_ptr for the data gradient) over an out_h x out_w map, the
// input (packing `p`) read with the kernel's height.
template <typename KeyOf>
ChannelChunks tiled_chunks(const batch_inner::Geometry& p, const ConvGeometry& g, const at::Tensor& ptr, int64_t out_h,
                           int64_t out_w, int64_t stride_h, int64_t stride_w, int64_t nnz, KeyOf key_of,
                           int64_t keys_per_channel) {
  const int64_t rows = ptr.numel() - 1;
  const int64_t per_chunk = tiled::channels_per_chunk(p, g.batch, out_h, out_w, stride_h, stride_w,
                                                      (g.kernel_h - 1) * g.dil_h + 1, (g.kernel_w - 1) * g.dil_w + 1,
                                                      rows, nnz);
  return channel_chunks(ptr.const_data_ptr<int32_t>(), rows, p.channels, per_chunk, key_of, keys_per_channel);
}

// With `pool`, out is the 2x2, stride-2 max-pool of the forward (tiled::pools_row_pairs must hold).
inline void conv_forward_tiled_f32(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& rp,
                                   const at::Tensor& cols, const float* bias, bool relu, const ConvGeometry& g,
                                   at::Tensor& out, bool pool = false) {
  const batch_inner::Geometry p = tiled_packing(g);
  const at::Tensor packed = batch_inner::pack(x.const_data_ptr<float>(), activation_layout(x), g.batch, g.in_h,
                                              g.in_w, g.pad_h, g.pad_w, p);
  const ChannelChunks chunks = with_columns(cols, [&](auto columns) {
    return tiled_chunks(p, g, rp, g.out_h, g.out_w, g.stride_h, g.stride_w, cols.numel(),
                        [&](int64_t e) { return int64_t{columns[e]}; }, g.taps());
  });
  with_csr_taps(&vals, cols, g, p, [&](auto taps) {
    tiled::forward(packed.const_data_ptr<float>(), p, taps, chunks, g.out_channels, g.batch, g.out_h, g.out_w,
                   g.stride_h, g.stride_w, bias, relu, activation_layout(out), out.mutable_data_ptr<float>(), pool);
  });
}

inline void conv_backward_values_tiled_f32(const at::Tensor& go, const at::Tensor& x, const at::Tensor& rp,
                                           const at::Tensor& cols, const ConvGeometry& g, at::Tensor& grad_values) {
  const batch_inner::Geometry p = tiled_packing(g);
  const auto [packed_x, packed_go] = pack_weight_gradient_operands(go, x, g, p);
  with_csr_taps(nullptr, cols, g, p, [&](auto taps) {  // offsets only
    tiled::grad_values(packed_x.const_data_ptr<float>(), p, packed_go.const_data_ptr<float>(), taps,
                       rp.const_data_ptr<int32_t>(), g.out_channels, g.batch, g.out_h, g.out_w, g.stride_h, g.stride_w,
                       grad_values.mutable_data_ptr<float>());
  });
}

// The patch path (patch_conv_f32.h) for a few images on maps of at most kPatchMaxPositions outputs (4x4 and
// smaller), where the wide layout discards half or more of each vector, while all of a call's outputs fit one pass
// of accumulators (up to 16 images at 4x4 on AVX-512, 4 on AVX2). Batches of 16 and more take the tiled or
// batch-innermost paths first. In the AVX-512 copy, one image of up to kPatchMaxDensePositions outputs (8x8) takes
// it too where its columns are each read by at least kPatchMinTapsPerColumn taps and its outputs fill whole vectors:
// there the wide layout discards a fifth of each vector and looks each tap's offset up in a table, and the pack's
// cost per column is small beside the taps'. 256@8x8 at batch 1, NHWC, Xeon (AVX-512): 1.16-1.19x faster at
// densities 0.165-0.245 (42-63 taps per column), 1.3x at 0.325, level at 0.1 (26 taps), slower at 0.05 and at batch
// 4. A 7x7 map (rows of 49 outputs, every tap's load unaligned) ran 1.3-1.6x slower at 0.1, and the AVX2 copy ran
// 256@8x8 at 0.165 1.4x slower this way (8 ymm vectors a row against the wide layout's 10): both keep the wide layout.
constexpr int64_t kPatchMaxPositions = 16, kPatchMinTapsPerColumn = 32;
constexpr int64_t kPatchMaxDensePositions = PTD_ISA_VECTOR_BYTES >= 64 ? 64 : 0;

inline bool use_patches(const ConvGeometry& g, int64_t nnz) {
  const patches::Rows rows = patches::Rows::of(g.batch, g.out_h * g.out_w);
  const bool small_map = g.out_h * g.out_w <= kPatchMaxPositions;
  const bool dense_columns = rows.outputs <= kPatchMaxDensePositions && rows.outputs % wide::kLanes == 0 &&
                             nnz >= kPatchMinTapsPerColumn * g.in_channels * g.taps();
  return (small_map || dense_columns) && rows.length <= wide::kRowAccumulators * wide::kLanes &&
         g.in_channels * g.taps() * rows.pitch + wide::kLanes < (int64_t{1} << 31);
}

inline void conv_forward_patches_f32(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& rp,
                                     const at::Tensor& cols, const float* bias, bool relu, const ConvGeometry& g,
                                     at::Tensor& out) {
  const patches::Rows rows = patches::Rows::of(g.batch, g.out_h * g.out_w);
  const at::Tensor packed = patches::pack(x.const_data_ptr<float>(), activation_layout(x), g, rows);
  with_columns(cols, [&](auto columns) {
    patches::forward(packed.const_data_ptr<float>(), rows, columns, vals.const_data_ptr<float>(),
                     rp.const_data_ptr<int32_t>(), g.out_channels, g.batch, g.out_h * g.out_w, bias, relu,
                     activation_layout(out), out.mutable_data_ptr<float>());
  });
}

// Input channels per chunk of the wide forward and data gradient (wide::sparse_rows; the data gradient's input is
// grad_output, its channels the output channels): as many packed input planes of an image as fit kWideChunkBytes,
// yet at least kMinWideChunkTaps taps per row and chunk on average (each row's accumulators are stored and reloaded
// once per chunk); all channels (no chunks) where the image's planes fit at once. Xeon, AVX-512, batch 1, 512@7x7
// and 256@14x14: 32 KiB ran fastest (16 KiB 1.24x slower, 48 and 64 KiB 3-22%); 8, 16 and 32 taps within 3%.
constexpr int64_t kWideChunkBytes = 32 << 10, kMinWideChunkTaps = 16;

inline int64_t wide_channels_per_chunk(const wide::PackedGeometry& p, int64_t rows, int64_t nnz) {
  const int64_t channel_bytes = p.phase_h * p.phase_w * p.plane() * int64_t{sizeof(float)};
  if (p.channels * channel_bytes <= kWideChunkBytes) return p.channels;
  const double taps_per_row_channel = static_cast<double>(nnz) / std::max<int64_t>(1, rows * p.channels);
  const int64_t for_taps = static_cast<int64_t>(std::ceil(kMinWideChunkTaps / std::max(taps_per_row_channel, 1e-3)));
  return std::clamp<int64_t>(std::max(kWideChunkBytes / channel_bytes, for_taps), 1, p.channels);
}

// The chunks of wide_channels_per_chunk for taps under `ptr` (row_ptr for the forward, t_ptr for the data gradient)
// over input packed as `p`; one chunk (none built) where the planes fit at once. key_of as channel_chunks takes it.
template <typename KeyOf>
ChannelChunks wide_chunks(const wide::PackedGeometry& p, const at::Tensor& ptr, int64_t nnz, KeyOf key_of,
                          int64_t keys_per_channel) {
  const int64_t rows = ptr.numel() - 1, per_chunk = wide_channels_per_chunk(p, rows, nnz);
  if (per_chunk >= p.channels) return ChannelChunks{1, {}};
  return channel_chunks(ptr.const_data_ptr<int32_t>(), rows, p.channels, per_chunk, key_of, keys_per_channel);
}

// The wide layout's forward (wide_conv_f32.h), out laid out as the operator gave it; with `pool`, out is the pooled
// map (conv_forward_max_pool_f32).
inline void conv_forward_wide_f32(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& rp,
                                  const at::Tensor& cols, const float* bias, bool relu, const ConvGeometry& g,
                                  const wide::PackedGeometry& p, const Pool* pool, at::Tensor& out) {
  const at::Tensor packed = wide::pack_images(x.const_data_ptr<float>(), activation_layout(x), g.batch, g.in_h,
                                             g.in_w, g.pad_h, g.pad_w, p);
  const ChannelChunks chunks = with_columns(cols, [&](auto columns) {
    return wide_chunks(p, rp, cols.numel(), [&](int64_t e) { return int64_t{columns[e]}; }, g.taps());
  });
  with_csr_taps(&vals, cols, g, p, [&](auto taps) {
    wide::sparse_rows(packed.const_data_ptr<float>(), p, taps, rp.const_data_ptr<int32_t>(), g.out_channels, g.batch,
                      bias, relu, activation_layout(out), out.mutable_data_ptr<float>(), pool, &chunks);
  });
}

inline bool conv_forward_f32(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& rp,
                             const at::Tensor& cols, const float* bias, bool relu, const ConvGeometry& g,
                             at::Tensor& out) {
  const wide::PackedGeometry p = input_packing(g);
  if (!wide::fits_int32(p)) return false;
  if (use_tiled_forward(g, cols.numel())) {
    conv_forward_tiled_f32(x, vals, rp, cols, bias, relu, g, out);
    return true;
  }
  if (use_batch_inner(g)) {
    conv_forward_batch_inner_f32(x, vals, rp, cols, bias, relu, g, out);
    return true;
  }
  if (use_patches(g, cols.numel())) {
    conv_forward_patches_f32(x, vals, rp, cols, bias, relu, g, out);
    return true;
  }
  conv_forward_wide_f32(x, vals, rp, cols, bias, relu, g, p, nullptr, out);
  return true;
}

// Whether conv_forward_max_pool_f32 fuses `pool` into this forward's epilogue, so that the full-size output is never
// written: where the forward takes the wide layout, each task pools the planes it has just computed (any window: a
// ResNet stem's 64 x 112 x 112 floats an image, pooled 3x3 / 2 to a quarter of that); where it takes the tiled
// layout with tiles of whole row pairs (tiled::pools_row_pairs: on AVX-512 8x8, 4x4 and 2x2 maps, in the AVX2 and
// baseline copies, whose register blocks are smaller, 4x4), a 2x2, stride-2 pool (a VGG
// block's) reduces each tile before it is written. Not elsewhere: the other tilings, the batch-innermost and the
// patch layouts write tiles of positions that no pool window fits.
inline bool fuses_max_pool_f32(const ConvGeometry& g, int64_t nnz, const Pool& pool) {
  if (!wide::fits_int32(input_packing(g))) return false;
  if (use_tiled_forward(g, nnz))
    return pool.h.is_2x2() && pool.w.is_2x2() && tiled::pools_row_pairs(g.out_h, g.out_w, g.stride_w);
  return !use_batch_inner(g) && !use_patches(g, nnz);
}

// The forward with `pool` fused (where fuses_max_pool_f32 holds; false, nothing written, elsewhere): out is the
// pooled map.
inline bool conv_forward_max_pool_f32(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& rp,
                                      const at::Tensor& cols, const float* bias, bool relu, const ConvGeometry& g,
                                      const Pool& pool, at::Tensor& out) {
  if (!fuses_max_pool_f32(g, cols.numel(), pool)) return false;
  if (use_tiled_forward(g, cols.numel())) {
    conv_forward_tiled_f32(x, vals, rp, cols, bias, relu, g, out, true);
    return true;
  }
  const wide::PackedGeometry p = input_packing(g);
  conv_forward_wide_f32(x, vals, rp, cols, bias, relu, g, p, &pool, out);
  return true;
}

inline wide::PackedGeometry grad_output_packing(const ConvGeometry& g) {
  return wide::packed_geometry(g.out_channels, g.out_h, g.out_w, data_grad_pad_h(g), data_grad_pad_w(g), 1, 1,
                               g.in_h, g.in_w);
}

// The data gradient on the tiled path: the tiled forward over grad_output padded by (K - 1) * dilation - pad, with
// the transposed flipped taps, under the forward's conditions for an in_h x in_w output.
inline batch_inner::Geometry tiled_data_gradient_packing(const ConvGeometry& g) {
  return tiled::packing(g.out_channels, g.out_h + 2 * data_grad_pad_h(g), g.out_w + 2 * data_grad_pad_w(g),
                        g.in_h * g.in_w);
}

inline bool use_tiled_data_gradient(const ConvGeometry& g, int64_t nnz) {
  return tiled_map_suits(g.in_h * g.in_w, nnz, g.in_channels) && tiled_batch_fits(tiled_data_gradient_packing(g), g);
}

inline void conv_backward_input_tiled_f32(const at::Tensor& go, const at::Tensor& vals, const at::Tensor& cols,
                                          const at::Tensor& tp, const at::Tensor& tr, const at::Tensor& tperm,
                                          const ConvGeometry& g, at::Tensor& grad_input) {
  const batch_inner::Geometry p = tiled_data_gradient_packing(g);
  const at::Tensor packed = batch_inner::pack(go.const_data_ptr<float>(), g.batch, g.out_h, g.out_w,
                                              data_grad_pad_h(g), data_grad_pad_w(g), p);
  const wide::TapList listed = transposed_flipped_taps(vals, cols, tr, tperm, g, p);
  const wide::ListedTaps taps{listed.data()};
  const int32_t* tr_ptr = tr.const_data_ptr<int32_t>();  // the output channel (here the input's) of every tap
  const ChannelChunks chunks = tiled_chunks(p, g, tp, g.in_h, g.in_w, 1, 1, cols.numel(),
                                            [&](int64_t j) { return int64_t{tr_ptr[j]}; }, 1);
  tiled::forward(packed.const_data_ptr<float>(), p, taps, chunks, g.in_channels, g.batch, g.in_h, g.in_w, 1, 1,
                 nullptr, false, nchw_layout(g.in_channels, g.in_h, g.in_w), grad_input.mutable_data_ptr<float>());
}

inline bool backward_input_is_wide(const ConvGeometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 && data_grad_pad_h(g) >= 0 && data_grad_pad_w(g) >= 0 &&
         wide::fits_int32(grad_output_packing(g));
}

inline bool conv_backward_input_f32(const at::Tensor& go, const at::Tensor& vals, const at::Tensor& cols,
                                    const at::Tensor& tp, const at::Tensor& tr, const at::Tensor& tperm,
                                    const ConvGeometry& g, at::Tensor& grad_input) {
  if (!backward_input_is_wide(g)) return false;
  if (use_tiled_data_gradient(g, cols.numel())) {
    conv_backward_input_tiled_f32(go, vals, cols, tp, tr, tperm, g, grad_input);
    return true;
  }
  if (g.in_h * g.in_w <= kBatchInnerMaxPositions && use_batch_inner(g)) {
    conv_backward_input_batch_inner_f32(go, vals, cols, tp, tr, tperm, g, grad_input);
    return true;
  }
  const wide::PackedGeometry p = grad_output_packing(g);
  const at::Tensor packed = wide::pack_images(go.const_data_ptr<float>(), nchw_layout(g.out_channels, g.out_h, g.out_w),
                                              g.batch, g.out_h, g.out_w, data_grad_pad_h(g), data_grad_pad_w(g), p);
  const wide::TapList listed = transposed_flipped_taps(vals, cols, tr, tperm, g, p);
  const wide::ListedTaps taps{listed.data()};
  const int32_t* tr_ptr = tr.const_data_ptr<int32_t>();  // a tap's channel here: its output channel
  const ChannelChunks chunks = wide_chunks(p, tp, cols.numel(), [&](int64_t j) { return int64_t{tr_ptr[j]}; }, 1);
  wide::sparse_rows(packed.const_data_ptr<float>(), p, taps, tp.const_data_ptr<int32_t>(), g.in_channels, g.batch,
                    nullptr, false, nchw_layout(g.in_channels, g.in_h, g.in_w), grad_input.mutable_data_ptr<float>(),
                    nullptr, &chunks);
  return true;
}

// grad_values[e] = sum over images of <grad_output plane of e's row, the input window of e's tap>, both laid out wide.
inline bool conv_backward_values_f32(const at::Tensor& go, const at::Tensor& x, const at::Tensor& rp,
                                     const at::Tensor& cols, const ConvGeometry& g, at::Tensor& grad_values) {
  if (use_tiled_weight_gradient(g)) {
    conv_backward_values_tiled_f32(go, x, rp, cols, g, grad_values);
    return true;
  }
  if (use_batch_inner(g)) {
    conv_backward_values_batch_inner_f32(go, x, rp, cols, g, grad_values);
    return true;
  }
  const wide::PackedGeometry p = input_packing(g);
  if (!wide::fits_int32(p)) return false;
  const at::Tensor packed = wide::pack_images(x.const_data_ptr<float>(), nchw_layout(g.in_channels, g.in_h, g.in_w),
                                             g.batch, g.in_h, g.in_w, g.pad_h, g.pad_w, p);
  const int64_t length = p.wide_length();
  // grad_output in the wide layout, zero in the discarded columns so they add nothing.
  at::Tensor go_wide = cpu_isa::packing_buffer(g.batch * g.out_channels * length);
  const float* go_ptr = go.const_data_ptr<float>();
  float* wide_ptr = go_wide.mutable_data_ptr<float>();
  at::parallel_for(0, g.batch * g.out_channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      float* dst = wide_ptr + plane * length;
      std::fill(dst, dst + length, 0.0f);
      for (int64_t oh = 0; oh < g.out_h; ++oh)
        std::memcpy(dst + oh * p.cols, go_ptr + (plane * g.out_h + oh) * g.out_w, g.out_w * sizeof(float));
    }
  });
  with_csr_taps(nullptr, cols, g, p, [&](auto taps) {  // offsets only
    tiled::wide_grad_values(packed.const_data_ptr<float>(), p, wide_ptr, taps, rp.const_data_ptr<int32_t>(),
                            g.out_channels, g.batch, grad_values.mutable_data_ptr<float>());
  });
  return true;
}
