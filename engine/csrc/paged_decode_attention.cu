// Paged decode attention: one new query token per sequence, attending over its paged KV cache.
//
// Work split (see decode_common.h). One thread block takes (sequence, KV head, partition of the
// context) and serves every query head of that KV head's group (up to 8 per block), so each K/V
// vector is read from memory once however large the GQA group. Long contexts are cut into partitions
// of `partition_size` tokens (split-K): each block writes its partial max / sum / normalised output,
// and the partitions are merged (by a second kernel after the CUDA-core kernel; inside the
// tensor-core kernel, by the last block to finish); with one partition the block writes the output.
// Unless the caller fixes it, the partition length is chosen here from the batch, the context and
// the kernel's occupancy on the device.
//
// Two kernels do the per-block work:
// - fp16/bf16 with >= 2 query heads per KV head, and fp16/bf16 MHA on a grid too small to fill the
//   device without split-K: tensor cores (paged_decode_attention_mma.cu), since on CUDA cores the
//   per-head dot products and shuffles, not memory, would bound the time;
// - otherwise (MHA on large grids, and fp32) the CUDA-core kernel below. A group of
//   kThreadsPerToken threads holds one token's head_dim row (16 bytes per thread per load), so a warp
//   covers kTokensPerWarp tokens per load; kUnroll loads are issued before the first is used to keep
//   enough bytes in flight.
//     Phase 1: scores of every token of the partition for every head -> shared memory.
//     Phase 2: per-head max and sum of exp (one warp per head), in place.
//     Phase 3: weighted sum of V rows, reduced across token groups and warps.
// All softmax arithmetic is fp32. Scores: scale*q.k, + slope*(k_pos - q_pos) with ALiBi, then
// cap*tanh(s/cap) with a soft cap; a sliding window moves the first visible token, so nothing before
// it is read at all.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cfloat>
#include <mutex>

#include "decode_common.h"
#include "vector_io.h"

namespace porter {
namespace {

constexpr int kUnroll = 4;
constexpr int kMaxHeadsPerBlock = 8;
constexpr size_t kMaxSharedBytes = 48 * 1024;

template <typename T, int HEAD_DIM>
struct DecodeLayout {
  static constexpr int kVec = Vec16<T>::kSize;
  static constexpr int kVecsPerRow = HEAD_DIM / kVec;
  static constexpr int kThreadsPerToken = kVecsPerRow < 32 ? kVecsPerRow : 32;
  static constexpr int kVecsPerThread = kVecsPerRow / kThreadsPerToken;
  static constexpr int kTokensPerWarp = 32 / kThreadsPerToken;
  static constexpr int kTokensPerIter = kNumWarps * kTokensPerWarp;
  static_assert(HEAD_DIM % kVec == 0, "head_dim must be a whole number of 16-byte vectors");
};

template <typename T, int HEAD_DIM, int HEADS>
__global__ void __launch_bounds__(kNumThreads) paged_decode_attention_kernel(const DecodeParams p) {
  using L = DecodeLayout<T, HEAD_DIM>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  float* scratch = reinterpret_cast<float*>(shared_raw);
  int* block_numbers = reinterpret_cast<int*>(scratch + p.scratch_floats);
  __shared__ float head_max[HEADS];
  __shared__ float head_sum[HEADS];
  DecodeBlock b;
  if (!plan_decode_block<T, HEAD_DIM, HEADS>(p, b, block_numbers)) return;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int lane_in_token = lane % L::kThreadsPerToken;
  const int warp_token = warp * L::kTokensPerWarp + lane / L::kThreadsPerToken;

  // Query fragments. Heads past the group (when it is not a multiple of HEADS) repeat the last real
  // head; their results are never stored.
  float q[HEADS][L::kVecsPerThread][L::kVec];
  float slope[HEADS];
  const T* query = static_cast<const T*>(p.query) + b.seq * p.query_stride_token;
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    const int head = b.first_head + min(h, b.active_heads - 1);
    slope[h] = p.alibi_slopes != nullptr ? p.alibi_slopes[head] : 0.f;
#pragma unroll
    for (int i = 0; i < L::kVecsPerThread; ++i) {
#pragma unroll
      for (int e = 0; e < L::kVec; ++e) {
        const int d = (lane_in_token + i * L::kThreadsPerToken) * L::kVec + e;
        q[h][i][e] = to_float(query[head * p.query_stride_head + d]);
      }
    }
  }
  __syncthreads();  // block_numbers ready

