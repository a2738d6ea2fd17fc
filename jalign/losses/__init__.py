"""Pure loss functions and ops for alignment. Imports only jax and numpy.

Every loss takes arrays (log-probs, rewards, values, masks) and returns ``(loss, metrics)``.
Divisors are explicit: pass the *global* count (valid tokens or valid sequences in the whole
optimizer batch) so the result does not depend on how the batch is split into micro-batches.
Metrics are contributions to a mean over that same global count, so they are summed over micro-batches.
"""
from jalign.losses.dpo import (
    dpo_loss,
    dpo_sft_seq_term,
    dpo_sft_term,
    ipo_loss,
    rpo_bwd_kl_loss,
    rpo_fwd_kl_loss,
    rpo_sq_loss,
)
from jalign.losses.distill import (
    chunked_logps_at,
    generalized_jsd_loss,
    kd_topk_bwd_loss,
    kd_topk_loss,
    reverse_kl_distill_loss,
    teacher_topk,
    token_generalized_jsd,
)
from jalign.losses.judge import judge_preference
from jalign.losses.ops import (
    chunked_token_logps,
    masked_mean,
    masked_sum,
    safe_divide,
    sequence_logps,
    token_logps,
)
from jalign.losses.ppo import (
    adaptive_kl_coef,
    entropy_bonus,
    explained_variance,
    gae,
    grpo_advantages,
    grpo_loss,
    kl_abs,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_moments,
    moments_to_mean_var,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_loss,
    rloo_advantages,
    token_rewards,
    whiten,
    whiten_with_moments,
)
from jalign.losses.preference import (
    apo_down_loss,
    apo_zero_loss,
    bco_delta_update,
    bco_pair_loss,
    kto_kl_estimate,
    kto_loss,
    kto_mismatched_indices,
    nca_pair_loss,
    robust_dpo_loss,
    slic_loss,
    spin_loss,
    sppo_hard_loss,
)
from jalign.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from jalign.losses.reward import bt_loss, bt_margin_loss, bt_scaled_loss, regression_loss
from jalign.losses.rl import (
    cispo_loss,
    dapo_policy_loss,
    dual_clip_ppo_loss,
    dynamic_sampling_keep,
    grpo_clip_higher_loss,
    gspo_loss,
    overlong_penalty,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    reinforce_pp_loss,
    rollout_mismatch_metrics,
    sequence_mis_weights,
    sequence_tis_weights,
    token_tis_weights,
)
from jalign.losses.sft import sft_loss
from jalign.losses.steer import gaussian_attribute_logps, group_mean_length, steerlm2_loss, steerlm2_weights

__all__ = [
    # ops
    "chunked_token_logps", "masked_mean", "masked_sum", "safe_divide", "sequence_logps", "token_logps",
    # sft
    "sft_loss",
    # reward models
    "bt_loss", "bt_margin_loss", "bt_scaled_loss", "regression_loss",
    # direct preference
    "dpo_loss", "ipo_loss", "rpo_sq_loss", "rpo_fwd_kl_loss", "rpo_bwd_kl_loss", "dpo_sft_term",
    "dpo_sft_seq_term", "kto_loss", "kto_kl_estimate", "kto_mismatched_indices", "slic_loss", "robust_dpo_loss",
    "apo_zero_loss", "apo_down_loss", "sppo_hard_loss", "nca_pair_loss", "bco_pair_loss", "bco_delta_update",
    "spin_loss",
    # reference-free preference
    "orpo_loss", "simpo_loss", "cpo_loss",
    # SteerLM 2.0
    "gaussian_attribute_logps", "steerlm2_weights", "group_mean_length", "steerlm2_loss",
    # judge labels (RLAIF)
    "judge_preference",
    # distillation
    "chunked_logps_at", "teacher_topk", "kd_topk_loss", "kd_topk_bwd_loss", "token_generalized_jsd",
    "generalized_jsd_loss", "reverse_kl_distill_loss",
    # RL
    "kl_k1", "kl_k2", "kl_k3", "kl_abs", "token_rewards", "gae", "masked_moments", "moments_to_mean_var",
    "whiten", "whiten_with_moments", "ppo_policy_loss", "entropy_bonus", "ppo_value_loss",
    "explained_variance", "rloo_advantages", "reinforce_loss", "grpo_advantages", "grpo_loss",
    "adaptive_kl_coef", "dapo_policy_loss", "grpo_clip_higher_loss", "overlong_penalty", "dynamic_sampling_keep",
    "gspo_loss", "cispo_loss", "dual_clip_ppo_loss", "reinforce_pp_advantages", "reinforce_pp_baseline_advantages",
    "reinforce_pp_loss", "rollout_mismatch_metrics", "token_tis_weights", "sequence_tis_weights",
    "sequence_mis_weights",
]
