"""Bearer-token authentication as a gRPC server interceptor (the pattern of grpc's examples/python/auth).

Clients send ``authorization: Bearer <token>`` metadata (the scheme matched case-insensitively, as
RFC 7235 says). Health checks and reflection stay open so load balancers and ``grpcurl`` work without
the token. The interceptor runs when the call's metadata has arrived: a refused call is answered by a
client-streaming handler that never reads the request, so an unauthenticated body is not read.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from cxr_monai.errors import CXRMonaiError

#: Methods reachable without a token (prefixes of the full method name).
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def read_token_file(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace and the trailing newline stripped).

    Raises:
        CXRMonaiError: the file cannot be read or holds no token.
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CXRMonaiError(f"{path}: cannot read the token file ({type(exc).__name__})") from exc
    if not token or any(c.isspace() for c in token):
        raise CXRMonaiError(f"{path}: the token file must hold one token (no spaces), found none")
    return token


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Reject calls whose ``authorization`` metadata is not exactly one ``Bearer <token>`` with
    UNAUTHENTICATED (two headers are refused even when one holds the token)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("token must not be empty")
        self._expected = token.encode()

        def deny(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny = grpc.stream_unary_rpc_method_handler(deny)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method or ""
        if method.startswith(OPEN_METHODS):
            return continuation(handler_call_details)
        # more than one authorization header is refused, whatever their order: which one a proxy or a
        # library would read is not defined, so neither may decide
        metadata = handler_call_details.invocation_metadata or ()
        values = [value for key, value in metadata if key.lower() == "authorization"]
        if len(values) != 1:
            return self._deny
        scheme, _, given = str(values[0]).strip().partition(" ")
        # constant-time comparison: the token must not leak through response timing
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny
