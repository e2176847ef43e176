"""The GGUF export in a real llama.cpp runtime (llama-cpp-python, which `make test-slow` installs).

Compared with transformers on the same prompts: the tokens llama.cpp reads, the tokens it generates,
and for the tiny model the next-token logits read from llama.cpp directly (llama_cpp.server's prompt
log-probs are mis-reported for tokenizers that add no BOS, so never those).
"""

import numpy as np
import pytest
import torch

from distilflow.configs.loader import load_config
from distilflow.configs.schema import DeployConfig
from distilflow.tasks import checks, data, gguf_export, package
from distilflow.tasks.models import load_model, load_teacher, save_model
from tests.conftest import REPO, TINY_CONFIG, TINY_TEACHER

pytestmark = pytest.mark.slow

llama_cpp = pytest.importorskip("llama_cpp", reason="pip install 'distilflow[llama-cpp]' (make test-slow does)")


def llama(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=0, seed=0, verbose=False, logits_all=True)


def greedy(llm, ids: list[int], new_tokens: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        if token == llm.token_eos() or len(out) == new_tokens:
            break
        out.append(token)
    return out


def hf_greedy(model, tokenizer, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy tokens up to (not including) end of sequence, as ``greedy`` returns them."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    return out[:out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny teacher in transformers and as f16 and q8_0 GGUF in llama.cpp, with task prompts."""
    cfg = load_config(TINY_CONFIG)
    model, tokenizer = load_model(TINY_TEACHER, torch.device("cpu"))
    rows = data.load_task_data(cfg.task, cfg.run.seed).eval[:6]
    prompts = [data.render(tokenizer, data.messages(row, cfg.task)) for row in rows]
    out = tmp_path_factory.mktemp("gguf")
    files = {kind: gguf_export.export(TINY_TEACHER, out / f"{kind}.gguf", kind, name="tiny") for kind in ("f16", "q8_0")}
    return {"cfg": cfg, "model": model, "tokenizer": tokenizer, "rows": rows, "prompts": prompts, "files": files,
            "llama": {kind: llama(path) for kind, path in files.items()}}


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_reads_prompts_as_the_same_tokens(tiny, kind):
    llm, tokenizer = tiny["llama"][kind], tiny["tokenizer"]
    for prompt in tiny["prompts"] + ["Order 12345 was charged twice: 2 x 19.99 EUR!"]:
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == \
            tokenizer(prompt, add_special_tokens=False).input_ids


@pytest.mark.parametrize("kind, tolerance", [("f16", 5e-3), ("q8_0", 5e-2)])
def test_llama_cpp_next_token_logits_match_transformers(tiny, kind, tolerance):
    llm, model, tokenizer = tiny["llama"][kind], tiny["model"], tiny["tokenizer"]
    for prompt in tiny["prompts"]:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(np.asarray(llm.scores[len(ids) - 1]) - expected).max() < tolerance


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_generates_what_transformers_generates(tiny, kind):
    llm, model, tokenizer = tiny["llama"][kind], tiny["model"], tiny["tokenizer"]
    for prompt in tiny["prompts"]:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert greedy(llm, ids, 8) == hf_greedy(model, tokenizer, ids, 8)


def test_bundle_request_with_its_grammar_answers_with_a_label(tiny):
    cfg = tiny["cfg"]
    request = package.chat_request(cfg.task, tiny["rows"][0], DeployConfig(model_name="tiny"),
                                   package.llama_cpp_constraint(cfg.task))
    answer = tiny["llama"]["q8_0"].create_chat_completion(
        messages=request["messages"], temperature=request["temperature"], max_tokens=request["max_tokens"],
        grammar=llama_cpp.LlamaGrammar.from_string(request["grammar"], verbose=False))
    assert answer["choices"][0]["message"]["content"] in cfg.task.check.choices


def test_smoke_test_in_a_fresh_process_reports_pass_rate_latency_and_answers(tiny):
    cfg = tiny["cfg"]
    result = gguf_export.smoke_in_fresh_process(tiny["files"]["q8_0"], tiny["rows"][:3], cfg.task, max_new_tokens=4)
    assert 0 <= result["gguf_smoke_pass_rate"] <= 1 and result["gguf_smoke_latency_s"] > 0
    assert [a["label"] for a in result["answers"]] == [checks.label(row, cfg.task) for row in tiny["rows"][:3]]


@pytest.fixture(scope="module")
def teacher_gguf(tmp_path_factory):
    """The embedded teacher (SmolLM2-135M-Instruct) saved in bf16 by distilflow, then exported to GGUF."""
    cfg = load_config(REPO / "configs" / "demo.yaml")
    model, tokenizer = load_teacher(cfg.prototype.teacher, torch.device("cpu"))
    saved = save_model(model, tokenizer, tmp_path_factory.mktemp("teacher") / "teacher")
    del model
    model, tokenizer = load_model(saved, torch.device("cpu"))
    files = {kind: gguf_export.export(saved, saved.parent / f"{kind}.gguf", kind, name="smollm2")
             for kind in ("f16", "q8_0")}
    rows = data.load_task_data(cfg.task, cfg.run.seed).eval[:4]
    return {"cfg": cfg, "model": model, "tokenizer": tokenizer, "files": files, "rows": rows}


def test_teacher_gguf_generates_what_transformers_generates(teacher_gguf):
    model, tokenizer = teacher_gguf["model"], teacher_gguf["tokenizer"]
    llm = llama(teacher_gguf["files"]["f16"])
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             *[data.messages(row, teacher_gguf["cfg"].task) for row in teacher_gguf["rows"]]]
    for chat in chats:
        ids = tokenizer(data.render(tokenizer, chat), add_special_tokens=False).input_ids
        assert llm.tokenize(data.render(tokenizer, chat).encode(), add_bos=False, special=True) == ids
        assert greedy(llm, ids, 12) == hf_greedy(model, tokenizer, ids, 12)


def test_teacher_q8_0_gguf_answers_the_task_in_a_fresh_llama_cpp_process(teacher_gguf):
    cfg = teacher_gguf["cfg"]
    result = gguf_export.smoke_in_fresh_process(teacher_gguf["files"]["q8_0"], teacher_gguf["rows"], cfg.task,
                                                max_new_tokens=8)
    assert all(a["answer"] for a in result["answers"])
    assert result["gguf_smoke_latency_s"] > 0
