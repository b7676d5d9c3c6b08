"""The GPU in one command: self-checking correctness, then the round and provenance timings.

  bash benchmarks/gpu.sh            (= make bench-gpu; at most 8 minutes on one H100/H200)
  python benchmarks/gpu.py --smoke --out=/tmp/gpu_smoke   (the same code paths on CPU, < 2 min)

Sections, in order, each with its own time budget (when it is spent, the rest of the section
is skipped with a row saying so):
  correctness  every client-axis strategy of `federated_averaging` (vmap, chunked, scan) equals
               the `loop` strategy (the plain loop over clients) on an uneven round (sizes 3,
               40, 7, 130, 0); `cnn_patches` logits equal `cnn_xla` (same params, 1e-4);
               provenance kernels grad / jvp / reference agree (rtol 1e-4); the JAX scores
               equal the original procedure's (PyTorch, same device) where torch imports.
               Checks run at float32 matmul precision ("highest": no TF32).
  round        the FedAvg CNN (`cnn_xla`) round, vmapped, against the big-batch limit (one
               model trained on all K clients' examples concatenated, batches of K x batch)
               at K = 100 and 1000: compile and steady-state time apart, examples/s and their
               fraction of the limit's (issue 12 item 8).
  provenance   `trace_clients` at K = 10 and 100 clients x 20 inputs against the original
               procedure (tests/torch_reference.py's hook procedure, run on the same GPU), and
               1000 clients x 100 inputs; achieved FLOP/s of the contraction (2 P per pair) as
               a fraction of a dense matmul probe's on the same device (item 8).
  reference    the speed-of-light comparison (benchmarks/bench_reference.py): the library's
               round and `trace_clients` against hand-written JAX on the same work, interleaved
               in this process (MLP 64-32-10 and FedAvg CNN, K = 1000 rounds, K = 1000 and
               10,000 traces of 256 inputs); each row the library/reference ratio of medians,
               compile times, XLA bytes of both programs, and the results' agreement.
  attribution  configs/attribution.py:gpu (issue 19; :smoke in smoke mode): attribution methods
               against retrained federations at 1,000 clients, cells in order while the
               budget lasts, one row per (cell, method) with global accuracy, retrain top-1,
               Spearman and LDS, and the table under <out>/attribution/.
  scale        the scale study (configs/scale.py:gpu, issue 14; :smoke in smoke mode): its
               cells in order until the section's budget, one row per cell (localization,
               leave-one-out top-1, seconds per round, device peak), then the study's
               results.csv, scale.md and plots under <out>/scale/; cells left are rows saying
               so, and the rest of the study resumes with the sweep command in the config.

  million      (not in the default run: `--sections=million`, its own command) the
               million-client preset (configs/scale.py:million_gpu, issue 36 item 5;
               :million_smoke in smoke mode): 1,000,000 heavy-tailed clients with the
               training set on the host, 1,000 and 10,000 per round, every round traced;
               one row per cell (seconds per round, provenance seconds per round, leave-one-
               out top-1 of TraceFL and of the first-order score, host and device peaks),
               the table under <out>/million/. Within 10 minutes: `bash benchmarks/gpu.sh
               --sections=million --time-limit=540`.

Every row is appended to `<out>/gpu.jsonl` with the device, versions and the device's memory
stats (`peak_bytes`: peak bytes in use so far in this process, where the backend reports it;
None on CPU); `<out>/gpu.md` gets this run's table. Exit status 1 if any check failed or a
section raised (after every row is written).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import environment, perturbed_clients, time_fn  # noqa: E402

import tracefl_jax as tfl  # noqa: E402
from tracefl_jax.fl.client import local_steps, make_client_update  # noqa: E402

# Sizes per mode. GPU: the shapes; smoke: the same code paths, CPU-sized.
SIZES = {
    "gpu": dict(image=28, check_image=28, round_ks=(100, 1000), samples=64, batch=32,
                prov_ks=(10, 100), prov_inputs=20, big=(1000, 100), torch_pairs=2000,
                repeats=5, time_limit=450, targets=True, scale_preset="gpu", scale_cells=None,
                attribution_preset="gpu", million_preset="million_gpu", million_cells=None,
                budgets=dict(correctness=100, round=140, provenance=130, reference=120,
                             attribution=90, scale=80, million=540),
                reference=dict(round_models=("mlp", "cnn"), round_ks=(1000,), samples=20,
                               batch=10, epochs=2, image=28, prov_models=("mlp", "cnn"),
                               prov_ks=(1000, 10000), inputs=256, kernels="auto,grad,jvp",
                               repeats=5, cnn_max_clients=1000, kinds=("equal", "paper"),
                               memory=True)),
    "smoke": dict(image=8, check_image=8, round_ks=(4,), samples=8, batch=4,
                  prov_ks=(3,), prov_inputs=4, big=(12, 5), torch_pairs=24,
                  repeats=2, time_limit=900, targets=False, scale_preset="smoke", scale_cells=1,
                  attribution_preset="smoke", million_preset="million_smoke", million_cells=1,
                  # generous: a loaded CI machine runs every row rather than skipping
                  budgets=dict(correctness=300, round=150, provenance=150, reference=120,
                               attribution=300, scale=300, million=300),
                  # tiny: one MLP trace (a round's two compilations would add 10-15 s to
                  # the smoke test; bench_reference.py checks its rounds itself)
                  reference=dict(round_models=(), round_ks=(2,), samples=4, batch=4,
                                 epochs=1, image=8, prov_models=("mlp",), prov_ks=(3,),
                                 inputs=4, kernels="grad", repeats=1, cnn_max_clients=0,
                                 kinds=("equal",), memory=False)),
}
STRATEGIES = ("vmap", "chunked", "scan")
CHECK_SIZES = (3, 40, 7, 130, 0)


class Report:
  """Rows: appended to gpu.jsonl as they come, collected for gpu.md and the exit status."""

  def __init__(self, out: Path, mode: str):
    self.out = out
    out.mkdir(parents=True, exist_ok=True)
    self.jsonl = out / "gpu.jsonl"
    self.env = {**environment(), "mode": mode,
                "matmul_precision": str(jax.config.jax_default_matmul_precision or "default")}
    self.rows: list[dict[str, Any]] = []

  def write(self, section: str, name: str, status: str, **fields: Any) -> None:
    stats = jax.devices()[0].memory_stats() or {}
    row = {"bench": "gpu", "section": section, "name": name, "status": status, **fields,
           "peak_bytes": stats.get("peak_bytes_in_use"), "bytes_in_use": stats.get("bytes_in_use"),
           **self.env}
    self.rows.append(row)
    with open(self.jsonl, "a", encoding="utf-8") as f:
      f.write(json.dumps(row, default=str) + "\n")
    short = {k: (float(f"{v:.4g}") if isinstance(v, float) else v)
             for k, v in row.items() if k not in self.env and k != "bench"}
    print(json.dumps(short, default=str), flush=True)

  @property
  def failed(self) -> bool:
    return any(r["status"] in ("fail", "error") for r in self.rows)

  def table(self) -> str:
    env = self.env
    lines = [f"# GPU benchmark ({env['mode']})", "",
             f"device: {env['device']} ({env['backend']}, {env['num_devices']} device(s)); "
             f"versions: {env['versions']}; date: {env['date']}", "",
             "| section | row | status | result | peak MB |", "|---|---|---|---|---|"]
    for r in self.rows:
      peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f}"
      lines.append(f"| {r['section']} | {r['name']} | {r['status']} | {r.get('summary', '')} "
                   f"| {peak} |")
    return "\n".join(lines) + "\n"


class Budget:
  """A section's wall-clock allowance, capped by the whole run's deadline (perf_counter)."""

  def __init__(self, seconds: float, deadline: float = float("inf")):
    self.end = min(time.perf_counter() + seconds, deadline)

  @property
  def spent(self) -> bool:
    return time.perf_counter() > self.end


def _max_rel_err(got: Any, ref: Any) -> float:
  """max over leaves of max|got - ref| / max(max|ref|, 1e-12)."""
  errs = []
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if b.size:
      errs.append(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)))
  return max(errs, default=0.0)


def _check(report: Report, name: str, err: float, tol: float, **fields: Any) -> None:
  status = "pass" if np.isfinite(err) and err <= tol else "fail"
  report.write("correctness", name, status, max_rel_err=err, tol=tol,
               summary=f"max rel err {err:.1e} (tol {tol:.0e})", **fields)


def _synthetic(n: int, shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 10, n).astype(np.int32)
  x = (rng.normal(size=(n, *shape)) + 0.3 * y.reshape(-1, *[1] * len(shape))).astype(np.float32)
  return x, y


# ------------------------------------------------------------------------------ correctness

def correctness(report: Report, cfg: dict[str, Any], budget: Budget) -> None:
  shape = (cfg["check_image"], cfg["check_image"], 1)
  model = tfl.get_model("cnn_xla", shape, 10)
  variables = model.init(jax.random.key(0))
  x, y = _synthetic(sum(CHECK_SIZES), shape)
  perm = np.random.default_rng(1).permutation(len(y))
  parts = np.split(perm, np.cumsum(CHECK_SIZES)[:-1])
  data = tfl.federate(x, y, parts)
  clients = np.arange(len(CHECK_SIZES))
  # SGD with momentum: Adam would turn float32 summation-order noise into lr-sized steps. At
  # lr 0.05 the 130-example client's 34 steps amplified the packed lanes' convolution order
  # (float noise, 1e-7 per step) to 1.5e-2 on one machine; at 0.01 it stays at 1e-7.
  opt = optax.sgd(0.01, momentum=0.9)

  def run(strategy: str, chunk: int = 0) -> Any:
    alg = tfl.federated_averaging(model, opt, batch_size=8, local_epochs=2, strategy=strategy,
                                  clients_per_chunk=chunk)
    _, out = alg.round(alg.init(variables), clients=clients, data=data,
                       key=tfl.round_key(jax.random.key(0), 1))
    return {"global": out.variables, "clients": out.clients.variables,
            "loss": out.clients.loss}

  with jax.default_matmul_precision("float32"):
    ref = jax.block_until_ready(run("loop"))
    for strategy in STRATEGIES:
      if budget.spent:
        report.write("correctness", f"strategy {strategy} == loop", "skipped",
                     summary="section budget spent")
        continue
      got = run(strategy, chunk=2 if strategy == "chunked" else 0)
      _check(report, f"strategy {strategy} == loop", _max_rel_err(got, ref), 1e-4,
             sizes=list(CHECK_SIZES))

    # PatchConv against the XLA convolution: same params, same inputs.
    patches = tfl.get_model("cnn_patches", shape, 10)
    xs = jnp.asarray(x[:64])
    a = jax.jit(model.logits)(variables, xs)
    b = jax.jit(patches.logits)(variables, xs)
    _check(report, "cnn_patches == cnn_xla (logits)", _max_rel_err(b, a), 1e-4)

    # Provenance kernels against each other (and the original procedure where torch imports).
    k, n = 5, 6
    clients_vars = {"params": perturbed_clients(variables["params"], k)}
    xn = jnp.asarray(x[:n])
    scores = {kern: np.asarray(tfl.trace_clients(model, variables, clients_vars, xn,
                                                 kernel=kern).scores)
              for kern in ("grad", "jvp", "reference")}
    for kern in ("jvp", "reference"):
      _check(report, f"provenance {kern} == grad", _max_rel_err(scores[kern], scores["grad"]),
             1e-4)
    torch_mod = _torch()
    if torch_mod is None:
      report.write("correctness", "provenance grad == original (PyTorch)", "skipped",
                   summary="torch not importable")
    else:
      torch, device = torch_mod
      net, layers, forward, client_layers = _torch_setup(model, variables, clients_vars, k,
                                                         device)
      torch.backends.cudnn.allow_tf32 = False  # an exact comparison: float32 throughout
      from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top
      expected, _ = tr.original_scores(net, client_layers, x[:n], forward=forward,
                                       layers=layers)
      # Back to torch's defaults for the timings (TF32 convolutions, like JAX's default).
      torch.backends.cudnn.allow_tf32 = True
      _check(report, "provenance grad == original (PyTorch)",
             _max_rel_err(scores["grad"], expected), 1e-4, torch_device=str(device))


# ------------------------------------------------------------------------------- PyTorch

def _torch():
  """(torch, device) with the CUDA device when JAX runs on a GPU and torch has CUDA; None
  when torch does not import."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
  return torch, torch.device("cuda" if cuda else "cpu")


