"""Server reflection as ``grpc.reflection.v1`` as well as ``grpc.reflection.v1alpha``.

grpcio-reflection (1.85) serves only v1alpha; grpcurl and current clients ask for v1 first. The v1
protocol is v1alpha under a new package name: the same messages with the same field numbers (grpc's
``reflection/v1/reflection.proto``), so the same servicer answers both. The v1 file descriptor is made
here from the installed v1alpha one (package and file name replaced) and added to the descriptor pool,
so that reflection can describe itself under v1 too; no second copy of the proto is kept.

grpcio-reflection also answers "not found" for a method's name (``grpcurl describe
cxr_monai.v1.CXRTriage.Classify``): protobuf's pool resolves services but not their methods by name.
:class:`ReflectionServicer` answers with the service's file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto`` as a descriptor: v1alpha's with the v1 names."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    old = proto.package
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    for message in proto.message_type:
        for message_field in message.field:
            if message_field.type_name.startswith(f".{old}."):
                message_field.type_name = f".{V1_PACKAGE}." + message_field.type_name[len(old) + 2 :]
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{old}.", f".{V1_PACKAGE}.")
            method.output_type = method.output_type.replace(f".{old}.", f".{V1_PACKAGE}.")
    proto.options.Clear()
    return proto


class ReflectionServicer(reflection.ReflectionServicer):
    """grpcio-reflection's servicer, resolving ``package.Service.Method`` to the service's file."""

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        response = super()._file_containing_symbol(request, fully_qualified_name)
        if response.HasField("error_response") and "." in fully_qualified_name:
            service_name, method = fully_qualified_name.rsplit(".", 1)
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                return response
            if method in service.methods_by_name:
                return self._file_by_filename(request, service.file.name)
        return response


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.Add(v1_file_descriptor())


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection v1 and v1alpha for ``service_names`` (both reflection services are added)."""
    pool = descriptor_pool.Default()
    _register_v1_descriptor(pool)
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = ReflectionServicer(names, pool=pool)
    # the wire format is identical, so v1 requests and responses go through the v1alpha classes
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha.ServerReflectionRequest.FromString,
        response_serializer=v1alpha.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
        )
    )
