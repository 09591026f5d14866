"""Score results and the retrieval / Winoground metrics computed from a score matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .._version import __version__
from .plan import Plan
from .weights import nan_weighted_mean


def _gt_tensor(gt: Sequence[int] | torch.Tensor, n: int, bound: int, what: str) -> torch.Tensor:
    g = torch.as_tensor(gt, dtype=torch.long).flatten()
    if g.numel() != n:
        raise ValueError(f"{what} ground truth has {g.numel()} entries, expected {n}")
    if n and (int(g.min()) < 0 or int(g.max()) >= bound):
        raise ValueError(f"{what} ground truth indices must lie in [0, {bound})")
    return g


def winoground(matrix: torch.Tensor) -> dict[str, float]:
    """Winoground text, image and group scores for 2x2 groups.

    ``matrix`` is [2, 2] or [G, 2, 2], indexed [group, image, text], with image k matching text k.
    Text score: each image prefers its own caption; image score: each caption prefers its own
    image; group: both. Ties count as failures, as in the Winoground paper's strict inequalities.
    """
    m = torch.as_tensor(matrix, dtype=torch.float32)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or tuple(m.shape[1:]) != (2, 2):
        raise ValueError(f"winoground needs a [2, 2] or [G, 2, 2] matrix, got {tuple(m.shape)}")
    s00, s01, s10, s11 = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    text = (s00 > s01) & (s11 > s10)
    image = (s00 > s10) & (s11 > s01)
    group = text & image
    return {
        "text": text.float().mean().item(),
        "image": image.float().mean().item(),
        "group": group.float().mean().item(),
        "groups": int(m.shape[0]),
    }


@dataclass
class ScoreResult:
    """``matrix`` [N_images, N_texts] float32, higher = better match; ``plan`` reproduces it.

    ``family``: the model family scored (:mod:`fastitm.models.families`); ``backend``: the backend the fused ops ran on ("triton", "native" or "reference"); ``preset``
    and ``choices``: the preset asked for and the run-level choices (resize, latent, scheme, noise)
    it resolved to.

    ``per_timestep`` [N_images, N_texts, T] holds each timestep's contribution (the matrix is its
    mean over T) where the scorer provides it.
    """

    matrix: torch.Tensor
    plan: Plan
    method: str
    options: dict
    backend: str = "reference"
    per_timestep: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    preset: str | None = None
    choices: dict = field(default_factory=dict)
    family: str | None = None  # the model family scored ("sd", "sdxl", "sd3")
    weights: torch.Tensor | None = None  # [T] float64 timestep weights in plan order (None: uniform)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    @property
    def partial_means(self) -> torch.Tensor | None:
        """[N_images, N_texts]: each pair's (weighted, with ``weights``) mean over the timesteps it was
        scored at (NaN where none), the score racing or elimination had when it dropped a text; None
        without ``per_timestep``."""

        if self.per_timestep is None:
            return None
        return nan_weighted_mean(self.per_timestep, self.weights)

    def text_retrieval(self, k: int = 1) -> torch.Tensor:
        """[N_images, k]: for each image, the indices of its k best texts, best first; unscored pairs
        (NaN: not in ``pairs=``) come after every scored one."""
        k = self._check_k(k, self.matrix.shape[1], "texts")
        return self.matrix.nan_to_num(nan=float("-inf")).topk(k, dim=1).indices

    def image_retrieval(self, k: int = 1) -> torch.Tensor:
        """[N_texts, k]: for each text, the indices of its k best images, best first; unscored pairs
        come after every scored one."""
        k = self._check_k(k, self.matrix.shape[0], "images")
        return self.matrix.nan_to_num(nan=float("-inf")).topk(k, dim=0).indices.T.contiguous()

    def text_accuracy(self, gt: Sequence[int] | torch.Tensor, k: int = 1) -> float:
        """Share of images whose true text (``gt[i]``) is among their top-k texts: right when fewer than
        k other scored texts score at least as high (a tie never counts for the truth, as in
        ``fastitm eval`` and :meth:`winoground`; unscored texts are not candidates)."""
        g = _gt_tensor(gt, self.matrix.shape[0], self.matrix.shape[1], "text retrieval")
        return _strict_accuracy(self.matrix, g, self._check_k(k, self.matrix.shape[1], "texts"), "image", "text")

    def image_accuracy(self, gt: Sequence[int] | torch.Tensor, k: int = 1) -> float:
        """Share of texts whose true image (``gt[j]``) is among their top-k images (the same rule)."""
        g = _gt_tensor(gt, self.matrix.shape[1], self.matrix.shape[0], "image retrieval")
        return _strict_accuracy(self.matrix.T, g, self._check_k(k, self.matrix.shape[0], "images"), "text", "image")

    def winoground(self, groups: Sequence[tuple[tuple[int, int], tuple[int, int]]] | None = None) -> dict:
        """Winoground scores over 2x2 groups ``((image0, image1), (text0, text1))``.

        By default: the whole matrix when it is 2x2, else consecutive pairs (images 2g, 2g+1 with
        texts 2g, 2g+1) of a square matrix with an even side.
        """
        n, m = self.matrix.shape
        if groups is None:
            if n != m or n % 2:
                raise ValueError(
                    f"default Winoground groups need a square matrix with an even side, got {n}x{m}; pass groups="
                )
            groups = [((2 * g, 2 * g + 1), (2 * g, 2 * g + 1)) for g in range(n // 2)]
        if not groups:
            raise ValueError("no Winoground groups given")
        blocks = []
        for (i0, i1), (t0, t1) in groups:
            blocks.append(self.matrix[[i0, i1]][:, [t0, t1]])
        return winoground(torch.stack(blocks))

    @staticmethod
    def _check_k(k: int, n: int, what: str) -> int:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if k > n:
            raise ValueError(f"k={k} exceeds the number of {what} ({n})")
        return k

    def to_json(self) -> dict:
        import diffusers
        import transformers

        return {
            "method": self.method,
            "family": self.family,
            "preset": self.preset,
            "options": self.options,
            "choices": self.choices,
            "backend": self.backend,
            # JSON has no inf/NaN: eliminated (-inf) and unfinished (NaN) pairs are written as null.
            "matrix": [[v if math.isfinite(v) else None for v in row] for row in self.matrix.tolist()],
            "plan": self.plan.describe(),
            "stats": self.stats,
            "versions": {
                "fastitm": __version__,
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
        }


def _strict_accuracy(matrix: torch.Tensor, gt: torch.Tensor, k: int, query: str, candidate: str) -> float:
    """Rows are queries: the share whose true candidate ranks below k by the strict rule of
    :func:`rank_of_truth`; a true pair that was not scored is an error."""
    right = 0
    for q, label in enumerate(gt.tolist()):
        if torch.isnan(matrix[q, label]):
            raise ValueError(f"the true {candidate} {label} of {query} {q} was not scored (NaN: not in pairs=, "
                             "or unfinished); score it, or leave that " + query + " out of the ground truth")
        right += rank_of_truth(matrix[q], label)[0] < k
    return right / len(gt)


def rank_of_truth(scores: torch.Tensor, label: int) -> tuple[int, bool]:
    """(how many other candidates score at least as high as the true one, whether any ties it)."""
    others = torch.cat([scores[:label], scores[label + 1 :]])
    return int((others >= scores[label]).sum()), bool((others == scores[label]).any())
