"""loralib.analysis against hand-worked cases and random-matrix expectations."""

from __future__ import annotations

import math

import pytest
import torch

from loralib import analysis
from loralib.injection import inject_lora
from loralib.layers import LoraLinear

pytestmark = pytest.mark.numerical  # run again under other CPU kernels (scripts/test.sh)


def _orthonormal_rows(k, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0].T


def test_similarity_by_hand():
    e = torch.eye(4, dtype=torch.float64)
    a1 = e[:1]  # the x-axis
    a2 = ((e[0] + e[1]) / math.sqrt(2))[None]  # 45 degrees from it
    assert analysis.subspace_similarity(a1, a2, 1, 1) == pytest.approx(0.5)
    assert analysis.subspace_similarity(e[:2], e[2:], 2, 2) == pytest.approx(0.0)
    # A 1-D subspace inside a 2-D one: fully contained, whatever the second one's other direction.
    assert analysis.subspace_similarity(a2, e[:2], 1, 2) == pytest.approx(1.0)


def test_similarity_sees_subspaces_not_matrices():
    a = torch.randn(8, 30, dtype=torch.float64)
    rotated = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0] @ a * 5.0  # same row space
    assert analysis.subspace_similarity(a, rotated, 8, 8) == pytest.approx(1.0)
    grid = analysis.similarity_grid(a, a)
    assert torch.allclose(grid.diagonal(), torch.ones(8, dtype=torch.float64))
    # Top-i of a matrix lies inside its own top-j for i <= j.
    assert torch.allclose(grid.triu(), torch.ones(8, 8, dtype=torch.float64).triu())


def test_grid_equals_the_pairwise_definition():
    a1, a2 = torch.randn(6, 20), torch.randn(9, 20)
    grid = analysis.similarity_grid(a1, a2)
    for i, j in [(1, 1), (2, 5), (6, 9), (4, 3)]:
        assert grid[i - 1, j - 1] == pytest.approx(analysis.subspace_similarity(a1, a2, i, j))


@pytest.mark.parametrize("d, i, j", [(64, 1, 1), (64, 8, 8), (128, 4, 16)])
def test_random_subspaces_match_the_expectation(d, i, j):
    draws = [
        analysis.subspace_similarity(_orthonormal_rows(i, d, 2 * s), _orthonormal_rows(j, d, 2 * s + 1), i, j)
        for s in range(300)
    ]
    mean = sum(draws) / len(draws)
    assert mean == pytest.approx(analysis.random_similarity(d, i, j), rel=0.15)


def test_similarity_errors_name_the_argument():
    with pytest.raises(ValueError, match="input dimension"):
        analysis.subspace_similarity(torch.randn(2, 5), torch.randn(2, 6), 1, 1)
    with pytest.raises(ValueError, match="j must be"):
        analysis.subspace_similarity(torch.randn(2, 5), torch.randn(2, 5), 1, 3)


