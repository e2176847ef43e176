"""Constrained choice scoring equals the plain full-sequence computation, only cheaper."""

import pytest
import torch

from distilflow.tasks import decoding

CHOICES = ["payment", "delivery", "bug", "account"]


def full_sequence_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = prompt_ids + tokenizer(answer, add_special_tokens=False).input_ids
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(len(prompt_ids), len(ids)))


def chat_prompt(tokenizer, text: str) -> str:
    chat = [{"role": "system", "content": "Classify."}, {"role": "user", "content": text}]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_turn_end_is_read_from_the_chat_template(tiny_teacher):
    _, tokenizer = tiny_teacher
    assert decoding.turn_end(tokenizer) == "<|im_end|>"


def test_choice_logprobs_match_full_sequence_scoring(tiny_teacher):
    model, tokenizer = tiny_teacher
    texts = ["my card was charged twice", "parcel lost", "app crashes", "parcel late", "parcel gone", "app freezes"]
    prompts = [chat_prompt(tokenizer, t) for t in texts]
    fast = decoding.choice_logprobs(model, tokenizer, prompts, CHOICES, batch_size=2)
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    assert len(set(lengths)) < len(lengths) - 1  # tails batched together, some in more than one batch
    for i, prompt in enumerate(prompts):
        for j, choice in enumerate(CHOICES):
            expected = full_sequence_logprob(model, tokenizer, prompt, choice + "<|im_end|>")
            assert abs(fast[i, j].item() - expected) < 1e-3


def test_single_prompt_is_scored_too(tiny_teacher):
    model, tokenizer = tiny_teacher
    prompt = chat_prompt(tokenizer, "hello")
    fast = decoding.choice_logprobs(model, tokenizer, [prompt], CHOICES)
    assert abs(fast[0, 0].item() - full_sequence_logprob(model, tokenizer, prompt, "payment<|im_end|>")) < 1e-3


def test_greedy_choice_is_the_best_scored(tiny_teacher):
    model, tokenizer = tiny_teacher
    prompts = [chat_prompt(tokenizer, t) for t in ["a", "b"]]
    scores = decoding.choice_logprobs(model, tokenizer, prompts, CHOICES)
    answers = decoding.choose(model, tokenizer, prompts, CHOICES, num_samples=2)
    assert answers == [[CHOICES[i]] * 2 for i in scores.argmax(1).tolist()]


def test_calibration_removes_the_content_free_bias(tiny_teacher):
    model, tokenizer = tiny_teacher
    prompts = [chat_prompt(tokenizer, "N/A")]
    answers = decoding.choose(model, tokenizer, prompts * 4, CHOICES, calibration_prompts=prompts, temperature=1e-3,
                              num_samples=64, seed=1)
    # A content-free input scores 0 for every choice after calibration: all are equally likely.
    assert len(set(answers[0])) > 1


def test_sampling_returns_num_samples_valid_choices_reproducibly(tiny_teacher):
    model, tokenizer = tiny_teacher
    prompts = [chat_prompt(tokenizer, "x")]
    first = decoding.choose(model, tokenizer, prompts, CHOICES, temperature=1.0, num_samples=5, seed=3)
    again = decoding.choose(model, tokenizer, prompts, CHOICES, temperature=1.0, num_samples=5, seed=3)
    assert first == again and len(first[0]) == 5 and set(first[0]) <= set(CHOICES)


def test_generate_returns_one_answer_per_prompt(tiny_teacher):
    model, tokenizer = tiny_teacher
    answers = decoding.generate(model, tokenizer, [chat_prompt(tokenizer, "a"), chat_prompt(tokenizer, "bb cc")],
                                max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_prompts_sharing_a_long_prefix_score_their_choices_as_each_prompt_alone_would(tiny_teacher):
    model, tokenizer = tiny_teacher
    prefix = "<|im_start|>system\nClassify the ticket.<|im_end|>\n<|im_start|>user\nTicket: "
    prompts = [prefix + tail + "<|im_end|>\n<|im_start|>assistant\n" for tail in ("my card was charged twice", "N/A", "")]
    choices = ["payment", "delivery", "bug", "account"]
    together = decoding.shared_prefix_choice_logprobs(model, tokenizer, prompts, choices)
    alone = torch.cat([decoding.choice_logprobs(model, tokenizer, [prompt], choices) for prompt in prompts])
    assert together == pytest.approx(alone, abs=1e-4)
