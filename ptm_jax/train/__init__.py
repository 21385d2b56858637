"""Training: objectives (losses and metrics) for jit-compiled, mesh-sharded train steps."""
