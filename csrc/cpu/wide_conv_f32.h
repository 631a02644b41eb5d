// Fast float32 CPU kernels of the sparse convolution ("wide" direct sparse convolution, after SkimCaffe).
//
// The input of every image is packed once per call into zero-padded, stride-phase-split planes
// [C, stride_h, stride_w, Hq, Wq]: then the input window that one kernel tap (c, kh, kw) reads for all output
// positions is a single contiguous run starting at a fixed offset, whatever the stride, dilation or padding. Output
// positions are enumerated "wide", q = oh * Wq + ow with ow running over the full packed width Wq; the columns
// ow >= OW are computed and discarded, which buys loops with no bounds checks. A sparse row is then a list of
// (offset, value) taps and a pass over them computes a block of V vectors of outputs,
//     acc[q .. q + V * lanes) = bias + sum_taps value * src[offset + q .. offset + q + V * lanes)
// with the V accumulators held in registers across all taps of the row (register blocking). Work and traffic
// scale with the nonzeros; nothing dense is ever built.
//
// Compiled once per instruction set: this file is included only by csrc/cpu/isa/kernels_body.h, inside a namespace
// of its own per ISA (isa_baseline, isa_avx2, isa_avx512), after every system and torch header (isa/prelude.h). It
// therefore includes nothing and has no include guard. PTD_ISA_VECTOR_BYTES (set by the ISA's .cpp) is the width of
// the float vectors of the register-blocked loops: the widest registers of the copy's instruction set, 16 bytes
// (4 floats) for the baseline (SSE, NEON), 32 (8 floats, ymm) for AVX2, 64 (16 floats, zmm) for AVX-512. Never
// wider: GCC keeps a vector type wider than the hardware's registers in memory, which cost the baseline 5-10x.
#ifndef PTD_ISA_VECTOR_BYTES
#error "wide_conv_f32.h is compiled per instruction set: include csrc/cpu/isa/kernels_body.h instead"
#endif

namespace wide {

// GCC/Clang vector extension: kLanes floats, lowered to whatever the copy's instruction set offers (SSE pairs for
// the baseline, ymm for AVX2, zmm for AVX-512).
typedef float vec __attribute__((vector_size(PTD_ISA_VECTOR_BYTES)));
typedef int32_t ivec __attribute__((vector_size(PTD_ISA_VECTOR_BYTES)));
constexpr int64_t kLanes = PTD_ISA_VECTOR_BYTES / sizeof(float);

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
// The first `count` (< kLanes) lanes of v, where the memory past them belongs to another task: one masked store on
// AVX-512 and AVX2 (a memcpy of a run-time size was a library call, 8% of a 64@56x56 batch-64 forward).
inline void store_first(float* p, vec v, int64_t count) {
#if PTD_ISA_X86_COPIES && PTD_ISA_VECTOR_BYTES == 64
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1), (__m512)v);
#elif PTD_ISA_X86_COPIES && PTD_ISA_VECTOR_BYTES == 32
  ivec lane;
  for (int i = 0; i < kLanes; ++i) lane[i] = i;
  _mm256_maskstore_ps(p, (__m256i)(lane < static_cast<int32_t>(count)), (__m256)v);
#else
  for (int64_t i = 0; i < count; ++i) p[i] = v[i];
#endif
}
// Every lane x, as one broadcast instruction. x - 0 is x for every x, so GCC drops the subtraction; `vec{} + x` is not
// (-0.0f + 0.0f is +0.0f), and GCC added 0.0f before every broadcast, an add on each tap's dependency chain.
template <typename V>
inline V broadcast_as(float x) {
  return x - V{};
}
inline vec broadcast(float x) { return broadcast_as<vec>(x); }
// Transposes kLanes x kLanes floats held as kLanes vectors: afterwards r[i][j] is what r[j][i] was. Level h
// exchanges, in each pair of rows i and i + h (i & h == 0), the off-diagonal h x h blocks: log2(kLanes) levels of
// kLanes two-source shuffles (64 for 16 lanes), where element by element it is kLanes^2 loads and stores. Used where
// the kernels move between channels-innermost (NHWC) and images-innermost layouts.
template <int h = kLanes / 2>
inline void transpose(vec* r) {
  ivec low, high;
  for (int p = 0; p < kLanes; ++p) {
    low[p] = (p & h) ? kLanes + p - h : p;
    high[p] = (p & h) ? kLanes + p : p + h;
  }
#pragma GCC unroll 16
  for (int i = 0; i < kLanes; ++i)
    if ((i & h) == 0) {
      const vec a = r[i], b = r[i | h];
      r[i] = __builtin_shuffle(a, b, low);
      r[i | h] = __builtin_shuffle(a, b, high);
    }
  if constexpr (h > 1) transpose<h / 2>(r);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Tap {
  int32_t offset;  // into one packed image, in floats
  float value;
};

// A vector whose elements start uninitialised: the tap-list builders write every tap, and the zeroing that
// std::vector<Tap>(n) does first would be one more pass over the nonzeros.
template <typename T>
struct UninitializedAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  template <typename U, typename... Args>
  void construct(U* at, Args&&... args) {
    if constexpr (sizeof...(Args) == 0)
      ::new (static_cast<void*>(at)) U;
    else
      ::new (static_cast<void*>(at)) U(std::forward<Args>(args)...);
  }
};
using TapList = std::vector<Tap, UninitializedAllocator<Tap>>;

