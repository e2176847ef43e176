"""Vocabulary trimming on the tiny teacher: what still encodes, what the model computes, where it loads."""

import copy
import json
import urllib.request

import pytest
import torch
from gguf import GGUFReader
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from distilflow.configs.loader import load_config
from distilflow.tasks import data, decoding, distill, gguf_export, kd, teacher_logits, vocab
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.models import save_model
from tests.conftest import REPO, TINY_CONFIG, TINY_TEACHER

TEXTS = ["Ticket: My card was charged twice for one order.", "Ticket: The parcel never arrived.",
         "Ticket: The app crashes when I open settings."]
ARBITRARY = ["Ünïcödé naïve café — «quoted» 12345 ½ ß 漢字 😀 Ωμέγα",
             "xylophone QUASAR\tzebra\n\nend",
             "<|im_start|>user\nsome words the task never saw<|im_end|>", " leading and trailing spaces  "]


def tiny_task():
    return load_config(TINY_CONFIG).task


def chats(tokenizer, texts: list[str], task) -> list[str]:
    """Texts in the chat frame the student sees (system prompt, template, an answer)."""
    return [data.render(tokenizer, data.messages({"text": t}, task)) + "bug<|im_end|>\n" for t in texts]


@pytest.fixture(scope="module")
def trimmed():
    """The tiny teacher trimmed to the tokens of three tickets in the task's chat frame."""
    task = tiny_task()
    tokenizer = AutoTokenizer.from_pretrained(TINY_TEACHER)
    model = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32).eval()
    texts = chats(tokenizer, TEXTS, task)
    model, small, kept = vocab.trim(model, tokenizer, texts, vocab.required_texts(tokenizer, task))
    return {"model": model, "tokenizer": small, "kept": kept, "texts": texts, "original": tokenizer}


def test_trimming_keeps_far_fewer_tokens_and_renumbers_them_densely(trimmed):
    kept, small = trimmed["kept"], trimmed["tokenizer"]
    assert 256 < len(kept) < len(trimmed["original"]) and kept == sorted(kept)
    assert len(small) == len(kept) == trimmed["model"].config.vocab_size
    assert sorted(small.get_vocab().values()) == list(range(len(kept)))


@pytest.mark.parametrize("text", ARBITRARY)
def test_any_text_non_ascii_included_encodes_and_decodes_back(trimmed, text):
    small, original = trimmed["tokenizer"], trimmed["original"]
    ids = small(text, add_special_tokens=False).input_ids
    assert small.decode(ids) == original.decode(original(text, add_special_tokens=False).input_ids) == text


def test_the_task_texts_encode_to_the_same_tokens_as_before(trimmed):
    small, original, kept = trimmed["tokenizer"], trimmed["original"], trimmed["kept"]
    for text in trimmed["texts"]:
        before = original(text, add_special_tokens=False).input_ids
        assert [kept[i] for i in small(text, add_special_tokens=False).input_ids] == before


def test_text_the_task_never_used_encodes_in_smaller_pieces(trimmed):
    small, original = trimmed["tokenizer"], trimmed["original"]
    text = ARBITRARY[1]
    assert len(small(text).input_ids) > len(original(text).input_ids)


