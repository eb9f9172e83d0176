"""When a request stops: its stop tokens, EOS, max_tokens, or the context running out."""
from __future__ import annotations

from kvtier.engine.request import Request, RequestStatus


def stop_status(req: Request, token: int, max_model_len: int, max_seq_tokens: int | None) -> RequestStatus | None:
    """The status `req` ends with now that it sampled `token`, or None to go on.
    max_seq_tokens: the longest sequence the KV pool can hold alone (None: unbounded)."""
    params = req.sampling_params
    if token in params.stop_token_ids:
        req.stop_reason = token
        return RequestStatus.FINISHED_STOPPED
    if not params.ignore_eos and token in req.eos_token_ids:
        return RequestStatus.FINISHED_STOPPED
    if params.max_tokens is not None and len(req.output_token_ids) >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if req.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    if max_seq_tokens is not None and req.num_tokens > max_seq_tokens:
        return RequestStatus.FINISHED_LENGTH  # the sequence alone would overflow the pool
    return None
