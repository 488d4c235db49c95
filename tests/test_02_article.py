"""The article's hand-written RoBERTa LoRA (loralib.article) against stock transformers, LoraLinear and math."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoTokenizer, RobertaConfig, RobertaModel

from loralib.article.attention import (
    LORA_PARAM_NAMES,
    LoraRobertaSelfAttention,
    forward_source_diff,
    lora_attention_layers,
    replace_self_attention,
)
from loralib.article.lr_experiment import first_update_norm
from loralib.article.wrapper import LoraWrapperRoberta
from loralib.config import INIT_VALUES
from loralib.injection import inject_lora
from loralib.layers import LoraLinear
from loralib.qa import squad_null_decision
from loralib.utils import count_parameters

pytestmark = pytest.mark.numerical  # run again under other CPU kernels (scripts/test.sh)

# ---------------------------------------------------------------- helpers


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    # Different lengths, so the batch has padding and the attention mask matters.
    texts = ["a short one", "this sentence is quite a bit longer than the first one, with padding after it"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def _randomize_lora(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in LORA_PARAM_NAMES:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny model's matmuls are far too small to split across cores: on a busy 2-core machine the second
    # thread made a training epoch ~25x slower (9.4 s vs 0.4 s). Restored after this module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ---------------------------------------------------------------- B = 0 is the stock model


@pytest.mark.parametrize("formulation", ["article", "scaled"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_b_zero_equals_stock_roberta(tiny_model_dir, tokenizer, impl, formulation):
    stock = RobertaModel.from_pretrained(tiny_model_dir, attn_implementation=impl).eval()
    wrapper = LoraWrapperRoberta(
        "glue", num_classes=2, model_id=tiny_model_dir, attn_implementation=impl, formulation=formulation
    ).eval()
    assert wrapper.model.config._attn_implementation == impl
    assert len(list(lora_attention_layers(wrapper.model))) == stock.config.num_hidden_layers
    batch = _batch(tokenizer)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        ref = stock(**batch).last_hidden_state
        ours = wrapper.model(**batch).last_hidden_state
        # A is random and B is zero: the update x A^T B^T is exactly 0, so bit-identical outputs.
        assert torch.equal(ours, ref)
        if impl == "eager":
            att_ref = stock(**batch, output_attentions=True).attentions
            att = wrapper.model(**batch, output_attentions=True).attentions
            assert len(att) == len(att_ref) and all(torch.equal(a, b) for a, b in zip(att, att_ref))
        # ...and the LoRA path is live: a nonzero B moves the output (this test can fail).
        _randomize_lora(wrapper.model)
        assert not torch.allclose(wrapper.model(**batch).last_hidden_state, ref, atol=1e-3)


def test_decoder_cache_path_matches_stock_and_full_sequence():
    cfg = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        is_decoder=True,
    )
    torch.manual_seed(0)
    stock = RobertaModel(cfg).eval()
    lora = copy.deepcopy(stock)
    replace_self_attention(lora, r=4)
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        for m in (stock, lora):
            first = m(ids[:, :6], use_cache=True)
            m._step = m(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True).last_hidden_state
        assert torch.equal(lora._step, stock._step)
        # With a nonzero update, incremental decoding through the cache equals the full-sequence forward.
        _randomize_lora(lora)
        full = lora(ids).last_hidden_state[:, -1]
        first = lora(ids[:, :6], use_cache=True)
        step = lora(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True).last_hidden_state[
            :, -1
        ]
        assert torch.allclose(step, full, atol=1e-5)
        assert not torch.allclose(full, stock(ids).last_hidden_state[:, -1], atol=1e-3)


def test_forward_is_the_installed_stock_forward_with_two_lines_changed():
    # Version guard: if transformers' RobertaSelfAttention.forward changes, this diff grows and the copy in
    # loralib.article.attention must be refreshed (the output comparisons above check that it still computes the same).
    changed = [
        line
        for line in forward_source_diff().splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed == [
        "-    query_layer = self.query(hidden_states).view(*hidden_shape).transpose(1, 2)",
        "+    query_layer = self.lora_query(hidden_states).view(*hidden_shape).transpose(1, 2)",
        "-    value_layer = self.value(hidden_states).view(*hidden_shape).transpose(1, 2)",
        "+    value_layer = self.lora_value(hidden_states).view(*hidden_shape).transpose(1, 2)",
    ], forward_source_diff()


def test_swap_keeps_every_pretrained_tensor(tiny_model_dir):
    ref = RobertaModel.from_pretrained(tiny_model_dir).state_dict()
    wrapper = LoraWrapperRoberta("glue", num_classes=3, model_id=tiny_model_dir)
    after = wrapper.model.state_dict()
    lora_keys = {k for k in after if k.rsplit(".", 1)[-1] in LORA_PARAM_NAMES}
    assert len(lora_keys) == 4 * wrapper.model_config.num_hidden_layers
    assert set(after) - lora_keys == set(ref)
    assert all(torch.equal(after[k], ref[k]) for k in ref)
    assert wrapper.replaced_modules == [f"encoder.layer.{i}.attention.self" for i in range(2)]
    with pytest.raises(ValueError, match="no stock RobertaSelfAttention"):
        replace_self_attention(wrapper.model)


# ---------------------------------------------------------------- the same math as LoraLinear


@pytest.mark.parametrize(
    "formulation, alpha, init, expected_scaling",
    [("article", None, "article", 1.0), ("scaled", None, "kaiming", 1.0), ("scaled", 16.0, "kaiming", 4.0)],
)
def test_matches_inject_lora_given_same_a_b(
    tiny_model_dir, tokenizer, formulation, alpha, init, expected_scaling
):
    ours = RobertaModel.from_pretrained(tiny_model_dir).eval()
    replace_self_attention(ours, r=4, formulation=formulation, lora_alpha=alpha)
    theirs = RobertaModel.from_pretrained(tiny_model_dir).eval()
    inject_lora(theirs, ["query", "value"], r=4, lora_alpha=alpha, init_lora_weights=INIT_VALUES[init])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in lora_attention_layers(ours):
            assert layer.lora_scaling == expected_scaling
            for which in ("query", "value"):
                lin = theirs.get_submodule(f"{name}.{which}")
                assert isinstance(lin, LoraLinear) and lin.scaling == expected_scaling
                a, b = torch.randn(lin.lora_A.shape, generator=g), torch.randn(lin.lora_B.shape, generator=g)
                getattr(layer, f"lora_{which}_matrix_A").copy_(a)
                getattr(layer, f"lora_{which}_matrix_B").copy_(b * 0.05)
                lin.lora_A.copy_(a)
                lin.lora_B.copy_(b * 0.05)
    batch = _batch(tokenizer)
    out_ours, out_theirs = ours(**batch).last_hidden_state, theirs(**batch).last_hidden_state
    assert torch.allclose(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        out_ours, RobertaModel.from_pretrained(tiny_model_dir)(**batch).last_hidden_state
    )
    # Gradients of A and B agree too (LoraLinear has a hand-written backward; ours is plain autograd).
    out_ours.pow(2).mean().backward()
    out_theirs.pow(2).mean().backward()
    name, layer = next(lora_attention_layers(ours))
    lin = theirs.get_submodule(f"{name}.value")
    assert torch.allclose(layer.lora_value_matrix_A.grad, lin.lora_A.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(layer.lora_value_matrix_B.grad, lin.lora_B.grad, rtol=1e-4, atol=1e-6)


def test_lora_query_is_x_wt_plus_b_plus_scaled_low_rank_update():
    cfg = RobertaConfig(hidden_size=48, num_attention_heads=4, intermediate_size=96)
    layer = LoraRobertaSelfAttention(cfg, r=3, formulation="scaled", lora_alpha=6.0).double()
    assert layer.lora_query_matrix_A.shape == (3, 48) and layer.lora_query_matrix_B.shape == (48, 3)
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_query_matrix_B.normal_()
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    a, b, w, bias = layer.lora_query_matrix_A, layer.lora_query_matrix_B, layer.query.weight, layer.query.bias
    expected = x @ w.T + bias + 2.0 * (x @ a.T @ b.T)  # alpha / r = 6 / 3
    assert torch.allclose(layer.lora_query(x), expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(layer.lora_delta_weight("query"), 2.0 * b @ a)


def test_initialisations():
    cfg = RobertaConfig()  # roberta-base sizes: hidden 768
    torch.manual_seed(0)
    art = LoraRobertaSelfAttention(cfg, r=8, formulation="article")
    sca = LoraRobertaSelfAttention(cfg, r=8, formulation="scaled")
    for layer in (art, sca):
        assert not layer.lora_query_matrix_B.any() and not layer.lora_value_matrix_B.any()
    assert art.lora_query_matrix_A.std().item() == pytest.approx(1.0, rel=0.03)
    bound = 1 / math.sqrt(768)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert sca.lora_query_matrix_A.abs().max().item() <= bound
    assert sca.lora_query_matrix_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)


def test_article_first_update_is_sqrt_3_hidden_times_larger():
    # Adam's first step moves B by ~lr * sign(grad) whatever A is, so dW = B @ A scales with A's std:
    # N(0, 1) vs kaiming-uniform's 1 / sqrt(3 * 768) -> 48x, hence the article's ~10x smaller lr.
    art = first_update_norm("article", lr=1e-4)
    sca = first_update_norm("scaled", lr=1e-4)
    assert art / sca == pytest.approx(math.sqrt(3 * 768), rel=0.15)
    assert first_update_norm("scaled", lr=2e-4) == pytest.approx(2 * sca, rel=1e-3)


# ---------------------------------------------------------------- roberta-base sizes, no download


@pytest.fixture(scope="module")
def base_sized():
    """A random roberta-base-sized wrapper (2-class GLUE head, rank 8), built once: it is 125M parameters."""
    # roberta-base's config.json: RobertaConfig() defaults differ in positions (512) and token types (2).
    cfg = RobertaConfig(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    base = RobertaModel(cfg)
    return LoraWrapperRoberta("glue", num_classes=2, base_model=base, model_id="random-roberta-base-sized")


def test_roberta_base_parameter_counts(base_sized):
    d, layers, r, ff, vocab = 768, 12, 8, 3072, 50265
    # RobertaModel: embeddings (word, 514 positions, 1 token type, LayerNorm) + 12 layers + pooler.
    per_layer = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d
    base = (vocab + 514 + 1) * d + 2 * d + layers * per_layer + (d * d + d)
    assert base == 124_645_632 == base_sized.base_model_param_count
    groups = {"lora": 0, "head": 0, "bias": 0, "layernorm_weight": 0}
    for name, p in base_sized.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        key = (
            "lora"
            if leaf in LORA_PARAM_NAMES
            else "head"
            if name.startswith("finetune_head_")
            else "bias"
            if leaf == "bias"
            else "layernorm_weight"
        )
        if key == "layernorm_weight":
            assert "LayerNorm" in name, name
        groups[key] += p.numel()
    # The article's 420,098, term by term:
    assert groups["lora"] == layers * 2 * (r * d + d * r) == 294_912  # A (8 x 768) + B (768 x 8), q and v
    assert groups["head"] == 2 * d + (d * 2 + 2) == 3_074  # LayerNorm + Linear(768, 2)
    # Biases: per layer q, k, v, attention output (4 x 768), intermediate (3,072), output (768) = 6,912, plus its
    # two LayerNorms' 1,536; then the embedding LayerNorm's 768 and the pooler's 768 (unused by the head, so it
    # never gets a gradient: the article counted it anyway).
    assert groups["bias"] == layers * (4 * d + ff + d + 2 * d) + d + d == 102_912
    assert groups["layernorm_weight"] == layers * 2 * d + d == 19_200  # two per layer + embeddings
    counts = count_parameters(base_sized)
    assert counts.trainable == sum(groups.values()) == 420_098
    assert counts.total == 124_645_632 + 294_912 + 3_074
    assert round(100 * counts.trainable / base_sized.base_model_param_count, 2) == 0.34  # the article's 0.34%


def test_roberta_base_adapter_file_is_about_1_7_mb(base_sized, tmp_path):
    weights = base_sized.save_lora(tmp_path / "adapter")
    size = weights.stat().st_size
    data = 420_098 * 4  # fp32
    assert data < size < data + 40_000  # plus the safetensors header with names and the embedded config
    assert 1.6e6 < size < 1.8e6
    assert (tmp_path / "adapter" / "lora_config.json").exists()


# ---------------------------------------------------------------- freezing flags


@pytest.mark.parametrize("train_biases", [True, False])
@pytest.mark.parametrize("train_embedding", [True, False])
@pytest.mark.parametrize("train_layer_norms", [True, False])
def test_freezing_follows_the_articles_name_rule(
    tiny_model_dir, train_biases, train_embedding, train_layer_norms
):
    w = LoraWrapperRoberta(
        "glue",
        num_classes=2,
        model_id=tiny_model_dir,
        train_biases=train_biases,
        train_embedding=train_embedding,
        train_layer_norms=train_layer_norms,
    )
    for name, p in w.named_parameters():
        # The article's rule (substring tests on model.* names); the head always trains.
        expected = name.startswith("finetune_head_") or (
            "lora_" in name
            or (train_biases and "bias" in name)
            or (train_embedding and "embeddings" in name)
            or (train_layer_norms and "LayerNorm" in name)
        )
        assert p.requires_grad == expected, name


# ---------------------------------------------------------------- heads and losses


def test_glue_classification_loss_is_cross_entropy(tiny_model_dir, tokenizer):
    w = LoraWrapperRoberta("glue", num_classes=3, model_id=tiny_model_dir).eval()
    batch = _batch(tokenizer)
    labels = torch.tensor([2, 0])
    out = w(**batch, labels=labels)
    assert out.logits.shape == (2, 3)
    logp = out.logits.log_softmax(-1)
    assert out.loss.item() == pytest.approx(-(logp[0, 2] + logp[1, 0]).item() / 2, rel=1e-5)
    assert w(**batch).loss is None


def test_stsb_regression_head_is_bounded_and_mse(tiny_model_dir, tokenizer):
    w = LoraWrapperRoberta("glue", num_classes=1, model_id=tiny_model_dir).eval()
    raw = LoraWrapperRoberta("glue", num_classes=1, model_id=tiny_model_dir, regression_range=None).eval()
    assert w.is_regression
    with torch.no_grad():
        w.finetune_head_classifier.weight.mul_(30)  # large outputs: the article's sigmoid * 5 bounds them
    raw.load_state_dict(w.state_dict())
    batch = _batch(tokenizer)
    out = w(**batch, labels=torch.tensor([0.5, 4.0]))
    unbounded = raw(**batch).logits
    assert out.logits.shape == (2, 1) and ((out.logits >= 0) & (out.logits <= 5)).all()
    assert unbounded.abs().max() > 5
    assert torch.allclose(out.logits, 5 * torch.sigmoid(unbounded), atol=1e-6)
    expected = ((out.logits[:, 0] - torch.tensor([0.5, 4.0])) ** 2).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("task_type", ["squad_v1", "squad_v2"])
def test_squad_head_and_loss(tiny_model_dir, tokenizer, task_type):
    w = LoraWrapperRoberta(task_type, model_id=tiny_model_dir).eval()
    assert w.finetune_head_classifier.out_features == 2
    batch = _batch(tokenizer)
    n = batch["input_ids"].shape[1]
    start, end = torch.tensor([0, 3]), torch.tensor([0, 5])  # row 0: the null span on <s>
    out = w(**batch, start_positions=start, end_positions=end)
    assert out.start_logits.shape == (2, n) == out.end_logits.shape
    ce = lambda logits, pos: -logits.log_softmax(-1).gather(1, pos[:, None]).mean()  # noqa: E731
    expected = (ce(out.start_logits, start) + ce(out.end_logits, end)) / 2
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # A position outside the window (answer cut off) is ignored, as in transformers' QA heads.
    out2 = w(**batch, start_positions=torch.tensor([0, n + 50]), end_positions=torch.tensor([0, n + 50]))
    expected2 = (ce(out.start_logits[:1], start[:1]) + ce(out.end_logits[:1], end[:1])) / 2
    assert out2.loss.item() == pytest.approx(expected2.item(), rel=1e-5)


def _brute_force_best_span(s, e, ctx, max_len):
    best, arg = -math.inf, (0, 0)
    for i in range(len(s)):
        for j in range(i, min(len(s), i + max_len)):
            if ctx[i] and ctx[j] and s[i] + e[j] > best:
                best, arg = s[i] + e[j], (i, j)
    return best, arg


def test_squad_null_decision_against_brute_force():
    g = torch.Generator().manual_seed(0)
    s, e = torch.randn(4, 15, generator=g), torch.randn(4, 15, generator=g)
    ctx = torch.zeros(4, 15, dtype=torch.bool)
    ctx[:, 5:14] = True  # question tokens, separators and padding excluded
    s[1, 0] = e[1, 0] = 10.0  # row 1: a confident null
    out = squad_null_decision(s, e, ctx, max_answer_length=4, null_score_diff_threshold=0.0)
    for row in range(4):
        best, (i, j) = _brute_force_best_span(s[row].tolist(), e[row].tolist(), ctx[row].tolist(), 4)
        null = (s[row, 0] + e[row, 0]).item()
        assert out["span_score"][row].item() == pytest.approx(best)
        assert out["score_diff"][row].item() == pytest.approx(null - best)
        assert bool(out["no_answer"][row]) == (null - best > 0.0)
        if out["no_answer"][row]:
            assert (out["start"][row].item(), out["end"][row].item()) == (0, 0)
        else:
            assert (out["start"][row].item(), out["end"][row].item()) == (i, j)
    assert bool(out["no_answer"][1])
    # The threshold moves the decision: a huge threshold never answers "no answer".
    assert not squad_null_decision(s, e, ctx, 4, null_score_diff_threshold=1e9)["no_answer"].any()


def test_predict_spans_uses_null_only_for_v2(tiny_model_dir):
    s = torch.zeros(1, 6)
    e = torch.zeros(1, 6)
    s[0, 0] = e[0, 0] = 5.0
    s[0, 2] = e[0, 3] = 1.0
    v2 = LoraWrapperRoberta("squad_v2", model_id=tiny_model_dir)
    v1 = LoraWrapperRoberta("squad_v1", model_id=tiny_model_dir)
    assert bool(v2.predict_spans(s, e)["no_answer"][0])
    out = v1.predict_spans(s, e)
    assert not out["no_answer"].any() and (out["start"].item(), out["end"].item()) == (2, 3)
    v2.null_score_diff_threshold = 100.0
    assert not v2.predict_spans(s, e)["no_answer"].any()


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize(
    "task_type, num_classes, formulation",
    [("glue", 2, "article"), ("glue", 1, "scaled"), ("squad_v2", None, "scaled")],
)
def test_save_and_reload_reproduces_logits(
    tiny_model_dir, tokenizer, tmp_path, task_type, num_classes, formulation
):
    torch.manual_seed(0)
    w = LoraWrapperRoberta(
        task_type, num_classes=num_classes, model_id=tiny_model_dir, formulation=formulation, r=4
    )
    with torch.no_grad():  # stand-in for training: every trained tensor moves
        for p in w.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    w.null_score_diff_threshold = 1.5
    w.save_lora(tmp_path / "a", note="hello")
    torch.manual_seed(123)  # a different A draw and head init at rebuild must not matter
    w2 = LoraWrapperRoberta.from_lora(tmp_path / "a")
    assert (w2.task_type, w2.num_classes, w2.r, w2.formulation) == (
        w.task_type,
        w.num_classes,
        4,
        formulation,
    )
    assert w2.null_score_diff_threshold == 1.5
    batch = _batch(tokenizer)
    w.eval(), w2.eval()
    with torch.no_grad():
        a, b = w(**batch), w2(**batch)
    for key in a.keys():
        assert torch.equal(a[key], b[key]), key
    sd1, sd2 = w.state_dict(), w2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_from_lora_rejects_other_base_or_format(tiny_model_dir, tmp_path):
    w = LoraWrapperRoberta("glue", num_classes=2, model_id=tiny_model_dir)
    w.save_lora(tmp_path / "a")
    other = RobertaModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        other.embeddings.word_embeddings.weight.add_(1.0)
    with pytest.raises(ValueError, match="different weights"):
        LoraWrapperRoberta.from_lora(tmp_path / "a", base_model=other)
    from loralib.adapters import save_lora

    plain = RobertaModel.from_pretrained(tiny_model_dir)
    inject_lora(plain, ["query"])
    save_lora(plain, tmp_path / "plain")
    with pytest.raises(ValueError, match="not a LoraWrapperRoberta"):
        LoraWrapperRoberta.from_lora(tmp_path / "plain")
    with pytest.raises(FileNotFoundError):
        LoraWrapperRoberta.from_lora(tmp_path / "missing")


# ---------------------------------------------------------------- training


def _toy_data(tokenizer):
    """loralib.toy's batches and loop when that module exists, else a small in-test sentiment set."""
    try:
        from loralib import toy
    except ImportError:
        toy = None
    if toy is not None:
        return toy.toy_batches(
            tokenizer, split="train", batch_size=16, seed=0, max_length=32
        ), toy.train_steps
    good = ["great", "wonderful", "lovely", "excellent", "happy", "fine"]
    bad = ["terrible", "awful", "boring", "bad", "sad", "poor"]
    texts, labels = [], []
    for i in range(64):
        word = (good if i % 2 else bad)[(i // 2) % 6]
        texts.append(f"the film was {word} and the cast was {word}")
        labels.append(i % 2)
    batches = []
    for k in range(0, 64, 16):
        enc = tokenizer(texts[k : k + 16], padding=True, truncation=True, max_length=32, return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor(labels[k : k + 16])})

    def train_steps(model, batches, epochs=1, lr=1e-3, progress=False):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        losses = []
        for _ in range(epochs):
            for b in batches:
                opt.zero_grad()
                loss = model(**b).loss
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses

    return batches, train_steps


def test_training_lowers_loss_and_changes_only_trainable(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    w = LoraWrapperRoberta("glue", num_classes=2, model_id=tiny_model_dir, formulation="scaled")
    batches, train_steps = _toy_data(tokenizer)
    before = {n: p.detach().clone() for n, p in w.named_parameters()}
    epochs = 8
    losses = train_steps(w, batches, epochs=epochs, lr=5e-3, progress=False)
    assert len(losses) == epochs * len(batches)
    k = len(batches)  # compare the first and the last epoch's mean loss
    assert sum(losses[-k:]) / k < 0.8 * sum(losses[:k]) / k, losses
    unchanged_trainable = []
    for n, p in w.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
        elif torch.equal(p, before[n]):
            unchanged_trainable.append(n)
    # The pooler's bias is trainable (the article's count) but the head never reads the pooler.
    assert unchanged_trainable == ["model.pooler.dense.bias"]


def test_plugs_into_hf_trainer(tiny_model_dir, tokenizer, tmp_path):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    rows = [
        {**tokenizer(f"sample number {i} is {'good' if i % 2 else 'bad'}"), "labels": i % 2}
        for i in range(16)
    ]
    torch.manual_seed(0)
    w = LoraWrapperRoberta("glue", num_classes=2, model_id=tiny_model_dir)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=w, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer)
    )
    before = w.model.encoder.layer[0].attention.self.lora_value_matrix_B.detach().clone()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert not torch.equal(w.model.encoder.layer[0].attention.self.lora_value_matrix_B, before)
    pred = trainer.predict(rows)
    assert pred.predictions.shape == (16, 2) and math.isfinite(pred.metrics["test_loss"])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(task_type="mnli_whatever", num_classes=3), ValueError, "unknown task_type"),
        (dict(task_type=None), ValueError, "unknown task_type"),
        (dict(task_type="glue"), ValueError, "needs num_classes"),
        (dict(task_type="glue", num_classes=0), ValueError, "positive integer"),
        (dict(task_type="squad_v2", num_classes=3), ValueError, "exactly 2 outputs"),
        (dict(task_type="glue", num_classes=2, r=0), ValueError, "positive integer"),
        (dict(task_type="glue", num_classes=2, r=2.5), ValueError, "positive integer"),
        (dict(task_type="glue", num_classes=2, formulation="peft"), ValueError, "unknown formulation"),
        (
            dict(task_type="glue", num_classes=2, formulation="article", lora_alpha=16),
            ValueError,
            "no scaling",
        ),
        (dict(task_type="glue", num_classes=2, dropout_rate=1.5), ValueError, "dropout_rate"),
        (dict(task_type="glue", num_classes=1, regression_range=(5, 0)), ValueError, "low < high"),
    ],
)
def test_bad_arguments_fail_clearly(tiny_model_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraWrapperRoberta(model_id=tiny_model_dir, **kwargs)


def test_bad_forward_inputs_fail_clearly(tiny_model_dir, tokenizer):
    batch = _batch(tokenizer)
    glue = LoraWrapperRoberta("glue", num_classes=2, model_id=tiny_model_dir)
    squad = LoraWrapperRoberta("squad_v1", model_id=tiny_model_dir)
    with pytest.raises(ValueError, match="not start_positions"):
        glue(**batch, start_positions=torch.tensor([0, 1]), end_positions=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not labels"):
        squad(**batch, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="both start_positions and end_positions"):
        squad(**batch, start_positions=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="already has LoRA"):
        LoraRobertaSelfAttention.from_self_attention(glue.model.encoder.layer[0].attention.self)
    with pytest.raises(ValueError, match="\\(batch, seq\\)"):
        squad_null_decision(torch.zeros(3), torch.zeros(3))


def test_the_wrapper_takes_r_and_no_longer_its_former_name_lora_rank(tiny_model_dir):
    w = LoraWrapperRoberta(task_type="glue", num_classes=2, model_id=tiny_model_dir, r=4)
    assert w.r == 4 and w.lora_metadata()["r"] == 4 and "lora_rank" not in w.lora_metadata()
    with pytest.raises(TypeError, match="lora_rank"):
        LoraWrapperRoberta(task_type="glue", num_classes=2, model_id=tiny_model_dir, lora_rank=4)
