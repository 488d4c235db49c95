"""loralib's Microsoft-compatible API against Microsoft's own loralib 0.1.2.

The reference is Microsoft's wheel (MIT), downloaded by scripts/setup.sh into .cache/reference and
imported here as `ms_loralib` from a temporary directory (its import name is ours). Each case builds the
same model with both packages from the same seed and compares what a user of Microsoft's package sees:
parameter names and values (the same initialisation order), trainable names after
`mark_only_lora_as_trainable` for every `bias` mode, `lora_state_dict` keys and values, outputs and
gradients in train mode, outputs in eval mode (merged) and after returning to train mode (unmerged),
and checkpoints loading across the two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import loralib
from loralib import LoraLinear, lora_layers

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "loralib-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = (
    "e341c9a507b180f3b8e70914efef9f6b19d1aa3996dec546b180cfbd027059e9"  # the wheel these tests passed on
)

pytestmark = pytest.mark.numerical


def _wheel(tmp: Path) -> Path | None:
    cached = ROOT / ".cache" / "reference" / WHEEL
    if cached.is_file():
        return cached
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary",
        ":all:",
        "loralib==0.1.2",
    ]
    done = subprocess.run([*cmd, "-d", str(tmp)], capture_output=True, timeout=120)
    return tmp / WHEEL if done.returncode == 0 and (tmp / WHEEL).is_file() else None


@pytest.fixture(scope="module")
def ms(tmp_path_factory):
    """Microsoft's loralib 0.1.2, imported as `ms_loralib`."""
    tmp = tmp_path_factory.mktemp("ms_loralib")
    wheel = _wheel(tmp)
    if wheel is None:
        if os.environ.get("LORALIB_REQUIRE_REFERENCES"):
            pytest.fail("Microsoft's loralib==0.1.2 wheel is missing (scripts/setup.sh downloads it)")
        pytest.skip("Microsoft's loralib==0.1.2 wheel is not available (no registry access)")
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == WHEEL_SHA256, "not the wheel these tests know"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp / "src")
    pkg = tmp / "src" / "loralib"
    spec = importlib.util.spec_from_file_location(
        "ms_loralib", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["ms_loralib"] = module
    spec.loader.exec_module(module)
    yield module
    for name in [n for n in sys.modules if n == "ms_loralib" or n.startswith("ms_loralib.")]:
        del sys.modules[name]


def _build(lib, make, seed=0):
    torch.manual_seed(seed)
    return make(lib)


def _nonzero_B(model, seed=1):
    """Give every lora_B (and lora_A where it starts at zero) values, identically in both models."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _compare(ms_model, our_model, x, bias_modes=("none", "all", "lora_only"), ms_lib=None):
    """Everything a Microsoft user sees is the same in both models (bit for bit: the same formulas)."""
    ms_sd, our_sd = ms_model.state_dict(), our_model.state_dict()
    assert list(our_sd) == list(ms_sd)
    assert all(torch.equal(our_sd[k], ms_sd[k]) for k in ms_sd), "the same seed must draw the same weights"
    assert [n for n, _ in our_model.named_parameters()] == [n for n, _ in ms_model.named_parameters()]
    for bias in bias_modes:
        ms_lib.mark_only_lora_as_trainable(ms_model, bias=bias)
        loralib.mark_only_lora_as_trainable(our_model, bias=bias)
        trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
        assert trainable(our_model) == trainable(ms_model), bias
        ms_lsd, our_lsd = (
            ms_lib.lora_state_dict(ms_model, bias=bias),
            loralib.lora_state_dict(our_model, bias=bias),
        )
        assert list(our_lsd) == list(ms_lsd), bias
        assert all(torch.equal(our_lsd[k], ms_lsd[k]) for k in ms_lsd)
    _nonzero_B(ms_model)
    _nonzero_B(our_model)
    for mode in ("train", "eval", "train"):
        getattr(ms_model, mode)()
        getattr(our_model, mode)()
        torch.manual_seed(5)  # LoRA dropout draws its mask in the same place in both
        want = ms_model(x)
        torch.manual_seed(5)
        got = our_model(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert [m.merged for m in our_model.modules() if hasattr(m, "merged")] == [
            m.merged for m in ms_model.modules() if isinstance(m, ms_lib.LoRALayer)
        ]
        sd_ms, sd_ours = ms_model.state_dict(), our_model.state_dict()
        assert list(sd_ours) == list(sd_ms) and all(torch.equal(sd_ours[k], sd_ms[k]) for k in sd_ms), mode
        if mode == "train":
            want.float().pow(2).sum().backward()
            got.float().pow(2).sum().backward()
            for (n, p), (_, q) in zip(our_model.named_parameters(), ms_model.named_parameters()):
                assert (p.grad is None) == (q.grad is None), n
                if p.grad is not None:
                    torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
            ms_model.zero_grad(set_to_none=True)
            our_model.zero_grad(set_to_none=True)


def quickstart(lib):
    """Microsoft's README quick-start: lora.Linear(in, out, r=16) in a model, next to plain layers."""
    return nn.Sequential(
        lib.Linear(12, 16, r=16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.LayerNorm(16),
        lib.Linear(16, 4, r=4, lora_alpha=8),
    )


MODELS = {
    "quickstart": (quickstart, lambda: torch.randn(3, 12)),
    "dropout": (
        lambda lib: nn.Sequential(lib.Linear(12, 6, r=2, lora_alpha=4, lora_dropout=0.3)),
        lambda: torch.randn(5, 12),
    ),
    "no-bias": (lambda lib: lib.Linear(12, 6, r=3, bias=False), lambda: torch.randn(2, 12)),
    "fan_in_fan_out": (lambda lib: lib.Linear(12, 6, r=2, fan_in_fan_out=True), lambda: torch.randn(2, 12)),
    "r0-and-r4": (
        lambda lib: nn.Sequential(lib.Linear(12, 8), lib.Linear(8, 4, r=4)),
        lambda: torch.randn(2, 12),
    ),
    "no-merge": (lambda lib: lib.Linear(12, 6, r=2, merge_weights=False), lambda: torch.randn(2, 12)),
    "merged-qkv": (
        lambda lib: lib.MergedLinear(8, 24, r=4, lora_alpha=8, enable_lora=[True, False, True]),
        lambda: torch.randn(3, 8),
    ),
    "merged-q-only-fan_in_fan_out": (
        lambda lib: lib.MergedLinear(
            8, 24, r=2, enable_lora=[True, False, False], fan_in_fan_out=True, lora_dropout=0.2
        ),
        lambda: torch.randn(2, 5, 8),
    ),
    "merged-one-part": (
        lambda lib: lib.MergedLinear(8, 6, r=2, enable_lora=[True]),
        lambda: torch.randn(2, 8),
    ),
    "embedding": (
        lambda lib: lib.Embedding(20, 6, r=4, lora_alpha=2, padding_idx=0),
        lambda: torch.tensor([[0, 3, 19], [5, 5, 1]]),
    ),
    "conv2d": (lambda lib: lib.Conv2d(3, 4, 3, r=2, padding=1), lambda: torch.randn(2, 3, 6, 6)),
    "conv2d-groups": (
        lambda lib: lib.Conv2d(4, 6, 3, r=2, groups=2, lora_alpha=4),
        lambda: torch.randn(1, 4, 5, 5),
    ),
    "conv1d-k1": (lambda lib: lib.Conv1d(3, 5, 1, r=2), lambda: torch.randn(2, 3, 7)),
    "conv3d-k1": (lambda lib: lib.Conv3d(2, 3, 1, r=2), lambda: torch.randn(1, 2, 3, 3, 3)),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_the_same_model_in_both_packages_behaves_identically(ms, case):
    make, inputs = MODELS[case]
    ms_model, our_model = _build(ms, make), _build(loralib, make)
    torch.manual_seed(0)
    _compare(ms_model, our_model, inputs(), ms_lib=ms)


def test_the_nlu_attention_pattern_and_its_checkpoints(ms, tiny_model_dir, tmp_path):
    """Microsoft's NLU code: RoBERTa's query and value become lora.Linear(hidden, all_head_size, r,
    lora_alpha); the pretrained checkpoint loads with strict=False, training saves lora_state_dict, and
    that checkpoint loads back into either package."""
    from transformers import RobertaModel

    def nlu(lib):
        model = RobertaModel.from_pretrained(tiny_model_dir).eval()
        stock = model.state_dict()
        for layer in model.encoder.layer:
            att = layer.attention.self
            h = att.query.in_features
            att.query = lib.Linear(h, att.all_head_size, 8, lora_alpha=16)  # r passed third, as there
            att.value = lib.Linear(h, att.all_head_size, 8, lora_alpha=16)
        missing = model.load_state_dict(stock, strict=False).missing_keys
        assert missing and all("lora_" in k for k in missing)
        lib.mark_only_lora_as_trainable(model)
        return model.train()

    ms_model, our_model = _build(ms, nlu), _build(loralib, nlu)
    assert all(m.r == 8 and m.scaling == 2.0 for _, m in lora_layers(our_model))
    ids = torch.tensor([[0, 5, 9, 11, 2], [0, 7, 7, 2, 1]])

    def forward(m):
        torch.manual_seed(0)  # the model's own dropout draws the same masks in both
        return m(input_ids=ids).last_hidden_state

    _nonzero_B(ms_model)
    _nonzero_B(our_model)
    for mode in ("train", "eval", "train"):
        getattr(ms_model, mode)()
        getattr(our_model, mode)()
        torch.testing.assert_close(forward(our_model), forward(ms_model), rtol=0, atol=0)
    # Microsoft's checkpoint into ours and ours into theirs: the same keys, the same function. (Fresh models
    # on both sides: a weight merged and unmerged again differs from the pristine one by rounding.)
    torch.save(ms.lora_state_dict(ms_model), tmp_path / "ms_lora.pt")
    torch.save(loralib.lora_state_dict(our_model), tmp_path / "our_lora.pt")
    for ckpt in ("ms_lora.pt", "our_lora.pt"):
        mine, theirs = _build(loralib, nlu, seed=3), _build(ms, nlu, seed=4)
        for model in (mine, theirs):
            assert not model.load_state_dict(torch.load(tmp_path / ckpt), strict=False).unexpected_keys
        for mode in ("train", "eval"):
            torch.testing.assert_close(
                forward(getattr(mine, mode)()), forward(getattr(theirs, mode)()), rtol=0, atol=0
            )
        torch.testing.assert_close(forward(mine), forward(our_model.eval()), rtol=1e-4, atol=1e-5)


def test_a_checkpoint_loaded_in_eval_mode_replaces_the_merged_update(ms):
    """Loading new factors into a merged (eval-mode) layer re-merges them; Microsoft's keeps the old update
    in the weight, so its next train() subtracts the wrong one. Ours matches a layer loaded in train mode."""
    torch.manual_seed(0)
    src = loralib.Linear(6, 4, r=2)
    _nonzero_B(src, seed=7)
    ckpt = loralib.lora_state_dict(src)
    torch.manual_seed(1)
    a, b = loralib.Linear(6, 4, r=2), loralib.Linear(6, 4, r=2)
    b.load_state_dict(a.state_dict())
    a.eval().load_state_dict(ckpt, strict=False)
    b.load_state_dict(ckpt, strict=False)
    x = torch.randn(3, 6)
    torch.testing.assert_close(a(x), b.eval()(x))
    torch.testing.assert_close(a.train()(x), b.train()(x))
    torch.testing.assert_close(a.weight, b.weight)


def test_where_microsoft_fails_ours_refuses_clearly_or_works(ms):
    x = torch.randn(2, 3, 7)
    conv = ms.Conv1d(3, 5, 3, r=2)  # builds, then cannot form its kernel
    with pytest.raises(RuntimeError):
        conv(x)
    with pytest.raises(ValueError, match="cannot form this Conv1d's kernel.*LoraConv1d"):
        loralib.Conv1d(3, 5, 3, r=2)
    with pytest.raises(ValueError, match="enable_lora.*must have a length dividing out_features=10"):
        loralib.MergedLinear(4, 10, r=2, enable_lora=[True, False, True])
    theirs = ms.MergedLinear(4, 6, r=2, enable_lora=[False, False])
    with pytest.raises(AttributeError):
        theirs(torch.randn(1, 4))  # no enabled part: Microsoft's forward has no lora_ind
    ours = loralib.MergedLinear(4, 6, r=2, enable_lora=[False, False])
    torch.testing.assert_close(ours(torch.randn(1, 4)).shape, torch.Size([1, 6]))
    with pytest.raises(ValueError, match="r must be"):
        loralib.Linear(4, 4, r=-1)
    assert loralib.MergedLinear(4, 6, r=2, enable_lora=[True, False]).lora_ind.device == torch.device("cpu")


def test_the_rank_is_third_in_microsofts_classes_and_never_silently_lost_in_ours():
    assert loralib.Linear(768, 768, 16).r == 16
    with pytest.raises(TypeError):
        LoraLinear(768, 768, 16)  # bias is keyword-only: a positional rank is an error, not bias=16


def test_loralibs_tools_work_on_microsoft_style_layers(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(loralib.Linear(8, 8, r=2), nn.ReLU(), loralib.Linear(8, 3, r=0))
    assert [n for n, _ in lora_layers(model)] == ["0"]  # r=0 holds no adapter
    _nonzero_B(model)
    x = torch.randn(4, 8)
    want = model(x)
    loralib.merge_lora(model)
    torch.testing.assert_close(model(x), want)
    loralib.unmerge_lora(model)
    loralib.mark_only_lora_as_trainable(model)
    loralib.save_lora(model, tmp_path / "a")
    torch.manual_seed(0)
    fresh = nn.Sequential(loralib.Linear(8, 8, r=2), nn.ReLU(), loralib.Linear(8, 3, r=0))
    loralib.load_lora(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(x), want)
    plain = loralib.unload_lora(model)
    assert type(plain[0]) is nn.Linear
    torch.testing.assert_close(plain(x), want)


def test_to_peft_refuses_layers_peft_has_no_form_for(tmp_path):
    from loralib.peft_interop import to_peft

    model = nn.Sequential(loralib.MergedLinear(4, 6, r=2, enable_lora=[True, False]))
    with pytest.raises(ValueError, match="MergedLinear.*no PEFT form"):
        to_peft(model, tmp_path / "p", base_model_name_or_path="x")
    assert not (tmp_path / "p").exists()


def test_setting_scaling_as_microsofts_attribute_sets_lora_alpha():
    torch.manual_seed(0)
    layer = loralib.Linear(4, 3, r=2)
    _nonzero_B(layer)
    x = torch.randn(2, 4)
    layer.eval()  # merged
    layer.scaling = 3.0
    assert layer.lora_alpha == 6.0
    want = loralib.Linear(4, 3, r=2, lora_alpha=6)
    want.load_state_dict(layer.train().state_dict())
    torch.testing.assert_close(layer(x), want(x))


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_microsoft_style_linear_and_embedding_go_to_peft_and_back(kind, tmp_path):
    """Microsoft's Linear and Embedding hold PEFT's factors (same shapes): to_peft writes what
    PeftModel.from_pretrained computes, and from_peft loads into the same Microsoft-style model."""
    import copy

    peft = pytest.importorskip("peft")

    class Model(nn.Module):
        def __init__(self, lib):
            super().__init__()
            if kind == "linear":
                self.a = lib.Linear(6, 5, r=2, lora_alpha=4) if lib is loralib else nn.Linear(6, 5)
            else:
                self.a = lib.Embedding(7, 5, r=2, lora_alpha=4) if lib is loralib else nn.Embedding(7, 5)
            self.b = nn.Linear(5, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    stock = Model(nn).eval()
    ours = Model(loralib)
    ours.load_state_dict(stock.state_dict(), strict=False)
    _nonzero_B(ours)
    loralib.mark_only_lora_as_trainable(ours)
    ours.eval()
    x = torch.randn(3, 6) if kind == "linear" else torch.tensor([[0, 3, 6], [2, 2, 1]])
    loralib.to_peft(ours, tmp_path, base_model_name_or_path="tiny")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(stock), tmp_path).eval()
    torch.testing.assert_close(theirs(x), ours(x))
    fresh = Model(loralib)
    fresh.load_state_dict(stock.state_dict(), strict=False)
    loralib.from_peft(fresh, tmp_path)
    torch.testing.assert_close(fresh.eval()(x), ours(x), rtol=0, atol=0)
