// KV cache write: copies each new token's key and value rows [num_kv_heads, head_dim] into the paged
// caches at its flat slot (block * block_size + offset). A slot of -1 is skipped (padding tokens).
//
// One thread block per token; the row is copied in 16-byte packs when every address and stride allows
// it (the usual case: k and v are views into a fused qkv output), element by element otherwise.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace porter {
namespace {

constexpr int kNumThreads = 128;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T values[VEC];
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kNumThreads)
    write_kv_cache_kernel(const T* __restrict__ key, const T* __restrict__ value, T* __restrict__ key_cache,
                          T* __restrict__ value_cache, const int64_t* __restrict__ slot_mapping,
                          int64_t key_stride_token, int64_t key_stride_head, int64_t value_stride_token,
                          int64_t value_stride_head, int num_kv_heads, int head_dim, int64_t num_slots) {
  using P = Pack<T, VEC>;
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  // -1 marks padding; a slot past the cache would be a scheduler bug, and is dropped rather than
  // written over memory that is not the cache.
  if (slot < 0 || slot >= num_slots) return;
  const int packs_per_head = head_dim / VEC;
  const int64_t row = slot * num_kv_heads * head_dim;
  for (int i = threadIdx.x; i < num_kv_heads * packs_per_head; i += kNumThreads) {
    const int head = i / packs_per_head;
    const int d = (i % packs_per_head) * VEC;
    const int64_t cache_offset = row + (int64_t)head * head_dim + d;
    *reinterpret_cast<P*>(key_cache + cache_offset) =
        *reinterpret_cast<const P*>(key + token * key_stride_token + head * key_stride_head + d);
    *reinterpret_cast<P*>(value_cache + cache_offset) =
        *reinterpret_cast<const P*>(value + token * value_stride_token + head * value_stride_head + d);
  }
}

template <typename T>
void launch(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
            const at::Tensor& slot_mapping) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t num_tokens = key.size(0);
  const int num_kv_heads = static_cast<int>(key.size(1));
  const int head_dim = static_cast<int>(key.size(2));
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % kVec == 0 && t.stride(1) % kVec == 0;
  };
  const bool vectorize =
      head_dim % kVec == 0 && aligned(key) && aligned(value) && aligned(key_cache) && aligned(value_cache);
  const dim3 grid(static_cast<unsigned>(num_tokens));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const T* k = static_cast<const T*>(key.data_ptr());
  const T* v = static_cast<const T*>(value.data_ptr());
  T* kc = static_cast<T*>(key_cache.data_ptr());
  T* vc = static_cast<T*>(value_cache.data_ptr());
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  if (vectorize) {
    write_kv_cache_kernel<T, kVec><<<grid, kNumThreads, 0, stream>>>(
        k, v, kc, vc, slots, key.stride(0), key.stride(1), value.stride(0), value.stride(1), num_kv_heads, head_dim,
        num_slots);
  } else {
    write_kv_cache_kernel<T, 1><<<grid, kNumThreads, 0, stream>>>(
        k, v, kc, vc, slots, key.stride(0), key.stride(1), value.stride(0), value.stride(1), num_kv_heads, head_dim,
        num_slots);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void write_kv_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                    at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.is_cuda(), "write_kv_cache: key must be a CUDA tensor");
  const at::Tensor* others[] = {&value, &key_cache, &value_cache, &slot_mapping};
  for (const at::Tensor* t : others) {
    TORCH_CHECK(t->device() == key.device(), "write_kv_cache: all tensors must be on ", key.device());
  }
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "key/value caches must both be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              key_cache.sizes(), " and ", value_cache.sizes());
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
              "slot_mapping must be contiguous int64 [num_tokens]");
  const int64_t num_tokens = slot_mapping.size(0);
  TORCH_CHECK(key.dim() == 3 && key.size(0) == num_tokens && key.size(1) == key_cache.size(2) &&
                  key.size(2) == key_cache.size(3) && key.sizes() == value.sizes(),
              "key/value must be [num_tokens, num_kv_heads, head_dim] matching slot_mapping and the cache, got ",
              key.sizes(), " and ", value.sizes());
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "key/value head_dim must be contiguous");
  const auto dtype = key_cache.scalar_type();
  TORCH_CHECK(key.scalar_type() == dtype && value.scalar_type() == dtype && value_cache.scalar_type() == dtype,
              "key, value and both caches must share one dtype");
  TORCH_CHECK(num_tokens <= INT32_MAX, "too many tokens for one launch");
  if (num_tokens == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(key.device());
  switch (dtype) {
    case at::kHalf: launch<__half>(key, value, key_cache, value_cache, slot_mapping); break;
    case at::kBFloat16: launch<__nv_bfloat16>(key, value, key_cache, value_cache, slot_mapping); break;
    case at::kFloat: launch<float>(key, value, key_cache, value_cache, slot_mapping); break;
    default: TORCH_CHECK(false, "write_kv_cache supports float16, bfloat16 and float32, got ", dtype);
  }
}

}  // namespace porter
