// Register-tiled kernels of the sparse convolution for batches of images ("tiled" path): the forward (which also
// computes the data gradient, a convolution of grad_output with the transposed flipped pattern) and the weight
// gradient. conv_f32.h decides which calls take it (small maps; larger ones with long rows for the forward).
//
// Images run innermost, as in batch_inner (wide_conv_f32.h): the input is packed [batch blocks][C][Hp][Wp][images]
// with `images` = V full-width vectors, so every tap's input vector starts at a multiple of the vector width
// (aligned loads: none straddles two cache lines). A register block is P output positions x V vectors of images,
// P * V <= kAccumulators (16 zmm on AVX-512, 12 of the 16 ymm/xmm registers elsewhere; one more holds the broadcast
// weight), so each broadcast weight feeds up to kAccumulators FMAs whose input operands come straight from memory.
//
// A forward task is one batch block and one tile of P positions, over every output channel (or a range of them where
// there are few tiles), taken through the input channels a chunk at a time (forward_tiles). V is 1 where a map has
// enough positions, and grows (fewer positions, more images) for 4x4 and 2x2 maps, so that small maps still fill the
// register block.
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

// Images per batch block at most, where that still fills half of the register block: a block's packed input then
// stays in L2 while a task's rows read it, and a batch has more blocks to share among the threads. A 512-channel 2x2
// map at batch 64 (AVX-512, Xeon) took four vectors of 16 images per block, 2 MiB of input for every task's rows: at
// density 0.045 each tap's loads came from beyond L2 (22 GMAC/s); in blocks of 32 (two vectors, 2x2 positions x 2
// vectors = 8 accumulators) its forward ran 1.2-1.45x faster at batch 32 to 128 (1.04x at density 0.1), forward +
// backward 1.2x. The AVX2 copy's four 8-float vectors are 32 images already.
constexpr int kMaxBlockImages = 32;

// Vectors of images per batch block for a map of `positions` outputs: the fewest that still fill the register
// block with positions (1 when positions >= kAccumulators; up to 4), or kMaxBlockImages images where those fill at
// least half of it.
inline int vectors_for(int64_t positions) {
  constexpr int kCap = kMaxBlockImages / kLanes;
  for (int v : {1, 2, 4})
    if (positions * v >= kAccumulators || (v == kCap && 2 * positions * v >= kAccumulators)) return v;
  return 4;
}

inline batch_inner::Geometry packing(int64_t channels, int64_t padded_h, int64_t padded_w, int64_t positions) {
  return {channels, padded_h, padded_w, vectors_for(positions) * kLanes};
}

// One row's taps over a tile of kVectors accumulators, from `init` or (accumulate) from what the tile holds, into
// tile [kVectors][kLanes]: accumulator i reads src[i / kPerPointer], (i % kPerPointer) vectors past each tap's offset.
template <int kVectors, int kPerPointer, typename Taps>
inline void sum_taps(const float* const* src, Taps taps, int64_t count, float init, bool accumulate, float* tile) {
  vec a[kVectors];
  for (int i = 0; i < kVectors; ++i) a[i] = accumulate ? load(tile + i * kLanes) : broadcast(init);
  for (int64_t t = 0; t < count; ++t) {
    const vec v = broadcast(taps.value(t));
    const int64_t offset = taps.offset(t);
#pragma GCC unroll 16
    for (int i = 0; i < kVectors; ++i) a[i] += v * load(src[i / kPerPointer] + offset + (i % kPerPointer) * kLanes);
  }
  for (int i = 0; i < kVectors; ++i) store(tile + i * kLanes, a[i]);
}

