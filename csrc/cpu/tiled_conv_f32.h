// Register-tiled kernels of the sparse convolution for batches of images on small maps ("tiled" path): the forward
// (which also computes the data gradient, a convolution of grad_output with the transposed flipped pattern) and the
// weight gradient.
//
// Images run innermost, as in batch_inner (wide_conv_f32.h): the input is packed [batch blocks][C][Hp][Wp][images]
// with `images` = V full-width vectors, so every tap's input vector starts at a multiple of the vector width
// (aligned loads: none straddles two cache lines). A register block is P output positions x V vectors of images,
// P * V = kAccumulators (16 zmm on AVX-512, 12 of the 16 ymm/xmm registers elsewhere; one more holds the broadcast
// weight), so each broadcast weight feeds kAccumulators FMAs whose input operands come straight from memory, and each
// output is summed in a register over all of its row's taps and written once.
//
// A task is one batch block and one tile of P positions, over every output channel (or a range of them where
// there are few tiles): its input is the tile's windows over all input channels, which (at the map sizes this path
// takes) stays in the core's L2 cache while every row reads it. V is 1 where a map has enough positions, and grows
// (fewer positions, more images) for 4x4 and 2x2 maps, so that small maps still fill the register block.
//
// Compiled once per instruction set, like wide_conv_f32.h: included by csrc/cpu/isa/kernels_body.h after it.
#ifndef PTD_ISA_VECTOR_BYTES
#error "tiled_conv_f32.h is compiled per instruction set: include csrc/cpu/isa/kernels_body.h instead"
#endif

namespace tiled {

using wide::broadcast;
using wide::kLanes;
using wide::load;
using wide::store;
using wide::vec;

constexpr int kAccumulators = PTD_ISA_VECTOR_BYTES >= 64 ? 16 : 12;

// Vectors of images per batch block for a map of `positions` outputs: the fewest that still fill the register
// block with positions (1 when positions >= kAccumulators; up to 4).
inline int vectors_for(int64_t positions) {
  for (int v : {1, 2, 4})
    if (positions * v >= kAccumulators) return v;
  return 4;
}

inline batch_inner::Geometry packing(int64_t channels, int64_t padded_h, int64_t padded_w, int64_t positions) {
  return {channels, padded_h, padded_w, vectors_for(positions) * kLanes};
}

// One row over one tile: kP positions x kV vectors of images, summed over the row's taps from `init`. src[p] is the
// packed input of position p's window (before the tap's offset); the result goes to tile [kP][kV * kLanes].
template <int kV, int kP, typename Taps>
inline void row_tile(const float* const* src, Taps taps, int64_t count, float init, float* tile) {
  vec a[kP * kV];
  for (int i = 0; i < kP * kV; ++i) a[i] = broadcast(init);
  for (int64_t t = 0; t < count; ++t) {
    const vec v = broadcast(taps.value(t));
    const int32_t offset = taps.offset(t);
#pragma GCC unroll 16
    for (int i = 0; i < kP * kV; ++i) a[i] += v * load(src[i / kV] + offset + (i % kV) * kLanes);
  }
  for (int i = 0; i < kP * kV; ++i) store(tile + i * kLanes, a[i]);
}

// The tiles of `block_rows` consecutive rows from `row` (each [positions][images], `tile_size` floats apart) into out
// (laid out as `out_layout`), clamped by relu. NCHW takes one row at a time; in NHWC a block of rows is a run of
// channels of each output, written together: row by row, the images' power-of-two strides would map every store of a
// tile to a few L1 sets, which then evict each other's lines before the next row fills them.
inline void write_tiles(const float* tiles, int64_t tile_size, int64_t block_rows, int64_t tile_positions,
                        int64_t images, int64_t first_image, int64_t first_position, int64_t batch,
                        const wide::Layout& out_layout, int64_t row, bool relu, float* out) {
  const int64_t step = out_layout.position;
  for (int64_t i = 0; i < images && first_image + i < batch; ++i) {
    float* dst = out + out_layout.plane(first_image + i, row) + first_position * step;
    for (int64_t p = 0; p < tile_positions; ++p)
      for (int64_t k = 0; k < block_rows; ++k) {
        const float value = tiles[k * tile_size + p * images + i];
        dst[p * step + k * out_layout.channel] = relu ? std::max(value, 0.0f) : value;
      }
  }
}

template <int kV, typename Taps>
inline void forward_v(const float* packed, const batch_inner::Geometry& p, Taps taps,
                      const int32_t* row_ptr, int64_t rows, int64_t batch, int64_t out_h, int64_t out_w,
                      int64_t stride_h, int64_t stride_w, const float* bias, bool relu,
                      const wide::Layout& out_layout, float* out) {
  constexpr int kP = kAccumulators / kV;
  constexpr int64_t kImages = kV * kLanes;
  const int64_t positions = out_h * out_w, blocks = p.blocks(batch);
  const int64_t tiles = (positions + kP - 1) / kP;
  const std::vector<int64_t> windows = batch_inner::windows(p, out_h, out_w, stride_h, stride_w);
  // Rows are split too where (batch block, tile) pairs alone would leave threads idle (a 2x2 map at batch 64 is a
  // single pair): about four tasks per thread.
  const int64_t pairs = blocks * tiles;
  const int64_t row_parts = std::clamp<int64_t>((4 * at::get_num_threads() + pairs - 1) / pairs, 1, rows);
  const int64_t rows_per_write = out_layout.position == 1 ? 1 : wide::kChannelBlock;
  at::parallel_for(0, pairs * row_parts, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float staged[wide::kChannelBlock * kP * kImages];  // the tiles of up to a block of rows
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / row_parts, part = task % row_parts;
      const int64_t first_row = part * rows / row_parts, last_row = (part + 1) * rows / row_parts;
      const int64_t nb = pair / tiles, first = (pair % tiles) * kP;
      const int64_t count = std::min<int64_t>(kP, positions - first);
      const float* block = packed + nb * p.block();
      const float* src[kP];
      // A partial last tile repeats its last position: the extra sums are computed and not written.
      for (int q = 0; q < kP; ++q) src[q] = block + windows[first + std::min<int64_t>(q, count - 1)];
      for (int64_t r = first_row; r < last_row; r += rows_per_write) {
        const int64_t block_rows = std::min(rows_per_write, last_row - r);
        for (int64_t k = 0; k < block_rows; ++k)
          row_tile<kV, kP>(src, taps.at(row_ptr[r + k]), row_ptr[r + k + 1] - row_ptr[r + k],
                           bias ? bias[r + k] : 0.0f, staged + k * kP * kImages);
        write_tiles(staged, kP * kImages, block_rows, count, kImages, nb * kImages, first, batch, out_layout, r, relu,
                    out);
      }
    }
  });
}

