"""Strict test setup: 4 fake CPU devices, rank promotion is an error, float32 throughout."""

import atexit
import os
import shutil
import tempfile

from tests.xla_env import xla_flags

# Must be set before jax is imported anywhere in the test session. XLA:CPU optimisation level
# 1 (tests/xla_env.py: faster compilation). One Eigen thread per test process: `pytest -n 2`
# runs two processes on the 2 cores, and the tests' small ops lose more to thread hand-offs
# than they gain (the suite ran ~8% faster).
os.environ.setdefault("XLA_FLAGS", xla_flags(4) + " --xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the whole session: most of the suite's time is
# compilation, and many tests compile the same programs (the same model and round in another
# jit object, the other pytest-xdist worker, the runner's subprocesses, which inherit the
# variable). A fresh directory per session (removed at its end) keeps runs independent; set
# JAX_COMPILATION_CACHE_DIR yourself to keep one across sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="tracefl-jax-test-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
  return jax.random.key(0)


# The longest test files first (measured with --durations; most of their time is XLA
# compilation): with `pytest -n 2` both workers then end on short tests and finish together
# instead of one waiting on a minute-long test started last (`make test` uses
# `--dist worksteal`: an idle worker takes the short tests from the end of the other's queue).
_LONGEST_FIRST = ("test_gpu_script.py", "test_resume_sweep.py", "test_paper_configs.py",
                  "test_scale.py", "test_multiprocess.py", "test_cnn_models.py",
                  "test_transformers.py", "test_library.py", "test_model_contract.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
