"""Benchmark 6 on a GPU: the deployed bundle and the teacher served by vLLM, through the pipeline's own vLLM
engine path (tasks/serving.py: vLLM's OpenAI server in its own process, asked over HTTP).

Per model: engine start time; batch-1 decode tokens/s and time to first token (one streamed answer,
median of 3); 64 requests in flight: output tokens/s and the median time to first token; the GPU memory
the server holds; for the demo's models, the task score on the held-out split with structured outputs
(as the bundle's request.json asks). Two model sizes, each in bf16, W4A16 and FP8 (quantized with
distilflow's own tasks.quantize, RTN: no calibration data needed for speed): the demo's teacher
(SmolLM2-135M-Instruct, the prototype stage's saved checkpoint) beside the deployed bundle (the 20-layer
student, W4A16 GPTQ), and a randomly initialised SmolLM2-1.7B-shaped model (speed depends on the shapes,
not the weights; no model hub on the GPU box).

    python -m tests.benchmarks.bench_vllm --out OUT.json --bundle BUNDLE --teacher TEACHER_DIR \\
        [--models teacher-bf16,teacher-w4a16,teacher-fp8,bundle,1.7b-bf16,1.7b-w4a16,1.7b-fp8]

Each model's result is merged into OUT.json as soon as it is measured, so the models can be split over
several calls (vLLM starts in 67-100 s per model). Needs vllm importable and a GPU.
"""

import argparse
import gc
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoTokenizer

from distilflow.configs.loader import load_config
from distilflow.configs.schema import QuantizeConfig, ServingConfig
from distilflow.tasks import data, quantize, serving
from distilflow.tasks.models import load_model
from tests.benchmarks.distill_setup import random_model

REPO = Path(__file__).resolve().parents[2]
MODELS = ("teacher-bf16", "teacher-w4a16", "teacher-fp8", "bundle", "1.7b-bf16", "1.7b-w4a16", "1.7b-fp8")
SCHEMES = {"w4a16": QuantizeConfig(scheme="w4a16", method="rtn"), "fp8": QuantizeConfig(scheme="fp8")}
BATCH = 64


def prepare(name: str, args, workdir: Path) -> Path:
    """The checkpoint directory of ``name``, quantized (or built) into ``workdir`` on first use."""
    if name == "bundle":
        return args.bundle
    family, scheme = name.rsplit("-", 1)
    source = args.teacher if family == "teacher" else workdir / "1.7b-bf16"
    if family == "1.7b" and not source.exists():
        random_model("smollm2-1.7b", source, seed=0)
        # random_model saves the 512-id test tokenizer: the server would decode most of the model's 49,152 ids
        # to no text at all (no first token for the streamed speed requests). The teacher's tokenizer is SmolLM2's.
        AutoTokenizer.from_pretrained(args.teacher).save_pretrained(source)
    if scheme == "bf16":
        return source
    out = workdir / name
    if not out.exists():
        model, tokenizer = load_model(source, torch.device("cuda"), dtype=torch.bfloat16)
        quantize.quantize(model, tokenizer, SCHEMES[scheme], [], out)
        del model
        gc.collect()
        torch.cuda.empty_cache()  # the server's GPU memory is measured as the device's used memory
    return out


def batch_of_streams(client: serving.Client, chats: list[list[dict]], tokens: int) -> dict:
    """BATCH streamed requests in flight at once: output tokens/s over the wall time, median TTFT."""
    requests = [serving.speed_request(chats[i % len(chats)], tokens) for i in range(BATCH)]
    start = time.perf_counter()
    with ThreadPoolExecutor(BATCH) as pool:
        streams = list(pool.map(client.stream, requests))
    wall = time.perf_counter() - start
    return {"batch": BATCH, "tokens_per_s": sum(s["tokens"] for s in streams) / wall,
            "ttft_s": statistics.median(s["ttft_s"] for s in streams)}


def measure(name: str, model_dir: Path, workload: serving.Workload, cfg: ServingConfig) -> dict:
    engine = serving.Engine(serving.VLLM, "cuda", serving.device_kind(torch.cuda.get_device_name()))
    start = time.perf_counter()
    with serving.serve(model_dir, engine, cfg) as server:
        started = time.perf_counter() - start
        client = serving.Client(server.base_url, server.model)
        served = serving.measure_served(client, engine, workload, cfg)
        batch = batch_of_streams(client, workload.chats(workload.rows), cfg.decode_tokens)
    answers = served.pop("answers")
    meaningful = not name.startswith("1.7b")  # a random model's answers score nothing
    return {"model": name, "checkpoint": str(model_dir), "weight_bytes": serving.artifact_bytes(model_dir),
            "engine_start_s": started, **served, f"batch{BATCH}": batch, "peak_memory_mb": server.peak_memory_mb,
            "task_score": served["task_score"] if meaningful else None,
            "answers": answers[:8] if meaningful else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file; each model's result is merged into it")
    parser.add_argument("--bundle", type=Path, help="the deployed bundle of a demo run (`distilflow report --latest`)")
    parser.add_argument("--teacher", type=Path, help="the prototype stage's saved teacher (artifacts/prototype/*/teacher)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-vllm"), help="quantized and built models")
    parser.add_argument("--decode-tokens", type=int, default=256)
    args = parser.parse_args()
    if any(m.startswith("1.7b") for m in args.models.split(",")) and not args.teacher:
        parser.error("the 1.7b models take SmolLM2's tokenizer from --teacher")
    args.workdir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(REPO / "configs" / "demo.yaml")
    workload = serving.Workload(data.load_task_data(cfg.task, cfg.run.seed).eval, cfg.task)
    serving_cfg = ServingConfig(engine="vllm", concurrency=BATCH, decode_tokens=args.decode_tokens, speed_repeats=3,
                                latency_requests=32, context_tokens=1024)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"device": torch.cuda.get_device_name(),
                                                                           "models": {}}
    for name in args.models.split(","):
        results["models"][name] = measure(name, prepare(name, args, args.workdir), workload, serving_cfg)
        args.out.write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in results["models"][name].items() if k != "answers"}), flush=True)


if __name__ == "__main__":
    main()
