// Decode attention on CPU: one query token per row against the key/value cache, grouped
// query heads (esr_train/decode_attention.py says why). Each (row, key/value head) pair is
// one task: its R query heads' scores against every cached key (each key row read once for
// all R), the padding mask, the softmax, and the weighted sum of the value rows (each read
// once), all in float32 whatever the cache's dtype.
#include "torch_headers.h"
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include "vec_math.h"

namespace {

inline const float* as_float(const float* row, float*, int64_t) { return row; }
inline const float* as_float(const at::BFloat16* row, float* buf, int64_t D) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  uint32_t* out = reinterpret_cast<uint32_t*>(buf);
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<uint32_t>(bits[d]) << 16;
  return buf;
}


// n rows of a cache (row stride `stride` elements) as float rows: the rows themselves for a
// float cache, converted into buf (row stride D) for bfloat16.
inline const float* as_rows(const float* rows, int64_t, int64_t, float*, int64_t) { return rows; }
inline const float* as_rows(const at::BFloat16* rows, int64_t stride, int64_t n, float* buf, int64_t D) {
  for (int64_t j = 0; j < n; ++j) as_float(rows + j * stride, buf + j * D, D);
  return buf;
}
template <typename T> inline int64_t row_stride(int64_t stride, int64_t D) { return std::is_same<T, float>::value ? stride : D; }

// Prefetching. A decode step reads each layer's cache once, long after the previous step left it, so
// every key and value row comes from memory; one task's rows (16 KB for SmolLM2 at 130 columns) are
// too short for the hardware prefetcher to ramp up on. The task asks for key row w + kAhead while it
// scores row w, for value row w at the same time (read after the softmax), and for the next task's
// first keys while it sums the values. On a 2-core Intel (AVX-512, AMX) the kernel alone over 30 cold
// layers (93 rows, 131 columns) went from 25.4 to 17-20 ms in bf16 and from 34.6 to 27.4 ms in float32;
// built for AVX2 only (the AMD machine's loops) from 30.1 to 23.5 ms and from 38.6 to 31.2 ms; the
// steered decode from 854 to 979 tok/s (docs/performance.md P25). Prefetches change no arithmetic.
constexpr int64_t kAhead = 16;  // key rows asked for ahead of the one scored

#ifdef __AVX2__
// Ask for n cache rows (D elements each, `stride` apart) from row `first` on, those below W only: the
// cache comes cold from memory every step (kAhead above). T0: into L1, else into L2.
template <typename T>
inline void prefetch_rows(const T* base, int64_t stride, int64_t first, int64_t n, int64_t W, int64_t D, bool l1) {
  for (int64_t w = first; w < first + n && w < W; ++w) {
    const char* p = reinterpret_cast<const char*>(base + w * stride);
    for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
      l1 ? _mm_prefetch(p + off, _MM_HINT_T0) : _mm_prefetch(p + off, _MM_HINT_T1);
  }
}
#endif

inline float dot(const float* a, const float* b, int64_t D) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t d = 0; d < D; d += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[d + j] * b[d + j];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

#ifdef __AVX2__
// The sums of eight accumulators, in order, as one vector.
inline __m256 sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// Scores of R queries against 8 consecutive key rows (row stride kw floats), stored at s[r * W].
inline void scores8(const float* q, const float* k, int64_t kw, int64_t R, int64_t D, float* s, int64_t W) {
  for (int64_t r = 0; r < R; ++r) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    const float* qr = q + r * D;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 x = _mm256_loadu_ps(qr + d);
      a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + d), a0);
      a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + kw + d), a1);
      a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 2 * kw + d), a2);
      a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 3 * kw + d), a3);
      a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 4 * kw + d), a4);
      a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 5 * kw + d), a5);
      a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 6 * kw + d), a6);
      a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 7 * kw + d), a7);
    }
    _mm256_storeu_ps(s + r * W, sum8(a0, a1, a2, a3, a4, a5, a6, a7));
  }
}

// o[r] += p[r * W] * v for R rows of D floats.
inline void axpy_rows(const float* p, int64_t W, const float* v, float* o, int64_t R, int64_t D) {
  for (int64_t r = 0; r < R; ++r) {
    const float pr = p[r * W];
    if (pr == 0.f) continue;
    const __m256 x = _mm256_set1_ps(pr);
    float* orow = o + r * D;
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(orow + d, _mm256_fmadd_ps(x, _mm256_loadu_ps(v + d), _mm256_loadu_ps(orow + d)));
  }
}
// o[r] += sum over j < 4 of p[r * W + j] * v[j] for R rows of D floats (v rows `stride` apart).
inline void axpy4_rows(const float* p, int64_t W, const float* v, int64_t stride, float* o, int64_t R, int64_t D) {
  for (int64_t r = 0; r < R; ++r) {
    const float* pr = p + r * W;
    if (pr[0] == 0.f && pr[1] == 0.f && pr[2] == 0.f && pr[3] == 0.f) continue;
    const __m256 x0 = _mm256_set1_ps(pr[0]), x1 = _mm256_set1_ps(pr[1]);
    const __m256 x2 = _mm256_set1_ps(pr[2]), x3 = _mm256_set1_ps(pr[3]);
    float* orow = o + r * D;
    for (int64_t d = 0; d < D; d += 8) {
      __m256 acc = _mm256_loadu_ps(orow + d);
      acc = _mm256_fmadd_ps(x0, _mm256_loadu_ps(v + d), acc);
      acc = _mm256_fmadd_ps(x1, _mm256_loadu_ps(v + stride + d), acc);
      acc = _mm256_fmadd_ps(x2, _mm256_loadu_ps(v + 2 * stride + d), acc);
      acc = _mm256_fmadd_ps(x3, _mm256_loadu_ps(v + 3 * stride + d), acc);
      _mm256_storeu_ps(orow + d, acc);
    }
  }
}
#endif

