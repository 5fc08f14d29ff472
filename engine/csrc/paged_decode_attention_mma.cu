// Paged decode attention on tensor cores, for fp16/bf16: GQA/MQA, and MHA on grids too small to fill
// the device (the launcher, paged_decode_attention.cu, decides).
//
// Why tensor cores: with G query heads per KV head, every cached K/V element feeds G multiply-adds.
// On CUDA cores that arithmetic (and the shuffles that finish each dot product) costs more issue
// slots than the memory system needs to stream the cache. One mma.sync.m16n8k16 does 16 x 8 x 16.
//
// Why this shape: the kernel must keep enough bytes in flight to stream the cache at full bandwidth
// while holding little in registers. Each warp therefore streams its own 16-token tiles of K and V
// through a cp.async pipeline in shared memory (kStages - 1 tiles in flight while one is used, no
// registers held for them) and keeps an online softmax in registers, so the warps of a block never
// wait for one another until the end, and a block can take a long partition of the context (fewer
// partitions to merge).
//
// A block takes (sequence, KV head, up to 8 query heads of its group, partition of the context);
// warp w of W (4 or 8) takes the partition's tiles w, w + W, w + 2W, ... Per tile, with g = lane / 4
// and j = lane % 4:
//   Scores S[head][token] = Q . K^T: A = Q (16 rows, of which the 8 head slots are rows 0..7 and
//     rows 8..15 are zero), B = K^T per 8 tokens (ldmatrix of the K rows). Thread (g, j) gets head g,
//     tokens 2j, 2j+1 and 8+2j, 9+2j: exactly the B fragment of P^T that the next product wants, so
//     the probabilities never leave registers.
//   Output O^T[dim][head] += V^T . P^T: A = V^T (ldmatrix.trans of the V rows), B = P^T.
// Shared memory rows are swizzled (16-byte chunk c of token row r sits at chunk c ^ (r % 8)) so the
// eight rows an ldmatrix reads fall in different banks. The probabilities enter the mma rounded to
// the cache dtype, as in flash attention; maxima, sums and accumulators stay fp32.
// At the end the warps' (max, sum, output) are merged through shared memory, and the block
// writes the output, or its partition's share, which the last partition block to finish merges.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "decode_common.h"
#include "vector_io.h"

