"""Why the article's code needed a ten times smaller learning rate: the size of the first update.

With Adam the first update of B is about lr * sign(grad) whatever A's scale, so the weight change
s * B @ A is proportional to A's scale: N(0, 1) entries ("article") are sqrt(3 * hidden) larger than
kaiming-uniform's ("scaled"). Covers: `first_update_norm` (the norm of that first change, measured)
and `plot_first_update_norms` (against the learning rate, the recipes' rates starred). Not here: the
attention class (`loralib.article.attention`), training runs (`loralib.benchmark`).
"""

from __future__ import annotations

import torch

from loralib.article.attention import (
    DEFAULT_LR,
    LoraRobertaSelfAttention,
)


def first_update_norm(
    formulation: str,
    lr: float,
    hidden_size: int = 768,
    r: int = 8,
    n_tokens: int = 256,
    seed: int = 0,
) -> float:
    """Frobenius norm of the query weight change s * B @ A after one AdamW step from B = 0.

    One random roberta-sized attention layer, random inputs, a fixed random linear loss; everything
    but the formulation and lr is seeded identically. Comparing formulations shows why the article's
    unscaled N(0, 1) A needed a much smaller learning rate than kaiming-uniform A.
    """
    from transformers import RobertaConfig

    heads = max(1, hidden_size // 64)
    cfg = RobertaConfig(
        hidden_size=hidden_size,
        num_attention_heads=heads,
        intermediate_size=4 * hidden_size,
        attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seed the layer's init without touching the caller's RNG
        torch.manual_seed(seed)
        layer = LoraRobertaSelfAttention(cfg, r=r, formulation=formulation).eval()
    x = torch.randn(1, n_tokens, hidden_size, generator=gen)
    target = torch.randn(1, n_tokens, hidden_size, generator=gen)
    params = [layer.lora_query_matrix_A, layer.lora_query_matrix_B]
    for p in layer.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    (layer(x)[0] * target).sum().backward()
    opt.step()
    with torch.no_grad():
        return float(layer.lora_delta_weight("query").norm())


def plot_first_update_norms(
    lrs: tuple[float, ...] = (1e-5, 4e-5, 1e-4, 5e-4, 1e-3),
    hidden_size: int = 768,
    r: int = 8,
    ax=None,
):
    """Plot `first_update_norm` against the learning rate for both formulations, starring DEFAULT_LR.

    Returns (figure, {formulation: [norm per lr in lrs]}).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = ax.figure
    norms: dict[str, list[float]] = {}
    for formulation, color in (("article", "tab:red"), ("scaled", "tab:blue")):
        norms[formulation] = [first_update_norm(formulation, lr, hidden_size, r) for lr in lrs]
        ax.plot(lrs, norms[formulation], "o-", color=color, label=f"{formulation}")
        lr = DEFAULT_LR[formulation]
        at_recipe = (
            norms[formulation][list(lrs).index(lr)]
            if lr in lrs
            else first_update_norm(formulation, lr, hidden_size, r)
        )
        ax.plot(
            [lr],
            [at_recipe],
            "*",
            ms=16,
            color=color,
            label=f"{formulation} at its recipe lr {lr:g}",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="learning rate",
        ylabel="||s * B @ A|| after one AdamW step",
        title=f"First LoRA update of W_q (hidden {hidden_size}, r {r})",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, norms
