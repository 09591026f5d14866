// Native CPU cross-attention with row-wise LogSumExp pooling (see fastitm/ops/cross_attention_lse.py).
//
// Per (batch, head): K is transposed once to [D][Lk rounded up to 16] and V padded to
// [Lk][D rounded up to 16], both float32 and small enough for L1/L2 (77 x 64 floats = 20 KB).
// Query rows go in tiles of kRows: the logits tile S [kRows][Lk] is built with register-blocked
// FMAs, the softmax, its LSE and the pooling run on it in place, and P V writes the output. The
// [Lq, Lk] map never exists beyond one tile. Work items (head, row tile) run in parallel; each
// writes its own partial pooled sum, which is reduced in a fixed order (deterministic).
#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "ops.h"

namespace fastitm {
namespace {

constexpr int kRows = 8;   // query rows per tile
constexpr int kLanes = 16; // inner chunk width (one AVX-512 register of floats)

FASTITM_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// S[:, j0 : j0 + 16 NV] = q K^T + bias for the tile's rows: kRows x NV vector accumulators held in
// registers across the D loop; each broadcast q value feeds NV multiply-adds, each K vector kRows.
template <int NV>
FASTITM_INLINE void s_block(const float* __restrict qf, const float* __restrict kt, const float* __restrict bias,
                            float* __restrict s, int64_t D, int64_t NP, int64_t j0) {
  v16f acc[kRows][NV] = {};
  for (int64_t d = 0; d < D; ++d) {
    v16f kv[NV];
    for (int c = 0; c < NV; ++c) kv[c] = loadv(kt + d * NP + j0 + c * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const float qv = qf[r * D + d];
      for (int c = 0; c < NV; ++c) acc[r][c] += qv * kv[c];
    }
  }
  for (int c = 0; c < NV; ++c) {
    const v16f b = loadv(bias + j0 + c * kLanes);
    for (int r = 0; r < kRows; ++r) storev(s + r * NP + j0 + c * kLanes, acc[r][c] + b);
  }
}

// O[:, d0 : d0 + 16 NV] = (e V) / l over the keys, likewise register-blocked.
template <int NV>
FASTITM_INLINE void pv_block(const float* __restrict s, const float* __restrict vp, const float* __restrict row_inv,
                             float* __restrict o, int64_t Lk, int64_t NP, int64_t DP, int64_t d0) {
  v16f acc[kRows][NV] = {};
  for (int64_t j = 0; j < Lk; ++j) {
    v16f vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = loadv(vp + j * DP + d0 + c * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const float p = s[r * NP + j];
      for (int c = 0; c < NV; ++c) acc[r][c] += p * vv[c];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) storev(o + r * DP + d0 + c * kLanes, acc[r][c] * row_inv[r]);
}

struct Shape {
  int64_t Lk, D, NP, DP;
};

// One tile of query rows of one head. qf [kRows][D] (pre-scaled), kt [D][NP], vp [Lk][DP],
// key_bias [NP] (0 = valid key, -inf = masked or padding), s [kRows][NP] scratch, o [kRows][DP] out. Returns the tile's pooled sum.
FASTITM_MULTIVERSION
float attention_tile(const float* __restrict qf, const float* __restrict kt, const float* __restrict vp,
                     const float* __restrict key_bias, float* __restrict s, float* __restrict o, int nrows,
                     Shape sh, bool probs, float lam) {
  const int64_t D = sh.D, NP = sh.NP, DP = sh.DP, Lk = sh.Lk;
  float row_inv[kRows];
  for (int r = 0; r < kRows; ++r) row_inv[r] = 0.0f;
  // S = q K^T + bias (0 for valid keys, -inf for masked or padding keys), 32 keys at a time.
  int64_t j0 = 0;
  for (; j0 + 2 * kLanes <= NP; j0 += 2 * kLanes) s_block<2>(qf, kt, key_bias, s, D, NP, j0);
  if (j0 < NP) s_block<1>(qf, kt, key_bias, s, D, NP, j0);
  float pooled = 0.0f;
  for (int r = 0; r < nrows; ++r) {
    float* sr = s + r * NP;
    v16f vmax = loadv(sr);
    for (int64_t j0 = kLanes; j0 < NP; j0 += kLanes) {
      const v16f x = loadv(sr + j0);
      vmax = x > vmax ? x : vmax;
    }
    const float m = hmax(vmax);
    // exp(-inf) is 0, so masked keys drop out of the sum and of P V.
    v16f vsum = {};
    for (int64_t j0 = 0; j0 < NP; j0 += kLanes) {
      const v16f e = exp_neg_v(loadv(sr + j0) - m);
      storev(sr + j0, e);
      vsum += e;
    }
    const float l = hsum(vsum);
    const float inv = 1.0f / l;
    row_inv[r] = inv;  // P = e / l: the 1/l is applied to the output rows, not to every p
    if (!probs) {
      pooled += m + std::log(l);
    } else {
      // x_j = lam * p_j; its maximum is lam * max p = lam / l (the max logit has p = 1 / l).
      const float xmax = lam * inv;
      const float lam_inv = lam * inv;
      v16f t = {};
      for (int64_t j0 = 0; j0 < NP; j0 += kLanes) {
        const v16f e = exp_neg_v(loadv(sr + j0) * lam_inv - xmax);
        t += loadv(key_bias + j0) == 0.0f ? e : (v16f){};
      }
      pooled += xmax + std::log(hsum(t));
    }
  }
  for (int r = nrows; r < kRows; ++r)
    for (int64_t j = 0; j < NP; ++j) s[r * NP + j] = 0.0f;
  // O = P V, 32 output features at a time.
  int64_t d0 = 0;
  for (; d0 + 2 * kLanes <= DP; d0 += 2 * kLanes) pv_block<2>(s, vp, row_inv, o, Lk, NP, DP, d0);
  if (d0 < DP) pv_block<1>(s, vp, row_inv, o, Lk, NP, DP, d0);
  return pooled;
}

template <typename T>
void run(const T* q, const T* k, const T* v, T* out, float* pooled, const uint8_t* mask, int64_t B,
         int64_t H, int64_t Lq, int64_t Lk, int64_t D, float scale, bool probs, float lam) {
  const Shape sh{Lk, D, round_up(Lk, kLanes), round_up(D, kLanes)};
  const int64_t BH = B * H, ntiles = (Lq + kRows - 1) / kRows;
  // K^T and padded V per head, float32, built once and shared by every row tile.
  std::vector<float> kt(BH * D * sh.NP, 0.0f), vp(BH * Lk * sh.DP, 0.0f);
  std::vector<float> key_bias(B * sh.NP, -INFINITY);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < Lk; ++j) key_bias[b * sh.NP + j] = (!mask || mask[b * Lk + j] != 0) ? 0.0f : -INFINITY;
#pragma omp parallel for schedule(static)
  for (int64_t bh = 0; bh < BH; ++bh) {
    const T* kb = k + bh * Lk * D;
    const T* vb = v + bh * Lk * D;
    float* ktb = kt.data() + bh * D * sh.NP;
    float* vpb = vp.data() + bh * Lk * sh.DP;
    for (int64_t j = 0; j < Lk; ++j)
      for (int64_t d = 0; d < D; ++d) {
        ktb[d * sh.NP + j] = load(kb, j * D + d);
        vpb[j * sh.DP + d] = load(vb, j * D + d);
      }
  }
  std::vector<float> partial(BH * ntiles);
#pragma omp parallel
  {
    std::vector<float> qf(kRows * D), s(kRows * sh.NP), o(kRows * sh.DP);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < BH * ntiles; ++item) {
      const int64_t bh = item / ntiles, r0 = (item % ntiles) * kRows;
      const int nrows = (int)std::min<int64_t>(kRows, Lq - r0);
      const T* qb = q + (bh * Lq + r0) * D;
      // Rows are contiguous in q: one flat, vectorizable loop; the rows past Lq are zero.
      for (int64_t x = 0; x < nrows * D; ++x) qf[x] = load(qb, x) * scale;
      for (int64_t x = nrows * D; x < kRows * D; ++x) qf[x] = 0.0f;
      partial[item] = attention_tile(qf.data(), kt.data() + bh * D * sh.NP, vp.data() + bh * Lk * sh.DP,
                                     key_bias.data() + (bh / H) * sh.NP, s.data(), o.data(), nrows, sh, probs, lam);
      T* ob = out + (bh * Lq + r0) * D;
      for (int r = 0; r < nrows; ++r)
        for (int64_t d = 0; d < D; ++d) store(ob, r * D + d, o[r * sh.DP + d]);
    }
  }
  for (int64_t bh = 0; bh < BH; ++bh) {
    float acc = 0.0f;
    for (int64_t t = 0; t < ntiles; ++t) acc += partial[bh * ntiles + t];
    pooled[bh] = acc;
  }
}

}  // namespace

void cross_attention_lse(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t pooled,
                         uintptr_t mask, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, double scale,
                         bool probs, double lam, bool half) {
  check(B > 0 && H > 0 && Lq > 0 && D > 0, "cross_attention_lse: B, H, Lq and D must be positive");
  check(Lk > 0 && Lk <= 256, "cross_attention_lse: need 1 <= Lk <= 256, got " + std::to_string(Lk));
  check(q && k && v && out && pooled, "cross_attention_lse: null tensor pointer");
  check(lam > 0, "cross_attention_lse: lam must be positive");
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask);
  if (half) {
    run(reinterpret_cast<const uint16_t*>(q), reinterpret_cast<const uint16_t*>(k),
        reinterpret_cast<const uint16_t*>(v), reinterpret_cast<uint16_t*>(out), reinterpret_cast<float*>(pooled), m,
        B, H, Lq, Lk, D, (float)scale, probs, (float)lam);
  } else {
    run(reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k), reinterpret_cast<const float*>(v),
        reinterpret_cast<float*>(out), reinterpret_cast<float*>(pooled), m, B, H, Lq, Lk, D, (float)scale, probs,
        (float)lam);
  }
}

}  // namespace fastitm
