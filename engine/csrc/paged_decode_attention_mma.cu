// Paged decode attention on tensor cores, for fp16/bf16 with 2 or more query heads per KV head.
//
// Why: with G query heads per KV head, every cached K/V element feeds G multiply-adds. On CUDA cores
// that arithmetic (and the shuffles that finish each dot product) costs more issue slots than the
// memory system needs to stream the cache, so GQA-8 ran at a third of copy bandwidth. One
// mma.sync.m16n8k16 does 16 tokens x 8 heads x 16 dims, which leaves the loads as the only real cost.
//
// Block, partitions, softmax and output merge are as in decode_common.h (8 head slots per block).
// Per warp and 16-token tile, with g = lane / 4 and j = lane % 4 (the mma fragment coordinates):
//   Phase 1, scores S[token][head] = K[token][:] . Q[head][:]: A = K tile (16 tokens x 16 dims per
//     step), B = Q^T (16 dims x 8 heads). The dot product sums over dims, so dims may be assigned to
//     fragment slots in any order as long as K and Q agree: thread (g, j) loads 16 contiguous bytes of
//     tokens g and g+8 at dim offset i*32 + j*8 (four threads cover 64 contiguous bytes of a row per
//     load) and the same dims of Q[head g], and feeds them to the mma unpermuted.
//   Phase 3, O^T[dim][head] = V^T[dim][tokens] . P^T[tokens][head]: A = V^T (16 dims x 16 tokens),
//     B = P^T (16 tokens x 8 heads). Thread (g, j) owns tokens 2j, 2j+1, 8+2j, 9+2j of the tile and
//     loads their dims c*64 + g*8 .. +8 (eight threads cover a 128-byte row segment per load); a byte
//     permute pairs the same dim of two tokens into one register, as the A fragment wants. Output dim
//     of (d-tile mt, row g / g+8) is (mt/4)*64 + g*8 + (mt%4)*2 + (0 / 1).
// The probabilities enter the mma rounded to the cache dtype, as in flash attention; sums stay fp32.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include "decode_common.h"
#include "vector_io.h"

