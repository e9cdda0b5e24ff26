// Decode attention on CPU: one query token per row, grouped query heads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

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

template <typename T>
void scores_impl(const at::Tensor& q, const at::Tensor& k, at::Tensor& s) {
  const int64_t B = q.size(0), G = q.size(1), R = q.size(2), D = q.size(3), W = k.size(2);
  const int64_t kb = k.stride(0), kg = k.stride(1), kw = k.stride(2);
  const float* qp = q.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(8 * D);
    for (int64_t i = begin; i < end; ++i) {
      const T* kbase = kp + (i / G) * kb + (i % G) * kg;
      const float* qbase = qp + i * R * D;
      float* sbase = sp + i * R * W;
      int64_t w = 0;
#ifdef __AVX2__
      for (; w + 8 <= W; w += 8) {
        const float* kr = as_rows(kbase + w * kw, kw, 8, buf.data(), D);
        scores8(qbase, kr, row_stride<T>(kw, D), R, D, sbase + w, W);
      }
#endif
      for (; w < W; ++w) {
        const float* kr = as_float(kbase + w * kw, buf.data(), D);
        for (int64_t r = 0; r < R; ++r) sbase[r * W + w] = dot(qbase + r * D, kr, D);
      }
    }
  });
}

template <typename T>
void values_impl(const at::Tensor& p, const at::Tensor& v, at::Tensor& out) {
  const int64_t B = p.size(0), G = p.size(1), R = p.size(2), W = p.size(3), D = v.size(3);
  const int64_t vb = v.stride(0), vg = v.stride(1), vw = v.stride(2);
  const float* pp = p.data_ptr<float>();
  const T* vp = v.data_ptr<T>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(4 * D);
    for (int64_t i = begin; i < end; ++i) {
      const T* vbase = vp + (i / G) * vb + (i % G) * vg;
      const float* pbase = pp + i * R * W;
      float* obase = op + i * R * D;
      std::memset(obase, 0, sizeof(float) * R * D);
      int64_t w = 0;
#ifdef __AVX2__
      for (; w + 4 <= W; w += 4)
        axpy4_rows(pbase + w, W, as_rows(vbase + w * vw, vw, 4, buf.data(), D), row_stride<T>(vw, D), obase, R, D);
#endif
      for (; w < W; ++w) {
        const float* vr = as_float(vbase + w * vw, buf.data(), D);
#ifdef __AVX2__
        axpy_rows(pbase + w, W, vr, obase, R, D);
#else
        for (int64_t r = 0; r < R; ++r) {
          const float pr = pbase[r * W + w];
          if (pr == 0.f) continue;
          float* o = obase + r * D;
          for (int64_t d = 0; d < D; ++d) o[d] += pr * vr[d];
        }
#endif
      }
    }
  });
}

void check(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1, name, ": a 4-d CPU tensor, last dim contiguous");
}

}  // namespace

at::Tensor scores(const at::Tensor& q, const at::Tensor& k) {
  check(q, "q"); check(k, "k");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous float32");
  TORCH_CHECK(q.size(3) % 8 == 0 && q.size(3) == k.size(3), "head dim: a multiple of 8, the same for q and k");
  auto s = at::empty({q.size(0), q.size(1), q.size(2), k.size(2)}, q.options());
  if (k.scalar_type() == at::kFloat) scores_impl<float>(q, k, s);
  else if (k.scalar_type() == at::kBFloat16) scores_impl<at::BFloat16>(q, k, s);
  else TORCH_CHECK(false, "k: float32 or bfloat16");
  return s;
}

at::Tensor values(const at::Tensor& p, const at::Tensor& v) {
  check(p, "p"); check(v, "v");
  TORCH_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous(), "p: contiguous float32");
  auto out = at::empty({p.size(0), p.size(1), p.size(2), v.size(3)}, p.options());
  if (v.scalar_type() == at::kFloat) values_impl<float>(p, v, out);
  else if (v.scalar_type() == at::kBFloat16) values_impl<at::BFloat16>(p, v, out);
  else TORCH_CHECK(false, "v: float32 or bfloat16");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores", &scores, "q [B,G,R,D] . k [B,G,W,D] -> [B,G,R,W]");
  m.def("values", &values, "p [B,G,R,W] @ v [B,G,W,D] -> [B,G,R,D]");
}
