"""Reward-model export: transformers' *ForSequenceClassification reads the same token jalign reads,
also for a tokenizer without a pad token (pad would fall back to EOS) on right-padded batches."""
import json

import jax
import numpy as np
import pytest

from jalign.models.heads import sequence_scores as reward_scores
from jalign.config import ModelConfig
from jalign.data.tokenizer import load_tokenizer
from jalign.models.hf_heads import export_reward_model, own_pad_id
from jalign.models.params import init_params
from jalign.models.transformer import declare_params

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["the quick brown fox", "hello", "the lazy dog jumps over the quick brown fox again", "world hello world"]


def make_tokenizer(directory, pad: bool = False):
    """A small byte-level BPE (trained here) with <s> / </s>, like a base Llama/Qwen tokenizer: no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>"] + (["<pad>"] if pad else [])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast",
              "model_max_length": 512, **({"pad_token": "<pad>"} if pad else {})}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(str(directory))


def reward_params(cfg, bias: float):
    params = init_params(declare_params(cfg, lm_head=False, score_outputs=1), 0)
    params["score_bias"] = params["score_bias"] + bias  # HF's head has no bias: it lives in reward_head.json
    return params


def jalign_scores(params, cfg, ids, lengths):
    T = ids.shape[1]
    seg = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    pos = np.where(seg > 0, np.arange(T)[None], 0).astype(np.int32)
    return np.asarray(jax.jit(lambda p: reward_scores(p, ids.astype(np.int32), pos, seg, cfg))(params))[:, 0]


@pytest.mark.parametrize("spare_rows", [False, True])
def test_export_without_pad_token_scores_like_jalign(tmp_path, spare_rows):
    tok = make_tokenizer(tmp_path / "tok")
    assert tok.pad_token is None and tok.pad_id == tok.eos_id  # the fallback that broke the export
    assert own_pad_id(tok) is None
    vocab = tok.vocab_size + (16 if spare_rows else 0)  # without spare rows the export appends one
    cfg = ModelConfig(vocab_size=vocab, hidden=32, mlp=64, layers=2, heads=4, kv_heads=2, tokenizer=str(tmp_path / "tok"))
    params = reward_params(cfg, bias=0.37)
    out = tmp_path / "rm"
    # the loop's call: the algorithm config and the tokenizer's (EOS-fallback) pad id; the rule reads the files
    algo_cfg = type("RewardConfig", (), {"loss": "bt"})()
    export_reward_model(params, cfg, out, algo_cfg, attribute_names=["reward"], tokenizer_dir=tmp_path / "tok",
                        pad_id=tok.pad_id)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    pad = tok.vocab_size  # the next free id
    assert hf_tok.pad_token == "<|pad|>" and hf_tok.pad_token_id == pad
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == pad and config["vocab_size"] == (vocab if spare_rows else vocab + 1)
    head = json.loads((out / "reward_head.json").read_text())
    assert head["pad_token_id"] == pad and head["added_pad_token"] == "<|pad|>"
    assert load_tokenizer(str(out)).pad_id == pad  # jalign reads the exported tokenizer the same way

    # a right-padded batch of different lengths, each sequence ending with EOS as jalign scores it
    enc = hf_tok([t + "</s>" for t in TEXTS], padding=True, return_tensors="np")
    ids, lengths = enc["input_ids"], enc["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == len(TEXTS) and (ids[np.arange(4), lengths - 1] == tok.eos_id).all()
    assert (ids[enc["attention_mask"] == 0] == pad).all()
    for i, t in enumerate(TEXTS):  # the exported tokenizer tokenizes like jalign's
        assert ids[i, :lengths[i]].tolist() == tok.encode(t) + [tok.eos_id]
    ours = jalign_scores(params, cfg, ids, lengths)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
    np.testing.assert_allclose(theirs[:, 0] + head["score_bias"][0], ours, atol=1e-5, rtol=1e-5)

    # what the export used to write: pad_token_id = EOS, batch padded with EOS -> the token before EOS
    old = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32,
                                                                          pad_token_id=tok.eos_id).eval()
    eos_padded = np.where(enc["attention_mask"] > 0, ids, tok.eos_id)
    with torch.no_grad():
        wrong = old(input_ids=torch.tensor(eos_padded)).logits.numpy()
    assert np.abs(wrong[:, 0] + head["score_bias"][0] - ours).max() > 1e-2


def test_export_keeps_a_real_pad_token(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", pad=True)
    pad = tok.token_to_id("<pad>")
    assert own_pad_id(tok) == pad and pad not in tok.eos_ids
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden=32, mlp=64, layers=1, heads=4, kv_heads=2)
    params = reward_params(cfg, bias=0.0)
    out = tmp_path / "rm"
    export_reward_model(params, cfg, out, loss="bt", attribute_names=["reward"], tokenizer=tok,
                        tokenizer_dir=tmp_path / "tok")
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == pad and config["vocab_size"] == tok.vocab_size
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = hf_tok([t + "</s>" for t in TEXTS], padding=True, return_tensors="np")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(enc["input_ids"])).logits.numpy()[:, 0]
    np.testing.assert_allclose(theirs, jalign_scores(params, cfg, enc["input_ids"], enc["attention_mask"].sum(-1)),
                               atol=1e-5, rtol=1e-5)


def test_byte_tokenizer_pad_is_its_own_id():
    tok = load_tokenizer("byte")
    assert own_pad_id(tok) == 0 and 0 not in tok.eos_ids
