"""XLA flags of the test processes and of the subprocesses the tests start.

Most of the suite's time is XLA compilation of small programs that then run a few times.
XLA:CPU's backend optimisation level 1 compiles them 1.3-2x faster than the default level 2
(the GPU script's smoke run: 100 s -> 65 s on 2 cores) and every result the tests compare
stays within their tolerances; programs that run long (benchmarks/, the runner) keep the
default. `ModelDef.init` compiles at level 1 everywhere (bit-identical variables).
"""

FAST_COMPILE = "--xla_backend_optimization_level=1"


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test subprocess, on `devices` fake CPU devices (None: one)."""
  flags = [FAST_COMPILE]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)
