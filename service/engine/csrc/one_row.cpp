// One-row matrix products for the compiled decode step on a CPU with AVX-512
// (service/engine/one_row.py builds and loads this file; see its docstring for why).
//
// rankone_cpu::one_row(x [1, d] float32, w [N, d] float32 or bfloat16) -> [1, N] float32:
// y[r] = sum_k w[r, k] * x[k]. Four output rows per inner loop, each with its own accumulator
// (a single accumulator makes the loop wait on its own additions), the next four rows' cache
// lines prefetched meanwhile, rows split over torch's threads. bfloat16 weights take x rounded
// to bfloat16 (round to nearest even, as torch's cast) and accumulate in float32: with
// AVX512-BF16 by vdpbf16ps (pairs of products per lane), else by widening the weights to
// float32.

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

// y[r] for the rows r0 .. r1 of a matrix of T with rows of d, Step columns at a time:
// add(sum, row, k) adds the row's terms k .. k + Step - 1 to sum (one vector accumulator per
// row; kRows rows at once, the next kRows rows' lines prefetched meanwhile)
template <typename T, int64_t Step, typename Add>
void sum_rows(const T* w, int64_t d, int64_t r0, int64_t r1, float* y, Add add) {
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) {
    const T* a = w + r * d;
    __m512 s[kRows];
    for (auto& v : s) {
      v = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < d; k += Step) {
      prefetch_next(reinterpret_cast<const char*>(a), row_bytes, k * sizeof(T));
      for (int64_t i = 0; i < kRows; ++i) {
        s[i] = add(s[i], a + i * d, k);
      }
    }
    for (int64_t i = 0; i < kRows; ++i) {
      y[r + i] = _mm512_reduce_add_ps(s[i]);
    }
  }
  for (; r < r1; ++r) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; k += Step) {
      s = add(s, w + r * d, k);
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
    const auto add = [xp](__m512 s, const float* a, int64_t k) {
      return _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(xp + k), s);
    };
    at::parallel_for(0, groups, grain, [&](int64_t b, int64_t e) {
      sum_rows<float, 16>(wp, d, b * kRows, std::min(e * kRows, n), yp, add);
    });
    return y;
  }
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
#ifdef __AVX512BF16__
  alignas(64) __m512bh xb[kMaxWidth / 32];
  for (int64_t k = 0; k < d; k += 32) {
    xb[k / 32] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xp + k + 16), _mm512_loadu_ps(xp + k));
  }
  const __m512bh* xv = xb;
  const auto add = [xv](__m512 s, const uint16_t* a, int64_t k) {
    return _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(a + k), xv[k / 32]);
  };
  at::parallel_for(0, groups, grain, [&](int64_t b, int64_t e) {
    sum_rows<uint16_t, 32>(wp, d, b * kRows, std::min(e * kRows, n), yp, add);
  });
#else
  alignas(64) float xr[kMaxWidth];
  for (int64_t k = 0; k < d; ++k) {
    xr[k] = round_bf16(xp[k]);
  }
  const float* xv = xr;
  const auto add = [xv](__m512 s, const uint16_t* a, int64_t k) {
    const __m512 wv = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + k)));
    return _mm512_fmadd_ps(wv, _mm512_loadu_ps(xv + k), s);
  };
  at::parallel_for(0, groups, grain, [&](int64_t b, int64_t e) {
    sum_rows<uint16_t, 16>(wp, d, b * kRows, std::min(e * kRows, n), yp, add);
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY(rankone_cpu, m) { m.def("one_row(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(rankone_cpu, CPU, m) { m.impl("one_row", one_row); }