// Where the kernels below read a row's taps (their template parameter Taps; `at(first)` is the row starting at entry
// `first`): the CSR arrays themselves, each column's packed offset looked up in a table of C_in * KH * KW entries
// (CsrTaps), or a list of (offset, value) pairs built per call (ListedTaps). conv_f32.h's with_csr_taps chooses for
// the forward and the weight gradient; the data gradient's transposed, flipped taps are a permutation of the CSR's,
// always listed.
template <typename Index>  // int32_t, or int16_t for the compact inference form of col_idx
struct CsrTaps {
  const Index* columns;    // col_idx
  const float* values;     // null where only the offsets are read (the weight gradient)
  const int32_t* table;    // packed offset of every column
  int32_t offset(int64_t t) const { return table[columns[t]]; }
  float value(int64_t t) const { return values[t]; }
  CsrTaps at(int64_t first) const { return {columns + first, values ? values + first : nullptr, table}; }
};

struct ListedTaps {
  const Tap* taps;
  int32_t offset(int64_t t) const { return taps[t].offset; }
  float value(int64_t t) const { return taps[t].value; }
  ListedTaps at(int64_t first) const { return {taps + first}; }
};

// Shape of one packed image: C planes per phase, each Hq x Wq, and the wide output length.
struct PackedGeometry {
  int64_t channels, phase_h, phase_w, rows, cols;  // cols = Wq, the wide row stride
  int64_t out_h, out_w;                            // valid output size
  // Bit k set: some tap reads phase k of the height (width). The packers copy only those phases (the rest stay
  // zero): a 1x1, stride-2 convolution reads one phase of four.
  uint64_t used_h = ~uint64_t{0}, used_w = ~uint64_t{0};
  bool uses_row(int64_t ph) const { return ((used_h >> (ph & 63)) & 1) != 0; }
  bool uses(int64_t ph, int64_t pw) const { return uses_row(ph) && ((used_w >> (pw & 63)) & 1) != 0; }
  int64_t plane() const { return rows * cols; }
  int64_t image() const { return channels * phase_h * phase_w * plane(); }
  int64_t wide_length() const { return round_up(out_h * cols, kLanes); }
  // Reads run up to one row plus a vector past the last plane: the slack after the last image.
  int64_t slack() const { return cols + 8 * kLanes; }
  int32_t tap_offset(int64_t channel, int64_t tap_h, int64_t tap_w) const {
    const int64_t phase = (channel * phase_h + tap_h % phase_h) * phase_w + tap_w % phase_w;
    return static_cast<int32_t>(phase * plane() + (tap_h / phase_h) * cols + tap_w / phase_w);
  }
};

// Geometry for a convolution over an H x W input with the given padding, stride and output size. Offsets within an
// image must fit int32 (checked by the caller through fits_int32).
inline PackedGeometry packed_geometry(int64_t channels, int64_t in_h, int64_t in_w, int64_t pad_h, int64_t pad_w,
                                      int64_t stride_h, int64_t stride_w, int64_t out_h, int64_t out_w) {
  const int64_t padded_h = in_h + 2 * pad_h, padded_w = in_w + 2 * pad_w;
  return {channels, stride_h, stride_w, (padded_h + stride_h - 1) / stride_h, (padded_w + stride_w - 1) / stride_w,
          out_h, out_w};
}

// The phases (mod stride) that taps k * dilation, k < kernel, read: a mask for PackedGeometry::used_h / used_w (every
// phase where the stride exceeds the mask's 64 bits).
inline uint64_t phases_read(int64_t kernel, int64_t dilation, int64_t stride) {
  if (stride > 64) return ~uint64_t{0};
  uint64_t mask = 0;
  for (int64_t k = 0; k < kernel; ++k) mask |= uint64_t{1} << ((k * dilation) % stride);
  return mask;
}

inline bool fits_int32(const PackedGeometry& p) { return p.image() + p.slack() < (int64_t{1} << 31); }

// Where element (n, c, position) of an activation [N, C, H, W] lies, position = h * W + w, in floats: NCHW
// (contiguous) or NHWC (channels_last). The forward reads its input and writes its output in either, so a network
// kept in channels_last (where oneDNN's dense convolutions run fastest) converts nothing at its sparse layers. The
// gradients run NCHW.
struct Layout {
  int64_t image, channel, position;
  static Layout nchw(int64_t channels, int64_t positions) { return {channels * positions, positions, 1}; }
  static Layout nhwc(int64_t channels, int64_t positions) { return {channels * positions, 1, channels}; }
  static Layout of(bool channels_last, int64_t channels, int64_t positions) {
    return channels_last ? nhwc(channels, positions) : nchw(channels, positions);
  }
  int64_t plane(int64_t n, int64_t c) const { return n * image + c * channel; }
};

// Channels per task of the NHWC packers: one cache line of an input position, copied to as many packed planes.
constexpr int64_t kChannelBlock = 16;