def test_spectrum_and_energy_of_a_known_update():
    u = _orthonormal_rows(3, 10, 0).T
    v = _orthonormal_rows(3, 7, 1)
    m = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ v
    s = analysis.spectrum(m)
    torch.testing.assert_close(s[:3], torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    assert float(s[3:].abs().max()) < 1e-12
    assert analysis.energy_share(s, 1) == pytest.approx(9 / 14)
    assert analysis.energy_share(s, 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="zero"):
        analysis.energy_share(torch.zeros(3), 1)


def test_amplification_finds_what_w_holds():
    g = torch.Generator().manual_seed(0)
    out_d, in_d = 40, 30
    w = torch.randn(out_d, in_d, generator=g, dtype=torch.float64) * 0.1
    u1 = torch.linalg.qr(torch.randn(out_d, 1, generator=g, dtype=torch.float64))[0]
    v1 = torch.linalg.qr(torch.randn(in_d, 1, generator=g, dtype=torch.float64))[0]
    w = w + 10.0 * u1 @ v1.T  # W's strongest direction
    aligned = analysis.amplification(w, 0.5 * u1 @ v1.T, k=1)
    assert aligned.along_delta == pytest.approx(aligned.along_w, rel=0.01)  # dW points where W is strong
    assert aligned.factor == pytest.approx(0.5 / aligned.along_delta)
    ortho_u = torch.linalg.qr(torch.cat([u1, torch.randn(out_d, 1, generator=g, dtype=torch.float64)], 1))[0][
        :, 1:
    ]
    ortho_v = torch.linalg.qr(torch.cat([v1, torch.randn(in_d, 1, generator=g, dtype=torch.float64)], 1))[0][
        :, 1:
    ]
    elsewhere = analysis.amplification(w, 0.5 * ortho_u @ ortho_v.T, k=1)
    assert elsewhere.along_delta < 0.1 * aligned.along_delta and elsewhere.factor > 10 * aligned.factor


def test_random_directions_match_their_expectation():
    w = torch.randn(50, 40, dtype=torch.float64)
    amp = analysis.amplification(w, torch.randn(50, 40, dtype=torch.float64), k=4, draws=400)
    expected = math.sqrt(16 * float(w.square().sum()) / (50 * 40))  # sqrt(k^2 ||W||^2 / (out in))
    assert amp.along_random == pytest.approx(expected, rel=0.1)
    assert amp.along_w == pytest.approx(float(analysis.spectrum(w)[:4].square().sum().sqrt()))


def test_adapter_updates_of_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    inject_lora(model, ["0", "2"], r=2, lora_alpha=4)
    with torch.no_grad():
        model[0].lora_B.normal_()
    ups = analysis.adapter_updates(model)
    layer: LoraLinear = model[0]
    expected = (2.0 * layer.lora_B @ layer.lora_A).double()
    torch.testing.assert_close(ups["0"]["dW"], expected)
    assert ups["0"]["W"].shape == (5, 6) and ups["2"]["A"].shape == (2, 5)
    model[0].merge()
    with pytest.raises(ValueError, match="merged"):
        analysis.adapter_updates(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        analysis.adapter_updates(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- boundaries: errors, never numbers


def _rank2(d=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 2, generator=g) @ torch.randn(2, d, generator=g)  # (4 x d), rank 2


def test_zero_updates_have_no_similarity_no_spectrum_share_and_no_amplification():
    z = torch.zeros(3, 6)
    with pytest.raises(ValueError, match="a1 is zero"):
        analysis.subspace_similarity(z, z, 1, 1)  # not 1.0
    with pytest.raises(ValueError, match="a2 is zero"):
        analysis.similarity_grid(torch.randn(3, 6), z)
    with pytest.raises(ValueError, match="zero"):
        analysis.energy_share(analysis.spectrum(z), 1)
    with pytest.raises(ValueError, match="delta is zero"):
        analysis.amplification(torch.randn(3, 6), z, 1)
    assert analysis.spectrum(z).tolist() == [0.0, 0.0, 0.0]


def test_indices_past_the_rank_are_refused_even_inside_the_shape():
    a = _rank2()
    g = torch.Generator().manual_seed(1)
    a64 = torch.randn(4, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 6, generator=g, dtype=torch.float64
    )
    # the rank is judged at the precision the matrix was made in: fp32's rounding is noise, not rank
    assert analysis.numerical_rank(a) == 2 and analysis.numerical_rank(a64) == 2
    for i in (3, 4):  # 4 = min(shape): allowed before, but directions 3-4 are noise
        with pytest.raises(ValueError, match=rf"i must be in \[1, 2\], got {i}: a1 has rank 2"):
            analysis.subspace_similarity(a, a, i, 1)
    with pytest.raises(ValueError, match="max_j must be in"):
        analysis.similarity_grid(a, a, 2, 3)
    assert analysis.similarity_grid(a, a).shape == (2, 2)  # defaults are the ranks
    assert analysis.subspace_similarity(a, a, 2, 2) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="k must be in"):
        analysis.amplification(torch.randn(4, 6), a, 3)
    with pytest.raises(ValueError, match="k must be in"):
        analysis.right_singular_basis(a, 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_named(bad):
    m = torch.randn(3, 5)
    m[1, 2] = bad
    with pytest.raises(ValueError, match="a1 has NaN or infinite"):
        analysis.subspace_similarity(m, torch.randn(3, 5), 1, 1)
    with pytest.raises(ValueError, match="m has NaN or infinite"):
        analysis.spectrum(m)
    with pytest.raises(ValueError, match="w has NaN or infinite"):
        analysis.amplification(m, torch.randn(3, 5), 1)
    with pytest.raises(ValueError, match="finite and non-negative"):
        analysis.energy_share(torch.tensor([2.0, bad]), 1)


def test_other_bad_arguments_are_named():
    with pytest.raises(ValueError, match="finite and non-negative"):
        analysis.energy_share(torch.tensor([2.0, -1.0]), 1)
    with pytest.raises(ValueError, match="largest first"):
        analysis.energy_share(torch.tensor([1.0, 2.0]), 1)
    for k in (0, 3, 1.5):
        with pytest.raises(ValueError, match="k must be an int in"):
            analysis.energy_share(torch.tensor([2.0, 1.0]), k)
    with pytest.raises(ValueError, match="d must be a positive int"):
        analysis.random_similarity(0, 1, 1)
    with pytest.raises(ValueError, match="at most d"):
        analysis.random_similarity(4, 5, 1)
    with pytest.raises(ValueError, match="one shape"):
        analysis.amplification(torch.randn(3, 5), torch.randn(3, 4), 1)
    with pytest.raises(ValueError, match="draws must be a positive int"):
        analysis.amplification(torch.randn(3, 5), torch.randn(3, 5), 1, draws=0)
    with pytest.raises(ValueError, match="2-D floating-point"):
        analysis.spectrum(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D floating-point"):
        analysis.spectrum(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        analysis.spectrum(torch.ones(0, 3))


def test_amplification_factor_at_k_uses_the_updates_own_top_k_norm():
    """At k = 1 the factor's numerator is sigma_1(dW), not ||dW||_F; at k = rank(dW) it is ||dW||_F."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(30, 20, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(30, 2, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(20, 2, generator=g, dtype=torch.float64))[0]
    delta = u @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ v.T  # sigma = (3, 1)
    one, two = analysis.amplification(w, delta, k=1), analysis.amplification(w, delta, k=2)
    assert one.delta_top_k == pytest.approx(3.0) and one.factor == pytest.approx(3.0 / one.along_delta)
    assert two.delta_top_k == pytest.approx(math.sqrt(10.0)) == pytest.approx(two.delta_norm)
    assert two.factor == pytest.approx(two.delta_norm / two.along_delta)


def test_intruder_dimensions_count_new_strong_directions_only():
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(40, 30, generator=g, dtype=torch.float64)
    assert analysis.intruder_dimensions(w0, w0, k=10) == 0
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    reweighted = u @ torch.diag(s * torch.linspace(2.0, 0.5, len(s), dtype=torch.float64)) @ vh
    assert analysis.intruder_dimensions(w0, reweighted, k=10) == 0  # W's own directions, re-weighted
    # a new direction as strong as W's strongest, orthogonal to W's top singular vectors: one intruder
    x = torch.randn(40, 1, generator=g, dtype=torch.float64)
    x = x - u @ (u.T @ x)  # outside W's column space entirely: no pretrained vector resembles it
    x = x / x.norm()
    y = torch.randn(30, 1, generator=g, dtype=torch.float64)
    assert analysis.intruder_dimensions(w0, w0 + 3 * s[0] * x @ (y / y.norm()).T, k=10) == 1
    with pytest.raises(ValueError, match="threshold"):
        analysis.intruder_dimensions(w0, w0, threshold=0)