// out[n, r, oh, ow] = relu?(bias[r] + sum over the taps of row r of value * input window), every image n, out laid
// out as `out_layout`.
// packed: the input packed by batch_inner::pack with `p` from packing(); taps in CSR order with offsets into one
// batch block (row r's are taps[row_ptr[r] .. row_ptr[r + 1])).
template <typename Taps>
inline void forward(const float* packed, const batch_inner::Geometry& p, Taps taps,
                    const int32_t* row_ptr, int64_t rows, int64_t batch, int64_t out_h, int64_t out_w,
                    int64_t stride_h, int64_t stride_w, const float* bias, bool relu, const wide::Layout& out_layout,
                    float* out) {
  switch (p.images / kLanes) {
    case 1:
      forward_v<1>(packed, p, taps, row_ptr, rows, batch, out_h, out_w, stride_h, stride_w, bias, relu, out_layout,
                   out);
      break;
    case 2:
      forward_v<2>(packed, p, taps, row_ptr, rows, batch, out_h, out_w, stride_h, stride_w, bias, relu, out_layout,
                   out);
      break;
    default:
      forward_v<4>(packed, p, taps, row_ptr, rows, batch, out_h, out_w, stride_h, stride_w, bias, relu, out_layout,
                   out);
  }
}

// --- weight gradient -----------------------------------------------------------------------------------------
// grad[e] = sum over images and output positions of grad_output[n, r(e), pos] * input[n, window(pos) + tap(e)].
// Register tiling the other way round from the forward: a tile of grad_output (kP positions x kV vectors of images,
// kGradTile vectors) is loaded into registers once per row and reused by every entry of the row, so each multiply-add
// loads one input vector (a dot product per entry would load two). Entries go four at a time with kEntryChains
// accumulators each, enough independent FMA chains to hide their latency; the per-entry sums stay vectors in
// `partial` across tiles and batch blocks and are reduced to a float once per entry.
constexpr int kGradTile = PTD_ISA_VECTOR_BYTES >= 64 ? 16 : 8;
constexpr int kEntryChains = PTD_ISA_VECTOR_BYTES >= 64 ? 2 : 1;
constexpr int kEntriesPerGroup = 4;

// partial: kLanes floats per entry (plain floats with unaligned loads: a std::vector of vector types is not
// guaranteed their alignment).
template <int kV, int kP, typename Taps>
inline void entries_over_tile(const float* const* src, const vec* g, Taps taps, int64_t count,
                              float* partial) {
  int64_t e = 0;
  for (; e + kEntriesPerGroup <= count; e += kEntriesPerGroup) {
    vec a[kEntriesPerGroup][kEntryChains] = {};
#pragma GCC unroll 16
    for (int i = 0; i < kP * kV; ++i)
#pragma GCC unroll 4
      for (int k = 0; k < kEntriesPerGroup; ++k)
        a[k][i % kEntryChains] += g[i] * load(src[i / kV] + taps.offset(e + k) + (i % kV) * kLanes);
    for (int k = 0; k < kEntriesPerGroup; ++k) {
      vec sum = a[k][0];
      for (int c = 1; c < kEntryChains; ++c) sum += a[k][c];
      store(partial + (e + k) * kLanes, load(partial + (e + k) * kLanes) + sum);
    }
  }
  for (; e < count; ++e) {
    vec a{};
#pragma GCC unroll 16
    for (int i = 0; i < kP * kV; ++i) a += g[i] * load(src[i / kV] + taps.offset(e) + (i % kV) * kLanes);
    store(partial + e * kLanes, load(partial + e * kLanes) + a);
  }
}

