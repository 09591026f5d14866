"""The fine-tuning losses, on one batch.

- ``hardneg`` (HardNeg-DiffusionITM, McGill-NLP/diffusion-itm ``hard_neg_finetuning.py`` with
  ``--mixed_neg``): loss = MSE_pos - clamp(MSE_neg, max = factor * MSE_pos) (factor 1.0, its
  default ``--neg_loss_factor``); per step the negative is, with p = 0.5, another image under the
  true caption (same noise and timestep), else with p = 0.25 each a hard-negative caption or a
  random other caption under the true image.
- ``discffusion`` (He et al.'s few-shot prompt learning, as a LoRA on the cross-attention): the
  LogSumExp attention score of each caption through the fused op (its backward recomputes the
  attention in registers), and the hinge clamp(max_neg - pos + margin, 0) against the hardest
  negative, margin 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HARDNEG_FACTOR = 1.0
MARGIN = 0.1


def hardneg_loss(unet, x_t, t, target, emb_pos, neg: str, x_t_neg=None, emb_neg=None,
                 factor: float = HARDNEG_FACTOR) -> tuple[torch.Tensor, dict]:
    """x_t [B, C, h, w] noisy true latents; neg "image" (x_t_neg: the negative images noised with the
    same noise and t) or "text" (emb_neg: negative captions' embeddings)."""
    pred = unet(x_t, t, encoder_hidden_states=emb_pos).sample
    loss_pos = F.mse_loss(pred.float(), target.float())
    if neg == "image":
        pred_neg = unet(x_t_neg, t, encoder_hidden_states=emb_pos).sample
    else:
        pred_neg = unet(x_t, t, encoder_hidden_states=emb_neg).sample
    mse_neg = F.mse_loss(pred_neg.float(), target.float())
    loss = loss_pos - torch.clamp(mse_neg, max=factor * loss_pos.item())
    return loss, {"mse_pos": loss_pos.item(), "mse_neg": mse_neg.item()}


def discffusion_loss(unet, sink, x_t, t, emb_rows, n_cands: int, margin: float = MARGIN) -> tuple[torch.Tensor, dict]:
    """x_t [B, C, h, w]; emb_rows [B * n_cands, L, D]: per example its true caption then negatives.
    ``sink``: the pooled-score sink of the fused processors installed on the UNet."""
    B = x_t.shape[0]
    sink.reset()
    unet(x_t.repeat_interleave(n_cands, 0), t.repeat_interleave(n_cands, 0), encoder_hidden_states=emb_rows)
    scores = sink.row_scores().float().view(B, n_cands)
    pos, neg = scores[:, 0], scores[:, 1:].max(dim=1).values
    loss = torch.clamp(neg - pos + margin, min=0).mean()
    return loss, {"pos": pos.mean().item(), "hardest_neg": neg.mean().item(),
                  "accuracy": (pos > neg).float().mean().item()}
