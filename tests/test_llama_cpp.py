"""The GGUF export in a real llama.cpp runtime: llama.cpp's own server (the xllamacpp wheel) in its own process,
asked over HTTP (/tokenize, /completion and the OpenAI chat endpoint).

Compared with transformers on the same prompts: the tokens llama.cpp reads, the tokens it generates, and
the next token's log-probabilities.
"""

import json
import urllib.request
from contextlib import ExitStack

import pytest
import torch

from distilflow.configs.loader import load_config
from distilflow.configs.schema import DeployConfig, ServingConfig
from distilflow.tasks import data, gguf_export, package, serving
from distilflow.tasks.models import load_model, load_teacher, save_model
from tests.conftest import REPO, TINY_CONFIG, TINY_TEACHER

ONE_SLOT = ServingConfig(concurrency=1)
CPU = serving.Engine(serving.LLAMA_CPP, "cpu", threads=2)


def post(server: serving.Server, path: str, body: dict) -> dict:
    """llama.cpp's native endpoints live beside the OpenAI ones, at the server's root."""
    request = urllib.request.Request(server.base_url.removesuffix("/v1") + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def tokenize(server: serving.Server, text: str) -> list[int]:
    return post(server, "/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]


def greedy(server: serving.Server, ids: list[int], new_tokens: int) -> list[int]:
    """llama.cpp's greedy tokens up to (not including) end of sequence."""
    answer = post(server, "/completion", {"prompt": ids, "n_predict": new_tokens, "temperature": 0,
                                          "return_tokens": True, "cache_prompt": False})
    return answer["tokens"][:-1] if answer["stop_type"] == "eos" else answer["tokens"]  # it returns the eos too


def next_token_logprobs(server: serving.Server, ids: list[int], top: int) -> dict[int, float]:
    answer = post(server, "/completion", {"prompt": ids, "n_predict": 1, "temperature": 0, "n_probs": top,
                                          "post_sampling_probs": False, "cache_prompt": False})
    return {p["id"]: p["logprob"] for p in answer["completion_probabilities"][0]["top_logprobs"]}


def hf_greedy(model, tokenizer, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy tokens up to (not including) end of sequence, as ``greedy`` returns them."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    return out[:out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny teacher in transformers, and as f16 and q8_0 GGUF each served by llama.cpp, with task prompts."""
    cfg = load_config(TINY_CONFIG)
    model, tokenizer = load_model(TINY_TEACHER, torch.device("cpu"))
    rows = data.load_task_data(cfg.task, cfg.run.seed).eval[:6]
    prompts = [data.render(tokenizer, data.messages(row, cfg.task)) for row in rows]
    out = tmp_path_factory.mktemp("gguf")
    with ExitStack() as servers:
        served = {kind: servers.enter_context(serving.serve(
            gguf_export.export(TINY_TEACHER, out / f"{kind}.gguf", kind, name="tiny"), CPU, ONE_SLOT))
            for kind in ("f16", "q8_0")}
        yield {"cfg": cfg, "model": model, "tokenizer": tokenizer, "rows": rows, "prompts": prompts, "served": served}


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_reads_prompts_as_the_same_tokens(tiny, kind):
    for prompt in tiny["prompts"] + ["Order 12345 was charged twice: 2 x 19.99 EUR!"]:
        assert tokenize(tiny["served"][kind], prompt) == tiny["tokenizer"](prompt, add_special_tokens=False).input_ids


@pytest.mark.parametrize("kind, tolerance", [("f16", 5e-3), ("q8_0", 5e-2)])
def test_llama_cpp_next_token_logprobs_match_transformers(tiny, kind, tolerance):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    for prompt in tiny["prompts"]:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        for token, logprob in next_token_logprobs(tiny["served"][kind], ids, top=5).items():
            assert abs(logprob - expected[token].item()) < tolerance


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_generates_what_transformers_generates(tiny, kind):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    for prompt in tiny["prompts"]:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert greedy(tiny["served"][kind], ids, 8) == hf_greedy(model, tokenizer, ids, 8)


def test_bundle_request_with_its_grammar_answers_with_a_label(tiny):
    cfg = tiny["cfg"]
    request = package.chat_request(cfg.task, tiny["rows"][0], DeployConfig(model_name="tiny"),
                                   package.llama_cpp_constraint(cfg.task.check))
    server = tiny["served"]["q8_0"]
    answer, _ = serving.Client(server.base_url, server.model).timed(request)
    assert answer in cfg.task.check.choices


def test_bundle_request_with_the_json_schema_answers_json_valid_against_it(tiny):
    from distilflow.tasks import checks

    task = load_config(REPO / "configs" / "extract.yaml").task
    server = tiny["served"]["q8_0"]
    # The random tiny model writes whatever the schema allows, long runs of whitespace too (284 tokens here):
    # room for it within its 512-token context.
    request = package.chat_request(task, tiny["rows"][0], DeployConfig(model_name="tiny", max_new_tokens=400),
                                   package.llama_cpp_constraint(task.check))
    answer, _ = serving.Client(server.base_url, server.model).timed(request)
    assert checks.problem(answer, task) is None, answer


@pytest.fixture(scope="module")
def teacher_gguf(tmp_path_factory):
    """The embedded teacher (SmolLM2-135M-Instruct) saved in bf16 by distilflow, then exported to GGUF."""
    cfg = load_config(REPO / "configs" / "demo.yaml")
    model, tokenizer = load_teacher(cfg.prototype.teacher, torch.device("cpu"))
    saved = save_model(model, tokenizer, tmp_path_factory.mktemp("teacher") / "teacher")
    del model
    model, tokenizer = load_model(saved, torch.device("cpu"))
    files = {kind: gguf_export.export(saved, saved.parent / f"{kind}.gguf", kind, name="smollm2")
             for kind in ("f16", "q4_0")}
    rows = data.load_task_data(cfg.task, cfg.run.seed).eval[:4]
    return {"cfg": cfg, "model": model, "tokenizer": tokenizer, "files": files, "rows": rows}


@pytest.mark.slow
def test_teacher_gguf_generates_what_transformers_generates(teacher_gguf):
    model, tokenizer = teacher_gguf["model"], teacher_gguf["tokenizer"]
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             *[data.messages(row, teacher_gguf["cfg"].task) for row in teacher_gguf["rows"]]]
    with serving.serve(teacher_gguf["files"]["f16"], CPU, ONE_SLOT) as server:
        for chat in chats:
            ids = tokenizer(data.render(tokenizer, chat), add_special_tokens=False).input_ids
            assert tokenize(server, data.render(tokenizer, chat)) == ids
            assert greedy(server, ids, 12) == hf_greedy(model, tokenizer, ids, 12)


@pytest.mark.slow
def test_teacher_q4_0_gguf_answers_the_task_through_llama_cpp(teacher_gguf):
    cfg = teacher_gguf["cfg"]
    answers = serving.smoke(teacher_gguf["files"]["q4_0"], teacher_gguf["rows"], cfg.task, 8, ONE_SLOT)
    assert len(answers) == len(teacher_gguf["rows"]) and all(answers)
