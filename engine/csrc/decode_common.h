// What the two paged decode attention kernels share: launch parameters and how a thread block finds
// its share of the work; and, for the CUDA-core kernel, the per-head softmax statistics and the
// cross-warp merge that writes the result. Device code: include it from .cu files only.
//
// A block takes (sequence, KV head, chunk of up to HEADS query heads of its group, partition of the
// visible context), and keeps the partition's block-table slice in shared memory. The CUDA-core
// kernel's shared memory starts with `scratch` (scores [HEADS][partition_size], reused for per-warp
// partial outputs [kNumWarps][HEADS][head_dim]); the tensor-core kernel's with its load pipeline.
#pragma once

#include <cfloat>
#include <cstdint>

#include "vector_io.h"

namespace porter {

constexpr int kNumThreads = 128;
constexpr int kNumWarps = kNumThreads / 32;

struct DecodeParams {
  void* out;                  // [num_seqs, num_heads, head_dim], written directly when max_partitions == 1
  float* partial_out;         // [num_seqs, num_heads, max_partitions, head_dim]
  float* partial_max;         // [num_seqs, num_heads, max_partitions]
  float* partial_sum;         // [num_seqs, num_heads, max_partitions]
  const void* query;          // [num_seqs, num_heads, head_dim], last dim contiguous
  const void* key_cache;      // [num_blocks, block_size, num_kv_heads, head_dim], contiguous
  const void* value_cache;    // same
  const int* block_tables;    // [num_seqs, max_blocks_per_seq]
  const int* context_lens;    // [num_seqs]
  const float* alibi_slopes;  // [num_heads] or nullptr
  const float* sinks;         // [num_heads] attention-sink logits, or nullptr
  // Split-K merged in the attention kernel itself (the tensor-core kernel): one arrival counter per
  // (sequence, blockIdx.x), zero between launches; nullptr when a separate merge kernel runs.
  int* merge_counters;
  int64_t query_stride_token;
  int64_t query_stride_head;
  int num_heads;
  int num_kv_heads;
  int max_blocks_per_seq;
  int block_size_log2;
  int partition_size;
  int max_partitions;
  int scratch_floats;  // floats of shared scratch before the block-number table
  int sliding_window;  // 0 = none
  float scale;
  float soft_cap;  // 0 = none
};

// First KV index visible to the sequence's query token, and how many follow it (the last is context_len-1).
__device__ __forceinline__ void visible_range(const DecodeParams& p, int context_len, int* start, int* span) {
  *start = p.sliding_window > 0 ? max(0, context_len - p.sliding_window) : 0;
  *span = context_len - *start;
}

struct DecodeBlock {
  int seq;
  int partition;
  int kv_head;
  int first_head;    // first query head of this block
  int active_heads;  // query heads of this block that exist (<= HEADS)
  int query_pos;     // KV index of the query token
  int token_begin;   // KV index of the partition's first token
  int num_tokens;    // tokens in this partition
  int first_block;   // logical block of token_begin
  int num_partitions;  // partitions of this sequence that have work
};

// Copies n block-table entries to shared memory, every load of a thread issued before its first store.
__device__ __forceinline__ void copy_table_slice(int* block_numbers, const int* table, int n) {
  constexpr int kBatch = 4;
  const int stride = static_cast<int>(blockDim.x);
  for (int base = threadIdx.x; base < n; base += kBatch * stride) {
    int entry[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) entry[k] = base + k * stride < n ? table[base + k * stride] : 0;
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      if (base + k * stride < n) block_numbers[base + k * stride] = entry[k];
    }
  }
}

// Works out the block's share; false when it has nothing to do (past the context, or an empty sequence,
// which gets zeros so a padded slot of a captured batch never reads garbage). Copies the partition's
// block-table slice to `block_numbers`; the caller must __syncthreads() before reading it.
template <typename T, int HEAD_DIM, int HEADS>
__device__ bool plan_decode_block(const DecodeParams& p, DecodeBlock& b, int* block_numbers) {
  b.seq = blockIdx.y;
  b.partition = blockIdx.z;
  const int group_size = p.num_heads / p.num_kv_heads;
  const int chunks = (group_size + HEADS - 1) / HEADS;
  b.kv_head = blockIdx.x / chunks;
  const int first_in_group = (blockIdx.x % chunks) * HEADS;
  b.first_head = b.kv_head * group_size + first_in_group;
  b.active_heads = min(HEADS, group_size - first_in_group);

  // Without a sliding window the partition's slice of the block table does not depend on the context
  // length: fetch it while the length is still on its way, one round trip to memory instead of two.
  const int context_len = p.context_lens[b.seq];
  const int* table_row = p.block_tables + (int64_t)b.seq * p.max_blocks_per_seq;
  const bool prefetched = p.sliding_window == 0;
  if (prefetched) {
    const int first = (b.partition * p.partition_size) >> p.block_size_log2;
    const int last = min(((b.partition + 1) * p.partition_size - 1) >> p.block_size_log2, p.max_blocks_per_seq - 1);
    copy_table_slice(block_numbers, table_row + first, last - first + 1);
  }
  int window_start, span;
  visible_range(p, context_len, &window_start, &span);
  if (span <= 0) {
    // Nobody merges an empty sequence's partitions in-kernel, so partition 0 writes the zeros then too.
    if (b.partition == 0 && (p.max_partitions == 1 || p.merge_counters != nullptr)) {
      T* out = static_cast<T*>(p.out) + ((int64_t)b.seq * p.num_heads + b.first_head) * HEAD_DIM;
      for (int i = threadIdx.x; i < b.active_heads * HEAD_DIM; i += blockDim.x) out[i] = from_float<T>(0.f);
    }
    return false;
  }
  if (b.partition * p.partition_size >= span) return false;
  // Bounded by the grid, so a context longer than the caller's max_context_len truncates this call
  // instead of leaving a merge counter that never completes (and poisons the next launch).
  b.num_partitions = min((span + p.partition_size - 1) / p.partition_size, p.max_partitions);
  b.query_pos = context_len - 1;
  b.token_begin = window_start + b.partition * p.partition_size;
  b.num_tokens = min(p.partition_size, span - b.partition * p.partition_size);
  b.first_block = b.token_begin >> p.block_size_log2;
  if (!prefetched) {
    const int num_entries = ((b.token_begin + b.num_tokens - 1) >> p.block_size_log2) - b.first_block + 1;
    copy_table_slice(block_numbers, table_row + b.first_block, num_entries);
  }
  return true;
}

