"""GGUF export of the deployed model, for llama.cpp and Ollama users on CPUs and edge devices.

The checkpoint is loaded with transformers, which dequantizes a compressed-tensors (W4A16, FP8)
checkpoint on CPU, and written with the `gguf` package's own writer, tensor-name map and vocab
helpers. Supported: Llama-architecture decoders with a byte-level BPE tokenizer (the SmolLM2 family
and the models distilflow derives from it); anything else is a clear error, never a broken file.

Run as a module, it answers held-out prompts with llama.cpp in a fresh process (the smoke test).
"""

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from distilflow.configs.schema import TaskConfig
from distilflow.tasks import checks, data
from distilflow.tasks.errors import DistilflowError

GGUF_TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# llama.cpp does not store how text is split before BPE; it names the splitting. These are the
# Hugging Face pre_tokenizer settings that split text the way the named llama.cpp pre-tokenizer does.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
PRE_TOKENIZERS = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


def export(model_dir: Path, out_file: Path, gguf_type: str, *, name: str, license: str | None = None) -> Path:
    """Write the model in ``model_dir`` to ``out_file`` as GGUF (``f16`` or ``q8_0``)."""
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
    _add_tensors(writer, model, tensor_type)
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


def _add_tensors(writer: gguf.GGUFWriter, model, tensor_type: gguf.GGMLQuantizationType) -> None:
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
        weight = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            weight = interleave_rope_rows(weight, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = interleave_rope_rows(weight, config.num_key_value_heads)
        stored = _storage_type(weight, tensor_type)
        writer.add_tensor(name, gguf.quants.quantize(weight, stored), raw_dtype=stored)


def interleave_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a q/k projection's rows for llama.cpp's rotary embedding.

    Hugging Face Llama rotates dimension i of each head with dimension i + d/2; llama.cpp rotates
    dimensions 2i and 2i + 1. Row i + d/2 moves next to row i.
    """
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).swapaxes(1, 2).reshape(rows, columns)


def _storage_type(weight: np.ndarray, wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Norms stay f32 (as llama.cpp's converter keeps them); a row Q8_0's blocks do not divide stays f16."""
    if weight.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if weight.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def smoke_in_fresh_process(gguf_file: Path, rows: list[dict], task: TaskConfig, max_new_tokens: int,
                           timeout_s: int = 1800) -> dict:
    """Answer ``rows`` with llama.cpp (llama-cpp-python) in a new process, as a llama.cpp user would:
    chat completion with the GGUF's own chat template, greedy. Returns pass rate, latency, answers."""
    with tempfile.TemporaryDirectory() as scratch:
        request, answer = Path(scratch) / "request.json", Path(scratch) / "answer.json"
        request.write_text(json.dumps({"gguf_file": str(gguf_file), "rows": rows, "task": task.model_dump(mode="json"),
                                       "max_new_tokens": max_new_tokens}))
        done = subprocess.run([sys.executable, "-m", "distilflow.tasks.gguf_export", str(request), str(answer)],
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise DistilflowError(f"{gguf_file}: llama.cpp failed to load or answer:\n{done.stderr[-3000:]}")
        return json.loads(answer.read_text())


def _smoke_main(request_path: str, answer_path: str) -> None:
    from llama_cpp import Llama

    request = json.loads(Path(request_path).read_text())
    task, rows = TaskConfig.model_validate(request["task"]), request["rows"]
    llm = Llama(model_path=request["gguf_file"], n_ctx=0, seed=0, verbose=False)
    start = time.perf_counter()
    answers = [llm.create_chat_completion(messages=data.messages(row, task), temperature=0.0,
                                          max_tokens=request["max_new_tokens"])["choices"][0]["message"]["content"]
               for row in rows]
    latency = (time.perf_counter() - start) / len(rows)
    llm.close()  # before interpreter shutdown, which otherwise frees the model after its library is gone
    answers = [(a or "").strip() for a in answers]
    Path(answer_path).write_text(json.dumps({
        "gguf_smoke_pass_rate": sum(checks.is_valid(a, task) for a in answers) / len(rows),
        "gguf_smoke_latency_s": latency,
        "answers": [{"input": task.template.format(**row), "answer": a, "label": checks.label(row, task)}
                    for row, a in zip(rows, answers)]}))


if __name__ == "__main__":
    _smoke_main(*sys.argv[1:3])