  const int64_t token_stride = (int64_t)p.num_kv_heads * HEAD_DIM;
  const int64_t head_offset = (int64_t)b.kv_head * HEAD_DIM + lane_in_token * L::kVec;
  const T* key_base = static_cast<const T*>(p.key_cache) + head_offset;
  const T* value_base = static_cast<const T*>(p.value_cache) + head_offset;
  auto load_rows = [&](const T* base, int first, uint4 (&raw)[kUnroll][L::kVecsPerThread]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = first + u * L::kTokensPerIter + warp_token;
      const T* ptr = base + (t < b.num_tokens ? cache_row(p, b, block_numbers, t) * token_stride : 0);
#pragma unroll
      for (int i = 0; i < L::kVecsPerThread; ++i) {
        raw[u][i] = t < b.num_tokens ? load_16_bytes(ptr + i * L::kThreadsPerToken * L::kVec) : make_uint4(0, 0, 0, 0);
      }
    }
  };

  // Phase 1: scores.
  float* scores = scratch;
  for (int first = 0; first < b.num_tokens; first += kUnroll * L::kTokensPerIter) {
    uint4 raw[kUnroll][L::kVecsPerThread];
    load_rows(key_base, first, raw);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float dot[HEADS];
#pragma unroll
      for (int h = 0; h < HEADS; ++h) dot[h] = 0.f;
#pragma unroll
      for (int i = 0; i < L::kVecsPerThread; ++i) {
        float k[L::kVec];
        unpack_to_float(raw[u][i], k, static_cast<const T*>(nullptr));
#pragma unroll
        for (int h = 0; h < HEADS; ++h) {
#pragma unroll
          for (int e = 0; e < L::kVec; ++e) dot[h] = fmaf(q[h][i][e], k[e], dot[h]);
        }
      }
#pragma unroll
      for (int mask = L::kThreadsPerToken / 2; mask > 0; mask >>= 1) {
#pragma unroll
        for (int h = 0; h < HEADS; ++h) dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], mask);
      }
      const int t = first + u * L::kTokensPerIter + warp_token;
      if (lane_in_token == 0 && t < b.num_tokens) {
        const float key_minus_query = static_cast<float>(b.token_begin + t - b.query_pos);
#pragma unroll
        for (int h = 0; h < HEADS; ++h) {
          scores[h * p.partition_size + t] = finish_score(p, dot[h], p.scale, slope[h], key_minus_query);
        }
      }
    }
  }
  __syncthreads();

  // Phase 2: softmax statistics per head; scores become unnormalised probabilities in place.
  softmax_stats(scores, p.partition_size, b.num_tokens, b.active_heads, head_max, head_sum);
  __syncthreads();

  // Phase 3: probabilities times V. Rows of unused head slots hold raw scores; their sums are dropped.
  float acc[HEADS][L::kVecsPerThread][L::kVec];
#pragma unroll
  for (int h = 0; h < HEADS; ++h)
#pragma unroll
    for (int i = 0; i < L::kVecsPerThread; ++i)
