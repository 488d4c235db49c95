"""An offline, deterministic tiny RoBERTa: random weights and a byte-level BPE tokenizer trained here.

`tiny_roberta()` writes a normal Hugging Face model directory (config, safetensors weights,
tokenizer files) that `from_pretrained(dir)` loads with `HF_HUB_OFFLINE=1`. It is what the tests,
the notebooks' default profile and the smoke benchmarks use instead of `FacebookAI/roberta-base`.
It has roberta-base's architecture and vocabulary conventions (ids of <s>, <pad>, </s>, <unk>,
<mask>; position offset; 514 positions), only much smaller. Its weights are random: anything
trained on it is a smoke test, never a benchmark number. `default_model_id()` is the model the
notebooks use: $LORALIB_MODEL_ID (a hub id or directory), else this one. Not here: the toy data
(`loralib.toy`) and the bundled GLUE/SQuAD data (`loralib.data`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

TINY_VERSION = 1
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # roberta-base's ids 0..4
DEFAULT_ARCH = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=514,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
)


def corpus_path() -> Path:
    """The English text the tokenizer is trained on (shipped with the package)."""
    return Path(str(resources.files("loralib") / "resources" / "tiny_corpus.txt"))


def default_cache_dir() -> Path:
    """Where `tiny_roberta()` builds its model: $LORALIB_CACHE or ~/.cache/loralib."""
    root = os.environ.get("LORALIB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loralib")
    return Path(root) / f"tiny-roberta-v{TINY_VERSION}"


def build_tokenizer(vocab_size: int = 1000):
    """Train a byte-level BPE tokenizer on the shipped corpus and wrap it as a RoBERTa tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train(
        files=[str(corpus_path())],
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    model = bpe._tokenizer.model
    with tempfile.TemporaryDirectory() as d:
        vocab_file, merges_file = model.save(d)
        vocab = __import__("json").loads(Path(vocab_file).read_text())
        merges = [
            tuple(line.split(" "))
            for line in Path(merges_file).read_text().splitlines()
            if line and not line.startswith("#version")
        ]
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=512)


def tiny_roberta(
    path: str | os.PathLike | None = None, seed: int = 0, overwrite: bool = False, **arch
) -> str:
    """Build (or reuse) the tiny RoBERTa directory and return its path as a string.

    path: where to write it (default: $LORALIB_CACHE or ~/.cache/loralib/tiny-roberta-v1).
    seed: seeds the random weights; the same seed gives bit-identical weights.
    arch: overrides of DEFAULT_ARCH (hidden_size, num_hidden_layers, ...).
    The directory is built in a temporary sibling and renamed, so it is never half-written.
    """
    from transformers import RobertaConfig, RobertaModel

    target = Path(path) if path is not None else default_cache_dir()
    if arch or seed != 0:
        if path is None:
            raise ValueError("pass an explicit path when changing the tiny model's seed or architecture.")
    if (target / "config.json").exists() and (target / "model.safetensors").exists() and not overwrite:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model cache is meant to be readable
    try:
        tok = build_tokenizer()
        cfg = RobertaConfig(
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **{**DEFAULT_ARCH, **arch},
        )
        # fork_rng: building the model must not reseed the caller's global RNG as a side effect.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = RobertaModel(cfg)
        model.config.name_or_path = "loralib/tiny-roberta"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            "Tiny RoBERTa with RANDOM weights, built offline by loralib.tiny.tiny_roberta(). "
            "For tests and smoke runs only: results on it are not benchmark numbers.\n"
        )
        if overwrite and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process (a parallel test worker, a notebook) finished the same build first.
            # Builds are deterministic, so keep theirs rather than deleting a directory in use.
            if not (target / "model.safetensors").exists():
                raise FileExistsError(
                    f"{target} exists and is not a tiny RoBERTa directory; pass overwrite=True to replace "
                    "it or choose another path."
                ) from None
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def default_model_id() -> str:
    """The model the notebooks use: $LORALIB_MODEL_ID (a hub id or directory), else the offline tiny RoBERTa."""
    env = os.environ.get("LORALIB_MODEL_ID")
    if env:
        return env
    return tiny_roberta()
