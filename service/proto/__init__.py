"""The V2 gRPC messages (``predict_v2.proto``) and their generated Python module.

``predict_v2_pb2.py`` and ``.pyi`` are generated and committed, so serving needs only grpcio
and the protobuf runtime (the ``grpc`` extra), not grpcio-tools and its compiler. After
changing the .proto, regenerate them from the repository root with:

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. service/proto/predict_v2.proto

then change one line of ``predict_v2_pb2.py``: ``_descriptor_pool.Default().AddSerializedFile(``
to ``_descriptor_pool.DescriptorPool().AddSerializedFile(``. The messages then live in a pool
of their own: Triton's and KServe's Python packages define the same names (package
``inference``) in the default pool, and a process that loads both would fail at import.
"""
