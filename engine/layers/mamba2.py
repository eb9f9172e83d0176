"""The Mamba2 mixer on a flat varlen batch, with per-sequence state slots.

Per token: in_proj -> (z, xBC, dt); a causal depthwise conv over xBC (its last d_conv - 1
inputs are the conv state), silu, split into x (heads x head_dim), B and C (n_groups x
d_state); the selective SSM h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t;
then a gated RMSNorm (norm(y * silu(z)), per group) and out_proj.

Prefills run the chunked scan (state-space duality, SSD): inside a chunk the SSM is a masked
attention-like matmul, and only chunk-boundary states go through the recurrence. Decodes run
the recurrence for one token, batched over sequences. `recurrent_scan` is the token-by-token
oracle the tests compare the chunked scan against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier.engine.attention.ssm_metadata import NO_SLOT, SsmMetadata, SsmSeq
from kvtier.engine.kv_cache.specs import MambaSpec
from kvtier.engine.layers.batch_invariant import exact_silu, exact_softplus
from kvtier.engine.layers.linear import Linear


def _per_head(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., n_groups, d_state] -> [..., num_heads, d_state]: consecutive heads share a group."""
    return t.repeat_interleave(num_heads // t.shape[-2], dim=-2)


def _decay_matrix(a: torch.Tensor) -> torch.Tensor:
    """a [..., Q] log-decays -> [..., Q, Q] with [i, j] = exp(a_{j+1} + ... + a_i) for i >= j, else 0.

    Sums the masked increments instead of subtracting two cumulative sums, which would lose
    precision (and overflow exp above the diagonal) for long chunks."""
    q = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, q)  # [k, j] = a_k
    strictly_below = torch.ones(q, q, dtype=torch.bool, device=a.device).tril(-1)
    sums = rows.masked_fill(~strictly_below, 0.0).cumsum(dim=-2)
    causal = torch.ones(q, q, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~causal, float("-inf")).exp()


def chunked_scan(x, dt, A, B, C, chunk_size: int, state):
    """SSD scan of one sequence (float32, no D term).

    x [L, H, P], dt [L, H] (after softplus/clamp), A [H] (negative), B, C [L, G, N],
    state [H, P, N] at the start. Returns (y [L, H, P], state after the last token)."""
    length, heads, p = x.shape
    if length == 0:
        return x.new_zeros(0, heads, p), state
    pad = -length % chunk_size
    B, C = _per_head(B, heads), _per_head(C, heads)
    xdt = x * dt[..., None]
    a = dt * A  # log of each step's decay

    def chunks(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad))  # zero tokens at the end change nothing
        return t.reshape(-1, chunk_size, *t.shape[1:])

    xdt, a, B, C = chunks(xdt), chunks(a).transpose(1, 2), chunks(B), chunks(C)  # a: [c, H, Q]
    cum = a.cumsum(-1)
    # Within a chunk: y_l = sum_{s <= l} (C_l . B_s) decay(s -> l) xdt_s.
    scores = torch.einsum("clhn,cshn->chls", C, B) * _decay_matrix(a)
    y = torch.einsum("chls,cshp->clhp", scores, xdt)
    # What each chunk adds to the state at its end, and the decay across a whole chunk.
    to_end = (cum[..., -1:] - cum).exp()  # [c, H, Q]
    added = torch.einsum("clhn,chl,clhp->chpn", B, to_end, xdt)
    through = cum[..., -1].exp()  # [c, H]
    starts = []
    for c in range(xdt.shape[0]):
        starts.append(state)
        state = state * through[c, :, None, None] + added[c]
    # From the state at the chunk start: y_l += decay(start -> l) C_l . h_start.
    y = y + torch.einsum("clhn,chpn,chl->clhp", C, torch.stack(starts), cum.exp())
    return y.reshape(-1, heads, p)[:length], state


def recurrent_step(x, dt, A, B, C, state):
    """One token for a batch: x [S, H, P], dt [S, H], B, C [S, G, N], state [S, H, P, N]
    -> (y [S, H, P] without D, new state)."""
    heads = x.shape[1]
    B, C = _per_head(B, heads), _per_head(C, heads)
    decay = (dt * A).exp()[..., None, None]
    state = state * decay + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    # A plain row-wise sum rather than einsum: einsum's matmul picks its kernel by batch size,
    # and deterministic mode needs a row's bits independent of the batch.
    return (state * C[:, :, None, :]).sum(-1), state


def recurrent_scan(x, dt, A, B, C, state):
    """Token-by-token reference for `chunked_scan` (same arguments, no chunk size)."""
    ys = []
    for t in range(x.shape[0]):
        y, s = recurrent_step(x[t : t + 1], dt[t : t + 1], A, B[t : t + 1], C[t : t + 1], state[None])
        ys.append(y[0])
        state = s[0]
    return (torch.stack(ys) if ys else x.new_zeros(x.shape)), state


