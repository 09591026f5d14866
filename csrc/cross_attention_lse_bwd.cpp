// Native CPU backward of the cross-attention with LogSumExp pooling (see the formula in
// fastitm/ops/cross_attention_lse.py). float32 buffers (the Python launcher casts other dtypes).
//
// Per (batch, head), one thread: for each query row it recomputes the logits row S_i [Lk] from q_i
// and K, the softmax P_i, O_i = P_i V, dP_i = dO_i V^T and dS_i, then writes dQ_i and accumulates
// dK += dS_i^T q_i and dV += P_i^T dO_i into the head's own buffers: no [Lq, Lk] map, no atomics,
// and a fixed order of additions (deterministic).
#include <algorithm>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fastitm {
namespace {

FASTITM_MULTIVERSION
void head_bwd(const float* __restrict q, const float* __restrict k, const float* __restrict v,
              const float* __restrict dout, float g, float* __restrict dq, float* __restrict dk,
              float* __restrict dv, const uint8_t* mask, int64_t Lq, int64_t Lk, int64_t D, float scale, bool probs,
              float lam) {
  std::vector<float> s(Lk), p(Lk), dp(Lk), o(D), r(Lk);
  std::fill(dk, dk + Lk * D, 0.0f);
  std::fill(dv, dv + Lk * D, 0.0f);
  for (int64_t i = 0; i < Lq; ++i) {
    const float* qi = q + i * D;
    const float* doi = dout + i * D;
    float m = -INFINITY;
    for (int64_t j = 0; j < Lk; ++j) {
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += qi[d] * k[j * D + d];
      s[j] = (!mask || mask[j] != 0) ? acc * scale : -INFINITY;
      m = std::max(m, s[j]);
    }
    float l = 0.0f;
    for (int64_t j = 0; j < Lk; ++j) {
      p[j] = std::exp(s[j] - m);
      l += p[j];
    }
    const float inv = 1.0f / l;
    for (int64_t j = 0; j < Lk; ++j) p[j] *= inv;
    std::fill(o.begin(), o.end(), 0.0f);
    for (int64_t j = 0; j < Lk; ++j)
      for (int64_t d = 0; d < D; ++d) o[d] += p[j] * v[j * D + d];
    float delta = 0.0f;
    for (int64_t d = 0; d < D; ++d) delta += doi[d] * o[d];
    for (int64_t j = 0; j < Lk; ++j) {
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += doi[d] * v[j * D + d];
      dp[j] = p[j] * (acc - delta);  // dS from the output
    }
    if (!probs) {
      for (int64_t j = 0; j < Lk; ++j) dp[j] += g * p[j];
    } else {
      // R = softmax(lam P) over the valid keys; dLSE/dS = lam P (R - sum P R).
      float xm = -INFINITY;
      for (int64_t j = 0; j < Lk; ++j)
        if (!mask || mask[j] != 0) xm = std::max(xm, lam * p[j]);
      float rl = 0.0f;
      for (int64_t j = 0; j < Lk; ++j) {
        r[j] = (!mask || mask[j] != 0) ? std::exp(lam * p[j] - xm) : 0.0f;
        rl += r[j];
      }
      float pr = 0.0f;
      for (int64_t j = 0; j < Lk; ++j) {
        r[j] /= rl;
        pr += p[j] * r[j];
      }
      for (int64_t j = 0; j < Lk; ++j) dp[j] += g * lam * p[j] * (r[j] - pr);
    }
    float* dqi = dq + i * D;
    for (int64_t d = 0; d < D; ++d) dqi[d] = 0.0f;
    for (int64_t j = 0; j < Lk; ++j) {
      const float ds = dp[j] * scale;
      for (int64_t d = 0; d < D; ++d) {
        dqi[d] += ds * k[j * D + d];
        dk[j * D + d] += ds * qi[d];
        dv[j * D + d] += p[j] * doi[d];
      }
    }
  }
}

}  // namespace

void cross_attention_lse_bwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t dout, uintptr_t dpooled, uintptr_t dq,
                             uintptr_t dk, uintptr_t dv, uintptr_t mask, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                             int64_t D, double scale, bool probs, double lam) {
  check(B > 0 && H > 0 && Lq > 0 && D > 0, "cross_attention_lse_bwd: B, H, Lq and D must be positive");
  check(Lk > 0 && Lk <= 256, "cross_attention_lse_bwd: need 1 <= Lk <= 256, got " + std::to_string(Lk));
  check(q && k && v && dout && dpooled && dq && dk && dv, "cross_attention_lse_bwd: null tensor pointer");
  const float* Q = reinterpret_cast<const float*>(q);
  const float* K = reinterpret_cast<const float*>(k);
  const float* V = reinterpret_cast<const float*>(v);
  const float* DO = reinterpret_cast<const float*>(dout);
  const float* G = reinterpret_cast<const float*>(dpooled);
  float* DQ = reinterpret_cast<float*>(dq);
  float* DK = reinterpret_cast<float*>(dk);
  float* DV = reinterpret_cast<float*>(dv);
  const uint8_t* M = reinterpret_cast<const uint8_t*>(mask);
  const int64_t BH = B * H;
#pragma omp parallel for schedule(static)
  for (int64_t bh = 0; bh < BH; ++bh) {
    head_bwd(Q + bh * Lq * D, K + bh * Lk * D, V + bh * Lk * D, DO + bh * Lq * D, G[bh], DQ + bh * Lq * D,
             DK + bh * Lk * D, DV + bh * Lk * D, M ? M + (bh / H) * Lk : nullptr, Lq, Lk, D, (float)scale, probs,
             (float)lam);
  }
}

}  // namespace fastitm