namespace porter {
namespace {

constexpr int kSlots = 8;  // query heads per block: the mma's N in the output product
constexpr int kTile = 16;  // tokens per pipeline stage
constexpr int kMaxDevices = 64;

template <int HEAD_DIM, int WARPS>
struct MmaLayout {
  static constexpr int kChunksPerRow = HEAD_DIM / 8;  // 16-byte chunks in one cache row
  static constexpr int kRowsPerLoad = kChunksPerRow >= 32 ? 1 : 32 / kChunksPerRow;
  static constexpr int kLoadsPerTile = kTile / kRowsPerLoad;  // cp.async per lane per tile, of K and of V
  static constexpr int kTileBytes = kTile * HEAD_DIM * 2;     // K (or V) rows of one tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  // Three 16-token stages per warp: 12 KB per warp at head_dim 64, 24 KB at 128 (two at 256, 32 KB),
  // so 48 / 96 / 128 KB per 4-warp block and 96 / 192 KB per 8-warp one. On an H200 sweep (4 warps),
  // deeper pipelines streamed long contexts no faster and cost short contexts up to 30% by fitting
  // fewer blocks per SM; two stages at head_dim 128 cost mid-sized problems up to 16 points of copy
  // bandwidth.
  static constexpr int kStages = HEAD_DIM >= 256 ? 2 : 3;
  // Four or eight warps (the launcher's choice: 8 on grids smaller than the SM count); at head_dim
  // 256 the pipeline of eight does not fit.
  static constexpr int kWarps = WARPS;
  static_assert(WARPS == 4 || (WARPS == 8 && HEAD_DIM <= 128), "4 warps, or 8 at head_dim <= 128");
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kPipelineBytes = kWarps * kStages * kStageBytes;
  static constexpr int kSteps = HEAD_DIM / 16;  // mma k-steps over dims (scores), dim tiles (output)
  static_assert(HEAD_DIM % 64 == 0, "head_dim must be a multiple of 64");
  // The final cross-warp merges (the block's, then the split-K one) reuse the pipeline's shared memory.
  static_assert((kWarps * kSlots * (HEAD_DIM + 7) + 2 * kSlots) * 4 <= kPipelineBytes,
                "merge scratch does not fit");
};

__device__ __forceinline__ uint32_t swizzled(int row, int chunk, int row_bytes) {
  return row * row_bytes + ((chunk ^ (row & 7)) << 4);
}

// 16 bytes global -> shared without passing through registers; bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async_16(uint32_t shared_addr, const void* global, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_addr), "l"(global), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t shared_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t shared_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_addr));
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          __nv_bfloat16) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pack_pair(float lo, float hi, __half) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t pack_pair(float lo, float hi, __nv_bfloat16) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Split-K merge, done by whichever of a (sequence, head chunk)'s partition blocks finishes last, so no
// second kernel (and no wait for the whole grid to drain) is needed. Each block publishes its
// partials, then counts itself in; the last to arrive merges out = sum_p w_p out_p / (sum_p w_p + sink)
// with w_p = sum_p * exp(max_p - max), sink = exp(sink logit - max) (0 without sinks), and resets the counter for the next launch. `scratch` holds
// kWarps x kSlots x (HEAD_DIM + 2) floats.
template <typename T, int HEAD_DIM, int WARPS>
__device__ void merge_if_last(const DecodeParams& p, const DecodeBlock& b, float* scratch) {
  using L = MmaLayout<HEAD_DIM, WARPS>;
  __shared__ bool last;
  __threadfence();  // this thread's partials are visible device-wide before the block is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    int* counter = p.merge_counters + (int64_t)b.seq * gridDim.x + blockIdx.x;
    last = atomicAdd(counter, 1) == b.num_partitions - 1;
    if (last) *counter = 0;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();  // see every other block's partials

  // The partials are in L2, so the merge is bound by round trips, not bytes. Each warp folds every
  // kWarps-th partition into a running (max, sum, output) per head, as the attention loop folds
  // tiles, so no pass over the maxima must finish first and kUnroll partitions' loads are in flight
  // at once. Lane l < kSlots fetches head l's max, lane kSlots + l its sum; a lane's 16-byte columns
  // c * 32 + lane are (head, 4 dims) of the output. The warps then meet in shared memory.
  constexpr int kColumnsPerHead = HEAD_DIM / 4;
  constexpr int kColumnsPerLane = kSlots * kColumnsPerHead / 32;
  // At most 8 float4 loads in flight per lane: the merge's registers count for the whole kernel, and
  // 16 (the first try) took the 4-warp head_dim-64 kernel from 79 to 149 registers, one resident
  // block per multiprocessor fewer.
  constexpr int kUnroll = kColumnsPerLane >= 8 ? 1 : 8 / kColumnsPerLane;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first_row = (int64_t)b.seq * p.num_heads + b.first_head;
  const float4* partials =
      reinterpret_cast<const float4*>(p.partial_out) + first_row * p.max_partitions * kColumnsPerHead;
  const int stat_head = lane % kSlots;
  const float* stats = (lane < kSlots ? p.partial_max : p.partial_sum) + (first_row + stat_head) * p.max_partitions;
  const bool stat_lane = lane < 2 * kSlots && stat_head < b.active_heads;

  float run_max[kColumnsPerLane], run_sum[kColumnsPerLane];
  float4 acc[kColumnsPerLane];
#pragma unroll
  for (int c = 0; c < kColumnsPerLane; ++c) {
    run_max[c] = -FLT_MAX;
    run_sum[c] = 0.f;
    acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  for (int i0 = warp; i0 < b.num_partitions; i0 += kUnroll * L::kWarps) {
    float stat[kUnroll];
    float4 v[kUnroll][kColumnsPerLane];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * L::kWarps;
      stat[u] = stat_lane && i < b.num_partitions ? __ldcg(stats + i) : 0.f;
#pragma unroll
      for (int c = 0; c < kColumnsPerLane; ++c) {
        const int column = c * 32 + lane;
        const int h = column / kColumnsPerHead;
        const int64_t at = ((int64_t)h * p.max_partitions + i) * kColumnsPerHead + column % kColumnsPerHead;
        v[u][c] = h < b.active_heads && i < b.num_partitions ? __ldcg(partials + at) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u * L::kWarps >= b.num_partitions) break;
#pragma unroll
      for (int c = 0; c < kColumnsPerLane; ++c) {
        const int h = (c * 32 + lane) / kColumnsPerHead;
        // Every lane shuffles: at head_dim 64 a warp's lanes cover two heads, and a shuffle that
        // only some lanes reach never completes (a hang, seen with one head per block).
        const float shuffled_max = __shfl_sync(0xffffffffu, stat[u], h);
        const float part_max = h < b.active_heads ? shuffled_max : -FLT_MAX;
        const float part_sum = __shfl_sync(0xffffffffu, stat[u], kSlots + h);
        const float new_max = fmaxf(run_max[c], part_max);
        const float keep = __expf(run_max[c] - new_max);
        const float w = part_sum * __expf(part_max - new_max);
        run_max[c] = new_max;
        run_sum[c] = fmaf(run_sum[c], keep, w);
        acc[c].x = fmaf(acc[c].x, keep, w * v[u][c].x);
        acc[c].y = fmaf(acc[c].y, keep, w * v[u][c].y);
        acc[c].z = fmaf(acc[c].z, keep, w * v[u][c].z);
        acc[c].w = fmaf(acc[c].w, keep, w * v[u][c].w);
      }
    }
  }

  float4* warp_acc = reinterpret_cast<float4*>(scratch);  // [kWarps][kSlots * kColumnsPerHead]
  float* warp_max = scratch + L::kWarps * kSlots * HEAD_DIM;  // [kWarps][kSlots]
  float* warp_sum = warp_max + L::kWarps * kSlots;
  __syncthreads();  // the block's own cross-warp merge is done with the scratch
#pragma unroll
  for (int c = 0; c < kColumnsPerLane; ++c) {
    const int column = c * 32 + lane;
    const int h = column / kColumnsPerHead;
    warp_acc[warp * kSlots * kColumnsPerHead + column] = acc[c];
    if (column % kColumnsPerHead == 0) {
      warp_max[warp * kSlots + h] = run_max[c];
      warp_sum[warp * kSlots + h] = run_sum[c];
    }
  }
  __syncthreads();
  for (int column = threadIdx.x; column < b.active_heads * kColumnsPerHead; column += L::kThreads) {
    const int h = column / kColumnsPerHead;
    float m = -FLT_MAX;
#pragma unroll
    for (int w = 0; w < L::kWarps; ++w) m = fmaxf(m, warp_max[w * kSlots + h]);
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < L::kWarps; ++w) {
      const float weight = __expf(warp_max[w * kSlots + h] - m);  // 0 for a warp that merged nothing
      const float4 v = warp_acc[w * kSlots * kColumnsPerHead + column];
      sum.x = fmaf(weight, v.x, sum.x);
      sum.y = fmaf(weight, v.y, sum.y);
      sum.z = fmaf(weight, v.z, sum.z);
      sum.w = fmaf(weight, v.w, sum.w);
      total = fmaf(weight, warp_sum[w * kSlots + h], total);
    }
    const float inv_total = 1.f / (total + sink_mass(p, b.first_head + h, m));
    T* out = static_cast<T*>(p.out) + (first_row + h) * HEAD_DIM + (column % kColumnsPerHead) * 4;
    out[0] = from_float<T>(sum.x * inv_total);
    out[1] = from_float<T>(sum.y * inv_total);
    out[2] = from_float<T>(sum.z * inv_total);
    out[3] = from_float<T>(sum.w * inv_total);
  }
}

