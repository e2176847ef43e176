"""Vocabulary trimming: a student that keeps only the tokens its task uses.

SmolLM2's embedding is 49,152 × 576: 28M parameters, as many as eight of its decoder layers, and its
LM head (the same matrix, tied) costs as much compute per token. The demo's support-ticket task uses
947 distinct tokens. Trimming keeps

- every token the task's texts encode to (training inputs, the teacher's answers, the chat template
  with the system prompt and template, the labels);
- every single-byte token of the byte-level alphabet and every added or special token, so any text
  still encodes (in smaller pieces where its tokens were dropped) and decodes back;
- the parts of every merge that builds a kept token, so the byte-pair merges reach each kept token
  the way they did before.

The tokenizer keeps the merges whose parts and result are all kept: a text made of kept tokens runs
through the same merges in the same order, so the task's texts encode exactly as before (ids
renumbered densely, in the original order). The model keeps the embedding rows (and LM head rows, if
untied) of the kept tokens, so on those tokens its logits are the original's.
"""

import json
import tempfile
from collections import Counter
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from distilflow.configs.schema import TaskConfig
from distilflow.tasks import data, decoding
from distilflow.tasks.errors import DistilflowError


def trim(model, tokenizer, texts: list[str], required: dict[str, str], max_size: int | None = None):
    """``model`` (changed in place) and a new tokenizer that keep only the tokens ``texts`` use, and the
    original id of each kept token (new id -> original id).

    ``required`` names texts that must encode exactly as before ({what needs it: text}, e.g. the chat
    template, each label); with ``max_size``, the tokens of ``texts`` are kept most frequent first until
    the vocabulary holds ``max_size`` tokens, and an error names a token ``required`` needs that does not fit.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    _require_byte_level(spec)
    counts = Counter(i for text in texts for i in tokenizer(text, add_special_tokens=False).input_ids)
    needs = {i: need for need, text in required.items() for i in tokenizer(text, add_special_tokens=False).input_ids}
    kept = kept_ids(spec, _alphabet_and_special(spec, tokenizer, model), needs,
                    [i for i, _ in counts.most_common()], max_size)
    trimmed_tokenizer = tokenizer_keeping(tokenizer, spec, kept)
    keep_rows(model, kept)
    new_id = {original: new for new, original in enumerate(kept)}
    _renumber_special_ids(model, new_id)
    _require_same_encoding(tokenizer, trimmed_tokenizer, required, new_id)
    return model, trimmed_tokenizer, kept


def token_ids(spec: dict) -> dict[str, int]:
    """Every token's id, added tokens included, from a tokenizer.json."""
    return {**spec["model"]["vocab"], **{a["content"]: a["id"] for a in spec.get("added_tokens", [])}}


def merges(spec: dict) -> list[tuple[str, str]]:
    """The BPE merges in rank order (tokenizer.json writes them as pairs or as "a b" strings)."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in spec["model"]["merges"]]


def kept_ids(spec: dict, base: set[int], needs: dict[int, str], by_frequency: list[int],
             max_size: int | None) -> list[int]:
    """The original ids to keep, ascending, each with the merge parts that build it: ``base`` and ``needs``
    ({id: what needs it}) always, then ``by_frequency`` in order while the vocabulary fits in ``max_size``."""
    vocab = token_ids(spec)
    text_of = {i: token for token, i in vocab.items()}
    built_from = {}
    for left, right in merges(spec):
        built_from.setdefault(left + right, []).append((vocab[left], vocab[right]))
    kept = _with_parts(base, built_from, text_of)
    for token_id, need in needs.items():
        kept = _with_parts(kept | {token_id}, built_from, text_of)
        if max_size is not None and len(kept) > max_size:
            least = len(_with_parts(base | set(needs), built_from, text_of))
            raise DistilflowError(
                f"distill.student.vocabulary_size ({max_size}) would drop the token {text_of[token_id]!r}, which "
                f"{need} needs: the byte-level alphabet, the special tokens and the tokens of the chat template "
                f"and labels are {least}. Raise distill.student.vocabulary_size to at least {least}, or unset it")
    for token_id in by_frequency:
        grown = _with_parts(kept | {token_id}, built_from, text_of)
        if max_size is None or len(grown) <= max_size:
            kept = grown
    return sorted(kept)


def _with_parts(ids: set[int], built_from: dict[str, list[tuple[int, int]]], text_of: dict[int, str]) -> set[int]:
    """``ids`` closed under merges: the two parts of each merge that builds a kept token are kept too."""
    kept, pending = set(ids), list(ids)
    while pending:
        for part in (p for pair in built_from.get(text_of[pending.pop()], []) for p in pair):
            if part not in kept:
                kept.add(part)
                pending.append(part)
    return kept


def _alphabet_and_special(spec: dict, tokenizer, model) -> set[int]:
    """Ids that keep every text encodable and the model's special ids valid."""
    vocab = spec["model"]["vocab"]
    alphabet = {vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab}
    added = {a["id"] for a in spec.get("added_tokens", [])}
    special = set(tokenizer.convert_tokens_to_ids(tokenizer.all_special_tokens))
    return alphabet | added | special | set(_special_ids(model))


