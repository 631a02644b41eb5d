// Each row's taps split into chunks of consecutive input channels, so that a chunk's inputs stay in cache while
// every row of a task reads them: the tiled forward (tiled_conv_f32.h forward_tiles) and the wide forward
// (wide_conv_f32.h sparse_rows) pass over the chunks outermost, each row's accumulators stored and reloaded between
// chunks.
//
// Compiled once per instruction set, like the kernels that read it: included only by csrc/cpu/isa/kernels_body.h.
#ifndef PTD_ISA_VECTOR_BYTES
#error "channel_chunks.h is compiled per instruction set: include csrc/cpu/isa/kernels_body.h instead"
#endif

// Each row's taps split at input-channel boundaries into `count` chunks of consecutive taps: chunk k of row r is
// taps [ptr[r * (count + 1) + k], ptr[r * (count + 1) + k + 1]). See the file's comment.
struct ChannelChunks {
  int64_t count;
  std::vector<int32_t> ptr;
  int32_t begin(int64_t row, int64_t chunk) const { return ptr[row * (count + 1) + chunk]; }
};

// The chunks of `channels_per_chunk` input channels. key_of(e): a key of tap e that ascends with its input channel,
// key / keys_per_channel being the channel (the forward's column index, keys_per_channel = KH * KW; the data
// gradient's input channel itself, 1): each boundary compares keys against k * channels_per_chunk * keys_per_channel,
// where dividing every probed column by KH * KW took half of this pass. Each boundary is a binary search within the
// row, from the previous boundary on: taps ascend by channel within a row (the CSR order, and the transposed view's);
// were they not, the boundaries would still split each row into consecutive ranges that cover it once, so only the
// cache reuse, never the sum, depends on the order. One chunk is the rows themselves.
template <typename KeyOf>
inline ChannelChunks channel_chunks(const int32_t* row_ptr, int64_t rows, int64_t channels, int64_t channels_per_chunk,
                                    KeyOf key_of, int64_t keys_per_channel) {
  const int64_t count = (channels + channels_per_chunk - 1) / channels_per_chunk;
  ChannelChunks chunks{count, std::vector<int32_t>(rows * (count + 1))};
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int32_t* ptr = chunks.ptr.data() + r * (count + 1);
      ptr[0] = row_ptr[r];
      for (int64_t k = 1; k < count; ++k) {
        // The first tap at or past channel k * channels_per_chunk, by a binary search whose steps select instead of
        // branch (half of the comparisons would be mispredicted).
        const int64_t first_key = k * channels_per_chunk * keys_per_channel;
        int32_t low = ptr[k - 1], length = row_ptr[r + 1] - low;
        while (length > 0) {
          const int32_t half = length / 2;
          const bool below = key_of(low + half) < first_key;
          low = below ? low + half + 1 : low;
          length = below ? length - half - 1 : half;
        }
        ptr[k] = low;
      }
      ptr[count] = row_ptr[r + 1];
    }
  });
  return chunks;
}
