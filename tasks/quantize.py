"""Quantization: w4a16 (GPTQ, AWQ, RTN), fp8 and qlr through llm-compressor, saved as compressed-tensors (what
vLLM and transformers load); nf4 through bitsandbytes, the QLoRA baseline.

A scheme is a recipe, a list of llm-compressor modifiers built from the config (``recipe``); the code that
runs it is the same for all of them.
"""

import copy
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from datasets import Dataset
from torch import nn

from distilflow.configs.schema import QuantizeConfig
from distilflow.tasks import data
from distilflow.tasks.errors import DistilflowError

log = logging.getLogger("distilflow")

CALIBRATED = {"gptq", "awq"}


def group_size_for(model, cfg: QuantizeConfig) -> int:
    """128 if it divides every quantized layer's input width, else the largest power of two that does.

    llm-compressor rejects a group size that does not divide a layer (SmolLM2's width 576 needs 64).
    """
    widths = {m.in_features for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and not _ignored(name, cfg.ignore)}
    if cfg.group_size is not None:
        bad = sorted(w for w in widths if w % cfg.group_size)
        if bad:
            raise DistilflowError(f"compress.quantize.group_size {cfg.group_size} does not divide the input "
                                  f"width of every quantized layer ({bad}); leave it unset to pick one")
        return cfg.group_size
    size = 128
    while size > 1 and any(w % size for w in widths):
        size //= 2
    return size


def _ignored(name: str, ignore: list[str]) -> bool:
    return any(name == pattern or name.endswith("." + pattern) for pattern in ignore)


