"""What QLoRA's 4-bit storage does to a trained adapter: merging onto which base, and how much rounds away.

Covers: `merge_adapter` (merge onto the 4-bit, the full-precision or the nf4-dequantised base),
`merge_rounding` (how much of the update a merge into 4-bit keeps), `model_outputs` /
`output_difference` (compare two models' outputs), and the storage accounting of quantised models
(`quant_state_bytes`, `logical_parameter_count`). Not here: building and reloading PEFT / QLoRA models
(`loralib.peft_backend`), the memory comparison of full FT, LoRA and QLoRA (`loralib.measure.qlora_memory`).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from loralib.peft_backend import load_peft_model, pin_cpu_4bit_path, read_task_metadata

MERGE_BASES: tuple[str, ...] = ("4bit", "full", "dequantized")


def merge_adapter(
    directory: str | os.PathLike,
    onto: str = "dequantized",
    device: str | torch.device | None = None,
    base_model_name_or_path: str | None = None,
):
    """Load the adapter saved in `directory` onto a base and merge it: a plain transformers model, no PEFT.

    onto:
      "4bit": the 4-bit base; W_nf4 + s B A is re-quantised to nf4, so a small update mostly rounds away.
      "full": the original full-precision base; W + s B A is exact, but the adapter was trained against
          W_nf4, so this model differs from the trained one by the quantisation error of W.
      "dequantized": the 4-bit base dequantised to fp32 (W_nf4 exactly) + s B A: the trained function,
          merged, in full precision. Ship this (cast to bf16 if you like) or the unmerged adapter.
    For an adapter trained without quantisation "full" and "dequantized" are the same model.
    """
    if onto not in MERGE_BASES:
        raise ValueError(f"onto must be one of {MERGE_BASES}, got {onto!r}.")
    quantized = read_task_metadata(directory).get("quantized", False)
    model = load_peft_model(
        directory,
        quantize=onto == "4bit" or (onto == "dequantized" and quantized),
        dequantize=onto == "dequantized",
        device=device,
        base_model_name_or_path=base_model_name_or_path,
    )
    with warnings.catch_warnings():
        # PEFT warns that merging into 4-bit rounds; that rounding is what onto="4bit" is here to show.
        warnings.filterwarnings("ignore", message=".*4-bit linear may get different generations.*")
        merged = model.merge_and_unload()
    pin_cpu_4bit_path(merged)  # onto="4bit" re-quantises: the new Linear4bit layers get the same path
    return merged.eval()


def _rounding_of_layer(module, adapter: str, bf) -> tuple[float, float, float]:
    w = module.base_layer.weight
    qs = w.quant_state
    W = bf.dequantize_4bit(w.data, qs).float()
    D = module.get_delta_weight(adapter).float()
    M = W + D
    packed, state = bf.quantize_4bit(
        M.to(qs.dtype).contiguous(),
        blocksize=qs.blocksize,
        compress_statistics=qs.nested,
        quant_type=qs.quant_type,
    )
    Q = bf.dequantize_4bit(packed, state).float()
    dd = (D * D).sum().clamp_min(1e-30)
    # nf4 has 16 levels over [-absmax, absmax] per block: a mean step of 2 * absmax / 15.
    step = (W.reshape(-1, qs.blocksize).abs().amax(1) * 2 / 15).mean()
    return (
        float(((Q - W) * D).sum() / dd),
        float((Q - M).norm() / dd.sqrt()),
        float(D.pow(2).mean().sqrt() / step),
    )


def merge_rounding(model) -> dict[str, float]:
    """How much of the LoRA update survives a merge into the 4-bit weights, over all adapted 4-bit layers.

    For each layer: W = dequantised nf4 weight, D = s B A (the update), Q = nf4(W + D) dequantised,
    which is what `merge_and_unload` stores. Returns the medians over layers of
    "kept": <Q - W, D> / <D, D> (1 = the update is fully kept, 0 = rounded away) and
    "error": ||Q - (W + D)|| / ||D|| (rounding error relative to the update's size), plus
    "update_vs_step": rms(D) / mean nf4 step, the update's size in quantisation steps.
    """
    import statistics

    import bitsandbytes.functional as bf

    rows = []
    with torch.no_grad():
        for _, module in model.named_modules():
            base = getattr(module, "base_layer", None)
            if base is None or type(getattr(base, "weight", None)).__name__ != "Params4bit":
                continue
            rows += [_rounding_of_layer(module, a, bf) for a in module.active_adapters]
    if not rows:
        raise ValueError("the model has no LoRA layers on 4-bit weights; build it with quantize=True.")
    kept, error, ratio = zip(*rows)
    return {
        "layers": len(rows),
        "kept": statistics.median(kept),
        "error": statistics.median(error),
        "update_vs_step": statistics.median(ratio),
    }


def model_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's prediction tensor for `batch` in eval mode, in fp32 on CPU: logits, or start and end
    logits stacked for question answering."""
    was_training = model.training
    model.eval()
    dev = next(p.device for p in model.parameters())
    try:
        with torch.no_grad():
            out = model(**{k: v.to(dev) for k, v in batch.items()})
    finally:
        model.train(was_training)
    if getattr(out, "logits", None) is not None:
        return out.logits.float().cpu()
    return torch.stack([out.start_logits, out.end_logits]).float().cpu()


def output_difference(a: nn.Module, b: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max and mean absolute difference of two models' outputs on `batch`, relative to the output scale,
    and how often their argmax predictions agree (classification and QA)."""
    ya, yb = model_outputs(a, batch), model_outputs(b, batch)
    if ya.shape != yb.shape:
        raise ValueError(f"the models' outputs differ in shape: {tuple(ya.shape)} vs {tuple(yb.shape)}.")
    diff = (ya - yb).abs()
    scale = ya.abs().mean().clamp_min(1e-12)
    out = {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "mean_rel": float(diff.mean() / scale),
    }
    if ya.shape[-1] > 1:
        out["argmax_agreement"] = float((ya.argmax(-1) == yb.argmax(-1)).float().mean())
    return out


def quant_state_bytes(model: nn.Module) -> int:
    """Bytes of bitsandbytes' per-block scales (absmax, nested scales, code book) of the 4-bit weights.

    They live in `weight.quant_state`, outside parameters and buffers, so a parameter count misses them.
    """
    seen: dict[int, int] = {}
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is None:
            continue
        parts = [state.absmax, state.code]
        if getattr(state, "state2", None) is not None:
            parts += [state.state2.absmax, state.state2.code, state.offset]
        for t in parts:
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def logical_parameter_count(model: nn.Module) -> int:
    """Parameters counted as weights, not storage: a packed 4-bit tensor holds two weights per uint8."""
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        state = getattr(p, "quant_state", None)
        total += int(state.shape.numel()) if state is not None and hasattr(state, "shape") else p.numel()
    return total
