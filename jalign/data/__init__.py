"""Data: JSONL formats and the built-in tiny task, tokenizers, chat templates, grain pipelines.

    examples, skipped = load_source(cfg.data.train, "sft", cfg.data.skip_bad_lines, seed=cfg.data.seed)
    tok = load_tokenizer(cfg.model.tokenizer)
    records, counts = tokenize_sft(examples, tok, cfg.data.chat_template, seq_len=cfg.data.seq_len)
    it = make_sft_iterator(records, seq_len=..., batch_rows_per_process=..., packing=..., ...)

No JAX import here: the data side runs before (and independently of) device work.
"""
from jalign.data.chat import (ChatTemplateError, encode_conversation, encode_pair, encode_prompt,
                              get_template, render_prompt)
from jalign.data.formats import (DataError, PreferenceExample, PromptExample, RewardExample, SFTExample,
                                 read_jsonl)
from jalign.data.packing import pad_row, sft_ids, to_record, tokenize_preference, tokenize_sft
from jalign.data.pipeline import (PreferenceData, SFTData, count_tokens, make_eval_iterator,
                                  make_preference_iterator, make_sft_iterator)
from jalign.data.tiny import answer_for, exact_match_reward, load_source, preference_pairs
from jalign.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer", "ChatTemplateError", "DataError", "HFTokenizer", "PreferenceData", "PreferenceExample", "PromptExample",
    "RewardExample", "SFTData", "SFTExample", "answer_for", "count_tokens", "encode_conversation", "encode_pair",
    "encode_prompt", "exact_match_reward", "get_template", "load_source", "load_tokenizer",
    "make_eval_iterator", "make_preference_iterator", "make_sft_iterator", "pad_row", "preference_pairs",
    "read_jsonl", "render_prompt", "sft_ids", "to_record", "tokenize_preference", "tokenize_sft",
]