namespace porter {
namespace {

constexpr int kSlots = 8;  // head slots per block: the mma's N
constexpr int kTile = 16;  // tokens per warp step: the mma's M in phase 1 and K in phase 3

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

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;  // i is a compile-time constant after unrolling
}

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kNumThreads) paged_decode_attention_mma_kernel(const DecodeParams p) {
  constexpr int kRowLoads = HEAD_DIM / 32;  // phase 1: 16-byte loads per thread per K row
  constexpr int kChunks = HEAD_DIM / 64;    // phase 3: 16-byte loads per thread per V row
  constexpr int kSteps = HEAD_DIM / 16;     // mma k-steps (phase 1) and dim tiles (phase 3)
  // Two tiles per warp step keep twice the bytes in flight; at head_dim 256 registers allow one.
  constexpr int kTilesPerStep = HEAD_DIM <= 128 ? 2 : 1;
  constexpr int kWarpSpan = kTilesPerStep * kTile;
  static_assert(sizeof(T) == 2 && HEAD_DIM % 64 == 0, "fp16/bf16 and head_dim a multiple of 64");
  extern __shared__ __align__(16) unsigned char shared_raw[];
  float* scratch = reinterpret_cast<float*>(shared_raw);
  int* block_numbers = reinterpret_cast<int*>(scratch + p.scratch_floats);
  __shared__ float head_max[kSlots];
  __shared__ float head_sum[kSlots];
  DecodeBlock b;
  if (!plan_decode_block<T, HEAD_DIM, kSlots>(p, b, block_numbers)) return;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane >> 2;
  const int j = lane & 3;
  const T zero{};

  // B fragment of phase 1: Q[head slot g] at dims i*32 + j*8 .. +8. Unused slots repeat the last head.
  uint4 q_frag[kRowLoads];
  {
    const int head = b.first_head + min(g, b.active_heads - 1);
    const uint16_t* q = reinterpret_cast<const uint16_t*>(static_cast<const T*>(p.query) +
                                                          b.seq * p.query_stride_token + head * p.query_stride_head);
#pragma unroll
    for (int i = 0; i < kRowLoads; ++i) {
      uint32_t w[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int d = i * 32 + j * 8 + 2 * x;
        w[x] = static_cast<uint32_t>(q[d]) | (static_cast<uint32_t>(q[d + 1]) << 16);
      }
      q_frag[i] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
  // This thread's scores belong to head slots 2j and 2j+1.
  float slope[2];
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    const int head = b.first_head + min(2 * j + x, b.active_heads - 1);
    slope[x] = p.alibi_slopes != nullptr ? p.alibi_slopes[head] : 0.f;
  }
  __syncthreads();  // block_numbers ready

  const int64_t token_stride = (int64_t)p.num_kv_heads * HEAD_DIM;
  const T* key_base = static_cast<const T*>(p.key_cache) + (int64_t)b.kv_head * HEAD_DIM;
  const T* value_base = static_cast<const T*>(p.value_cache) + (int64_t)b.kv_head * HEAD_DIM;
  auto row_ptr = [&](const T* base, int t) { return base + cache_row(p, b, block_numbers, t) * token_stride; };
  float* scores = scratch;

  // Phase 1: scores. A warp takes kTilesPerStep tiles per step, all loads issued before the first mma.
  for (int first = warp * kWarpSpan; first < b.num_tokens; first += kNumWarps * kWarpSpan) {
    uint4 k_lo[kTilesPerStep][kRowLoads], k_hi[kTilesPerStep][kRowLoads];  // tokens tile+g and tile+g+8
#pragma unroll
    for (int u = 0; u < kTilesPerStep; ++u) {
      const int t_lo = first + u * kTile + g, t_hi = t_lo + 8;
      const T* lo_ptr = t_lo < b.num_tokens ? row_ptr(key_base, t_lo) + j * 8 : nullptr;
      const T* hi_ptr = t_hi < b.num_tokens ? row_ptr(key_base, t_hi) + j * 8 : nullptr;
#pragma unroll
      for (int i = 0; i < kRowLoads; ++i) {
        k_lo[u][i] = lo_ptr != nullptr ? load_16_bytes(lo_ptr + i * 32) : make_uint4(0, 0, 0, 0);
        k_hi[u][i] = hi_ptr != nullptr ? load_16_bytes(hi_ptr + i * 32) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kTilesPerStep; ++u) {
      float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int step = 0; step < kSteps; ++step) {
        const int i = step / 2, x = (step % 2) * 2;
        const uint32_t a[4] = {word(k_lo[u][i], x), word(k_hi[u][i], x), word(k_lo[u][i], x + 1),
                               word(k_hi[u][i], x + 1)};
        const uint32_t bq[2] = {word(q_frag[i], x), word(q_frag[i], x + 1)};
        mma_16816(c, a, bq, zero);
      }
      // c[0], c[1]: token tile+g, heads 2j, 2j+1; c[2], c[3]: token tile+g+8.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int t = first + u * kTile + g + 8 * r;
        if (t >= b.num_tokens) continue;
        const float key_minus_query = static_cast<float>(b.token_begin + t - b.query_pos);
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          scores[(2 * j + x) * p.partition_size + t] =
              finish_score(p, c[2 * r + x], p.scale, slope[x], key_minus_query);
        }
      }
    }
  }

  // Phase 3 operands: thread (g, j) takes tokens 2j, 2j+1, 8+2j, 9+2j of each tile.
  auto tile_token = [&](int first, int u, int k) { return first + u * kTile + (k >> 1) * 8 + 2 * j + (k & 1); };
  auto load_values = [&](int first, uint4 (&v)[kTilesPerStep][4][kChunks]) {
#pragma unroll
    for (int u = 0; u < kTilesPerStep; ++u) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int t = tile_token(first, u, k);
        const T* ptr = t < b.num_tokens ? row_ptr(value_base, t) + g * 8 : nullptr;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) v[u][k][c] = ptr != nullptr ? load_16_bytes(ptr + c * 64) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  // V does not depend on the softmax: the first step's loads are in flight while it runs.
  uint4 v[kTilesPerStep][4][kChunks];
  load_values(warp * kWarpSpan, v);
  __syncthreads();

  // Phase 2: softmax statistics per real head.
  softmax_stats(scores, p.partition_size, b.num_tokens, b.active_heads, head_max, head_sum);
  __syncthreads();

  // Phase 3: probabilities times V.
  float acc[kSteps][4];