// s[0..n) = exp(s - max) in place; returns their sum (0 when every entry is -inf).
inline float softmax_numerators(float* s, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t w = 0; w < n; ++w) mx = s[w] > mx ? s[w] : mx;
  if (mx == -std::numeric_limits<float>::infinity()) {
    std::memset(s, 0, sizeof(float) * n);
    return 0.f;
  }
  return exp_shifted_in_place(s, n, mx);
}

// Each of R score rows (W wide, at s + r * W): masked columns (mrow[c * mcol] false) set to
// -inf, then softmax_numerators in place; inv[r] = 1 / its sum (0 for a fully masked row).
// mrow may be null (no mask).
inline void masked_softmax_rows(float* s, int64_t R, int64_t W, const uint8_t* mrow, int64_t mcol, float* inv) {
  if (mrow != nullptr)
    for (int64_t c = 0; c < W; ++c)
      if (!mrow[c * mcol])
        for (int64_t r = 0; r < R; ++r) s[r * W + c] = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < R; ++r) {
    const float sum = softmax_numerators(s + r * W, W);
    inv[r] = sum > 0.f ? 1.f / sum : 0.f;
  }
}

#ifdef __AVX512F__

// AVX-512 path for one (row, key/value head) task when the R query heads' D-wide rows fit in
// registers (R * D / 16 <= 16: SmolLM2's R 3, D 64): the queries stay in registers while each
// key row is read once, and the R output rows are accumulated in registers while each value
// row is read once, so no partial sums go through memory. On a 2-core Intel with AVX-512 the
// AVX2 loops above ran a bf16 cache no faster than a float32 one (16 against 32 GB/s of
// cache read): they were bound by instructions, not memory (docs/performance.md P22).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <typename T, int R, int C>
void attend_task512(const float* q, const T* kbase, int64_t kw, const T* vbase, int64_t vw, const uint8_t* mrow,
                    int64_t mcol, float scale, int64_t W, float* s, float* o, const T* knext) {
  constexpr int64_t D = 16 * C;
  __m512 qv[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) qv[r][c] = _mm512_mul_ps(_mm512_loadu_ps(q + r * D + 16 * c), _mm512_set1_ps(scale));
  for (int64_t w = 0; w < W; ++w) {
    const T* kr = kbase + w * kw;
    prefetch_rows(kbase, kw, w + kAhead, 1, W, D, true);
    prefetch_rows(vbase, vw, w, 1, W, D, false);  // the value rows, read after the softmax
    __m512 kc[C];
    for (int c = 0; c < C; ++c) kc[c] = load16(kr + 16 * c);
    for (int r = 0; r < R; ++r) {
      __m512 acc = _mm512_mul_ps(qv[r][0], kc[0]);
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[r][c], kc[c], acc);
      s[r * W + w] = _mm512_reduce_add_ps(acc);
    }
  }
  float inv[R];
  masked_softmax_rows(s, R, W, mrow, mcol, inv);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t w = 0; w < W; ++w) {
    const T* vr = vbase + w * vw;
    if (knext != nullptr && w < kAhead) prefetch_rows(knext, kw, w, 1, W, D, true);  // the next task's first keys
    __m512 vc[C];
    for (int c = 0; c < C; ++c) vc[c] = load16(vr + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(s[r * W + w]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(p, vc[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + r * D + 16 * c, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r])));
}

template <typename T>
using Task512 = void (*)(const float*, const T*, int64_t, const T*, int64_t, const uint8_t*, int64_t, float, int64_t,
                         float*, float*, const T*);

// The register-blocked task for R query heads of width D, or nullptr where they do not fit.
template <typename T>
Task512<T> task512(int64_t R, int64_t D) {
#define ESR_TASK(r, c) if (R == r && D == 16 * c) return &attend_task512<T, r, c>;
  ESR_TASK(1, 1) ESR_TASK(2, 1) ESR_TASK(3, 1) ESR_TASK(4, 1)
  ESR_TASK(1, 2) ESR_TASK(2, 2) ESR_TASK(3, 2) ESR_TASK(4, 2)
  ESR_TASK(1, 4) ESR_TASK(2, 4) ESR_TASK(3, 4) ESR_TASK(4, 4)
  ESR_TASK(1, 8) ESR_TASK(2, 8)
  ESR_TASK(1, 16)
#undef ESR_TASK
  return nullptr;
}
#endif

