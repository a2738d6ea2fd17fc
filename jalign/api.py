"""The Python API in one place (docs/python_api.md walks through it):

    from jalign.api import load_config, train, evaluate, load_model, generate_text, export_hf, Callback

    cfg = load_config("configs/sft_tiny.yaml", ["train.steps=20", "train.out_dir=runs/mine"])
    metrics = train(cfg, callbacks=[MyCallback()])               # the last train and eval metrics
    ev = evaluate(load_config("configs/sft_tiny.yaml", ["model.init_from=run:runs/mine", ...]))
    model = load_model("runs/mine")                              # a run, an HF directory or a convert dir
    generate_text(model, ["37+48="], max_new_tokens=4)           # ["85"]
    export_hf("runs/mine", "exported/")                          # a Hugging Face directory

Everything here is what the command line uses (``jalign train`` is ``train(load_config(...))``,
``jalign generate`` is ``generate_text(load_model(...))``, ``jalign convert --to-hf`` is ``export_hf``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

from jalign.callbacks import Callback, Run  # noqa: F401  (re-exported)
from jalign.config import Config, load_config  # noqa: F401
from jalign.trainer import train  # noqa: F401


@dataclasses.dataclass
class Model:
    """A policy ready to sample from: its params, model config, tokenizer and chat template."""

    params: Any
    config: Any  # jalign.config.ModelConfig
    tokenizer: Any  # jalign.data.tokenizer tokenizer
    chat_template: str


def evaluate(cfg: Config) -> dict:
    """The evaluation ``train`` runs (the algorithm's eval metrics on ``data.eval`` and the generation-based
    eval on ``eval.prompts``), once, of the policy the config starts from (``model.init_from=run:DIR``,
    ``model.hf_path`` or ``roles``), without training. Writes nothing but the sample completions
    (``train.out_dir/samples.jsonl``, with ``eval.log_samples``)."""
    from jalign.roles import build_roles
    from jalign.trainer import evaluate as evaluate_state
    from jalign.trainer import setup
    from sharding.rules import use_rules

    rt, algo = setup(cfg)
    rt.log = lambda *_: None
    with use_rules(rt.mesh, rt.rules):
        roles = build_roles(cfg, algo.role_specs(), rt.mesh, rt.rules, log=rt.log)
        state = algo.init_state(roles)
        algo.start(state, roles)
        return evaluate_state(algo, state, roles, 0)


def load_model(spec: str | Path, seed: int = 0) -> Model:
    """A jalign run directory (its newest checkpoint), a Hugging Face directory, a ``jalign convert --out``
    directory or a jalign YAML config, on one device (as ``jalign generate --model``)."""
    from jalign.data.tokenizer import check_vocab, load_tokenizer
    from jalign.generate import _load_model

    params, cfg, tok_spec, template = _load_model(str(spec), seed)
    tok = load_tokenizer(tok_spec)
    check_vocab(cfg.vocab_size, tok, f"{spec}: the model's vocab_size")
    return Model(params=params, config=cfg, tokenizer=tok, chat_template=template)


def generate_text(model: Model, prompts: Sequence, *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat_template: Optional[str] = None) -> list[str]:
    """The responses to ``prompts`` (strings or ``[{role, content}, ...]`` conversations), rendered with the
    model's chat template; ``temperature <= 0`` is greedy. The end token is not part of a response."""
    from jalign.data.chat import encode_prompt
    from jalign.generate import generate

    tok = model.tokenizer
    template = chat_template or model.chat_template
    encoded = [encode_prompt(p, template, tok) for p in prompts]
    res = generate(model.params, model.config, encoded, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_ids=sorted(tok.eos_ids),
                   pad_id=tok.pad_id if tok.pad_id is not None else 0, rng=seed)
    out = []
    for j in range(len(prompts)):
        ids = res["tokens"][j, :int(res["lengths"][j])].tolist()
        if res["ended_with_eos"][j]:
            ids = ids[:-1]
        out.append(tok.decode([i for i in ids if i < tok.vocab_size]))  # the vocab may be padded past the tokenizer
    return out


def export_hf(run: str | Path, out_dir: str | Path, dtype: Optional[str] = None) -> Path:
    """A Hugging Face directory (config.json, safetensors, the tokenizer files) of a run's newest checkpoint
    (or of ``RUN/checkpoints/N``), as ``jalign convert --from-checkpoint RUN --to-hf OUT``. A LoRA run's
    checkpoint holds the adapters only: export it with ``train.export_hf`` (merged weights + PEFT adapter)."""
    from jalign.config import ConfigError
    from jalign.models.hf_io import _tokenizer_dir, checkpoint_config_path, load_params_checkpoint, save_hf

    cfg_path = checkpoint_config_path(run)
    if cfg_path is None:
        raise ConfigError(f"export_hf({run!s}): no config.yaml beside the checkpoint or in its run directory")
    cfg = load_config(cfg_path).model
    save_hf(load_params_checkpoint(run, cfg), cfg, out_dir, tokenizer_dir=_tokenizer_dir(cfg), dtype=dtype)
    return Path(out_dir)