def _torch_setup(model, g, clients_vars, k, device):
  """The torch twin of G on `device`, its traced modules, an NHWC batch-1 forward, and the
  first k clients' traced-layer params on `device`."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top
  side = model.input_shape[0] // 4
  net = tr.TorchFedAvgCNN(model.input_shape[-1], 10, flat=side * side * 64)
  tr.load_flax(net, g["params"], model.traced_layers)
  net = net.to(device).eval()

  def layer(params, path):
    for key in path:
      params = params[key]
    return params

  host = jax.tree.map(lambda a: np.asarray(a[:k]), clients_vars["params"])
  client_layers = [[{n: t.to(device) for n, t in tr.torch_layer_params(
      jax.tree.map(lambda a: a[c], layer(host, p))).items()} for p in model.traced_layers]
      for c in range(k)]
  forward = lambda xn: net(torch.from_numpy(np.asarray(xn, np.float32))[None].to(device))  # noqa: E731
  return net, net.traced(), forward, client_layers


# ------------------------------------------------------------------------------------ round

def _targets(cfg: dict[str, Any], targets: dict[str, bool]) -> str:
  """Issue 12's GPU targets as a summary suffix (GPU mode only; informational, not checks)."""
  if not cfg["targets"] or not targets:
    return ""
  return "; " + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in targets.items())


