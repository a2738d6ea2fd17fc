"""Model-agnostic parallelism for jalign: device meshes, logical-axis rules, ring attention."""
from sharding.mesh import AXES, make_mesh
from sharding.ring_attention import from_zigzag, ring_attention, ring_attention_auto, to_zigzag, zigzag_batch
from sharding.rules import (
    DEFAULT_RULES,
    ShardingRuleError,
    constrain,
    logical_to_spec,
    make_rules,
    named_sharding,
    use_rules,
    validate_param_specs,
)

__all__ = [
    "AXES", "make_mesh", "DEFAULT_RULES", "ShardingRuleError", "constrain", "logical_to_spec",
    "make_rules", "named_sharding", "use_rules", "validate_param_specs",
    "ring_attention", "ring_attention_auto", "to_zigzag", "from_zigzag", "zigzag_batch",
]
