// A stage's Llama decoder layers for one decode step (one new position per row) in one call: the linear
// products (linear_rows) and the four ops between them (decode_ops.cpp) with no Python in between. In Python
// the same step costs ~7 `nn.Module` calls and ~11 C++ calls per layer, each a few microseconds that the
// weight stream does not hide. Same ops in the same order as LlamaDecoder._run_cpp with the "cpp" kernels,
// so the results are bit-equal to it. Loaded with decode_ops.cpp (runtime/cpu/cpp_ops.py); runtime/cpu/llama_decode.py
// uses it where runtime/cpu/kernels.py chose linear_rows for the step's rows.
#include <torch/python.h>
#include <torch/types.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

// decode_ops.cpp and linear_rows.cpp
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& d,
                                                      const torch::Tensor& w, double eps);
torch::Tensor silu_mul(const torch::Tensor& g, const torch::Tensor& u);
torch::Tensor rope_attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          torch::Tensor keys, torch::Tensor values, const torch::Tensor& cos,
                          const torch::Tensor& sin, const torch::Tensor& mask, int64_t at, double scale);
torch::Tensor linear_rows(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b);

namespace {

using Bias = c10::optional<torch::Tensor>;

constexpr size_t kLinears = 7;  // q, k, v, o, gate, up, down

// The layers' parameters, kept for the stage's lifetime (the tensors share the model's storage).
class DecodeLayers {
 public:
  DecodeLayers(std::vector<torch::Tensor> norms, std::vector<double> eps, std::vector<torch::Tensor> weights,
               std::vector<Bias> biases, double scale)
      : norms_(std::move(norms)), eps_(std::move(eps)), weights_(std::move(weights)), biases_(std::move(biases)),
        scale_(scale) {
    const size_t layers = norms_.size() / 2;
    TORCH_CHECK(layers > 0 && norms_.size() == 2 * layers && eps_.size() == norms_.size(),
                "two norms and two epsilons per layer");
    TORCH_CHECK(weights_.size() == kLinears * layers && biases_.size() == weights_.size(),
                "seven linear weights (q, k, v, o, gate, up, down) and seven biases per layer");
  }

  torch::Tensor run(torch::Tensor hidden, const std::vector<torch::Tensor>& keys,
                    const std::vector<torch::Tensor>& values, const torch::Tensor& cos, const torch::Tensor& sin,
                    const torch::Tensor& mask, int64_t at) const;

 private:
  std::vector<torch::Tensor> norms_;  // per layer: input norm, post-attention norm
  std::vector<double> eps_;
  std::vector<torch::Tensor> weights_;  // per layer: kLinears, [out, in] fp32 contiguous
  std::vector<Bias> biases_;
  double scale_;
};

// hidden [rows, 1, hidden size]; keys/values: a cache per layer [rows, kv heads, capacity, head dim]; cos and sin
// [rows, head dim]; mask [rows, at + 1] or empty; writes position `at` of the caches.
torch::Tensor DecodeLayers::run(torch::Tensor hidden, const std::vector<torch::Tensor>& keys,
                                const std::vector<torch::Tensor>& values, const torch::Tensor& cos,
                                const torch::Tensor& sin, const torch::Tensor& mask, int64_t at) const {
  const size_t layers = norms_.size() / 2;
  TORCH_CHECK(keys.size() == layers && values.size() == layers, "one key and one value cache per layer");
  hidden = hidden.contiguous();
  const auto shape = hidden.sizes().vec();
  const int64_t rows = hidden.size(0);
  auto flat = [&](const torch::Tensor& t) { return t.view({rows, -1}); };
  torch::Tensor h = rms_norm(hidden, norms_[0], eps_[0]);
  for (size_t l = 0; l < layers; ++l) {
    const torch::Tensor* w = &weights_[kLinears * l];
    const Bias* b = &biases_[kLinears * l];
    const torch::Tensor x = flat(h);
    const torch::Tensor attn = rope_attend(linear_rows(x, w[0], b[0]), linear_rows(x, w[1], b[1]),
                                           linear_rows(x, w[2], b[2]), keys[l], values[l], cos, sin, mask, at, scale_);
    std::tie(hidden, h) = add_rms_norm(hidden, linear_rows(attn, w[3], b[3]).view(shape), norms_[2 * l + 1],
                                       eps_[2 * l + 1]);
    const torch::Tensor y = flat(h);
    const torch::Tensor gated = silu_mul(linear_rows(y, w[4], b[4]), linear_rows(y, w[5], b[5]));
    const torch::Tensor mlp = linear_rows(gated, w[6], b[6]).view(shape);
    if (l + 1 == layers) return hidden + mlp;
    std::tie(hidden, h) = add_rms_norm(hidden, mlp, norms_[2 * l + 2], eps_[2 * l + 2]);
  }
  return hidden;
}

}  // namespace

void bind_decode_layers(pybind11::module& m) {
  pybind11::class_<DecodeLayers>(m, "DecodeLayers")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<double>, std::vector<torch::Tensor>,
                          std::vector<Bias>, double>(),
           pybind11::arg("norms"), pybind11::arg("eps"), pybind11::arg("weights"), pybind11::arg("biases"),
           pybind11::arg("scale"))
      .def("run", &DecodeLayers::run, "the layers on hidden [rows, 1, hidden size] for position `at`",
           pybind11::arg("hidden"), pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("cos"),
           pybind11::arg("sin"), pybind11::arg("mask"), pybind11::arg("at"));
}
