"""Hugging Face exports of models with a head other than the language-model head.

    export_reward_model(params, cfg, out_dir, loss="bt", attribute_names=["reward"],
                        tokenizer=tok, tokenizer_dir=tok_dir)   # -> <Family>ForSequenceClassification

**Where the score is read.** jalign reads a reward model at the last token of each row that is not
padding (``segment_ids > 0``): the final EOS of prompt + response + EOS. transformers'
``*ForSequenceClassification`` ignores the attention mask there and reads at the last position whose
``input_ids != config.pad_token_id``. The two agree only if ``pad_token_id`` is an id that never occurs
in a real sequence and batches are padded with it. A tokenizer without a pad token falls back to EOS
(the usual case for Llama / Qwen base tokenizers), and with ``pad_token_id`` = EOS transformers would
skip the real final EOS as well and read the token before it.

The rule of this export: ``pad_token_id`` is the tokenizer's own pad token when it has one that is
neither an EOS id nor BOS nor UNK (tokenizer files copied unchanged). Otherwise a dedicated special
token (``<|pad|>``, or a free variant of the name) is added to the exported tokenizer files
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) at the next free id,
so ``AutoTokenizer`` pads with it, and that id becomes ``pad_token_id``. Its embedding row is one the
tokenizer never produces (an unused row when ``model.vocab_size`` is larger than the tokenizer, else
one zero row appended to the exported embedding, ``vocab_size`` + 1); its value is irrelevant: pad
positions come after the read position and causal attention never lets them back. Without
tokenizer files (the built-in byte tokenizer, whose pad is its own id 0) only ``pad_token_id`` is set.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PAD_NAMES = ("<|pad|>", "<|reward_pad|>", "<|jalign_pad|>")


def own_pad_id(tokenizer) -> Optional[int]:
    """The tokenizer's pad id if it has a real pad token (not an EOS id, BOS or UNK), else None."""
    if tokenizer is None:
        return None
    pad = getattr(tokenizer, "pad_id", None)
    if pad is None or getattr(tokenizer, "pad_token", "set") is None:  # HFTokenizer: pad fell back to EOS
        return None
    reserved = set(getattr(tokenizer, "eos_ids", ()) or ()) | {getattr(tokenizer, "eos_id", None),
                                                               getattr(tokenizer, "bos_id", None)}
    unk = getattr(tokenizer, "unk_token", None)
    if unk is not None and hasattr(tokenizer, "token_to_id"):
        reserved.add(tokenizer.token_to_id(unk))
    return None if pad in reserved else int(pad)


def _add_pad_token(out_dir: Path) -> tuple[str, int]:
    """Add a fresh special pad token to ``out_dir/tokenizer.json`` (and name it the pad token in
    tokenizer_config.json / special_tokens_map.json); returns ``(token, id)``."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    names = (*PAD_NAMES, *(f"<|reward_pad_{k}|>" for k in range(1, len(vocab) + 2)))
    name = next(n for n in names if n not in vocab)
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    pad_id = tok.token_to_id(name)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg_path = out_dir / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    config["pad_token"] = name
    if "added_tokens_decoder" in config:
        config["added_tokens_decoder"][str(pad_id)] = {"content": name, "lstrip": False, "normalized": False,
                                                       "rstrip": False, "single_word": False, "special": True}
    cfg_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    special = out_dir / "special_tokens_map.json"
    if special.is_file():
        m = json.loads(special.read_text())
        m["pad_token"] = name
        special.write_text(json.dumps(m, indent=2, ensure_ascii=False))
    return name, pad_id


def _tokenizer_size(tokenizer_dir) -> Optional[int]:
    """Ids the tokenizer can produce (with added tokens), from tokenizer.json; None without one."""
    path = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir else None
    if path is None or not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def _tokenizer_of(tokenizer_dir):
    """jalign's reading of the tokenizer files in ``tokenizer_dir`` (None without a tokenizer.json)."""
    if not tokenizer_dir or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return None
    from jalign.data.tokenizer import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


