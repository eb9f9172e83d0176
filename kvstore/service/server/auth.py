"""Bearer-token auth and namespaces for the kv-server.

Token file: one token per line, optionally followed by the namespaces it may use:

    # token            namespaces (space separated; optional)
    s3cr3t-team-a      team-a
    s3cr3t-admin       team-a team-b

Every call must carry `authorization: Bearer <token>` (an interceptor answers
UNAUTHENTICATED before any handler runs). A call may name a namespace with the
`kvtier-namespace` header; each namespace is a separate key space. With
--namespace-per-token a token only reaches the namespaces listed for it (by default one
private namespace derived from the token): asking for another is PERMISSION_DENIED. Without
it, namespaces are voluntary separation and any authenticated caller may use any of them.

The health service is exempt: load balancers and orchestrators probe it without secrets.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import grpc

AUTH_HEADER = "authorization"
NAMESPACE_HEADER = "kvtier-namespace"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
MAX_NAMESPACE_CHARS = 128
TAG_BYTES = 8  # every stored key starts with its namespace's tag


def _digest(token: str) -> bytes:
    # Tokens are kept and looked up by digest: a dict probe on a hash of the presented token
    # tells a timing attacker nothing about any real token.
    return hashlib.sha256(token.encode()).digest()


def load_token_file(path: str | Path) -> dict[bytes, tuple[str, ...]]:
    """token digest -> namespaces named for it (possibly none); ValueError on a bad file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"auth token file {path}: {e.strerror or e}")
    grants: dict[bytes, tuple[str, ...]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        token, namespaces = fields[0], tuple(fields[1:])
        for ns in namespaces:
            if len(ns) > MAX_NAMESPACE_CHARS:
                raise ValueError(f"auth token file {path}:{lineno}: namespace longer than {MAX_NAMESPACE_CHARS}")
        grants[_digest(token)] = grants.get(_digest(token), ()) + namespaces
    if not grants:
        raise ValueError(f"auth token file {path}: no tokens in it")
    return grants


def namespace_tag(name: str) -> bytes:
    """The fixed-length prefix of the namespace's keys. Fixed length matters: with a bare
    prefix, a caller of one namespace could forge a longer key equal to another's."""
    return hashlib.blake2b(name.encode(), digest_size=TAG_BYTES).digest()


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == AUTH_HEADER and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a known bearer token (health checks excepted)."""

    def __init__(self, token_digests):
        self._digests = frozenset(token_digests)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and _digest(token) in self._digests:
            return handler
        message = "missing bearer token" if token is None else "unknown bearer token"
        return _refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED, message)


def _refusing_handler(like, code: grpc.StatusCode, message: str):
    """A handler of the same streaming kind as `like` that only aborts the call."""

    def refuse(request_or_iterator, context):
        context.abort(code, message)

    kwargs = dict(request_deserializer=like.request_deserializer, response_serializer=like.response_serializer)
    if like.request_streaming and like.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if like.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if like.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


class NamespaceResolver:
    """Maps a call to the tag of the namespace it may use, or aborts it."""

    def __init__(self, grants: dict[bytes, tuple[str, ...]] | None, per_token: bool):
        if per_token and not grants:
            raise ValueError("--namespace-per-token needs --auth-token-file")
        self._per_token = per_token
        # A token with no namespaces listed gets a private one named after its digest.
        self._grants = {
            d: (names or (f"token-{d.hex()[:16]}",)) for d, names in (grants or {}).items()
        }
        self._tags: dict[str, bytes] = {}

    def tenant(self, context: grpc.ServicerContext, tag: bytes) -> bytes:
        """Whom the call's bulk-stream resources count against (limits.py): its token when
        the server checks tokens, else its namespace (callers choose those freely)."""
        token = bearer_token(context.invocation_metadata()) if self._grants else None
        return b"token:" + _digest(token) if token is not None else b"namespace:" + tag

    def tag(self, context: grpc.ServicerContext) -> bytes:
        metadata = context.invocation_metadata()
        requested = None
        for key, value in metadata:
            if key == NAMESPACE_HEADER:
                requested = value
                break
        if requested is not None and len(requested) > MAX_NAMESPACE_CHARS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"namespace longer than {MAX_NAMESPACE_CHARS} characters")
        if self._per_token:
            token = bearer_token(metadata)
            granted = self._grants.get(_digest(token)) if token is not None else None
            if granted is None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
            if requested is None:
                requested = granted[0]
            elif requested not in granted:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"namespace {requested!r} is not granted to this token")
        name = requested or ""
        tag = self._tags.get(name)
        if tag is None:
            tag = namespace_tag(name)
            if len(self._tags) < 4096:  # callers choose names freely without per-token: bound the cache
                self._tags[name] = tag
        return tag
