"""How a model answers a prompt: constrained choice among labels, or free generation."""

import copy

import torch
from tqdm.auto import tqdm


def _common_prefix_length(sequences: list[list[int]]) -> int:
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return shortest


@torch.no_grad()
def choice_logprobs(model, tokenizer, prompts: list[str], choices: list[str], *, batch_size: int = 16,
                    desc: str | None = None) -> torch.Tensor:
    """Log-likelihood of each choice, followed by the chat template's end of turn, after each prompt.

    Returns a (len(prompts), len(choices)) tensor. The prefix all prompts share (system prompt,
    few-shot examples) runs through the model once, each prompt's own tail once, and only the
    choice tokens once per choice, all reusing the KV cache (as vLLM's prefix caching does). Tails of
    equal length run ``batch_size`` at a time: no padding, so each row is computed as it is alone.
    """
    choice_ids = choice_token_ids(tokenizer, choices)
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    # Keep at least one token per prompt outside the shared prefix: it predicts the first choice token.
    shared = min(_common_prefix_length(prompt_ids), min(len(p) for p in prompt_ids) - 1)
    prefix_cache = _prefill(model, [prompt_ids[0][:shared]], cache=None)[0] if shared else None
    tails = [ids[shared:] for ids in prompt_ids]
    scores = torch.empty(len(prompts), len(choices))
    for batch in tqdm(equal_length_batches(tails, batch_size), desc=desc, disable=desc is None):
        cache = copy.deepcopy(prefix_cache)
        if cache is not None:
            cache.batch_repeat_interleave(len(batch))
        cache, next_logits = _prefill(model, [tails[i] for i in batch], cache)
        scores[batch] = _score_choices(model, cache, next_logits, shared + len(tails[batch[0]]), choice_ids)
    return scores


