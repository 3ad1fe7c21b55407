// One-row matrix products for the compiled decode step on a CPU with AVX-512
// (service/engine/one_row.py builds and loads this file; see its docstring for why).
//
// rankone_cpu::one_row(x [1, d] float32, w [N, d] float32 or bfloat16) -> [1, N] float32:
// y[r] = sum_k w[r, k] * x[k]. Four output rows per inner loop, each with its own accumulator
// (a single accumulator makes the loop wait on its own additions), rows split over torch's
// threads. bfloat16 weights take x rounded to bfloat16 (round to nearest even, as torch's
// cast) and accumulate in float32: with AVX512-BF16 by vdpbf16ps (pairs of products per lane),
// else by widening the weights to float32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kRows = 4;  // output rows sharing one pass over x
constexpr int64_t kMaxWidth = 8192;  // longest row: x's bfloat16 copy lives on the stack

// the next group's rows at byte offset ``at``: fetched while this group's are summed (the
// hardware prefetcher alone left a bfloat16 pass over SmolLM2's matrices ~1.6x slower)
inline void prefetch_next(const char* rows, int64_t row_bytes, int64_t at) {
  for (int64_t i = kRows; i < 2 * kRows; ++i) {
    _mm_prefetch(rows + i * row_bytes + at, _MM_HINT_T0);
  }
}

// [1, N] outputs of rows r0 .. r1 of a float32 matrix
void rows_f32(const float* w, const float* x, float* y, int64_t d, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) {
    const float* a = w + r * d;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t k = 0; k < d; k += 16) {
      prefetch_next(reinterpret_cast<const char*>(a), d * 4, k * 4);
      const __m512 xv = _mm512_loadu_ps(x + k);
      s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), xv, s0);
      s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + k), xv, s1);
      s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + 2 * d + k), xv, s2);
      s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + 3 * d + k), xv, s3);
    }
    y[r] = _mm512_reduce_add_ps(s0);
    y[r + 1] = _mm512_reduce_add_ps(s1);
    y[r + 2] = _mm512_reduce_add_ps(s2);
    y[r + 3] = _mm512_reduce_add_ps(s3);
  }
  for (; r < r1; ++r) {
    const float* a = w + r * d;
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; k += 16) {
      s = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(x + k), s);
    }
    y[r] = _mm512_reduce_add_ps(s);
  }
}

// bfloat16 bits (16 of them, as loaded) widened to float32 lanes
[[maybe_unused]] inline __m512 widen(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// float32 rounded to bfloat16, round to nearest even (torch's cast), as float32 again
[[maybe_unused]] inline float round_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
    return v;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

#ifdef __AVX512BF16__
// xb: x as bfloat16 pairs, d / 32 vectors
void rows_bf16(const uint16_t* w, const __m512bh* xb, float* y, int64_t d, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) {
    const uint16_t* a = w + r * d;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t k = 0; k < d; k += 32) {
      prefetch_next(reinterpret_cast<const char*>(a), d * 2, k * 2);
      const __m512bh xv = xb[k / 32];
      s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(a + k), xv);
      s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(a + d + k), xv);
      s2 = _mm512_dpbf16_ps(s2, (__m512bh)_mm512_loadu_si512(a + 2 * d + k), xv);
      s3 = _mm512_dpbf16_ps(s3, (__m512bh)_mm512_loadu_si512(a + 3 * d + k), xv);
    }
    y[r] = _mm512_reduce_add_ps(s0);
    y[r + 1] = _mm512_reduce_add_ps(s1);
    y[r + 2] = _mm512_reduce_add_ps(s2);
    y[r + 3] = _mm512_reduce_add_ps(s3);
  }
  for (; r < r1; ++r) {
    const uint16_t* a = w + r * d;
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; k += 32) {
      s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(a + k), xb[k / 32]);
    }
    y[r] = _mm512_reduce_add_ps(s);
  }
}
#else
// xr: x rounded to bfloat16, as float32
void rows_bf16(const uint16_t* w, const float* xr, float* y, int64_t d, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) {
    const uint16_t* a = w + r * d;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t k = 0; k < d; k += 16) {
      if (k % 32 == 0) {  // a cache line holds 32 bfloat16 weights
        prefetch_next(reinterpret_cast<const char*>(a), d * 2, k * 2);
      }
      const __m512 xv = _mm512_loadu_ps(xr + k);
      s0 = _mm512_fmadd_ps(widen(_mm256_loadu_si256((const __m256i*)(a + k))), xv, s0);
      s1 = _mm512_fmadd_ps(widen(_mm256_loadu_si256((const __m256i*)(a + d + k))), xv, s1);
      s2 = _mm512_fmadd_ps(widen(_mm256_loadu_si256((const __m256i*)(a + 2 * d + k))), xv, s2);
      s3 = _mm512_fmadd_ps(widen(_mm256_loadu_si256((const __m256i*)(a + 3 * d + k))), xv, s3);
    }
    y[r] = _mm512_reduce_add_ps(s0);
    y[r + 1] = _mm512_reduce_add_ps(s1);
    y[r + 2] = _mm512_reduce_add_ps(s2);
    y[r + 3] = _mm512_reduce_add_ps(s3);
  }
  for (; r < r1; ++r) {
    const uint16_t* a = w + r * d;
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; k += 16) {
      s = _mm512_fmadd_ps(widen(_mm256_loadu_si256((const __m256i*)(a + k))),
                          _mm512_loadu_ps(xr + k), s);
    }
    y[r] = _mm512_reduce_add_ps(s);
  }
}
#endif

at::Tensor one_row(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "one_row: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == at::kFloat,
              "one_row: x must be one float32 row [1, d]");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.is_contiguous(),
              "one_row: w must be a contiguous [N, d] matrix");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "one_row: w must be float32 or bfloat16");
  const int64_t n = w.size(0), d = w.size(1);
  TORCH_CHECK(d % 32 == 0 && d <= kMaxWidth, "one_row: d must be a multiple of 32, at most ",
              kMaxWidth);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({1, n}, x.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t groups = (n + kRows - 1) / kRows;
  const int64_t grain = 16;  // groups of rows per task: 64 rows
  if (w.scalar_type() == at::kFloat) {
    const float* wp = w.data_ptr<float>();
    at::parallel_for(0, groups, grain, [&](int64_t b, int64_t e) {
      rows_f32(wp, xp, yp, d, b * kRows, std::min(e * kRows, n));
    });
    return y;
  }
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
#ifdef __AVX512BF16__
  alignas(64) __m512bh xb[kMaxWidth / 32];
  for (int64_t k = 0; k < d; k += 32) {
    xb[k / 32] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xp + k + 16), _mm512_loadu_ps(xp + k));
  }
  at::parallel_for(0, groups, grain, [&](int64_t b, int64_t e) {
    rows_bf16(wp, xb, yp, d, b * kRows, std::min(e * kRows, n));
  });
#else
  alignas(64) float xr[kMaxWidth];
  for (int64_t k = 0; k < d; ++k) {
    xr[k] = round_bf16(xp[k]);
  }
  at::parallel_for(0, groups, grain, [&](int64_t b, int64_t e) {
    rows_bf16(wp, xr, yp, d, b * kRows, std::min(e * kRows, n));
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY(rankone_cpu, m) { m.def("one_row(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(rankone_cpu, CPU, m) { m.impl("one_row", one_row); }
