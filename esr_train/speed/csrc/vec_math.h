// Vector math shared by esr-train's CPU kernels (decode_attention.cpp, logprob_tiles.cpp, token_choice.cpp).
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#ifdef __AVX2__
#include <immintrin.h>

// exp(x) for x <= 0 (scores minus their maximum, log-probabilities), the Cephes single-precision polynomial
// (about 1e-7 relative error); -inf gives 0, NaN stays NaN.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 is_ninf = _mm256_cmp_ps(x, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);  // x second: max_ps returns it when it is NaN
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(is_ninf, _mm256_mul_ps(y, _mm256_castsi256_ps(n)));
}
#endif

// x[0..n) = exp(x - max) in place, for entries <= max; returns their float sum (8 lanes summed in
// order, then the scalar tail), the softmax numerators of the attention and the token choice.
inline float exp_shifted_in_place(float* x, int64_t n, float max) {
  float sum = 0.f;
  int64_t i = 0;
#ifdef __AVX2__
  const __m256 m = _mm256_set1_ps(max);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (int j = 0; j < 8; ++j) sum += lanes[j];
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  return sum;
}
