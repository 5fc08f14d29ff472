// Python bindings of porter's CUDA kernels; engine/kernels/cuda_ops.py builds and wraps this module.

#include <torch/extension.h>

namespace porter {

void paged_decode_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, const c10::optional<at::Tensor>& alibi_slopes,
                            const c10::optional<at::Tensor>& sinks, double scale, int64_t sliding_window,
                            double soft_cap, int64_t partition_size, int64_t max_context_len);

void write_kv_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                    at::Tensor& value_cache, const at::Tensor& slot_mapping);

}  // namespace porter

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "porter's paged-attention CUDA kernels";
  m.def("paged_decode_attention", &porter::paged_decode_attention,
        "Decode attention over a paged KV cache (one query token per sequence), written into out",
        py::arg("out"), py::arg("query"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("alibi_slopes"), py::arg("sinks"), py::arg("scale"), py::arg("sliding_window"),
        py::arg("soft_cap"), py::arg("partition_size"), py::arg("max_context_len"));
  m.def("write_kv_cache", &porter::write_kv_cache, "Writes key/value rows into the paged caches at slot_mapping",
        py::arg("key"), py::arg("value"), py::arg("key_cache"), py::arg("value_cache"), py::arg("slot_mapping"));
}