@torch.no_grad()
def shared_prefix_choice_logprobs(model, tokenizer, prompts: list[str], choices: list[str]) -> torch.Tensor:
    """``choice_logprobs`` for a few prompts that share a long prefix and differ in short tails (an input and its
    content-free twins, shown the same examples), in three forward passes whatever the tails' lengths: the prefix
    once, then every tail as one right-padded batch, then every choice after every tail, each at its tail's own
    positions with the other tails' padding masked out (as each prompt alone would be computed)."""
    choice_ids = choice_token_ids(tokenizer, choices)
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    # Keep at least one token per prompt outside the shared prefix: it predicts the first choice token.
    shared = min(_common_prefix_length(prompt_ids), min(len(p) for p in prompt_ids) - 1)
    cache = _prefill(model, [prompt_ids[0][:shared]], cache=None)[0] if shared else None
    tails = [ids[shared:] for ids in prompt_ids]
    width = max(len(tail) for tail in tails)
    attention = torch.zeros(len(tails), shared + width, dtype=torch.long)
    attention[:, :shared] = 1
    inputs = torch.zeros(len(tails), width, dtype=torch.long)
    for row, tail in enumerate(tails):
        inputs[row, :len(tail)] = torch.tensor(tail)
        attention[row, shared:shared + len(tail)] = 1
    if cache is not None:
        cache.batch_repeat_interleave(len(tails))
    out = model(input_ids=inputs.to(model.device), attention_mask=attention.to(model.device), past_key_values=cache,
                use_cache=True)
    last = torch.tensor([len(tail) - 1 for tail in tails])
    scores = out.logits[torch.arange(len(tails)), last].float().log_softmax(-1)[:, [c[0] for c in choice_ids]].cpu()
    rest = max(len(c) for c in choice_ids) - 1
    if rest == 0:
        return scores
    # row p * count + c: prompt p continued by choice c (all but its last token, which is only predicted)
    count = len(choice_ids)
    inputs = torch.zeros(len(tails) * count, rest, dtype=torch.long)
    positions = torch.zeros_like(inputs)
    mask = torch.cat([attention.repeat_interleave(count, 0), torch.zeros(len(inputs), rest, dtype=torch.long)], 1)
    for p, tail in enumerate(tails):
        for c, ids in enumerate(choice_ids):
            inputs[p * count + c, :len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
            positions[p * count + c] = shared + len(tail) + torch.arange(rest)
            mask[p * count + c, shared + width:shared + width + len(ids) - 1] = 1
    out.past_key_values.batch_repeat_interleave(count)
    logprobs = model(input_ids=inputs.to(model.device), attention_mask=mask.to(model.device),
                     position_ids=positions.to(model.device), past_key_values=out.past_key_values,
                     use_cache=True).logits.float().log_softmax(-1).cpu()
    for p in range(len(tails)):
        for c, ids in enumerate(choice_ids):
            scores[p, c] += sum(logprobs[p * count + c, j, token].item() for j, token in enumerate(ids[1:]))
    return scores


def equal_length_batches(sequences: list[list[int]], size: int) -> list[list[int]]:
    """Indices of ``sequences``, grouped by length, at most ``size`` to a group."""
    by_length: dict[int, list[int]] = {}
    for index, sequence in enumerate(sequences):
        by_length.setdefault(len(sequence), []).append(index)
    return [group[start:start + size] for group in by_length.values() for start in range(0, len(group), size)]


def _prefill(model, rows: list[list[int]], cache):
    """Run the equally long ``rows`` after ``cache``; returns the grown cache and each row's next-token logits."""
    out = model(input_ids=torch.tensor(rows, device=model.device), past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1]


def _score_choices(model, cache, next_logits, past_length: int, choice_ids: list[list[int]]) -> torch.Tensor:
    """Sum of log-probs of each choice's tokens, continuing each prompt held in ``cache`` (one row each)."""
    device = model.device
    first_logprobs = next_logits.float().log_softmax(-1)
    scores = first_logprobs[:, [c[0] for c in choice_ids]]
    width = max(len(c) for c in choice_ids) - 1
    if width == 0:
        return scores.cpu()
    prompts, count = len(next_logits), len(choice_ids)
    inputs = torch.zeros(count, width, dtype=torch.long, device=device)
    attention = torch.ones(count, past_length + width, dtype=torch.long, device=device)
    for row, ids in enumerate(choice_ids):
        inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1], device=device)
        attention[row, past_length + len(ids) - 1:] = 0
    cache.batch_repeat_interleave(count)  # row p * count + c: prompt p continued by choice c
    logits = model(input_ids=inputs.repeat(prompts, 1), attention_mask=attention.repeat(prompts, 1),
                   past_key_values=cache, use_cache=True).logits
    logprobs = logits.float().log_softmax(-1)
    for row, ids in enumerate(choice_ids):
        targets = torch.tensor(ids[1:], device=device).expand(prompts, -1)
        scores[:, row] += logprobs[row::count, :len(ids) - 1].gather(-1, targets[..., None]).sum((1, 2))
    return scores.cpu()


def choice_token_ids(tokenizer, choices: list[str]) -> list[list[int]]:
    """Each choice as the model writes it to the end of its turn: the tokens a choice's log-likelihood sums."""
    end = turn_end(tokenizer)
    return [tokenizer(c + end, add_special_tokens=False).input_ids for c in choices]


def turn_end(tokenizer) -> str:
    """The text the chat template puts right after an assistant answer, e.g. ``<|im_end|>``."""
    if tokenizer.chat_template is None:
        return tokenizer.eos_token or ""
    marker = "\x00answer\x00"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False)
    return rendered.split(marker, 1)[1].strip()