// How a task's tile of output positions finds its input (the forward's policy parameter Tiles):
//  - PositionTiles: kP consecutive positions anywhere in the map, one input pointer per position. The general case
//    (any stride, any map width); a partial last tile repeats its last position, computed and not written.
//  - RowTiles: kR whole output rows of kC = out_w positions, or (kR = 1) a segment of kC positions of one row
//    (stride_w 1). Position (r, c)'s window is row r's first window plus c * images floats, so the kernel addresses
//    every input vector from kR row pointers with constant displacements. With a pointer per position, 16 of them
//    outnumbered the general registers and GCC reloaded the spilled ones from the stack on every tap (7 loads per 16
//    FMAs at 8x8 on AVX-512).
// Each provides kP (positions per tile), sources(block, first, count, src) (the pointers a tile needs) and
// run(src, taps, count, init, accumulate, tile): sum_taps over the tile, into tile [kP][kV * kLanes].
template <int kV>
struct PositionTiles {
  static constexpr int kP = kAccumulators / kV;
  static constexpr bool kRowPairs = false;  // see RowTiles
  const int64_t* windows;
  void sources(const float* block, int64_t first, int64_t count, const float** src) const {
    for (int q = 0; q < kP; ++q) src[q] = block + windows[first + std::min<int64_t>(q, count - 1)];
  }
  template <typename Taps>
  static void run(const float* const* src, Taps taps, int64_t count, float init, bool accumulate, float* tile) {
    sum_taps<kP * kV, kV>(src, taps, count, init, accumulate, tile);
  }
};

template <int kV, int kR, int kC>
struct RowTiles {
  static constexpr int kP = kR * kC, kRows = kR, kWidth = kC;
  // Whether a tile is pairs of whole rows of an even width, which a 2x2, stride-2 max-pool reduces within the tile
  // (where the width is the map's: pools_row_pairs).
  static constexpr bool kRowPairs = kR % 2 == 0 && kC % 2 == 0;
  const int64_t* windows;
  // Tiles are whole: the caller takes RowTiles only where they divide the map.
  void sources(const float* block, int64_t first, int64_t, const float** src) const {
    for (int r = 0; r < kR; ++r) src[r] = block + windows[first + r * kC];
  }
  template <typename Taps>
  static void run(const float* const* src, Taps taps, int64_t count, float init, bool accumulate, float* tile) {
    sum_taps<kR * kC * kV, kC * kV>(src, taps, count, init, accumulate, tile);
  }
};

// write_tiles element by element: rows [k_begin, k_end) of the block, images [i_begin, i_end).
inline void write_tile_elements(const float* tiles, int64_t tile_size, int64_t k_begin, int64_t k_end, int64_t i_begin,
                                int64_t i_end, int64_t tile_positions, int64_t images, int64_t first_image,
                                int64_t first_position, const wide::Layout& out_layout, int64_t row, bool relu,
                                float* out) {
  if (k_begin >= k_end) return;  // else the loops below would still walk every image and position
  const int64_t step = out_layout.position, channel = out_layout.channel;
  for (int64_t i = i_begin; i < i_end; ++i) {
    float* dst = out + out_layout.plane(first_image + i, row) + first_position * step;
    for (int64_t p = 0; p < tile_positions; ++p)
      for (int64_t k = k_begin; k < k_end; ++k) {
        const float value = tiles[k * tile_size + p * images + i];
        dst[p * step + k * channel] = relu ? std::max(value, 0.0f) : value;
      }
  }
}

