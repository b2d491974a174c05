"""gRPC client: index pipeline, multi-server fan-out, search, delete, info. Importable as `sspry.client`."""