def choose(model, tokenizer, prompts: list[str], choices: list[str], *,
           calibration_prompts: list[str] = (), temperature: float = 0.0, num_samples: int = 1,
           seed: int = 0, desc: str | None = None) -> list[list[str]]:
    """Answer each prompt with one of ``choices`` by each choice's full log-likelihood (constrained choice).

    ``calibration_prompts`` are the same prompts with content-free inputs ("N/A"); their mean scores
    are subtracted (contextual calibration), which removes a small model's bias toward some labels.
    Temperature 0 takes the best choice; above 0, ``num_samples`` choices are sampled per prompt.
    """
    scores = calibrated_choice_scores(model, tokenizer, prompts, choices, calibration_prompts=calibration_prompts,
                                      desc=desc)
    return pick(scores, choices, temperature=temperature, num_samples=num_samples, seed=seed)


def calibrated_choice_scores(model, tokenizer, prompts: list[str], choices: list[str], *,
                             calibration_prompts: list[str] = (), desc: str | None = None) -> torch.Tensor:
    """Each choice's log-likelihood after each prompt, less its mean over ``calibration_prompts`` (if any).

    Their softmax over the choices is the model's calibrated probability of each answer.
    """
    scores = choice_logprobs(model, tokenizer, prompts, choices, desc=desc)
    if calibration_prompts:
        scores = scores - choice_logprobs(model, tokenizer, list(calibration_prompts), choices).mean(0)
    return scores


def pick(scores: torch.Tensor, choices: list[str], calibration: torch.Tensor | None = None, *,
         temperature: float = 0.0, num_samples: int = 1, seed: int = 0) -> list[list[str]]:
    """The choices ``scores`` (prompts x choices log-likelihoods) make: calibrated by the mean scores of
    content-free prompts where given, then the best one, or ``num_samples`` sampled at ``temperature``."""
    if calibration is not None:
        scores = scores - calibration.mean(0)
    if temperature == 0:
        return [[choices[i]] * num_samples for i in scores.argmax(1).tolist()]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.multinomial((scores / temperature).softmax(1), num_samples, replacement=True, generator=generator)
    return [[choices[i] for i in row] for row in picks.tolist()]


def answer(model, tokenizer, prompts: list[str], check, *, calibration_prompts: list[str] = (),
           temperature: float = 0.0, num_samples: int = 1, seed: int = 0, max_new_tokens: int = 64,
           desc: str | None = None) -> list[list[str]]:
    """``num_samples`` answers per prompt, in the form ``check`` (a ``task.check``) asks for.

    A `choice` check is answered by constrained choice (calibrated by ``calibration_prompts``); every
    other check by free generation, which the check then filters.
    """
    if check.type == "choice":
        return choose(model, tokenizer, prompts, check.choices, calibration_prompts=calibration_prompts,
                      temperature=temperature, num_samples=num_samples, seed=seed, desc=desc)
    return sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                  num_samples=num_samples, seed=seed, desc=desc)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
           num_samples: int = 1, seed: int = 0, batch_size: int | None = None,
           desc: str | None = None) -> list[list[str]]:
    """Free-form answers, ``num_samples`` per prompt (greedy at temperature 0), batched with left padding
    (``generation_batch_size`` prompts at a time unless ``batch_size`` says)."""
    batch_size = batch_size or generation_batch_size(model.device)
    # Greedy answers are all alike: generate one and repeat it, as `choose` does.
    per_prompt = num_samples if temperature > 0 else 1
    sampling = {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": None} if temperature > 0 \
        else {"do_sample": False}
    torch.manual_seed(seed)
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False).to(model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             num_return_sequences=per_prompt, **sampling)
        texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
        answers += [[t.strip() for t in texts[i:i + per_prompt]] * (num_samples // per_prompt)
                    for i in range(0, len(texts), per_prompt)]
    return answers


def generation_batch_size(device: torch.device) -> int:
    """Prompts generated at once: a GPU's decode step costs about the same for 64 sequences as for one, a
    CPU's grows with each."""
    return 64 if device.type == "cuda" else 8


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int | None = None) -> list[str]:
    """Greedy free-form answers, one per prompt."""
    return [a[0] for a in sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)]
