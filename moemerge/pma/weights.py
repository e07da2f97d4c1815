"""Explicit `pma --weights`, as Megatron-LM's `weighted_merge.py` treats manual weights: any
finite numbers, negative ones included (subtractive merges); `--normalize` divides them by their
sum, which must then be positive; without it they are used exactly as given."""

from __future__ import annotations

import math
from collections.abc import Sequence

from moemerge.errors import ConfigError

__all__ = ["effective_weights"]

#: A sum this small beside the weights' magnitudes is zero: dividing by it only amplifies rounding.
_ZERO_SUM = 1e-12


def effective_weights(weights: Sequence[float], *, normalize: bool) -> tuple[list[float], list[str]]:
    """The weights each snapshot gets, and notes for the printout (Megatron's warnings).

    Example: effective_weights([2, -1], normalize=True) == ([2.0, -1.0], [note on negatives]).
    """
    ws = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in ws):
        raise ConfigError(f"--weights: {list(weights)} has a non-finite entry; give finite numbers")
    total = math.fsum(ws)
    scale = max((abs(w) for w in ws), default=0.0)
    notes = []
    if any(w < 0 for w in ws):
        notes.append("--weights has negative values: allowed (a subtractive merge), but the result "
                     "can fall outside the range of the snapshots")
    if normalize:
        if abs(total) <= _ZERO_SUM * scale or scale == 0:
            raise ConfigError(f"--weights: {list(weights)} sum to 0, and --normalize divides by the sum; "
                              "change a weight, or pass --no-normalize to use them as given")
        if total < 0:  # Megatron refuses it too: dividing by it flips the sign of every weight
            raise ConfigError(f"--weights: {list(weights)} sum to {total:.6g}; --normalize needs a positive "
                              "sum (dividing by a negative one flips every weight); fix the signs, or pass "
                              "--no-normalize to use them as given")
        return [w / total for w in ws], notes
    if not math.isclose(total, 1.0, rel_tol=1e-9, abs_tol=1e-12):
        notes.append(f"--weights sum to {total:.12g} and --no-normalize uses them as given: the "
                     "merged tensors are scaled by that total")
    return ws, notes
