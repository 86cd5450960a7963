"""Generated gRPC/protobuf modules, one subpackage per API version (``v1``)."""