def round_section(report: Report, cfg: dict[str, Any], budget: Budget) -> None:
  shape = (cfg["image"], cfg["image"], 1)
  model = tfl.get_model("cnn_xla", shape, 10)
  variables = model.init(jax.random.key(0))
  batch, samples, opt = cfg["batch"], cfg["samples"], optax.adam(1e-3)
  kmax = max(cfg["round_ks"])
  x_np, y_np = _synthetic(kmax * samples, shape)
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  for k in cfg["round_ks"]:
    if budget.spent:
      report.write("round", f"K={k}", "skipped", K=k, summary="section budget spent")
      continue
    examples = k * samples
    # The limit: the same examples through ONE model, batches of K x batch.
    update = jax.jit(make_client_update(model, opt, k * batch, 1))
    total = int(local_steps(np.full(k, samples), batch, 1).sum()) * batch
    idx = jnp.arange(total, dtype=jnp.int32) % x.shape[0]
    limit = time_fn(lambda: update(variables, x, y, idx, jnp.int32(total),  # noqa: B023
                                   jax.random.key(0)).variables, cfg["repeats"])
    limit_rate = examples / limit["steady_s"]
    report.write("round", f"big-batch limit K={k}", "ok", K=k, examples=examples, **limit,
                 samples_per_s=limit_rate,
                 summary=f"{limit['steady_s'] * 1e3:.1f} ms, {limit_rate:,.0f} ex/s "
                         f"(compile {limit['compile_s']:.1f} s)")
    data = tfl.federate(x, y, np.arange(examples).reshape(k, samples))
    alg = tfl.federated_averaging(model, opt, batch_size=batch, local_epochs=1,
                                  strategy="vmap")
    state = alg.init(variables)
    clients = np.arange(k)

    def fn(alg=alg, state=state, clients=clients, data=data):
      return alg.round(state, clients=clients, data=data,
                       key=tfl.round_key(jax.random.key(0), 1))[1].variables

    t = time_fn(fn, cfg["repeats"])
    rate = examples / t["steady_s"]
    frac = rate / limit_rate
    targets = {"within 2x of the limit": frac >= 0.5}
    if k >= 1000:
      targets["1000-client round <= 0.5 s"] = t["steady_s"] <= 0.5
    report.write("round", f"vmap round K={k}", "ok", K=k, examples=examples,
                 samples_per_client=samples, batch_size=batch, **t, samples_per_s=rate,
                 client_updates_per_s=k / t["steady_s"], limit_fraction=frac,
                 targets=targets if cfg["targets"] else None,
                 summary=f"{t['steady_s'] * 1e3:.1f} ms, {rate:,.0f} ex/s = {frac:.2f} of "
                         f"the limit (compile {t['compile_s']:.1f} s)" + _targets(cfg, targets))


