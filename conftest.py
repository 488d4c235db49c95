"""Shared fixtures: offline hub, outputs in a temporary directory, one tiny RoBERTa per session."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# Notebooks executed by nbval inherit these: nothing is written into the checkout.
_SESSION_TMP = tempfile.mkdtemp(prefix="loralib-tests-")
os.environ.setdefault("LORALIB_OUTPUT_DIR", os.path.join(_SESSION_TMP, "outputs"))
os.environ.setdefault("LORALIB_CACHE", os.path.join(_SESSION_TMP, "cache"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """Path of the offline tiny RoBERTa (built once per test session)."""
    from loralib.tiny import tiny_roberta

    return tiny_roberta()


@pytest.fixture
def assert_same_layers_as_peft():
    """assert_same_layers_as_peft(ours, peft_model): the same adapted modules, ranks, scalings and lora_bias."""

    def check(ours, theirs) -> None:
        from peft.tuners.lora import LoraLayer as PeftLoraLayer

        from loralib import lora_layers

        peft_layers = {
            n.removeprefix("base_model.model."): m
            for n, m in theirs.named_modules()
            if isinstance(m, PeftLoraLayer)
        }
        mine = dict(lora_layers(ours))
        assert mine and sorted(mine) == sorted(peft_layers)
        for n, layer in mine.items():
            want = peft_layers[n]
            assert layer.r == want.r["default"], n
            assert layer.scaling == pytest.approx(want.scaling["default"], rel=1e-15), n
            assert (layer.lora_B_bias is not None) == want.lora_bias["default"], n

    return check


def pytest_configure(config) -> None:
    # Tiny models gain nothing from a second thread, and on a shared 2-core machine two threads per
    # process made small training loops 10x slower (oversubscription). Notebooks set their own.
    import torch

    torch.set_num_threads(1)
