"""Generated gRPC/protobuf modules of the ``cxr_monai.v1`` gRPC API (from ``protos/cxr_monai/api/v1``).

Do not edit: regenerate from the repository root with::

    python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \\
        protos/cxr_monai/api/v1/cxr_triage.proto

``tests/test_server_protos.py`` fails when these files differ from a fresh generation.
"""
