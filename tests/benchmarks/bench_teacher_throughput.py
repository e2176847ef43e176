"""Benchmark: the prototype stage's teacher throughput, a local teacher vs the same teacher served by vLLM.

Same weights (the embedded SmolLM2-135M-Instruct in bf16, or any HF dir via --teacher), same prompts (the
demo task's training pool, each with the demo's 4-shot prompt), three jobs the prototype and logit KD give
a teacher:
- label a choice task: locally by each label's log-likelihood, calibrated (what the prototype runs);
  served, as distilflow's HTTP teacher, by the same scores from vLLM's prompt log-probs, and by vLLM's
  guided choice; how many served answers agree with the local ones;
- write free answers (16 new tokens): locally with HF `generate` in batches, served with
  `--concurrency` requests in flight;
- the logit-KD cache (top-64 log-probs at every answer token): a local batched forward vs the server's
  prompt log-probs.
The local runs go first and free the GPU before vLLM starts. Prints one JSON object and writes
OUT/teacher_throughput.json.

    python -m tests.benchmarks.bench_teacher_throughput --out $OUT/teacher --vllm-pythonpath /tmp/site-vllm:/tmp/site
    python -m tests.benchmarks.bench_teacher_throughput --out OUT --test-server --teacher tests/assets/tiny-teacher \
        --prompts 16 --concurrency 2 --batch-sizes 8      # CPU smoke: tests/openai_server.py instead of vLLM
"""

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from distilflow.configs.loader import load_config
from distilflow.configs.schema import HttpTeacherConfig, RegexCheck
from distilflow.tasks import checks, data, decoding, teacher_logits
from distilflow.tasks.evaluate import Prompting
from distilflow.tasks.models import load_model
from distilflow.tasks.teachers import HttpTeacher, LocalTeacher
from tests.benchmarks.vllm_teacher import DEMO, embedded_teacher, free_port, vllm_server

TOP_K = 64
NEW_TOKENS = 16
ANYTHING = RegexCheck(type="regex", pattern="(?s).*")


def timed(work, count: int, device: torch.device) -> tuple[dict, object]:
    """``work()``'s result, and its wall time and rate (``count`` items)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "per_s": round(count / seconds, 2)}, result


def kd_examples(tokenizer, rows: list[dict], task) -> list[teacher_logits.Example]:
    """The rows with their labels as answers, as logit KD tokenizes them."""
    chats = [{"prompt": data.messages(row, task), "completion": [{"role": "assistant", "content": checks.label(row, task)}]}
             for row in rows if checks.label(row, task)]
    return teacher_logits.tokenize(tokenizer, chats, max_length=512)


def local_arms(teacher_dir: Path, rows, task, prompting, device, batch_sizes) -> tuple[dict, list]:
    model, tokenizer = load_model(teacher_dir, device)
    teacher = LocalTeacher(model, tokenizer, name="local")
    prompts = prompting.prompts(tokenizer, rows, task)
    examples = kd_examples(tokenizer, rows, task)
    positions = sum(sum(e.completion_mask[1:]) for e in examples)
    teacher.answer(rows[:4], task, prompting)  # warm-up
    arms, answers = {}, None
    arms["choice_log_likelihood"], answers = timed(lambda: teacher.answer(rows, task, prompting), len(rows), device)
    for batch in batch_sizes:
        arms[f"generate_batch_{batch}"], _ = timed(lambda: decoding.sample(
            model, tokenizer, prompts, max_new_tokens=NEW_TOKENS, batch_size=batch), len(rows), device)
    arms["logit_cache_top64"], _ = timed(lambda: teacher_logits.compute(model, examples, TOP_K, 1.0),
                                         positions, device)
    arms["logit_cache_top64"]["positions"] = positions
    del model, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return arms, answers


def served_arms(base_url: str, teacher_dir: Path, rows, task, prompting, concurrency: int,
                local_answers: list) -> dict:
    endpoint = HttpTeacherConfig(base_url=base_url, model="teacher", max_concurrency=concurrency, timeout_s=600,
                                 max_retries=0)
    scored = HttpTeacher.connect(endpoint.model_copy(update={"tokenizer": str(teacher_dir)}), None)
    guided = HttpTeacher.connect(endpoint, None)
    free = HttpTeacher.connect(endpoint.model_copy(update={"structured_outputs": False}), None)
    chats = prompting.chats(rows, task)
    examples = kd_examples(scored.tokenizer, rows, task)
    positions = sum(sum(e.completion_mask[1:]) for e in examples)
    cpu = torch.device("cpu")  # the work happens in the server: nothing to synchronize here
    for teacher in (scored, guided):
        teacher.answer(rows[:4], task, prompting)  # warm-up
    arms = {}
    arms["choice_log_likelihood"], answers = timed(lambda: scored.answer(rows, task, prompting), len(rows), cpu)
    arms["choice_log_likelihood"]["agree_with_local"] = sum(a == b for a, b in zip(answers, local_answers))
    arms["guided_choice"], guided_answers = timed(lambda: guided.answer(rows, task, prompting), len(rows), cpu)
    arms["guided_choice"]["agree_with_local"] = sum(a == b for a, b in zip(guided_answers, local_answers))
    arms[f"generate_concurrency_{concurrency}"], _ = timed(
        lambda: free.complete(chats, ANYTHING, max_new_tokens=NEW_TOKENS), len(rows), cpu)
    arms["logit_cache_top64"], _ = timed(lambda: teacher_logits.compute_from_endpoint(scored, examples, TOP_K),
                                         positions, cpu)
    arms["logit_cache_top64"]["positions"] = positions
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, help="a HF model dir (default: the embedded teacher, saved in bf16)")
    parser.add_argument("--prompts", type=int, default=320, help="training-pool inputs labelled by each arm")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight to the server")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64], help="local generate batch sizes")
    parser.add_argument("--vllm-pythonpath", help="PYTHONPATH of the vLLM server, e.g. /tmp/site-vllm:/tmp/site")
    parser.add_argument("--test-server", action="store_true",
                        help="serve with tests/openai_server.py instead of vLLM (a CPU smoke of this script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)

    cfg = load_config(DEMO, {"task.max_train": args.prompts})
    split = data.load_task_data(cfg.task, cfg.run.seed)
    rows, task = split.train[:args.prompts], cfg.task
    shots = data.few_shot_examples(split.train, task, cfg.prototype.few_shot, cfg.run.seed)
    prompting = Prompting(tuple(shots), calibrate=True)
    teacher_dir = args.teacher or embedded_teacher(args.out / "teacher")

    local, local_answers = local_arms(teacher_dir, rows, task, prompting, device, args.batch_sizes)
    with vllm_server(teacher_dir, "teacher", free_port(), args.out / "vllm.log", max_logprobs=TOP_K,
                     pythonpath=args.vllm_pythonpath, test_server=args.test_server) as base_url:
        served = served_arms(base_url, teacher_dir, rows, task, prompting, args.concurrency, local_answers)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "teacher": str(teacher_dir),
               "server": "tests/openai_server.py" if args.test_server else "vLLM", "prompts": len(rows),
               "new_tokens": NEW_TOKENS, "top_k": TOP_K, "local": local, "served": served}
    (args.out / "teacher_throughput.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
