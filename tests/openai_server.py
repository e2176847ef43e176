"""A small OpenAI-compatible chat server for tests: real transformers generation on a local model.

It implements what distilflow's HTTP teacher relies on, the way vLLM does:
- GET /v1/models; POST /v1/chat/completions with messages, temperature, max_tokens, seed, the
  model's own chat template, usage counts;
- vLLM's `structured_outputs: {"choice": [...]}`: the answer is decoded token by token among the
  choices' tokens (guided decoding); other structured outputs are refused with 400, as a server
  without them would;
- a bearer API key (--api-key); for the client's retries and timeouts, POST /test/fail-next
  {"count": N} answers the next N completion requests with 503, and POST /test/slow-next
  {"count": N, "seconds": S} delays them by S seconds.

    python tests/openai_server.py --model tests/assets/tiny-teacher --port 8011 [--api-key KEY]
"""

import argparse
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM, AutoTokenizer


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields this server does not use

    model: str
    messages: list[dict]
    temperature: float = 1.0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    structured_outputs: dict | None = None
    response_format: dict | None = None


class FailNext(BaseModel):
    count: int


class SlowNext(BaseModel):
    count: int
    seconds: float


def choice_constraint(tokenizer, choices: list[str], prompt_length: int):
    """prefix_allowed_tokens_fn that lets the model write exactly one of ``choices``, then end its turn."""
    sequences = [tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for c in choices]

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        written = input_ids[prompt_length:].tolist()
        continuing = {s[len(written)] for s in sequences if len(s) > len(written) and s[:len(written)] == written}
        return sorted(continuing) or [tokenizer.eos_token_id]

    return allowed


def make_app(model_dir: str, served_name: str, api_key: str | None) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lock = threading.Lock()  # one generation at a time, like one accelerator
    failures = {"pending": 0}
    delays = {"pending": 0, "seconds": 0.0}
    app = FastAPI()

    def authorize(authorization: str | None) -> None:
        if api_key is not None and authorization != f"Bearer {api_key}":
            raise HTTPException(401, detail={"message": "invalid API key"})

    @app.get("/v1/models")
    def models(authorization: str | None = Header(None)):
        authorize(authorization)
        return {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "tests"}]}

    @app.post("/test/fail-next")
    def fail_next(request: FailNext):
        failures["pending"] = request.count
        return {"ok": True}

    @app.post("/test/slow-next")
    def slow_next(request: SlowNext):
        delays.update(pending=request.count, seconds=request.seconds)
        return {"ok": True}

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest, authorization: str | None = Header(None)):
        authorize(authorization)
        with lock:
            if failures["pending"] > 0:
                failures["pending"] -= 1
                raise HTTPException(503, detail={"message": "overloaded, try again"})
            delay = delays["seconds"] if delays["pending"] > 0 else 0.0
            delays["pending"] = max(0, delays["pending"] - 1)
        time.sleep(delay)
        if request.model != served_name:
            raise HTTPException(404, detail={"message": f"model {request.model!r} does not exist"})
        structured = request.structured_outputs or {}
        if request.response_format or set(structured) - {"choice"}:
            raise HTTPException(400, detail={"message": "this server supports only structured_outputs.choice"})
        prompt = tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        length = inputs.input_ids.shape[1]
        sampling = {"do_sample": True, "temperature": request.temperature, "top_k": None, "top_p": None} \
            if request.temperature > 0 else {"do_sample": False}
        constraint = {"prefix_allowed_tokens_fn": choice_constraint(tokenizer, structured["choice"], length)} \
            if "choice" in structured else {}
        with lock, torch.no_grad():
            if request.seed is not None:
                torch.manual_seed(request.seed)
            out = model.generate(**inputs, max_new_tokens=request.max_completion_tokens or request.max_tokens or 64,
                                 pad_token_id=tokenizer.pad_token_id, **sampling, **constraint)
        new = out[0, length:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": served_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if tokenizer.eos_token_id in new.tolist() else "length"}],
                "usage": {"prompt_tokens": length, "completion_tokens": len(new), "total_tokens": length + len(new)}}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local Hugging Face model dir")
    parser.add_argument("--served-model-name", default="tiny-teacher")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    uvicorn.run(make_app(args.model, args.served_model_name, args.api_key), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
