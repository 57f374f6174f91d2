"""Generated protobuf/gRPC modules of nexus.v1 (regenerate with scripts/gen_proto.sh)."""