// pack_images from NHWC: a task is an image and a block of channels, so each input position is read as one cache
// line and its channels written to their planes (one write stream per channel of the block). Without a stride along
// the width, kLanes positions x kLanes channels are one transpose (consecutive positions stay consecutive in a
// channel's packed row); the rest, element by element.
inline void pack_images_nhwc(const float* src, const Layout& src_layout, int64_t batch, int64_t in_h, int64_t in_w,
                             int64_t pad_h, int64_t pad_w, const PackedGeometry& p, float* base) {
  const int64_t channel_size = p.phase_h * p.phase_w * p.plane();
  const int64_t channel_blocks = (p.channels + kChannelBlock - 1) / kChannelBlock;
  const int64_t step = src_layout.position;
  at::parallel_for(0, batch * channel_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / channel_blocks, first = (task % channel_blocks) * kChannelBlock;
      const int64_t count = std::min(kChannelBlock, p.channels - first);
      const int64_t vector_channels = p.phase_w == 1 ? count / kLanes * kLanes : 0;
      const int64_t vector_width = vector_channels > 0 ? in_w / kLanes * kLanes : 0;
      float* block_dst = base + (n * p.channels + first) * channel_size;
      std::fill(block_dst, block_dst + count * channel_size, 0.0f);
      for (int64_t h = 0; h < in_h; ++h) {
        const int64_t ph = (h + pad_h) % p.phase_h, row = (h + pad_h) / p.phase_h;
        if (!p.uses_row(ph)) continue;
        const float* from_row = src + src_layout.plane(n, first) + h * in_w * step;
        for (int64_t w0 = 0; w0 < vector_width; w0 += kLanes)
          for (int64_t c0 = 0; c0 < vector_channels; c0 += kLanes) {
            vec r[kLanes];
            for (int j = 0; j < kLanes; ++j) r[j] = load(from_row + (w0 + j) * step + c0);
            transpose(r);
            float* to = block_dst + ph * p.plane() + row * p.cols + w0 + pad_w;
            for (int c = 0; c < kLanes; ++c) store(to + (c0 + c) * channel_size, r[c]);
          }
        // Input column w lands in phase pw = (w + pad_w) % phase_w at column (w + pad_w) / phase_w, both stepped
        // along rather than divided out per position (two divisions per position took most of a 3-channel stem's
        // packing).
        int64_t pw = pad_w % p.phase_w, col = pad_w / p.phase_w;
        for (int64_t w = 0; w < in_w; ++w) {
          if (p.uses(ph, pw)) {
            const float* from = from_row + w * step;
            float* to = block_dst + (ph * p.phase_w + pw) * p.plane() + row * p.cols + col;
            for (int64_t c = w < vector_width ? vector_channels : 0; c < count; ++c) to[c * channel_size] = from[c];
          }
          if (++pw == p.phase_w) {
            pw = 0;
            ++col;
          }
        }
      }
    }
  });
}

// Packs images [N, C, H, W] laid out as `src_layout` into [N, packed image] plus slack; zero outside the image.
inline at::Tensor pack_images(const float* src, const Layout& src_layout, int64_t batch, int64_t in_h, int64_t in_w,
                              int64_t pad_h, int64_t pad_w, const PackedGeometry& p) {
  at::Tensor packed = cpu_isa::packing_buffer(batch * p.image() + p.slack());
  float* base = packed.mutable_data_ptr<float>();
  std::fill(base + batch * p.image(), base + batch * p.image() + p.slack(), 0.0f);
  const int64_t channel_size = p.phase_h * p.phase_w * p.plane();
  const int64_t step = src_layout.position;
  if (step != 1) {
    pack_images_nhwc(src, src_layout, batch, in_h, in_w, pad_h, pad_w, p, base);
    return packed;
  }
  at::parallel_for(0, batch * p.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      float* channel_dst = base + task * channel_size;  // images are stored back to back, channels within
      std::fill(channel_dst, channel_dst + channel_size, 0.0f);
      const float* plane_src = src + src_layout.plane(task / p.channels, task % p.channels);
      for (int64_t h = 0; h < in_h; ++h) {
        const int64_t ph = (h + pad_h) % p.phase_h, row = (h + pad_h) / p.phase_h;
        if (!p.uses_row(ph)) continue;
        const float* row_src = plane_src + h * in_w;
        float* phase_row = channel_dst + ph * p.phase_w * p.plane() + row * p.cols;
        if (p.phase_w == 1) {  // the one phase of the width, which every tap reads
          std::memcpy(phase_row + pad_w, row_src, in_w * sizeof(float));
          continue;
        }
        for (int64_t pw = 0; pw < p.phase_w; ++pw) {
          if (!p.uses(ph, pw)) continue;
          // Input column w lands in phase (w + pad_w) % phase_w at column (w + pad_w) / phase_w: from first_w on,
          // every phase_w-th input column, at consecutive columns (no division per element: it took half the call
          // of a 1x1, stride-2 layer at batch 1).
          const int64_t first_w = ((pw - pad_w) % p.phase_w + p.phase_w) % p.phase_w;
          float* dst = phase_row + pw * p.plane() + (first_w + pad_w) / p.phase_w;
          for (int64_t w = first_w; w < in_w; w += p.phase_w) *dst++ = row_src[w];
        }
      }
    }
  });
  return packed;
}

// Vectors of accumulators per pass over a row's taps: 16 of the 32 zmm registers on AVX-512, 12 of the 16 ymm/xmm
// elsewhere (one more holds the broadcast weight). Each tap's offset and value are loaded once per pass, so the more
// outputs a pass covers the fewer loads per FMA (with four vectors a pass, 64@32x32 at batch 1 ran at ~18% of peak).
constexpr int kRowAccumulators = PTD_ISA_VECTOR_BYTES >= 64 ? 16 : 12;

