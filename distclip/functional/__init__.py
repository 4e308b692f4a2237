"""Pure tensor math: power sums, roots, quantiles, clip coefficients and scaling.

No ``torch.distributed``, no state, no host synchronisation.
"""

from distclip.functional.norms import (
    accumulation_dtype,
    combine_powsums,
    local_norm,
    local_powsum,
    powsum_identity,
    powsum_to_norm,
    reduce_op,
    tensor_powsums,
    validate_norm_type,
)
from distclip.functional.quantile import (
    QuantileTable,
    prefix_quantile,
    quantile_table,
    sorted_prefix_quantile,
)
from distclip.functional.random import step_uniform
from distclip.functional.scaling import (
    DEFAULT_EPS,
    clamp_,
    clip_coefficient,
    scale_,
    scale_each_,
    skip_aware_coefficient,
)

__all__ = [
    "DEFAULT_EPS",
    "QuantileTable",
    "accumulation_dtype",
    "clamp_",
    "clip_coefficient",
    "combine_powsums",
    "local_norm",
    "local_powsum",
    "powsum_identity",
    "powsum_to_norm",
    "prefix_quantile",
    "quantile_table",
    "reduce_op",
    "scale_",
    "scale_each_",
    "skip_aware_coefficient",
    "sorted_prefix_quantile",
    "step_uniform",
    "tensor_powsums",
    "validate_norm_type",
]
