"""The gRPC service (installed as ``cxr_monai.server``; see the README's architecture section)."""
