"""Structured pruning: layers by block influence, MLP channels and KV groups by activation importance; the
pruned model is a standard checkpoint."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from distilflow.configs.schema import DepthPruneConfig, PruneConfig, WidthPruneConfig
from distilflow.tasks import prune
from distilflow.tasks.errors import DistilflowError


def batches(tokenizer):
    return [tokenizer(["my parcel is late", "the app crashes when I log in"], return_tensors="pt", padding=True,
                      padding_side="right")]


def test_block_influence_scores_every_layer(tiny_teacher):
    model, tokenizer = tiny_teacher
    influence = prune.block_influence(model, batches(tokenizer))
    assert len(influence) == model.config.num_hidden_layers
    assert all(math.isfinite(v) and 0 <= v <= 2 for v in influence)


def test_most_influential_keeps_the_top_layers_in_order():
    assert prune.most_influential([0.9, 0.1, 0.5, 0.7], keep=2) == [0, 3]


def test_kept_layers_save_and_reload_as_a_standard_model(tiny_teacher, tmp_path):
    model, tokenizer = tiny_teacher
    pruned = prune.keep_layers(model, [0, 3])
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, reloaded(ids).logits, atol=1e-5)


def test_pruned_model_generates_with_its_kv_cache(tiny_teacher):
    model, tokenizer = tiny_teacher
    pruned = prune.keep_layers(model, [1, 2])
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    cached = pruned.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = pruned.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_the_teacher_is_left_untouched(tiny_teacher):
    model, _ = tiny_teacher
    prune.keep_layers(model, [0])
    assert model.config.num_hidden_layers == 4 and len(prune.decoder_layers(model)) == 4


def test_depth_to_a_parameter_budget_drops_the_least_influential_layers_first(tiny_teacher):
    model, _ = tiny_teacher
    per_layer = sum(p.numel() for p in prune.decoder_layers(model)[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    budget = DepthPruneConfig(max_params=total - per_layer - 1)  # one layer is not enough: two must go
    assert prune.layers_to_keep(model, [0.9, 0.1, 0.5, 0.05], budget) == [0, 2]


def test_a_parameter_budget_below_the_embeddings_is_an_error(tiny_teacher):
    model, _ = tiny_teacher
    with pytest.raises(DistilflowError, match="max_params is 1,000.*raise it"):
        prune.layers_to_keep(model, [0.9, 0.1, 0.5, 0.05], DepthPruneConfig(max_params=1000))


def test_keeping_as_many_layers_as_the_student_has_is_an_error(tiny_teacher):
    model, _ = tiny_teacher
    with pytest.raises(DistilflowError, match="keep_layers is 4, but the model has only 4 layers"):
        prune.layers_to_keep(model, [0.9, 0.1, 0.5, 0.05], DepthPruneConfig(keep_layers=4))


def test_width_importance_scores_every_mlp_channel_and_kv_group(tiny_teacher):
    model, tokenizer = tiny_teacher
    importance = prune.width_importance(model, batches(tokenizer))
    assert [len(s) for s in importance["mlp"]] == [model.config.intermediate_size] * model.config.num_hidden_layers
    assert [len(s) for s in importance["kv_groups"]] == [model.config.num_key_value_heads] * 4
    assert all((s >= 0).all() and s.sum() > 0 for s in importance["mlp"] + importance["kv_groups"])


def synthetic_importance(model, favourite_channels, favourite_group):
    """Importance that prefers the given MLP channels and key/value group in every layer."""
    layers = model.config.num_hidden_layers
    mlp = torch.zeros(model.config.intermediate_size)
    mlp[favourite_channels] = 1.0
    groups = torch.zeros(model.config.num_key_value_heads)
    groups[favourite_group] = 1.0
    return {"mlp": [mlp] * layers, "kv_groups": [groups] * layers}


def test_mlp_pruning_keeps_the_most_important_channels(tiny_teacher):
    model, _ = tiny_teacher
    keep = list(range(1, 128, 2))  # 64 of 128 channels
    pruned = prune.prune_width(model, synthetic_importance(model, keep, 0), WidthPruneConfig(mlp_ratio=0.5))
    original, narrowed = prune.decoder_layers(model)[2].mlp, prune.decoder_layers(pruned)[2].mlp
    assert pruned.config.intermediate_size == 64
    assert torch.equal(narrowed.up_proj.weight, original.up_proj.weight[keep])
    assert torch.equal(narrowed.down_proj.weight, original.down_proj.weight[:, keep])


def test_kv_head_pruning_keeps_the_most_important_group_with_its_query_heads(tiny_teacher):
    model, _ = tiny_teacher
    pruned = prune.prune_width(model, synthetic_importance(model, [0], 1), WidthPruneConfig(kv_heads=1))
    original, narrowed = prune.decoder_layers(model)[0].self_attn, prune.decoder_layers(pruned)[0].self_attn
    assert (pruned.config.num_key_value_heads, pruned.config.num_attention_heads, pruned.config.head_dim) == (1, 2, 16)
    assert torch.equal(narrowed.k_proj.weight, original.k_proj.weight[16:32])  # group 1 of 2, head_dim 16
    assert torch.equal(narrowed.q_proj.weight, original.q_proj.weight[32:64])  # its query heads 2 and 3
    assert torch.equal(narrowed.o_proj.weight, original.o_proj.weight[:, 32:64])


def test_width_pruned_model_saves_and_reloads_as_a_standard_model(tiny_teacher, tmp_path):
    model, tokenizer = tiny_teacher
    importance = prune.width_importance(model, batches(tokenizer))
    pruned = prune.prune_width(model, importance, WidthPruneConfig(mlp_ratio=0.5, kv_heads=1))
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, reloaded(ids).logits, atol=1e-5)
    cached = reloaded.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(cached, reloaded.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))


def test_keeping_as_many_kv_heads_as_the_student_has_is_an_error(tiny_teacher):
    model, tokenizer = tiny_teacher
    with pytest.raises(DistilflowError, match="kv_heads is 2, but the student has only 2"):
        prune.prune_width(model, synthetic_importance(model, [0], 0), WidthPruneConfig(kv_heads=2))


@pytest.mark.parametrize(("size", "ratio", "width"), [(1536, 0.75, 1152), (1536, 0.7, 1088), (128, 0.5, 64),
                                                      (128, 0.75, 96), (1536, 0.01, 64)])
def test_mlp_width_is_rounded_to_a_multiple_of_64_or_8_for_small_models(size, ratio, width):
    assert prune.mlp_width(size, ratio) == width


def test_prune_applies_width_then_depth_and_reports_its_scores(tiny_teacher, tmp_path):
    model, tokenizer = tiny_teacher
    cfg = PruneConfig(width=WidthPruneConfig(mlp_ratio=0.5), depth=DepthPruneConfig(keep_layers=2))
    pruned, scores = prune.prune(model, batches(tokenizer), cfg)
    assert (pruned.config.num_hidden_layers, pruned.config.intermediate_size) == (2, 64)
    assert scores["kept_layers"] == prune.most_influential(scores["block_influence"], 2)
    assert json.loads(json.dumps(scores)) == scores  # plain lists: written beside the model as JSON
    assert prune.plot_importance(scores, tmp_path / "importance.png").stat().st_size > 0
