"""A user's own small model as a Hugging Face directory: a BPE tokenizer trained here, a ChatML chat template and
a random tiny Llama saved by transformers (safetensors). No download."""
from __future__ import annotations

import json
from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "what is the capital of france? paris.",
          "user assistant system 12+34=46", "hello world, how are you today?"]


def make_tokenizer(path, vocab_size: int = 320) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def make_llama(path, vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    return Path(path)


def make_model_dir(path) -> Path:
    """Tokenizer files and a random Llama whose vocabulary covers them, in one directory."""
    from jalign.data.tokenizer import load_tokenizer

    make_tokenizer(path)
    return make_llama(path, vocab_size=load_tokenizer(str(path)).id_limit)