template <typename T, int HEAD_DIM, int WARPS>
__global__ void __launch_bounds__(32 * WARPS) paged_decode_attention_mma_kernel(const DecodeParams p) {
  using L = MmaLayout<HEAD_DIM, WARPS>;
  static_assert(sizeof(T) == 2, "fp16/bf16 only");
  constexpr int kRowBytes = HEAD_DIM * 2;
  extern __shared__ __align__(128) unsigned char shared_raw[];
  int* block_numbers = reinterpret_cast<int*>(shared_raw + L::kPipelineBytes);
  DecodeBlock b;
  if (!plan_decode_block<T, HEAD_DIM, kSlots>(p, b, block_numbers)) return;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane >> 2;
  const int j = lane & 3;
  const T zero{};

  // A fragment of the scores product for head slot g: dims 16s + 2j, +1 and 16s + 8 + 2j, +1. Slots
  // past the group's heads hold zeros; their results are never stored.
  uint32_t q_frag[L::kSteps][2];
  const bool real_head = g < b.active_heads;
  const int head = b.first_head + min(g, b.active_heads - 1);
  {
    const uint16_t* q = reinterpret_cast<const uint16_t*>(static_cast<const T*>(p.query) +
                                                          b.seq * p.query_stride_token + head * p.query_stride_head);
#pragma unroll
    for (int s = 0; s < L::kSteps; ++s) {
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        const int d = 16 * s + 8 * x + 2 * j;
        q_frag[s][x] = real_head ? static_cast<uint32_t>(q[d]) | (static_cast<uint32_t>(q[d + 1]) << 16) : 0u;
      }
    }
  }
  const float slope = p.alibi_slopes != nullptr ? p.alibi_slopes[head] : 0.f;
  __syncthreads();  // block_numbers ready

  const int64_t token_stride = (int64_t)p.num_kv_heads * HEAD_DIM;
  const T* key_base = static_cast<const T*>(p.key_cache) + (int64_t)b.kv_head * HEAD_DIM;
  const T* value_base = static_cast<const T*>(p.value_cache) + (int64_t)b.kv_head * HEAD_DIM;
  const uint32_t pipeline =
      static_cast<uint32_t>(__cvta_generic_to_shared(shared_raw)) + warp * L::kStages * L::kStageBytes;
  const int num_tiles = (b.num_tokens + kTile - 1) / kTile;
  const int my_tiles = num_tiles > warp ? (num_tiles - warp + L::kWarps - 1) / L::kWarps : 0;

  // Starts the copy of this warp's k-th tile (K and V) into stage k % kStages; always commits a group
  // so that "all but the newest kStages - 1 groups are done" means "tile k has landed".
  auto issue_tile = [&](int k) {
    if (k < my_tiles) {
      const int first = (warp + k * L::kWarps) * kTile;
      const int t = first + (lane & (kTile - 1));
      const int my_row = t < b.num_tokens ? static_cast<int>(cache_row(p, b, block_numbers, t)) : -1;
      const uint32_t stage = pipeline + (k % L::kStages) * L::kStageBytes;
      const int chunk = lane % L::kChunksPerRow;
#pragma unroll
      for (int i = 0; i < L::kLoadsPerTile; ++i) {
        const int r = i * L::kRowsPerLoad + lane / L::kChunksPerRow;
        const int row = __shfl_sync(0xffffffffu, my_row, r);
        const int64_t offset = row >= 0 ? row * token_stride + chunk * 8 : 0;
        const uint32_t dst = stage + swizzled(r, chunk, kRowBytes);
        cp_async_16(dst, key_base + offset, row >= 0 ? 16 : 0);
        cp_async_16(dst + L::kTileBytes, value_base + offset, row >= 0 ? 16 : 0);
      }
    }
    cp_async_commit();
  };

  // ldmatrix x4 addresses: lanes 8m..8m+7 give the rows of matrix m, which covers tokens
  // (m / 2) * 8 .. +8 and the first (m even) or second (m odd) 16-byte chunk of a 16-dim step.
  const int ld_row = ((lane >> 4) << 3) + (lane & 7);
  const int ld_chunk = (lane >> 3) & 1;

  float row_max = -FLT_MAX;  // head g, over the tiles seen so far
  float row_sum = 0.f;       // head g, this thread's tokens only (summed over the quad at the end)
  float acc[L::kSteps][4];   // O^T: dims 16mt + g (+8), heads 2j, 2j+1
