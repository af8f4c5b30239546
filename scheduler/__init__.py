"""The engine of genserve (`genserve.scheduler`): free of gRPC and HTTP."""