// A pass of fewer vectors than this would have that many chains of dependent FMAs, one FMA each per tap, and wait on
// their latency (4 cycles a tap for a single vector, against 1 once four chains are in flight: 512@2x2 at batch 1
// ran 2 cycles a tap with two): its taps are dealt in turn to kSets sets of accumulators, summed at the end.
constexpr int kMinChainsPerPass = 4;

// dst[0, kVectors * kLanes) = init + sum over the taps of value * src[offset ...], src and dst at the pass's start;
// with `accumulate`, what dst holds instead of init (a chunk of input channels after the first, sparse_rows).
template <int kVectors, typename Taps>
inline void gather_pass(const float* src, Taps taps, int64_t count, float init, bool accumulate, float* dst) {
  constexpr int kSets = (kMinChainsPerPass + kVectors - 1) / kVectors;
  vec a[kSets][kVectors];
  for (int k = 0; k < kVectors; ++k) {
    a[0][k] = accumulate ? load(dst + k * kLanes) : broadcast(init);
    for (int set = 1; set < kSets; ++set) a[set][k] = vec{};
  }
  const auto add_tap = [&](int set, int64_t t) {
    const float* s = src + taps.offset(t);
    const vec v = broadcast(taps.value(t));
#pragma GCC unroll 16
    for (int k = 0; k < kVectors; ++k) a[set][k] += v * load(s + k * kLanes);
  };
  int64_t t = 0;
  for (; t + kSets <= count; t += kSets)
#pragma GCC unroll 4
    for (int set = 0; set < kSets; ++set) add_tap(set, t + set);
  for (; t < count; ++t) add_tap(0, t);
  for (int k = 0; k < kVectors; ++k) {
    vec sum = a[0][k];
    for (int set = 1; set < kSets; ++set) sum += a[set][k];
    store(dst + k * kLanes, sum);
  }
}

// gather_pass<vectors> for a run-time count in [1, kRowAccumulators].
template <typename Taps, int... kCounts>
inline void gather_pass_of(int64_t vectors, const float* src, Taps taps, int64_t count, float init, bool accumulate,
                           float* dst, std::integer_sequence<int, kCounts...>) {
  ((vectors == kCounts + 1 ? gather_pass<kCounts + 1>(src, taps, count, init, accumulate, dst) : void()), ...);
}

// dst[q] = init (or, with `accumulate`, dst[q]) + sum over taps of value * src[offset + q], q in [0, length); length
// is a multiple of kLanes. The row's vectors are split into the fewest passes of at most kRowAccumulators, of equal
// size (68 vectors, 64@32x32's wide row, as 14 + 14 + 14 + 13 + 13, rather than a short last pass with few chains).
template <typename Taps>
inline void gather_row(const float* src, Taps taps, int64_t count, float init, bool accumulate, float* dst,
                       int64_t length) {
  const int64_t vectors = length / kLanes;
  const int64_t passes = (vectors + kRowAccumulators - 1) / kRowAccumulators;
  for (int64_t pass = 0, first = 0; pass < passes; ++pass) {
    const int64_t last = (pass + 1) * vectors / passes;
    gather_pass_of(last - first, src + first * kLanes, taps, count, init, accumulate, dst + first * kLanes,
                   std::make_integer_sequence<int, kRowAccumulators>{});
    first = last;
  }
}

// One output row of `count` channels' wide planes (`length` floats apart) into NHWC, where each position's channels
// are one run (`step` floats between positions), clamped by relu: kLanes channels x kLanes positions at a time as
// one transpose (see transpose), the rest element by element (a strided read and a store per float). On a ResNet
// stem's 205 MB output (batch 64) both forms run at the memory's write speed, level (Xeon).
inline void write_channel_runs(const float* src_row, int64_t length, int64_t count, int64_t out_w, int64_t step,
                               bool relu, float* dst_row) {
  const int64_t vector_channels = count / kLanes * kLanes;
  const int64_t vector_positions = vector_channels > 0 ? out_w / kLanes * kLanes : 0;
  for (int64_t k0 = 0; k0 < vector_channels; k0 += kLanes)
    for (int64_t w0 = 0; w0 < vector_positions; w0 += kLanes) {
      vec r[kLanes];
      for (int k = 0; k < kLanes; ++k) {
        r[k] = load(src_row + (k0 + k) * length + w0);
        if (relu) r[k] = r[k] < vec{} ? vec{} : r[k];  // as std::max(value, 0.0f): NaN stays NaN
      }
      transpose(r);
      for (int i = 0; i < kLanes; ++i) store(dst_row + (w0 + i) * step + k0, r[i]);
    }
  const auto finish = [relu](float value) { return relu ? std::max(value, 0.0f) : value; };
  for (int64_t ow = vector_positions; ow < out_w; ++ow)  // the positions past the vectors, vector channels
    for (int64_t k = 0; k < vector_channels; ++k) dst_row[ow * step + k] = finish(src_row[k * length + ow]);
  for (int64_t ow = 0; ow < out_w; ++ow)  // the channels past the vectors, every position
    for (int64_t k = vector_channels; k < count; ++k) dst_row[ow * step + k] = finish(src_row[k * length + ow]);
}

