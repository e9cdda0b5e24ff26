// The decode step's RMSNorm and rotary embedding, one pass each (esr_train/elementwise.py says
// why), for float32 or bfloat16 tensors. The arithmetic and its roundings follow transformers step for step:
//   Llama  RMSNorm: h = float(x); h = h * (1 / sqrt(mean(h * h) + eps)); y = w * dtype(h)  (product rounded)
//   Gemma3 RMSNorm: y = dtype(float(x) * (1 / sqrt(mean(x * x) + eps)) * (1 + float(w)))
//   RoPE (apply_rotary_pos_emb): y = dtype(dtype(x * cos) + dtype(rotate_half(x) * sin))
// The RoPE is the same bit for bit. The RMSNorm's mean sums in another order (8 lanes, fused
// multiply-adds), so it agrees with torch's to float32 rounding; in bfloat16 a rounding moves now and
// then by one unit.
// No fused multiply-adds where the source has a product then a sum: GCC contracts them by default,
// and transformers rounds the product first.
#pragma GCC optimize("fp-contract=off")
#include "torch_headers.h"
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// float <-> storage dtype; bf16 rounds to nearest even and keeps NaN a quiet NaN, as c10::BFloat16.
inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline at::BFloat16 from_float<at::BFloat16>(float v) { return at::BFloat16(v); }
template <typename T> inline float round_to(float v) { return to_float(from_float<T>(v)); }

#ifdef __AVX2__
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
// float32 -> bfloat16 bits, round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's rule)
inline __m128i bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: [r0..3 r0..3 | r4..7 r4..7]
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(at::BFloat16* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_bits(v)); }
// v rounded to T and back (identity for float32)
inline __m256 round8(__m256 v, const float*) { return v; }
inline __m256 round8(__m256 v, const at::BFloat16*) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16_bits(v)), 16));
}
#endif

// One row's RMSNorm into y; returns the row's 1 / sqrt(mean(x * x) + eps), which the backward reuses.
template <typename T>
float rms_norm_row(const T* x, const T* w, T* y, int64_t H, float eps, bool gemma) {
  float sum = 0.f;
  int64_t i = 0;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= H; i += 8) {
    const __m256 v = load8(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (int j = 0; j < 8; ++j) sum += lanes[j];
#endif
  for (; i < H; ++i) {
    const float v = to_float(x[i]);
    sum += v * v;
  }
  const float r = 1.f / std::sqrt(sum / static_cast<float>(H) + eps);
  i = 0;
#ifdef __AVX2__
  const __m256 rv = _mm256_set1_ps(r);
  for (; i + 8 <= H; i += 8) {
    const __m256 h = _mm256_mul_ps(load8(x + i), rv);
    const __m256 out = gemma ? _mm256_mul_ps(h, _mm256_add_ps(_mm256_set1_ps(1.f), load8(w + i)))
                             : _mm256_mul_ps(load8(w + i), round8(h, x));
    store8(y + i, out);
  }
#endif
  for (; i < H; ++i) {
    const float h = to_float(x[i]) * r;
    y[i] = from_float<T>(gemma ? h * (1.f + to_float(w[i])) : to_float(w[i]) * round_to<T>(h));
  }
  return r;
}

// The gradient of one row's RMSNorm with respect to x, the weight frozen, following torch's autograd
// through the module's ops: g = dtype(gy * w) (Llama; Gemma: float(gy) * (1 + w), no rounding), then
// gx = dtype(r * g - x * r^3 * sum(g * x) / H). g is kept in `scratch` (H floats).
template <typename T>
void rms_norm_backward_row(const T* gy, const T* x, const T* w, float r, T* gx, int64_t H, bool gemma, float* scratch) {
  float dot = 0.f;
  int64_t i = 0;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= H; i += 8) {
    const __m256 g = gemma ? _mm256_mul_ps(load8(gy + i), _mm256_add_ps(_mm256_set1_ps(1.f), load8(w + i)))
                           : round8(_mm256_mul_ps(load8(gy + i), load8(w + i)), x);
    _mm256_storeu_ps(scratch + i, g);
    acc = _mm256_fmadd_ps(g, load8(x + i), acc);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (int j = 0; j < 8; ++j) dot += lanes[j];
#endif
  for (; i < H; ++i) {
    const float g = gemma ? to_float(gy[i]) * (1.f + to_float(w[i])) : round_to<T>(to_float(gy[i]) * to_float(w[i]));
    scratch[i] = g;
    dot += g * to_float(x[i]);
  }
  const float c = dot * r * r * r / static_cast<float>(H);
  i = 0;
#ifdef __AVX2__
  const __m256 rv = _mm256_set1_ps(r), cv = _mm256_set1_ps(c);
  for (; i + 8 <= H; i += 8)
    store8(gx + i, _mm256_sub_ps(_mm256_mul_ps(rv, _mm256_loadu_ps(scratch + i)), _mm256_mul_ps(load8(x + i), cv)));
#endif
  for (; i < H; ++i) gx[i] = from_float<T>(r * scratch[i] - to_float(x[i]) * c);
}

// f(T{}) with T float or at::BFloat16 as `type` says.
template <typename F>
void with_dtype(at::ScalarType type, F f) {
  if (type == at::kFloat) f(float{});
  else if (type == at::kBFloat16) f(at::BFloat16{});
  else TORCH_CHECK(false, "float32 or bfloat16");
}

void check(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), what, ": a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what, ": float32 or bfloat16");
}

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  check(x, "x");
  check(weight, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.scalar_type() == x.scalar_type(),
              "weight: [H] in x's dtype");
}