def test_the_trimmed_models_logits_on_kept_tokens_equal_the_originals(trimmed):
    original = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32).eval()
    kept = torch.tensor(trimmed["kept"])
    ids = trimmed["original"](trimmed["texts"][0], add_special_tokens=False).input_ids
    new_ids = trimmed["tokenizer"](trimmed["texts"][0], add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = original(torch.tensor([ids])).logits[..., kept]
        logits = trimmed["model"](torch.tensor([new_ids])).logits
    torch.testing.assert_close(logits, expected)


def test_special_ids_and_the_chat_template_follow_the_new_numbering(trimmed):
    model, small = trimmed["model"], trimmed["tokenizer"]
    assert small.convert_ids_to_tokens(model.config.eos_token_id) == "<|im_end|>" == small.eos_token
    assert small.convert_ids_to_tokens(model.generation_config.bos_token_id) == "<|im_start|>"
    assert small.pad_token_id == model.config.pad_token_id
    assert small.chat_template == trimmed["original"].chat_template


@pytest.fixture(scope="module")
def bundle(trimmed, tmp_path_factory):
    directory = tmp_path_factory.mktemp("trimmed") / "model"
    return save_model(copy.deepcopy(trimmed["model"]), trimmed["tokenizer"], directory)


def test_the_trimmed_bundle_reloads_in_transformers_with_the_same_logits(trimmed, bundle):
    model = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    ids = tokenizer(trimmed["texts"][1], add_special_tokens=False).input_ids
    assert ids == trimmed["tokenizer"](trimmed["texts"][1], add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = copy.deepcopy(trimmed["model"]).to(torch.bfloat16).float()(torch.tensor([ids])).logits
        torch.testing.assert_close(model(torch.tensor([ids])).logits, expected, atol=1e-4, rtol=1e-4)
    assert json.loads((bundle / "config.json").read_text())["vocab_size"] == len(tokenizer)


def test_the_trimmed_bundle_exports_to_gguf_with_its_own_vocabulary(trimmed, bundle, tmp_path):
    reader = GGUFReader(gguf_export.export(bundle, tmp_path / "m.gguf", "q8_0", name="trimmed"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    small = trimmed["tokenizer"]
    assert fields["tokenizer.ggml.tokens"] == small.convert_ids_to_tokens(list(range(len(small))))
    assert fields["tokenizer.ggml.eos_token_id"] == small.eos_token_id
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert embedding.shape.tolist() == [trimmed["model"].config.hidden_size, len(small)]


def test_the_trimmed_gguf_runs_in_llama_cpp_as_transformers_does(trimmed, bundle, tmp_path):
    xllamacpp = pytest.importorskip("xllamacpp", reason="pip install xllamacpp (a prebuilt llama.cpp)")
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf_export.export(bundle, tmp_path / "m.gguf", "f16", name="trimmed"))
    params.n_ctx = 512
    server = xllamacpp.Server(params)  # in this process, and on a loopback port for the endpoints it lacks
    small, model = trimmed["tokenizer"], AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32).eval()
    prompt = data.render(small, data.messages({"text": "Ünïcödé parcel 😀 never arrived"}, tiny_task()))
    request = urllib.request.Request(f"{server.listening_address}/tokenize", method="POST",
                                     data=json.dumps({"content": prompt, "parse_special": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response)["tokens"] == small(prompt, add_special_tokens=False).input_ids
    answer = server.handle_completions({"prompt": prompt, "max_tokens": 4, "temperature": 0})
    ids = small(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=small.pad_token_id)
    assert answer["choices"][0]["text"] == small.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


# --- logit KD with a trimmed student ----------------------------------------------------------------------

def test_a_trimmed_students_tokens_map_to_the_teachers_ids(trimmed, bundle):
    ids = teacher_logits.teacher_ids(TINY_TEACHER, bundle)
    assert ids.tolist() == trimmed["kept"]
    assert teacher_logits.teacher_ids(TINY_TEACHER, TINY_TEACHER) is None


def test_cached_teacher_log_probs_in_student_ids_move_tokens_the_student_lacks_into_the_tail():
    kept = torch.tensor([0, 2, 3, 5])  # the student's tokens, as teacher ids
    logprobs = torch.log(torch.tensor([[0.5, 0.2, 0.1]]))
    cached = {"topk_ids": torch.tensor([[3, 1, 5]], dtype=torch.int32), "topk_logprobs": logprobs.half(),
              "tail_logprob": torch.log(torch.tensor([0.2])), "input_ids": torch.tensor([0, 5, 2], dtype=torch.int32)}
    mapped = teacher_logits.in_student_ids(cached, kept)
    assert mapped["topk_ids"].tolist() == [[2, -1, 3]] and mapped["input_ids"].tolist() == [0, 3, 1]
    assert mapped["topk_logprobs"][0, 1] == kd.TAIL_FLOOR
    torch.testing.assert_close(mapped["tail_logprob"].exp(), torch.tensor([0.4]), atol=1e-3, rtol=0)


def test_divergence_with_tokens_the_student_lacks_is_the_one_over_the_buckets_both_can_tell_apart():
    torch.manual_seed(0)
    teacher = torch.randn(3, 12).log_softmax(-1)
    kept = torch.tensor([0, 1, 2, 4, 5, 7, 8, 9, 11])  # the student's tokens, as teacher ids
    student = torch.randn(3, len(kept))
    top = teacher.topk(5)
    tail = teacher.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    cached = teacher_logits.in_student_ids({"topk_ids": top.indices.int(), "topk_logprobs": top.values.half(),
                                            "tail_logprob": tail, "input_ids": torch.tensor([0], dtype=torch.int32)},
                                           kept)
    ours = kd.divergence(kd.top_k_buckets(student, cached["topk_ids"].long(), 1.0),
                         torch.cat([cached["topk_logprobs"].float(), cached["tail_logprob"][:, None]], -1), 0.0)
    for row in range(3):  # forward KL over: each top-k token the student has, and everything else
        shared = [i for i in top.indices[row].tolist() if i in kept.tolist()]
        t = teacher[row, shared].exp()
        s = student[row].log_softmax(-1)[[kept.tolist().index(i) for i in shared]].exp()
        t, s = torch.cat([t, 1 - t.sum(0, keepdim=True)]), torch.cat([s, 1 - s.sum(0, keepdim=True)])
        torch.testing.assert_close(ours[row], (t * (t / s).log()).sum(), atol=2e-3, rtol=1e-3)


# --- what trimming refuses --------------------------------------------------------------------------------

def test_a_vocabulary_size_too_small_for_the_labels_names_the_token():
    task = tiny_task()
    tokenizer = AutoTokenizer.from_pretrained(TINY_TEACHER)
    model = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32)
    required = vocab.required_texts(tokenizer, task)
    with pytest.raises(DistilflowError, match=r"distill.student.vocabulary_size \(262\) would drop the token "
                                              r"'.+', which .+ needs.*at least \d+") as caught:
        vocab.trim(model, tokenizer, chats(tokenizer, TEXTS, task), required, max_size=262)
    assert "label" in str(caught.value) or "chat template" in str(caught.value)


def test_a_vocabulary_size_keeps_the_most_frequent_task_tokens_and_what_the_task_needs():
    task = tiny_task()
    tokenizer = AutoTokenizer.from_pretrained(TINY_TEACHER)
    model = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32)
    required = vocab.required_texts(tokenizer, task)
    _, small, kept = vocab.trim(model, tokenizer, chats(tokenizer, TEXTS, task), required, max_size=300)
    assert len(kept) <= 300
    for text in required.values():
        assert [kept[i] for i in small(text, add_special_tokens=False).input_ids] == \
            tokenizer(text, add_special_tokens=False).input_ids


def test_trimming_a_tokenizer_that_is_not_byte_level_is_refused():
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=64, special_tokens=["[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]")
    model = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32)
    with pytest.raises(DistilflowError, match="distill.student.vocabulary: trim works on byte-level BPE.*"
                                              "vocabulary: full"):
        vocab.trim(model, tokenizer, TEXTS, {})


def test_a_vocabulary_size_without_trimming_is_refused():
    with pytest.raises(DistilflowError, match="distill.student.vocabulary_size.*vocabulary: trim"):
        load_config(TINY_CONFIG, {"distill.student.vocabulary_size": 400})


# --- the distill stage with a trimmed student -------------------------------------------------------------

@pytest.fixture
def trimmed_student(tmp_path):
    """The tiny config's student (teacher layers) trimmed to at most 320 tokens, and what training needs."""
    from tests.test_distill import context, tiny_dataset

    def make(**overrides):
        cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work"), "distill.student.vocabulary": "trim",
                                        "distill.student.vocabulary_size": 320, "distill.logit_kd.max_steps": 2,
                                        **overrides})
        dataset = tiny_dataset(cfg, tmp_path / "dataset")
        ctx = context(cfg, tmp_path)
        start, origin = distill.initial_student(cfg.distill.student, TINY_TEACHER, dataset, ctx)
        return cfg, dataset, ctx, start, origin
    return make


