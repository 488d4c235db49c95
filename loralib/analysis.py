"""What a trained adapter learned: the LoRA paper's section 7 measures (Hu et al. 2021), as functions.

Covers:
- `right_singular_basis` and `subspace_similarity` / `similarity_grid`: the paper's normalised overlap
  phi(A1, A2, i, j) = ||V1_i^T V2_j||_F^2 / min(i, j) of the top-i and top-j right-singular directions of two
  A matrices (or two updates), 1 when one subspace contains the other, 0 when they are orthogonal;
  `random_similarity`, its expectation for random subspaces of R^d (max(i, j) / d).
- `spectrum` and `energy_share`: the singular values of an update dW = s B A and the share of
  ||dW||_F^2 its top-k directions hold.
- `amplification`: how strongly dW's own top-k directions are present in the pretrained W
  (||U^T W V||_F, with U, V dW's top-k left / right singular vectors), against W's top-k directions and
  random ones, and the paper's amplification factor ||dW||_F / ||U^T W V||_F.
- `adapter_updates`: (W, dW, A) of every LoRA layer of a model.
- `intruder_dimensions`: singular vectors of a fine-tuned weight that no pretrained singular vector resembles
  (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228).
- `magnitude_direction`: DoRA's analysis (Liu et al. 2024, section 2.2) of a fine-tuned weight against the
  pretrained one, the mean change of each output feature's magnitude and of its direction.
Not here: training (`loralib.sweeps`), plots (`loralib.plots`).

All functions compute in float64 on the CPU: these are small matrices and the differences that matter
are in the small singular values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def _as64(m: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(m, torch.Tensor) or m.ndim != 2 or not m.is_floating_point():
        raise ValueError(
            f"{name} must be a 2-D floating-point tensor (a matrix), got {type(m).__name__} "
            f"{tuple(m.shape) if isinstance(m, torch.Tensor) else ''}".rstrip()
            + "."
        )
    if m.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(m.shape)}).")
    out = m.detach().to("cpu", torch.float64)
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} has NaN or infinite entries: it has no singular directions to compare.")
    return out


def _rank(s: torch.Tensor, m: torch.Tensor) -> int:
    """How many singular values `s` of `m` stand above rounding in m's own dtype (max(shape) x eps x s_max)."""
    return int((s > max(m.shape) * torch.finfo(m.dtype).eps * s[0]).sum()) if s[0] > 0 else 0


def numerical_rank(m: torch.Tensor, name: str = "m") -> int:
    """How many singular values of `m` stand above rounding in its own dtype (max(shape) x eps x s_max)."""
    return _rank(torch.linalg.svdvals(_as64(m, name)), m)


@dataclass(frozen=True)
class _Svd:
    """One matrix checked and decomposed once: float64 copy, thin SVD and numerical rank."""

    m64: torch.Tensor
    u: torch.Tensor
    vh: torch.Tensor
    rank: int
    shape: tuple[int, ...]
    name: str


def _svd(m: torch.Tensor, name: str) -> _Svd:
    m64 = _as64(m, name)
    u, s, vh = torch.linalg.svd(m64, full_matrices=False)
    return _Svd(m64, u, vh, _rank(s, m), tuple(m.shape), name)


