"""Stage 4, deploy: the bundle an operations team ships, proven by a smoke test in a fresh process.

The bundle is a Hugging Face model directory (so `vllm serve BUNDLE` and `from_pretrained(BUNDLE)`
work on it as is) plus the model card, the journey, the eval report and a sha256 manifest.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from transformers import GenerationConfig

from distilflow.configs.schema import DeployConfig, EvalConfig, TaskConfig
from distilflow.tasks import data, decoding
from distilflow.tasks.artifacts import StageResult, write_manifest
from distilflow.tasks.context import StageContext
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import Prompting, evaluate, journey_table
from distilflow.tasks.models import load_model, resolve_device, size_on_disk

SMOKE_TIMEOUT_S = 1800


def run(cfg: DeployConfig, upstream: dict[str, StageResult], ctx: StageContext) -> StageResult:
    bundle = ctx.out_dir / "bundle"
    shutil.copytree(upstream["compress"].path("model"), bundle)
    write_generation_config(bundle, cfg)

    smoke = smoke_test(bundle, ctx, cfg)
    deployed = {**smoke["journey_entry"], "smoke_pass_rate": smoke["pass_rate"],
                "smoke_latency_s": smoke["latency_s"]}
    journey = [entry for stage in ("prototype", "distill", "compress") for entry in upstream[stage].journey]
    journey.append(deployed)
    (bundle / "journey.json").write_text(json.dumps(journey, indent=1))
    (bundle / "eval_report.json").write_text(json.dumps(smoke["report"], indent=1))
    (bundle / "README.md").write_text(model_card(ctx.task, upstream, journey))
    write_manifest(bundle)

    metrics = {"deployed.smoke_pass_rate": smoke["pass_rate"], "deployed.smoke_latency_s": smoke["latency_s"],
               **{f"deployed.{k}": v for k, v in smoke["report"]["metrics"].items()}}
    ctx.tracker.log_metrics(metrics)
    for name in ("manifest.json", "journey.json", "README.md", "eval_report.json"):
        ctx.tracker.log_artifact(bundle / name, "bundle")
    return StageResult(stage="deploy", files={"bundle": "bundle"}, metrics=metrics, journey=[deployed],
                       summary=f"Bundle ready; smoke test pass rate {smoke['pass_rate']:.2f}\n")


def write_generation_config(bundle: Path, cfg: DeployConfig) -> None:
    """Greedy, short answers: what the task needs from a server that reads generation_config.json."""
    config = GenerationConfig.from_pretrained(bundle) if (bundle / "generation_config.json").exists() \
        else GenerationConfig()
    config.update(do_sample=False, max_new_tokens=cfg.max_new_tokens, temperature=None, top_p=None, top_k=None)
    config.save_pretrained(bundle)


def smoke_test(bundle: Path, ctx: StageContext, cfg: DeployConfig) -> dict:
    """Load the bundle in a fresh Python process, as a user would, and measure it there."""
    request = ctx.out_dir / "smoke_request.json"
    answer = ctx.out_dir / "smoke_result.json"
    request.write_text(json.dumps({
        "bundle": str(bundle), "device": ctx.device.type, "rows": ctx.examples.eval,
        "task": ctx.task.model_dump(mode="json"), "eval": ctx.eval.model_dump(mode="json"),
        "smoke_prompts": cfg.smoke_prompts, "max_new_tokens": cfg.max_new_tokens}))
    done = subprocess.run([sys.executable, "-m", "distilflow.tasks.deploy", str(request), str(answer)],
                          capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    request.unlink()
    if done.returncode != 0:
        raise DistilflowError(f"smoke test: the bundle at {bundle} failed to load or answer in a fresh "
                              f"process:\n{done.stderr[-3000:]}")
    result = json.loads(answer.read_text())
    answer.unlink()
    return result


def _smoke_main(request_path: str, result_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    task, eval_cfg = TaskConfig.model_validate(request["task"]), EvalConfig.model_validate(request["eval"])
    bundle, rows = Path(request["bundle"]), request["rows"]
    model, tokenizer = load_model(bundle, resolve_device(request["device"]))
    evaluation = evaluate(model, tokenizer, rows, task, eval_cfg, desc="deployed eval")
    evaluation.add_size(size_on_disk(bundle))

    sample = rows[:request["smoke_prompts"]]
    start = time.perf_counter()
    answers = decoding.generate(model, tokenizer, Prompting().prompts(tokenizer, sample, task),
                                max_new_tokens=request["max_new_tokens"], batch_size=1)
    latency = (time.perf_counter() - start) / len(sample)
    passed = sum(answer in task.check.choices for answer in answers)
    report = evaluation.report()
    report["smoke"] = [{"input": task.template.format(**row), "answer": answer, "label": data.label(row, task)}
                       for row, answer in zip(sample, answers)]
    Path(result_path).write_text(json.dumps({
        "journey_entry": evaluation.journey_entry("deployed"), "report": report,
        "pass_rate": passed / len(sample), "latency_s": latency}))


def model_card(task: TaskConfig, upstream: dict[str, StageResult], journey: list[dict]) -> str:
    compress = upstream["compress"].journey[0].get("scheme", "")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [distilflow, distillation, compressed-tensors]
---

# {task.data.stem} model, distilled by distilflow

**Task:** answer with one of {", ".join(f"`{c}`" for c in task.check.choices)}.
**Student:** {upstream["distill"].summary.strip()}
**Compression:** {compress}

## Journey

Task score is accuracy on the {task.eval_size} held-out examples; retention is the score over the teacher's.

{journey_table(journey)}

## Serving

```bash
vllm serve . --served-model-name {task.data.stem}
```

The checkpoint is compressed-tensors: vLLM and `transformers` load it without extra arguments.
Ask with the system prompt and template the model was trained on:
system: `{task.system_prompt}`; user: `{task.template}`.

## Limits

Trained on {task.data.name} only; answers outside its labels are not meaningful.

{upstream["prototype"].summary}
"""


if __name__ == "__main__":
    _smoke_main(*sys.argv[1:3])
