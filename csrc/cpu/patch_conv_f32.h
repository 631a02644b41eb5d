// The forward of the sparse convolution for a few images on small maps ("patch" path): the input unrolled into one
// row of patches per weight column, and each sparse row a sum of the rows its taps name.
//
// At batch 1 a 4x4 map's wide row (wide_conv_f32.h) is 4 x 6 columns, 16 of them kept: half of every vector is
// discarded, a quarter at 2x2, and each tap's offset is looked up in a table before its input can be loaded. Here
// patches[column][q], q = image * OH * OW + output position, holds the input that weight column (c, kh, kw) meets at
// output q (zero in the padding), so a tap's input is the row at `column * pitch`: contiguous, every lane an output.
// The rows are as long as the call's outputs (rounded up to a vector), so the path is taken where they are short
// enough that one pass of wide::gather_row holds a whole row in registers: building the patches writes
// C_in * KH * KW of them, small beside the nonzeros' work only while each is read by many taps.
//
// Compiled once per instruction set, like wide_conv_f32.h: included by csrc/cpu/isa/kernels_body.h after it.
#ifndef PTD_ISA_VECTOR_BYTES
#error "patch_conv_f32.h is compiled per instruction set: include csrc/cpu/isa/kernels_body.h instead"
#endif

namespace patches {

using wide::kLanes;

// Where a tap's row of patches starts: its column times the row pitch (no table: one multiply).
template <typename Index>
struct ColumnTaps {
  const Index* columns;  // col_idx, int32 or (the compact inference form) int16
  const float* values;
  int64_t pitch;
  int32_t offset(int64_t t) const { return static_cast<int32_t>(columns[t] * pitch); }
  float value(int64_t t) const { return values[t]; }
  ColumnTaps at(int64_t first) const { return {columns + first, values + first, pitch}; }
};

// A call's rows: `outputs` = images * OH * OW floats of patches each, `pitch` floats apart (outputs rounded up to 4,
// so a 2x2 map at batch 1 packs 4 floats a column, not a vector of 16), summed over `length` floats (outputs rounded
// up to a vector): a sum's lanes past `outputs` read the next rows' patches, or the zero slack after the last, and
// are never written out.
struct Rows {
  int64_t outputs, pitch, length;
  static Rows of(int64_t batch, int64_t positions) {
    const int64_t outputs = batch * positions;
    return {outputs, wide::round_up(outputs, 4), wide::round_up(outputs, kLanes)};
  }
};

// Where each output position q of tap t = kh * KW + kw reads its input plane: source[t * OH * OW + q] = ih * W + iw,
// or -1 in the padding. Built once per call (taps x positions entries), so that packing a column is one lookup per
// element: no bounds checks, no index arithmetic.
inline std::vector<int32_t> tap_sources(const ConvGeometry& g) {
  const int64_t positions = g.out_h * g.out_w;
  std::vector<int32_t> source(g.taps() * positions);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh)
    for (int64_t kw = 0; kw < g.kernel_w; ++kw)
      for (int64_t oh = 0; oh < g.out_h; ++oh)
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dil_h, iw = ow * g.stride_w - g.pad_w + kw * g.dil_w;
          const bool inside = ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w;
          source[(kh * g.kernel_w + kw) * positions + oh * g.out_w + ow] =
              inside ? static_cast<int32_t>(ih * g.in_w + iw) : -1;
        }
  return source;
}

// patches [columns][pitch] of the input x laid out as `layout` ([N, C, H, W] logically), for a convolution of
// geometry g, then kLanes zeros. Column c * KH * KW + t is filled from channel c's plane of each image through
// tap_sources. A task is a block of input channels: one channel in NCHW, whose planes are read in place; kChannelBlock
// channels in NHWC, whose planes are first transposed into the task's buffer, each input position read as one run of
// channels (column by column, every element of a 512-channel map was a load from a line of its own: the pack then
// took as long as the taps' sums at batch 1 on 4x4 maps).
inline at::Tensor pack(const float* x, const wide::Layout& layout, const ConvGeometry& g, const Rows& rows) {
  const int64_t taps = g.taps(), positions = g.out_h * g.out_w, plane = g.in_h * g.in_w;
  const int64_t columns = g.in_channels * taps;
  at::Tensor packed = cpu_isa::packing_buffer(columns * rows.pitch + kLanes);
  float* base = packed.mutable_data_ptr<float>();
  std::fill(base + columns * rows.pitch, base + columns * rows.pitch + kLanes, 0.0f);
  const std::vector<int32_t> sources = tap_sources(g);
  const bool channels_last = layout.position != 1;
  const int64_t block = channels_last ? wide::kChannelBlock : 1;
  const int64_t blocks = (g.in_channels + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, 4096 / (block * taps * rows.pitch));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> planes(channels_last ? block * plane : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * block, count = std::min(block, g.in_channels - c0);
      for (int64_t n = 0; n < g.batch; ++n) {
        if (channels_last)
          for (int64_t i = 0; i < plane; ++i) {
            const float* at = x + layout.plane(n, c0) + i * layout.position;
            for (int64_t k = 0; k < count; ++k) planes[k * plane + i] = at[k];
          }
        for (int64_t k = 0; k < count; ++k) {
          const float* in = channels_last ? planes.data() + k * plane : x + layout.plane(n, c0 + k);
          for (int64_t t = 0; t < taps; ++t) {
            const int32_t* source = sources.data() + t * positions;
            float* dst = base + ((c0 + k) * taps + t) * rows.pitch + n * positions;
            for (int64_t q = 0; q < positions; ++q) dst[q] = source[q] >= 0 ? in[source[q]] : 0.0f;
          }
        }
      }
      for (int64_t column = c0 * taps; column < (c0 + count) * taps; ++column)
        std::fill(base + column * rows.pitch + rows.outputs, base + (column + 1) * rows.pitch, 0.0f);
    }
  });
  return packed;
}

// out[n, r] = relu?(bias[r] + sum over row r's taps of value * patches row) for every image n and row r, out laid
// out as `out_layout`. A task is a row (NCHW) or a block of kChannelBlock rows (NHWC, so each output position is
// written as one run of channels), as in wide::sparse_rows.
template <typename Index>
inline void forward(const float* packed, const Rows& patch_rows, const Index* columns, const float* values,
                    const int32_t* row_ptr, int64_t rows, int64_t batch, int64_t positions, const float* bias,
                    bool relu, const wide::Layout& out_layout, float* out) {
  const int64_t length = patch_rows.length;
  const ColumnTaps<Index> taps{columns, values, patch_rows.pitch};
  const int64_t block = out_layout.position == 1 ? 1 : wide::kChannelBlock;
  const int64_t row_blocks = (rows + block - 1) / block;
  at::parallel_for(0, row_blocks, std::max<int64_t>(1, 4096 / (block * length)), [&](int64_t begin, int64_t end) {
    std::vector<float> sums(block * length);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = task * block, count = std::min(block, rows - first);
      for (int64_t k = 0; k < count; ++k)
        wide::gather_row(packed, taps.at(row_ptr[first + k]), row_ptr[first + k + 1] - row_ptr[first + k],
                         bias ? bias[first + k] : 0.0f, false, sums.data() + k * length, length);
      for (int64_t n = 0; n < batch; ++n) {
        float* dst = out + out_layout.plane(n, first);
        for (int64_t q = 0; q < positions; ++q)
          for (int64_t k = 0; k < count; ++k) {
            const float value = sums[k * length + n * positions + q];
            dst[q * out_layout.position + k * out_layout.channel] = relu ? std::max(value, 0.0f) : value;
          }
      }
    }
  });
}

}  // namespace patches