def _check_index(n, name: str, d: _Svd) -> int:
    """An index 1 <= n <= rank: directions past the rank are arbitrary (any basis of a null space)."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise ValueError(f"{name} must be an int, got {n!r}.")
    if d.rank == 0:
        raise ValueError(
            f"{d.name} is zero (rank 0; an untrained adapter has B = 0): it has no directions to compare."
        )
    if not 1 <= n <= d.rank:
        raise ValueError(
            f"{name} must be in [1, {d.rank}], got {n}: {d.name} has rank {d.rank} (shape {d.shape}), and "
            "its directions past the rank are arbitrary."
        )
    return n


def right_singular_basis(m: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """The top-k right-singular vectors of `m` as orthonormal rows, shape (k, m.shape[1]) (k: its rank)."""
    d = _svd(m, "m")
    return d.vh[: d.rank if k is None else _check_index(k, "k", d)]


def _same_input_space(a1: torch.Tensor, a2: torch.Tensor) -> tuple[_Svd, _Svd]:
    d1, d2 = _svd(a1, "a1"), _svd(a2, "a2")
    if a1.shape[-1] != a2.shape[-1]:
        raise ValueError(
            f"a1 and a2 must share their input dimension, got {tuple(a1.shape)} and {tuple(a2.shape)}."
        )
    return d1, d2


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> float:
    """phi(a1, a2, i, j) = ||V1[:i] V2[:j]^T||_F^2 / min(i, j), in [0, 1] (the LoRA paper, eq. 4).

    a1 (r1 x d), a2 (r2 x d): two LoRA A matrices of one layer (or two updates dW, whose right-singular
    directions live in the same input space). 1 <= i <= rank(a1), 1 <= j <= rank(a2); a zero matrix
    has no directions and is refused.
    """
    d1, d2 = _same_input_space(a1, a2)
    v1, v2 = d1.vh[: _check_index(i, "i", d1)], d2.vh[: _check_index(j, "j", d2)]
    return float((v1 @ v2.T).square().sum() / min(i, j))


def similarity_grid(
    a1: torch.Tensor, a2: torch.Tensor, max_i: int | None = None, max_j: int | None = None
) -> torch.Tensor:
    """phi(a1, a2, i, j) for i = 1..max_i, j = 1..max_j (default their ranks), as an (max_i x max_j) tensor."""
    d1, d2 = _same_input_space(a1, a2)
    max_i = _check_index(d1.rank if max_i is None else max_i, "max_i", d1)
    max_j = _check_index(d2.rank if max_j is None else max_j, "max_j", d2)
    v1, v2 = d1.vh[:max_i], d2.vh[:max_j]
    overlap = (v1 @ v2.T).square()  # overlap[p, q] = <v1_p, v2_q>^2
    cum = overlap.cumsum(0).cumsum(1)  # cum[i-1, j-1] = ||V1_i^T V2_j||_F^2
    i = torch.arange(1, max_i + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, max_j + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def random_similarity(d: int, i: int, j: int) -> float:
    """E[phi] for independent uniformly random i- and j-dimensional subspaces of R^d: max(i, j) / d
    (E||P_i V_j||_F^2 = j * i / d, divided by min(i, j))."""
    for name, v in (("d", d), ("i", i), ("j", j)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if max(i, j) > d:
        raise ValueError(f"i={i} and j={j} must be at most d={d}: R^d has no larger subspaces.")
    return max(i, j) / d


def spectrum(m: torch.Tensor) -> torch.Tensor:
    """Singular values of `m`, largest first (float64); a zero matrix gives zeros."""
    return torch.linalg.svdvals(_as64(m, "m"))


def energy_share(singular_values: torch.Tensor, k: int) -> float:
    """Share of ||M||_F^2 = sum s^2 held by the top-k singular directions (singular values largest first,
    as `spectrum` returns them)."""
    if not isinstance(singular_values, torch.Tensor) or singular_values.ndim != 1 or not len(singular_values):
        raise ValueError(
            f"singular_values must be a non-empty 1-D tensor (from spectrum()), got {singular_values!r:.80}."
        )
    sv = singular_values.detach().to(torch.float64)
    if not torch.isfinite(sv).all() or (sv < 0).any():
        raise ValueError("singular_values must be finite and non-negative (singular values are).")
    if (sv[1:] > sv[:-1]).any():
        raise ValueError("singular_values must be sorted largest first, as spectrum() returns them.")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(sv):
        raise ValueError(f"k must be an int in [1, {len(sv)}] (the number of singular values), got {k!r}.")
    s2 = sv.square()
    total = float(s2.sum())
    if total == 0:
        raise ValueError("the matrix is zero (an untrained adapter, B = 0): it has no directions to rank.")
    return float(s2[:k].sum()) / total


@dataclass(frozen=True)
class Amplification:
    """The LoRA paper's Table 7 quantities for one layer and one k (all Frobenius norms)."""

    k: int
    delta_norm: float  # ||dW||_F
    along_delta: float  # ||U^T W V||_F with dW's top-k directions
    along_w: float  # the same with W's own top-k directions
    along_random: float  # the same with random orthonormal directions (mean over draws)
    delta_top_k: float = float("nan")  # ||U^T dW V||_F = sqrt(s_1^2 + ... + s_k^2): dW along those directions

    @property
    def factor(self) -> float:
        """||U^T dW V||_F / ||U^T W V||_F over dW's top-k directions: how much dW amplifies what W already
        had there. At k = rank(dW) the numerator is ||dW||_F (the paper's factor); at k = 1 it is sigma_1."""
        return self.delta_top_k / self.along_delta