// The max-pool epilogue (conv_forward_max_pool): `count` planes of one image's wide result (`length` floats apart,
// rows p.cols apart) pooled into `out` (the pooled map, laid out as `out_layout`, from its plane (n, first)), each
// value clamped at 0 first where relu. NCHW pools each plane straight into its output plane; NHWC pools into
// `pooled` [count][pooled positions] and writes its rows as runs of channels.
inline void write_pooled(const float* wide, int64_t length, int64_t count, const PackedGeometry& p, const Pool& pool,
                         bool relu, const Layout& out_layout, int64_t n, int64_t first, float* rows, float* pooled,
                         float* out) {
  const int64_t out_h = pool.h.out_size(p.out_h), out_w = pool.w.out_size(p.out_w), step = out_layout.position;
  const OutputRange interior = pool.w.interior(p.out_w, out_w);
  for (int64_t k = 0; k < count; ++k) {
    float* dst = step == 1 ? out + out_layout.plane(n, first + k) : pooled + k * out_h * out_w;
    for (int64_t oh = 0; oh < out_h; ++oh) {
      if (relu)
        pool_output_row<true>(wide + k * length, p.cols, p.out_h, p.out_w, oh, pool, interior, rows,
                              dst + oh * out_w, out_w);
      else
        pool_output_row<false>(wide + k * length, p.cols, p.out_h, p.out_w, oh, pool, interior, rows,
                               dst + oh * out_w, out_w);
    }
  }
  if (step == 1) return;
  for (int64_t oh = 0; oh < out_h; ++oh)
    write_channel_runs(pooled + oh * out_w, out_h * out_w, count, out_w, step, false,
                       out + out_layout.plane(n, first) + oh * out_w * step);
}

// out[n, r] (valid OH x OW of the wide result, laid out as `out_layout`) for every image n and sparse row r: each task
// computes one plane (NCHW) or a block of kChannelBlock planes (NHWC, so that each output position is written as
// one run of channels). row_ptr [rows + 1] indexes taps; bias may be null; relu clamps the result at 0. With `pool`,
// out is the max-pool of that result (the pooled map, laid out as `out_layout`), pooled while a task's planes are
// still in cache: the full-size output is never written. With `chunks` (channel_chunks.h) of more than one chunk, a
// thread computes all of its planes of an image together, chunk by chunk, so that each chunk's input planes stay in
// L1 while every plane reads them (512@7x7 at batch 1, density 0.05: the whole image's 166 KB of input planes, read
// once per plane from L2, made each tap cost twice what it costs from L1).
template <typename Taps>
inline void sparse_rows(const float* packed, const PackedGeometry& p, Taps taps,
                        const int32_t* row_ptr, int64_t rows, int64_t batch, const float* bias, bool relu,
                        const Layout& out_layout, float* out, const Pool* pool = nullptr,
                        const ChannelChunks* chunks = nullptr) {
  const int64_t length = p.wide_length(), step = out_layout.position;
  const int64_t block = step == 1 ? 1 : kChannelBlock, row_blocks = (rows + block - 1) / block;
  const int64_t pooled_plane = pool ? pool->h.out_size(p.out_h) * pool->w.out_size(p.out_w) : 0;
  const bool chunked = chunks != nullptr && chunks->count > 1;
  const int64_t chunk_count = chunked ? chunks->count : 1;
  at::parallel_for(0, batch * row_blocks, std::max<int64_t>(1, 2048 / std::max<int64_t>(1, block * length)),
                   [&](int64_t begin, int64_t end) {
    // The planes a task range holds at once: a task's block, or with chunks all of its blocks of one image.
    const int64_t held = chunked ? std::min(end - begin, row_blocks) * block : block;
    std::vector<float, UninitializedAllocator<float>> wide(held * length);
    std::vector<float> pool_rows(pool ? p.out_w : 0), pooled(pool && step != 1 ? block * pooled_plane : 0);
    // A block of `count` planes from row `first` of image n, from `planes`, written out (or pooled).
    const auto write_block = [&](int64_t n, int64_t first, int64_t count, const float* planes) {
      if (pool != nullptr) {
        write_pooled(planes, length, count, p, *pool, relu, out_layout, n, first, pool_rows.data(), pooled.data(),
                     out);
        return;
      }
      float* dst = out + out_layout.plane(n, first);
      for (int64_t oh = 0; oh < p.out_h; ++oh) {
        const float* src_row = planes + oh * p.cols;
        float* dst_row = dst + oh * p.out_w * step;
        if (step != 1) {
          write_channel_runs(src_row, length, count, p.out_w, step, relu, dst_row);
        } else if (relu) {
          for (int64_t ow = 0; ow < p.out_w; ++ow) dst_row[ow] = std::max(src_row[ow], 0.0f);
        } else {
          std::memcpy(dst_row, src_row, p.out_w * sizeof(float));
        }
      }
    };
    for (int64_t task = begin; task < end;) {
      const int64_t n = task / row_blocks;
      const int64_t task_end = chunked ? std::min(end, (n + 1) * row_blocks) : task + 1;
      const int64_t first = (task % row_blocks) * block;
      const int64_t last = std::min(rows, ((task_end - 1) % row_blocks + 1) * block);
      const float* image = packed + n * p.image();
      for (int64_t k = 0; k < chunk_count; ++k)
        for (int64_t r = first; r < last; ++r) {
          const int32_t from = chunked ? chunks->begin(r, k) : row_ptr[r];
          const int32_t to = chunked ? chunks->begin(r, k + 1) : row_ptr[r + 1];
          if (k == 0 || to > from)
            gather_row(image, taps.at(from), to - from, bias ? bias[r] : 0.0f, k > 0,
                       wide.data() + (r - first) * length, length);
        }
      for (int64_t b = first; b < last; b += block)
        write_block(n, b, std::min(block, last - b), wide.data() + (b - first) * length);
      task = task_end;
    }
  });
}

}  // namespace wide

