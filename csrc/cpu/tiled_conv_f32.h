// Register-tiled forward of the sparse convolution for batches of images on small maps ("tiled" path).
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
// takes) stays in the core's L2 cache while every row reads it. V is 1 where a map has enough positions, and grows (fewer positions, more images) for 4x4 and 2x2
// maps, so that small maps still fill the register block.
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
template <int kV, int kP>
inline void row_tile(const float* const* src, const wide::Tap* taps, int64_t count, float init, float* tile) {
  vec a[kP * kV];
  for (int i = 0; i < kP * kV; ++i) a[i] = broadcast(init);
  for (int64_t t = 0; t < count; ++t) {
    const vec v = broadcast(taps[t].value);
    const int32_t offset = taps[t].offset;
#pragma GCC unroll 16
    for (int i = 0; i < kP * kV; ++i) a[i] += v * load(src[i / kV] + offset + (i % kV) * kLanes);
  }
  for (int i = 0; i < kP * kV; ++i) store(tile + i * kLanes, a[i]);
}

// The tile of one row [positions][images] into out [batch][rows][positions] (NCHW), clamped by relu.
inline void write_tile(const float* tile, int64_t tile_positions, int64_t images, int64_t first_image,
                       int64_t first_position, int64_t batch, int64_t rows, int64_t positions, int64_t row, bool relu,
                       float* out) {
  for (int64_t i = 0; i < images && first_image + i < batch; ++i) {
    float* dst = out + ((first_image + i) * rows + row) * positions + first_position;
    for (int64_t p = 0; p < tile_positions; ++p) {
      const float value = tile[p * images + i];
      dst[p] = relu ? std::max(value, 0.0f) : value;
    }
  }
}

template <int kV>
inline void forward_v(const float* packed, const batch_inner::Geometry& p, const std::vector<wide::Tap>& taps,
                      const int32_t* row_ptr, int64_t rows, int64_t batch, int64_t out_h, int64_t out_w,
                      int64_t stride_h, int64_t stride_w, const float* bias, bool relu, float* out) {
  constexpr int kP = kAccumulators / kV;
  constexpr int64_t kImages = kV * kLanes;
  const int64_t positions = out_h * out_w, blocks = p.blocks(batch);
  const int64_t tiles = (positions + kP - 1) / kP;
  const std::vector<int64_t> windows = batch_inner::windows(p, out_h, out_w, stride_h, stride_w);
  // Rows are split too where (batch block, tile) pairs alone would leave threads idle (a 2x2 map at batch 64 is a
  // single pair): about four tasks per thread.
  const int64_t pairs = blocks * tiles;
  const int64_t row_parts = std::clamp<int64_t>((4 * at::get_num_threads() + pairs - 1) / pairs, 1, rows);
  at::parallel_for(0, pairs * row_parts, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float tile[kP * kImages];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / row_parts, part = task % row_parts;
      const int64_t first_row = part * rows / row_parts, last_row = (part + 1) * rows / row_parts;
      const int64_t nb = pair / tiles, first = (pair % tiles) * kP;
      const int64_t count = std::min<int64_t>(kP, positions - first);
      const float* block = packed + nb * p.block();
      const float* src[kP];
      // A partial last tile repeats its last position: the extra sums are computed and not written.
      for (int q = 0; q < kP; ++q) src[q] = block + windows[first + std::min<int64_t>(q, count - 1)];
      for (int64_t r = first_row; r < last_row; ++r) {
        row_tile<kV, kP>(src, taps.data() + row_ptr[r], row_ptr[r + 1] - row_ptr[r], bias ? bias[r] : 0.0f, tile);
        write_tile(tile, count, kImages, nb * kImages, first, batch, rows, positions, r, relu, out);
      }
    }
  });
}

// out[n, r, oh, ow] = relu?(bias[r] + sum over the taps of row r of value * input window), every image n.
// packed: the input packed by batch_inner::pack with `p` from packing(); taps in CSR order with offsets into one
// batch block (row r's are taps[row_ptr[r] .. row_ptr[r + 1])).
inline void forward(const float* packed, const batch_inner::Geometry& p, const std::vector<wide::Tap>& taps,
                    const int32_t* row_ptr, int64_t rows, int64_t batch, int64_t out_h, int64_t out_w,
                    int64_t stride_h, int64_t stride_w, const float* bias, bool relu, float* out) {
  switch (p.images / kLanes) {
    case 1: forward_v<1>(packed, p, taps, row_ptr, rows, batch, out_h, out_w, stride_h, stride_w, bias, relu, out); break;
    case 2: forward_v<2>(packed, p, taps, row_ptr, rows, batch, out_h, out_w, stride_h, stride_w, bias, relu, out); break;
    default: forward_v<4>(packed, p, taps, row_ptr, rows, batch, out_h, out_w, stride_h, stride_w, bias, relu, out);
  }
}

}  // namespace tiled