#pragma unroll
      for (int e = 0; e < L::kVec; ++e) acc[h][i][e] = 0.f;
  for (int first = 0; first < b.num_tokens; first += kUnroll * L::kTokensPerIter) {
    uint4 raw[kUnroll][L::kVecsPerThread];
    load_rows(value_base, first, raw);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = first + u * L::kTokensPerIter + warp_token;
      if (t >= b.num_tokens) continue;
#pragma unroll
      for (int i = 0; i < L::kVecsPerThread; ++i) {
        float v[L::kVec];
        unpack_to_float(raw[u][i], v, static_cast<const T*>(nullptr));
#pragma unroll
        for (int h = 0; h < HEADS; ++h) {
          const float w = scores[h * p.partition_size + t];
#pragma unroll
          for (int e = 0; e < L::kVec; ++e) acc[h][i][e] = fmaf(w, v[e], acc[h][i][e]);
        }
      }
    }
  }
  // Token groups of a warp hold the same dims for different tokens: add them up.
#pragma unroll
  for (int mask = L::kThreadsPerToken; mask < 32; mask <<= 1)
#pragma unroll
    for (int h = 0; h < HEADS; ++h)
#pragma unroll
      for (int i = 0; i < L::kVecsPerThread; ++i)
#pragma unroll
        for (int e = 0; e < L::kVec; ++e) acc[h][i][e] += __shfl_xor_sync(0xffffffffu, acc[h][i][e], mask);
  __syncthreads();  // every read of the scores is done; the scratch now takes per-warp sums
  if (lane < L::kThreadsPerToken) {
#pragma unroll
    for (int h = 0; h < HEADS; ++h)
#pragma unroll
      for (int i = 0; i < L::kVecsPerThread; ++i)
#pragma unroll
        for (int e = 0; e < L::kVec; ++e) {
          const int d = (lane_in_token + i * L::kThreadsPerToken) * L::kVec + e;
          scratch[(warp * HEADS + h) * HEAD_DIM + d] = acc[h][i][e];
        }
  }
  __syncthreads();
  write_block_output<T, HEAD_DIM, HEADS>(p, b, scratch, head_max, head_sum);
}

// Reduces over the threads of a block; `shared` holds kNumWarps floats.
template <bool kMax>
__device__ float block_reduce(float x, float* shared) {
  x = kMax ? warp_max(x) : warp_sum(x);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = x;
  __syncthreads();
  float result = shared[0];
#pragma unroll
  for (int w = 1; w < kNumWarps; ++w) result = kMax ? fmaxf(result, shared[w]) : result + shared[w];
  __syncthreads();  // the caller may reuse `shared`
  return result;
}

// Merges the partitions of one (sequence, head): out = sum_p w_p * out_p / (sum_p w_p + sink) with
// w_p = sum_p * exp(max_p - max) and sink = exp(sink logit - max) (0 without sinks).
template <typename T>
__global__ void __launch_bounds__(kNumThreads) paged_decode_reduce_kernel(const DecodeParams p, int head_dim) {
  extern __shared__ float weights[];  // [max_partitions]
  __shared__ float reduce_scratch[kNumWarps];
  const int head = blockIdx.x;
  const int seq = blockIdx.y;
  int window_start, span;
  visible_range(p, p.context_lens[seq], &window_start, &span);
  const int num_parts = span > 0 ? min((span + p.partition_size - 1) / p.partition_size, p.max_partitions) : 0;
  const int64_t row = (int64_t)seq * p.num_heads + head;
  const float* maxes = p.partial_max + row * p.max_partitions;
  const float* sums = p.partial_sum + row * p.max_partitions;

  float m = -FLT_MAX;
  for (int i = threadIdx.x; i < num_parts; i += kNumThreads) m = fmaxf(m, maxes[i]);
  m = block_reduce<true>(m, reduce_scratch);
  float total = 0.f;
  for (int i = threadIdx.x; i < num_parts; i += kNumThreads) {
    const float w = sums[i] * __expf(maxes[i] - m);
    weights[i] = w;
    total += w;
  }
  total = block_reduce<false>(total, reduce_scratch);  // its barrier also publishes `weights`
  const float inv_total = total > 0.f ? 1.f / (total + sink_mass(p, head, m)) : 0.f;

  const float* partial = p.partial_out + row * p.max_partitions * head_dim;
  T* out = static_cast<T*>(p.out) + row * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += kNumThreads) {
    float acc = 0.f;
    for (int i = 0; i < num_parts; ++i) acc = fmaf(weights[i], partial[(int64_t)i * head_dim + d], acc);
    out[d] = from_float<T>(acc * inv_total);
  }
}

