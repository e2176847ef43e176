"""GGUF export on the tiny teacher, read back with gguf's own reader (llama.cpp itself: test_llama_cpp.py)."""

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize, quantize

from distilflow.configs.schema import QuantizeConfig
from distilflow.tasks import gguf_export
from distilflow.tasks import quantize as quantization
from distilflow.tasks.errors import DistilflowError
from tests.conftest import TINY_TEACHER


def read(path) -> tuple[dict, dict]:
    """(metadata values, tensors by name) of a GGUF file."""
    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def weights(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in the checkpoint's (rows, columns) shape."""
    return dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    return read(gguf_export.export(TINY_TEACHER, tmp_path_factory.mktemp("gguf") / "m.gguf", "f16", name="tiny",
                                   license="apache-2.0"))


@pytest.fixture(scope="module")
def q8_0(tmp_path_factory):
    return read(gguf_export.export(TINY_TEACHER, tmp_path_factory.mktemp("gguf") / "m.gguf", "q8_0", name="tiny"))


def test_metadata_describes_the_llama_architecture(f16, tiny_teacher):
    fields, _ = f16
    config = tiny_teacher[0].config
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "tiny"
    assert fields["general.license"] == "apache-2.0"
    assert fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.attention.head_count"] == config.num_attention_heads
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert fields["llama.rope.dimension_count"] == config.head_dim
    assert fields["llama.context_length"] == config.max_position_embeddings


def test_vocabulary_keeps_every_token_the_merges_and_the_chat_template(f16, tiny_teacher):
    fields, _ = f16
    tokenizer = tiny_teacher[1]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads((TINY_TEACHER / "tokenizer.json").read_text())
                                                       ["model"]["merges"])
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id


def test_special_tokens_are_control_tokens_so_prompts_parse_them(f16, tiny_teacher):
    fields, _ = f16
    tokenizer = tiny_teacher[1]
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == TokenType.CONTROL
    assert types[tokenizer("Ticket", add_special_tokens=False).input_ids[0]] == TokenType.NORMAL


def test_bos_is_not_added_when_the_tokenizer_adds_none(f16, tiny_teacher):
    fields, _ = f16
    assert tiny_teacher[1]("a").input_ids[0] != tiny_teacher[1].bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False


def test_tied_output_matrix_is_left_to_the_token_embedding(f16, tiny_teacher):
    _, tensors = f16
    layers = tiny_teacher[0].config.num_hidden_layers
    assert "output.weight" not in tensors
    assert len(tensors) == 2 + 9 * layers  # token_embd, output_norm; 7 matrices and 2 norms per block


def test_f16_weights_equal_the_checkpoint_with_q_and_k_in_llama_cpp_rope_order(f16, tiny_teacher):
    _, tensors = f16
    model = tiny_teacher[0]
    attention = model.model.layers[0].self_attn
    expected = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "blk.0.attn_q.weight": torch.tensor(gguf_export.interleave_rope_rows(
            attention.q_proj.weight.detach().numpy(), model.config.num_attention_heads)),
        "blk.0.attn_k.weight": torch.tensor(gguf_export.interleave_rope_rows(
            attention.k_proj.weight.detach().numpy(), model.config.num_key_value_heads)),
        "blk.0.attn_v.weight": attention.v_proj.weight,
        "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj.weight,
    }
    for name, weight in expected.items():
        np.testing.assert_allclose(weights(tensors[name]), weight.detach().numpy(), atol=1e-3, err_msg=name)


