"""GGUF export of the deployed model, for llama.cpp and Ollama users on CPUs and edge devices.

The checkpoint is loaded with transformers, which dequantizes a compressed-tensors (W4A16, FP8)
checkpoint on CPU, and written with the `gguf` package's own writer, tensor-name map, vocab helpers and
numpy quantizers (f16, Q8_0, and the 4-bit Q4_0 and Q4_1). A W4A16 checkpoint whose 4-bit integers are
Q4_0's own grid (symmetric, groups of a multiple of 32 columns, as GPTQ and AWQ write them) is stored as Q4_0
with its own scales: exactly, where gguf's quantizer would pick each block's scale anew and round the rounded
weights again. Supported:
Llama-architecture decoders with a byte-level BPE tokenizer (the SmolLM2 family and the models
distilflow derives from it); anything else is a clear error, never a broken file. llama.cpp serves the
result (tasks/serving.py).
"""

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from distilflow.tasks.errors import DistilflowError

GGUF_TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    # 4-bit weights in blocks of 32 with an f16 scale (Q4_0: 4.5 bits per weight) and an f16 minimum
    # (Q4_1: 5.0 bits); llama.cpp has CPU kernels for both.
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}
FOUR_BIT = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1)

# llama.cpp does not store how text is split before BPE; it names the splitting. These are the
# Hugging Face pre_tokenizer settings that split text the way the named llama.cpp pre-tokenizer does.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
PRE_TOKENIZERS = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


def export(model_dir: Path, out_file: Path, gguf_type: str, *, name: str, license: str | None = None) -> Path:
    """Write the model in ``model_dir`` to ``out_file`` as GGUF of ``gguf_type`` (a key of GGUF_TYPES)."""
    from transformers import AutoConfig

    _check_architecture(AutoConfig.from_pretrained(model_dir))
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    pre = pre_tokenizer_name(tokenizer_json)
    model, tokenizer = load_dequantized(model_dir)
    config = model.config
    tensor_type, file_type = GGUF_TYPES[gguf_type]

    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    if license:
        writer.add_license(license)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, config)
    _add_vocabulary(writer, model_dir, tokenizer, tokenizer_json, pre, config.vocab_size)
    _add_tensors(writer, model, tensor_type, q4_0_scales(model_dir) if gguf_type == "q4_0" else {})
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def load_dequantized(model_dir: Path):
    """The checkpoint as plain fp32 weights, however it was saved (compressed-tensors is dequantized)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    quantization = getattr(AutoConfig.from_pretrained(model_dir), "quantization_config", None) or {}
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} \
        if quantization.get("quant_method") == "compressed-tensors" else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def on_q4_0_grid(model_dir: Path) -> bool:
    """Whether the checkpoint's quantized weights are d·q with q in [-8, 7], one d per block of 32 columns or
    more: compressed-tensors' symmetric 4-bit integer groups, when the group size is a multiple of 32."""
    quantization = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    groups = [group.get("weights") or {} for group in quantization.get("config_groups", {}).values()]
    return quantization.get("quant_method") == "compressed-tensors" and bool(groups) and all(
        w.get("num_bits") == 4 and w.get("type") == "int" and w.get("symmetric") and w.get("strategy") == "group"
        and (w.get("group_size") or 1) % 32 == 0 for w in groups)


def q4_0_scales(model_dir: Path) -> dict[str, np.ndarray]:
    """Each quantized weight's group scales (rows x groups), by the weight's name; none off Q4_0's grid."""
    if not on_q4_0_grid(model_dir):
        return {}
    scales = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as tensors:
            scales.update({key.removesuffix("_scale"): tensors.get_tensor(key).float().numpy()
                           for key in tensors.keys() if key.endswith(".weight_scale")})
    return scales