template <typename T, int HEAD_DIM, int HEADS>
void launch_attention(const DecodeParams& p, dim3 grid, size_t shared_bytes, cudaStream_t stream) {
  paged_decode_attention_kernel<T, HEAD_DIM, HEADS><<<grid, kNumThreads, shared_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// fp16/bf16 reach the CUDA-core kernel only with one query head per KV head (the rest go to tensor
// cores), so only fp32 needs the multi-head instantiations.
template <typename T, int HEAD_DIM>
void launch_for_heads(int heads, const DecodeParams& p, dim3 grid, size_t shared_bytes, cudaStream_t stream) {
  if constexpr (sizeof(T) == 4) {
    switch (heads) {
      case 2: return launch_attention<T, HEAD_DIM, 2>(p, grid, shared_bytes, stream);
      case 4: return launch_attention<T, HEAD_DIM, 4>(p, grid, shared_bytes, stream);
      case 8: return launch_attention<T, HEAD_DIM, 8>(p, grid, shared_bytes, stream);
      default: break;
    }
  }
  TORCH_CHECK(heads == 1, "internal: no CUDA-core decode kernel for ", heads, " heads per block");
  launch_attention<T, HEAD_DIM, 1>(p, grid, shared_bytes, stream);
}

template <typename T>
void launch_core(int head_dim, int heads, const DecodeParams& p, dim3 grid, size_t shared_bytes, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return launch_for_heads<T, 64>(heads, p, grid, shared_bytes, stream);
    case 128: return launch_for_heads<T, 128>(heads, p, grid, shared_bytes, stream);
    default: return launch_for_heads<T, 256>(heads, p, grid, shared_bytes, stream);
  }
}