def test_interleave_rope_rows_puts_dimension_i_beside_i_plus_half_within_each_head():
    rows = np.arange(8, dtype=np.float32)[:, None]  # 2 heads of dimension 4: rows 0..3, 4..7
    assert gguf_export.interleave_rope_rows(rows, heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_q8_0_quantizes_matrices_and_keeps_norms_in_f32(q8_0, tiny_teacher):
    _, tensors = q8_0
    assert tensors["blk.0.ffn_up.weight"].tensor_type == GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    expected = tiny_teacher[0].model.layers[0].mlp.up_proj.weight.detach().numpy()
    error = np.abs(weights(tensors["blk.0.ffn_up.weight"]) - expected).max()
    assert 0 < error < np.abs(expected).max() / 100  # 8-bit blocks: close, not exact


@pytest.mark.parametrize("kind, tensor_type, bits", [("q4_0", GGMLQuantizationType.Q4_0, 4.5),
                                                      ("q4_1", GGMLQuantizationType.Q4_1, 5.0)])
def test_4_bit_types_quantize_every_matrix_but_a_tied_embedding_which_keeps_8_bits(tmp_path, tiny_teacher, kind,
                                                                                   tensor_type, bits):
    _, tensors = read(gguf_export.export(TINY_TEACHER, tmp_path / "m.gguf", kind, name="tiny"))
    model = tiny_teacher[0]
    assert model.config.tie_word_embeddings
    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_up.weight"].tensor_type == tensor_type
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    up = tensors["blk.0.ffn_up.weight"]
    assert up.n_bytes * 8 / up.n_elements == bits
    expected = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    error = np.abs(weights(tensors["blk.0.ffn_up.weight"]) - expected).max()
    assert 0 < error < np.abs(expected).max() / 4  # 16 levels per block of 32


def quantized(tiny_teacher, out, **settings):
    """The tiny teacher quantized (round to nearest; W4A16 unless ``settings`` say otherwise) and saved to ``out``."""
    model, tokenizer = tiny_teacher
    student = type(model)(model.config)
    student.load_state_dict(model.state_dict())
    quantization.quantize(student.to(torch.bfloat16), tokenizer, QuantizeConfig(method="rtn", **settings), [], out)
    return out


def test_compressed_tensors_checkpoint_is_exported_dequantized(tmp_path, tiny_teacher):
    quantized(tiny_teacher, tmp_path / "w4a16")
    reloaded, _ = gguf_export.load_dequantized(tmp_path / "w4a16")
    _, tensors = read(gguf_export.export(tmp_path / "w4a16", tmp_path / "m.gguf", "f16", name="w4a16"))
    np.testing.assert_allclose(weights(tensors["blk.0.ffn_gate.weight"]),
                               reloaded.model.layers[0].mlp.gate_proj.weight.detach().numpy(), atol=1e-3)


def test_q4_0_of_a_w4a16_checkpoint_stores_its_weights_exactly(tmp_path, tiny_teacher):
    quantized(tiny_teacher, tmp_path / "w4a16")
    assert gguf_export.on_q4_0_grid(tmp_path / "w4a16")
    reloaded, _ = gguf_export.load_dequantized(tmp_path / "w4a16")
    _, tensors = read(gguf_export.export(tmp_path / "w4a16", tmp_path / "m.gguf", "q4_0", name="w4a16"))
    layer = reloaded.model.layers[0]
    down = layer.mlp.down_proj.weight.detach().numpy()
    k = gguf_export.interleave_rope_rows(layer.self_attn.k_proj.weight.detach().numpy(),
                                         reloaded.config.num_key_value_heads)
    for gguf_name, expected in [("blk.0.ffn_down.weight", down), ("blk.0.attn_k.weight", k)]:
        assert tensors[gguf_name].tensor_type == GGMLQuantizationType.Q4_0
        np.testing.assert_array_equal(weights(tensors[gguf_name]), expected)
    # what gguf's own quantizer makes of the same weights: each block's scale from its largest value, rounded again
    requantized = dequantize(quantize(down, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)
    assert not np.array_equal(requantized.reshape(down.shape), down)


@pytest.mark.parametrize("settings", [{"scheme": "fp8"}, {"group_size": 16}], ids=["fp8", "group-16"])
def test_checkpoints_off_q4_0s_grid_are_quantized_by_gguf(tmp_path, tiny_teacher, settings):
    checkpoint = quantized(tiny_teacher, tmp_path / "ckpt", **settings)
    assert not gguf_export.on_q4_0_grid(checkpoint)
    reloaded, _ = gguf_export.load_dequantized(checkpoint)
    _, tensors = read(gguf_export.export(checkpoint, tmp_path / "m.gguf", "q4_0", name="ckpt"))
    expected = reloaded.model.layers[0].mlp.down_proj.weight.detach().numpy()
    error = np.abs(weights(tensors["blk.0.ffn_down.weight"]) - expected).max()
    assert 0 < error < np.abs(expected).max() / 4


def test_tokenizer_llama_cpp_cannot_reproduce_is_a_clear_error(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(TINY_TEACHER, model_dir)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(DistilflowError, match="deploy.gguf: the model's tokenizer .* set deploy.gguf: none"):
        gguf_export.export(model_dir, tmp_path / "m.gguf", "f16", name="x")
    assert not (tmp_path / "m.gguf").exists()


def test_architecture_other_than_llama_is_a_clear_error(tmp_path, tiny_teacher):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    tiny_teacher[1].save_pretrained(tmp_path / "qwen")
    with pytest.raises(DistilflowError, match="model_type 'qwen2'"):
        gguf_export.export(tmp_path / "qwen", tmp_path / "m.gguf", "f16", name="x")
