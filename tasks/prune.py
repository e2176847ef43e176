"""Structured pruning: score layers, MLP channels and attention heads on calibration prompts, and cut the
least important ones, leaving a standard Hugging Face architecture (only its config's sizes change)."""

import copy
from pathlib import Path

import torch
from torch import nn

from distilflow.configs.schema import DepthPruneConfig, PruneConfig, WidthPruneConfig
from distilflow.tasks.errors import DistilflowError


def prune(model, batches: list[dict], cfg: PruneConfig) -> tuple[nn.Module, dict]:
    """``model`` pruned as ``cfg`` says (a copy), and the importance scores that chose what stays (as lists).

    All scores are measured on the unpruned model; width goes first, so a parameter budget for depth
    counts the narrowed layers.
    """
    scores = {"block_influence": block_influence(model, batches)}
    pruned = model
    if cfg.width:
        importance = width_importance(model, batches)
        pruned = prune_width(model, importance, cfg.width)
        scores.update({name: [layer.tolist() for layer in per_layer] for name, per_layer in importance.items()})
        scores["kept_widths"] = {"mlp": pruned.config.intermediate_size, "kv_groups": pruned.config.num_key_value_heads}
    if cfg.depth:
        scores["kept_layers"] = layers_to_keep(pruned, scores["block_influence"], cfg.depth)
        pruned = keep_layers(pruned, scores["kept_layers"])
    return pruned, scores


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


def most_influential(influence: list[float], keep: int, key: str = "compress.prune.depth.keep_layers") -> list[int]:
    """Indices of the ``keep`` most influential layers, in model order; ``key`` names ``keep`` in the error
    when it would keep every layer."""
    if keep >= len(influence):
        raise DistilflowError(f"{key} is {keep}, but the model has only {len(influence)} layers: nothing would be "
                              "cut; keep fewer")
    return sorted(sorted(range(len(influence)), key=lambda i: influence[i], reverse=True)[:keep])


def layers_to_keep(model, influence: list[float], cfg: DepthPruneConfig) -> list[int]:
    """The layers depth pruning keeps: the ``keep_layers`` most influential, or all but the least
    influential ones that must go for the model to fit in ``max_params``."""
    layers = decoder_layers(model)
    if cfg.keep_layers:
        return most_influential(influence, cfg.keep_layers)
    total = sum(p.numel() for p in model.parameters())
    least_influential_first = sorted(range(len(layers)), key=lambda i: influence[i])
    dropped = set()
    for index in least_influential_first[:-1]:  # one layer always stays
        if total <= cfg.max_params:
            break
        total -= sum(p.numel() for p in layers[index].parameters())
        dropped.add(index)
    if total > cfg.max_params:
        raise DistilflowError(f"compress.prune.depth.max_params is {cfg.max_params:,}, but the student keeping one "
                              f"layer still has {total:,} parameters (embeddings dominate); raise it")
    return [i for i in range(len(layers)) if i not in dropped]


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


@torch.no_grad()
def width_importance(model, batches: list[dict]) -> dict[str, list[torch.Tensor]]:
    """Per layer, how much each MLP intermediate channel and each key/value group is used (Minitron).

    ``mlp``: mean |activation| of every channel entering ``down_proj``; ``kv_groups``: mean L2 norm of
    the attention output of every key/value head's query heads (what enters ``o_proj``), over tokens.
    """
    config = model.config
    head_dim = _head_dim(config)
    queries_per_group = config.num_attention_heads // config.num_key_value_heads
    layers = decoder_layers(model)
    mlp = [torch.zeros(config.intermediate_size) for _ in layers]
    kv_groups = [torch.zeros(config.num_key_value_heads) for _ in layers]
    mask = {}

    def record(totals, index, per_position):
        def hook(module, args):
            values = per_position(args[0].float())
            totals[index] += values[mask["tokens"]].sum(dim=0).cpu()  # the model may be on a GPU, totals are not
        return hook

    def channel_magnitude(x):
        return x.abs()

    def group_norm(x):
        heads = x.unflatten(-1, (config.num_key_value_heads, queries_per_group, head_dim))
        return heads.norm(dim=-1).sum(dim=-1)

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(record(mlp, i, channel_magnitude)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(record(kv_groups, i, group_norm)))
    tokens = 0
    try:
        for batch in batches:
            mask["tokens"] = batch["attention_mask"].bool()
            model(**batch)
            tokens += mask["tokens"].sum().item()
    finally:
        for handle in handles:
            handle.remove()
    return {"mlp": [t / tokens for t in mlp], "kv_groups": [t / tokens for t in kv_groups]}