#pragma unroll
  for (int mt = 0; mt < L::kSteps; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;

#pragma unroll
  for (int k = 0; k < L::kStages - 1; ++k) issue_tile(k);
  for (int k = 0; k < my_tiles; ++k) {
    issue_tile(k + L::kStages - 1);
    cp_async_wait<L::kStages - 1>();
    __syncwarp();
    const uint32_t key_tile = pipeline + (k % L::kStages) * L::kStageBytes;
    const uint32_t value_tile = key_tile + L::kTileBytes;

    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // tokens 0..7 and 8..15
#pragma unroll
    for (int step = 0; step < L::kSteps; ++step) {
      uint32_t kf[4];
      ldmatrix_x4(kf, key_tile + swizzled(ld_row, 2 * step + ld_chunk, kRowBytes));
      const uint32_t a[4] = {q_frag[step][0], 0u, q_frag[step][1], 0u};
      const uint32_t b0[2] = {kf[0], kf[1]};
      const uint32_t b1[2] = {kf[2], kf[3]};
      mma_16816(s[0], a, b0, zero);
      mma_16816(s[1], a, b1, zero);
    }

    // Online softmax for head g over this tile's 16 tokens (4 per thread, the quad holds all 16).
    const int first = (warp + k * L::kWarps) * kTile;
    float tile_max = -FLT_MAX;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        const int t = first + 8 * n + 2 * j + x;
        const float key_minus_query = static_cast<float>(b.token_begin + t - b.query_pos);
        s[n][x] = t < b.num_tokens ? finish_score(p, s[n][x], p.scale, slope, key_minus_query) : -INFINITY;
        tile_max = fmaxf(tile_max, s[n][x]);
      }
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float new_max = fmaxf(row_max, tile_max);
    const float alpha = __expf(row_max - new_max);
    row_max = new_max;
    float prob[2][2];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int x = 0; x < 2; ++x) prob[n][x] = __expf(s[n][x] - new_max);
    }
    row_sum = fmaf(row_sum, alpha, prob[0][0] + prob[0][1] + prob[1][0] + prob[1][1]);
    const uint32_t pb[2] = {pack_pair(prob[0][0], prob[0][1], zero), pack_pair(prob[1][0], prob[1][1], zero)};

    // The accumulator columns are heads 2j and 2j+1, whose rescale factors live in quads 2j and 2j+1.
    const float alpha_even = __shfl_sync(0xffffffffu, alpha, 8 * j);
    const float alpha_odd = __shfl_sync(0xffffffffu, alpha, 8 * j + 4);
