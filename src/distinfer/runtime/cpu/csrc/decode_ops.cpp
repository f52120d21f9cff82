// distinfer's C++ ops for a Llama decode step on CPU (fp32): everything between the linear products of a
// decoder layer in four calls instead of ~25 PyTorch operations. Loaded by runtime/cpu/cpp_ops.py, used by
// runtime/cpu/llama_decode.py. Each op checks its inputs. The module also binds the few-row linear product of
// csrc/linear_rows.cpp, which runtime/cpu/kernels.py's CpuLinear uses where it is the fastest kernel.
#include <torch/python.h>
#include <torch/types.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous fp32 CPU tensor");
}

// Dot product with 8 running sums (the compiler vectorizes them).
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float total = 0;
  for (int j = 0; j < 8; ++j) total += acc[j];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

void rms_norm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t h, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * h;
    float* yr = y + r * h;
    const float inv = 1.0f / std::sqrt(dot(xr, xr, h) / static_cast<float>(h) + static_cast<float>(eps));
    for (int64_t i = 0; i < h; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

// y = x * cos + rotate_half(x) * sin, with rotate_half's sign already folded into `sin`.
void rotate(const float* x, const float* cos, const float* sin, float* y, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) y[i] = x[i] * cos[i] + x[i + half] * sin[i];
  for (int64_t i = half; i < hd; ++i) y[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

}  // namespace

// RMSNorm of each row of x [..., h] with weight w [h].
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check(x, "x");
  check(w, "w");
  const int64_t h = x.size(-1);
  TORCH_CHECK(w.numel() == h, "w must have ", h, " elements");
  auto y = torch::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.numel() / h, h, eps);
  return y;
}

// (x + d, RMSNorm(x + d)): a residual connection and the next norm.
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& d,
                                                      const torch::Tensor& w, double eps) {
  check(x, "x");
  check(d, "d");
  TORCH_CHECK(x.sizes() == d.sizes(), "x and d must have the same shape");
  auto sum = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* dp = d.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  for (int64_t i = 0, n = x.numel(); i < n; ++i) sp[i] = xp[i] + dp[i];
  return {sum, rms_norm(sum, w, eps)};
}

// silu(g) * u, elementwise.
torch::Tensor silu_mul(const torch::Tensor& g, const torch::Tensor& u) {
  check(g, "g");
  check(u, "u");
  TORCH_CHECK(g.sizes() == u.sizes(), "g and u must have the same shape");
  return at::silu(g).mul_(u);  // ATen's vectorized kernels (a scalar std::exp loop takes 5x longer)
}

// One new position per row: rotates q [R, heads*hd] and k [R, kv_heads*hd], writes k and v at position `at` of
// the caches [R, kv_heads, capacity, hd], and attends over positions 0..at (where `mask` [R, at+1], if not
// empty, is true). Returns [R, heads*hd]. cos and sin: [R, hd].
torch::Tensor rope_attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          torch::Tensor keys, torch::Tensor values, const torch::Tensor& cos,
                          const torch::Tensor& sin, const torch::Tensor& mask, int64_t at, double scale) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&keys, "keys"}, {&values, "values"},
                         {&cos, "cos"}, {&sin, "sin"}})
    check(*t, name);
  const int64_t rows = keys.size(0), kv_heads = keys.size(1), capacity = keys.size(2), hd = keys.size(3);
  const int64_t heads = q.numel() / (rows * hd), groups = heads / kv_heads, len = at + 1;
  TORCH_CHECK(at >= 0 && at < capacity, "position ", at, " outside the cache's ", capacity);
  TORCH_CHECK(values.sizes() == keys.sizes() && heads * hd * rows == q.numel() && heads % kv_heads == 0,
              "q, keys and values do not match");
  TORCH_CHECK(k.numel() == rows * kv_heads * hd && v.numel() == k.numel(), "k and v do not match the cache");
  TORCH_CHECK(cos.numel() == rows * hd && sin.numel() == rows * hd, "cos and sin must be [rows, head dim]");
  const bool* mp = nullptr;
  if (mask.numel()) {
    TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.is_contiguous() && mask.numel() == rows * len,
                "mask must be a contiguous bool [rows, at + 1]");
    mp = mask.data_ptr<bool>();
  }
  auto q_rot = torch::empty({rows * heads * hd}, q.options());
  auto out = torch::empty({rows, heads * hd}, q.options());
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  float* qr = q_rot.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos.data_ptr<float>() + r * hd;
    const float* s = sin.data_ptr<float>() + r * hd;
    for (int64_t h = 0; h < heads; ++h)
      rotate(q.data_ptr<float>() + (r * heads + h) * hd, c, s, qr + (r * heads + h) * hd, hd);
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t slot = ((r * kv_heads + h) * capacity + at) * hd;
      rotate(k.data_ptr<float>() + (r * kv_heads + h) * hd, c, s, kp + slot, hd);
      std::copy_n(v.data_ptr<float>() + (r * kv_heads + h) * hd, hd, vp + slot);
    }
  }
  // Threads only pay off for long contexts: below ~64k multiply-adds per call one thread is faster
  // (2 vCPUs, 35 positions: 13 us on one thread, 24 us on two).
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, len * hd));
  at::parallel_for(0, rows * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(len);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / heads, base = (r * kv_heads + (rh % heads) / groups) * capacity * hd;
      const float* query = qr + rh * hd;
      const bool* m = mp ? mp + r * len : nullptr;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < len; ++t) {
        p[t] = (m && !m[t]) ? -std::numeric_limits<float>::infinity()
                            : dot(query, kp + base + t * hd, hd) * static_cast<float>(scale);
        top = std::max(top, p[t]);
      }
      float total = 0;
      for (int64_t t = 0; t < len; ++t) total += (p[t] = std::exp(p[t] - top));
      float* o = op + rh * hd;
      std::fill_n(o, hd, 0.0f);
      for (int64_t t = 0; t < len; ++t) {
        const float weight = p[t] / total;
        const float* value = vp + base + t * hd;
        for (int64_t i = 0; i < hd; ++i) o[i] += weight * value[i];
      }
    }
  });
  return out;
}

// csrc/linear_rows.cpp and csrc/decode_layers.cpp
torch::Tensor linear_rows(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b);
void bind_decode_layers(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row");
  m.def("add_rms_norm", &add_rms_norm, "(x + d, RMSNorm(x + d))");
  m.def("silu_mul", &silu_mul, "silu(g) * u");
  m.def("rope_attend", &rope_attend, "rotary embedding, KV-cache write and attention for one new position");
  m.def("linear_rows", &linear_rows, "x W^T (+ b) for a few rows of x", py::arg("x"), py::arg("w"),
        py::arg("b") = py::none());
  bind_decode_layers(m);
}
