"""Benchmark 6: decode speed and time to first token of a deployed checkpoint vs its bf16 original,
at batch 1 and 32, with what each token must read from memory and the bound that sets.

No runtime with W4A16/FP8 kernels (vLLM, TensorRT-LLM) runs on the lent GPU, so what is measured is
Hugging Face `generate` (Python-bound at this model size: a floor, not a serving speed); the
bandwidth bound (weight bytes read per decode step / measured copy bandwidth) is what a kernel that
reads the packed weights directly could approach. Prints one JSON object.

    python tests/benchmarks/bench_deployed_speed.py BF16_DIR QUANTIZED_DIR [--device cuda]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "Ticket: My parcel was delivered to the wrong address in Porto. Thanks."


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def copy_bandwidth(device: str) -> float:
    """Bytes/s a device-to-device copy moves (read + write), the ceiling of a memory-bound decode."""
    if device != "cuda":
        return float("nan")
    data = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    out = torch.empty_like(data)
    for _ in range(3):
        out.copy_(data)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        out.copy_(data)
    torch.cuda.synchronize()
    return 2 * data.numel() * 10 / (time.perf_counter() - start)


@torch.no_grad()
def decode_speed(model, tokenizer, batch: int, new_tokens: int, device: str) -> dict:
    chat = [{"role": "user", "content": PROMPT}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer([text] * batch, return_tensors="pt", add_special_tokens=False).to(device)

    def run(n: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(4)
    ttft = min(run(1) for _ in range(3))
    total = run(new_tokens)
    return {"batch": batch, "ttft_s": ttft, "decode_tokens_per_s": batch * (new_tokens - 1) / (total - ttft)}


def measure(model_dir: Path, device: str, new_tokens: int) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    return {"model": str(model_dir), "weight_bytes": weight_bytes(model_dir),
            "runs": [decode_speed(model, tokenizer, batch, new_tokens, device) for batch in (1, 32)]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bf16_dir", type=Path)
    parser.add_argument("quantized_dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    bandwidth = copy_bandwidth(args.device)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "copy_bandwidth_bytes_per_s": bandwidth, "models": []}
    for model_dir in (args.bf16_dir, args.quantized_dir):
        result = measure(model_dir, args.device, args.new_tokens)
        # Each decode step of a memory-bound batch reads every weight once.
        result["bandwidth_bound_steps_per_s"] = bandwidth / result["weight_bytes"]
        results["models"].append(result)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
