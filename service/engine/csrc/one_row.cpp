// One-row matrix products for the compiled decode step on a CPU with AVX-512
// (service/engine/one_row.py builds and loads this file; see its docstring for why).
//
// rankone_cpu::one_row(x [m, d] float32, w [N, d] float32 or bfloat16) -> [m, N] float32, m
// from 1 to 8: y[j, r] = sum_k w[r, k] * x[j, k]. Four weight rows per inner loop (two for 5-8
// rows of x), each pair of rows with its own accumulator (a single accumulator makes the loop
// wait on its own additions), the next rows' cache lines prefetched meanwhile, rows split over
// torch's threads; the weights read once for up to 8 rows of x. bfloat16 weights take x rounded
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
#include <vector>

namespace {

constexpr int64_t kMaxWidth = 8192;  // longest row (the 4-bit kernel's x lives on the stack)
constexpr int64_t kMaxInputs = 8;  // rows of x one call takes

// weight rows summed in one pass against M rows of x: their R x M accumulators stay in
// registers (at most 16 of the 32)
template <int64_t M>
constexpr int64_t kRowsFor = M <= 4 ? 4 : 2;

// the next R rows at byte offset ``at``: fetched while this group's are summed (the hardware
// prefetcher alone left a bfloat16 pass over SmolLM2's matrices ~1.6x slower)
template <int64_t R>
inline void prefetch_next(const char* rows, int64_t row_bytes, int64_t at) {
  for (int64_t i = R; i < 2 * R; ++i) {
    _mm_prefetch(rows + i * row_bytes + at, _MM_HINT_T0);
  }
}

// y[j, r] for the rows r0 .. r1 of a matrix of T with rows of d (n rows in all) and the rows
// j0 .. j0 + M - 1 of x, Step columns at a time: add(sum, row, k, j) adds the terms k .. k +
// Step - 1 of the row times x's row j to sum. One vector accumulator per pair of rows, summed
// from zero in the same order whatever M and the rows beside (so a row's products are the same
// bits alone and in a batch); kRowsFor<M> weight rows at once, the next ones' lines prefetched.
template <typename T, int64_t Step, int64_t M, typename Add>
void sum_rows(const T* w, int64_t d, int64_t n, int64_t r0, int64_t r1, int64_t j0, float* y,
              Add add) {
  constexpr int64_t R = kRowsFor<M>;
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const T* a = w + r * d;
    __m512 s[R][M];
    for (auto& row : s) {
      for (auto& v : row) {
        v = _mm512_setzero_ps();
      }
    }
    for (int64_t k = 0; k < d; k += Step) {
      prefetch_next<R>(reinterpret_cast<const char*>(a), row_bytes, k * sizeof(T));
      for (int64_t i = 0; i < R; ++i) {
        for (int64_t j = 0; j < M; ++j) {
          s[i][j] = add(s[i][j], a + i * d, k, j0 + j);
        }
      }
    }
    for (int64_t i = 0; i < R; ++i) {
      for (int64_t j = 0; j < M; ++j) {
        y[(j0 + j) * n + r + i] = _mm512_reduce_add_ps(s[i][j]);
      }
    }
  }
  for (; r < r1; ++r) {
    for (int64_t j = 0; j < M; ++j) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t k = 0; k < d; k += Step) {
        s = add(s, w + r * d, k, j0 + j);
      }
      y[(j0 + j) * n + r] = _mm512_reduce_add_ps(s);
    }
  }
}