#pragma unroll
    for (int mt = 0; mt < L::kSteps; ++mt) {
      acc[mt][0] *= alpha_even;
      acc[mt][1] *= alpha_odd;
      acc[mt][2] *= alpha_even;
      acc[mt][3] *= alpha_odd;
      uint32_t vf[4];
      ldmatrix_x4_trans(vf, value_tile + swizzled(ld_row, 2 * mt + ld_chunk, kRowBytes));
      // vf: dims 16mt + g and 16mt + 8 + g, tokens (2j, 2j+1) and (8+2j, 9+2j): the A fragment of V^T.
      const uint32_t a[4] = {vf[0], vf[1], vf[2], vf[3]};
      mma_16816(acc[mt], a, pb, zero);
    }
    __syncwarp();  // every lane is done with this stage before the next issue overwrites it
  }
  cp_async_wait<0>();
  row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
  row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 2);

  // Merge the warps: the pipeline's shared memory now takes [warp][slot][dim] outputs, maxima, sums.
  // Rows are padded by 4 floats so that the four lanes j of a store (heads 2j, 2j+1) fall in
  // different banks (unpadded, the row stride is a multiple of 32 banks: 4-way conflicts).
  constexpr int kOutStride = HEAD_DIM + 4;
  __syncthreads();
  float* warp_out = reinterpret_cast<float*>(shared_raw);
  float* warp_max = warp_out + L::kWarps * kSlots * kOutStride;
  float* warp_weight = warp_max + L::kWarps * kSlots;  // [warp][slot]: exp(warp max - head max)
  float* warp_sum = warp_weight + L::kWarps * kSlots;
  float* head_max = warp_sum + L::kWarps * kSlots;  // [slot]
  float* head_sum = head_max + kSlots;              // [slot]
  {
    float* even = warp_out + (warp * kSlots + 2 * j) * kOutStride;
    float* odd = even + kOutStride;
#pragma unroll
    for (int mt = 0; mt < L::kSteps; ++mt) {
      const int d = 16 * mt + g;
      even[d] = acc[mt][0];
      odd[d] = acc[mt][1];
      even[d + 8] = acc[mt][2];
      odd[d + 8] = acc[mt][3];
    }
    if (j == 0) {
      warp_max[warp * kSlots + g] = row_max;
      warp_sum[warp * kSlots + g] = row_sum;
    }
  }
  __syncthreads();
  // Each head's weights once (not once per output element: that was 8 exponentials per element,
  // and at 8 heads of 128 dims the epilogue's issue slots showed in the time).
  if (threadIdx.x < kSlots) {
    const int h = threadIdx.x;
    float m = -FLT_MAX;
#pragma unroll
    for (int w = 0; w < L::kWarps; ++w) m = fmaxf(m, warp_max[w * kSlots + h]);
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < L::kWarps; ++w) {
      const float weight = __expf(warp_max[w * kSlots + h] - m);  // 0 for a warp that saw no tile
      warp_weight[w * kSlots + h] = weight;
      total = fmaf(weight, warp_sum[w * kSlots + h], total);
    }
    head_max[h] = m;
    head_sum[h] = total;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < b.active_heads * HEAD_DIM; idx += L::kThreads) {
    const int h = idx / HEAD_DIM;
    const int d = idx % HEAD_DIM;
    float numerator = 0.f;
#pragma unroll
    for (int w = 0; w < L::kWarps; ++w) {
      numerator = fmaf(warp_weight[w * kSlots + h], warp_out[(w * kSlots + h) * kOutStride + d], numerator);
    }
    store_block_result<T, HEAD_DIM>(p, b, h, d, numerator / head_sum[h], head_max[h], head_sum[h]);
  }
  if (p.max_partitions > 1) merge_if_last<T, HEAD_DIM, WARPS>(p, b, reinterpret_cast<float*>(shared_raw));
}

