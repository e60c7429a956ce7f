"""numpy's pairwise float summation, reproduced bit for bit in torch (:func:`pairwise_sum`): what lets
the device engine (:mod:`spice_ray.select.device_engine`) compute the canonical per-row values of
:mod:`spice_ray.select.state` on the device, identical to the host's.

torch only (imported where used), no Ray.
"""

from __future__ import annotations

from typing import Any

_PW_LEAF = 128  # numpy's PW_BLOCKSIZE: pairwise summation's unrolled leaf


def _leaf_sum(x: Any) -> Any:
    """numpy's pairwise sum of ≤ 128 terms over the last axis: 8 running sums, a fixed tree, the rest."""
    import torch

    n = x.shape[-1]
    if n < 8:
        res = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        for i in range(n):
            res = res + x[..., i]
        return res
    m = n - n % 8
    blocks = x[..., :m].unflatten(-1, (m // 8, 8))
    r = blocks[..., 0, :]
    for i in range(1, m // 8):
        r = r + blocks[..., i, :]
    r = r[..., 0::2] + r[..., 1::2]  # r0+r1, r2+r3, r4+r5, r6+r7
    r = r[..., 0::2] + r[..., 1::2]  # (r0+r1)+(r2+r3), (r4+r5)+(r6+r7)
    res = r[..., 0] + r[..., 1]
    for i in range(m, n):
        res = res + x[..., i]
    return res


def pairwise_sum(x: Any) -> Any:
    """Sum over the last axis bit-identically to numpy's float pairwise summation (``a.sum(-1)``).

    numpy sums ≤ 128 terms with 8 interleaved accumulators, and splits longer runs at
    ``n/2`` rounded down to a multiple of 8. When ``n = 128·2^j`` all leaves have 128 terms and are
    summed at once (19 elementwise ops for d = 256, whatever the leading shape).
    """
    n = x.shape[-1]
    if n <= _PW_LEAF:
        return _leaf_sum(x)
    leaves = n // _PW_LEAF
    if n % _PW_LEAF == 0 and leaves & (leaves - 1) == 0:
        part = _leaf_sum(x.unflatten(-1, (leaves, _PW_LEAF)))
        while part.shape[-1] > 1:
            part = part[..., 0::2] + part[..., 1::2]
        return part[..., 0]
    n2 = n // 2
    n2 -= n2 % 8
    return pairwise_sum(x[..., :n2]) + pairwise_sum(x[..., n2:])