def changed(start, trained) -> bool:
    before, after = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (start, trained))
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_the_distill_stage_makes_a_trimmed_student_that_says_so(trimmed_student):
    _, _, _, start, origin = trimmed_student()
    assert "vocabulary trimmed to 320 of 512 tokens" in origin
    assert AutoModelForCausalLM.from_pretrained(start).config.vocab_size == len(AutoTokenizer.from_pretrained(start))


@pytest.mark.parametrize("source", ["offline", "online"])
def test_logit_kd_trains_a_trimmed_student_against_the_full_teacher(trimmed_student, tmp_path, source):
    cfg, dataset, ctx, start, _ = trimmed_student(**{"distill.logit_kd.teacher_logits": source})
    trained = distill.trained("logit_kd", start, tmp_path / "dataset", dataset, TINY_TEACHER, cfg.distill, ctx)
    assert AutoModelForCausalLM.from_pretrained(trained).config.vocab_size == 320
    assert changed(start, trained)


# --- the embedded teacher ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_real_teacher_trimmed_to_the_demo_task_answers_as_before_in_transformers_and_llama_cpp(tmp_path):
    from distilflow.tasks.models import load_teacher

    xllamacpp = pytest.importorskip("xllamacpp", reason="pip install xllamacpp (a prebuilt llama.cpp)")
    cfg = load_config(REPO / "configs" / "demo.yaml")
    teacher, tokenizer = load_teacher(cfg.prototype.teacher, torch.device("cpu"))
    split = data.load_task_data(cfg.task, cfg.run.seed)
    end = decoding.turn_end(tokenizer)
    chat = [data.render(tokenizer, data.messages(row, cfg.task)) + row["label"] + end for row in split.train]
    required = vocab.required_texts(tokenizer, cfg.task)
    model, small, kept = vocab.trim(copy.deepcopy(teacher), tokenizer, chat, required)
    assert len(kept) == model.config.vocab_size < teacher.config.vocab_size / 20

    prompt = data.render(tokenizer, data.messages(split.eval[0], cfg.task))
    ids = small(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = teacher(torch.tensor([[kept[i] for i in ids]])).logits[..., kept]
        torch.testing.assert_close(model(torch.tensor([ids])).logits, expected, atol=1e-4, rtol=1e-4)

    bundle = save_model(model, small, tmp_path / "trimmed")
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf_export.export(bundle, tmp_path / "m.gguf", "f16", name="trimmed"))
    params.n_ctx = 512
    server = xllamacpp.Server(params)
    reloaded = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32).eval()
    generated = reloaded.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                                  pad_token_id=small.pad_token_id)[0, len(ids):]
    answer = server.handle_completions({"prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert answer["choices"][0]["text"] == small.decode(generated, skip_special_tokens=True)


def test_the_student_size_study_shares_the_demos_teacher_data_and_distillation_budget():
    demo = load_config(REPO / "configs" / "demo.yaml")
    study = load_config(REPO / "configs" / "student-size-study.yaml")
    assert all(getattr(demo, part) == getattr(study, part) for part in ("task", "prototype", "eval"))
    assert (demo.run.workdir, demo.run.seed, demo.run.device) == (study.run.workdir, study.run.seed, study.run.device)
    assert study.distill.model_copy(update={"student": demo.distill.student}) == demo.distill
    assert study.distill.student.vocabulary == "trim"
