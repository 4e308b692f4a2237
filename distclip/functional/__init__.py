"""Pure tensor math: power sums, roots, quantiles, clip coefficients and scaling.

No ``torch.distributed``, no state, no host synchronisation.
"""

from distclip.functional.norms import (
    accumulation_dtype,
    combine_powsums,
    local_powsum,
    powsum_identity,
    powsum_to_norm,
    reduce_op,
    tensor_powsums,
    validate_norm_type,
)
from distclip.functional.quantile import prefix_quantile
from distclip.functional.random import step_uniform
from distclip.functional.scaling import (
    DEFAULT_EPS,
    clamp_,
    clip_coefficient,
    scale_,
    skip_aware_coefficient,
)

__all__ = [
    "DEFAULT_EPS",
    "accumulation_dtype",
    "clamp_",
    "clip_coefficient",
    "combine_powsums",
    "local_powsum",
    "powsum_identity",
    "powsum_to_norm",
    "prefix_quantile",
    "reduce_op",
    "scale_",
    "skip_aware_coefficient",
    "step_uniform",
    "tensor_powsums",
    "validate_norm_type",
]
