"""Config sections that are a library's own config class: TRL's and transformers' trainer arguments, PEFT's LoRA.

Such a section accepts every field of its class under the class's own name (``warmup_steps``,
``lr_scheduler_type``, ``weight_decay``, ``use_rslora``, ...) and hands it to the class unchanged.
It declares only distilflow's own knobs and the fields whose default distilflow chooses; the fields
distilflow must set itself (where checkpoints go, the precision of the device, the seed) are refused
with the reason. Unknown keys are refused with the closest field name of the class.

The classes are imported here, and only here, when first needed: importing TRL (with transformers and
torch) takes seconds, and most configs set none of their fields, so validating them imports none of it.
"""

import dataclasses
import difflib
import functools
import importlib
import warnings
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, model_validator
from pydantic_core import PydanticCustomError


class DeprecatedKey(FutureWarning):
    """A config key under a name that still works in this release and is refused in the next."""


@functools.cache
def library_class(dotted: str) -> type:
    """The config class named ``dotted`` (e.g. ``trl.SFTConfig``), imported on first use."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@functools.cache
def library_fields(dotted: str) -> dict[str, dataclasses.Field]:
    """The fields a user may set on the class named ``dotted``, by name."""
    return {field.name: field for field in dataclasses.fields(library_class(dotted)) if field.init}


# Trainer arguments distilflow sets itself, and why a config may not.
OWNED_BY_DISTILFLOW = {
    "output_dir": "distilflow checkpoints each phase in its own directory under run.workdir, where a re-run "
                  "resumes",
    "resume_from_checkpoint": "distilflow resumes a phase from its last complete checkpoint by itself",
    "report_to": "distilflow logs the training curves to MLflow itself (run.mlflow_tracking_uri)",
    "use_cpu": "the device is run.device",
    "bf16": "distilflow sets the precision by device: bf16 on a GPU, fp32 on a CPU (run.device)",
    "fp16": "distilflow sets the precision by device: bf16 on a GPU, fp32 on a CPU (run.device)",
    "seed": "the seed is run.seed",
    "include_num_input_tokens_seen": "distilflow counts the input tokens for its tokens/s curves",
    "fsdp": "set distill.processes and distill.fsdp: distilflow launches the workers",
    "fsdp_config": "set distill.processes and distill.fsdp: distilflow launches the workers",
}


class LibrarySettings(BaseModel):
    """A section whose keys are the fields of ``library`` (a dotted class name), plus distilflow's own.

    ``own`` names the declared fields distilflow reads itself (never passed to the class by name),
    ``refused`` the class's fields distilflow sets itself (with the reason), ``renamed`` the keys
    distilflow called otherwise before (old name -> (the class's name, why)).
    """

    model_config = ConfigDict(extra="allow", frozen=True,
                              json_schema_extra=lambda schema, cls: cls.library_json_schema(schema))

    library: ClassVar[str]
    own: ClassVar[frozenset[str]] = frozenset()
    refused: ClassVar[dict[str, str]] = {}
    renamed: ClassVar[dict[str, tuple[str, str]]] = {}
    # What distilflow passes itself, as on a CPU run: the class is built with the settings to check them.
    checked_with: ClassVar[dict[str, Any]] = {}

    def settings_class(self) -> str:
        """The class these settings go to (a section may pick it by one of its own knobs)."""
        return self.library

    def library_settings(self) -> dict[str, Any]:
        """The settings for the class, under its names: declared (with distilflow's defaults) and given."""
        return {key: value for key, value in self.model_dump().items() if key not in self.own}

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, (new, why) in cls.renamed.items():
            if old not in data:
                continue
            if new in data:
                raise ValueError(f"{old} and {new} are the same setting ({new} is its name now); remove {old}")
            warnings.warn(f"{old} is deprecated: it is {new} now ({why}); the old name is refused from the next "
                          "release", DeprecatedKey, stacklevel=2)
            data[new] = data.pop(old)
        return data

    @model_validator(mode="after")
    def _library_accepts_the_settings(self):
        if self.model_extra:  # only then is the library imported: see the module's docstring
            problems = self._problems()
            if problems:
                raise PydanticCustomError("library_settings", "{summary}", {
                    "summary": "; ".join(f"{key}: {text}" if key else text for key, text in problems),
                    "problems": problems})
        return self

    def _problems(self) -> list[tuple[str, str]]:
        """What the class (or distilflow) refuses in the given settings, as (key, why); "" for the whole section."""
        name = self.settings_class()
        fields = library_fields(name)
        problems = []
        for key in self.model_extra:
            if key in self.refused:
                problems.append((key, f"set by distilflow, not the config: {self.refused[key]}"))
            elif key not in fields:
                problems.append((key, f"unknown key; {self._suggestion(key, fields)}"))
        if problems:
            return problems
        try:
            library_class(name)(**self.library_settings(), **self.checked_with)
        except (ValueError, TypeError) as err:
            return [("", f"{name} refuses these settings: {err}")]
        return []

    def _suggestion(self, key: str, fields: dict) -> str:
        candidates = [name for name in [*type(self).model_fields, *fields] if name not in self.refused]
        close = difflib.get_close_matches(key, candidates, n=1)
        if close:
            return f"did you mean '{close[0]}'?"
        return f"allowed: {', '.join(type(self).model_fields)} or any field of {self.settings_class()}"

    @classmethod
    def library_json_schema(cls, schema: dict) -> None:
        """The section's JSON schema lists every field of the class, with its help, so editors complete them."""
        for name, field in library_fields(cls.library).items():
            if name in schema["properties"] or name in cls.refused:
                continue
            schema["properties"][name] = {**_json_type(field.type), **_json_default(field),
                                          "description": f"{cls.library}: {field.metadata.get('help', '')}"}
        schema["additionalProperties"] = False


def _json_type(annotation) -> dict:
    """The JSON schema of a type annotation, with its definitions written in place."""
    try:
        schema = TypeAdapter(annotation).json_schema()
    except Exception:  # an annotation pydantic cannot express: any value
        return {}
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:  # the definition's title and docstring are the library's internals
                definition = definitions[node["$ref"].rsplit("/", 1)[1]]
                return inline({k: v for k, v in definition.items() if k not in ("title", "description")})
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node
    return inline(schema)


def _json_default(field: dataclasses.Field) -> dict:
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if default is dataclasses.MISSING:
        return {}
    try:
        return {"default": TypeAdapter(Any).dump_python(default, mode="json")}
    except Exception:  # a default with no JSON form (the class computes it)
        return {}
