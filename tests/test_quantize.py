"""Quantization schemes on the tiny model: checkpoints vLLM and transformers load, and what each stores."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from distilflow.configs.schema import QuantizeConfig
from distilflow.tasks import quantize
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.models import load_model, parameter_count
from tests.conftest import TINY_TEACHER

TEXTS = ["Ticket: my parcel is late<|im_end|>", "Ticket: refund me please<|im_end|>"] * 2
PROMPT = "Ticket: the app crashes when I pay"


def widths(*in_features):
    return nn.ModuleDict({f"l{i}": nn.Linear(w, 8) for i, w in enumerate(in_features)} | {"lm_head": nn.Linear(7, 8)})


def test_group_size_is_128_when_it_divides_every_layer():
    assert quantize.group_size_for(widths(256, 512), QuantizeConfig()) == 128


def test_group_size_falls_back_to_the_largest_dividing_power_of_two():
    assert quantize.group_size_for(widths(576, 1536), QuantizeConfig()) == 64  # SmolLM2's widths


def test_ignored_layers_do_not_constrain_the_group_size():
    assert quantize.group_size_for(widths(256), QuantizeConfig(ignore=["lm_head"])) == 128


def test_a_group_size_that_does_not_divide_a_layer_is_an_error():
    with pytest.raises(DistilflowError, match="group_size 128 does not divide.*576"):
        quantize.group_size_for(widths(576), QuantizeConfig(group_size=128))


@pytest.mark.skipif(torch.accelerator.is_available(), reason="pinning works where there is an accelerator")
def test_llm_compressor_still_pins_awq_activations_without_an_accelerator():
    """Why quantize._no_pinned_memory_without_accelerator exists: when this fails, llm-compressor stopped pinning
    on a CPU-only machine, and the patch can go."""
    from llmcompressor.pipelines.cache import IntermediatesCache, IntermediateValue

    with pytest.raises(RuntimeError, match="accelerator"):
        IntermediatesCache._pin_intermediate(IntermediateValue(value=torch.ones(2), device=torch.device("cpu")))


@pytest.mark.parametrize(("cfg", "modifiers"), [
    (QuantizeConfig(method="gptq"), ["GPTQModifier"]),
    (QuantizeConfig(method="awq"), ["AWQModifier", "QuantizationModifier"]),
    (QuantizeConfig(method="rtn"), ["QuantizationModifier"]),
    (QuantizeConfig(scheme="fp8"), ["QuantizationModifier"]),
])
def test_each_scheme_is_a_list_of_llm_compressor_modifiers(cfg, modifiers):
    assert [type(m).__name__ for m in quantize.recipe(cfg, group_size=64)] == modifiers


def test_awq_recipe_carries_the_scaling_search_and_range_settings():
    awq, rounding = quantize.recipe(QuantizeConfig(method="awq", awq_grid=8, awq_duo_scaling="both", observer="mse",
                                                   symmetric=False), group_size=64)
    assert (awq.n_grid, awq.duo_scaling) == (8, "both")
    weights = rounding.config_groups["group_0"].weights
    assert (weights.observer, weights.symmetric) == ("mse", False)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The tiny teacher quantized with some settings (once per module): (config.json's quantization_config, dir)."""
    done = {}

    def make(**settings):
        key = json.dumps(settings, sort_keys=True)
        if key not in done:
            out = tmp_path_factory.mktemp("quantized")
            tokenizer = AutoTokenizer.from_pretrained(TINY_TEACHER)
            model = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32)
            cfg = QuantizeConfig(calibration_samples=4, awq_grid=3, **settings)
            quantize.quantize(model, tokenizer, cfg, TEXTS, out)
            done[key] = json.loads((out / "config.json").read_text())["quantization_config"], out
        return done[key]
    return make


def checkpoint_tensors(model_dir) -> set[str]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return set(f.keys())


def reloaded_logits(model_dir):
    model, tokenizer = load_model(model_dir, torch.device("cpu"))
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


def relative_error(logits, reference) -> float:
    return ((logits - reference).norm() / reference.norm()).item()