template <typename T, int HEAD_DIM, int WARPS>
size_t opt_in_shared_memory(size_t table_bytes) {
  auto kernel = paged_decode_attention_mma_kernel<T, HEAD_DIM, WARPS>;
  // Above 48 KB a kernel must opt in, once per device; allow the device's maximum so any table fits.
  static std::once_flag configured[kMaxDevices];
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device < kMaxDevices, "device index ", device, " out of range");
  std::call_once(configured[device], [&] {
    int limit = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        limit - static_cast<int>(attributes.sharedSizeBytes)));
  });
  return MmaLayout<HEAD_DIM, WARPS>::kPipelineBytes + table_bytes;
}

template <typename T, int HEAD_DIM, int WARPS>
void launch_typed(const DecodeParams& p, dim3 grid, size_t table_bytes, cudaStream_t stream) {
  const size_t shared_bytes = opt_in_shared_memory<T, HEAD_DIM, WARPS>(table_bytes);
  paged_decode_attention_mma_kernel<T, HEAD_DIM, WARPS><<<grid, 32 * WARPS, shared_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The one place the instantiated (head_dim, warps) pairs are listed: calls f(HEAD_DIM, WARPS) with
// both as std::integral_constant, so f can use them as template arguments.
template <typename F>
decltype(auto) with_shape(int head_dim, int warps, F&& f) {
  using std::integral_constant;
  if (head_dim == 64 && warps == 8) return f(integral_constant<int, 64>{}, integral_constant<int, 8>{});
  if (head_dim == 64) return f(integral_constant<int, 64>{}, integral_constant<int, 4>{});
  if (head_dim == 128 && warps == 8) return f(integral_constant<int, 128>{}, integral_constant<int, 8>{});
  if (head_dim == 128) return f(integral_constant<int, 128>{}, integral_constant<int, 4>{});
  return f(integral_constant<int, 256>{}, integral_constant<int, 4>{});
}

template <typename T>
void launch_for_shape(const DecodeParams& p, int head_dim, int warps, dim3 grid, size_t table_bytes,
                      cudaStream_t stream) {
  with_shape(head_dim, warps, [&](auto dim, auto w) {
    launch_typed<T, decltype(dim)::value, decltype(w)::value>(p, grid, table_bytes, stream);
  });
}

template <int HEAD_DIM, int WARPS>
int resident_blocks(size_t table_bytes) {
  // fp16 and bf16 instantiations use the same registers and shared memory.
  const size_t shared_bytes = opt_in_shared_memory<__nv_bfloat16, HEAD_DIM, WARPS>(table_bytes);
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks, paged_decode_attention_mma_kernel<__nv_bfloat16, HEAD_DIM, WARPS>, 32 * WARPS, shared_bytes));
  return blocks;
}

}  // namespace

