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
from jalign.losses.reward import bt_loss, bt_margin_loss, bt_scaled_loss, regression_loss
from jalign.losses.sft import sft_loss

__all__ = [
    # ops
    "chunked_token_logps", "masked_mean", "masked_sum", "safe_divide", "sequence_logps", "token_logps",
    # sft
    "sft_loss",
    # reward models
    "bt_loss", "bt_margin_loss", "bt_scaled_loss", "regression_loss",
    # direct preference
    "dpo_loss", "ipo_loss", "rpo_sq_loss", "rpo_fwd_kl_loss", "rpo_bwd_kl_loss", "dpo_sft_term",
    "dpo_sft_seq_term",
    # RL
    "kl_k1", "kl_k2", "kl_k3", "kl_abs", "token_rewards", "gae", "masked_moments", "moments_to_mean_var",
    "whiten", "whiten_with_moments", "ppo_policy_loss", "entropy_bonus", "ppo_value_loss",
    "explained_variance", "rloo_advantages", "reinforce_loss", "grpo_advantages", "grpo_loss",
    "adaptive_kl_coef",
]