#pragma unroll
  for (int mt = 0; mt < kSteps; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
  const bool real_head = g < b.active_heads;
  for (int first = warp * kWarpSpan; first < b.num_tokens; first += kNumWarps * kWarpSpan) {
    if (first != warp * kWarpSpan) load_values(first, v);
#pragma unroll
    for (int u = 0; u < kTilesPerStep; ++u) {
      // Past the partition and for unused head slots the weight is 0 (the shared row holds garbage there).
      float prob[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int t = tile_token(first, u, k);
        prob[k] = t < b.num_tokens && real_head ? scores[g * p.partition_size + t] : 0.f;
      }
      const uint32_t bp[2] = {pack_pair(prob[0], prob[1], zero), pack_pair(prob[2], prob[3], zero)};
#pragma unroll
      for (int mt = 0; mt < kSteps; ++mt) {
        const int c = mt / 4, w = mt % 4;
        const uint32_t a[4] = {
            __byte_perm(word(v[u][0][c], w), word(v[u][1][c], w), 0x5410),  // dim row g, tokens 2j, 2j+1
            __byte_perm(word(v[u][0][c], w), word(v[u][1][c], w), 0x7632),  // dim row g+8
            __byte_perm(word(v[u][2][c], w), word(v[u][3][c], w), 0x5410),  // dim row g, tokens 8+2j, 9+2j
            __byte_perm(word(v[u][2][c], w), word(v[u][3][c], w), 0x7632),  // dim row g+8
        };
        mma_16816(acc[mt], a, bp, zero);
      }
    }
  }
  __syncthreads();  // every read of the scores is done; the scratch now takes per-warp sums
#pragma unroll
  for (int mt = 0; mt < kSteps; ++mt) {
    const int d = (mt / 4) * 64 + g * 8 + (mt % 4) * 2;
    float* slot0 = scratch + (warp * kSlots + 2 * j) * HEAD_DIM;
    float* slot1 = slot0 + HEAD_DIM;
    slot0[d] = acc[mt][0];
    slot1[d] = acc[mt][1];
    slot0[d + 1] = acc[mt][2];
    slot1[d + 1] = acc[mt][3];
  }
  __syncthreads();
  write_block_output<T, HEAD_DIM, kSlots>(p, b, scratch, head_max, head_sum);
}

template <typename T>
void launch_typed(const DecodeParams& p, int head_dim, dim3 grid, size_t shared_bytes, cudaStream_t stream) {
  switch (head_dim) {
    case 64: paged_decode_attention_mma_kernel<T, 64><<<grid, kNumThreads, shared_bytes, stream>>>(p); break;
    case 128: paged_decode_attention_mma_kernel<T, 128><<<grid, kNumThreads, shared_bytes, stream>>>(p); break;
    default: paged_decode_attention_mma_kernel<T, 256><<<grid, kNumThreads, shared_bytes, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_paged_decode_mma(const DecodeParams& p, bool bfloat16, int head_dim, dim3 grid, size_t shared_bytes,
                             cudaStream_t stream) {
  if (bfloat16) {
    launch_typed<__nv_bfloat16>(p, head_dim, grid, shared_bytes, stream);
  } else {
    launch_typed<__half>(p, head_dim, grid, shared_bytes, stream);
  }
}

}  // namespace porter