// y [m, n] = x [m, d] times the n rows of w, rows split over torch's threads: x's rows in
// chunks of 8, 4, 2, 1 (each task's weight rows read again for each chunk, from its cache)
template <typename T, int64_t Step, typename Add>
void products(const T* w, int64_t d, int64_t n, int64_t m, float* y, Add add) {
  const int64_t groups = (n + 3) / 4;  // tasks take whole groups of 4 rows (of 2 and of 4)
  at::parallel_for(0, groups, 16, [&](int64_t gb, int64_t ge) {
    const int64_t b = gb * 4, e = std::min(ge * 4, n);
    int64_t j = 0;
    for (; j + 8 <= m; j += 8) {
      sum_rows<T, Step, 8>(w, d, n, b, e, j, y, add);
    }
    if (j + 4 <= m) {
      sum_rows<T, Step, 4>(w, d, n, b, e, j, y, add);
      j += 4;
    }
    if (j + 2 <= m) {
      sum_rows<T, Step, 2>(w, d, n, b, e, j, y, add);
      j += 2;
    }
    if (j < m) {
      sum_rows<T, Step, 1>(w, d, n, b, e, j, y, add);
    }
  });
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
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxInputs &&
                  x.scalar_type() == at::kFloat,
              "one_row: x must be 1 to ", kMaxInputs, " float32 rows [m, d]");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.is_contiguous(),
              "one_row: w must be a contiguous [N, d] matrix");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "one_row: w must be float32 or bfloat16");
  const int64_t n = w.size(0), d = w.size(1), m = x.size(0);
  TORCH_CHECK(d % 32 == 0 && d <= kMaxWidth, "one_row: d must be a multiple of 32, at most ",
              kMaxWidth);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (w.scalar_type() == at::kFloat) {
    const auto add = [xp, d](__m512 s, const float* a, int64_t k, int64_t j) {
      return _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(xp + j * d + k), s);
    };
    products<float, 16>(w.data_ptr<float>(), d, n, m, yp, add);
    return y;
  }
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
#ifdef __AVX512BF16__
  std::vector<__m512bh> xb(m * d / 32);  // x rounded to bfloat16, 32 columns a vector
  for (int64_t j = 0; j < m; ++j) {
    for (int64_t k = 0; k < d; k += 32) {
      const float* at = xp + j * d + k;
      xb[(j * d + k) / 32] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(at + 16), _mm512_loadu_ps(at));
    }
  }
  const __m512bh* xv = xb.data();
  const auto add = [xv, d](__m512 s, const uint16_t* a, int64_t k, int64_t j) {
    return _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(a + k), xv[(j * d + k) / 32]);
  };
  products<uint16_t, 32>(wp, d, n, m, yp, add);
#else
  std::vector<float> xr(m * d);
  for (int64_t k = 0; k < m * d; ++k) {
    xr[k] = round_bf16(xp[k]);
  }
  const float* xv = xr.data();
  const auto add = [xv, d](__m512 s, const uint16_t* a, int64_t k, int64_t j) {
    const __m512 wv = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + k)));
    return _mm512_fmadd_ps(wv, _mm512_loadu_ps(xv + j * d + k), s);
  };
  products<uint16_t, 16>(wp, d, n, m, yp, add);
#endif
  return y;
}

// rankone_cpu::one_row_q4(x [1, d] float32, tiles [N / 64, d * 32] uint8,
//                         scales [N / 64, d / 32, 64, 2] bfloat16) -> [1, N] float32:
// the product of x rounded to bfloat16 with a 4-bit copy in blocks of 32 along d
// (w = (q - 8) s + z, llama.cpp's Q4_1 form; Int4Weight), in the layout one_row.q4_tiles
// makes: for each tile of 64 rows, each group of 32 columns, each step of 8 columns k .. k + 7,
// for each 16 rows r of the tile's 4, 64 bytes: the 16-bit word 2r + e holds the levels
// q[r, k + e], q[r, k + 2 + e], q[r, k + 4 + e], q[r, k + 6 + e] in its four nibbles, low to
// high (e = 0, 1); then the tile's scales (s, z) per group, 64 pairs. A level q becomes the
// bfloat16 number 16 + q by a shift and a vpternlogd (its bits are 0x4180 | q << 3), so that
// vdpbf16ps sums (16 + q) x over pairs of columns, one float32 lane per row (no horizontal
// sums); per group y += s * D + (z - 24 s) * sum(x), with D = sum over the group of (16 + q) x.
// (Against 32-byte loads of 4 columns widened by vpmovzxbw: ~8 % less time over SmolLM2's
// matrices.)
#ifdef __AVX512BF16__
constexpr int64_t kTileRows = 64;
constexpr int64_t kGroup = 32;
constexpr int64_t kGroupBytes = kTileRows * kGroup / 2;  // a tile's group: 64 x 32 nibbles

