"""Weight quantization through llm-compressor, saved as compressed-tensors (what vLLM and transformers load)."""

import logging
from pathlib import Path

from datasets import Dataset
from torch import nn

from distilflow.configs.schema import QuantizeConfig
from distilflow.tasks.errors import DistilflowError

log = logging.getLogger("distilflow")


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


def w4a16_recipe(cfg: QuantizeConfig, group_size: int):
    """4-bit symmetric integer weights in groups, 16-bit activations; GPTQ or round-to-nearest."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size))
    modifier = GPTQModifier if cfg.method == "gptq" else QuantizationModifier
    return modifier(config_groups={"group_0": scheme}, ignore=list(cfg.ignore))


def quantize(model, tokenizer, cfg: QuantizeConfig, calibration_texts: list[str], out_dir: Path) -> dict:
    """Quantize ``model`` in place and save it compressed to ``out_dir``; returns what was done."""
    from llmcompressor import oneshot

    group_size = group_size_for(model, cfg)
    log.info("quantizing: %s %s, group size %d, %d calibration samples",
             cfg.scheme, cfg.method, group_size, len(calibration_texts))
    recipe = w4a16_recipe(cfg, group_size)
    calibration = None
    if cfg.method == "gptq":
        tokenized = tokenizer(calibration_texts, truncation=True, max_length=cfg.calibration_max_length,
                              add_special_tokens=False)
        calibration = Dataset.from_dict(dict(tokenized))
    oneshot(model=model, recipe=recipe, dataset=calibration, num_calibration_samples=len(calibration_texts),
            max_seq_length=cfg.calibration_max_length)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    return {"group_size": group_size, "calibration_samples": len(calibration_texts) if calibration else 0}
