"""gRPC service over a Forest (`sspry serve`). Importable as `sspry.server`."""
