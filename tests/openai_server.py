"""A small OpenAI-compatible server for tests: real transformers forward passes on a local model.

It answers what distilflow's HTTP teacher relies on with vLLM's request and response shapes:
- GET /v1/models: vLLM's model card (id, `root` = the model directory, `max_model_len`, ...);
- POST /v1/chat/completions with messages, temperature, max_tokens, seed, the model's own chat
  template, usage counts; vLLM's `structured_outputs: {"choice": [...]}` decodes token by token among
  the choices' tokens (guided decoding); other structured outputs are refused with 400, as a server
  without them would;
- POST /v1/completions with `prompt` as text or token ids (one sequence or a list of them) and vLLM's
  `prompt_logprobs: k`: for every prompt position after the first, a map token id -> {logprob, rank,
  decoded_token} holding the prompt's own token (with its rank) and the k most likely ones (k = 0:
  the prompt's token only; -1: the whole vocabulary); k above --max-logprobs (vLLM's default 20) is
  refused with vLLM's message;
- POST /tokenize (vLLM's, outside /v1): text or chat messages to token ids;
- errors as vLLM writes them: {"error": {"message", "type", "param", "code"}}; a bearer API key
  (--api-key) on /v1 routes.

For failure tests: POST /test/fail-next {"count": N} answers the next N completion requests with 503;
POST /test/slow-next {"count": N, "seconds": S} delays them; --no-prompt-logprobs serves completions
as a server without vLLM's extension does (the field is ignored); --exit-at-request N makes the
process exit, answering nothing, when its Nth completion request arrives (a server that dies mid-stage);
POST /test/fault {"fault": KIND, "after": N} answers with what no OpenAI-compatible server should (FAULTS: a body
that is not JSON, JSON of another shape, a proxy's HTML page, an answer cut off mid-stream) once N more completion
requests were answered (N = 0: at once, the model list and /tokenize included; "fault": null ends it);
--ssl-certfile/--ssl-keyfile serve HTTPS.

    python tests/openai_server.py --model tests/assets/tiny-teacher --port 8011 [--api-key KEY]
"""

import argparse
import os
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM, AutoTokenizer

ERROR_TYPES = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError", 503: "ServiceUnavailableError"}


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields this server does not use

    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


class ChatRequest(OpenAIRequest):
    messages: list[dict]
    max_completion_tokens: int | None = None
    structured_outputs: dict | None = None
    response_format: dict | None = None


class CompletionRequest(OpenAIRequest):
    prompt: list[int] | list[list[int]] | str | list[str]
    max_tokens: int | None = 16
    prompt_logprobs: int | None = None
    echo: bool = False
    logprobs: int | None = None
    add_special_tokens: bool = True


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None  # vLLM: True for a prompt, False for messages
    return_token_strs: bool = False


class FailNext(BaseModel):
    count: int


class SlowNext(BaseModel):
    count: int
    seconds: float


class Fault(BaseModel):
    fault: str | None
    after: int = 0


# What a broken server, or something else listening at base_url, answers with status 200.
FAULTS = {
    "not-json": ("application/json", "upstream connect error or disconnect/reset before headers"),
    "wrong-shape": ("application/json", '{"model": "tiny-teacher", "response": "payment", "done": true}'),
    "html": ("text/html", "<!DOCTYPE html><html><head><title>Sign in</title></head><body>Log in to continue to "
                          "the network</body></html>"),
    "truncated": ("application/json", '{"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "te'),
}


class Faulty(Exception):
    """Answer this request with ``FAULTS[kind]``."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class ServerError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def choice_constraint(tokenizer, choices: list[str], prompt_length: int):
    """prefix_allowed_tokens_fn that lets the model write exactly one of ``choices``, then end its turn."""
    sequences = [tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for c in choices]

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        written = input_ids[prompt_length:].tolist()
        continuing = {s[len(written)] for s in sequences if len(s) > len(written) and s[:len(written)] == written}
        return sorted(continuing) or [tokenizer.eos_token_id]

    return allowed


def prompt_logprobs(model, tokenizer, ids: list[int], k: int) -> list[dict | None]:
    """vLLM's prompt log-probs of one sequence: None for the first position, then the prompt's own token
    (with its rank) followed by the top ``k``, keyed by token id (as vLLM builds the map)."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    targets = torch.tensor(ids[1:])
    own = logprobs.gather(-1, targets[:, None])
    ranks = (logprobs >= own).sum(-1)  # vLLM's rank: how many tokens are at least as likely
    top = logprobs.topk(k, dim=-1)
    positions = [None]
    for target, rank, value, top_ids, top_values in zip(targets.tolist(), ranks.tolist(), own[:, 0].tolist(),
                                                        top.indices.tolist(), top.values.tolist()):
        entries = zip([target, *top_ids], [value, *top_values], [rank, *range(1, k + 1)])
        positions.append({str(token): {"logprob": lp, "rank": r, "decoded_token": tokenizer.decode([token])}
                          for token, lp, r in entries})
    return positions