// The tiles of `block_rows` consecutive rows from `row` (each [positions][images], `tile_size` floats apart) into out
// (laid out as `out_layout`), clamped by relu. NCHW takes one row at a time; in NHWC a block of rows is a run of
// channels of each output, written together: row by row, the images' power-of-two strides would map every store of a
// tile to a few L1 sets, which then evict each other's lines before the next row fills them. There, kLanes rows x
// kLanes images of a position are one transpose (wide::transpose) of vectors of images into vectors of channels;
// element by element, the writes take 5-10% of a low-density 4x4 or 2x2 call. In NCHW a tile's positions (consecutive
// in the map, at most kLanes) are likewise transposed into runs of each image's plane, stored whole or (fewer than
// kLanes positions: 14 of a 56- or 28-wide map's rows) their first tile_positions lanes; element by element, the
// writes took 15% of a 128@28x28 call at batch 64.
inline void write_tiles(const float* tiles, int64_t tile_size, int64_t block_rows, int64_t tile_positions,
                        int64_t images, int64_t first_image, int64_t first_position, int64_t batch,
                        const wide::Layout& out_layout, int64_t row, bool relu, float* out) {
  const int64_t step = out_layout.position;
  const int64_t live = std::min(images, batch - first_image);
  if (step == 1 && tile_positions <= kLanes) {
    // NCHW: one transpose per kLanes images (the positions past the tile's as zeros, never stored).
    const int64_t full = live / kLanes * kLanes;
    for (int64_t k = 0; k < block_rows; ++k) {
      for (int64_t i0 = 0; i0 < full; i0 += kLanes) {
        vec r[kLanes];
        for (int p = 0; p < kLanes; ++p) {
          r[p] = p < tile_positions ? load(tiles + k * tile_size + p * images + i0) : vec{};
          if (relu) r[p] = r[p] < vec{} ? vec{} : r[p];  // as std::max(value, 0.0f): NaN stays NaN
        }
        wide::transpose(r);
        float* dst = out + first_position;
        if (tile_positions == kLanes)
          for (int i = 0; i < kLanes; ++i) store(dst + out_layout.plane(first_image + i0 + i, row + k), r[i]);
        else
          for (int i = 0; i < kLanes; ++i)
            wide::store_first(dst + out_layout.plane(first_image + i0 + i, row + k), r[i], tile_positions);
      }
    }
    write_tile_elements(tiles, tile_size, 0, block_rows, full, live, tile_positions, images, first_image,
                        first_position, out_layout, row, relu, out);
    return;
  }
  const int64_t vector_rows = out_layout.channel == 1 ? block_rows / kLanes * kLanes : 0;
  const int64_t vector_images = vector_rows > 0 ? live / kLanes * kLanes : 0;
  for (int64_t k0 = 0; k0 < vector_rows; k0 += kLanes)
    for (int64_t i0 = 0; i0 < vector_images; i0 += kLanes)
      for (int64_t p = 0; p < tile_positions; ++p) {
        vec r[kLanes];
        for (int k = 0; k < kLanes; ++k) {
          r[k] = load(tiles + (k0 + k) * tile_size + p * images + i0);
          if (relu) r[k] = r[k] < vec{} ? vec{} : r[k];  // as std::max(value, 0.0f): NaN stays NaN
        }
        wide::transpose(r);
        for (int i = 0; i < kLanes; ++i)
          store(out + out_layout.plane(first_image + i0 + i, row + k0) + (first_position + p) * step, r[i]);
      }
  write_tile_elements(tiles, tile_size, 0, vector_rows, vector_images, live, tile_positions, images, first_image,
                      first_position, out_layout, row, relu, out);
  write_tile_elements(tiles, tile_size, vector_rows, block_rows, 0, live, tile_positions, images, first_image,
                      first_position, out_layout, row, relu, out);
}

// Tasks per (batch block, tile) pair: rows are split too where the pairs alone would leave threads idle (a 2x2 map at
// batch 64 is two pairs): about four tasks per thread.
inline int64_t row_parts(int64_t pairs, int64_t rows) {
  return std::clamp<int64_t>((4 * at::get_num_threads() + pairs - 1) / pairs, 1, rows);
}

