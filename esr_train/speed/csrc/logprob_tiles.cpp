// The two per-tile folds of TRL's chunked log-prob head, for CPU tiles (esr_train/training/
// logprob_tiles.py says why). A tile is [n, C] logits of n tokens against C vocabulary entries,
// bfloat16 or float32, rows `stride` elements apart. Each row is one task:
//   forward_tile:  z = tile * logit_scale * inv_t folded into the running log-sum-exp statistics
//                  (max, sum of exp, of exp * z, of exp^2, sum of z, max before the target, the
//                  target's logit) in two passes over the row;
//   backward_tile: the gradient of the log-probability (and of the entropy) with respect to the
//                  tile's logits, written over the tile in one pass.
// Arithmetic is float32 throughout, in the order TRL's torch fallback uses; sums run in a
// different order and exp is a polynomial (vec_math.h, about 1e-7 relative), so results agree with TRL's to
// float32 rounding, not bit for bit.
#include "torch_headers.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include "vec_math.h"

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline float load1(const float* p) { return *p; }
inline float load1(const at::BFloat16* p) { return static_cast<float>(*p); }
inline void store1(float* p, float v) { *p = v; }
inline void store1(at::BFloat16* p, float v) { *p = at::BFloat16(v); }

#ifdef __AVX2__
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
// Round to nearest even, NaN to 0x7fc0: c10::BFloat16's own conversion, 8 lanes at a time.
inline void store8(at::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

struct Flags {
  bool entropy, sq, mean, top1;
};

// One row of forward_tile; z is scratch for C floats.
template <typename T>
void forward_row(const T* x, int64_t C, int64_t local, float scale, float inv_t, const Flags& f, float* z,
                 float& running_max, float& sum_exp, float& x_sum_exp, float& sq_sum_exp, float& z_sum,
                 float& max_before, float& target) {
  float m = NEG_INF, zs = 0.f;
  int64_t j = 0;
#ifdef __AVX2__
  {
    const __m256 vs = _mm256_set1_ps(scale), vt = _mm256_set1_ps(inv_t);
    __m256 vm = _mm256_set1_ps(NEG_INF), vz = _mm256_setzero_ps();
    for (; j + 8 <= C; j += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_mul_ps(load8(x + j), vs), vt);
      _mm256_storeu_ps(z + j, v);
      vm = _mm256_max_ps(vm, v);
      vz = _mm256_add_ps(vz, v);
    }
    m = hmax(vm);
    zs = hsum(vz);
  }
#endif
  for (; j < C; ++j) {
    z[j] = (load1(x + j) * scale) * inv_t;
    m = std::max(m, z[j]);
    zs += z[j];
  }
  if (std::isnan(zs) || (std::isinf(zs) && zs > 0.f)) {
    // a NaN or +inf logit: TRL's statistics turn NaN (its max and exps propagate it), so do these
    const float nan = std::numeric_limits<float>::quiet_NaN();
    running_max = sum_exp = x_sum_exp = sq_sum_exp = z_sum = nan;
    return;
  }
  if (f.mean) z_sum += zs;
  if (f.top1) {
    const int64_t before = std::min(std::max<int64_t>(local, 0), C);
    float mb = NEG_INF;
    for (int64_t k = 0; k < before; ++k) mb = std::max(mb, z[k]);
    max_before = std::max(max_before, mb);
  }
  const float new_m = std::max(running_max, m);
  const float rescale = std::exp(running_max - new_m);
  float se = 0.f, sez = 0.f, see = 0.f;
  j = 0;
#ifdef __AVX2__
  {
    const __m256 vm = _mm256_set1_ps(new_m);
    __m256 a = _mm256_setzero_ps(), b = a, c = a;
    for (; j + 8 <= C; j += 8) {
      const __m256 v = _mm256_loadu_ps(z + j);
      const __m256 e = exp_nonpositive(_mm256_sub_ps(v, vm));
      a = _mm256_add_ps(a, e);
      b = _mm256_fmadd_ps(e, v, b);
      c = _mm256_fmadd_ps(e, e, c);
    }
    se = hsum(a);
    sez = hsum(b);
    see = hsum(c);
  }
#endif
  for (; j < C; ++j) {
    const float e = std::exp(z[j] - new_m);
    se += e;
    sez += e * z[j];
    see += e * e;
  }
  sum_exp = sum_exp * rescale + se;
  if (f.entropy) x_sum_exp = x_sum_exp * rescale + sez;
  if (f.sq) sq_sum_exp = sq_sum_exp * (rescale * rescale) + see;
  running_max = new_m;
  if (local >= 0 && local < C) target = z[local];
}

