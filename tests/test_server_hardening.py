"""Issue 19, items 2, 4 and 7: admission that idle streams cannot exhaust, a bounded wait queue, bounded
decompression and decoded memory, and one ``authorization`` header at most."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from bundle_factory import make_trained_bundle
from cxr_monai.server.app import ServerConfig, Service, build_server
from cxr_monai.server.servicer import CXRTriageServicer, ServiceLimits
from PIL import Image

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc as pb_grpc
from cxr_monai.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.from_bundle(make_trained_bundle(tmp_path_factory.mktemp("bundle")), device="cpu")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


SMALL = png(np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8))


@pytest.fixture
def make_service(predictor: Predictor) -> Iterator[Any]:
    started: list[Service] = []

    def make(limits: ServiceLimits | None = None, **config: Any) -> Service:
        service = build_server(
            CXRTriageServicer(predictor, limits or ServiceLimits()),
            ServerConfig(address="127.0.0.1:0", **config),
        )
        service.start()
        service.warm_up()
        started.append(service)
        return service

    yield make
    for service in started:
        service.servicer.abandon()
        service.server.stop(None)


def code_of(fn: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code(), info.value.details() or ""


# --- item 7: two authorization headers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        ("Bearer wrong", "Bearer s3cret"),
        ("Bearer s3cret", "Bearer wrong"),
        ("Bearer s3cret", "Bearer s3cret"),
    ],
)
def test_a_call_with_two_authorization_headers_is_refused(make_service: Any, values: tuple[str, str]) -> None:
    service = make_service(token="s3cret")
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        metadata = tuple(("authorization", v) for v in values)
        code, _ = code_of(stub.Classify, pb.ClassifyRequest(image=SMALL), metadata=metadata, timeout=10)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Classify(
            pb.ClassifyRequest(image=SMALL), metadata=(("authorization", "Bearer s3cret"),), timeout=10
        )
        assert ok.rows == 64