// Output positions [first, positions) of one row: tiles of kP positions x kV vectors of images (grad_output loaded
// into registers, then every entry of the row run over it), the remainder in tiles of kP / 2, kP / 4, ... positions,
// so no tile computes more than it keeps. windows[q]: offset of position q's input window in `block`; grad_plane:
// the row's grad_output [positions][kV * kLanes images].
template <int kV, int kP, typename Taps>
inline void position_tiles(const float* block, const int64_t* windows, const float* grad_plane, int64_t first,
                           int64_t positions, Taps taps, int64_t count, float* partial) {
  constexpr int64_t kImages = kV * kLanes;
  for (; first + kP <= positions; first += kP) {
    const float* src[kP];
    vec g[kP * kV];
    for (int q = 0; q < kP; ++q) src[q] = block + windows[first + q];
    for (int i = 0; i < kP * kV; ++i) g[i] = load(grad_plane + (first + i / kV) * kImages + (i % kV) * kLanes);
    entries_over_tile<kV, kP>(src, g, taps, count, partial);
  }
  if constexpr (kP > 1) position_tiles<kV, kP / 2>(block, windows, grad_plane, first, positions, taps, count, partial);
}

// The weight gradient over `blocks` packed blocks of `block_size` floats (batch blocks of kV * kLanes images, or single
// wide images with kV = 1): windows[q] is output position q's input window in a block; packed_grad holds
// [blocks][rows][positions][kV * kLanes]. Each task owns a range of rows (so its entries); blocks run outermost inside
// it, so one block stays in cache while every entry of the range reads it.
template <int kV, typename Taps>
inline void grad_values_blocks(const float* packed, int64_t block_size, int64_t blocks, const float* packed_grad,
                               const std::vector<int64_t>& windows, Taps taps,
                               const int32_t* row_ptr, int64_t rows, float* grad) {
  constexpr int kP = kGradTile / kV;
  const int64_t positions = static_cast<int64_t>(windows.size()), plane = positions * kV * kLanes;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    const int32_t first_entry = row_ptr[begin];
    std::vector<float> partial((row_ptr[end] - first_entry) * kLanes, 0.0f);
    for (int64_t nb = 0; nb < blocks; ++nb) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t count = row_ptr[r + 1] - row_ptr[r];
        if (count == 0) continue;
        position_tiles<kV, kP>(packed + nb * block_size, windows.data(), packed_grad + (nb * rows + r) * plane, 0,
                               positions, taps.at(row_ptr[r]), count,
                               partial.data() + (row_ptr[r] - first_entry) * kLanes);
      }
    }
    for (int64_t e = first_entry; e < row_ptr[end]; ++e) {
      float total = 0;
      for (int i = 0; i < kLanes; ++i) total += partial[(e - first_entry) * kLanes + i];
      grad[e] = total;
    }
  });
}

// packed_input: the input packed by batch_inner::pack with `p` from packing(); packed_grad: grad_output packed the
// same way without padding, [blocks][rows][out_h][out_w][images]; taps: offsets into one batch block, CSR order.
template <typename Taps>
inline void grad_values(const float* packed_input, const batch_inner::Geometry& p, const float* packed_grad,
                        Taps taps, const int32_t* row_ptr, int64_t rows, int64_t batch,
                        int64_t out_h, int64_t out_w, int64_t stride_h, int64_t stride_w, float* grad) {
  const std::vector<int64_t> windows = batch_inner::windows(p, out_h, out_w, stride_h, stride_w);
  const auto run = [&](auto images_per_lane) {
    grad_values_blocks<decltype(images_per_lane)::value>(packed_input, p.block(), p.blocks(batch), packed_grad, windows,
                                                         taps, row_ptr, rows, grad);
  };
  switch (p.images / kLanes) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    default: run(std::integral_constant<int, 4>{});
  }
}

// The weight gradient in the wide layout (wide_conv_f32.h; larger maps), register-tiled the same way: a chunk of
// kGradTile vectors of one image's wide grad_output plane is held in registers and every entry of the row runs over
// it, where a dot product per entry would load the gradient again for each one. packed: the images packed by
// wide::pack_images with `p`; grad_wide: grad_output [batch][rows][wide length], zero in the discarded columns;
// taps: offsets into one packed image, CSR order. grad[e] receives the sum over images and output positions.
template <typename Taps>
inline void wide_grad_values(const float* packed, const wide::PackedGeometry& p, const float* grad_wide,
                             Taps taps, const int32_t* row_ptr, int64_t rows, int64_t batch,
                             float* grad) {
  const int64_t vectors = p.wide_length() / kLanes;
  // The wide plane as positions of one vector each (kV = 1), consecutive in the image and in grad_output.
  std::vector<int64_t> windows(vectors);
  for (int64_t v = 0; v < vectors; ++v) windows[v] = v * kLanes;
  grad_values_blocks<1>(packed, p.image(), batch, grad_wide, windows, taps, row_ptr, rows, grad);
}

}  // namespace tiled