template <typename T>
void attend_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const uint8_t* mask,
                 int64_t mask_row_stride, int64_t mask_col_stride, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), G = q.size(1), R = q.size(2), D = q.size(3), W = k.size(2);
  const int64_t kb = k.stride(0), kg = k.stride(1), kw = k.stride(2);
  const int64_t vb = v.stride(0), vg = v.stride(1), vw = v.stride(2);
  const float* qp = q.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  float* op = out.data_ptr<float>();
  // the keys of task i (row i / G, key/value head i % G)
  const auto keys_of = [&](int64_t i) { return kp + (i / G) * kb + (i % G) * kg; };
#ifdef __AVX512F__
  if (const Task512<T> task = task512<T>(R, D)) {
    at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> s(R * W);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / G, g = i % G;
        task(qp + i * R * D, keys_of(i), kw, vp + b * vb + g * vg, vw,
             mask == nullptr ? nullptr : mask + b * mask_row_stride, mask_col_stride, scale, W, s.data(), op + i * R * D,
             i + 1 < end ? keys_of(i + 1) : nullptr);
      }
    });
    return;
  }
#endif
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(8 * D), qs(R * D), s(R * W);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / G, g = i % G;
      const T* kbase = keys_of(i);
      const T* vbase = vp + b * vb + g * vg;
      for (int64_t j = 0; j < R * D; ++j) qs[j] = qp[i * R * D + j] * scale;
      // scores
      int64_t w = 0;
#ifdef __AVX2__
      for (; w + 8 <= W; w += 8) {
        prefetch_rows(kbase, kw, w + kAhead, 8, W, D, true);
        prefetch_rows(vbase, vw, w, 8, W, D, false);  // the value rows, read after the softmax
        scores8(qs.data(), as_rows(kbase + w * kw, kw, 8, buf.data(), D), row_stride<T>(kw, D), R, D, s.data() + w, W);
      }
#endif
      for (; w < W; ++w) {
        const float* kr = as_float(kbase + w * kw, buf.data(), D);
        for (int64_t r = 0; r < R; ++r) s[r * W + w] = dot(qs.data() + r * D, kr, D);
      }
      float inv[64];
      masked_softmax_rows(s.data(), R, W, mask == nullptr ? nullptr : mask + b * mask_row_stride, mask_col_stride, inv);
      // weighted sum of the value rows
      float* obase = op + i * R * D;
      std::memset(obase, 0, sizeof(float) * R * D);
      w = 0;
#ifdef __AVX2__
      for (; w + 4 <= W; w += 4) {
        if (i + 1 < end && w < kAhead)  // the next task's first keys
          prefetch_rows(keys_of(i + 1), kw, w, 4, W, D, true);
        axpy4_rows(s.data() + w, W, as_rows(vbase + w * vw, vw, 4, buf.data(), D), row_stride<T>(vw, D), obase, R, D);
      }
#endif
      for (; w < W; ++w) {
        const float* vr = as_float(vbase + w * vw, buf.data(), D);
        for (int64_t r = 0; r < R; ++r) {
          const float pr = s[r * W + w];
          if (pr == 0.f) continue;
          for (int64_t d = 0; d < D; ++d) obase[r * D + d] += pr * vr[d];
        }
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t d = 0; d < D; ++d) obase[r * D + d] *= inv[r];
    }
  });
}

}  // namespace

// q [B, G, R, D] float32 contiguous (R query heads per key/value head), k and v [B, G, W, D]
// float32 or bfloat16 with the last dim contiguous (views of a larger cache are fine),
// mask [B or 1, W] bool (true: attend) or undefined. Returns [B, G, R, D] float32.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                  double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode attention: CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode attention: 4-d q, k, v");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous float32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && k.stride(3) == 1 && v.stride(3) == 1,
              "k, v: one dtype, last dim contiguous");
  TORCH_CHECK(q.size(3) % 8 == 0 && k.size(3) == q.size(3) && v.size(3) == q.size(3), "head dim: a multiple of 8");
  TORCH_CHECK(q.size(2) <= 64 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && v.sizes() == k.sizes(),
              "shapes: q [B, G, R <= 64, D], k and v [B, G, W, D]");
  const uint8_t* mp = nullptr;
  int64_t mrow = 0, mcol = 0;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(1) == k.size(2)
                && (m.size(0) == q.size(0) || m.size(0) == 1), "mask: bool [B or 1, W]");
    mp = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
    mrow = m.size(0) == 1 ? 0 : m.stride(0);
    mcol = m.stride(1);
  }
  auto out = at::empty(q.sizes(), q.options());
  if (k.scalar_type() == at::kFloat) attend_impl<float>(q, k, v, mp, mrow, mcol, static_cast<float>(scale), out);
  else if (k.scalar_type() == at::kBFloat16) attend_impl<at::BFloat16>(q, k, v, mp, mrow, mcol, static_cast<float>(scale), out);
  else TORCH_CHECK(false, "k, v: float32 or bfloat16");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "softmax(q k^T * scale, masked) v for one query token per row");
}