def _special_ids(model) -> list[int]:
    """The token ids the model's config and generation config name (bos, eos, pad, unk)."""
    ids = []
    for config in (model.config.get_text_config(), model.generation_config):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            value = getattr(config, key, None)
            ids += [] if value is None else [value] if isinstance(value, int) else list(value)
    return ids


def _require_byte_level(spec: dict) -> None:
    model, pre = spec.get("model", {}), json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or '"ByteLevel"' not in pre or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise DistilflowError(
            f"distill.student.vocabulary: trim works on byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2), "
            f"whose byte alphabet encodes any text; this one is {model.get('type')} with pre-tokenizer {pre}. "
            "Set distill.student.vocabulary: full")


def tokenizer_keeping(tokenizer, spec: dict, kept: list[int]):
    """``tokenizer`` with only the ``kept`` tokens (renumbered densely) and the merges among them.

    Saved and reloaded through transformers, so its config files (special tokens, chat template) are
    written the way transformers writes them.
    """
    new_id = {original: new for new, original in enumerate(kept)}
    kept_texts = {token for token, i in token_ids(spec).items() if i in new_id}
    model = {**spec["model"],
             "vocab": {token: new_id[i] for token, i in spec["model"]["vocab"].items() if i in new_id},
             "merges": [[left, right] for left, right in merges(spec)
                        if left in kept_texts and right in kept_texts and left + right in kept_texts]}
    added = [{**token, "id": new_id[token["id"]]} for token in spec.get("added_tokens", [])]
    spec = {**spec, "model": model, "added_tokens": added, "post_processor": _renumbered(spec.get("post_processor"),
                                                                                       new_id)}
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        (Path(scratch) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        config_file = Path(scratch) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config.pop("added_tokens_decoder", None)  # ids of the old vocabulary; tokenizer.json has the new ones
        config_file.write_text(json.dumps({k: v for k, v in config.items() if not k.endswith("_token_id")}))
        return AutoTokenizer.from_pretrained(scratch)


def _renumbered(post_processor, new_id: dict[int, int]):
    """A post-processor's special-token ids in the new numbering (TemplateProcessing names them)."""
    if isinstance(post_processor, dict):
        return {key: [new_id[i] for i in value] if key == "ids" else _renumbered(value, new_id)
                for key, value in post_processor.items()}
    if isinstance(post_processor, list):
        return [_renumbered(item, new_id) for item in post_processor]
    return post_processor


@torch.no_grad()
def keep_rows(model, kept: list[int]) -> None:
    """The embedding (and an untied LM head) reduced to the ``kept`` rows, in their order; config.vocab_size
    follows. The model's logits are then the original's at the kept tokens."""
    rows = torch.tensor(kept, device=model.get_input_embeddings().weight.device)
    embedding = model.get_input_embeddings().weight[rows].clone()
    output = model.get_output_embeddings()
    untied = output is not None and output.weight is not model.get_input_embeddings().weight
    head = output.weight[rows].clone() if untied else None
    head_bias = output.bias[rows].clone() if untied and output.bias is not None else None
    model.resize_token_embeddings(len(kept), mean_resizing=False)
    model.get_input_embeddings().weight.copy_(embedding)
    if untied:
        model.get_output_embeddings().weight.copy_(head)
        if head_bias is not None:
            model.get_output_embeddings().bias.copy_(head_bias)


def _renumber_special_ids(model, new_id: dict[int, int]) -> None:
    for config in (model.config.get_text_config(), model.generation_config):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            value = getattr(config, key, None)
            if value is not None:
                setattr(config, key, new_id[value] if isinstance(value, int) else [new_id[i] for i in value])


def _require_same_encoding(before, after, required: dict[str, str], new_id: dict[int, int]) -> None:
    """What the task needs encodes to the same tokens as before: a guard on the merge bookkeeping."""
    for need, text in required.items():
        old = [new_id[i] for i in before(text, add_special_tokens=False).input_ids]
        if after(text, add_special_tokens=False).input_ids != old:
            raise DistilflowError(f"distill.student.vocabulary: the trimmed tokenizer encodes {need} ({text!r}) "
                                  "differently from the original; set distill.student.vocabulary: full")


def task_texts(tokenizer, dataset) -> list[str]:
    """The distillation set's chats as the student reads and writes them: inputs and the teacher's answers."""
    return [tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False) for row in dataset]


def required_texts(tokenizer, task: TaskConfig) -> dict[str, str]:
    """What every prompt and answer of the task is made of, by what needs it: the chat template around
    task.system_prompt and task.template (an empty input), and each label as the model writes it."""
    empty = data.content_free_rows(task)[data.CONTENT_FREE_TEXTS.index("")]
    texts = {"the chat template with task.system_prompt and task.template": data.render(
        tokenizer, data.messages(empty, task))}
    if task.check.type == "choice":
        end = decoding.turn_end(tokenizer)
        texts.update({f"the label {choice!r}": choice + end for choice in task.check.choices})
    return texts
