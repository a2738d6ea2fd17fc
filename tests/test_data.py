"""Tests for jalign.data: tokenizers, chat templates + loss masks, JSONL formats, tiny task, pipelines."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from jalign.data import (ByteTokenizer, DataError, HFTokenizer, SFTExample, encode_conversation,
                         encode_pair, load_source, load_tokenizer, make_eval_iterator, make_sft_iterator,
                         read_jsonl, render_prompt, tokenize_sft)
from jalign.data.chat import ChatTemplateError, get_template
from jalign.data.tokenizer import TokenizerError
from jalign.data.tiny import (addition, addition_sloppy, answer_for, exact_match_reward, preference_pairs,
                              split_of, wrong_answer)

# ---- real chat templates (verbatim from the model repos) ------------------------------------------
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|im_start|>", "<|im_end|>", "<s>", "</s>", "[INST]", "[/INST]"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
     {"role": "assistant", "content": "Hi! "}, {"role": "user", "content": "the quick brown fox?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "ünïcode ✓"}, {"role": "assistant", "content": "fine\n"}],
]


def make_hf_dir(path, template, bos="<|begin_of_text|>", eos="<|eot_id|>", gen_eos=None, post_bos=False):
    """A Hugging Face tokenizer directory: a byte-level BPE trained on a tiny corpus + configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps", "user assistant system 2+2=4"] * 20,
                            trainer)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": {"__type": "AddedToken", "content": eos, "lstrip": False,
                                                 "normalized": False, "rstrip": False, "single_word": False,
                                                 "special": True}, "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if gen_eos is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": gen_eos}))
    return path


# ---- tokenizers ---------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.vocab_size <= 384 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "héllo ✓ 37+48=85\n"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|user|>hi<|assistant|>ok<|eos|>", add_special=True)
    assert ids[0] == tok.bos_id and ids[1] == tok.token_to_id("<|user|>") and ids[-1] == tok.eos_id
    assert len(ids) == 1 + 1 + 2 + 1 + 2 + 1  # each special is one token
    assert tok.decode(ids) == "hiok"
    assert tok.decode(ids, skip_special=False) == "<|bos|><|user|>hi<|assistant|>ok<|eos|>"
    assert max(tok.encode("\xff" * 3 + "é")) < tok.vocab_size and set(tok.special_ids) >= {0, 1, 2}