def prune_width(model, importance: dict[str, list[torch.Tensor]], cfg: WidthPruneConfig,
                key: str = "compress.prune.width"):
    """A copy of ``model`` keeping, in every layer, its most used MLP channels and key/value groups (``cfg`` is the
    config section at ``key``, which errors name).

    Every layer keeps the same number (a HF config has one intermediate_size and one head count), but
    each layer chooses its own.
    """
    pruned = copy.deepcopy(model)
    config = pruned.config
    layers = decoder_layers(pruned)
    if cfg.mlp_ratio:
        width = mlp_width(config.intermediate_size, cfg.mlp_ratio)
        for layer, scores in zip(layers, importance["mlp"]):
            channels = _top(scores, width)
            _keep_outputs(layer.mlp.gate_proj, channels)
            _keep_outputs(layer.mlp.up_proj, channels)
            _keep_inputs(layer.mlp.down_proj, channels)
        config.intermediate_size = width
    if cfg.kv_heads:
        if cfg.kv_heads >= config.num_key_value_heads:
            raise DistilflowError(f"{key}.kv_heads is {cfg.kv_heads}, but the student has only "
                                  f"{config.num_key_value_heads} key/value heads; keep fewer")
        head_dim = _head_dim(config)
        queries_per_group = config.num_attention_heads // config.num_key_value_heads
        for layer, scores in zip(layers, importance["kv_groups"]):
            groups = _top(scores, cfg.kv_heads)
            query_heads = _expand(groups, queries_per_group)
            attention = layer.self_attn
            _keep_outputs(attention.q_proj, _expand(query_heads, head_dim))
            _keep_outputs(attention.k_proj, _expand(groups, head_dim))
            _keep_outputs(attention.v_proj, _expand(groups, head_dim))
            _keep_inputs(attention.o_proj, _expand(query_heads, head_dim))
        # head_dim no longer follows from hidden_size / heads: it must be written out.
        config.head_dim = head_dim
        config.num_attention_heads = cfg.kv_heads * queries_per_group
        config.num_key_value_heads = cfg.kv_heads
    return pruned


def mlp_width(size: int, ratio: float) -> int:
    """``ratio`` of ``size`` rounded to a multiple of 64 (8 under 512), the tile GPU kernels and 4-bit groups want."""
    multiple = 64 if size >= 512 else 8
    return max(multiple, round(size * ratio / multiple) * multiple)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


def _expand(indices: torch.Tensor, block: int) -> torch.Tensor:
    """Indices of blocks -> indices of their elements: [1, 3] with block 2 -> [2, 3, 6, 7]."""
    return (indices[:, None] * block + torch.arange(block)).flatten()


def _keep_outputs(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[rows].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[rows].clone())
    linear.out_features = len(rows)


def _keep_inputs(linear: nn.Linear, columns: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[:, columns].clone())
    linear.in_features = len(columns)


def decoder_layers(model) -> nn.ModuleList:
    return model.base_model.layers


def plot_importance(scores: dict, path: Path) -> Path:
    """What pruning saw: block influence per layer (kept layers marked) and, for width pruning, the
    importance of every layer's MLP channels and key/value groups."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = ["block_influence"] + [name for name in ("mlp", "kv_groups") if name in scores]
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    influence = scores["block_influence"]
    kept = set(scores.get("kept_layers", range(len(influence))))
    axis = axes[0][0]
    colors = ["tab:blue" if i in kept else "tab:red" for i in range(len(influence))]
    axis.bar(range(len(influence)), influence, color=colors)
    axis.set(title="Block influence, 1 - cos(input, output) (red: removed)", xlabel="layer", ylabel="influence",
             yscale="log")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    titles = {"mlp": "MLP channel importance, sorted per layer", "kv_groups": "Key/value group importance"}
    for axis, name in zip((row[0] for row in axes[1:]), panels[1:]):
        matrix = torch.tensor(scores[name]).sort(dim=1, descending=True).values.numpy()
        image = axis.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
        axis.set(title=titles[name], xlabel="rank within layer", ylabel="layer")
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.colorbar(image, ax=axis)
        if name in scores.get("kept_widths", {}):
            axis.axvline(scores["kept_widths"][name] - 0.5, color="tab:red", label="cut: the rest is removed")
            axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