template <typename T>
void launch_reduce(const DecodeParams& p, int head_dim, int num_seqs, cudaStream_t stream) {
  const dim3 grid(p.num_heads, num_seqs);
  // Whole 16-byte rows plus one spare: the compiler may read the weights as vectors past num_parts
  // (compute-sanitizer caught a 12-byte read of a 2-float array).
  const size_t shared_bytes = ((p.max_partitions + 3) / 4 + 1) * 16;
  paged_decode_reduce_kernel<T><<<grid, kNumThreads, shared_bytes, stream>>>(p, head_dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tensor-core kernel's split-K arrival counters: one int per (sequence, blockIdx.x), zero between
// launches (the last block of each resets its own). Kept per device and grown on demand; growing
// allocates, which a CUDA graph capture forbids, but every capture follows an eager run of the same
// shape (engine/cuda_graphs.py). Launches on concurrent streams of one device would share them.
int* merge_counters(int64_t needed, cudaStream_t stream) {
  static std::mutex mutex;
  // Never destroyed: freeing device memory after the CUDA context is gone (at exit) would fail.
  static at::Tensor* const counters = new at::Tensor[64];
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device < 64, "device index ", device, " out of range");
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buffer = counters[device];
  if (!buffer.defined() || buffer.numel() < needed) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    TORCH_CHECK(status == cudaStreamCaptureStatusNone,
                "paged_decode_attention: run this shape once outside CUDA graph capture first");
    buffer = at::zeros({std::max<int64_t>(needed, 4096)},
                       at::TensorOptions().dtype(at::kInt).device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
  }
  return buffer.data_ptr<int>();
}

int multiprocessor_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// CUDA-core kernel: the longest partition (its scores live in shared memory, so 512 at most) that
// still gives about two thread blocks per multiprocessor.
int64_t core_partition_size(int64_t blocks_per_partition, int64_t visible) {
  const int64_t wanted = 2 * multiprocessor_count();
  for (int64_t size : {512, 256, 128}) {
    if (blocks_per_partition * ((std::max<int64_t>(visible, 1) + size - 1) / size) >= wanted) return size;
  }
  return 128;
}

// Tensor-core kernel: a block costs a fixed start and finish (reading its block table, the first
// round trip to memory, merging its warps; about as long as streaming kBlockOverheadTokens tokens)
// plus its tokens, and blocks run in waves; the split-K merge, done by one block per sequence and
// head chunk, costs about kMergeTokensPerPartition tokens per partition. Pick the partition length
// that minimises the sum, preferring the longer on a tie, from 64 tokens (one tile per warp) up to
// the whole context. A wave is one block per resident slot for 4-warp blocks, but one block per
// multiprocessor for 8-warp blocks: one of those already takes a multiprocessor's share of the
// bandwidth, and on an H200 sweep a second resident block (head_dim 64) made every small problem
// slower, not faster. Constants fitted to H200 sweeps (docs/performance.md).
constexpr int64_t kBlockOverheadTokens = 192;
constexpr int64_t kMergeTokensPerPartition = 8;

int64_t mma_partition_size(int64_t blocks_per_partition, int64_t visible, int head_dim, int warps,
                           int block_size_log2) {
  const int64_t longest = std::max<int64_t>(visible, 1);
  const int64_t max_table_entries = mma_max_table_bytes(head_dim, warps) / sizeof(int) - 2;
  int64_t longest_table = 64;
  while (2 * longest_table < longest && (2 * longest_table >> block_size_log2) <= max_table_entries) longest_table *= 2;
  const size_t table_bytes = ((longest_table >> block_size_log2) + 2) * sizeof(int);
  const int64_t resident = warps == 8 ? 1 : mma_blocks_per_multiprocessor(head_dim, warps, table_bytes);
  const int64_t slots = std::max<int64_t>(1, resident * multiprocessor_count());
  int64_t best = 64, best_cost = INT64_MAX;
  for (int64_t size = 64;; size *= 2) {
    const bool whole = size >= longest;
    const int64_t length = whole ? ((longest + 15) / 16) * 16 : size;
    if ((length >> block_size_log2) > max_table_entries) break;
    const int64_t partitions = (longest + length - 1) / length;
    const int64_t blocks = blocks_per_partition * partitions;
    const int64_t cost = (blocks + slots - 1) / slots * (kBlockOverheadTokens + length) +
                         (partitions > 1 ? partitions * kMergeTokensPerPartition : 0);
    if (cost <= best_cost) {
      best = length;
      best_cost = cost;
    }
    if (whole) break;
  }
  return best;
}

int heads_per_block(int group_size, bool tensor_cores) {
  if (tensor_cores || group_size > 4) return kMaxHeadsPerBlock;
  if (group_size <= 1) return 1;
  return group_size <= 2 ? 2 : 4;
}

}  // namespace