// Input channels per chunk (see forward_tiles) for a map: about as many as keep a chunk's windows of one tile in L1
// while every row of a task reads them (a channel's window is read by about density * KH * KW taps of each row; row
// by row over all channels, at density 0.32 most of those loads missed L1), yet at least kMinChunkTaps taps per row
// and chunk on average, since each row's accumulators are stored and reloaded once per chunk; at most kMaxChunkBytes
// of windows, so a chunk still fits L2. No chunks (all channels at once) where a task's rows read each channel's
// window fewer than kMinChunkReuse times in all: there the reloads cost more than the misses they save (40 on the
// Xeon, AVX-512: 512@4x4 at batch 64, density 0.024 (reuse 55), and 256@4x4 at 0.05 ran 1.1-1.13x faster chunked,
// 512@4x4 at batch 16, density 0.1 (reuse 57) level; between 20 and 40, level or within 3%). Nor on maps
// of at most kMaxUnchunkedPositions outputs (2x2), whatever the reuse: 512@2x2 at densities 0.045 to 0.3, batch 64
// and 128, ran 1.1-1.35x faster without chunks (Xeon, AVX-512, blocks of 32 images; 6-12% on Zen 4 in blocks of 64).
// Chosen by measurement on 256@8x8, 512@4x4 and 512@2x2 at densities 0.32 to 0.045, batch 64 (AVX-512, 32 KiB L1):
// 16 and 32 KiB of windows, 16 to 32 taps, ran within a few percent of each other and 1.15-1.3x faster than no
// chunks where they are taken (docs/benchmarks.md, "Kernel roofline").
constexpr int64_t kChunkBytes = 32 << 10, kMaxChunkBytes = 256 << 10, kMinChunkTaps = 16, kMinChunkReuse = 40;
constexpr int64_t kMaxUnchunkedPositions = 4;

inline int64_t channels_per_chunk(const batch_inner::Geometry& p, int64_t batch, int64_t out_h, int64_t out_w,
                                  int64_t stride_h, int64_t stride_w, int64_t kernel_extent_h,
                                  int64_t kernel_extent_w, int64_t rows, int64_t nnz) {
  const int64_t positions_per_tile = kAccumulators / vectors_for(out_h * out_w);
  const int64_t pairs = p.blocks(batch) * ((out_h * out_w + positions_per_tile - 1) / positions_per_tile);
  const int64_t reuse = nnz / std::max<int64_t>(1, row_parts(pairs, rows) * p.channels);
  if (reuse < kMinChunkReuse || out_h * out_w <= kMaxUnchunkedPositions) return p.channels;
  // A tile within one output row (maps at least a tile wide) reads kernel_extent_h input rows of its own width; one
  // of whole rows (narrower maps) the full padded width of its rows and the kernel's. Counted as whole padded rows,
  // a within-row tile's windows would make 128@28x28's chunks a third as wide: 1.15x slower at density 0.1, batch 64
  // (other layers level).
  int64_t window_rows, window_cols;
  if (out_w >= positions_per_tile) {
    window_rows = kernel_extent_h;
    window_cols = std::min(p.padded_w, (positions_per_tile - 1) * stride_w + kernel_extent_w);
  } else {
    const int64_t tile_rows = std::min(out_h, (positions_per_tile + out_w - 1) / out_w + 1);
    window_rows = std::min(p.padded_h, (tile_rows - 1) * stride_h + kernel_extent_h);
    window_cols = p.padded_w;
  }
  const int64_t bytes = std::max<int64_t>(1, window_rows * window_cols * p.images * int64_t{sizeof(float)});
  const double taps_per_row_channel = static_cast<double>(nnz) / std::max<int64_t>(1, rows * p.channels);
  const int64_t for_taps = static_cast<int64_t>(std::ceil(kMinChunkTaps / std::max(taps_per_row_channel, 1e-3)));
  const int64_t chunk = std::min(std::max(kChunkBytes / bytes, for_taps), std::max<int64_t>(1, kMaxChunkBytes / bytes));
  return std::clamp<int64_t>(chunk, 1, p.channels);
}

inline vec pooled_value(const float* at, bool relu) {
  const vec v = load(at);
  return relu ? (v < vec{} ? vec{} : v) : v;  // as std::max(value, 0.0f): NaN stays NaN
}

inline vec nan_max(vec a, vec b) { return a != a ? a : (a > b ? a : b); }  // b where b is NaN