// x [..., H] and weight [H], one dtype. gemma: Gemma 3's (1 + w) scaling in float32, else Llama's.
// Returns y and, per row of H, the float32 1 / sqrt(mean(x * x) + eps) for rms_norm_backward.
std::vector<at::Tensor> rms_norm_keep(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma) {
  check_norm(x, weight);
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  auto y = at::empty_like(x);
  auto inv = at::empty({rows}, x.options().dtype(at::kFloat));
  with_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    float* ip = inv.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) ip[r] = rms_norm_row<T>(xp + r * H, wp, yp + r * H, H, static_cast<float>(eps), gemma);
    });
  });
  return {y, inv};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma) {
  return rms_norm_keep(x, weight, eps, gemma)[0];
}

// grad_y and x [..., H], weight [H], inv [rows] from rms_norm_keep: the gradient with respect to x.
at::Tensor rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& inv, bool gemma) {
  check_norm(x, weight);
  check(grad_y, "grad_y");
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(), "grad_y: x's shape and dtype");
  TORCH_CHECK(inv.scalar_type() == at::kFloat && inv.is_contiguous() && inv.numel() == rows, "inv: [rows] float32");
  auto gx = at::empty_like(x);
  with_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* gp = grad_y.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    const float* ip = inv.data_ptr<float>();
    T* op = gx.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      std::vector<float> scratch(H);
      for (int64_t r = b; r < e; ++r)
        rms_norm_backward_row<T>(gp + r * H, xp + r * H, wp, ip[r], op + r * H, H, gemma, scratch.data());
    });
  });
  return gx;
}

// One rotated row of D (D even): y[d] = r(r(x[d] c[d]) + r(-x[d + D/2] s[d])) for d < D/2, and
// y[d] = r(r(x[d] c[d]) + r(x[d - D/2] s[d])) above, r the rounding to T.
template <typename T>
void rope_row(const T* x, const T* c, const T* s, T* y, int64_t D) {
  const int64_t half = D / 2;
  int64_t d = 0;
#ifdef __AVX2__
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (; d + 8 <= half; d += 8) {
    const __m256 x1 = load8(x + d), x2 = load8(x + half + d);
    const __m256 lo = _mm256_add_ps(round8(_mm256_mul_ps(x1, load8(c + d)), x),
                                    round8(_mm256_mul_ps(_mm256_xor_ps(x2, sign), load8(s + d)), x));
    const __m256 hi = _mm256_add_ps(round8(_mm256_mul_ps(x2, load8(c + half + d)), x),
                                    round8(_mm256_mul_ps(x1, load8(s + half + d)), x));
    store8(y + d, lo);
    store8(y + half + d, hi);
  }
#endif
  for (; d < half; ++d) {
    const float x1 = to_float(x[d]), x2 = to_float(x[half + d]);
    y[d] = from_float<T>(round_to<T>(x1 * to_float(c[d])) + round_to<T>(-x2 * to_float(s[d])));
    y[half + d] = from_float<T>(round_to<T>(x2 * to_float(c[half + d])) + round_to<T>(x1 * to_float(s[half + d])));
  }
}

template <typename T>
void rope_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& y) {
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), ct = cos.stride(1);
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, B * H * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (H * L), h = (i / L) % H, t = i % L;
      rope_row<T>(xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2), cp + b * cb + t * ct, sp + b * cb + t * ct,
                  yp + i * D, D);
    }
  });
}

// x [B, H, L, D] (last dim contiguous, any other strides), cos and sin [B or 1, L, D] contiguous, one
// dtype; returns the rotated x, contiguous.
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "x: a CPU [B, H, L, D] tensor, last dim contiguous and even");
  check(cos, "cos");
  check(sin, "sin");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && (cos.size(0) == x.size(0) || cos.size(0) == 1)
              && cos.size(1) == x.size(2) && cos.size(2) == x.size(3), "cos, sin: [B or 1, L, D]");
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() && sin.scalar_type() == cos.scalar_type(), "x, cos, sin: one dtype");
  auto y = at::empty(x.sizes(), x.options());
  with_dtype(x.scalar_type(), [&](auto tag) { rope_into<decltype(tag)>(x, cos, sin, y); });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row as transformers' Llama (gemma=False) or Gemma 3 module");
  m.def("rms_norm_keep", &rms_norm_keep, "rms_norm, and each row's 1 / rms for the backward");
  m.def("rms_norm_backward", &rms_norm_backward, "the RMSNorm's gradient with respect to x (weight frozen)");
  m.def("rope", &rope, "transformers' apply_rotary_pos_emb for one tensor");
}