def recipe(cfg: QuantizeConfig, group_size: int) -> list:
    """The llm-compressor modifiers that apply ``cfg`` (w4a16, fp8, or qlr's 4-bit backbone)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if cfg.scheme == "fp8":
        return [QuantizationModifier(scheme="FP8" if cfg.static_activations else "FP8_DYNAMIC",
                                     targets=["Linear"], ignore=list(cfg.ignore))]
    int4 = {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=cfg.symmetric, strategy="group", group_size=group_size,
        observer=cfg.observer))}
    return {
        "gptq": [GPTQModifier(config_groups=int4, ignore=list(cfg.ignore))],
        # AWQ only rescales channels; the quantization modifier after it rounds the rescaled weights.
        "awq": [AWQModifier(n_grid=cfg.awq_grid, duo_scaling=cfg.awq_duo_scaling),
                QuantizationModifier(config_groups=int4, ignore=list(cfg.ignore))],
        "rtn": [QuantizationModifier(config_groups=int4, ignore=list(cfg.ignore))],
    }[cfg.method]


def fp8_native(device: torch.device) -> bool:
    """Whether ``device`` computes in FP8 (CUDA compute capability 8.9 and up: Ada, Hopper, Blackwell).

    Elsewhere an FP8 checkpoint is still produced and loads, but runs dequantized: its quality is measured,
    its speed is not FP8's.
    """
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def needs_calibration(cfg: QuantizeConfig) -> bool:
    if cfg.scheme == "fp8":
        return cfg.static_activations
    return cfg.scheme in ("w4a16", "qlr") and cfg.method in CALIBRATED


def quantize(model, tokenizer, cfg: QuantizeConfig, calibration_texts: list[str], out_dir: Path) -> dict:
    """Quantize ``model`` in place with llm-compressor and save it compressed (bf16 for the rest) to ``out_dir``.

    qlr quantizes like w4a16, then fits rank ``cfg.rank`` factors to what the rounding lost, W − Q, and saves
    them as a LoRA adapter beside the backbone, so W ≈ Q + L·R (``save_error_factors``). Returns what was done.
    """
    from llmcompressor import oneshot

    unquantized = copy.deepcopy(model) if cfg.scheme == "qlr" else None
    group_size = group_size_for(model, cfg)
    calibration = None
    if needs_calibration(cfg):
        tokenized = data.tokenized(tokenizer, calibration_texts, truncation=True,
                                   max_length=cfg.calibration_max_length)
        calibration = Dataset.from_dict(dict(tokenized))
    log.info("quantizing: %s, group size %d, %d calibration samples", cfg.label, group_size,
             len(calibration) if calibration else 0)
    with _no_pinned_memory_without_accelerator():
        # The texts are a seeded sample already; llm-compressor's own shuffle draws from torch's global generator,
        # whose state depends on what ran before in the process, and quantized one model differently run to run.
        oneshot(model=model, recipe=recipe(cfg, group_size), dataset=calibration,
                num_calibration_samples=len(calibration) if calibration else 0,
                max_seq_length=cfg.calibration_max_length, shuffle_calibration_samples=False)
    if cfg.scheme == "qlr":
        save_error_factors(unquantized, model, cfg, out_dir)
    # Calibrate in the compute dtype (fp32 is 3x faster than bf16 on CPU); ship bf16 like any checkpoint.
    model.to(torch.bfloat16).save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    if cfg.scheme == "qlr":
        _load_adapter_with_checkpoint(out_dir)
    return {"group_size": group_size if cfg.scheme != "fp8" else None,
            "calibration_samples": len(calibration) if calibration else 0}


@contextmanager
def _no_pinned_memory_without_accelerator():
    """llm-compressor 0.14's AWQ pins its cached activations for fast host-to-GPU copies; torch refuses to pin
    without an accelerator ("Cannot access accelerator device"), so on CPU the pinning, only an
    optimisation, is skipped.

    Upstream: vllm-project/llm-compressor PR #2813 moved the pinning to just before AWQ's grid search
    (``IntermediatesCache.pin_memory``); llmcompressor 0.14.0.1, the newest release and the one pinned here, still
    pins whether or not there is an accelerator. Remove this patch with the first release whose
    ``IntermediatesCache._pin_intermediate`` skips pinning without one: tests/test_quantize.py's
    ``test_llm_compressor_still_pins_awq_activations_without_an_accelerator`` fails on that release.
    """
    if torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    with mock.patch.object(IntermediatesCache, "pin_memory", lambda *args, **kwargs: None):
        yield


def save_error_factors(unquantized, quantized, cfg: QuantizeConfig, adapter_dir: Path) -> None:
    """Save to ``adapter_dir`` a LoRA adapter whose factors L·R are the top ``cfg.rank`` singular components of
    each quantized layer's rounding error W − Q (CALDERA's residual fit: the backbone is calibrated on the
    real model, the factors take back what it rounds worst).

    ``unquantized`` (a copy of the model before quantization) is overwritten with the errors; PEFT's PiSSA
    initialisation on it does the decomposition. Q is llm-compressor's fake quantization with the scales the
    checkpoint stores.
    """
    import peft
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    rounded = {name: layer for name, layer in quantized.named_modules()
               if getattr(getattr(layer, "quantization_scheme", None), "weights", None) is not None}
    with torch.no_grad():
        for name, layer in unquantized.named_modules():
            if name in rounded:
                q = rounded[name]
                # GPTQ writes its rounded weights back into the model, so W is the copy's; the other methods
                # round only when saving, and their in-memory weight (AWQ's rescaled one) is the W they round.
                weight = layer.weight if cfg.method == "gptq" else q.weight
                layer.weight.copy_(weight - forward_quantize(q, q.weight, "weight", q.quantization_scheme.weights))
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=sorted(rounded),
                             init_lora_weights="pissa", task_type="CAUSAL_LM")
    factors = peft.get_peft_model(unquantized, config)
    for name, param in factors.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    # Saved as a plain LoRA adapter: loading it must not decompose the backbone's weights again.
    factors.peft_config["default"].init_lora_weights = True
    factors.peft_config["default"].base_model_name_or_path = None
    factors.save_pretrained(adapter_dir)


def _load_adapter_with_checkpoint(model_dir: Path) -> None:
    """Make plain ``from_pretrained(model_dir)`` load the backbone dequantized, which PEFT needs to attach the
    adapter saved beside it (a packed 4-bit layer has no ``weight`` until its first forward pass)."""
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["dequantize"] = True
    config_path.write_text(json.dumps(config, indent=2))


def nf4(model_dir: Path, device: torch.device, out_dir: Path):
    """The model in ``model_dir`` quantized to NF4 by bitsandbytes as it loads (the QLoRA recipe), and saved.

    Returns the in-memory model: on CPU, bitsandbytes 0.50's saved NF4 checkpoint does not always reload
    right, so callers evaluate this one and prove the saved one separately.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                llm_int8_skip_modules=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map=str(device),
                                                 dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model.eval(), tokenizer