size_t mma_max_table_bytes(int head_dim, int warps) {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t pipeline = with_shape(head_dim, warps, [](auto dim, auto w) -> size_t {
    return MmaLayout<decltype(dim)::value, decltype(w)::value>::kPipelineBytes;
  });
  // The kernel's own static shared memory (a few flags) is well under 1 KB.
  const size_t taken = pipeline + 1024;
  return static_cast<size_t>(limit) > taken ? limit - taken : 0;
}

int mma_blocks_per_multiprocessor(int head_dim, int warps, size_t table_bytes) {
  // Asked on every launch that picks its own partition length: remember the answers.
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int, size_t>, int> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(device, head_dim, warps, table_bytes);
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = known.find(key);
  if (found != known.end()) return found->second;
  const int blocks = with_shape(head_dim, warps, [&](auto dim, auto w) {
    return resident_blocks<decltype(dim)::value, decltype(w)::value>(table_bytes);
  });
  known.emplace(key, blocks);
  return blocks;
}

void launch_paged_decode_mma(const DecodeParams& p, bool bfloat16, int head_dim, int warps, dim3 grid,
                             size_t table_bytes, cudaStream_t stream) {
  if (bfloat16) {
    launch_for_shape<__nv_bfloat16>(p, head_dim, warps, grid, table_bytes, stream);
  } else {
    launch_for_shape<__half>(p, head_dim, warps, grid, table_bytes, stream);
  }
}

}  // namespace porter
