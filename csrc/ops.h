#pragma once
// Native ops, called from Python with raw pointers of contiguous CPU tensors that the Python
// launchers (fastitm/ops/*.py) have already checked and allocated.
#include <cstdint>

namespace fastitm {

// q [B,H,Lq,D], k/v [B,H,Lk,D], out [B,H,Lq,D] (float32, or float16 when half), pooled [B,H] float32,
// mask [B,Lk] uint8 or 0 for none.
void cross_attention_lse(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t pooled, uintptr_t mask,
                         int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, double scale, bool probs,
                         double lam, bool half);

// Backward of cross_attention_lse, float32: dout [B,H,Lq,D], dpooled [B,H] -> dq [B,H,Lq,D], dk/dv [B,H,Lk,D].
void cross_attention_lse_bwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t dout, uintptr_t dpooled, uintptr_t dq,
                             uintptr_t dk, uintptr_t dv, uintptr_t mask, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                             int64_t D, double scale, bool probs, double lam);

// pred [R,F] and target [Rt,F] (float32, or float16 when half); row_* int64 [R]. Writes uncond
// [N,T], row_err [R], and per_t [N,M,T] / scores [N,M] (float32) when their pointers are non-zero.
void error_reduce(uintptr_t pred, uintptr_t target, int64_t R, int64_t Rt, int64_t F, uintptr_t row_target,
                  uintptr_t row_image, uintptr_t row_text, uintptr_t row_timestep, int64_t N, int64_t M, int64_t T,
                  bool mse, bool normalize, uintptr_t uncond, uintptr_t per_t, uintptr_t scores, uintptr_t row_err,
                  bool half);

}  // namespace fastitm
