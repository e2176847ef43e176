"""Structured pruning: which decoder layers matter (block influence), and a model without the others."""

import copy

import torch
from torch import nn


@torch.no_grad()
def block_influence(model, batches: list[dict]) -> list[float]:
    """Per decoder layer, 1 - cos(input, output) of its hidden states, averaged over tokens.

    A layer that barely changes its input (low influence) is the cheapest to remove (ShortGPT).
    """
    layers = decoder_layers(model)
    totals = torch.zeros(len(layers))
    count = 0
    captured = {}

    def hook(index):
        def record(module, args, kwargs, output):
            inputs = args[0] if args else kwargs["hidden_states"]
            outputs = output[0] if isinstance(output, tuple) else output
            captured[index] = 1 - nn.functional.cosine_similarity(inputs.float(), outputs.float(), dim=-1)
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            mask = batch["attention_mask"].bool()
            model(**batch)
            for index, influence in captured.items():
                totals[index] += influence[mask].sum().item()
            count += mask.sum().item()
    finally:
        for handle in handles:
            handle.remove()
    return (totals / count).tolist()


def most_influential(influence: list[float], keep: int) -> list[int]:
    """Indices of the ``keep`` most influential layers, in model order."""
    return sorted(sorted(range(len(influence)), key=lambda i: influence[i], reverse=True)[:keep])


def keep_layers(model, keep: list[int]):
    """A copy of ``model`` with only the decoder layers ``keep``: still a standard HF architecture."""
    pruned = copy.deepcopy(model)
    layers = decoder_layers(pruned)
    kept = nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # the KV cache is indexed by it
    pruned.base_model.layers = kept
    pruned.config.num_hidden_layers = len(keep)
    if getattr(pruned.config, "layer_types", None):
        pruned.config.layer_types = [pruned.config.layer_types[i] for i in keep]
    return pruned


def decoder_layers(model) -> nn.ModuleList:
    return model.base_model.layers
