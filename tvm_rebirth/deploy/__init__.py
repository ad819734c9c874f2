"""Stage 6, the device: RPC tracker and sessions, emulated Cortex-A72, remote benchmarks."""
