"""Generated protobuf/gRPC stubs of the rise.v1 contract (see protos/rise/v1)."""

from rise.proto.v1 import (  # noqa: F401
    common_pb2,
    common_pb2_grpc,
    dynamics_pb2,
    dynamics_pb2_grpc,
    model_admin_pb2,
    model_admin_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    tensor_pb2,
    tensor_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
    value_pb2,
    value_pb2_grpc,
)