namespace batch_inner {

// Batch-innermost sparse convolution for small feature maps (after SparseProp, ICML 2023): with 4x4 or 2x2 maps the
// wide layout wastes most of every vector on discarded columns, so the vectors run over images instead. Input is
// packed as [batch blocks][C][Hp][Wp][images] (zero padded, missing images zero). A register block is always four
// vectors: one output position for a block of four vectors of images, or two positions for a block of two vectors
// (the narrow block, taken where it leaves fewer empty lanes: a batch of 16 with 8-float vectors would otherwise
// fill half of a 32-image block with zeros and compute on them).
//
// The vectors here are at most 8 floats wide (ymm with AVX-512VL): 16-float vectors would double both blocks and
// their waste at the batch sizes this path takes (16 and up). The baseline's 4-float vectors make its blocks 8 and
// 16 images.
constexpr int64_t kVectorBytes = PTD_ISA_VECTOR_BYTES < 32 ? PTD_ISA_VECTOR_BYTES : 32;
typedef float vec __attribute__((vector_size(kVectorBytes)));
constexpr int64_t kLanes = kVectorBytes / sizeof(float);
constexpr int64_t kNarrowImages = 2 * kLanes, kWideImages = 4 * kLanes;

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline vec broadcast(float x) { return wide::broadcast_as<vec>(x); }

// Images per batch block for a batch: the narrow block where it pads the batch less, else the wide one.
inline int64_t images_per_block(int64_t batch) {
  const auto padded = [batch](int64_t images) { return (batch + images - 1) / images * images; };
  return padded(kNarrowImages) < padded(kWideImages) ? kNarrowImages : kWideImages;
}

struct Geometry {
  int64_t channels, padded_h, padded_w, images;  // images per batch block: kNarrowImages or kWideImages
  int64_t block() const { return channels * padded_h * padded_w * images; }  // floats per batch block
  int64_t blocks(int64_t batch) const { return (batch + images - 1) / images; }
  int32_t tap_offset(int64_t channel, int64_t tap_h, int64_t tap_w) const {
    return static_cast<int32_t>(((channel * padded_h + tap_h) * padded_w + tap_w) * images);
  }
};

inline bool fits_int32(const Geometry& p) { return p.block() < (int64_t{1} << 31); }

// Zeroes what packing leaves unwritten in one channel's plane [Hp][Wp][images]: the padding rows and columns, and
// the images past `present` of a partial last batch block. Zeroing whole planes first would write most of a small
// map's packed input twice (a 2x2 map's interior is a quarter of its 4x4 plane).
inline void zero_padding(float* plane, int64_t in_h, int64_t in_w, int64_t pad_h, int64_t pad_w, int64_t present,
                         const Geometry& p) {
  const int64_t row = p.padded_w * p.images;
  std::fill(plane, plane + pad_h * row, 0.0f);
  std::fill(plane + (pad_h + in_h) * row, plane + p.padded_h * row, 0.0f);
  for (int64_t h = pad_h; h < pad_h + in_h; ++h) {
    float* line = plane + h * row;
    std::fill(line, line + pad_w * p.images, 0.0f);
    std::fill(line + (pad_w + in_w) * p.images, line + row, 0.0f);
    if (present < p.images)
      for (int64_t w = pad_w; w < pad_w + in_w; ++w)
        std::fill(line + w * p.images + present, line + (w + 1) * p.images, 0.0f);
  }
}

// Packs images [N, C, H, W] laid out as `src_layout` into [batch blocks][C][Hp][Wp][images] (see above).
inline at::Tensor pack(const float* src, const wide::Layout& src_layout, int64_t batch, int64_t in_h, int64_t in_w,
                       int64_t pad_h, int64_t pad_w, const Geometry& p) {
  const int64_t blocks = p.blocks(batch), images = p.images, step = src_layout.position;
  at::Tensor packed = cpu_isa::packing_buffer(blocks * p.block());
  float* base = packed.mutable_data_ptr<float>();
  const int64_t plane = p.padded_h * p.padded_w * images;
  if (step != 1) {  // NHWC: as wide::pack_images_nhwc, a block of channels per task, each position one cache line
    const int64_t channel_blocks = (p.channels + wide::kChannelBlock - 1) / wide::kChannelBlock;
    at::parallel_for(0, blocks * channel_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t nb = task / channel_blocks, first = (task % channel_blocks) * wide::kChannelBlock;
        const int64_t count = std::min(wide::kChannelBlock, p.channels - first);
        const int64_t present = std::min(images, batch - nb * images);
        float* block_dst = base + (nb * p.channels + first) * plane;
        for (int64_t c = 0; c < count; ++c) zero_padding(block_dst + c * plane, in_h, in_w, pad_h, pad_w, present, p);
        // Images innermost: the block's planes take each position's images as one contiguous run. kLanes images x
        // kLanes channels of a position are one transpose (a 2x2 map's input, packed element by element, takes as
        // long as its 512-channel layer's taps at density 0.045, batch 64).
        const int64_t vector_images = present / wide::kLanes * wide::kLanes;
        const int64_t vector_channels = count / wide::kLanes * wide::kLanes;
        for (int64_t h = 0; h < in_h; ++h)
          for (int64_t w = 0; w < in_w; ++w) {
            float* to = block_dst + ((h + pad_h) * p.padded_w + w + pad_w) * images;
            const float* from = src + src_layout.plane(nb * images, first) + (h * in_w + w) * step;
            for (int64_t i0 = 0; i0 < vector_images; i0 += wide::kLanes)
              for (int64_t c0 = 0; c0 < vector_channels; c0 += wide::kLanes) {
                wide::vec r[wide::kLanes];
                for (int i = 0; i < wide::kLanes; ++i) r[i] = wide::load(from + (i0 + i) * src_layout.image + c0);
                wide::transpose(r);
                for (int c = 0; c < wide::kLanes; ++c) wide::store(to + (c0 + c) * plane + i0, r[c]);
              }
            for (int64_t i = 0; i < present; ++i)
              for (int64_t c = i < vector_images ? vector_channels : 0; c < count; ++c)
                to[c * plane + i] = from[i * src_layout.image + c];
          }
      }
    });
    return packed;
  }
  // NCHW: a task is a batch block's plane of one channel. kLanes images x kLanes consecutive positions of the plane
  // are one transpose into each position's run of images (a whole cache line with 16 lanes: written, never read); the
  // rest element by element, into a plane zeroed first, so those scattered writes find their lines in cache.
  const int64_t positions = in_h * in_w, vector_positions = positions / wide::kLanes * wide::kLanes;
  const auto packed_at = [&](int64_t q) { return ((q / in_w + pad_h) * p.padded_w + q % in_w + pad_w) * images; };
  at::parallel_for(0, blocks * p.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nb = task / p.channels, c = task % p.channels;
      const int64_t present = std::min(images, batch - nb * images);
      const int64_t vector_images = present / wide::kLanes * wide::kLanes;
      float* dst = base + task * plane;
      if (vector_images == present && vector_positions == positions)
        zero_padding(dst, in_h, in_w, pad_h, pad_w, present, p);
      else
        std::fill(dst, dst + plane, 0.0f);
      const float* block_src = src + src_layout.plane(nb * images, c);
      for (int64_t q0 = 0; q0 < vector_positions; q0 += wide::kLanes)
        for (int64_t i0 = 0; i0 < vector_images; i0 += wide::kLanes) {
          wide::vec r[wide::kLanes];
          for (int i = 0; i < wide::kLanes; ++i) r[i] = wide::load(block_src + (i0 + i) * src_layout.image + q0);
          wide::transpose(r);
          for (int j = 0; j < wide::kLanes; ++j) wide::store(dst + packed_at(q0 + j) + i0, r[j]);
        }
      for (int64_t i = 0; i < present; ++i)
        for (int64_t q = i < vector_images ? vector_positions : 0; q < positions; ++q)
          dst[packed_at(q) + i] = block_src[i * src_layout.image + q];
    }
  });
  return packed;
}

