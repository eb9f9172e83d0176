"""Batch-invariant building blocks for deterministic mode (docs/determinism.md).

A row's result must not depend on how many other rows share the call or where the row
sits among them. Two things break that on stock kernels:

- Matrix multiplies pick their kernel (and so the order of their sums) by shape: on this
  machine's MKL, a 3-row `F.linear` adds its products in a different order than a 16-row one.
  `InvariantMatmul` pads the rows of every product to a multiple of `ROW_TILE`. Whether
  one padded call is then invariant is a property of the BLAS library, so it is checked
  per shape the first time the shape is seen (`_probe`): rows planted at different offsets
  of different row counts must come back bit-identical to the same rows alone in one tile.
  Row counts below `ROW_TILE` that give the same bits as a full tile are found the same
  way and used as they are (a 4-row decode then pays for 4 rows, not 16). A shape that
  fails runs tile by tile (every call then has exactly `ROW_TILE` rows), and if even a
  tile is not invariant to row order, row by row.
- Some element-wise functions have a vectorised body and a scalar tail that round
  differently (silu, sigmoid, softplus here), so an element's bits depend on where a
  thread's chunk happens to end, i.e. on the batch size. `exact_silu` / `exact_softplus`
  are written with `exp`, add and divide, which round the same on both paths (checked in
  tests/test_batch_invariant_ops.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROW_TILE = 16
_PROBE_ROWS = (ROW_TILE, 32, 48, 80, 256)  # row counts a probed tile is planted into
_PROBE_BATCHES = (1, 2, 3, 8, 33, 130)  # batch counts a batched product is probed with


def exact_silu(x: torch.Tensor) -> torch.Tensor:
    denominator = torch.neg(x).exp_().add_(1.0)
    return torch.div(x, denominator, out=denominator)


def exact_softplus(x: torch.Tensor, threshold: float = 20.0) -> torch.Tensor:
    """log(1 + e^x), linear above `threshold` like F.softplus."""
    return torch.where(x > threshold, x, torch.log1p(torch.exp(x.clamp(max=threshold))))


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [..., M, K] -> a contiguous tensor with `rows` rows (zeros below)."""
    if x.shape[-2] == rows and x.is_contiguous():
        return x
    out = x.new_zeros(*x.shape[:-2], rows, x.shape[-1])
    out[..., : x.shape[-2], :] = x
    return out


@dataclass(frozen=True)
class _Plan:
    """How one shape runs: `padded` (rows padded to the next verified count: one of `small`
    below ROW_TILE, else a multiple of ROW_TILE), `tiles` (ROW_TILE rows per call) or `rows`."""

    kind: str
    small: tuple[int, ...] = ()

    def padded_rows(self, m: int) -> int:
        for n in self.small:
            if n >= m:
                return n
        return max(ROW_TILE, -(-m // ROW_TILE) * ROW_TILE)


class InvariantMatmul:
    """Row-invariant `linear` and batched `matmul`, with a plan chosen per shape."""

    def __init__(self) -> None:
        self.plans: dict[tuple, _Plan] = {}  # (op, K, N, dtype, device type) -> plan

    @property
    def strategies(self) -> dict[tuple, str]:
        return {key: plan.kind for key, plan in self.plans.items()}

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(x, weight, bias) for x [T, K], each row's bits independent of T."""
        def op(a, _=None):
            return F.linear(a, weight, bias)

        key = ("linear", weight.shape[1], weight.shape[0], x.dtype, x.device.type)
        plan = self.plans.get(key) or self._probe(key, x.dtype, x.device, batched=False,
                                                  probe_op=lambda a: op(a[0]).unsqueeze(0))
        if plan.kind == "padded":
            return self._padded(plan, x, op)
        return self._tiled(plan, x[None], x.new_empty(1, 0, 0), op)[0]

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a [U, M, K] @ b [U, K, N], each row's bits independent of M and of U."""
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0]:
            raise ValueError(f"matmul: expected [U, M, K] @ [U, K, N], got {tuple(a.shape)} @ {tuple(b.shape)}")
        key = ("matmul", a.shape[-1], b.shape[-1], a.dtype, a.device.type)
        plan = self.plans.get(key)
        if plan is None:
            probe_b = torch.randn(max(_PROBE_BATCHES), *b.shape[-2:], generator=torch.Generator().manual_seed(1)).to(b)
            # The probed tile always sits in the last batch entry, so it always meets probe_b[-1].
            # (probe_b is contiguous where a real b may be a strided view: the tests check the
            # strided uses end to end.)
            plan = self._probe(key, a.dtype, a.device, batched=True,
                               probe_op=lambda x: torch.matmul(x, probe_b[probe_b.shape[0] - x.shape[0]:]))
        if plan.kind == "padded":
            return self._padded(plan, a, lambda x: torch.matmul(x, b))
        return self._tiled(plan, a, b, torch.matmul)

    # -- plans ---------------------------------------------------------------------------------

    @staticmethod
    def _padded(plan: _Plan, x: torch.Tensor, op) -> torch.Tensor:
        m = x.shape[-2]
        rows = plan.padded_rows(m)
        out = op(_pad_rows(x, rows))
        return out if rows == m else out[..., :m, :]

    @staticmethod
    def _tiled(plan: _Plan, x: torch.Tensor, b: torch.Tensor, op) -> torch.Tensor:
        """Every call has the same shape: one batch entry and `step` rows (the last part padded)."""
        step = ROW_TILE if plan.kind == "tiles" else 1
        m = x.shape[-2]
        outs = []
        for i in range(x.shape[0]):
            bi = b[i : i + 1] if b.numel() else None
            parts = [op(_pad_rows(x[i : i + 1, j : j + step], step), bi)[:, : min(step, m - j)] for j in range(0, m, step)]
            outs.append(torch.cat(parts, dim=1))
        return torch.cat(outs)

    def _probe(self, key: tuple, dtype: torch.dtype, device: torch.device, batched: bool, probe_op) -> _Plan:
        """The fastest plan this library gets right for this shape (see the module doc).
        `probe_op` maps a [B, M, K] batch to [B, M, N]; the row tile under test is always put
        in the last batch entry and compared with the same tile computed alone."""
        k = key[1]
        gen = torch.Generator().manual_seed(0)
        batches = _PROBE_BATCHES if batched else (1,)

        def rand(count: int, rows: int) -> torch.Tensor:
            return torch.randn(count, rows, k, generator=gen).to(dtype=dtype, device=device)

        tile = rand(1, ROW_TILE)
        alone = probe_op(tile)

        def same(rows: int, offset: int, count: int, width: int = ROW_TILE) -> bool:
            x = rand(count, rows)
            x[-1, offset : offset + width] = tile[0, :width]
            return torch.equal(probe_op(x)[-1:, offset : offset + width], alone[:, :width])

        if all(same(rows, offset, count) for count in batches for rows in _PROBE_ROWS
               for offset in {0, min(rows - ROW_TILE, (rows - ROW_TILE) // 8 * 4 + 1), rows - ROW_TILE}):
            small = tuple(m for m in range(1, ROW_TILE) if all(same(m, 0, count, m) for count in batches))
            plan = _Plan("padded", small)
        else:
            perm = torch.randperm(ROW_TILE, generator=gen)
            plan = _Plan("tiles" if torch.equal(probe_op(tile[:, perm].contiguous()), alone[:, perm]) else "rows")
        self.plans[key] = plan
        return plan