// The 2x2, stride-2 max-pool of `block_rows` tiles of kR whole rows of kC positions ([kR * kC][kImages] each, kTile
// floats apart) into `pooled` ([kR / 2 * kC / 2][kImages] each, as many floats apart), each value clamped at 0 first
// where relu; NaN propagates as in max_pool2d.
template <int kImages, int kR, int kC>
inline void pool_row_pairs(const float* tiles, int64_t block_rows, bool relu, float* pooled) {
  constexpr int64_t kTile = kR * kC * kImages, kPooledTile = kTile / 4;
  for (int64_t k = 0; k < block_rows; ++k)
    for (int pr = 0; pr < kR / 2; ++pr)
      for (int pc = 0; pc < kC / 2; ++pc)
        for (int i = 0; i < kImages; i += kLanes) {
          const float* top = tiles + k * kTile + ((2 * pr) * kC + 2 * pc) * kImages + i;
          const float* bottom = top + kC * kImages;
          store(pooled + k * kPooledTile + (pr * (kC / 2) + pc) * kImages + i,
                nan_max(nan_max(pooled_value(top, relu), pooled_value(top + kImages, relu)),
                        nan_max(pooled_value(bottom, relu), pooled_value(bottom + kImages, relu))));
        }
}

// A task is one batch block, one tile of positions and a range of rows. Chunk by chunk of input channels, every row
// of the range adds its taps of the chunk to its accumulators (kept in `partial`, [rows of the range][tile]), so a
// chunk's input windows are loaded into L1 once and then read by every row; the finished tiles are written out
// (with bias and relu) a block of rows at a time. With `pool` (tiles of whole row pairs: pools_row_pairs), a block's
// tiles are max-pooled 2x2 first and the pooled tiles written to the pooled map `out`.
template <int kV, typename Tiles, typename Taps>
inline void forward_tiles(const float* packed, const batch_inner::Geometry& p, const Tiles& tiling, Taps taps,
                          const ChannelChunks& chunks, int64_t rows, int64_t batch,
                          int64_t positions, const float* bias, bool relu, const wide::Layout& out_layout,
                          float* out, bool pool) {
  constexpr int kP = Tiles::kP;
  constexpr int64_t kImages = kV * kLanes, kTile = kP * kImages;
  const int64_t blocks = p.blocks(batch);
  const int64_t tiles = (positions + kP - 1) / kP;
  const int64_t pairs = blocks * tiles, parts = row_parts(pairs, rows);
  const int64_t rows_per_write = out_layout.position == 1 ? 1 : wide::kChannelBlock;
  at::parallel_for(0, pairs * parts, 1, [&](int64_t begin, int64_t end) {
    // The tiles a task holds at once: a block of rows without chunks, else all of its rows. They start at a vector
    // boundary (a std::vector's own alignment is 16 bytes).
    const int64_t held = chunks.count == 1 ? rows_per_write : rows / parts + 1;
    std::vector<float, wide::UninitializedAllocator<float>> partial(held * kTile + kLanes);
    float* tiles_at = partial.data() + (-reinterpret_cast<uintptr_t>(partial.data()) / sizeof(float)) % kLanes;
    std::vector<float, wide::UninitializedAllocator<float>> pooled(pool ? rows_per_write * kTile / 4 + kLanes : 0);
    float* pooled_at = pooled.data() + (-reinterpret_cast<uintptr_t>(pooled.data()) / sizeof(float)) % kLanes;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / parts, part = task % parts;
      const int64_t first_row = part * rows / parts, last_row = (part + 1) * rows / parts;
      const int64_t nb = pair / tiles, first = (pair % tiles) * kP;
      const int64_t count = std::min<int64_t>(kP, positions - first);
      const float* src[kP];
      tiling.sources(packed + nb * p.block(), first, count, src);
      // Without chunks, a block of rows at a time, written while its tiles are still in L1.
      const int64_t group = chunks.count == 1 ? rows_per_write : last_row - first_row;
      for (int64_t g = first_row; g < last_row; g += group) {
        const int64_t g_end = std::min(g + group, last_row);
        for (int64_t k = 0; k < chunks.count; ++k)
          for (int64_t r = g; r < g_end; ++r) {
            const int32_t from = chunks.begin(r, k), to = chunks.begin(r, k + 1);
            if (k == 0 || to > from)
              Tiles::run(src, taps.at(from), to - from, bias ? bias[r] : 0.0f, k > 0, tiles_at + (r - g) * kTile);
          }
        for (int64_t r = g; r < g_end; r += rows_per_write) {
          const int64_t block_rows = std::min(rows_per_write, g_end - r);
          if constexpr (Tiles::kRowPairs) {
            if (pool) {
              pool_row_pairs<kImages, Tiles::kRows, Tiles::kWidth>(tiles_at + (r - g) * kTile, block_rows, relu,
                                                                    pooled_at);
              write_tiles(pooled_at, kTile / 4, block_rows, kP / 4, kImages, nb * kImages, first / 4, batch,
                          out_layout, r, false, out);
              continue;
            }
          }
          write_tiles(tiles_at + (r - g) * kTile, kTile, block_rows, count, kImages, nb * kImages, first, batch,
                      out_layout, r, relu, out);
        }
      }
    }
  });
}