def faulty_answer(kind: str) -> Response:
    """``FAULTS[kind]`` as the response: "truncated" sends its start, then drops the connection (uvicorn aborts
    a response whose body raises), as a server that crashes mid-answer or a proxy that times out does."""
    media_type, body = FAULTS[kind]
    if kind != "truncated":
        return Response(body, media_type=media_type)

    def cut_short():
        yield body.encode()
        raise ConnectionAbortedError("the test server cuts this answer short")

    return StreamingResponse(cut_short(), media_type=media_type)


def make_app(model_dir: str, served_name: str, api_key: str | None, *, max_logprobs: int = 20,
             serves_prompt_logprobs: bool = True, exit_at_request: int | None = None) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    max_model_len = model.config.max_position_embeddings
    lock = threading.Lock()  # one forward pass at a time, like one accelerator
    counts = {"requests": 0, "fail": 0, "slow": 0, "seconds": 0.0}
    fault = {"kind": None, "from": 0}  # the fault, and the request count from which on it answers
    app = FastAPI()

    @app.exception_handler(ServerError)
    def server_error(request: Request, err: ServerError):
        return JSONResponse({"error": {"message": err.message, "type": ERROR_TYPES.get(err.status, "Error"),
                                       "param": err.param, "code": err.status}}, status_code=err.status)

    @app.exception_handler(Faulty)
    def faulty(request: Request, err: Faulty):
        return faulty_answer(err.kind)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, err: RequestValidationError):
        return JSONResponse({"error": {"message": str(err.errors()), "type": "BadRequestError", "param": None,
                                       "code": 400}}, status_code=400)

    def authorize(authorization: str | None) -> None:
        if api_key is not None and authorization != f"Bearer {api_key}":
            raise ServerError(401, "Unauthorized")

    def check_model(name: str | None) -> None:
        if name is not None and name != served_name:
            raise ServerError(404, f"The model `{name}` does not exist.", "model")

    def admit() -> None:
        """Count the request; apply injected failures and delays (outside the model's lock)."""
        with lock:
            counts["requests"] += 1
            if exit_at_request is not None and counts["requests"] >= exit_at_request:
                os._exit(1)
            if fault["kind"] is not None and counts["requests"] > fault["from"]:
                raise Faulty(fault["kind"])
            if counts["fail"] > 0:
                counts["fail"] -= 1
                raise ServerError(503, "overloaded, try again")
            delay = counts["seconds"] if counts["slow"] > 0 else 0.0
            counts["slow"] = max(0, counts["slow"] - 1)
        time.sleep(delay)

    def generate(ids: list[int], request: OpenAIRequest, max_new_tokens: int, constraint: dict | None = None) -> list[int]:
        temperature = 1.0 if request.temperature is None else request.temperature
        sampling = {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": None} \
            if temperature > 0 else {"do_sample": False}
        with lock, torch.no_grad():
            if request.seed is not None:
                torch.manual_seed(request.seed)
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling,
                                 **(constraint or {}))
        return out[0, len(ids):].tolist()

    def finish_reason(new: list[int]) -> str:
        return "stop" if tokenizer.eos_token_id in new else "length"

    def faulty_from_the_start() -> None:
        """The model list and /tokenize: faulty with a fault set to answer at once."""
        if fault["kind"] is not None and counts["requests"] >= fault["from"]:
            raise Faulty(fault["kind"])

    @app.get("/v1/models")
    def models(authorization: str | None = Header(None)):
        authorize(authorization)
        faulty_from_the_start()
        return {"object": "list", "data": [{
            "id": served_name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": str(model_dir), "parent": None, "max_model_len": max_model_len,
            "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                            "created": int(time.time())}]}]}

    @app.post("/test/fail-next")
    def fail_next(request: FailNext):
        counts["fail"] = request.count
        return {"ok": True}

    @app.post("/test/fault")
    def set_fault(request: Fault):
        if request.fault is not None and request.fault not in FAULTS:
            raise ServerError(400, f"faults: {sorted(FAULTS)}", "fault")
        fault.update(kind=request.fault, **{"from": counts["requests"] + request.after})
        return {"ok": True}

    @app.post("/test/slow-next")
    def slow_next(request: SlowNext):
        counts.update(slow=request.count, seconds=request.seconds)
        return {"ok": True}

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest, authorization: str | None = Header(None)):
        authorize(authorization)
        admit()
        check_model(request.model)
        structured = request.structured_outputs or {}
        if request.response_format or set(structured) - {"choice"}:
            raise ServerError(400, "this server supports only structured_outputs.choice")
        prompt = tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        constraint = {"prefix_allowed_tokens_fn": choice_constraint(tokenizer, structured["choice"], len(ids))} \
            if "choice" in structured else {}
        new = generate(ids, request, request.max_completion_tokens or request.max_tokens or 64, constraint)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": served_name,
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": tokenizer.decode(new, skip_special_tokens=True)},
                             "finish_reason": finish_reason(new)}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new),
                          "total_tokens": len(ids) + len(new)}}

    def sequences(prompt, add_special_tokens: bool) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        return [tokenizer(p, add_special_tokens=add_special_tokens).input_ids if isinstance(p, str) else p
                for p in prompt]

    def top_k(request: CompletionRequest) -> int | None:
        """The prompt log-probs to return, validated as vLLM does (None: not asked, or not served)."""
        if request.prompt_logprobs is None or not serves_prompt_logprobs:
            return None
        k = len(tokenizer) if request.prompt_logprobs == -1 else request.prompt_logprobs
        if k > max_logprobs:
            raise ServerError(400, f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                   f"{max_logprobs}", "prompt_logprobs")
        return k

    @app.post("/v1/completions")
    def completions(request: CompletionRequest, authorization: str | None = Header(None)):
        authorize(authorization)
        admit()
        check_model(request.model)
        if request.echo or request.logprobs is not None:
            raise ServerError(400, "this server does not implement echo or logprobs (use prompt_logprobs)")
        k = top_k(request)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, ids in enumerate(sequences(request.prompt, request.add_special_tokens)):
            if any(not 0 <= t < len(tokenizer) for t in ids) or not ids:
                raise ServerError(400, "Token id out of vocabulary (or an empty prompt)", "prompt")
            if len(ids) + max(request.max_tokens, 1) > max_model_len:
                raise ServerError(400, f"This model's maximum context length is {max_model_len} tokens.", "prompt")
            new = generate(ids, request, request.max_tokens) if request.max_tokens else []
            logprobs = None
            if k is not None:
                with lock:
                    logprobs = prompt_logprobs(model, tokenizer, ids, k)
            choices.append({"index": index, "text": tokenizer.decode(new, skip_special_tokens=True),
                            "logprobs": None, "finish_reason": finish_reason(new), "stop_reason": None,
                            "prompt_logprobs": logprobs})
            prompt_tokens, completion_tokens = prompt_tokens + len(ids), completion_tokens + len(new)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/tokenize")
    def tokenize(request: TokenizeRequest):
        faulty_from_the_start()
        check_model(request.model)
        if request.messages is not None:
            text = tokenizer.apply_chat_template(request.messages, tokenize=False,
                                                 add_generation_prompt=request.add_generation_prompt,
                                                 continue_final_message=request.continue_final_message)
            special = bool(request.add_special_tokens)
        elif request.prompt is not None:
            text, special = request.prompt, request.add_special_tokens is not False
        else:
            raise ServerError(400, "give prompt or messages", "prompt")
        tokens = tokenizer(text, add_special_tokens=special).input_ids
        return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens,
                "token_strs": tokenizer.convert_ids_to_tokens(tokens) if request.return_token_strs else None}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local Hugging Face model dir")
    parser.add_argument("--served-model-name", default="tiny-teacher")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--max-logprobs", type=int, default=20, help="largest prompt_logprobs served (vLLM's flag)")
    parser.add_argument("--no-prompt-logprobs", action="store_true",
                        help="ignore prompt_logprobs, as a server without vLLM's extension does")
    parser.add_argument("--exit-at-request", type=int, default=None,
                        help="exit, answering nothing, when the Nth completion request arrives")
    parser.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", help="and this private key (PEM)")
    args = parser.parse_args()
    app = make_app(args.model, args.served_model_name, args.api_key, max_logprobs=args.max_logprobs,
                   serves_prompt_logprobs=not args.no_prompt_logprobs, exit_at_request=args.exit_at_request)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ssl_certfile=args.ssl_certfile,
                ssl_keyfile=args.ssl_keyfile)


if __name__ == "__main__":
    main()
