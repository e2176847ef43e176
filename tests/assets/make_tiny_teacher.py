"""Builds tests/assets/tiny-teacher: a randomly initialised Llama with a BPE tokenizer trained offline.

Small enough to commit and to run the whole pipeline in seconds; shaped like the embedded teacher
(ChatML chat template, tied embeddings, grouped KV heads). Deterministic:
    python tests/assets/make_tiny_teacher.py
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).parent
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    rows = [json.loads(line) for line in (HERE.parent.parent / "configs/data/support_tickets.jsonl").open()]
    extra = ["system", "user", "assistant", "Ticket: ", "Classify the ticket. Answer with the queue name only.",
             "payment delivery bug account N/A [MASK]"]
    return [r["text"] for r in rows] + extra


def make_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML)


def make_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


if __name__ == "__main__":
    out = HERE / "tiny-teacher"
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")