// The tiling of a map in row tiles (RowTiles): `rows` whole rows of width out_w, or (rows 1) segments of `width`
// positions; rows 0 where none applies. Widths are tried widest first: powers of two for CIFAR-sized maps (32, 16,
// 8, 4, 2), 14 and 7 for ImageNet-sized ones (56, 28, 14, 7). Whole rows where the width is the map's (as many as fit
// the register block, at most 4 pointers, a power of two dividing the map's rows), else one segment of a row where
// the width divides the map's. Taken only where the tile fills at least half the register block: fewer accumulators
// feed fewer FMAs per broadcast.
struct RowTiling {
  int rows, width;
};

template <int kV>
inline RowTiling row_tiling(int64_t out_h, int64_t out_w) {
  for (const int width : {16, 14, 8, 7, 4, 2}) {
    if (width * kV > kAccumulators) continue;
    const int fit = std::min(4, kAccumulators / (width * kV));
    const int whole_rows = fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
    const auto fills = [&](int rows) { return 2 * rows * width * kV >= kAccumulators; };
    int rows = 0;
    if (out_w == width && out_h % whole_rows == 0)
      rows = whole_rows;
    else if (whole_rows == 4 && out_w == width && out_h % 2 == 0)  // a 2x2 map in blocks of two vectors
      rows = 2;
    else if (out_w % width == 0)
      rows = 1;
    if (rows > 0 && fills(rows)) return {rows, width};
  }
  return {0, 0};
}

// run(RowTiles<kV, rows, width>{}) for a run-time tiling (one of row_tiling's); false where it is none.
template <int kV, typename Run>
inline bool with_row_tiles(RowTiling tiling, Run run) {
  bool ran = false;
  const auto width = [&](auto c) {
    constexpr int kC = decltype(c)::value;
    if (tiling.width != kC) return;
    const auto rows = [&](auto r) {
      constexpr int kR = decltype(r)::value;
      if constexpr (kR * kC * kV <= kAccumulators)
        if (tiling.rows == kR) {
          run(RowTiles<kV, kR, kC>{});
          ran = true;
        }
    };
    using std::integral_constant;
    rows(integral_constant<int, 1>{}), rows(integral_constant<int, 2>{}), rows(integral_constant<int, 4>{});
  };
  using std::integral_constant;
  width(integral_constant<int, 16>{}), width(integral_constant<int, 14>{}), width(integral_constant<int, 8>{});
  width(integral_constant<int, 7>{}), width(integral_constant<int, 4>{}), width(integral_constant<int, 2>{});
  return ran;
}