# ------------------------------------------------------------------------------- provenance

def matmul_peak(n: int, repeats: int) -> float:
  """FLOP/s of an [n, n] x [n, n] float32 matmul at the default precision (the probe)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda u, v: u @ v)
  t = time_fn(lambda: f(a, a), repeats)
  return 2 * n**3 / t["steady_s"]


def provenance_section(report: Report, cfg: dict[str, Any], budget: Budget) -> None:
  shape = (cfg["image"], cfg["image"], 1)
  model = tfl.get_model("cnn_xla", shape, 10)
  g = model.init(jax.random.key(0))
  params = sum(l.size for l in jax.tree.leaves(g["params"]))
  peak = matmul_peak(8192 if jax.default_backend() == "gpu" else 512, cfg["repeats"])
  report.write("provenance", "matmul probe (fp32, default precision)", "ok",
               flops_per_s=peak, summary=f"{peak / 1e12:.2f} TFLOP/s")
  x_all, _ = _synthetic(max(cfg["prov_inputs"], cfg["big"][1]), shape, seed=2)
  torch_mod = _torch()
  if torch_mod is None:
    report.write("provenance", "original (PyTorch)", "skipped", summary="torch not importable")
  elif jax.default_backend() == "gpu" and torch_mod[1].type != "cuda":
    report.write("provenance", "original (PyTorch)", "unavailable",
                 summary="torch has no CUDA here: the original is not timed on the GPU")
    torch_mod = None

  def jax_row(k, n, name, clients, original_rate=None):
    xs = jnp.asarray(x_all[:n])
    t = time_fn(lambda: tfl.trace_clients(model, g, clients, xs).scores, cfg["repeats"])
    rate = n * k / t["steady_s"]
    frac = 2 * params * rate / peak
    speedup = rate / original_rate if original_rate else None
    summary = (f"{t['steady_s'] * 1e3:.1f} ms, {rate:,.0f} pairs/s, {frac:.2f} of the matmul "
               f"probe" + (f", {speedup:,.0f}x the original" if speedup else ""))
    targets = {}
    if speedup and k >= 100:
      targets[">= 1000x the original"] = speedup >= 1000
    if k >= 1000 and n >= 100:
      targets["1000 x 100 <= 1 s"] = t["steady_s"] <= 1.0
    report.write("provenance", name, "ok", K=k, inputs=n, params=params, **t, pairs_per_s=rate,
                 peak_fraction=frac, speedup_vs_original=speedup,
                 targets=targets if cfg["targets"] else None,
                 summary=summary + _targets(cfg, targets))

  for k in cfg["prov_ks"]:
    n = cfg["prov_inputs"]
    if budget.spent:
      report.write("provenance", f"K={k} x {n} inputs", "skipped", summary="section budget spent")
      continue
    original_rate = None
    clients = {"params": perturbed_clients(g["params"], k)}
    if torch_mod is not None:
      torch, device = torch_mod
      from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top
      net, layers, forward, client_layers = _torch_setup(model, g, clients, k, device)
      nt = max(1, min(n, cfg["torch_pairs"] // k))
      tr.original_scores(net, client_layers, x_all[:1], forward=forward, layers=layers)
      if device.type == "cuda":
        torch.cuda.synchronize()
      t0 = time.perf_counter()
      expected, _ = tr.original_scores(net, client_layers, x_all[:nt], forward=forward,
                                       layers=layers)
      dt = time.perf_counter() - t0  # float() per pair syncs the device: nothing pending
      original_rate = nt * k / dt
      got = np.asarray(tfl.trace_clients(model, g, clients, jnp.asarray(x_all[:nt])).scores)
      report.write("provenance", f"original (PyTorch, {device.type}) K={k}", "ok", K=k,
                   inputs=nt, steady_s=dt, pairs_per_s=original_rate,
                   max_rel_diff_jax=_max_rel_err(got, expected), torch_device=str(device),
                   summary=f"{original_rate:,.0f} pairs/s on {nt} inputs; JAX (default "
                           f"precision) differs by {_max_rel_err(got, expected):.1e}")
    jax_row(k, n, f"trace_clients K={k} x {n} inputs", clients, original_rate)
    del clients
  k, n = cfg["big"]
  if budget.spent:
    report.write("provenance", f"trace_clients K={k} x {n} inputs", "skipped",
                 summary="section budget spent")
  else:
    jax_row(k, n, f"trace_clients K={k} x {n} inputs",
            {"params": perturbed_clients(g["params"], k)})


# ------------------------------------------------------------------------------------ scale

def _scale_config():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("scale_config", ROOT / "configs" / "scale.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def million_section(report: Report, cfg: dict[str, Any], budget: Budget) -> None:
  """configs/scale.py's million-client preset (million_gpu; million_smoke in smoke mode):
  its cells in order until the budget (smoke: the first), one row per cell, the table under
  <out>/million/."""
  from tracefl_jax.experiment import sweep  # pylint: disable=g-import-not-at-top
  module, preset = _scale_config(), cfg["million_preset"]
  grid = [{k: [v] for k, v in point.items()}  # smoke mode: the first cell only
          for point in sweep.expand_grid(module.get_sweep(preset))[:cfg["million_cells"]]]
  rows = sweep.run_sweep(module.get_config(preset), grid, report.out / "million",
                         progress=False, deadline=budget.end)
  for r in rows:
    prov, mem = r.get("provenance") or {}, r["memory"]
    gb = lambda v: None if v is None else v / 2**30  # noqa: E731
    report.write("million", f"{r['clients']:,} clients, K={r['clients_per_round']:,}", "ok",
                 clients=r["clients"], K=r["clients_per_round"], rounds=r["rounds"],
                 round_s=r["round_seconds"], first_round_s=r["first_round_seconds"],
                 provenance_round_s=r["provenance_round_seconds"], seconds=r["seconds"],
                 cf_top1=prov.get("counterfactual_top1"),
                 first_order_cf_top1=prov.get("first_order_counterfactual_top1"),
                 final_accuracy=r["final_accuracy"], host_peak_gb=gb(mem["peak_rss_bytes"]),
                 device_peak_gb=gb(mem.get("device_peak_bytes")),
                 summary=f"{r['round_seconds']:.2f} s/round + {r['provenance_round_seconds']:.2f}"
                         f" s provenance, host peak {gb(mem['peak_rss_bytes']):.1f} GB")
  for overrides in sweep.expand_grid(grid)[len(rows):]:
    report.write("million", sweep.run_name(overrides), "skipped", summary="section budget spent")


def scale_section(report: Report, cfg: dict[str, Any], budget: Budget) -> None:
  """configs/scale.py's study at the mode's preset, cells in order until the budget."""
  from tracefl_jax.experiment import sweep  # pylint: disable=g-import-not-at-top
  module = _scale_config()
  preset = cfg["scale_preset"]
  # Each cell as a grid of its own; smoke mode runs the first only (tests/test_scale.py runs
  # the whole smoke study).
  grid = [{k: [v] for k, v in point.items()}
          for point in sweep.expand_grid(module.get_sweep(preset))[:cfg["scale_cells"]]]
  rows = sweep.run_sweep(module.get_config(preset), grid, report.out / "scale", progress=False,
                         deadline=budget.end)
  for r in rows:
    prov = r.get("provenance") or {}
    name = f"{r['clients']} clients, K={r['clients_per_round']}, {r['provenance_mode']}"
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    report.write("scale", name, "ok", localization=prov.get("accuracy"),
                 cf_top1=prov.get("counterfactual_top1"), round_s=r.get("round_seconds"),
                 provenance_round_s=r.get("provenance_round_seconds"),
                 final_accuracy=r["final_accuracy"],
                 summary=f"localization {pct(prov.get('accuracy'))}, LOO top-1 "
                         f"{pct(prov.get('counterfactual_top1'))}, "
                         f"{r['round_seconds']:.2f} s/round")
  for overrides in sweep.expand_grid(grid)[len(rows):]:
    report.write("scale", sweep.run_name(overrides), "skipped", summary="section budget spent")


def attribution_section(report: Report, cfg: dict[str, Any], budget: Budget) -> None:
  """configs/attribution.py at the mode's preset (gpu: 1,000 clients): its cells in order
  while the budget lasts, one row per (cell, method), the table and figure under
  <out>/attribution/."""
  from tracefl_jax.experiment import comparison  # pylint: disable=g-import-not-at-top
  cells, left = comparison.run_cells(
      f"{ROOT / 'configs' / 'attribution.py'}:{cfg['attribution_preset']}",
      report.out / "attribution", deadline=budget.end)
  for name, s in cells:
    for r in s["rows"]:
      lds = "-" if r["lds"] is None else f"{r['lds']:.2f}"
      report.write("attribution", f"{name}: {r['method']}", "ok", **r,
                   global_accuracy=s["global_accuracy"], federations=s["federations"],
                   seconds=s["seconds"],
                   summary=f"global {100 * s['global_accuracy']:.1f}%, retrain top-1 "
                           f"{r['retrain_top1']:.2f}, LDS {lds}, {s['seconds']['retrain']:.0f}"
                           f" s for {s['federations']} federations")
  for name in left:
    report.write("attribution", name, "skipped", summary="section budget spent")


def reference_section(report: Report, cfg: dict[str, Any], budget: Budget) -> None:
  """bench_reference.py's rows at the mode's sizes (each one a check: the library's result
  equals the reference's, 1e-4)."""
  import bench_reference as br  # pylint: disable=g-import-not-at-top
  c = cfg["reference"]
  args = argparse.Namespace(batch=c["batch"], epochs=c["epochs"], lr=0.05, inputs=c["inputs"],
                            kernels=c["kernels"], repeats=c["repeats"],
                            memory=c["memory"], references="einsum,plain_jvp")
  rng = np.random.default_rng(0)
  with jax.default_matmul_precision("float32"):  # no TF32: both sides compute the same
    _reference_rows(report, c, args, rng, budget)


def _reference_rows(report, c, args, rng, budget):
  import bench_reference as br  # pylint: disable=g-import-not-at-top

  def row(name, cmp, diff, **fields):
    status = "pass" if np.isfinite(diff) and diff <= 1e-4 else "fail"
    report.write("reference", name, status, **cmp, max_rel_diff=diff, **fields,
                 summary=f"library {cmp['library_s'] * 1e3:.1f} ms, reference "
                         f"{cmp['reference_s'] * 1e3:.1f} ms: {cmp['ratio']:.2f}x "
                         f"(compile {cmp['compile_ratio']:.2f}x, diff {diff:.1e})")
  for name in c["round_models"]:
    model = br.build_model(name, c["image"])
    for kind in c["kinds"]:
      for k in c["round_ks"]:
        if budget.spent:
          report.write("reference", f"round {name} {kind} K={k}", "skipped",
                       summary="section budget spent")
          continue
        stats, lb, rb, diff, info = br.bench_round(
            model, br.client_sizes(kind, k, c["samples"]), args, rng)
        row(f"round {name} {kind} K={k}", br.compare(stats["library"], stats["reference"],
                                                     lb, rb), diff, **info)
  for name in c["prov_models"]:
    model = br.build_model(name, c["image"])
    for k in c["prov_ks"]:
      if budget.spent or (name == "cnn" and k > c["cnn_max_clients"]):
        report.write("reference", f"trace {name} K={k}", "skipped",
                     summary="section budget spent" if budget.spent else "too large")
        continue
      stats, nbytes, diffs = br.bench_provenance(model, k, args, rng)
      best = min(("einsum", "plain_jvp"), key=lambda r: stats[r]["median_s"])
      for kernel in c["kernels"].split(","):
        row(f"trace {name} K={k} N={c['inputs']} {kernel} vs {best}",
            br.compare(stats[kernel], stats[best], nbytes[kernel], nbytes[best]),
            diffs[kernel])


# ------------------------------------------------------------------------------------ main

SECTIONS = ("correctness", "round", "provenance", "reference", "attribution", "scale")
EXTRA_SECTIONS = ("million",)  # run only when named in --sections
# Sections that run the experiment layer (configs, sweeps): they need its extra packages.
EXPERIMENT_SECTIONS = ("attribution", "scale", "million")


def _missing_experiment_packages() -> list[str]:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return [m for m in ("ml_collections", "orbax.checkpoint", "matplotlib", "rich", "tabulate")
          if importlib.util.find_spec(m.split(".")[0]) is None]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="CPU-sized, same code paths (< 2 min)")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                 help="folder for gpu.jsonl (appended) and gpu.md (this run)")
  p.add_argument("--sections", default=",".join(SECTIONS))
  p.add_argument("--time-limit", type=float, default=0,
                 help="seconds for the whole run (0: 450 on GPU, 900 in smoke mode); a section "
                      "that would start past it is skipped, one running finishes its item")
  args = p.parse_args(argv)
  unknown = [s for s in args.sections.split(",") if s not in SECTIONS + EXTRA_SECTIONS]
  if unknown:
    p.error(f"unknown section(s) {', '.join(unknown)}; valid: "
            f"{', '.join(SECTIONS + EXTRA_SECTIONS)}")
  mode = "smoke" if args.smoke else "gpu"
  cfg = SIZES[mode]
  report = Report(Path(args.out), mode)
  if mode == "gpu" and jax.default_backend() != "gpu":
    print(f"warning: no GPU backend ({jax.default_backend()}); full sizes on this device",
          flush=True)
  sections = {"correctness": correctness, "round": round_section,
              "provenance": provenance_section, "reference": reference_section,
              "attribution": attribution_section, "scale": scale_section,
              "million": million_section}
  t_start = time.perf_counter()
  deadline = t_start + (args.time_limit or cfg["time_limit"])
  for name in args.sections.split(","):
    t_section = time.perf_counter()
    missing = _missing_experiment_packages() if name in EXPERIMENT_SECTIONS else []
    if missing:  # e.g. the GPU machine's python: jax, flax, optax, torch, no experiment extras
      report.write(name, "section", "skipped", summary=f"needs {', '.join(missing)} "
                   "(pip install -e '.[experiment]')")
      continue
    try:
      sections[name](report, cfg, Budget(cfg["budgets"][name], deadline))
    except Exception as e:  # pylint: disable=broad-except  # one section's failure keeps the rest
      traceback.print_exc()
      report.write(name, "section raised", "error", error=repr(e)[:500],
                   summary=f"error: {type(e).__name__}: {str(e)[:150]}")
    dt = time.perf_counter() - t_section
    report.write(name, "section wall time", "ok", section_s=dt, summary=f"{dt:.1f} s")
  report.write("total", "wall time", "ok", wall_s=time.perf_counter() - t_start,
               summary=f"{time.perf_counter() - t_start:.1f} s")
  (report.out / "gpu.md").write_text(report.table(), encoding="utf-8")
  print(report.table())
  return 1 if report.failed else 0


if __name__ == "__main__":
  sys.exit(main())
