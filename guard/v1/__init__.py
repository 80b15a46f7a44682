"""Generated gRPC stubs for proto/guard/v1/guard.proto (regenerate with `make proto`)."""