// NCHW images (grad_output and the weight gradient's operands).
inline at::Tensor pack(const float* src, int64_t batch, int64_t in_h, int64_t in_w, int64_t pad_h, int64_t pad_w,
                       const Geometry& p) {
  return pack(src, wide::Layout::nchw(p.channels, in_h * in_w), batch, in_h, in_w, pad_h, pad_w, p);
}

// Offset in a batch block of every output position's input window, computed once per call so the inner loops divide
// nothing.
inline std::vector<int64_t> windows(const Geometry& p, int64_t out_h, int64_t out_w, int64_t stride_h,
                                    int64_t stride_w) {
  std::vector<int64_t> offsets(out_h * out_w);
  for (int64_t oh = 0; oh < out_h; ++oh)
    for (int64_t ow = 0; ow < out_w; ++ow)
      offsets[oh * out_w + ow] = (oh * stride_h * p.padded_w + ow * stride_w) * p.images;
  return offsets;
}

// One sparse row over one batch block with kVectors vectors of images per position: the four accumulators hold
// 4 / kVectors positions. tile [positions][images] receives the result.
template <int kVectors, typename Taps>
inline void row_block(const float* block, const int64_t* windows, int64_t positions, Taps taps,
                      int64_t count, float init, bool relu, float* tile) {
  constexpr int kPositions = 4 / kVectors;
  constexpr int64_t kImages = kVectors * kLanes;
  const auto finish = [relu](vec a) {
    const vec zero{};
    return relu ? (a > zero ? a : zero) : a;
  };
  int64_t q = 0;
  for (; q + kPositions <= positions; q += kPositions) {
    const float* at[kPositions];
    for (int i = 0; i < kPositions; ++i) at[i] = block + windows[q + i];
    vec a[4];
    for (int k = 0; k < 4; ++k) a[k] = broadcast(init);
    for (int64_t t = 0; t < count; ++t) {
      const vec v = broadcast(taps.value(t));
      const int32_t offset = taps.offset(t);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) a[k] += v * load(at[k / kVectors] + offset + (k % kVectors) * kLanes);
    }
    for (int k = 0; k < 4; ++k) store(tile + q * kImages + k * kLanes, finish(a[k]));
  }
  for (; q < positions; ++q) {  // the last position when two share a register block and the count is odd
    const float* at = block + windows[q];
    vec a[kVectors];
    for (int k = 0; k < kVectors; ++k) a[k] = broadcast(init);
    for (int64_t t = 0; t < count; ++t) {
      const vec v = broadcast(taps.value(t));
      for (int k = 0; k < kVectors; ++k) a[k] += v * load(at + taps.offset(t) + k * kLanes);
    }
    for (int k = 0; k < kVectors; ++k) store(tile + q * kImages + k * kLanes, finish(a[k]));
  }
}