class GatedRMSNorm(torch.nn.Module):
    """RMSNorm of y * silu(z), normalised separately over each of `n_groups` channel groups."""

    def __init__(self, size: int, n_groups: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))
        self.n_groups, self.eps = n_groups, eps
        self.exact = False  # deterministic mode: exact_silu

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = y.float() * (exact_silu(z.float()) if self.exact else F.silu(z.float()))
        h = h.unflatten(-1, (self.n_groups, -1))
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return self.weight * h.to(y.dtype)


class Mamba2Mixer(torch.nn.Module):
    """One Mamba2 layer; `mcfg` is a ModelArchConfig.mamba (MambaConfig)."""

    def __init__(self, hidden_size: int, mcfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.group: int | None = None  # KV group, set by bind_cache
        self.heads, self.head_dim, self.d_state = mcfg.n_heads, mcfg.head_dim, mcfg.d_state
        self.n_groups, self.d_conv, self.chunk_size = mcfg.n_groups, mcfg.d_conv, mcfg.chunk_size
        self.dt_min, self.dt_max = mcfg.time_step_limit
        self.inner = self.heads * self.head_dim
        self.conv_dim = self.inner + 2 * self.n_groups * self.d_state
        self.in_proj = Linear(hidden_size, self.inner + self.conv_dim + self.heads, bias=mcfg.proj_bias)
        # Depthwise conv weight as HF stores it: [conv_dim, 1, d_conv].
        self.conv_weight = torch.nn.Parameter(torch.empty(self.conv_dim, 1, self.d_conv))
        self.conv_bias = torch.nn.Parameter(torch.empty(self.conv_dim)) if mcfg.conv_bias else None
        self.dt_bias = torch.nn.Parameter(torch.empty(self.heads))
        self.A_log = torch.nn.Parameter(torch.empty(self.heads))
        self.D = torch.nn.Parameter(torch.empty(self.heads))
        self.norm = GatedRMSNorm(self.inner, self.n_groups, mcfg.norm_eps)
        self.out_proj = Linear(self.inner, hidden_size, bias=mcfg.proj_bias)
        self.conv_states: torch.Tensor | None = None  # [slots, conv_dim, d_conv - 1], views of the pool
        self.ssm_states: torch.Tensor | None = None  # [slots, heads, head_dim, d_state]
        self.backend = "torch"
        self.exact = False  # deterministic mode: exact element-wise functions, token recurrence

    def kv_spec(self) -> MambaSpec:
        return MambaSpec(conv_shape=(self.conv_dim, self.d_conv - 1),
                         ssm_shape=(self.heads, self.head_dim, self.d_state))

    def bind_cache(self, pool: torch.Tensor, group: int, index_in_group: int, backend: str) -> None:
        """pool: [num_slots, layers_in_group, MambaSpec.numel]; keeps views of this layer's part."""
        spec = self.kv_spec()
        if pool.dim() != 3 or pool.shape[2] != spec.numel:
            raise ValueError(f"layer {self.layer_idx}: state pool of shape {tuple(pool.shape)} does not hold "
                             f"[slots, layers, {spec.numel}]")
        mine = pool[:, index_in_group]
        self.group, self.backend = group, backend
        self.conv_states = mine[:, : spec.conv_numel].unflatten(1, spec.conv_shape)
        self.ssm_states = mine[:, spec.conv_numel :].unflatten(1, spec.ssm_shape)

    def _dt(self, dt_raw: torch.Tensor) -> torch.Tensor:
        softplus = exact_softplus if self.exact else F.softplus
        return softplus(dt_raw.float() + self.dt_bias.float()).clamp(self.dt_min, self.dt_max)

    def _split(self, xbc: torch.Tensor):
        """Conv'd, activated xBC [n, conv_dim] -> x [n, H, P], B, C [n, G, N] in float32."""
        x, b, c = xbc.float().split([self.inner, self.n_groups * self.d_state, self.n_groups * self.d_state], -1)
        groups = (self.n_groups, self.d_state)
        return x.unflatten(-1, (self.heads, self.head_dim)), b.unflatten(-1, groups), c.unflatten(-1, groups)

    def forward(self, hidden: torch.Tensor, meta) -> torch.Tensor:
        """hidden [T, hidden_size] -> [T, hidden_size]; reads and writes state slots per `meta`."""
        if self.ssm_states is None:
            raise RuntimeError(f"layer {self.layer_idx}: state pool is not bound; call bind_cache() first")
        ssm: SsmMetadata = meta.groups[self.group]
        z, xbc, dt_raw = self.in_proj(hidden).split([self.inner, self.conv_dim, self.heads], dim=-1)
        dt = self._dt(dt_raw)
        y = torch.empty(hidden.shape[0], self.heads, self.head_dim, dtype=torch.float32, device=hidden.device)
        for seq in ssm.prefill_seqs:
            rows = slice(seq.q_start, seq.q_start + seq.q_len)
            prefill = self._prefill_tokens if seq.invariant else self._prefill
            y[rows] = prefill(seq, xbc[rows], dt[rows])
        if ssm.decode_rows.numel():
            y[ssm.decode_rows] = self._decode(ssm, xbc[ssm.decode_rows], dt[ssm.decode_rows])
        out = self.norm(y.flatten(1), z.float())
        return self.out_proj(out.to(hidden.dtype))

    def _conv(self, padded: torch.Tensor, n: int) -> torch.Tensor:
        """padded [conv_dim, d_conv - 1 + n] (conv state, then new inputs) -> silu(conv) [n, conv_dim]."""
        out = F.conv1d(padded[None].to(self.conv_weight.dtype), self.conv_weight, self.conv_bias,
                       groups=self.conv_dim)
        return F.silu(out[0, :, :n]).t()

    def _prefill(self, seq: SsmSeq, xbc: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        n, keep = seq.q_len, self.d_conv - 1
        if seq.init_slot == NO_SLOT:
            conv = xbc.new_zeros(self.conv_dim, keep)
            state = xbc.new_zeros(self.heads, self.head_dim, self.d_state, dtype=torch.float32)
        else:
            # Copies: the init slot may also be the live slot, which is written below.
            conv, state = self.conv_states[seq.init_slot], self.ssm_states[seq.init_slot].float().clone()
        padded = torch.cat([conv.to(xbc.dtype), xbc.t()], dim=1)  # inputs before the chunk, then the chunk
        x, B, C = self._split(self._conv(padded, n))
        A = -self.A_log.float().exp()
        ys, done = [], 0
        # Split the scan where a checkpoint wants the state, carrying it across segments.
        for end, slot in [*seq.checkpoints, (n, seq.live_slot)]:
            if not 0 <= end <= n or end < done:
                raise ValueError(f"checkpoint at {end} tokens is outside the {n}-token chunk or out of order")
            y, state = chunked_scan(x[done:end], dt[done:end], A, B[done:end], C[done:end], self.chunk_size, state)
            ys.append(y)
            done = end
            self.conv_states[slot] = padded[:, end : end + keep]
            self.ssm_states[slot] = state
        return torch.cat(ys) + self.D.float()[:, None] * x

    def _decode(self, ssm: SsmMetadata, xbc: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        window = torch.cat([self.conv_states[ssm.decode_init_slots], xbc[:, :, None].to(self.conv_states.dtype)], 2)
        y, state = self._token(window, dt, self.ssm_states[ssm.decode_init_slots].float())
        self.conv_states[ssm.decode_live_slots] = window[:, :, 1:]
        self.ssm_states[ssm.decode_live_slots] = state.to(self.ssm_states.dtype)
        for live, checkpoint in ssm.decode_checkpoints:
            self.conv_states[checkpoint] = self.conv_states[live]
            self.ssm_states[checkpoint] = self.ssm_states[live]
        return y

    def _token(self, window: torch.Tensor, dt: torch.Tensor, state: torch.Tensor):
        """One token per row: window [S, conv_dim, d_conv] (conv state, then the new input),
        dt [S, H], state [S, H, P, N] -> (y [S, H, P] with the D term, new float32 state)."""
        conv = (window.to(self.conv_weight.dtype) * self.conv_weight[:, 0]).sum(-1)
        if self.conv_bias is not None:
            conv = conv + self.conv_bias
        x, B, C = self._split(exact_silu(conv) if self.exact else F.silu(conv))
        y, state = recurrent_step(x, dt, -self.A_log.float().exp(), B, C, state)
        return y + self.D.float()[:, None] * x, state

    def _prefill_tokens(self, seq: SsmSeq, xbc: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """Deterministic mode: the decode step, token by token, storing the state in the
        pool's dtype after each token as a decode does. A token's output and every
        checkpoint are then the same bits however the sequence was split into steps."""
        n = seq.q_len
        if seq.init_slot == NO_SLOT:
            conv = self.conv_states.new_zeros(self.conv_dim, self.d_conv - 1)
            state = self.ssm_states.new_zeros(self.heads, self.head_dim, self.d_state)
        else:
            conv, state = self.conv_states[seq.init_slot].clone(), self.ssm_states[seq.init_slot].clone()
        marks = [*seq.checkpoints, (n, seq.live_slot)]
        if any(not 0 <= end <= n for end, _ in marks) or [e for e, _ in marks] != sorted(e for e, _ in marks):
            raise ValueError(f"checkpoints {seq.checkpoints} are outside the {n}-token chunk or out of order")
        ys, done = [], 0
        for t in range(n + 1):
            while done < len(marks) and marks[done][0] == t:
                self.conv_states[marks[done][1]] = conv
                self.ssm_states[marks[done][1]] = state
                done += 1
            if t == n:
                break
            window = torch.cat([conv, xbc[t, :, None].to(conv.dtype)], 1)
            y, new_state = self._token(window[None], dt[t : t + 1], state[None].float())
            conv, state = window[:, 1:], new_state[0].to(state.dtype)
            ys.append(y[0])
        return torch.stack(ys)
