"""Stage 4, deploy: the bundle an operations team ships, proven by a smoke test in a fresh process.

The bundle is a Hugging Face model directory (so `vllm serve BUNDLE` and `from_pretrained(BUNDLE)`
work on it as is) plus the model card, the journey, the eval report and a sha256 manifest.
"""

import json
import shutil
from pathlib import Path

from transformers import GenerationConfig

from distilflow.configs.schema import DeployConfig, TaskConfig
from distilflow.tasks.artifacts import StageResult, write_manifest
from distilflow.tasks.context import StageContext
from distilflow.tasks.evaluate import evaluate_in_fresh_process, journey_table


def run(cfg: DeployConfig, upstream: dict[str, StageResult], ctx: StageContext) -> StageResult:
    bundle = ctx.out_dir / "bundle"
    shutil.copytree(upstream["compress"].path("model"), bundle)
    write_generation_config(bundle, cfg)

    smoke = evaluate_in_fresh_process(bundle, ctx.examples.eval, ctx.task, ctx.eval, ctx.device,
                                      smoke_prompts=cfg.smoke_prompts, max_new_tokens=cfg.max_new_tokens)
    deployed = {**smoke.journey_entry("deployed"), "smoke_pass_rate": smoke.metrics["smoke_pass_rate"],
                "smoke_latency_s": smoke.metrics["smoke_latency_s"]}
    journey = [entry for stage in ("prototype", "distill", "compress") for entry in upstream[stage].journey]
    journey.append(deployed)
    (bundle / "journey.json").write_text(json.dumps(journey, indent=1))
    (bundle / "eval_report.json").write_text(json.dumps(smoke.report(), indent=1))
    (bundle / "README.md").write_text(model_card(ctx.task, upstream, journey))
    write_manifest(bundle)

    metrics = {f"deployed.{k}": v for k, v in smoke.metrics.items()}
    ctx.tracker.log_metrics(metrics)
    for name in ("manifest.json", "journey.json", "README.md", "eval_report.json"):
        ctx.tracker.log_artifact(bundle / name, "bundle")
    return StageResult(stage="deploy", files={"bundle": "bundle"}, metrics=metrics, journey=[deployed],
                       summary=f"Bundle ready; smoke test pass rate {deployed['smoke_pass_rate']:.2f}\n")


def write_generation_config(bundle: Path, cfg: DeployConfig) -> None:
    """Greedy, short answers: what the task needs from a server that reads generation_config.json."""
    config = GenerationConfig.from_pretrained(bundle) if (bundle / "generation_config.json").exists() \
        else GenerationConfig()
    config.update(do_sample=False, max_new_tokens=cfg.max_new_tokens, temperature=None, top_p=None, top_k=None)
    config.save_pretrained(bundle)


def model_card(task: TaskConfig, upstream: dict[str, StageResult], journey: list[dict]) -> str:
    compress = next(e for e in upstream["compress"].journey if e["state"] == "quantized").get("scheme", "")
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

{upstream["compress"].summary}
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
