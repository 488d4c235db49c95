"""save_lora / load_lora / read_adapter: exact round trips, what the file holds, and every load error.

The reference for "exact" is the trained model itself (bitwise equal tensors and logits); the file's
contents are read back with safetensors directly, not through loralib. Not here: PEFT's format
(test_06_peft_interop.py).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import loralib.adapters as adapters
from loralib.adapters import adapter_size_bytes, adapter_state_dict, load_lora, read_adapter, save_lora
from loralib.injection import inject_lora, lora_layers, mark_only_lora_as_trainable, merge_lora
from loralib.tiny import tiny_roberta

TARGETS = ["query", "value"]


@pytest.fixture(scope="module")
def stock(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).eval()


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return dict(
        tok(
            ["A short sentence.", "Another, slightly longer sentence here."],
            padding=True,
            return_tensors="pt",
        )
    )


def fresh(stock, seed: int = 1):
    """The same base model with a differently initialised head, as a new from_pretrained would give."""
    m = copy.deepcopy(stock)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def trained(stock, r: int = 4, targets=TARGETS, bias: str = "lora_only", seed: int = 0):
    """A model whose every trainable tensor differs from its initial value, as after training."""
    m = copy.deepcopy(stock)
    inject_lora(m, targets, r=r, lora_alpha=2 * r)
    mark_only_lora_as_trainable(m, bias=bias, train_layer_norms=True, modules_to_save=["classifier"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize("pre_inject", [True, False], ids=["lora-pre-injected", "plain-model"])
@pytest.mark.parametrize("r, targets", [(4, TARGETS), (2, "all-linear")], ids=["qv-r4", "all-linear-r2"])
def test_round_trip_is_exact(stock, batch, tmp_path, pre_inject, r, targets):
    model = trained(stock, r=r, targets=targets)
    save_lora(model, tmp_path / "adapter")
    other = fresh(stock)
    if pre_inject:
        inject_lora(other, targets, r=r, lora_alpha=2 * r)
    assert not torch.equal(logits(other, batch), logits(model, batch))
    load_lora(other, tmp_path / "adapter")
    assert [n for n, _ in lora_layers(other)] == [n for n, _ in lora_layers(model)]
    for (_, a), (_, b) in zip(lora_layers(other), lora_layers(model)):
        assert (a.r, a.lora_alpha, a.scaling) == (b.r, b.lora_alpha, b.scaling)
    ref = adapter_state_dict(model)
    got = dict(other.named_parameters())
    assert all(torch.equal(got[k], v) for k, v in ref.items())
    assert torch.equal(logits(other, batch), logits(model, batch))


def test_file_holds_exactly_the_trainable_tensors(stock, tmp_path):
    model = trained(stock, bias="lora_only")
    path = save_lora(model, tmp_path)
    assert path == tmp_path / "adapter.safetensors"
    on_disk = load_file(path)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(on_disk) == expected
    assert not any(
        k.endswith(".weight")
        and ".lora_" not in k
        and "LayerNorm" not in k
        and not k.startswith("classifier")
        for k in on_disk
    )
    params = dict(model.named_parameters())
    assert all(torch.equal(on_disk[k], params[k].detach()) for k in on_disk)
    n_bytes = sum(v.numel() * v.element_size() for v in on_disk.values())
    assert n_bytes < adapter_size_bytes(tmp_path) < n_bytes + 64 * 1024  # tensors + header + json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "lora_config.json"]


def test_metadata_survives(stock, tmp_path):
    model = trained(stock)
    save_lora(model, tmp_path, base_model="FacebookAI/roberta-base", task="sst2", num_labels=3)
    on_file = json.loads(safe_open(str(tmp_path / "adapter.safetensors"), "pt").metadata()["loralib_config"])
    beside = json.loads((tmp_path / "lora_config.json").read_text())
    cfg, _ = read_adapter(tmp_path)
    loaded = load_lora(fresh(stock), tmp_path)
    for c in (on_file, beside, cfg, loaded):
        assert (c["base_model"], c["task"], c["num_labels"]) == ("FacebookAI/roberta-base", "sst2", 3)
        assert (c["r"], c["lora_alpha"]) == (4, 8.0)
        assert c["target_modules"] == [
            f"roberta.encoder.layer.{i}.attention.self.{t}" for i in (0, 1) for t in TARGETS
        ]


def test_wrong_rank(stock, tmp_path):
    save_lora(trained(stock, r=4), tmp_path)
    other = fresh(stock)
    inject_lora(other, TARGETS, r=8)
    with pytest.raises(
        ValueError, match=r"different rank r.*file \(4, 64\) vs model \(8, 64\).*saved with r=4"
    ):
        load_lora(other, tmp_path)


def test_wrong_targets(stock, tmp_path):
    save_lora(trained(stock, targets=TARGETS), tmp_path)
    fewer = fresh(stock)
    inject_lora(fewer, ["query"], r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="tensors the model lacks.*value.lora_A"):
        load_lora(fewer, tmp_path)
    more = fresh(stock)
    inject_lora(more, ["query", "value", "key"], r=4, lora_alpha=8)
    with pytest.raises(
        ValueError, match="LoRA matrices the adapter does not contain.*key.lora_A.*strict=False"
    ):
        load_lora(more, tmp_path)
    load_lora(more, tmp_path, strict=False)  # the extra key adapters simply keep their init


def test_wrong_base_hidden_size(stock, tmp_path):
    save_lora(trained(stock), tmp_path / "adapter")
    torch.manual_seed(0)
    small = tiny_roberta(tmp_path / "tiny32", hidden_size=32, num_attention_heads=4, intermediate_size=64)
    other = AutoModelForSequenceClassification.from_pretrained(small, num_labels=3)
    with pytest.raises(ValueError, match=r"hidden size.*vs model"):
        load_lora(other, tmp_path / "adapter")


def test_wrong_number_of_labels(stock, tiny_model_dir, tmp_path):
    save_lora(trained(stock), tmp_path)
    other = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    with pytest.raises(ValueError, match="number of labels"):
        load_lora(other, tmp_path)


def test_merged_model_refuses_to_load(stock, tmp_path):
    save_lora(trained(stock), tmp_path)
    other = fresh(stock)
    inject_lora(other, TARGETS, r=4, lora_alpha=8)
    merge_lora(other)
    with pytest.raises(ValueError, match="unmerge_lora"):
        load_lora(other, tmp_path)


def test_missing_adapter(stock, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter at"):
        load_lora(fresh(stock), tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="save_lora"):
        read_adapter(tmp_path)


@pytest.mark.parametrize(
    "damage",
    ["truncate-half", "truncate-header", "garbage", "empty", "bad-json-header"],
)
def test_corrupt_or_truncated_file_is_a_clear_value_error(stock, tmp_path, damage):
    path = save_lora(trained(stock), tmp_path)
    data = path.read_bytes()
    if damage == "truncate-half":
        data = data[: len(data) // 2]
    elif damage == "truncate-header":
        data = data[:20]
    elif damage == "garbage":
        data = b"this is not a safetensors file at all" * 10
    elif damage == "empty":
        data = b""
    else:  # a valid length prefix followed by a broken JSON header
        n = int.from_bytes(data[:8], "little")
        data = data[:8] + b"{" * n + data[8 + n :]
    path.write_bytes(data)
    model = fresh(stock)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_lora(model, tmp_path)


def test_crash_mid_write_keeps_the_previous_adapter(stock, tmp_path, monkeypatch):
    first = trained(stock, seed=0)
    save_lora(first, tmp_path, task="first")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crashing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # half-written bytes, then the process "dies"
        raise RuntimeError("disk full")

    monkeypatch.setattr(adapters, "save_file", crashing_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        save_lora(trained(stock, seed=1), tmp_path, task="second")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, (
        "no temp file left, old adapter intact"
    )
    monkeypatch.undo()
    model = fresh(stock)
    assert load_lora(model, tmp_path)["task"] == "first"
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in adapter_state_dict(first).items())


def test_wrong_alpha_is_refused(stock, tmp_path):
    save_lora(trained(stock, r=4), tmp_path)  # alpha = 8
    other = fresh(stock)
    inject_lora(other, TARGETS, r=4, lora_alpha=4)
    with pytest.raises(ValueError, match="adapter lora_alpha=8, model lora_alpha=4"):
        load_lora(other, tmp_path)


def test_a_failed_load_leaves_a_plain_model_untouched(stock, tmp_path):
    save_lora(trained(stock), tmp_path)
    other = AutoModelForSequenceClassification.from_pretrained(stock.config._name_or_path, num_labels=2)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="number of labels"):
        load_lora(other, tmp_path)
    assert not list(lora_layers(other))
    after = {n: (p.detach(), p.requires_grad) for n, p in other.named_parameters()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n][0], before[n][0]) and after[n][1] == before[n][1] for n in before)


def test_other_formats_are_named(stock, tmp_path):
    path = save_lora(trained(stock), tmp_path)
    tensors = load_file(path)
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"loralib_config": json.dumps({"format": "loralib-wrapper"})})
    with pytest.raises(ValueError, match="'loralib-wrapper' adapter.*from_lora"):
        load_lora(fresh(stock), tmp_path)
    save_file(tensors, path, metadata={"loralib_config": "{not json"})
    with pytest.raises(ValueError, match="not valid JSON"):
        load_lora(fresh(stock), tmp_path)


def test_saved_files_are_shareable(stock, tmp_path):
    save_lora(trained(stock), tmp_path)
    for p in tmp_path.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p.name


# ---------------------------------------------------------------- where and how an adapter directory is written


def _small(r=2, seed=0):
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    inject_lora(model, ["0", "2"], r=r)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B)
    return model


@pytest.fixture
def in_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_saving_into_the_working_directory_and_a_relative_path(in_dir):
    import os

    model = _small()
    (in_dir / "here").mkdir()
    os.chdir(in_dir / "here")
    save_lora(model, ".", task="dot")
    assert os.getcwd() == str(in_dir / "here") and (in_dir / "here" / adapters.WEIGHTS_NAME).exists()
    save_lora(model, ".", task="dot again")  # replaces the directory the process stands in
    assert read_adapter(".")[0]["task"] == "dot again" and os.path.samefile(".", in_dir / "here")
    os.chdir(in_dir)
    save_lora(model, "rel/adapter", task="rel")
    assert read_adapter(in_dir / "rel" / "adapter")[0]["task"] == "rel"
    fresh = _small(seed=1)
    for _, layer in lora_layers(fresh):
        torch.nn.init.zeros_(layer.lora_B)
    load_lora(fresh, "rel/adapter")
    assert all(
        torch.equal(a, b)
        for a, b in zip(adapter_state_dict(fresh).values(), adapter_state_dict(model).values())
    )
    assert sorted(p.name for p in in_dir.iterdir()) == ["here", "rel"]  # no staging directory left


def test_a_directory_name_near_the_255_byte_limit(tmp_path):
    name = "a" * 250  # the staging sibling ".<name>.<random>.tmp" would be over 255 bytes
    save_lora(_small(), tmp_path / name, task="long")
    save_lora(_small(), tmp_path / name, task="long again")
    assert read_adapter(tmp_path / name)[0]["task"] == "long again"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_an_existing_directorys_permissions_are_kept_and_new_ones_follow_the_umask(tmp_path):
    import os
    import stat

    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)
    save_lora(_small(), private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    old = os.umask(0o077)
    try:
        save_lora(_small(), tmp_path / "new")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new" / adapters.WEIGHTS_NAME).stat().st_mode) == 0o600
    save_lora(_small(), tmp_path / "plain")
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o777 & ~old


def test_a_permission_error_names_the_adapter_directory(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, dir=None, prefix="", **kwargs):
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}x1y2z3.tmp")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)  # as root nothing is denied: simulate a read-only parent
    with pytest.raises(PermissionError) as info:
        save_lora(_small(), tmp_path / "adapter")
    assert str(tmp_path / "adapter") in str(info.value) and "x1y2z3" not in str(info.value)
    assert info.value.filename == str(tmp_path / "adapter")


@pytest.mark.parametrize("fmt", ["loralib", "peft"])
def test_a_read_during_a_save_gets_one_whole_adapter(tmp_path, fmt):
    """A writer alternates two adapters of different rank in one directory; every concurrent read must
    see a config whose rank matches its tensors (the old adapter or the new one, never a mix)."""
    import threading
    import time as clock

    from loralib.peft_interop import read_peft_adapter, to_peft

    def save(model, tag):
        if fmt == "loralib":
            save_lora(model, tmp_path / "a", tag=tag)
        else:
            to_peft(model, tmp_path / "a", base_model_name_or_path=tag)

    def read():
        if fmt == "loralib":
            cfg, tensors = read_adapter(tmp_path / "a")
            return cfg["r"], tensors["0.lora_A"].shape[0]
        cfg, tensors = read_peft_adapter(tmp_path / "a")
        return cfg["r"], tensors["0.lora_A.weight"].shape[0]

    models = {2: _small(r=2), 4: _small(r=4)}
    save(models[2], "2")
    stop, errors, reads = threading.Event(), [], []

    def writer():
        k = 0
        while not stop.is_set():
            save(models[4 if k % 2 else 2], str(k))
            k += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        # Until the reads have overlapped both versions many times (a bound, not a speed: a loaded
        # machine just takes longer).
        deadline = clock.monotonic() + 60
        while clock.monotonic() < deadline and (len(reads) < 200 or len({r for r, _ in reads}) < 2):
            try:
                reads.append(read())
            except Exception as e:  # noqa: BLE001 - any failure of a read is the finding
                errors.append(repr(e))
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert reads and all(r == n for r, n in reads), [x for x in reads if x[0] != x[1]][:3]
    assert {r for r, _ in reads} == {2, 4}  # the reads really overlapped both versions


def test_layers_with_different_dropout_and_init_reload_as_they_were(tiny_model_dir, tmp_path):
    """A model whose layers differ in dropout and init reloads each layer with its own (before, the
    file kept only a shared value, and a reload gave every layer dropout 0 and kaiming)."""
    from transformers import AutoModelForSequenceClassification

    from loralib import inject_lora, load_lora, lora_layers, save_lora

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    inject_lora(model, ["query"], r=2, lora_dropout=0.1, init_lora_weights="gaussian")
    inject_lora(model, ["value"], r=2, lora_dropout=0.0)
    save_lora(model, tmp_path / "a")
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    load_lora(fresh, tmp_path / "a")
    want = {n: (m.lora_dropout_p, m.init) for n, m in lora_layers(model)}
    assert {n: (m.lora_dropout_p, m.init) for n, m in lora_layers(fresh)} == want
    assert {v for v in want.values()} == {(0.1, "gaussian"), (0.0, "kaiming")}
