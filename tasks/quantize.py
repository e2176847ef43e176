"""Quantization: w4a16 (GPTQ, AWQ, RTN), fp8 and qlr through llm-compressor, saved as compressed-tensors (what
vLLM and transformers load); nf4 through bitsandbytes, the QLoRA baseline.

A scheme is a recipe, a list of llm-compressor modifiers built from the config (``recipe``); the code that
runs it is the same for all of them.
"""

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from datasets import Dataset
from torch import nn

from distilflow.configs.schema import QuantizeConfig
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
        num_bits=4, type="int", symmetric=cfg.symmetric, strategy="group", group_size=group_size))}
    return {
        "gptq": [GPTQModifier(config_groups=int4, ignore=list(cfg.ignore))],
        # AWQ only rescales channels; the quantization modifier after it rounds the rescaled weights.
        "awq": [AWQModifier(n_grid=cfg.awq_grid), QuantizationModifier(config_groups=int4, ignore=list(cfg.ignore))],
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

    qlr first moves each weight's top ``cfg.rank`` singular components into a LoRA adapter (PEFT's PiSSA
    initialisation) and quantizes the residual, so W = Q + L·R. Returns what was done.
    """
    from llmcompressor import oneshot

    if cfg.scheme == "qlr":
        model = split_low_rank(model, cfg, out_dir)
    group_size = group_size_for(model, cfg)
    calibration = None
    if needs_calibration(cfg):
        tokenized = tokenizer(calibration_texts, truncation=True, max_length=cfg.calibration_max_length,
                              add_special_tokens=False)
        calibration = Dataset.from_dict(dict(tokenized))
    log.info("quantizing: %s, group size %d, %d calibration samples", cfg.label, group_size,
             len(calibration) if calibration else 0)
    with _no_pinned_memory_without_accelerator():
        oneshot(model=model, recipe=recipe(cfg, group_size), dataset=calibration,
                num_calibration_samples=len(calibration) if calibration else 0,
                max_seq_length=cfg.calibration_max_length)
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
    optimisation, is skipped."""
    if torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    with mock.patch.object(IntermediatesCache, "pin_memory", lambda *args, **kwargs: None):
        yield


def split_low_rank(model, cfg: QuantizeConfig, adapter_dir: Path):
    """W = residual + L·R: the top ``cfg.rank`` singular components of every quantized linear layer go into a
    LoRA adapter saved to ``adapter_dir``; returns the model holding the residuals, to be quantized (QPiSSA).

    The factors hold what the 4-bit backbone would round worst, so keeping them in 16 bits lowers its error.
    """
    import peft

    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules="all-linear",
                             exclude_modules=list(cfg.ignore), init_lora_weights="pissa", task_type="CAUSAL_LM")
    with_adapter = peft.get_peft_model(model, config)
    for name, param in with_adapter.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    # Saved as a plain LoRA adapter: loading it must not decompose the (residual) weights again.
    with_adapter.peft_config["default"].init_lora_weights = True
    with_adapter.peft_config["default"].base_model_name_or_path = None
    with_adapter.save_pretrained(adapter_dir)
    return with_adapter.unload()


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
