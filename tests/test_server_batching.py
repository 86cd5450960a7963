"""Micro-batching of Classify, the ONNX Runtime classify backend and the ClassifyStudy stream."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from bundle_factory import make_items, make_trained_bundle
from cxr_monai.server import servicer as servicer_module
from cxr_monai.server.app import ServerConfig, Service, build_server
from cxr_monai.server.batching import BatchingConfig, MicroBatcher
from cxr_monai.server.servicer import CXRTriageServicer, ServiceLimits
from typer.testing import CliRunner

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc as pb_grpc
from cxr_monai.cli import app
from cxr_monai.errors import CXRMonaiError
from cxr_monai.export import OnnxModel, export_bundle
from cxr_monai.predictor import Predictor


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_bundle(tmp_path_factory.mktemp("bundle"), spatial_size=32)


@pytest.fixture(scope="module")
def predictor(bundle: Path) -> Predictor:
    return Predictor.from_bundle(bundle, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    items = make_items(tmp_path_factory.mktemp("images"), 6)  # three sizes, RGB and grayscale
    return [Path(item["image"]).read_bytes() for item in items]


@pytest.fixture(scope="module")
def onnx_file(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_bundle(bundle, "onnx", out, int8=False)
    return out


@pytest.fixture
def serve(predictor: Predictor) -> Iterator[Any]:
    started: list[Service] = []

    def make(**servicer_options: Any) -> tuple[Service, pb_grpc.CXRTriageStub]:
        servicer = CXRTriageServicer(predictor, ServiceLimits(max_inflight=8), **servicer_options)
        service = build_server(servicer, ServerConfig(address="127.0.0.1:0"))
        service.start()
        service.warm_up()
        started.append(service)
        return service, pb_grpc.CXRTriageStub(grpc.insecure_channel(f"127.0.0.1:{service.port}"))

    yield make
    for service in started:
        service.stop(grace_s=0.0)


def probabilities(reply: pb.ClassifyResponse) -> np.ndarray:
    return np.array([p.probability for p in reply.probabilities])


def lone(predictor: Predictor, image: bytes) -> np.ndarray:
    return predictor.predict([image], batch_size=1)[0].probabilities


def test_concurrent_calls_are_batched_and_answer_as_lone_calls(
    serve: Any, predictor: Predictor, images: list[bytes]
) -> None:
    service, stub = serve(batching=BatchingConfig(max_batch=8, max_wait_ms=400))
    warm = sum(service.servicer.batcher.batch_sizes.values())
    futures = [stub.Classify.future(pb.ClassifyRequest(image=image), timeout=30) for image in images]
    replies = [future.result() for future in futures]
    sizes = service.servicer.batcher.batch_sizes
    assert sum(n * count for n, count in sizes.items()) == len(images) + warm
    assert max(sizes) > 1  # at least two calls shared a model call
    for image, reply in zip(images, replies, strict=True):
        np.testing.assert_allclose(probabilities(reply), lone(predictor, image), atol=1e-5, rtol=0)


def test_onnx_backend_answers_equal_eager(
    serve: Any, predictor: Predictor, images: list[bytes], onnx_file: Path
) -> None:
    _, stub = serve(onnx_model=OnnxModel(onnx_file, threads=1))
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).classify_backend == "onnx"
    futures = [stub.Classify.future(pb.ClassifyRequest(image=image), timeout=30) for image in images]
    for image, future in zip(images, futures, strict=True):
        np.testing.assert_allclose(probabilities(future.result()), lone(predictor, image), atol=1e-4, rtol=0)
    explained = stub.Explain(pb.ExplainRequest(image=images[0], omit_overlay_png=True), timeout=30)
    np.testing.assert_allclose(
        probabilities(explained.classification), lone(predictor, images[0]), atol=1e-4, rtol=0
    )


def test_an_onnx_file_of_another_bundle_is_refused(
    predictor: Predictor, tmp_path: Path, images: list[bytes]
) -> None:
    other = make_trained_bundle(tmp_path / "other", spatial_size=48)
    export_bundle(other, "onnx", tmp_path / "other.onnx", int8=False)
    with pytest.raises(CXRMonaiError, match="spatial_size 48, the bundle has 32"):
        CXRTriageServicer(predictor, onnx_model=OnnxModel(tmp_path / "other.onnx"))


def test_classify_study_streams_a_studys_images(
    serve: Any, predictor: Predictor, images: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, stub = serve(batching=BatchingConfig(max_batch=4, max_wait_ms=50))
    reply = stub.ClassifyStudy(iter([pb.ClassifyRequest(image=image) for image in images]), timeout=30)
    assert len(reply.results) == len(images)
    for image, result in zip(images, reply.results, strict=True):
        np.testing.assert_allclose(probabilities(result), lone(predictor, image), atol=1e-5, rtol=0)
        assert result.intended_use

    broken = [pb.ClassifyRequest(image=images[0]), pb.ClassifyRequest(image=b"not an image")]
    with pytest.raises(grpc.RpcError) as info:
        stub.ClassifyStudy(iter(broken), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("image 1: ")
    with pytest.raises(grpc.RpcError) as info:
        stub.ClassifyStudy(iter([]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no image" in (
        info.value.details() or ""
    )
    monkeypatch.setattr(servicer_module, "MAX_STUDY_IMAGES", 2)
    with pytest.raises(grpc.RpcError) as info:
        stub.ClassifyStudy(iter([pb.ClassifyRequest(image=images[0])] * 3), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 2 images" in (
        info.value.details() or ""
    )


def _recording_batcher(lock: threading.Lock | None = None, **config: Any) -> tuple[MicroBatcher, list[int]]:
    seen: list[int] = []

    def run(batch: torch.Tensor) -> np.ndarray:
        seen.extend(int(v) for v in batch[:, 0, 0, 0])
        return batch[:, 0, 0, :2].numpy() * 10

    return MicroBatcher(run, BatchingConfig(**config), lock=lock), seen


def _image(value: int) -> torch.Tensor:
    return torch.full((3, 2, 2), float(value))


def test_batcher_groups_up_to_max_batch_and_skips_cancelled_images() -> None:
    batcher, seen = _recording_batcher(max_batch=3, max_wait_ms=0)
    futures = [batcher.submit(_image(v)) for v in range(5)]
    futures[1].cancel()
    while not all(f.done() for f in futures):
        batcher.serve(0.05)
    assert seen == [0, 2, 3, 4]  # image 1 was cancelled before its batch ran
    assert batcher.batch_sizes == {2: 2}  # [0, (1), 2] then [3, 4]
    assert futures[4].result().tolist() == [40.0, 40.0]


def test_a_model_error_reaches_every_caller_of_the_batch() -> None:
    def broken(batch: torch.Tensor) -> np.ndarray:
        raise RuntimeError("model failed")

    batcher = MicroBatcher(broken, BatchingConfig(max_batch=4, max_wait_ms=0))
    futures = [batcher.submit(_image(v)) for v in range(3)]
    batcher.serve(0.05)
    assert all(isinstance(f.exception(timeout=1), RuntimeError) for f in futures)


def test_an_abandoning_leader_puts_its_batch_back_for_the_next_one() -> None:
    lock = threading.Lock()
    batcher, seen = _recording_batcher(lock=lock, max_batch=4, max_wait_ms=0)
    futures = [batcher.submit(_image(v)) for v in range(2)]
    lock.acquire()  # the model is busy (a Grad-CAM call, say)

    def give_up() -> None:
        raise TimeoutError("the leader's deadline passed")

    with pytest.raises(TimeoutError):
        batcher.serve(0.05, give_up)
    assert seen == [] and not any(f.done() for f in futures)
    lock.release()
    assert [r.tolist() for r in batcher.run([_image(7)])] == [[70.0, 70.0]]
    assert seen == [0, 1, 7] and [f.result()[0] for f in futures] == [0.0, 10.0]


def test_closed_batcher_cancels_waiting_images_and_refuses_new_ones() -> None:
    batcher, seen = _recording_batcher()
    waiting = batcher.submit(_image(1))
    batcher.close()
    assert waiting.cancelled() and seen == []
    with pytest.raises(CXRMonaiError, match="closed"):
        batcher.submit(_image(2))


@pytest.mark.parametrize(
    ("options", "message"), [({"max_batch": 0}, "max batch"), ({"max_wait_ms": -1}, "wait")]
)
def test_batching_config_is_validated(options: dict[str, Any], message: str) -> None:
    with pytest.raises(CXRMonaiError, match=message):
        BatchingConfig(**options)


def test_serve_refuses_an_unknown_backend(bundle: Path, onnx_file: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--bundle", str(bundle), "--backend", "tpu"])
    assert result.exit_code == 1 and "expected auto, eager or onnx" in result.output
    command = ["serve", "--bundle", str(bundle), "--backend", "eager", "--onnx", str(onnx_file)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1 and "--onnx needs --backend onnx" in result.output


def test_serve_exports_the_bundle_at_start_up_when_no_onnx_file_is_given(
    bundle: Path, predictor: Predictor
) -> None:
    from cxr_monai.commands.serve import _onnx_model

    model = _onnx_model(bundle, None, threads=1)
    options = model.session.get_session_options()
    # idle ORT threads must not spin: the server reads and pre-processes calls beside the model
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    model.check_matches(predictor)
    assert not model.path.exists()  # the temporary export is gone; the session holds the graph
    x = torch.zeros(2, 3, 32, 32)
    np.testing.assert_allclose(model.logits(x), predictor.model(x).detach().numpy(), atol=1e-4, rtol=0)


def test_the_default_backend_is_onnx_on_cpu_when_onnxruntime_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from cxr_monai.commands.serve import auto_backend

    assert auto_backend(torch.device("cpu"), False) == "onnx"
    assert auto_backend(torch.device("cuda"), False) == "eager"
    assert auto_backend(torch.device("cuda"), True) == "onnx"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert auto_backend(torch.device("cpu"), False) == "eager"
