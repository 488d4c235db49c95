"""loralib.plots: the helpers notebook 01 draws the layer's math with compute the right numbers and
return figures holding the data."""

from __future__ import annotations

import pytest
import torch


def test_plot_helpers_compute_the_right_numbers():
    import numpy as np

    from loralib import plots

    torch.manual_seed(0)
    m = torch.randn(30, 4) @ torch.randn(4, 20)
    s = plots.singular_values(m)
    np.testing.assert_allclose(
        s, np.linalg.svd(m.double().numpy(), compute_uv=False), rtol=1e-9, atol=1e-9 * s[0]
    )
    assert (s > 1e-5 * s[0]).sum() == 4  # float32 round-off sits near 1e-7 relative
    assert plots.lora_parameter_count(1024, 1024, 4) == 8192
    assert plots.lora_parameter_count(768, 3072, 8) == 8 * (768 + 3072)
    v = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]
    expected = [np.mean(v[max(0, i - 2) : i + 1]) for i in range(len(v))]
    np.testing.assert_allclose(plots.moving_average(v, 3), expected)
    with pytest.raises(ValueError, match="2-D matrix"):
        plots.singular_values(torch.ones(3))


def test_plot_helpers_return_figures_with_the_data():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from loralib import plots

    torch.manual_seed(0)
    low = torch.randn(16, 2) @ torch.randn(2, 16)
    fig = plots.plot_singular_values({"low": low, "dense": torch.randn(16, 16)}, rank=2)
    assert isinstance(fig, Figure) and len(fig.axes[0].get_lines()) == 3  # two spectra + the rank line
    fig = plots.plot_rank_vs_params(64, ranks=[1, 2, 4, 8])
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [128, 256, 512, 1024]
    fig = plots.plot_loss_curve([1.0, 0.5, 0.25], smooth=1)
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [1.0, 0.5, 0.25]
    fig = plots.plot_update_size_vs_rank([1, 2], {"a": [1.0, 2.0]}, reference=3.0)
    assert isinstance(fig, Figure)
    fig = plots.plot_parameter_budget({"lora": 10, "full": 1000}, total=1000)
    assert [p.get_width() for p in fig.axes[0].patches] == [10, 1000]
    with pytest.raises(ValueError, match="one value per rank"):
        plots.plot_update_size_vs_rank([1, 2], {"a": [1.0]})
    with pytest.raises(ValueError, match="no losses"):
        plots.plot_loss_curve([])
    plt.close("all")


def test_draw_lora_diagram_writes_the_shapes_and_the_count():
    from loralib import plots

    fig = plots.draw_lora_diagram(768, 3072, 8)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "3072 x 768" in " ".join(texts) and any(t.startswith("8 x 768") for t in texts)
    assert any(t.startswith("3072 x 8") for t in texts)
    assert "30,720 parameters instead of 2,359,296 (1.30%)" in fig.axes[0].get_title()
    assert len(fig.axes[0].patches) >= 3 + 6  # W0, A, B boxes and the arrows
