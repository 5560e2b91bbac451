"""The V2 gRPC messages (``predict_v2.proto``) and their generated Python module.

``predict_v2_pb2.py`` and ``.pyi`` are generated and committed, so serving needs only grpcio
and the protobuf runtime (the ``grpc`` extra), not grpcio-tools and its compiler. After
changing the .proto, regenerate them from the repository root with:

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. service/proto/predict_v2.proto
"""