def amplification(
    w: torch.Tensor, delta: torch.Tensor, k: int, draws: int = 20, seed: int = 0
) -> Amplification:
    """How strongly dW's top-k directions are present in W (see the module docstring).

    w, delta: (out x in). Random directions: `draws` pairs of random orthonormal k-frames (QR of Gaussian
    matrices, seeded), whose expected ||U^T W V||_F^2 is k^2 ||W||_F^2 / (out x in).
    """
    dw, dd = _svd(w, "w"), _svd(delta, "delta")
    if w.shape != delta.shape:
        raise ValueError(f"w and delta must have one shape, got {tuple(w.shape)} and {tuple(delta.shape)}.")
    _check_index(k, "k", dd)
    for name, v in (("draws", draws), ("seed", seed)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "draws" else 0):
            raise ValueError(
                f"{name} must be {'a positive' if name == 'draws' else 'a non-negative'} int, got {v!r}."
            )
    w, delta = dw.m64, dd.m64
    u, v = dd.u[:, :k], dd.vh[:k].T
    uw, vw = dw.u[:, :k], dw.vh[:k].T
    g = torch.Generator().manual_seed(seed)
    rand = []
    for _ in range(draws):
        ur = torch.linalg.qr(torch.randn(w.shape[0], k, generator=g, dtype=torch.float64))[0]
        vr = torch.linalg.qr(torch.randn(w.shape[1], k, generator=g, dtype=torch.float64))[0]
        rand.append(float(torch.linalg.norm(ur.T @ w @ vr)))
    return Amplification(
        k=k,
        delta_norm=float(torch.linalg.norm(delta)),
        delta_top_k=float(torch.linalg.norm(u.T @ delta @ v)),
        along_delta=float(torch.linalg.norm(u.T @ w @ v)),
        along_w=float(torch.linalg.norm(uw.T @ w @ vw)),
        along_random=sum(rand) / len(rand),
    )


def magnitude_direction(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """DoRA's weight-decomposition analysis (Liu et al. 2024, section 2.2) of a weight `w` against its
    pretrained `w0`, both (out x in) with one row per output feature: (delta M, delta D) with
    delta M = mean over rows of | ||w||_row - ||w0||_row | and delta D = mean over rows of
    1 - cos(w_row, w0_row). Computed in float64."""
    if w0.shape != w.shape or w0.dim() != 2:
        raise ValueError(
            f"w0 and w must be 2-D and of one shape, got {tuple(w0.shape)} and {tuple(w.shape)}."
        )
    a, b = w0.detach().double(), w.detach().double()
    na, nb = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1)
    delta_m = (nb - na).abs().mean().item()
    delta_d = (1 - (a * b).sum(1) / (na * nb)).mean().item()
    return delta_m, delta_d


def intruder_dimensions(w0: torch.Tensor, w: torch.Tensor, k: int = 10, threshold: float = 0.5) -> int:
    """How many of the top-k left-singular vectors of the fine-tuned `w` are intruders: their largest
    |cosine similarity| with every left-singular vector of the pretrained `w0` is below `threshold`
    (arXiv 2410.21228, section 3; they count with epsilon 0.5 and up to k = 10 or more). A fine-tuning that
    only re-weights W's own directions has none; new, strong directions are intruders."""
    d0, d = _svd(w0, "w0"), _svd(w, "w")
    if w0.shape != w.shape:
        raise ValueError(f"w0 and w must have one shape, got {tuple(w0.shape)} and {tuple(w.shape)}.")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= min(w.shape):
        raise ValueError(f"k must be an int in [1, {min(w.shape)}], got {k!r}.")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
    cos = (d.u[:, :k].T @ d0.u).abs()  # (k x min(out, in)): every top-k vector against every pretrained one
    return int((cos.max(dim=1).values < threshold).sum())


def adapter_updates(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """For every LoRA layer of `model`: its frozen W, its update dW = s B A and its A (float64, CPU; dW is
    multiplied in float64, so its rank is exactly r)."""
    from loralib.injection import lora_layers

    out = {}
    for name, layer in lora_layers(model):
        if layer.merged:
            raise ValueError(f"{name} is merged: W holds W + dW; unmerge_lora(model) before analysing it.")
        a, b = _as64(layer.lora_A, "lora_A"), _as64(layer.lora_B, "lora_B")
        out[name] = {"W": _as64(layer.weight, "weight"), "dW": layer.scaling * (b @ a), "A": a}
    if not out:
        raise ValueError("the model has no LoRA layers; inject_lora(...) and train it first.")
    return out
