// Native CPU fused error reduction (see fastitm/ops/error_reduce.py).
//
// Each packed UNet row r is compared with its target row: err = ||pred_r - target||_2 (L2) or the
// mean of squares (MSE), in float32 with lane-array accumulators that the compiler vectorizes.
// Rows are independent, so they run in parallel; the scatter into the unconditional buffer, the
// per-timestep values and the score matrix runs afterwards in row order (deterministic), the
// unconditional rows first so that text rows of the same batch can subtract them.
#include "common.h"
#include "ops.h"

namespace fastitm {
namespace {

constexpr int kLanes = 16;

template <typename T>
FASTITM_MULTIVERSION double row_sq_error(const T* __restrict a, const T* __restrict b, int64_t F) {
  float acc[kLanes] = {};
  int64_t j0 = 0;
  for (; j0 + kLanes <= F; j0 += kLanes)
    for (int jj = 0; jj < kLanes; ++jj) {
      const float d = load(a, j0 + jj) - load(b, j0 + jj);
      acc[jj] += d * d;
    }
  double total = 0.0;
  for (int jj = 0; jj < kLanes; ++jj) total += acc[jj];
  for (; j0 < F; ++j0) {
    const float d = load(a, j0) - load(b, j0);
    total += d * d;
  }
  return total;
}

template <typename T>
void run(const T* pred, const T* target, int64_t R, int64_t F, const int64_t* row_target, float* err, bool mse) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const double sq = row_sq_error(pred + r * F, target + row_target[r] * F, F);
    err[r] = mse ? (float)(sq / (double)F) : (float)std::sqrt(sq);
  }
}

}  // namespace

void error_reduce(uintptr_t pred, uintptr_t target, int64_t R, int64_t Rt, int64_t F, uintptr_t row_target,
                  uintptr_t row_image, uintptr_t row_text, uintptr_t row_timestep, int64_t N, int64_t M, int64_t T,
                  bool mse, bool normalize, uintptr_t uncond, uintptr_t per_t, uintptr_t scores, uintptr_t row_err,
                  bool half) {
  check(R >= 0 && Rt > 0 && F > 0 && N > 0 && M > 0 && T > 0, "error_reduce: sizes must be positive");
  check(pred && target && row_target && row_image && row_text && row_timestep && uncond && row_err,
        "error_reduce: null tensor pointer");
  const int64_t* rt = reinterpret_cast<const int64_t*>(row_target);
  const int64_t* ri = reinterpret_cast<const int64_t*>(row_image);
  const int64_t* rj = reinterpret_cast<const int64_t*>(row_text);
  const int64_t* rk = reinterpret_cast<const int64_t*>(row_timestep);
  for (int64_t r = 0; r < R; ++r) {
    check(rt[r] >= 0 && rt[r] < Rt, "error_reduce: row_target out of range at row " + std::to_string(r));
    check(ri[r] >= 0 && ri[r] < N, "error_reduce: row_image out of range at row " + std::to_string(r));
    check(rj[r] >= -1 && rj[r] < M, "error_reduce: row_text out of range at row " + std::to_string(r));
    check(rk[r] >= 0 && rk[r] < T, "error_reduce: row_timestep out of range at row " + std::to_string(r));
  }
  float* err = reinterpret_cast<float*>(row_err);
  if (half)
    run(reinterpret_cast<const uint16_t*>(pred), reinterpret_cast<const uint16_t*>(target), R, F, rt, err, mse);
  else
    run(reinterpret_cast<const float*>(pred), reinterpret_cast<const float*>(target), R, F, rt, err, mse);
  float* u = reinterpret_cast<float*>(uncond);
  float* pt = reinterpret_cast<float*>(per_t);
  float* sc = reinterpret_cast<float*>(scores);
  for (int64_t r = 0; r < R; ++r)
    if (rj[r] < 0) u[ri[r] * T + rk[r]] = err[r];
  for (int64_t r = 0; r < R; ++r) {
    if (rj[r] < 0) continue;
    const float e = normalize ? err[r] - u[ri[r] * T + rk[r]] : err[r];
    if (pt) pt[(ri[r] * M + rj[r]) * T + rk[r]] = -e;
    if (sc) sc[ri[r] * M + rj[r]] += -e / (float)T;
  }
}

}  // namespace fastitm