// out[n, r, oh, ow] = bias[r] + sum over taps of row r of value * input window, for every image n (out laid out as
// `out_layout`).
template <typename Taps>
inline void sparse_rows(const float* packed, const Geometry& p, Taps taps,
                        const int32_t* row_ptr, int64_t rows, int64_t batch, int64_t out_h, int64_t out_w,
                        int64_t stride_h, int64_t stride_w, const float* bias, bool relu,
                        const wide::Layout& out_layout, float* out) {
  const int64_t blocks = p.blocks(batch), positions = out_h * out_w, images = p.images;
  const std::vector<int64_t> offsets = windows(p, out_h, out_w, stride_h, stride_w);
  at::parallel_for(0, blocks * rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(positions * images);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nb = task / rows, r = task % rows;
      const float* block = packed + nb * p.block();
      const Taps row_taps = taps.at(row_ptr[r]);
      const int64_t count = row_ptr[r + 1] - row_ptr[r];
      const float init = bias ? bias[r] : 0.0f;
      if (images == kNarrowImages)
        row_block<2>(block, offsets.data(), positions, row_taps, count, init, relu, tile.data());
      else
        row_block<4>(block, offsets.data(), positions, row_taps, count, init, relu, tile.data());
      for (int64_t i = 0; i < images && nb * images + i < batch; ++i) {
        float* plane = out + out_layout.plane(nb * images + i, r);
        for (int64_t q = 0; q < positions; ++q) plane[q * out_layout.position] = tile[q * images + i];
      }
    }
  });
}

// sum over positions of <grad_output vectors, the tap's input window> for one entry (block already offset by the
// tap), kVectors vectors of images per position; with two, alternate positions go to two accumulator pairs so four
// chains stay in flight.
template <int kVectors>
inline float entry_dot(const float* block, const float* grad_plane, const int64_t* windows, int64_t positions) {
  constexpr int kPositions = 4 / kVectors;
  constexpr int64_t kImages = kVectors * kLanes;
  vec a[4] = {};
  int64_t q = 0;
  for (; q + kPositions <= positions; q += kPositions)
    for (int k = 0; k < 4; ++k) {
      const int64_t position = q + k / kVectors, lane = (k % kVectors) * kLanes;
      a[k] += load(grad_plane + position * kImages + lane) * load(block + windows[position] + lane);
    }
  for (; q < positions; ++q)
    for (int k = 0; k < kVectors; ++k)
      a[k] += load(grad_plane + q * kImages + k * kLanes) * load(block + windows[q] + k * kLanes);
  const vec sum = (a[0] + a[1]) + (a[2] + a[3]);
  float total = 0;
  for (int i = 0; i < kLanes; ++i) total += sum[i];
  return total;
}

// grad[e] += sum over images and output positions of grad_output[n, r(e), pos] * input[n, window of tap e at pos].
// packed_grad is grad_output packed by pack() with no padding and the same images per block:
// [blocks][rows][out_h][out_w][images]. Each task owns a range of rows (so its entries); batch blocks run outermost
// inside it so one input block stays in cache.
template <typename Taps>
inline void grad_values(const float* packed_input, const Geometry& p, const float* packed_grad,
                        Taps taps, const int32_t* row_ptr, int64_t rows, int64_t batch,
                        int64_t out_h, int64_t out_w, int64_t stride_h, int64_t stride_w, float* grad) {
  const int64_t blocks = p.blocks(batch), positions = out_h * out_w;
  const std::vector<int64_t> offsets = windows(p, out_h, out_w, stride_h, stride_w);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::fill(grad + row_ptr[begin], grad + row_ptr[end], 0.0f);
    for (int64_t nb = 0; nb < blocks; ++nb) {
      const float* block = packed_input + nb * p.block();
      for (int64_t r = begin; r < end; ++r) {
        const float* grad_plane = packed_grad + (nb * rows + r) * positions * p.images;
        for (int32_t e = row_ptr[r]; e < row_ptr[r + 1]; ++e) {
          const float* tap_block = block + taps.offset(e);
          grad[e] += p.images == kNarrowImages ? entry_dot<2>(tap_block, grad_plane, offsets.data(), positions)
                                               : entry_dot<4>(tap_block, grad_plane, offsets.data(), positions);
        }
      }
    }
  });
}

}  // namespace batch_inner