def export_reward_model(params, cfg, out_dir, algo_cfg=None, *, attribute_names: Sequence[str], tokenizer_dir=None,
                        pad_id: int = 0, tokenizer=None, loss: Optional[str] = None) -> str:
    """A Hugging Face ``<Family>ForSequenceClassification`` directory that scores like jalign.

    The trunk is written by ``hf_io.save_hf``; the head becomes ``score.weight`` [num_labels, hidden]
    in its own ``score.safetensors`` shard (added to the index); config.json gets
    ``architectures: [<Family>ForSequenceClassification]``, ``num_labels``, ``id2label`` and the
    ``pad_token_id`` chosen by the rule in the module docstring (tokenizer files updated to match).
    HF's head has no bias, so ``score_bias`` (zero for Bradley-Terry training, where it gets no
    gradient) is kept in ``reward_head.json`` with the loss, the attribute names, the pad token and
    the read-out rule. Call on every process (``save_hf`` gathers); only process 0 writes.

    The pad rule reads ``tokenizer`` (jalign's tokenizer object) or else the tokenizer files in
    ``tokenizer_dir``; ``pad_id`` is used only when there are neither (the built-in byte tokenizer,
    pad 0). ``loss`` (default ``algo_cfg.loss``) is recorded in reward_head.json.
    """
    from jalign.models.hf_io import _write_header, save_hf

    out_dir = Path(out_dir)
    loss = loss if loss is not None else getattr(algo_cfg, "loss", None)
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(tokenizer_dir)
    fallback_pad, pad_id = pad_id, own_pad_id(tokenizer)
    size = _tokenizer_size(tokenizer_dir) if pad_id is None else None
    extra_rows = 0
    if pad_id is None and size is not None:
        new_id = size  # where _add_pad_token will put it (the next free id)
        extra_rows = max(0, new_id + 1 - cfg.vocab_size)
    elif pad_id is None:  # no tokenizer files to add a token to
        pad_id = getattr(tokenizer, "pad_id", fallback_pad) if tokenizer is not None else fallback_pad
    trunk = {k: v for k, v in params.items() if k not in ("score", "score_bias", "lm_head")}
    trunk_cfg = dataclasses.replace(cfg, tie_embeddings=True)  # save_hf writes lm_head unless tied; we have none
    if extra_rows:
        trunk["embed"] = jnp.concatenate([trunk["embed"], jnp.zeros((extra_rows, cfg.hidden), trunk["embed"].dtype)])
        trunk_cfg = dataclasses.replace(trunk_cfg, vocab_size=cfg.vocab_size + extra_rows)
    save_hf(trunk, trunk_cfg, out_dir, tokenizer_dir=tokenizer_dir)
    if jax.process_index() != 0:
        return str(out_dir)
    pad_token = None
    if pad_id is None:
        pad_token, pad_id = _add_pad_token(out_dir)
    weight = np.ascontiguousarray(np.asarray(jax.device_get(params["score"]), np.float32).T)  # [A, D]
    bias = np.asarray(jax.device_get(params["score_bias"]), np.float32)
    with open(out_dir / "score.safetensors", "wb") as f:
        _write_header(f, [("score.weight", weight.shape, weight.dtype)])
        f.write(weight.tobytes())
    index_path = out_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["score.weight"] = "score.safetensors"
    index["metadata"]["total_size"] += weight.nbytes
    index_path.write_text(json.dumps(index, indent=2))
    config = json.loads((out_dir / "config.json").read_text())
    arch = config["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")
    config.update(architectures=[arch], num_labels=len(attribute_names), tie_word_embeddings=cfg.tie_embeddings,
                  id2label={str(i): n for i, n in enumerate(attribute_names)},
                  label2id={n: i for i, n in enumerate(attribute_names)}, pad_token_id=int(pad_id))
    if len(attribute_names) > 1:
        config["problem_type"] = "regression"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    gen_path = out_dir / "generation_config.json"
    if gen_path.is_file():
        gen = json.loads(gen_path.read_text())
        gen["pad_token_id"] = int(pad_id)
        gen_path.write_text(json.dumps(gen, indent=2))
    (out_dir / "reward_head.json").write_text(json.dumps({
        "loss": loss, "num_attributes": len(attribute_names), "attributes": list(attribute_names),
        "score_bias": bias.tolist(), "pad_token_id": int(pad_id), "added_pad_token": pad_token,
        "read_out": "last token with segment_ids > 0 (prompt + response + EOS); transformers reads the last "
                    "token != pad_token_id, which is the same token when batches are padded with pad_token_id",
    }, indent=2))
    return str(out_dir)