// The forward's row tiling at this stride: row tiles only where the stride along the width is 1.
template <int kV>
inline RowTiling forward_row_tiling(int64_t out_h, int64_t out_w, int64_t stride_w) {
  return stride_w == 1 ? row_tiling<kV>(out_h, out_w) : RowTiling{0, 0};
}

// Whether tiling `t` of an out_w-wide map is tiles of pairs of whole rows of an even width (2 or 4 rows), which a
// fused 2x2, stride-2 max-pool reduces in the forward's epilogue (forward_tiles with `pool`).
inline bool is_row_pairs(RowTiling t, int64_t out_w) {
  return t.rows > 0 && t.rows % 2 == 0 && t.width == out_w && out_w % 2 == 0;
}

// Whether the forward of an out_h x out_w map takes such tiles.
inline bool pools_row_pairs(int64_t out_h, int64_t out_w, int64_t stride_w) {
  switch (vectors_for(out_h * out_w)) {
    case 1: return is_row_pairs(forward_row_tiling<1>(out_h, out_w, stride_w), out_w);
    case 2: return is_row_pairs(forward_row_tiling<2>(out_h, out_w, stride_w), out_w);
    default: return is_row_pairs(forward_row_tiling<4>(out_h, out_w, stride_w), out_w);
  }
}

template <int kV, typename Taps>
inline void forward_v(const float* packed, const batch_inner::Geometry& p, Taps taps,
                      const ChannelChunks& chunks, int64_t rows, int64_t batch, int64_t out_h, int64_t out_w,
                      int64_t stride_h, int64_t stride_w, const float* bias, bool relu,
                      const wide::Layout& out_layout, float* out, bool pool) {
  const std::vector<int64_t> windows = batch_inner::windows(p, out_h, out_w, stride_h, stride_w);
  const auto run = [&](auto tiles) {
    forward_tiles<kV>(packed, p, decltype(tiles){windows.data()}, taps, chunks, rows, batch, out_h * out_w, bias,
                      relu, out_layout, out, pool);
  };
  const RowTiling tiling = forward_row_tiling<kV>(out_h, out_w, stride_w);
  // The caller checks pools_row_pairs: out is the pooled map, which any other tiles would overrun.
  TORCH_CHECK(!pool || is_row_pairs(tiling, out_w),
              "tiled forward: a fused max-pool needs tiles of whole row pairs (pools_row_pairs)");
  if (with_row_tiles<kV>(tiling, run)) return;
  run(PositionTiles<kV>{});
}

// out[n, r, oh, ow] = relu?(bias[r] + sum over the taps of row r of value * input window), every image n, out laid
// out as `out_layout`; with `pool` (where pools_row_pairs holds), its 2x2, stride-2 max-pool, out the pooled map.
// packed: the input packed by batch_inner::pack with `p` from packing(); taps in CSR order with offsets into one
// batch block, each row's split into chunks of input channels by channel_chunks().
template <typename Taps>
inline void forward(const float* packed, const batch_inner::Geometry& p, Taps taps,
                    const ChannelChunks& chunks, int64_t rows, int64_t batch, int64_t out_h, int64_t out_w,
                    int64_t stride_h, int64_t stride_w, const float* bias, bool relu, const wide::Layout& out_layout,
                    float* out, bool pool = false) {
  switch (p.images / kLanes) {
    case 1:
      forward_v<1>(packed, p, taps, chunks, rows, batch, out_h, out_w, stride_h, stride_w, bias, relu, out_layout,
                   out, pool);
      break;
    case 2:
      forward_v<2>(packed, p, taps, chunks, rows, batch, out_h, out_w, stride_h, stride_w, bias, relu, out_layout,
                   out, pool);
      break;
    default:
      forward_v<4>(packed, p, taps, chunks, rows, batch, out_h, out_w, stride_h, stride_w, bias, relu, out_layout,
                   out, pool);
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