void q4_tile(const uint8_t* tile, const uint32_t* sz, const uint32_t* xpairs,
             const float* xsum, int64_t groups, float* y) {
  const __m512i mask = _mm512_set1_epi16(0x0078);
  const __m512i bias = _mm512_set1_epi16(0x4180);
  __m512 total[4];
  for (auto& t : total) {
    t = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512 even[4], odd[4];  // two accumulators for each 16 rows: two chains of additions
    for (int64_t b = 0; b < 4; ++b) {
      even[b] = _mm512_setzero_ps();
      odd[b] = _mm512_setzero_ps();
    }
    const uint8_t* at = tile + g * kGroupBytes;
    for (int64_t j = 0; j < kGroup / 8; ++j) {
      // the next group's 1 KB, a quarter a step (the hardware prefetcher stops at pages)
      for (int64_t line = 0; line < 4; ++line) {
        _mm_prefetch(reinterpret_cast<const char*>(at + kGroupBytes + 256 * j + 64 * line),
                     _MM_HINT_T0);
      }
      const int64_t k = g * kGroup + 8 * j;
      const __m512bh x0 = (__m512bh)_mm512_set1_epi32(static_cast<int>(xpairs[k / 2]));
      const __m512bh x1 = (__m512bh)_mm512_set1_epi32(static_cast<int>(xpairs[k / 2 + 1]));
      const __m512bh x2 = (__m512bh)_mm512_set1_epi32(static_cast<int>(xpairs[k / 2 + 2]));
      const __m512bh x3 = (__m512bh)_mm512_set1_epi32(static_cast<int>(xpairs[k / 2 + 3]));
      for (int64_t b = 0; b < 4; ++b) {  // 16 rows x 8 columns: a level in each nibble
        const __m512i w = _mm512_loadu_si512(at + (4 * j + b) * 64);
        const __m512i w0 = _mm512_ternarylogic_epi32(_mm512_slli_epi16(w, 3), mask, bias, 0xEA);
        const __m512i w1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 1), mask, bias, 0xEA);
        const __m512i w2 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 5), mask, bias, 0xEA);
        const __m512i w3 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 9), mask, bias, 0xEA);
        even[b] = _mm512_dpbf16_ps(even[b], (__m512bh)w0, x0);
        odd[b] = _mm512_dpbf16_ps(odd[b], (__m512bh)w1, x1);
        even[b] = _mm512_dpbf16_ps(even[b], (__m512bh)w2, x2);
        odd[b] = _mm512_dpbf16_ps(odd[b], (__m512bh)w3, x3);
      }
    }
    const __m512 xs = _mm512_set1_ps(xsum[g]);
    const __m512 m24 = _mm512_set1_ps(-24.0f);
    for (int64_t b = 0; b < 4; ++b) {
      const __m512i pair = _mm512_loadu_si512(sz + g * kTileRows + b * 16);
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      const __m512 z = _mm512_castsi512_ps(
          _mm512_and_si512(pair, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
      total[b] = _mm512_fmadd_ps(s, _mm512_add_ps(even[b], odd[b]), total[b]);
      total[b] = _mm512_fmadd_ps(_mm512_fmadd_ps(m24, s, z), xs, total[b]);
    }
  }
  for (int64_t b = 0; b < 4; ++b) {
    _mm512_storeu_ps(y + b * 16, total[b]);
  }
}

at::Tensor one_row_q4(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scales) {
  TORCH_CHECK(x.device().is_cpu() && tiles.device().is_cpu() && scales.device().is_cpu(),
              "one_row_q4: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == at::kFloat,
              "one_row_q4: x must be one float32 row [1, d]");
  const int64_t d = x.size(1), groups = d / kGroup;
  TORCH_CHECK(d % kGroup == 0 && d <= kMaxWidth, "one_row_q4: d must be a multiple of 32, at most ",
              kMaxWidth);
  TORCH_CHECK(scales.dim() == 4 && scales.size(1) == groups && scales.size(2) == kTileRows &&
                  scales.size(3) == 2 && scales.scalar_type() == at::kBFloat16 &&
                  scales.is_contiguous(),
              "one_row_q4: scales must be contiguous bfloat16 [N / 64, d / 32, 64, 2]");
  const int64_t n_tiles = scales.size(0);
  TORCH_CHECK(tiles.dim() == 2 && tiles.size(0) == n_tiles && tiles.size(1) == d * 32 &&
                  tiles.scalar_type() == at::kByte && tiles.is_contiguous(),
              "one_row_q4: tiles must be contiguous uint8 [N / 64, d * 32]");
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  alignas(64) uint16_t xb[kMaxWidth];
  float xsum[kMaxWidth / kGroup];
  for (int64_t g = 0; g < groups; ++g) {
    float s = 0.0f;
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k) {
      const float v = round_bf16(xp[k]);
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      xb[k] = static_cast<uint16_t>(bits >> 16);
      s += v;
    }
    xsum[g] = s;
  }
  const uint32_t* xpairs = reinterpret_cast<const uint32_t*>(xb);
  at::Tensor y = at::empty({1, n_tiles * kTileRows}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint32_t*>(scales.data_ptr<at::BFloat16>());
  at::parallel_for(0, n_tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      q4_tile(tp + t * d * 32, sp + t * groups * kTileRows, xpairs, xsum, groups,
              yp + t * kTileRows);
    }
  });
  return y;
}
#else
at::Tensor one_row_q4(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "one_row_q4: built without AVX512-BF16");
  return {};
}
#endif

}  // namespace

TORCH_LIBRARY(rankone_cpu, m) {
  m.def("one_row(Tensor x, Tensor w) -> Tensor");
  m.def("one_row_q4(Tensor x, Tensor tiles, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(rankone_cpu, CPU, m) {
  m.impl("one_row", one_row);
  m.impl("one_row_q4", one_row_q4);
}