// One row of backward_tile, in place.
template <typename T>
void backward_row(T* x, int64_t C, int64_t local, float scale, float inv_t, float log_z, float entropy,
                  float g_lp, float g_ent, bool has_lp, bool has_ent) {
  int64_t j = 0;
#ifdef __AVX2__
  {
    const __m256 vs = _mm256_set1_ps(scale), vt = _mm256_set1_ps(inv_t), vlz = _mm256_set1_ps(log_z);
    const __m256 vent = _mm256_set1_ps(entropy), vglp = _mm256_set1_ps(g_lp), vgent = _mm256_set1_ps(g_ent);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i vlocal = _mm256_set1_epi32(static_cast<int>(std::max<int64_t>(std::min<int64_t>(local, C), -1)));
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; j + 8 <= C; j += 8) {
      const __m256 z = _mm256_mul_ps(_mm256_mul_ps(load8(x + j), vs), vt);
      const __m256 lp = _mm256_sub_ps(z, vlz);
      const __m256 p = exp_nonpositive(lp);
      __m256 g = _mm256_setzero_ps();
      if (has_lp) {
        const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j)), iota);
        const __m256 is_target = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(idx, vlocal)), one);
        g = _mm256_mul_ps(vglp, _mm256_sub_ps(is_target, p));
      }
      if (has_ent) g = _mm256_sub_ps(g, _mm256_mul_ps(_mm256_mul_ps(vgent, p), _mm256_add_ps(lp, vent)));
      store8(x + j, _mm256_mul_ps(_mm256_mul_ps(g, vt), vs));
    }
  }
#endif
  for (; j < C; ++j) {
    const float z = (load1(x + j) * scale) * inv_t;
    const float lp = z - log_z;
    const float p = std::exp(lp);
    float g = 0.f;
    if (has_lp) g = g_lp * ((j == local ? 1.f : 0.f) - p);
    if (has_ent) g -= (g_ent * p) * (lp + entropy);
    store1(x + j, (g * inv_t) * scale);
  }
}

void check_tile(const at::Tensor& tile) {
  TORCH_CHECK(tile.device().is_cpu() && tile.dim() == 2 && tile.stride(1) == 1, "tile: a CPU [n, C] tensor with unit column stride");
  TORCH_CHECK(tile.scalar_type() == at::kFloat || tile.scalar_type() == at::kBFloat16, "tile: float32 or bfloat16");
  TORCH_CHECK(tile.size(1) < (int64_t(1) << 30), "tile: too many columns");
}

// Calls fn with a null pointer of the tile's element type (bfloat16 or float).
template <typename F>
void dispatch(const at::Tensor& tile, F&& fn) {
  if (tile.scalar_type() == at::kBFloat16)
    fn(static_cast<at::BFloat16*>(nullptr));
  else
    fn(static_cast<float*>(nullptr));
}

const int64_t* target_ids(const at::Tensor& targets, int64_t n) {
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == n, "targets: int64 [n]");
  return targets.data_ptr<int64_t>();
}

float* f32(at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, what, ": contiguous float32 [n]");
  return t.data_ptr<float>();
}

void forward_tile(at::Tensor tile, at::Tensor targets, at::Tensor running_max, at::Tensor sum_exp,
                  at::Tensor x_sum_exp, at::Tensor sq_sum_exp, at::Tensor z_sum, at::Tensor max_before_target,
                  at::Tensor target_logit, int64_t vocab_start, double logit_scale, double inv_t, bool entropy,
                  bool sq, bool mean, bool top1) {
  check_tile(tile);
  const int64_t n = tile.size(0), C = tile.size(1), stride = tile.stride(0);
  const int64_t* tg = target_ids(targets, n);
  float *rm = f32(running_max, n, "running_max"), *se = f32(sum_exp, n, "sum_exp"),
        *xs = f32(x_sum_exp, n, "x_sum_exp"), *ss = f32(sq_sum_exp, n, "sq_sum_exp"), *zs = f32(z_sum, n, "z_sum"),
        *mb = f32(max_before_target, n, "max_before_target"), *tl = f32(target_logit, n, "target_logit");
  const Flags f{entropy, sq, mean, top1};
  const float s = static_cast<float>(logit_scale), t = static_cast<float>(inv_t);
  dispatch(tile, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* base = static_cast<const T*>(tile.data_ptr());
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> z(static_cast<size_t>(C));
      for (int64_t i = begin; i < end; ++i)
        forward_row(base + i * stride, C, tg[i] - vocab_start, s, t, f, z.data(), rm[i], se[i], xs[i], ss[i], zs[i],
                    mb[i], tl[i]);
    });
  });
}

void backward_tile(at::Tensor tile, at::Tensor targets, at::Tensor log_z, at::Tensor entropy,
                   at::Tensor grad_logprobs, at::Tensor grad_entropy, int64_t vocab_start, double logit_scale,
                   double inv_t, bool has_lp, bool has_ent) {
  check_tile(tile);
  const int64_t n = tile.size(0), C = tile.size(1), stride = tile.stride(0);
  const int64_t* tg = target_ids(targets, n);
  float *lz = f32(log_z, n, "log_z"), *en = f32(entropy, n, "entropy");
  float* glp = has_lp ? f32(grad_logprobs, n, "grad_logprobs") : nullptr;
  float* gent = has_ent ? f32(grad_entropy, n, "grad_entropy") : nullptr;
  const float s = static_cast<float>(logit_scale), t = static_cast<float>(inv_t);
  dispatch(tile, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* base = static_cast<T*>(tile.data_ptr());
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        backward_row(base + i * stride, C, tg[i] - vocab_start, s, t, lz[i], en[i], glp ? glp[i] : 0.f,
                     gent ? gent[i] : 0.f, has_lp, has_ent);
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_tile", &forward_tile, "fold a tile of logits into the running log-sum-exp statistics");
  m.def("backward_tile", &backward_tile, "a tile of logits -> the log-prob / entropy gradient, in place");
}
