"""W4A16 through llm-compressor: a group size that fits, and a compressed-tensors checkpoint that reloads."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from distilflow.configs.schema import QuantizeConfig
from distilflow.tasks import quantize
from distilflow.tasks.errors import DistilflowError
from tests.conftest import TINY_TEACHER


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


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_w4a16_checkpoint_is_compressed_tensors_and_reloads(method, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(TINY_TEACHER)
    model = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.bfloat16)
    texts = ["Ticket: my parcel is late<|im_end|>", "Ticket: refund me please<|im_end|>"] * 2
    done = quantize.quantize(model, tokenizer, QuantizeConfig(method=method, calibration_samples=4), texts, tmp_path)
    assert done["group_size"] == 64

    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 64, "group")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    logits = reloaded(**tokenizer("my parcel", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
