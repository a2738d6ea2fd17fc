"""The data layer: sources, formats, tokenizers, chat templates, records, rows and grain iterators.

    examples, skipped = load_source(cfg.data.train, "sft", cfg.data.skip_bad_lines, seed=cfg.data.seed)
    tok = load_tokenizer(cfg.model.tokenizer)
    records, counts = tokenize_sft(examples, tok, cfg.data.chat_template, seq_len=cfg.data.seq_len)
    it = make_sft_iterator(records, seq_len=..., batch_rows_per_process=..., packing=..., ...)

Data kinds built from a config: :class:`SFTData`, :class:`PairData` (preference pairs, [B, 2, T]),
:class:`ScoredData` (attribute regression), :class:`PromptSet` / :class:`PromptIterator` (RL prompts); each
declares its batch fields with logical axes (``jalign.data.fields``). Precomputed columns (e.g. reference
log-probs) join stored per-example values into batches (``jalign.data.columns``). No JAX import here: the data
side runs before (and independently of) device work.
"""
from jalign.data.chat import (ChatTemplateError, encode_conversation, encode_pair, encode_prompt,
                              get_template, render_prompt)
from jalign.data.columns import PrecomputedColumns
from jalign.data.formats import (DataError, PreferenceExample, PromptExample, RewardExample, SFTExample,
                                 read_jsonl)
from jalign.data.packing import pad_row, sft_ids, to_record, tokenize_sft
from jalign.data.pipeline import SFTData, count_tokens, make_eval_iterator, make_sft_iterator
from jalign.data.preference import PairData, ScoredData, tokenize_pairs, tokenize_scored
from jalign.data.prompts import PromptIterator, PromptSet
from jalign.data.sources import load_source
from jalign.data.tiny import answer_for, exact_match_reward, preference_pairs
from jalign.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer", "ChatTemplateError", "DataError", "HFTokenizer", "PairData", "PrecomputedColumns",
    "PreferenceExample", "PromptExample", "PromptIterator", "PromptSet", "RewardExample", "SFTData", "SFTExample",
    "ScoredData", "answer_for", "count_tokens", "encode_conversation", "encode_pair", "encode_prompt",
    "exact_match_reward", "get_template", "load_source", "load_tokenizer", "make_eval_iterator",
    "make_sft_iterator", "pad_row", "preference_pairs", "read_jsonl", "render_prompt", "sft_ids", "to_record",
    "tokenize_pairs", "tokenize_scored", "tokenize_sft",
]
