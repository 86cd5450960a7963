"""Bearer-token authentication as a gRPC server interceptor (the pattern of grpc's examples/python/auth).

Clients send ``authorization: Bearer <token>`` metadata. Health checks and reflection stay open so
load balancers and ``grpcurl`` work without the token.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

#: Methods reachable without a token (prefixes of the full method name).
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Reject calls whose ``authorization`` metadata is not ``Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("token must not be empty")
        self._expected = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method or ""
        if method.startswith(OPEN_METHODS):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        # constant-time comparison: the token must not leak through response timing
        if hmac.compare_digest(given, self._expected):
            return continuation(handler_call_details)
        return self._deny