def test_hf_tokenizer_from_dir_and_file(tmp_path):
    d = make_hf_dir(tmp_path / "m", LLAMA3_TEMPLATE, gen_eos=[1, 5], post_bos=True)
    for spec in (str(d), str(d / "tokenizer.json")):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        text = "hello world, the quick brown fox"
        assert tok.decode(tok.encode(text)) == text
        assert tok.bos_id == tok.token_to_id("<|begin_of_text|>") and tok.eos_id == tok.token_to_id("<|eot_id|>")
        assert tok.eos_ids == {1, 5} and tok.add_bos and tok.chat_template == LLAMA3_TEMPLATE
        assert tok.encode("hi", add_special=True)[0] == tok.bos_id
        ids = tok.encode("<|im_start|>hello<|im_end|>")
        assert ids[0] == tok.token_to_id("<|im_start|>") and tok.token_to_id("<|im_end|>") in tok.special_ids
        assert tok.decode(ids) == "hello"


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="nope/tokenizer.json"):
        load_tokenizer(str(tmp_path / "nope" / "tokenizer.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'empty'} has no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))


# ---- chat templates -----------------------------------------------------------------------------
@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, QWEN25_TEMPLATE, MISTRAL_TEMPLATE])
def test_chat_template_matches_transformers(tmp_path, template):
    transformers = pytest.importorskip("transformers")
    d = make_hf_dir(tmp_path / "m", template, bos="<s>" if template is MISTRAL_TEMPLATE else "<|begin_of_text|>",
                    eos="</s>" if template is MISTRAL_TEMPLATE else "<|eot_id|>")
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(d))
    tok = load_tokenizer(str(d))
    tpl = get_template("hf", tok)
    convs = CONVERSATIONS if template is not MISTRAL_TEMPLATE else [CONVERSATIONS[0], CONVERSATIONS[2]]
    for conv in convs:
        for gen in (False, True):
            assert tpl.render(conv, gen) == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert render_prompt("What is 2+2?", "hf", tok) == ref.apply_chat_template(
        CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    # A jinja file path renders the same way.
    (tmp_path / "t.jinja").write_text(template)
    assert render_prompt("hi", str(tmp_path / "t.jinja"), tok) == render_prompt("hi", "hf", tok)
    if template is MISTRAL_TEMPLATE:  # its raise_exception: one message naming the template file
        with pytest.raises(ChatTemplateError, match=r"chat template hf \(chat_template in .*/m/tokenizer_config"
                                                    r"\.json\): line 1: refuses the conversation \(roles "
                                                    r"\['assistant'\]\): .*must alternate"):
            tpl.render([{"role": "assistant", "content": "x"}], False)


def test_tiny_template_and_loss_mask_on_response_only():
    tok = ByteTokenizer()
    assert render_prompt("37+48=", "tiny", tok) == "<|user|>37+48=<|assistant|>"
    p, r = encode_pair("37+48=", "85", "tiny", tok)
    assert p[0] == tok.bos_id and tok.decode(p, skip_special=False) == "<|bos|><|user|>37+48=<|assistant|>"
    assert r == tok.encode("85") + [tok.eos_id]
    records, counts = tokenize_sft([SFTExample(prompt="37+48=", response="85")], tok, "tiny", seq_len=64)
    rec = records[0]
    assert counts == {"examples": 1, "truncated": 0, "dropped": 0}
    np.testing.assert_array_equal(rec["tokens"][1:], rec["targets"][:-1])  # shifted by one
    assert list(rec["targets"][rec["loss_mask"] == 1]) == r  # exactly the response tokens + eos
    assert rec["loss_mask"].sum() == len(r) and rec["loss_mask"][-len(r):].all()


def test_multi_turn_loss_only_on_assistant_turns(tmp_path):
    tok = ByteTokenizer()
    conv = CONVERSATIONS[2]
    ids, mask = encode_conversation(conv, "tiny", tok)
    masked = tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    assert masked == "b<|eos|>fine\n<|eos|>"
    assert tok.decode(ids, skip_special=False) == "<|bos|>" + get_template("tiny", tok).render(conv)
    # Qwen template on a real BPE tokenizer: <|im_end|> is the eos, so no extra eos is added.
    d = make_hf_dir(tmp_path / "q", QWEN25_TEMPLATE, eos="<|im_end|>")
    hf = load_tokenizer(str(d))
    ids, mask = encode_conversation(conv, "hf", hf)
    assert hf.decode(ids, skip_special=False) == get_template("hf", hf).render(conv)
    assert hf.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "b<|im_end|>\nfine\n<|im_end|>\n"
    # Preference-style message-list responses: the last assistant turn is the response.
    p, r = encode_pair(conv[:3], [conv[3]], "hf", hf)
    assert hf.decode(r, skip_special=False) == "fine\n<|im_end|>\n" and p + r == ids


def test_overlong_truncate_and_drop():
    tok = ByteTokenizer()
    ex = [SFTExample(prompt="1+1=", response="x" * 30), SFTExample(prompt="y" * 80, response="z")]
    recs, counts = tokenize_sft(ex, tok, "tiny", seq_len=20, overlong="truncate")
    assert counts == {"examples": 1, "truncated": 1, "dropped": 1} and len(recs[0]["tokens"]) == 20
    recs, counts = tokenize_sft(ex, tok, "tiny", seq_len=20, overlong="drop")
    assert counts == {"examples": 0, "truncated": 0, "dropped": 2} and recs == []


# ---- formats ------------------------------------------------------------------------------------
def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("kind,line,reason", [
    ("sft", '{"prompt": "a", "response": ', "malformed JSON"),
    ("sft", '{"prompt": "a"}', 'missing field "response"'),
    ("sft", '{"prompt": "a", "response": 3}', 'field "response" must be a string, got number'),
    ("sft", '{"messages": [{"role": "user"}]}', 'field "messages"[0] is missing "content"'),
    ("sft", '{"messages": [{"role": "user", "content": "x"}]}', 'no "assistant" message'),
    ("sft", '[1, 2]', "expected a JSON object, got list"),
    ("preference", '{"prompt": "a", "chosen": "b"}', 'missing field "rejected"'),
    ("preference", '{"prompt": "a", "chosen": 1, "rejected": "c"}', 'field "chosen" must be a string or a list'),
    ("preference", '{"prompt": "a", "chosen": "b", "rejected": "c", "chosen_reward": "hi"}',
     'field "chosen_reward" must be a finite number'),
    ("reward", '{"prompt": "a", "response": "b", "attributes": {"h": true}}', 'field "attributes.h" must be'),
    ("reward", '{"prompt": "a", "response": "b"}', 'missing field "attributes"'),
    ("prompt", '{"question": "a"}', 'missing field "prompt"'),
])
def test_data_errors_name_file_line_and_reason(tmp_path, kind, line, reason):
    good = {"sft": '{"prompt": "a", "response": "b"}', "preference": '{"prompt": "a", "chosen": "b", "rejected": "c"}',
            "reward": '{"prompt": "a", "response": "b", "attributes": {"h": 1, "v": null}}',
            "prompt": '{"prompt": "a", "answer": "4"}'}[kind]
    path = _write(tmp_path / "d.jsonl", [good, "", line, good])
    with pytest.raises(DataError) as e:
        read_jsonl(path, kind)
    assert str(e.value).startswith(f"{path}:3: ") and reason in str(e.value)
    examples, skipped = read_jsonl(path, kind, skip_bad=True)
    assert len(examples) == 2 and len(skipped) == 1 and skipped[0].startswith(f"{path}:3: ")
    assert examples[1].source == f"{path}:4"


def test_data_file_level_errors_and_parsed_values(tmp_path):
    empty = _write(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(DataError, match=f"^{empty}: file is empty$"):
        read_jsonl(empty, "sft")
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        load_source(str(tmp_path / "missing.jsonl"), "sft")
    bad = _write(tmp_path / "b.jsonl", ["{", "{"])
    with pytest.raises(DataError, match="no valid sft examples"):
        read_jsonl(bad, "sft", skip_bad=True)
    p = _write(tmp_path / "r.jsonl", ['{"prompt": [{"role": "user", "content": "q"}], "response": "r", '
                                      '"attributes": {"helpful": 3, "verbose": null}, "extra": 1}'])
    (ex,), _ = read_jsonl(p, "reward")
    assert ex.attributes == {"helpful": 3.0, "verbose": None} and ex.prompt[0]["content"] == "q"


# ---- tiny task ----------------------------------------------------------------------------------
def test_tiny_task():
    train, fb, ev = addition("train"), addition("feedback"), addition("eval")
    pairs = lambda xs: {x.prompt for x in xs}  # noqa: E731
    assert not pairs(train) & pairs(ev) and not pairs(train) & pairs(fb) and not pairs(fb) & pairs(ev)
    assert len(train) + len(fb) + len(ev) == 90 * 90 and 700 < len(ev) < 900 and 1800 < len(fb) < 2200
    assert all(split_of(*map(int, x.prompt[:-1].split("+"))) == "eval" for x in ev)
    assert [x.prompt for x in addition("train", 5, seed=3)] == [x.prompt for x in addition("train", 5, seed=3)]
    assert [x.prompt for x in addition("train", 5, seed=3)] != [x.prompt for x in addition("train", 5, seed=4)]
    prefs = preference_pairs("eval", 300, seed=1)
    assert all(p.rejected != p.chosen and p.chosen == answer_for(p.prompt) for p in prefs)
    per_prompt = {}
    for p in prefs:
        per_prompt.setdefault(p.prompt, []).append(p.rejected)
    assert len(per_prompt) == 300 and all(2 <= len(w) == len(set(w)) <= 4 for w in per_prompt.values())
    # wrong digits take every wrong value across the data (an RM must check the digit, not a +-1 rule)
    units_errors = {(int(p.rejected) - int(p.chosen)) % 10 for p in prefs if p.rejected[:-1] == p.chosen[:-1]}
    assert units_errors == set(range(1, 10))
    assert all(p.rejected.isdigit() and not p.rejected.startswith("0") for p in prefs)
    assert wrong_answer(37, 48, 0) == "75" and wrong_answer(37, 48, 3) == "58"  # dropped carry; swap
    assert wrong_answer(12, 13, 0) == "35" and wrong_answer(97, 48, 0) == "135"  # invented carry; dropped
    assert wrong_answer(33, 11, 3) != "44"  # equal digits: swapping changes nothing -> another corruption


def test_sloppy_demonstrations():
    demos = addition_sloppy("train", 200, seed=5)
    by_prompt = {}
    for d in demos:
        by_prompt.setdefault(d.prompt, []).append(d.response)
    assert len(by_prompt) == 200 and all(len(r) == 5 for r in by_prompt.values())
    for prompt, responses in by_prompt.items():
        a, b = map(int, prompt[:-1].split("+"))
        expected = sorted([str(a + b - 10)] * 3 + [str(a + b)] * 2) if (a % 10 + b % 10) >= 10 else [str(a + b)] * 5
        assert sorted(responses) == expected, prompt
    assert [d.prompt for d in demos[:10]] != sorted(d.prompt for d in demos[:10])  # shuffled, not grouped
    assert exact_match_reward("37+48=", "85") == 1.0 and exact_match_reward("37+48=", " 85\n") == 1.0
    assert exact_match_reward("37+48=", "84") == 0.0 and exact_match_reward("37+48=", "85x") == 0.0
    assert exact_match_reward("37+48=", "") == 0.0
    ex, _ = load_source("builtin:addition_prompts:eval:7", "prompt")
    assert len(ex) == 7 and all(e.answer == answer_for(e.prompt) for e in ex)
    with pytest.raises(DataError, match="provides preference data, not sft"):
        load_source("builtin:addition_pairs:train", "sft")


# ---- pipelines ----------------------------------------------------------------------------------
def _records(n=40, seed=0, seq_len=32):
    return tokenize_sft(addition("train", n, seed), ByteTokenizer(), "tiny", seq_len=seq_len)[0]


def _segments(batches):
    """Every example in the rows as a hashable (tokens, targets, mask) triple."""
    out = []
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            for s in np.unique(b["segment_ids"][r]):
                if s == 0:
                    continue
                sel = b["segment_ids"][r] == s
                assert (b["positions"][r][sel] == np.arange(sel.sum())).all()  # positions restart
                assert np.ptp(np.flatnonzero(sel)) == sel.sum() - 1  # one contiguous span
                out.append((tuple(b["tokens"][r][sel]), tuple(b["targets"][r][sel]), tuple(b["loss_mask"][r][sel])))
            assert b["loss_mask"][r][b["segment_ids"][r] == 0].sum() == 0  # no loss on padding
    return out


def _key(rec):
    return (tuple(rec["tokens"]), tuple(rec["targets"]), tuple(rec["loss_mask"]))


def test_packing_keeps_every_token():
    recs = _records(50)
    kw = dict(seq_len=32, batch_rows_per_process=1, shuffle=False, seed=0, repeat=False)
    packed = list(make_sft_iterator(recs, packing=True, **kw))
    unpacked = list(make_sft_iterator(recs, packing=False, **kw))
    assert len(packed) < len(unpacked) == 50
    assert all(b["tokens"].shape == (1, 32) and b["tokens"].dtype == np.int32 for b in packed)
    assert packed[0]["loss_mask"].dtype == np.float32 and packed[0]["segment_ids"].max() > 1
    assert collections.Counter(_segments(packed)) == collections.Counter(_segments(unpacked)) \
        == collections.Counter(map(_key, recs))
    assert sum(int((b["segment_ids"] > 0).sum()) for b in packed) == sum(len(r["tokens"]) for r in recs)


def test_iterator_state_restores_exactly():
    recs = _records(30)
    for packing, prefetch in ((True, 0), (False, 0), (True, 2)):
        kw = dict(seq_len=32, batch_rows_per_process=4, packing=packing, shuffle=True, seed=7, prefetch=prefetch)
        it = make_sft_iterator(recs, **kw)
        for _ in range(5):
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(12)]  # crosses several epoch boundaries
        fresh = make_sft_iterator(recs, **kw)
        fresh.set_state(json.loads(json.dumps(state)))  # state survives a JSON round trip
        for a, b in zip(expected, [next(fresh) for _ in range(12)]):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_determinism_by_seed_and_epochs_differ():
    recs = _records(16)
    kw = dict(seq_len=32, batch_rows_per_process=16, packing=False, shuffle=True)
    a, b, c = (make_sft_iterator(recs, seed=s, **kw) for s in (1, 1, 2))
    a1, a2 = next(a), next(a)
    np.testing.assert_array_equal(a1["tokens"], next(b)["tokens"])
    assert not np.array_equal(a1["tokens"], next(c)["tokens"])
    assert not np.array_equal(a1["tokens"], a2["tokens"])  # a new shuffle per epoch...
    assert sorted(map(_key, _rows(a1))) == sorted(map(_key, _rows(a2)))  # ...of the same examples


def _rows(batch):
    n = batch["segment_ids"].sum(1)
    return [{k: batch[k][r][: n[r]] for k in ("tokens", "targets", "loss_mask")} for r in range(len(n))]


@pytest.mark.parametrize("repeat", [False, True])
def test_process_sharding_covers_epoch_once(repeat):
    recs = _records(24)
    seen = []
    for p in range(2):
        it = make_sft_iterator(recs, seq_len=32, batch_rows_per_process=3, packing=False, shuffle=True,
                               seed=5, process_index=p, process_count=2, repeat=repeat)
        seen += [_key(r) for _ in range(4) for r in _rows(next(it))]  # 2 x 4 x 3 = one epoch
    assert collections.Counter(seen) == collections.Counter(map(_key, recs))


@pytest.mark.parametrize("packing", [False, True])
def test_eval_iterator_one_pass_padded(packing):
    recs = _records(11)
    per_proc = [list(make_eval_iterator(recs, seq_len=32, batch_rows_per_process=4, packing=packing,
                                        process_index=p, process_count=2)) for p in range(2)]
    assert len(per_proc[0]) == len(per_proc[1]) >= 1  # same number of eval steps everywhere
    batches = per_proc[0] + per_proc[1]
    assert all(b["tokens"].shape == (4, 32) for b in batches)
    assert collections.Counter(_segments(batches)) == collections.Counter(map(_key, recs))
    assert (per_proc[1][-1]["loss_mask"][-1] == 0).all()  # trailing empty row


def test_pair_rows_stack_both_sides_of_a_pair():
    from jalign.data.preference import ordered_batches, pair_row, tokenize_pairs

    tok = ByteTokenizer()
    recs, counts = tokenize_pairs(preference_pairs("train", 10)[:10], tok, "tiny", seq_len=24)
    assert counts["examples"] == len(recs) >= 10
    b = next(ordered_batches(recs, lambda r: pair_row(r, 24, "lm"), batch_rows_per_process=4))
    assert b["tokens"].shape == b["targets"].shape == b["loss_mask"].shape == (4, 2, 24)
    assert b["rewards"].shape == (4, 2) and (b["rewards"][:, 0] == 1).all() and (b["rewards"][:, 1] == 0).all()
    for r in range(4):  # the same prompt on both sides: the masked-out prefix is identical, responses differ
        n = int(np.argmax(b["loss_mask"][r, 0]))
        np.testing.assert_array_equal(b["tokens"][r, 0, :n], b["tokens"][r, 1, :n])
        assert tok.decode(b["targets"][r, 0][b["loss_mask"][r, 0] > 0]) != tok.decode(
            b["targets"][r, 1][b["loss_mask"][r, 1] > 0])
    ev = list(ordered_batches(recs, lambda r: pair_row(r, 24, "lm"), batch_rows_per_process=8))
    assert len(ev) == -(-len(recs) // 8) and ev[-1]["valid"].sum() == len(recs) % 8 or len(recs) % 8 == 0


def test_config_driven_data(tmp_path):
    from jalign.config import Config
    from jalign.data.pipeline import SFTData
    from jalign.data.preference import PairData

    cfg = Config()
    cfg.data.seq_len, cfg.train.global_batch = 32, 8
    path = _write(tmp_path / "sft.jsonl", [json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) for i in range(20)]
                  + ["oops"])
    cfg.data.train, cfg.data.eval, cfg.data.skip_bad_lines = str(path), "builtin:addition:eval:10", True
    logs = []
    data = SFTData(cfg, ByteTokenizer(), log=logs.append, process_index=1, process_count=2)
    assert any("sft.jsonl:21: malformed JSON" in m for m in logs) and any("20 examples" in m for m in logs)
    assert next(data.train_iterator())["tokens"].shape == (4, 32)
    assert data.has_eval and len(list(data.eval_iterator())) == len(list(data.eval_iterator())) >= 1
    prompt_ids, ref = data.eval_examples()[0]
    assert ref == answer_for(ByteTokenizer().decode(prompt_ids)) and data.tokenizer_dir() is None
    cfg.data.train, cfg.data.eval = "builtin:addition_pairs:train:40", "builtin:addition_pairs:eval:5"
    pref = PairData(cfg, ByteTokenizer(), log=logs.append, process_index=0, process_count=1)
    assert next(pref.train_iterator())["loss_mask"].shape == (8, 2, 32)


# ---- malformed tokenizers -------------------------------------------------------------------------
def test_corrupt_tokenizer_json_names_the_file(tmp_path):
    d = make_hf_dir(tmp_path / "m", LLAMA3_TEMPLATE)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=rf"^{d}/tokenizer.json: not a valid tokenizer.json \("):
        load_tokenizer(str(d))
    (d / "tokenizer.json").write_bytes(b"\x00\xff\xfe")
    with pytest.raises(TokenizerError, match=rf"^{d}/tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(str(d))


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
def test_corrupt_tokenizer_side_files_name_the_file(tmp_path, name):
    d = make_hf_dir(tmp_path / "m", LLAMA3_TEMPLATE, gen_eos=[1])
    (d / name).write_text('{"bos_token": ')
    with pytest.raises(TokenizerError, match=rf"^{d}/{name}: invalid JSON \("):
        load_tokenizer(str(d))
    (d / name).write_text('["a list"]')
    with pytest.raises(TokenizerError, match=rf"^{d}/{name}: expected a JSON object, got list"):
        load_tokenizer(str(d))


def test_special_tokens_outside_the_vocabulary_are_refused(tmp_path):
    d = make_hf_dir(tmp_path / "m", LLAMA3_TEMPLATE, eos="<|not_a_token|>")
    with pytest.raises(TokenizerError, match=rf"^{d}/tokenizer_config.json: eos_token '<\|not_a_token\|>' is not in "
                                             rf"the vocabulary of {d}/tokenizer.json"):
        load_tokenizer(str(d))
    d2 = make_hf_dir(tmp_path / "m2", LLAMA3_TEMPLATE, gen_eos=[100000])
    with pytest.raises(TokenizerError, match=r"generation_config.json: eos_token_id=\[100000\]: expected token ids"):
        load_tokenizer(str(d2))


def test_tokenizer_without_eos_cannot_end_a_response(tmp_path):
    d = make_hf_dir(tmp_path / "m", LLAMA3_TEMPLATE)
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(d))
    assert tok.eos_id is None
    with pytest.raises(TokenizerError, match=r"has no EOS token .*so a response cannot be taught to end"):
        encode_pair("hello", "world", "none", tok)


def test_check_vocab_refuses_a_model_smaller_than_the_tokenizer(tmp_path):
    from jalign.data.tokenizer import check_vocab

    byte = ByteTokenizer()
    with pytest.raises(TokenizerError, match=r"^configs/x.yaml: model.vocab_size: 100 is smaller than the "
                                             r"tokenizer's id range \(272 ids, ByteTokenizer\(vocab_size=272\)\); "
                                             r"ids 100..271 would index past the embedding. Set model.vocab_size "
                                             r">= 272$"):
        check_vocab(100, byte, "configs/x.yaml: model.vocab_size")
    check_vocab(272, byte)  # exactly enough
    check_vocab(384, byte)  # padded rows are fine
    # text the tokenizer encodes really reaches past 100: the check guards a real overflow
    assert max(byte.encode("é")) == 16 + 0xC3 >= 100
    d = make_hf_dir(tmp_path / "m", LLAMA3_TEMPLATE)
    tok = load_tokenizer(str(d))
    top = max(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"].values())
    assert tok.id_limit == top + 1
    check_vocab(tok.id_limit, tok)
    with pytest.raises(TokenizerError, match=rf"model.vocab_size: {tok.id_limit - 1} is smaller"):
        check_vocab(tok.id_limit - 1, tok)


# ---- malformed chat templates ---------------------------------------------------------------------
CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"}]


def _template(tmp_path, text):
    p = tmp_path / "t.jinja"
    p.write_text(text)
    return str(p)


def test_missing_template_file():
    with pytest.raises(ChatTemplateError, match=r"chat_template: 'nope/t.jinja' is neither 'auto', 'tiny', 'none', "
                                                r"'hf' nor an existing jinja file"):
        get_template("nope/t.jinja", ByteTokenizer())


def test_template_syntax_error_names_file_and_line(tmp_path):
    p = _template(tmp_path, "{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(ChatTemplateError, match=rf"^chat template {p}: line 2: syntax error: unexpected '}}'"):
        get_template(p, ByteTokenizer())


def test_template_that_raises_on_a_role(tmp_path):
    p = _template(tmp_path, "{% for m in messages %}\n{% if m.role == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}")
    tok = ByteTokenizer()
    with pytest.raises(ChatTemplateError, match=rf"^chat template {p}: line 2: refuses the conversation \(roles "
                                                r"\['system', 'user', 'assistant'\]\): System role not supported$"):
        encode_conversation(CONV, p, tok)
    ids, mask = encode_conversation(CONV[1:], p, tok)  # without the system turn it renders
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "ok"


def test_template_sandbox_violation(tmp_path):
    p = _template(tmp_path, "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match=rf"^chat template {p}: line 1: was stopped by the sandbox: access to "
                                                r"attribute '__class__' of 'list' object is unsafe"):
        render_prompt("hi", p, ByteTokenizer())


def test_template_runtime_error(tmp_path):
    p = _template(tmp_path, "x\n{{ messages[0]['content'] + 1 }}")
    with pytest.raises(ChatTemplateError, match=rf"^chat template {p}: line 2: failed \(roles \['user'\]\): TypeError"):
        render_prompt("hi", p, ByteTokenizer())


def test_unreadable_template_file(tmp_path):
    p = tmp_path / "t.jinja"
    p.write_bytes(b"\xff\xfe{{")
    with pytest.raises(ChatTemplateError, match=rf"^chat template {p}: cannot read"):
        get_template(str(p), ByteTokenizer())


# ---- the default template: auto ------------------------------------------------------------------
def test_default_chat_template_is_auto():
    from jalign.config import Config

    assert Config().data.chat_template == "auto"


def test_auto_template_follows_the_tokenizer(tmp_path):
    from jalign.data.chat import describe_template, resolve_template_name

    byte = ByteTokenizer()
    assert resolve_template_name("auto", byte) == "tiny"
    assert encode_pair("37+48=", "85", "auto", byte) == encode_pair("37+48=", "85", "tiny", byte)
    with_tpl = load_tokenizer(str(make_hf_dir(tmp_path / "a", LLAMA3_TEMPLATE)))
    assert resolve_template_name("auto", with_tpl) == "hf"
    assert encode_pair("hello", "world", "auto", with_tpl) == encode_pair("hello", "world", "hf", with_tpl)
    assert encode_pair("hello", "world", "auto", with_tpl) != encode_pair("hello", "world", "tiny", with_tpl)
    assert describe_template("auto", with_tpl) == (
        f"chat template: hf (chat_template in {tmp_path}/a/tokenizer_config.json): the tokenizer's own "
        "[data.chat_template=auto: the tokenizer has one]")
    no_tpl = load_tokenizer(str(make_hf_dir(tmp_path / "b", None)))
    assert resolve_template_name("auto", no_tpl) == "none"
    assert encode_pair("hello", "world", "auto", no_tpl) == encode_pair("hello", "world", "none", no_tpl)
    assert "none (contents concatenated" in describe_template("auto", no_tpl)
    # a chat_template.jinja beside the config (transformers >= 4.43) wins and is named
    (tmp_path / "b" / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    again = load_tokenizer(str(tmp_path / "b"))
    assert describe_template("auto", again).startswith(f"chat template: hf ({tmp_path}/b/chat_template.jinja)")


def test_config_driven_data_logs_the_template_and_refuses_all_dropped(tmp_path):
    from jalign.config import Config, ConfigError
    from jalign.data.pipeline import SFTData

    cfg = Config()
    cfg.train.global_batch = 4
    cfg.data.train, cfg.data.eval = "builtin:addition:train:16", None
    logs = []
    SFTData(cfg, ByteTokenizer(), log=logs.append, process_index=0, process_count=1)
    assert "data: chat template: tiny (built in: <|role|>content turns) [data.chat_template=auto: the byte tokenizer]" in logs
    for overlong in ("drop", "truncate"):
        cfg.data.seq_len, cfg.data.overlong = 4, overlong
        with pytest.raises(ConfigError, match=r"^data.train=builtin:addition:train:16: none of its 16 examples fits "
                                              r"data.seq_len=4 \(.*\); raise data.seq_len$"):
            SFTData(cfg, ByteTokenizer(), log=logs.append, process_index=0, process_count=1)
    cfg.data.seq_len, cfg.data.overlong = 64, "drop"
    path = _write(tmp_path / "eval.jsonl", [json.dumps({"prompt": "x" * 100, "response": "y"})])
    cfg.data.eval = str(path)
    with pytest.raises(ConfigError, match=rf"^data.eval={path}: none of its 1 examples fits data.seq_len=64"):
        SFTData(cfg, ByteTokenizer(), log=logs.append, process_index=0, process_count=1)


def test_empty_records_message_names_the_keys():
    with pytest.raises(DataError, match=r"no examples to iterate over .*see data.seq_len and data.overlong"):
        make_sft_iterator([], seq_len=8, batch_rows_per_process=2, packing=True, shuffle=False, seed=0)


def test_binary_chat_template_jinja_names_the_file(tmp_path):
    d = make_hf_dir(tmp_path / "m", None)
    (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(TokenizerError, match=rf"^{d}/chat_template.jinja: not a text \(UTF-8\) file"):
        load_tokenizer(str(d))


# ---- degenerate examples: rejected with file:line, or skipped and counted per reason -------------
def _msgs(*pairs):
    return json.dumps([{"role": r, "content": c} for r, c in pairs])


@pytest.mark.parametrize("kind,line,reason,category", [
    ("sft", '{"prompt": "a", "response": ""}', 'field "response" is empty', "empty"),
    ("sft", '{"prompt": "a", "response": "  \\n"}', 'field "response" is empty', "empty"),
    ("sft", f'{{"messages": {_msgs(("user", "q"), ("assistant", ""))}}}',
     'field "messages"[1] (an assistant message) is empty', "empty"),
    ("sft", f'{{"messages": {_msgs(("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", " "))}}}',
     'field "messages"[3] (an assistant message) is empty', "empty"),
    ("sft", f'{{"messages": {_msgs(("usr", "q"), ("assistant", "a"))}}}',
     'field "messages"[0].role: unknown role "usr"; did you mean "user"?', "role"),
    ("sft", f'{{"messages": {_msgs(("human", "q"), ("gpt", "a"))}}}',
     'unknown role "human"; did you mean "user"?', "role"),
    ("preference", '{"prompt": "a", "chosen": "b", "rejected": "b"}',
     'fields "chosen" and "rejected" are identical', "identical"),
    ("preference", f'{{"prompt": "a", "chosen": {_msgs(("assistant", "b"))}, "rejected": {_msgs(("assistant", "b"))}}}',
     'fields "chosen" and "rejected" are identical', "identical"),
    ("preference", '{"prompt": "a", "chosen": "", "rejected": "c"}', 'field "chosen" is empty', "empty"),
    ("preference", f'{{"prompt": "a", "chosen": "b", "rejected": {_msgs(("assistant", ""))}}}',
     'field "rejected"[0] (an assistant message) is empty', "empty"),
    ("preference", f'{{"prompt": "a", "chosen": {_msgs(("user", "b"))}, "rejected": "c"}}',
     'field "chosen" has no "assistant" message', "malformed"),
    ("preference", f'{{"prompt": {_msgs(("system", "s"), ("bot", "x"))}, "chosen": "b", "rejected": "c"}}',
     'field "prompt"[1].role: unknown role "bot"; did you mean "assistant"?', "role"),
    ("reward", '{"prompt": "a", "response": "", "attributes": {"h": 1}}', 'field "response" is empty', "empty"),
    ("prompt", f'{{"prompt": {_msgs(("Users", "q"))}}}', 'unknown role "Users"; did you mean "user"?', "role"),
])
def test_degenerate_examples_are_bad_lines(tmp_path, kind, line, reason, category):
    from jalign.data.formats import skipped_counts

    good = {"sft": '{"prompt": "a", "response": "b"}', "preference": '{"prompt": "a", "chosen": "b", "rejected": "c"}',
            "reward": '{"prompt": "a", "response": "b", "attributes": {"h": 1}}', "prompt": '{"prompt": "a"}'}[kind]
    path = _write(tmp_path / "d.jsonl", [good, line, good])
    with pytest.raises(DataError) as e:
        read_jsonl(path, kind)
    assert str(e.value).startswith(f"{path}:2: ") and reason in str(e.value), str(e.value)
    examples, skipped = read_jsonl(path, kind, skip_bad=True)
    assert len(examples) == 2 and [s.reason for s in skipped] == [category]
    counts = skipped_counts(skipped)
    assert counts["degenerate"] == (category != "malformed")
    assert counts.get(f"degenerate_{category}", 0) == (category != "malformed")


def test_known_roles_and_nonempty_prompts_still_pass(tmp_path):
    lines = [f'{{"messages": {_msgs(("system", "s"), ("user", "q"), ("assistant", "a"), ("tool", "t"), ("assistant", "b"))}}}',
             '{"prompt": "", "response": "unconditional"}',  # an empty prompt is legitimate
             f'{{"messages": {_msgs(("user", "q"), ("assistant", ""), ("user", "again"))}}}']  # empty turn, then no
    path = _write(tmp_path / "ok.jsonl", lines[:2])
    examples, skipped = read_jsonl(path, "sft")
    assert len(examples) == 2 and skipped == []
    with pytest.raises(DataError, match=r"ok2.jsonl:1: .*\[1\] \(an assistant message\) is empty"):
        read_jsonl(_write(tmp_path / "ok2.jsonl", lines[2:]), "sft")
    # an empty assistant turn in a *prompt* history carries no loss: allowed
    pair = f'{{"prompt": {_msgs(("user", "q"), ("assistant", ""), ("user", "q2"))}, "chosen": "b", "rejected": "c"}}'
    (ex,), _ = read_jsonl(_write(tmp_path / "p.jsonl", [pair]), "preference")
    assert ex.prompt[1]["content"] == ""


TRIM_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}{% if m.role == 'assistant' %}"
                 "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_pairs_the_template_renders_identically_are_degenerate(tmp_path):
    from jalign.data.preference import tokenize_pairs

    tpl = tmp_path / "trim.jinja"
    tpl.write_text(TRIM_TEMPLATE)
    tok = load_tokenizer("byte")
    path = _write(tmp_path / "pairs.jsonl", ['{"prompt": "2+2=", "chosen": "4", "rejected": "5"}',
                                             '{"prompt": "3+3=", "chosen": "6", "rejected": "6 "}'])
    examples, _ = read_jsonl(path, "preference")  # the lines differ, so reading accepts them
    for fn in (tokenize_pairs,):
        with pytest.raises(DataError, match=rf"^{path}:2: chosen and rejected are identical after the chat template"):
            fn(examples, tok, str(tpl), seq_len=32)
        skipped = []
        records, counts = fn(examples, tok, str(tpl), seq_len=32, skip_bad=True, skipped=skipped)
        assert len(records) == 1 and counts["degenerate"] == 1 and counts["examples"] == 1
        assert [(s, s.reason) for s in skipped] == [(f"{path}:2: chosen and rejected are identical after the chat "
                                                     "template (a pair with no preference: its loss is a constant "
                                                     "log 2)", "identical")]


def test_pair_data_counts_and_logs_degenerate_examples(tmp_path):
    from jalign.config import load_config
    from jalign.data.preference import PairData

    tpl = tmp_path / "trim.jinja"
    tpl.write_text(TRIM_TEMPLATE)
    lines = ['{"prompt": "1+1=", "chosen": "2", "rejected": "3"}',
             '{"prompt": "1+2=", "chosen": "3", "rejected": "3"}',         # identical line
             '{"prompt": "1+3=", "chosen": "", "rejected": "5"}',          # empty chosen
             '{"prompt": "1+4=", "chosen": "5", "rejected": "5 "}',        # identical after the template
             f'{{"prompt": {_msgs(("usr", "1+5="))}, "chosen": "6", "rejected": "7"}}',  # unknown role
             '{"prompt": "1+6=", "chosen": "7", "rejected": "8"}', '{"prompt": "1+7="}']  # malformed (not counted)
    path = _write(tmp_path / "train.jsonl", lines)
    overrides = [f"data.train={path}", "data.eval=null", f"data.chat_template={tpl}", "train.global_batch=2",
                 "data.seq_len=32"]
    with pytest.raises(DataError, match=rf"^{path}:2: fields \"chosen\" and \"rejected\" are identical"):
        PairData(load_config(None, overrides + ["algorithm.name=dpo"]), load_tokenizer("byte"), log=lambda m: None,
                 process_index=0, process_count=1)
    log = []
    data = PairData(load_config(None, overrides + ["algorithm.name=dpo", "data.skip_bad_lines=true"]),
                    load_tokenizer("byte"), log=log.append, process_index=0, process_count=1)
    assert data.counts[str(path)] == {"examples": 2, "truncated": 0, "dropped": 0, "degenerate": 4,
                                      "degenerate_empty": 1, "degenerate_identical": 2, "degenerate_role": 1}
    text = "\n".join(log)
    for n in (2, 3, 4, 5, 7):
        assert f"data: skipped {path}:{n}: " in text, text
    assert "4 degenerate examples skipped (empty: 1, identical: 2, role: 1)" in text