// Cache row (physical block * block_size + offset) of the partition's t-th token.
__device__ __forceinline__ int64_t cache_row(const DecodeParams& p, const DecodeBlock& b, const int* block_numbers,
                                             int t) {
  const int token = b.token_begin + t;
  return ((int64_t)block_numbers[(token >> p.block_size_log2) - b.first_block] << p.block_size_log2) |
         (token & ((1 << p.block_size_log2) - 1));
}

// Score of a raw (scale-free) q.k: scaled, ALiBi-biased, then soft-capped, as the reference does.
__device__ __forceinline__ float finish_score(const DecodeParams& p, float dot, float scale, float slope,
                                              float key_minus_query) {
  float s = fmaf(slope, key_minus_query, dot * scale);
  if (p.soft_cap > 0.f) s = p.soft_cap * tanhf(s / p.soft_cap);
  return s;
}

// What head `head`'s sink logit adds to a softmax denominator whose scores have max m: exp(sink - m),
// a term with no value row, so the tokens' weights sum to less than one. 0 without sinks. Added once,
// where the final output is normalised (one partition, or the split-K merge), never per partition.
__device__ __forceinline__ float sink_mass(const DecodeParams& p, int head, float m) {
  return p.sinks == nullptr ? 0.f : __expf(p.sinks[head] - m);
}

// Per head: max and sum of exp over the partition's scores, which become exp(score - max) in place.
__device__ inline void softmax_stats(float* scores, int partition_size, int num_tokens, int heads, float* head_max,
                              float* head_sum) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int h = warp; h < heads; h += kNumWarps) {
    float* row = scores + h * partition_size;
    float m = -FLT_MAX;
    for (int t = lane; t < num_tokens; t += 32) m = fmaxf(m, row[t]);
    m = warp_max(m);
    float sum = 0.f;
    for (int t = lane; t < num_tokens; t += 32) {
      const float e = __expf(row[t] - m);
      row[t] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      head_max[h] = m;
      head_sum[h] = sum;
    }
  }
}

// Stores element (head slot h, dim d) of a block's result: the output itself when the context is
// one partition, else this partition's normalised output and, once per head, its max and sum of exp.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void store_block_result(const DecodeParams& p, const DecodeBlock& b, int h, int d,
                                                   float value, float head_max, float head_sum) {
  const int64_t row = (int64_t)b.seq * p.num_heads + b.first_head + h;
  if (p.max_partitions == 1) {
    // value = numerator / head_sum; the sink joins the denominator (an overflowing exp gives 0, its limit).
    if (p.sinks != nullptr) value *= head_sum / (head_sum + sink_mass(p, b.first_head + h, head_max));
    static_cast<T*>(p.out)[row * HEAD_DIM + d] = from_float<T>(value);
    return;
  }
  const int64_t part_row = row * p.max_partitions + b.partition;
  p.partial_out[part_row * HEAD_DIM + d] = value;
  if (d == 0) {
    p.partial_max[part_row] = head_max;
    p.partial_sum[part_row] = head_sum;
  }
}

// Adds the per-warp partial outputs in `scratch` ([kNumWarps][HEADS][HEAD_DIM]) and writes either the
// final output (one partition) or this partition's normalised output, max and sum for the merge kernel.
template <typename T, int HEAD_DIM, int HEADS>
__device__ void write_block_output(const DecodeParams& p, const DecodeBlock& b, const float* scratch,
                                   const float* head_max, const float* head_sum) {
  for (int idx = threadIdx.x; idx < b.active_heads * HEAD_DIM; idx += kNumThreads) {
    const int h = idx / HEAD_DIM;
    const int d = idx % HEAD_DIM;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) sum += scratch[(w * HEADS + h) * HEAD_DIM + d];
    store_block_result<T, HEAD_DIM>(p, b, h, d, sum / head_sum[h], head_max[h], head_sum[h]);
  }
}

// The tensor-core kernel (fp16/bf16), in paged_decode_attention_mma.cu. It takes 8 query heads per
// block, runs 4 or 8 warps per block (`warps`; 8 only at head_dim <= 128), needs `table_bytes` of
// shared memory for the partition's block numbers on top of its own pipeline, and merges split-K
// partitions itself (p.merge_counters).
void launch_paged_decode_mma(const DecodeParams& p, bool bfloat16, int head_dim, int warps, dim3 grid,
                             size_t table_bytes, cudaStream_t stream);
// Shared memory left for the block-number table on the current device.
size_t mma_max_table_bytes(int head_dim, int warps);
// Resident blocks per multiprocessor on the current device.
int mma_blocks_per_multiprocessor(int head_dim, int warps, size_t table_bytes);

}  // namespace porter