def q4_0_on_grid(weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q4_0 blocks (an f16 scale, then 32 4-bit values offset by 8, low halves first) of a weight already on
    ``scales``' grid: each block takes its group's scale, so every value is stored exactly."""
    rows, columns = weight.shape
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_0][0]
    d = np.repeat(scales.astype(np.float16), columns // block // scales.shape[1], axis=1).reshape(-1, 1)
    blocks = weight.reshape(-1, block)
    q = np.rint(np.divide(blocks, d, out=np.zeros_like(blocks), where=d != 0)) + 8
    q = q.clip(0, 15).astype(np.uint8)
    packed = q[:, :block // 2] | (q[:, block // 2:] << np.uint8(4))
    return np.concatenate([d.view(np.uint8), packed], axis=1).reshape(rows, -1)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenization; an error when llama.cpp has none."""
    model = tokenizer_json.get("model", {}).get("type")
    found = _pre_tokenizer_settings(tokenizer_json.get("pre_tokenizer") or {})
    for name, settings in PRE_TOKENIZERS.items():
        if model == "BPE" and found == settings:
            return name
    raise DistilflowError(
        f"deploy.gguf: the model's tokenizer ({model}, pre-tokenizer {json.dumps(found)}) has no llama.cpp "
        f"counterpart distilflow knows (byte-level BPE with: {', '.join(PRE_TOKENIZERS)}); set deploy.gguf: none")


def _pre_tokenizer_settings(pre: dict) -> dict:
    """The settings of a pre_tokenizer that change how text is split (offset bookkeeping left out)."""
    if pre.get("type") == "Sequence":
        return {"type": "Sequence", "pretokenizers": [_pre_tokenizer_settings(p) for p in pre["pretokenizers"]]}
    keys = {"ByteLevel": ("add_prefix_space", "use_regex"), "Digits": ("individual_digits",)}.get(pre.get("type"))
    return {"type": pre.get("type"), **{k: pre.get(k) for k in keys}} if keys else pre


def _check_architecture(config) -> None:
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    problems = [f"model_type {config.model_type!r} (not llama)"] * (config.model_type != "llama")
    problems += [f"rope_type {rope_type!r} (not default)"] * (rope_type != "default")
    problems += ["attention or MLP biases"] * bool(getattr(config, "attention_bias", False)
                                                    or getattr(config, "mlp_bias", False))
    if problems:
        raise DistilflowError(f"deploy.gguf: export supports plain Llama decoders; this model has "
                              f"{', '.join(problems)}. Set deploy.gguf: none")


def _add_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _add_vocabulary(writer: gguf.GGUFWriter, model_dir: Path, tokenizer, tokenizer_json: dict, pre: str,
                    vocab_size: int) -> None:
    tokens, types = token_table(tokenizer_json, vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    # What the tokenizer does, not what its config files claim: llama.cpp adds BOS when told to.
    special.add_special_token["bos"] = tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    special.add_to_gguf(writer, quiet=True)


def token_table(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[gguf.TokenType]]:
    """Every token id's text and kind; special added tokens are CONTROL, so llama.cpp parses them in prompts."""
    texts = {i: text for text, i in tokenizer_json["model"]["vocab"].items()}
    added = {a["id"]: a for a in tokenizer_json.get("added_tokens", [])}
    texts.update({i: a["content"] for i, a in added.items()})
    if max(texts) >= vocab_size:
        raise DistilflowError(f"deploy.gguf: the tokenizer has token id {max(texts)}, beyond the model's "
                              f"vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(texts.get(i, f"[PAD{i}]"))  # embedding rows no token uses
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL if i in texts else gguf.TokenType.UNUSED)
    return tokens, types


def _add_tensors(writer: gguf.GGUFWriter, model, tensor_type: gguf.GGMLQuantizationType,
                 scales: dict[str, np.ndarray]) -> None:
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if not hf_name.endswith((".weight", ".bias")):
            continue  # quantization scales and shapes: already folded into the dequantized weights
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when the output matrix is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise DistilflowError(f"deploy.gguf: no GGUF name for tensor {hf_name}")
        weight, grid = tensor.float().numpy(), scales.get(hf_name)
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(hf_name.split(".")[-2])
        if heads:
            weight = interleave_rope_rows(weight, heads)
            grid = grid if grid is None else interleave_rope_rows(grid, heads)
        tied_embedding = config.tie_word_embeddings and name == "token_embd.weight"
        stored = _storage_type(weight, tensor_type, tied_embedding=tied_embedding)
        data = q4_0_on_grid(weight, grid) if grid is not None else gguf.quants.quantize(weight, stored)
        writer.add_tensor(name, data, raw_dtype=stored)


def interleave_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a q/k projection's rows for llama.cpp's rotary embedding.

    Hugging Face Llama rotates dimension i of each head with dimension i + d/2; llama.cpp rotates
    dimensions 2i and 2i + 1. Row i + d/2 moves next to row i.
    """
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).swapaxes(1, 2).reshape(rows, columns)


def _storage_type(weight: np.ndarray, wanted: gguf.GGMLQuantizationType, *,
                  tied_embedding: bool) -> gguf.GGMLQuantizationType:
    """Norms stay f32 (as llama.cpp's converter keeps them); a row the type's blocks do not divide stays f16.
    A token embedding that is also the output matrix keeps 8 bits under a 4-bit type: llama.cpp's quantizer
    gives the output matrix Q6_K, or Q8_0 when its rows are not a multiple of 256 (SmolLM2's 576), and
    gguf-py has no K-quant quantizer."""
    if weight.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if tied_embedding and wanted in FOUR_BIT:
        return gguf.GGMLQuantizationType.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if weight.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16
