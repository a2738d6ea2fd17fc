"""What an algorithm trains: every parameter of its model, or LoRA adapters (+ heads) over a frozen base.

    t = Trainable(cfg.model, decls)            # decls: the full model the algorithm declares (heads included)
    t.decls                                    # what the optimizer, the train state and checkpoints hold
    t.role_specs()                             # {"base": ...} under LoRA: the frozen base is a role
    params = t.forward_params(state.params, roles, key)   # what transformer.forward takes (inside jit)
    ref = t.reference(roles)                   # the reference model: roles.reference, or (LoRA) the base itself

Under ``model.lora`` the base is a role like any frozen model (built by ``jalign.roles.build_roles`` from the
policy's source, optionally stored quantised with ``model.quantize_base``; never in an optimizer, never donated,
never checkpointed, rebuilt on resume); the trained parameters are the adapters of ``jalign.models.lora`` plus
the heads the algorithm adds (a reward model's score head). In the DPO family and RL the reference defaults to
that base with the adapters switched off, so it costs no second copy of the model.
"""
from __future__ import annotations

from typing import Optional

import jax

from jalign.config import ModelConfig
from jalign.models import fp8 as fp8_lib
from jalign.models import lora as lora_lib
from jalign.models import params as params_lib
from jalign.roles import RoleSpec

HEADS = ("score", "score_bias")
BASE = "base"


class Trainable:
    def __init__(self, cfg: ModelConfig, decls: dict):
        self.cfg, self.full_decls = cfg, decls
        self.lora = cfg.lora
        if cfg.quantize_base and self.lora is None:
            from jalign.config import ConfigError

            raise ConfigError("model.quantize_base stores a frozen base quantised: it needs model.lora (the adapters "
                              "are what trains)")
        if cfg.matmul_fp8 and cfg.quantize_base:
            from jalign.config import ConfigError

            raise ConfigError(f"model.matmul_fp8 with model.quantize_base={cfg.quantize_base!r}: the frozen base is "
                              "already stored quantised and would be quantised a second time for fp8; use one of them")
        if self.lora is None:
            self.decls = decls
            return
        self.heads = {k: v for k, v in decls.items() if k in HEADS}
        self.base_decls = {k: v for k, v in decls.items() if k not in HEADS}
        self.decls = {**lora_lib.declare_lora(cfg, self.lora), **self.heads}

    @property
    def is_lora(self) -> bool:
        return self.lora is not None

    def role_specs(self) -> dict:
        """The frozen base (LoRA only): the policy's starting weights, without the heads it trains."""
        if not self.is_lora:
            return {}
        return {BASE: RoleSpec(lm_head="lm_head" in self.full_decls or self.cfg.tie_embeddings,
                               score_outputs=0, what="frozen base (LoRA)", quantize=self.cfg.quantize_base)}

    def forward_params(self, params, roles, key: Optional[jax.Array] = None):
        """The params the model's forward pass takes: ``params`` itself, or the base with the adapters
        applied (``key`` turns on LoRA dropout; None in evaluation and generation). With ``model.matmul_fp8``
        the layers' linear weights (under LoRA: the base's; the adapters stay in the compute dtype) are
        wrapped to run their matmuls in fp8 (``jalign.models.fp8``)."""
        fp8_on = self.cfg.matmul_fp8
        if not self.is_lora:
            return fp8_lib.with_fp8(params) if fp8_on else params
        base = fp8_lib.with_fp8(roles[BASE]) if fp8_on else roles[BASE]
        return lora_lib.with_adapters(base, params, self.lora, key=key)

    def reference(self, roles):
        """The reference policy: the ``reference`` role, else under LoRA the base with the adapters off."""
        if "reference" in roles:
            return roles["reference"]
        if self.is_lora:
            return roles[BASE]
        raise KeyError("no reference role")

    def init_params(self, rt, load_full) -> dict:
        """The starting trained params: ``load_full(decls, allow_fresh)`` for a full model; under LoRA fresh
        adapters (B = 0: training starts exactly at the base) and the heads from the source where it has them."""
        if not self.is_lora:
            return load_full(self.decls)
        from jalign.roles import policy_init_seed

        adapters = params_lib.init_params({"layers": self.decls["layers"]}, policy_init_seed(rt.cfg.train.seed),
                                          params_lib.DTYPES[self.cfg.param_dtype],
                                          params_lib.param_shardings({"layers": self.decls["layers"]}, rt.mesh,
                                                                     rt.rules))
        heads = load_full(self.heads) if self.heads else {}
        return {**adapters, **heads}

    def summary(self) -> dict:
        """Trainable / total parameter counts, for the log."""
        n = lora_lib.param_count(self.decls)
        total = lora_lib.param_count(self.full_decls) + (n if self.is_lora else 0)
        return {"trainable_params": float(n), "total_params": float(total)}

    # ---- export ---------------------------------------------------------------------------------
    def merged(self, params, roles):
        """Plain params of the trained model (adapters folded into the base), for export."""
        if not self.is_lora:
            return params
        return lora_lib.merge_adapters(roles[BASE], params, self.lora)

    def export_adapter(self, params, out_dir: str, base_name: Optional[str] = None) -> None:
        """A PEFT adapter directory (``peft.PeftModel.from_pretrained(hf_base, out_dir)``)."""
        from jalign.models.peft_io import save_peft

        save_peft({"layers": params["layers"]}, self.lora, self.cfg, out_dir, base_model_name_or_path=base_name)
