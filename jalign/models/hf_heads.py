"""Hugging Face export of models with a score head (reward models as ``*ForSequenceClassification``)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np


def export_reward_model(params, cfg, out_dir, algo_cfg, *, attribute_names, tokenizer_dir=None, pad_id=0) -> str:
    """A Hugging Face ``LlamaForSequenceClassification``-style directory.

    The trunk is written by ``hf_io.save_hf``; the head becomes ``score.weight`` [num_labels, hidden]
    in its own ``score.safetensors`` shard (added to the index); config.json gets
    ``architectures: [<Family>ForSequenceClassification]``, ``num_labels``, ``id2label`` and
    ``pad_token_id``. HF's head has no bias, so ``score_bias`` (zero for Bradley-Terry training, where
    it gets no gradient) is kept in ``reward_head.json`` with the loss, the attribute names and
    the read-out rule.
    """
    import dataclasses

    from jalign.models.hf_io import _write_header, save_hf

    trunk = {k: v for k, v in params.items() if k not in ("score", "score_bias", "lm_head")}
    out_dir = Path(out_dir)
    # save_hf writes lm_head unless embeddings are tied; the classifier has none.
    save_hf(trunk, dataclasses.replace(cfg, tie_embeddings=True), out_dir, tokenizer_dir=tokenizer_dir)
    if jax.process_index() != 0:
        return str(out_dir)
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
                  label2id={n: i for i, n in enumerate(attribute_names)}, pad_token_id=pad_id)
    if len(attribute_names) > 1:
        config["problem_type"] = "regression"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "reward_head.json").write_text(json.dumps({
        "loss": algo_cfg.loss, "num_attributes": len(attribute_names), "attributes": list(attribute_names),
        "score_bias": bias.tolist(), "read_out": "last token with segment_ids > 0 (prompt + response + EOS)",
    }, indent=2))
    return str(out_dir)