void paged_decode_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, const c10::optional<at::Tensor>& alibi_slopes,
                            const c10::optional<at::Tensor>& sinks, double scale, int64_t sliding_window,
                            double soft_cap, int64_t partition_size, int64_t max_context_len) {
  TORCH_CHECK(query.is_cuda(), "paged_decode_attention: query must be a CUDA tensor");
  const at::Tensor* others[] = {&out, &key_cache, &value_cache, &block_tables, &context_lens};
  for (const at::Tensor* t : others) {
    TORCH_CHECK(t->device() == query.device(), "paged_decode_attention: all tensors must be on ", query.device());
  }
  TORCH_CHECK(query.dim() == 3, "query must be [num_seqs, num_heads, head_dim], got ", query.sizes());
  TORCH_CHECK(query.stride(2) == 1, "query's head_dim must be contiguous");
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "paged_decode_attention supports float16, bfloat16 and float32, got ", dtype);
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128 || head_dim == 256, "head_dim must be 64, 128 or 256, got ", head_dim);
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "key/value caches must both be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              key_cache.sizes(), " and ", value_cache.sizes());
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == dtype && value_cache.scalar_type() == dtype,
              "KV caches must have the query's dtype ", dtype);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == head_dim, "cache head_dim ", key_cache.size(3), " != query head_dim ", head_dim);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_heads ", num_heads,
              " is not a multiple of num_kv_heads ", num_kv_heads);
  TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0, "block_size must be a power of two, got ",
              block_size);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.size(0) == num_seqs &&
                  block_tables.is_contiguous(),
              "block_tables must be contiguous int32 [num_seqs, max_blocks], got ", block_tables.sizes(), " ",
              block_tables.scalar_type());
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 && context_lens.size(0) == num_seqs &&
                  context_lens.is_contiguous(),
              "context_lens must be contiguous int32 [num_seqs]");
  TORCH_CHECK(out.scalar_type() == dtype && out.sizes() == query.sizes() && out.is_contiguous(),
              "out must be a contiguous ", dtype, " tensor shaped like the query");
  const float* slopes = nullptr;
  if (alibi_slopes.has_value()) {
    const at::Tensor& s = alibi_slopes.value();
    TORCH_CHECK(s.device() == query.device() && s.scalar_type() == at::kFloat && s.dim() == 1 &&
                    s.size(0) == num_heads && s.is_contiguous(),
                "alibi_slopes must be contiguous float32 [num_heads] on the query's device");
    slopes = s.data_ptr<float>();
  }
  const float* sink_logits = nullptr;
  if (sinks.has_value()) {
    const at::Tensor& s = sinks.value();
    TORCH_CHECK(s.device() == query.device() && s.scalar_type() == at::kFloat && s.dim() == 1 &&
                    s.size(0) == num_heads && s.is_contiguous(),
                "sinks must be contiguous float32 [num_heads] on the query's device");
    sink_logits = s.data_ptr<float>();
  }
  TORCH_CHECK(sliding_window >= 0 && soft_cap >= 0.0, "sliding_window and soft_cap must be >= 0 (0 = off)");
  TORCH_CHECK(partition_size >= 0 && partition_size % 16 == 0,
              "partition_size must be a multiple of 16 (0 = chosen here)");
  TORCH_CHECK(max_context_len >= 0, "max_context_len must be >= 0");
  if (num_seqs == 0) return;

  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const int64_t visible = sliding_window > 0 ? std::min(max_context_len, sliding_window) : max_context_len;
  const int group_size = num_heads / num_kv_heads;
  // Which kernel. A small grid (fewer (sequence, head chunk) pairs than multiprocessors, so split-K
  // must fill the device) goes to 8-warp tensor-core blocks, MHA included: there one block streams a
  // long partition, and its fixed costs and the merge decide the time. A large grid keeps 4-warp
  // blocks (more resident, and at short contexts 8 warps had too few tiles each: 38% slower at 256
  // sequences x 128 tokens on an H200), and MHA the CUDA-core kernel (the tensor-core one wastes 7
  // of its 8 head slots and was 2x slower at 256 sequences x 128 tokens).
  const bool small_grid =
      num_seqs * num_kv_heads * ((group_size + kMaxHeadsPerBlock - 1) / kMaxHeadsPerBlock) < multiprocessor_count();
  const bool tensor_cores = dtype != at::kFloat && (group_size >= 2 || small_grid);
  const int mma_warps = small_grid && head_dim <= 128 ? 8 : 4;
  const int heads = heads_per_block(group_size, tensor_cores);
  const int64_t chunks = (group_size + heads - 1) / heads;
  int block_size_log2 = 0;
  while ((int64_t{1} << block_size_log2) < block_size) ++block_size_log2;
  const int64_t grid_x = num_kv_heads * chunks;
  const int64_t blocks_per_partition = num_seqs * grid_x;
  if (partition_size == 0) {
    partition_size = tensor_cores ? mma_partition_size(blocks_per_partition, visible, static_cast<int>(head_dim),
                                                       mma_warps, block_size_log2)
                                  : core_partition_size(blocks_per_partition, visible);
  }
  const int64_t max_partitions = std::max<int64_t>(1, (visible + partition_size - 1) / partition_size);
  TORCH_CHECK(num_seqs <= 65535 && max_partitions <= 65535, "too many sequences or partitions for one launch");

  // Shared memory: the CUDA-core kernel keeps the partition's scores; both keep its block numbers.
  const int64_t table_entries = (partition_size >> block_size_log2) + 2;
  const size_t table_bytes = table_entries * sizeof(int);
  const int64_t scratch_floats = tensor_cores ? 0 : std::max(heads * partition_size, kNumWarps * heads * head_dim);
  const size_t shared_bytes = scratch_floats * sizeof(float) + table_bytes;
  const size_t shared_limit =
      tensor_cores ? mma_max_table_bytes(static_cast<int>(head_dim), mma_warps) : kMaxSharedBytes;
  TORCH_CHECK((tensor_cores ? table_bytes : shared_bytes) <= shared_limit, "partition_size ", partition_size,
              " needs more shared memory than the device has");
  if (!tensor_cores) {
    TORCH_CHECK((max_partitions + 8) * sizeof(float) <= kMaxSharedBytes, "context too long for the partition reduction");
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial_out, partial_max, partial_sum;
  DecodeParams p{};
  if (max_partitions > 1) {
    const auto options = query.options().dtype(at::kFloat);
    partial_out = at::empty({num_seqs, num_heads, max_partitions, head_dim}, options);
    partial_max = at::empty({num_seqs, num_heads, max_partitions}, options);
    partial_sum = at::empty({num_seqs, num_heads, max_partitions}, options);
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_max = partial_max.data_ptr<float>();
    p.partial_sum = partial_sum.data_ptr<float>();
    if (tensor_cores) p.merge_counters = merge_counters(num_seqs * grid_x, stream);
  }
  p.out = out.data_ptr();
  p.query = query.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int>();
  p.context_lens = context_lens.data_ptr<int>();
  p.alibi_slopes = slopes;
  p.sinks = sink_logits;
  p.query_stride_token = query.stride(0);
  p.query_stride_head = query.stride(1);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.max_blocks_per_seq = static_cast<int>(block_tables.size(1));
  p.block_size_log2 = block_size_log2;
  p.partition_size = static_cast<int>(partition_size);
  p.max_partitions = static_cast<int>(max_partitions);
  p.scratch_floats = static_cast<int>(scratch_floats);
  p.sliding_window = static_cast<int>(sliding_window);
  p.scale = static_cast<float>(scale);
  p.soft_cap = static_cast<float>(soft_cap);

  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(num_seqs),
                  static_cast<unsigned>(max_partitions));
  const int dim = static_cast<int>(head_dim);
  const int n = static_cast<int>(num_seqs);
  if (tensor_cores) {
    launch_paged_decode_mma(p, dtype == at::kBFloat16, dim, mma_warps, grid, table_bytes, stream);
  } else if (dtype == at::kHalf) {
    launch_core<__half>(dim, heads, p, grid, shared_bytes, stream);
  } else if (dtype == at::kBFloat16) {
    launch_core<__nv_bfloat16>(dim, heads, p, grid, shared_bytes, stream);
  } else {
    launch_core<float>(dim, heads, p, grid, shared_bytes, stream);
  }
  if (max_partitions > 1 && !tensor_cores) {
    switch (dtype) {
      case at::kHalf: launch_reduce<__half>(p, dim, n, stream); break;
      case at::kBFloat16: launch_reduce<__nv_bfloat16>(p, dim, n, stream); break;
      default: launch_reduce<float>(p, dim, n, stream); break;
    }
  }
}

}  // namespace porter
