"""Generated protobuf and gRPC code for the tideflow wire API (see proto/generate.py)."""
