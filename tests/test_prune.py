"""Depth pruning: block influence ranks layers; the pruned model is a standard checkpoint."""

import math

import torch
from transformers import AutoModelForCausalLM

from distilflow.tasks import prune


def batches(tokenizer):
    tokenizer.padding_side = "right"
    return [tokenizer(["my parcel is late", "the app crashes when I log in"], return_tensors="pt", padding=True)]


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
