// The decode loop's token choice for CPU float32 scores (esr_train/token_choice.py says why).
// Each row of `logits` [B, V] is one task, worked in a scratch row that stays in the core's cache:
//   1. the repetition penalty on every token of ids[b, pad[b]:] (score < 0: times the penalty, else
//      divided by it, each token once, as transformers' RepetitionPenaltyLogitsProcessor);
//   2. greedy: the first index of the largest score (torch.argmax's tie rule);
//      sampled: scores / temperature, their max, exp(score - max) with a float sum per block of
//      64, then one draw by inverse CDF: target = (1 - u) * total, the first token whose running
//      sum reaches it (the blocks' sums walked first, then the block's tokens one by one).
// A row holding a NaN (or, sampled, a +inf) score gets -1: the caller draws it with torch's ops.
// Arithmetic is float32 as torch's; the exps are a polynomial (vec_math.h, about 1e-7 relative) and
// the sums run in another order, so a draw can differ from torch's only where u lies within
// rounding of a boundary between two tokens' cumulative sums.
#include "torch_headers.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include "vec_math.h"

namespace {

constexpr int64_t BLOCK = 64;

// scores of one row after the repetition penalty, written into `out`
void penalised(const float* logits, const int64_t* ids, int64_t n_ids, int64_t vocab, float penalty, float* out) {
  std::memcpy(out, logits, vocab * sizeof(float));
  if (penalty == 1.f) return;
  for (int64_t t = 0; t < n_ids; ++t) {
    const int64_t id = ids[t];
    if (id < 0 || id >= vocab) continue;
    const float s = logits[id];  // read from the logits, so a repeated token is penalised once
    out[id] = s < 0 ? s * penalty : s / penalty;
  }
}

// the first index of the largest score (torch.argmax's tie rule), or -1 where a score is NaN
int64_t argmax(const float* row, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(row[i])) return -1;
    if (row[i] > row[best]) best = i;
  }
  return best;
}

// scores / temperature in place; returns their max (NaN if any is NaN)
float scale_and_max(float* row, int64_t n, float temperature) {
  int64_t i = 0;
  float best = -std::numeric_limits<float>::infinity();
  bool nan = false;
#ifdef __AVX2__
  const __m256 t = _mm256_set1_ps(temperature);
  __m256 vmax = _mm256_set1_ps(best), vnan = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_div_ps(_mm256_loadu_ps(row + i), t);
    _mm256_storeu_ps(row + i, x);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, x);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (float v : lanes) best = std::max(best, v);
  nan = _mm256_movemask_ps(vnan) != 0;
#endif
  for (; i < n; ++i) {
    row[i] = row[i] / temperature;
    nan = nan || std::isnan(row[i]);
    best = std::max(best, row[i]);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : best;
}

// exp(row - max) in place; the float sum of each block of BLOCK entries into `blocks`
void exps(float* row, int64_t n, float max, double* blocks) {
  for (int64_t start = 0, k = 0; start < n; start += BLOCK, ++k)
    blocks[k] = exp_shifted_in_place(row + start, std::min(BLOCK, n - start), max);
}

// the first index whose running sum of the exps reaches (1 - u) of their total
int64_t draw(const float* e, int64_t n, const double* blocks, float u) {
  const int64_t n_blocks = (n + BLOCK - 1) / BLOCK;
  double total = 0.0;
  for (int64_t k = 0; k < n_blocks; ++k) total += blocks[k];
  const double target = (1.0 - static_cast<double>(u)) * total;  // in (0, total]
  double acc = 0.0;
  int64_t k = 0;
  for (; k < n_blocks - 1 && acc + blocks[k] < target; ++k) acc += blocks[k];
  const int64_t start = k * BLOCK, stop = std::min(n, start + BLOCK);
  int64_t last = -1;
  for (int64_t i = start; i < stop; ++i) {
    if (e[i] <= 0.f) continue;
    acc += e[i];
    last = i;
    if (acc >= target) return i;
  }
  if (last >= 0) return last;  // the block's float sum ran past its tokens' running one: its last drawable token
  for (int64_t i = start - 1; i >= 0; --i)  // an empty last block (unreachable with a positive total)
    if (e[i] > 0.f) return i;
  return 0;
}

}  // namespace

// logits [B, V] float32 (rows contiguous), ids [B, T] int64, pad [B] int64, uniforms [B] float32 (read when sampling)
at::Tensor choose(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& pad, double penalty,
                  double temperature, const at::Tensor& uniforms, bool sample) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "token_choice: logits must be [B, V] float32 with contiguous rows");
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.size(0) == logits.size(0),
              "token_choice: ids must be contiguous [B, T] int64");
  TORCH_CHECK(pad.dim() == 1 && pad.scalar_type() == at::kLong && pad.is_contiguous() && pad.size(0) == logits.size(0),
              "token_choice: pad must be contiguous [B] int64");
  TORCH_CHECK(!sample || (uniforms.dim() == 1 && uniforms.scalar_type() == at::kFloat && uniforms.is_contiguous()
                          && uniforms.size(0) == logits.size(0)),
              "token_choice: uniforms must be contiguous [B] float32");
  TORCH_CHECK(!sample || temperature > 0, "token_choice: temperature must be positive");
  const int64_t rows = logits.size(0), vocab = logits.size(1), width = ids.size(1);
  auto out = at::empty({rows}, at::kLong);
  if (vocab == 0) return out.fill_(-1);
  const float* L = logits.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  const int64_t* I = ids.data_ptr<int64_t>();
  const int64_t* P = pad.data_ptr<int64_t>();
  const float* U = sample ? uniforms.data_ptr<float>() : nullptr;
  int64_t* O = out.data_ptr<int64_t>();
  const float pen = static_cast<float>(penalty), temp = static_cast<float>(temperature);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(vocab);
    std::vector<double> blocks((vocab + BLOCK - 1) / BLOCK);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t skip = std::clamp<int64_t>(P[b], 0, width);
      penalised(L + b * stride, I + b * width + skip, width - skip, vocab, pen, row.data());
      if (!sample) {
        O[b] = argmax(row.data(), vocab);
        continue;
      }
      const float max = scale_and_max(row.data(), vocab, temp);
      if (!std::isfinite(max)) {  // NaN or +inf: torch's softmax decides what that means
        O[b] = -1;
        continue;
      }
      exps(row.data(), vocab, max, blocks.data());
      O[b] = draw(row.data(), vocab, blocks.data(), U[b]);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("choose", &choose, "repetition penalty, temperature and one token per row (argmax or an inverse-CDF draw)");
}