def original_logits():
    model, tokenizer = load_model(TINY_TEACHER, torch.device("cpu"))
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_w4a16_checkpoint_carries_the_compressed_tensors_config_vllm_reads(method, quantized):
    config, _ = quantized(method=method)
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["group_size"], weights["strategy"]) == (4, "int", 64, "group")
    assert config["ignore"] == ["lm_head"]


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_w4a16_checkpoint_reloads_in_transformers_close_to_the_original(method, quantized):
    _, model_dir = quantized(method=method)
    reference = original_logits()
    assert relative_error(reloaded_logits(model_dir), reference) < 0.3


def test_asymmetric_w4a16_stores_zero_points(quantized):
    config, model_dir = quantized(method="rtn", symmetric=False)
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is False
    assert any(name.endswith("weight_zero_point") for name in checkpoint_tensors(model_dir))
    assert torch.isfinite(reloaded_logits(model_dir)).all()


def test_fp8_has_fp8_weights_and_dynamic_activation_scales(quantized):
    config, model_dir = quantized(scheme="fp8")
    assert config["format"] == "float-quantized"
    group = config["config_groups"]["group_0"]
    assert (group["weights"]["type"], group["weights"]["num_bits"]) == ("float", 8)
    assert group["input_activations"]["dynamic"] is True
    assert not any(name.endswith("input_scale") for name in checkpoint_tensors(model_dir))
    assert torch.isfinite(reloaded_logits(model_dir)).all()


def test_fp8_static_activations_are_calibrated_into_the_checkpoint(quantized):
    config, model_dir = quantized(scheme="fp8", static_activations=True)
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] is False
    assert any(name.endswith("input_scale") for name in checkpoint_tensors(model_dir))
    assert torch.isfinite(reloaded_logits(model_dir)).all()


def test_qlr_saves_the_low_rank_factors_as_an_adapter_beside_the_w4a16_backbone(quantized):
    config, model_dir = quantized(scheme="qlr", method="rtn", rank=4)
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["init_lora_weights"]) == (4, True)
    assert config["format"] == "pack-quantized"
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # plain from_pretrained attaches the adapter
    assert model.active_adapters() == ["default"]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_qlr_is_closer_to_the_original_than_its_w4a16_backbone_alone(quantized, method):
    _, qlr_dir = quantized(scheme="qlr", method=method, rank=8)
    _, w4a16_dir = quantized(method=method)
    reference = original_logits()
    assert relative_error(reloaded_logits(qlr_dir), reference) < relative_error(reloaded_logits(w4a16_dir), reference)


def test_quantized_checkpoints_count_the_parameters_of_the_original(quantized):
    _, model_dir = quantized(scheme="qlr", method="rtn", rank=4)
    model, _ = load_model(model_dir, torch.device("cpu"))
    assert parameter_count(model) == parameter_count(AutoModelForCausalLM.from_pretrained(TINY_TEACHER))


def test_nf4_quantizes_on_load_and_saves_a_bitsandbytes_checkpoint(tmp_path):
    import bitsandbytes as bnb

    model, _ = quantize.nf4(TINY_TEACHER, torch.device("cpu"), tmp_path)
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert parameter_count(model) == parameter_count(AutoModelForCausalLM.from_pretrained(TINY_TEACHER))
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bnb_4bit_quant_type"]) == ("bitsandbytes", "nf4")


def test_gptq_quantizes_the_same_model_and_calibration_texts_to_the_same_bytes_whatever_ran_before(tmp_path):
    """llm-compressor shuffled the calibration samples with torch's global generator, whose state depends on what
    ran before in the process: the demo's student, quantized twice with the same settings, scored 0.880 and 0.8975."""
    texts = [f"Ticket: order {n} {word}<|im_end|>" for n, word in enumerate(["late", "refund", "crash", "login",
                                                                              "parcel", "card", "password", "bug"])]
    saved = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32)
        out = tmp_path / f"seed-{seed}"
        quantize.quantize(model, AutoTokenizer.from_pretrained(TINY_TEACHER),
                          QuantizeConfig(calibration_samples=len(texts)), texts, out)
        saved.append((out / "model.safetensors").read_bytes())
    assert saved[0] == saved[1]
