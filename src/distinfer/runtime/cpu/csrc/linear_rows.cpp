// y = x W^T (+ b) for a few rows of x (fp32): the linear products of decode steps and short prompts on CPU.
//
// With few rows a product reads every weight once and does little arithmetic on it, so its speed is that of
// the weight stream. MKL and oneDNN reach it for one row only (oneDNN at 8 rows: ~1.5x the one-row time on
// the bench's Xeon). Here each thread walks its share of W four rows at a time, multiplies them with up to
// six rows of x held in registers (24 vector accumulators: 4 x 6 dot products at once), and prefetches the
// weights a few rows ahead, so the stream never waits for the arithmetic. Loaded with decode_ops.cpp
// (runtime/cpu/cpp_ops.py); runtime/cpu/kernels.py times it against oneDNN/MKL and uses it where it is faster.
#include <torch/types.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // one 512-bit register
#else
constexpr int kLanes = 8;  // one 256-bit register (two 128-bit ones where that is the widest)
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

constexpr int kRows = 4;   // weight rows per tile
constexpr int kInputs = 6;  // input rows per tile

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline float sum(Vec v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// R weight rows w (stride in) times B input rows x (stride in) into y[m * out + r].
template <int R, int B>
void tile(const float* w, const float* x, int64_t in, float* y, int64_t out, bool prefetch) {
  Vec acc[R][B] = {};
  const int64_t body = in - in % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    if (prefetch && (i * sizeof(float)) % 64 == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(w + (r + kRows) * in + i, 0, 3);
    Vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load(w + r * in + i);
    for (int m = 0; m < B; ++m) {
      const Vec xv = load(x + m * in + i);
      for (int r = 0; r < R; ++r) acc[r][m] += wv[r] * xv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < B; ++m) {
      float s = sum(acc[r][m]);
      for (int64_t i = body; i < in; ++i) s += w[r * in + i] * x[m * in + i];
      y[m * out + r] = s;
    }
}

// tile<R, B> for a B known only at run time (1..N).
template <int R, int N>
void tile_upto(int64_t b, const float* w, const float* x, int64_t in, float* y, int64_t out, bool prefetch) {
  if constexpr (N > 1) {
    if (b < N) return tile_upto<R, N - 1>(b, w, x, in, y, out, prefetch);
  }
  tile<R, N>(w, x, in, y, out, prefetch);
}

// R weight rows against every input row, kInputs at a time (the weights come from memory once, for the first).
template <int R>
void weight_rows(const float* w, const float* x, int64_t rows, int64_t in, float* y, int64_t out) {
  for (int64_t m = 0; m < rows; m += kInputs)
    tile_upto<R, kInputs>(std::min<int64_t>(kInputs, rows - m), w, x + m * in, in, y + m * out, out, m == 0);
}

}  // namespace

torch::Tensor linear_rows(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "x must be [rows, in] and w [out, in]");
  for (const auto& [t, name] : {std::pair{&x, "x"}, std::pair{&w, "w"}})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous(), name,
                " must be a contiguous fp32 CPU tensor");
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0);
  TORCH_CHECK(w.size(1) == in, "x has ", in, " features, w takes ", w.size(1));
  auto y = torch::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (out + kRows - 1) / kRows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t * kRows;
      if (r + kRows <= out) {
        weight_rows<kRows>(wp + r * in, xp, rows, in, yp + r, out);
      } else {
        for (int64_t q = r; q < out; ++q) weight_rows<1>(wp + q * in, xp, rows, in, yp + q, out);
      }
    }
  });
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->numel() == out, "b must have ", out, " elements");
    y.add_(*b);
  }
  return y;
}
