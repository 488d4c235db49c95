"""`LoraEmbedding`: a frozen `nn.Embedding` plus a trainable low-rank update of its table.

    y = E[x] + (A^T[x] B^T) * (lora_alpha / r)        E: (num_embeddings x dim), A: (r x num_embeddings),
                                                      B: (dim x r); the update of E is (B A)^T

PEFT's layout and initialisation (its `lora_embedding_A` / `lora_embedding_B`): A starts at zero and B
normal, the other way round from a Linear, because a lookup reads one column of A per token, and a
kaiming A with a zero B would give each token's gradient to B alone. The lookup of A uses the base's
padding_idx, max_norm, norm_type, scale_grad_by_freq and sparse, as PEFT's does. LoRA dropout is not
applied to a lookup (PEFT keeps the value and ignores it too): the probability is stored, so adapters
round-trip, but it changes nothing here.

Covers: the layer, `from_embedding` / `to_embedding`. Not here: what every LoRA layer shares
(`loralib.layers.base`), finding and swapping modules (`loralib.injection`).
"""

from __future__ import annotations

from typing import Unpack

import torch
import torch.nn.functional as F
from torch import nn

from loralib.checks import check_bool
from loralib.layers import dora
from loralib.layers.base import LoraKwargs, LoraLayer, adapter_dtype, module_kind, register_lora_layer


@register_lora_layer
class LoraEmbedding(LoraLayer, nn.Embedding):
    """A `nn.Embedding` whose frozen table gets a trainable low-rank update (B @ A)^T * scaling.

    Args: num_embeddings, embedding_dim, padding_idx: as for `nn.Embedding`; then keyword-only r,
    lora_alpha (None: = r), lora_dropout (stored, not applied: see the module docstring), use_rslora,
    init ("kaiming" and "gaussian" both give PEFT's embedding init: A zero, B ~ N(0, 1); "article" has
    no embedding form), use_dora (one magnitude per embedding dimension, its norm over the vocabulary,
    as PEFT's), autocast_adapter_dtype, device, dtype. State dict: the base's `weight` plus `lora_A`,
    `lora_B` (`lora_magnitude_vector` with DoRA; `lora_merged` when merged).
    """

    base_type = nn.Embedding
    peft_names = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}

    @classmethod
    def adapter_shapes(cls, module: nn.Embedding, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (r, module.num_embeddings), (module.embedding_dim, r)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        autocast_adapter_dtype: bool = True,
        device=None,
        dtype=None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        **lora: Unpack[LoraKwargs],
    ) -> None:
        s = self._settings(lora)
        if s.lora_bias:
            raise ValueError(
                "lora_bias=True is not supported for embeddings (PEFT refuses it too: B is a plain matrix)."
            )
        if s.init == "article":
            raise ValueError(
                "init='article' (A ~ N(0, 1), the seed article's Linear init) has no embedding form; use "
                "init='kaiming' (PEFT's embedding init: A zero, B normal)."
            )
        check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            sparse=sparse,
            device=device,
            dtype=dtype,
        )
        ad = adapter_dtype(self.weight.dtype, autocast_adapter_dtype)
        self._init_lora(s, self.adapter_shapes(self, s.r), device, ad)
        self.weight.requires_grad_(False)
        self.reset_lora_parameters()

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, *, autocast_adapter_dtype: bool = True, **lora: Unpack[LoraKwargs]
    ) -> LoraEmbedding:
        """Wrap an existing `nn.Embedding`: its table is reused (not copied) and frozen."""
        if isinstance(embedding, LoraLayer):
            raise TypeError("this layer already has LoRA; call unload_lora() first or adapt another layer.")
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                f"LoraEmbedding.from_embedding expects an nn.Embedding, got {module_kind(embedding)}."
            )
        s = cls._settings(lora)
        w = embedding.weight
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            embedding.padding_idx,
            max_norm=embedding.max_norm,
            norm_type=embedding.norm_type,
            scale_grad_by_freq=embedding.scale_grad_by_freq,
            sparse=embedding.sparse,
            device="meta",
            dtype=w.dtype,
            autocast_adapter_dtype=autocast_adapter_dtype,
            settings=s,
        )
        # Built on "meta" (no throw-away table), then the real tensors are attached.
        return layer._adopt(embedding, s, autocast_adapter_dtype)

    @classmethod
    def from_module(cls, module: nn.Embedding, **kwargs) -> LoraEmbedding:
        """The registry's constructor: `from_embedding`."""
        return cls.from_embedding(module, **kwargs)

    def reset_parameters(self) -> None:  # called by nn.Embedding.__init__
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            self.merged = False
            self.reset_lora_parameters()

    def _reset_lora(self) -> None:
        with torch.no_grad():
            if self.init == "random":  # PEFT's init_lora_weights=False keeps both factors ~ N(0, 1)
                nn.init.normal_(self.lora_A)
            else:
                nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The scaled update (B @ A)^T * scaling, shape (num_embeddings, dim), in the adapter's dtype."""
        return (self.lora_B @ self.lora_A).T * self.scaling

    def to_base(self) -> nn.Embedding:
        """The registry's way back: `to_embedding`."""
        return self.to_embedding()

    def to_embedding(self) -> nn.Embedding:
        """A plain `nn.Embedding` with the update merged in (the adapter is not kept)."""
        self.merge()
        emb = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            self.padding_idx,
            max_norm=self.max_norm,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
            device="meta",
        )
        emb.weight = nn.Parameter(self.weight.data, requires_grad=self.weight.requires_grad)
        emb.train(self.training)
        return emb

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            x, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        detour = self._detour(x)  # a mixed batch, or an adapter this layer lacks (`loralib.layers.slots`)
        if detour is not None:
            return detour
        out = self._lookup(x, self.weight)
        if self.merged:
            return self._guard_merged_training(out)
        after_a = self._lookup(x, self.lora_A.T)
        out = out + ((after_a @ self.lora_B.T) * self.scaling).to(out.dtype)
        if self.use_dora:  # g per embedding dimension, the norm over the vocabulary, as PEFT's
            return dora.scale(self, out, None, self.dora_norm())
        return out

    def _dora_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()  # (dim x vocab): the update's (B A) layout

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._lora_repr()}"
