"""A million clients (issue 36 item 5): wall time and peak resident memory per stage of one
run of configs/scale.py's million preset, at any number of clients.

The run is `runner.run` on `get_config("million")` with `num_clients`, `synthetic_size` (24
examples per client), clients per round, rounds and `dataset.placement` from the flags; each
stage (`load_dataset`, `partition`, `federate`, the other stages of `runner.run`, the rounds)
prints its seconds, the process's peak resident set so far and its resident set after it;
the last line is the run's summary (steady seconds per round, provenance seconds per round,
peaks, leave-one-out top-1 of TraceFL and of the first-order score).

  python benchmarks/bench_million.py --clients=1000000 --per_round=1000 --rounds=2 \\
      --placement=host --workdir=/tmp/million_stages
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tracefl_jax.experiment import resume, runner, stages, summary as outputs  # noqa: E402


def _memory_gb() -> tuple[float, float]:
  """(peak resident set, resident set) of this process in GB (Linux)."""
  fields = {}
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(("VmHWM:", "VmRSS:")):
        fields[line.split(":")[0]] = int(line.split()[1]) / 1e6
  return fields.get("VmHWM", 0.0), fields.get("VmRSS", 0.0)


def _timed(module, name: str) -> None:
  """Wraps `module.name` to print its wall time and the memory after it."""
  fn = getattr(module, name)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    peak, now = _memory_gb()
    print(f"  {name:20s} {time.perf_counter() - t0:8.2f} s   peak {peak:5.2f} GB   "
          f"resident {now:5.2f} GB", flush=True)
    return out
  setattr(module, name, wrapper)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, default=1_000_000)
  p.add_argument("--per_round", type=int, default=1000)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--placement", default="host", choices=("auto", "device", "host"))
  p.add_argument("--workdir", default="/tmp/million_stages", help="emptied first")
  args = p.parse_args(argv)
  for module, name in [(stages, "cached_dataset"), (stages, "partition"), (stages, "federate"),
                       (stages, "build_model"), (stages, "build_algorithm"),
                       (stages, "build_evaluator"), (resume, "write_start_files"),
                       (runner, "_loop"), (outputs, "run_summary")]:
    _timed(module, name)
  spec = importlib.util.spec_from_file_location("scale", ROOT / "configs" / "scale.py")
  scale = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(scale)
  c = scale.get_config("million")
  c.num_clients, c.clients_per_round, c.rounds = args.clients, args.per_round, args.rounds
  c.dataset.synthetic_size = args.clients * scale.MILLION_PER_CLIENT
  c.dataset.placement = args.placement
  shutil.rmtree(args.workdir, ignore_errors=True)
  t0 = time.perf_counter()
  s = runner.run(c, args.workdir, progress=False)
  prov, mem = s["provenance"], s["memory"]
  print(f"total {time.perf_counter() - t0:.1f} s; {s['round_seconds']:.2f} s/round (round 1 "
        f"{s['first_round_seconds']:.2f}), provenance {s['provenance_round_seconds']:.2f} "
        f"s/round (round 1 {s['first_provenance_seconds']:.2f}); peak "
        f"{mem['peak_rss_bytes'] / 1e9:.2f} GB (loading {mem['load_peak_rss_bytes'] / 1e9:.2f});"
        f" LOO top-1 TraceFL {prov['counterfactual_top1']:.3f}, first-order "
        f"{prov['first_order_counterfactual_top1']:.3f}", flush=True)


if __name__ == "__main__":
  main()
