"""The same FedAvg work in the simulators users would otherwise pick (issue 36, item 6).

One round = K clients x 32 examples each (the same arrays for every simulator), the same MLP
(64-32-10, ReLU), plain SGD on the mean cross-entropy, batch 32, `--epochs` local epochs, and
the server's plain example-weighted average (FedAvg, server step 1). Simulators:

  tracefl_jax  `federated_averaging(model, optax.sgd(lr), ...).round`, chained rounds;
  flower       Flower's Simulation Engine (`flwr.simulation.run_simulation`, Ray backend, the
               Message API: a `ClientApp` training a PyTorch MLP as in the original TraceFL,
               a `ServerApp` running `flwr.serverapp.strategy.FedAvg`; K virtual SuperNodes,
               fraction_train 1, no evaluation; one CPU per ClientApp, one torch thread each);
  pfl          pfl-research's `SimulatedBackend` + `FederatedAveraging` with a `PyTorchModel`
               (pfl has no JAX backend: PyTorch, TensorFlow, MLX), `WeightByDatapoints`,
               central SGD at learning rate 1;
  fedjax       FedJAX's `algorithms.fed_avg.federated_averaging` on `InMemoryFederatedData`
               with a Haiku MLP (its default `for_each_client` backend).

Every (simulator, K, repetition) runs in a fresh worker process (this script with
`--worker`), and the repetitions are interleaved: for each K, repetition r runs the simulators
in an order rotated by r, so all see the same load on a shared machine. A worker runs
`--rounds` rounds: the first is the warm-up (compilation, Ray's actors, ...) and is reported
apart (`first_round_s`); `steady_s` is the median over the repetitions of each worker's
median of the later rounds. `setup_s`: from spawning the worker to its first round (imports,
data, Ray start-up). Peak memory: the largest resident set summed over the worker and all its
descendant processes (Ray's raylet, GCS and actors), sampled every 50 ms (`peak_rss_mb`;
shared pages count once per process), and the worker's own `ru_maxrss` (`peak_rss_self_mb`).

Equivalence: every simulator starts from tracefl_jax's initial weights (Flax kernels
transposed for PyTorch) and, with batch = client size, one batch per epoch, so the data order
inside a client cannot matter; the global model after round 1 is compared with tracefl_jax's
(`max_rel_diff`: max |a - b| / max |b| over each tensor, the largest over tensors; the check
passes at <= `--tolerance`).

  python benchmarks/bench_peers.py --out=benchmarks/results/peers_cpu.jsonl

The peers come from the `peers` extra, best in their own venv (they pin older protobuf,
absl-py and dp-accounting than the dev venv holds); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PEERS = ("tracefl_jax", "flower", "pfl", "fedjax")
IN, HIDDEN, OUT = 64, 32, 10


# ----------------------------------------------------------------------------- shared ----

def load_case(path):
  """x [K*S, 64], y [K*S], sizes [K], init weights (Flax layout: kernel [in, out])."""
  z = np.load(path)
  return {k: z[k] for k in z.files}


def client_slices(sizes):
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  return [slice(int(s), int(s + n)) for s, n in zip(starts, sizes)]


class PeakRss:
  """Samples the summed RSS of this process and its descendants every 50 ms."""

  def __init__(self):
    import psutil  # pylint: disable=g-import-not-at-top
    self.proc, self.peak, self.stop = psutil.Process(), 0, False
    self.thread = threading.Thread(target=self._run, daemon=True)
    self.thread.start()

  def _run(self):
    import psutil  # pylint: disable=g-import-not-at-top
    while not self.stop:
      total = 0
      try:
        procs = [self.proc] + self.proc.children(recursive=True)
      except psutil.Error:
        procs = [self.proc]
      for p in procs:
        try:
          total += p.memory_info().rss
        except psutil.Error:
          pass
      self.peak = max(self.peak, total)
      time.sleep(0.05)

  def close(self):
    self.stop = True
    self.thread.join()
    return self.peak


def torch_mlp():
  import torch  # pylint: disable=g-import-not-at-top
  return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(),
                             torch.nn.Linear(HIDDEN, OUT))


def torch_state(case):
  import torch  # pylint: disable=g-import-not-at-top
  return {"0.weight": torch.tensor(case["w0"].T.copy()), "0.bias": torch.tensor(case["b0"]),
          "2.weight": torch.tensor(case["w1"].T.copy()), "2.bias": torch.tensor(case["b1"])}


def from_torch(sd):
  g = {k: v.detach().cpu().numpy().copy() if hasattr(v, "detach") else np.array(v)
       for k, v in sd.items()}
  return {"w0": g["0.weight"].T, "b0": g["0.bias"], "w1": g["2.weight"].T, "b1": g["2.bias"]}


# ---------------------------------------------------------------------------- workers ----
# Each returns (round end times [R] from perf_counter, start time, G after round 1).

def run_tracefl(case, args):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from tracefl_jax.data.federated import federate  # pylint: disable=g-import-not-at-top
  from tracefl_jax.fl.rounds import federated_averaging, round_key  # pylint: disable=g-import-not-at-top
  from tracefl_jax.models import make_model  # pylint: disable=g-import-not-at-top
  from tracefl_jax.models.cnn import MLP  # pylint: disable=g-import-not-at-top

  model = make_model("mlp_64_32_10", MLP(num_classes=OUT, hidden=(HIDDEN,)), (IN,), OUT)
  sizes = case["sizes"]
  data = federate(case["x"], case["y"],
                  [np.arange(s.start, s.stop) for s in client_slices(sizes)], num_classes=OUT)
  variables = {"params": {"Dense_0": {"kernel": case["w0"], "bias": case["b0"]},
                          "Dense_1": {"kernel": case["w1"], "bias": case["b1"]}}}
  algorithm = federated_averaging(model, optax.sgd(args.lr), batch_size=args.batch,
                                  local_epochs=args.epochs)
  state = algorithm.init(jax.tree.map(jax.numpy.asarray, variables))
  clients, key = np.arange(len(sizes)), jax.random.key(0)
  ends, g1 = [], None
  start = time.perf_counter()
  for r in range(1, args.rounds + 1):
    state, out = algorithm.round(state, clients=clients, data=data, key=round_key(key, r))
    jax.block_until_ready(out.variables)
    ends.append(time.perf_counter())
    if r == 1:
      p = jax.device_get(out.variables["params"])
      g1 = {"w0": p["Dense_0"]["kernel"], "b0": p["Dense_0"]["bias"],
            "w1": p["Dense_1"]["kernel"], "b1": p["Dense_1"]["bias"]}
  return ends, start, g1


def torch_local_train(model, x, y, args):
  """Plain SGD, mean cross-entropy, `args.epochs` epochs of shuffled batches."""
  import torch  # pylint: disable=g-import-not-at-top
  opt = torch.optim.SGD(model.parameters(), lr=args.lr)
  for _ in range(args.epochs):
    order = torch.randperm(len(y))
    for i in range(0, len(y), args.batch):
      b = order[i:i + args.batch]
      opt.zero_grad()
      torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
      opt.step()


def run_flower(case, args):
  import torch  # pylint: disable=g-import-not-at-top
  from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict  # pylint: disable=g-import-not-at-top
  from flwr.clientapp import ClientApp  # pylint: disable=g-import-not-at-top
  from flwr.serverapp import ServerApp  # pylint: disable=g-import-not-at-top
  from flwr.serverapp.strategy import FedAvg  # pylint: disable=g-import-not-at-top
  from flwr.simulation import run_simulation  # pylint: disable=g-import-not-at-top

  k = len(case["sizes"])
  data_path, train_args = args.data, argparse.Namespace(lr=args.lr, epochs=args.epochs,
                                                        batch=args.batch)
  cache = {}

  client_app = ClientApp()

  @client_app.train()
  def train(msg, context):
    if "x" not in cache:  # once per Ray actor process
      torch.set_num_threads(1)
      c = load_case(data_path)
      cache["x"], cache["y"] = torch.from_numpy(c["x"]), torch.from_numpy(c["y"]).long()
      cache["slices"] = client_slices(c["sizes"])
    sl = cache["slices"][int(context.node_config["partition-id"])]
    model = torch_mlp()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    torch_local_train(model, cache["x"][sl], cache["y"][sl], train_args)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": sl.stop - sl.start})})
    return Message(content=content, reply_to=msg)

  times = {"ends": [], "start": None, "g1": None}

  class TimedFedAvg(FedAvg):
    def configure_train(self, server_round, *a, **kw):
      if server_round == 1:
        times["start"] = time.perf_counter()
      return super().configure_train(server_round, *a, **kw)

    def aggregate_train(self, server_round, replies):
      arrays, metrics = super().aggregate_train(server_round, replies)
      times["ends"].append(time.perf_counter())
      if server_round == 1:
        times["g1"] = from_torch(arrays.to_torch_state_dict())
      return arrays, metrics

  server_app = ServerApp()

  @server_app.main()
  def main(grid, context):  # pylint: disable=unused-argument
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=k,
                           min_available_nodes=k)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_state(case)),
                   num_rounds=args.rounds)

  run_simulation(server_app=server_app, client_app=client_app, num_supernodes=k,
                 backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
  return times["ends"], times["start"], times["g1"]


def run_pfl(case, args):
  import torch  # pylint: disable=g-import-not-at-top
  from pfl.aggregate.simulate import SimulatedBackend  # pylint: disable=g-import-not-at-top
  from pfl.aggregate.weighting import WeightByDatapoints  # pylint: disable=g-import-not-at-top
  from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # pylint: disable=g-import-not-at-top
  from pfl.callback.base import TrainingProcessCallback  # pylint: disable=g-import-not-at-top
  from pfl.data.federated_dataset import FederatedDataset  # pylint: disable=g-import-not-at-top
  from pfl.data.sampling import get_user_sampler  # pylint: disable=g-import-not-at-top
  from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # pylint: disable=g-import-not-at-top
  from pfl.metrics import Metrics, Weighted  # pylint: disable=g-import-not-at-top
  from pfl.model.pytorch import PyTorchModel  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.torch_threads)

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.net = torch_mlp()

    def forward(self, x):
      return self.net(x)

    def loss(self, x, y, eval=False):  # pylint: disable=redefined-builtin
      self.train(not eval)
      return torch.nn.functional.cross_entropy(self(x), y)

    def metrics(self, x, y, eval=True):  # pylint: disable=redefined-builtin
      self.train(not eval)
      loss = torch.nn.functional.cross_entropy(self(x), y, reduction="sum")
      return {"loss": Weighted(loss.item(), len(y))}

  net = Net()
  net.net.load_state_dict(torch_state(case))
  x, y = torch.from_numpy(case["x"]), torch.from_numpy(case["y"]).long()
  users = {u: [x[s], y[s]] for u, s in enumerate(client_slices(case["sizes"]))}
  fed = FederatedDataset.from_slices(users, get_user_sampler("minimize_reuse", list(users)))
  model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                       central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
  backend = SimulatedBackend(training_data=fed, val_data=None,
                             postprocessors=[WeightByDatapoints()])
  times = {"ends": [], "start": None, "g1": None}

  class Clock(TrainingProcessCallback):
    def on_train_begin(self, *, model):
      times["start"] = time.perf_counter()
      return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
      times["ends"].append(time.perf_counter())
      if central_iteration == 0:
        times["g1"] = from_torch(model.pytorch_model.net.state_dict())
      return False, Metrics()

  FederatedAveraging().run(
      algorithm_params=NNAlgorithmParams(central_num_iterations=args.rounds,
                                         evaluation_frequency=10**9,
                                         train_cohort_size=len(users), val_cohort_size=0),
      backend=backend, model=model,
      model_train_params=NNTrainHyperParams(local_learning_rate=args.lr,
                                            local_num_epochs=args.epochs,
                                            local_batch_size=args.batch),
      model_eval_params=NNEvalHyperParams(local_batch_size=args.batch),
      callbacks=[Clock()])
  return times["ends"], times["start"], times["g1"]


def run_fedjax(case, args):
  import fedjax  # pylint: disable=g-import-not-at-top
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if not hasattr(jax, "tree_map"):
    # FedJAX 0.0.17 (its last release) calls `jax.tree_map`, an alias of
    # `jax.tree_util.tree_map` that jax removed in 0.6; restored as that alias, nothing else.
    jax.tree_map = jax.tree_util.tree_map

  def forward(batch):
    return hk.Sequential([hk.Linear(HIDDEN), jax.nn.relu, hk.Linear(OUT)])(batch["x"])

  model = fedjax.create_model_from_haiku(
      transformed_forward_pass=hk.transform(forward),
      sample_batch={"x": np.zeros((1, IN), np.float32), "y": np.zeros(1, np.int32)},
      train_loss=lambda b, logits: fedjax.metrics.unreduced_cross_entropy_loss(b["y"], logits))
  fd = fedjax.InMemoryFederatedData(
      {str(u).encode(): {"x": case["x"][s], "y": case["y"][s]}
       for u, s in enumerate(client_slices(case["sizes"]))})
  algorithm = fedjax.algorithms.fed_avg.federated_averaging(
      grad_fn=fedjax.model_grad(model), client_optimizer=fedjax.optimizers.sgd(args.lr),
      server_optimizer=fedjax.optimizers.sgd(1.0),
      client_batch_hparams=fedjax.ShuffleRepeatBatchHParams(batch_size=args.batch,
                                                            num_epochs=args.epochs))
  init = model.init(jax.random.PRNGKey(0))
  names = sorted(init)  # hk.Sequential: linear, linear_1
  params = {names[0]: {"w": case["w0"], "b": case["b0"]},
            names[1]: {"w": case["w1"], "b": case["b1"]}}
  state = algorithm.init(jax.tree.map(jax.numpy.asarray, params))
  ids = list(fd.client_ids())
  ends, g1 = [], None
  start = time.perf_counter()
  for r in range(1, args.rounds + 1):
    rng = jax.random.PRNGKey(r)
    clients = [(cid, ds, jax.random.fold_in(rng, i))
               for i, (cid, ds) in enumerate(fd.get_clients(ids))]
    state, _ = algorithm.apply(state, clients)
    jax.block_until_ready(state.params)
    ends.append(time.perf_counter())
    if r == 1:
      p = jax.device_get(state.params)
      g1 = {"w0": p[names[0]]["w"], "b0": p[names[0]]["b"],
            "w1": p[names[1]]["w"], "b1": p[names[1]]["b"]}
  return ends, start, g1


RUNNERS = {"tracefl_jax": run_tracefl, "flower": run_flower, "pfl": run_pfl,
           "fedjax": run_fedjax}


def worker(args):
  sampler = PeakRss()
  case = load_case(args.data)
  ends, start, g1 = RUNNERS[args.worker](case, args)
  peak = sampler.close()
  rounds = np.diff([start] + ends).tolist()
  np.savez(args.result + ".npz", **{k: np.asarray(v) for k, v in g1.items()})
  Path(args.result).write_text(json.dumps({
      "wall_start": time.time() - (time.perf_counter() - start), "round_s": rounds,
      "peak_rss_mb": peak / 2**20,
      "peak_rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


# ----------------------------------------------------------------------------- driver ----

def versions():
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "flwr", "ray", "pfl",
              "fedjax", "dm-haiku"):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      pass
  return out


def make_case(path, k, args):
  import jax  # pylint: disable=g-import-not-at-top
  from tracefl_jax.models import make_model  # pylint: disable=g-import-not-at-top
  from tracefl_jax.models.cnn import MLP  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(k)
  sizes = np.full(k, args.samples, np.int64)
  x = rng.normal(size=(int(sizes.sum()), IN)).astype(np.float32)
  teacher = rng.normal(size=(IN, OUT)).astype(np.float32)
  y = np.argmax(x @ teacher + rng.normal(size=(len(x), OUT)), axis=1).astype(np.int32)
  model = make_model("mlp_64_32_10", MLP(num_classes=OUT, hidden=(HIDDEN,)), (IN,), OUT)
  p = jax.device_get(model.init(jax.random.key(0))["params"])
  np.savez(path, x=x, y=y, sizes=sizes, w0=p["Dense_0"]["kernel"], b0=p["Dense_0"]["bias"],
           w1=p["Dense_1"]["kernel"], b1=p["Dense_1"]["bias"])


def rel_diff(a, b):
  return max(float(np.max(np.abs(a[n] - b[n])) / (np.max(np.abs(b[n])) + 1e-30)) for n in b)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--peers", default=",".join(PEERS))
  p.add_argument("--clients", default="10,100,1000", help="K values (clients per round)")
  p.add_argument("--samples", type=int, default=32, help="examples per client")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--rounds", type=int, default=4, help="per worker; the first is warm-up")
  p.add_argument("--repeats", type=int, default=3, help="interleaved workers per peer and K")
  p.add_argument("--tolerance", type=float, default=1e-5)
  p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
  p.add_argument("--torch-threads", type=int, default=1,
                 help="pfl's torch intra-op threads (Flower: one per ClientApp actor)")
  p.add_argument("--python", default=sys.executable, help="the workers' interpreter")
  p.add_argument("--out", default="")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--data", default="", help=argparse.SUPPRESS)
  p.add_argument("--result", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    worker(args)
    return

  peers = args.peers.split(",")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
  import platform  # pylint: disable=g-import-not-at-top
  machine = {"host": platform.node(), "cpu_count": os.cpu_count(),
             "python": platform.python_version(), "versions": versions()}
  failed = False
  with tempfile.TemporaryDirectory() as tmp:
    for k in [int(v) for v in args.clients.split(",")]:
      data = os.path.join(tmp, f"case_{k}.npz")
      make_case(data, k, args)
      runs = {name: [] for name in peers}
      for r in range(args.repeats):
        for name in peers[r % len(peers):] + peers[:r % len(peers)]:
          result = os.path.join(tmp, f"{name}_{k}_{r}.json")
          cmd = [args.python, __file__, f"--worker={name}", f"--data={data}",
                 f"--result={result}", f"--rounds={args.rounds}", f"--batch={args.batch}",
                 f"--epochs={args.epochs}", f"--lr={args.lr}",
                 f"--torch-threads={args.torch_threads}"]
          load = os.getloadavg()[0]
          t0 = time.time()
          proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                timeout=args.timeout, check=False)
          if proc.returncode != 0:
            print(f"{name} K={k}: worker failed (rc {proc.returncode}):\n"
                  f"{proc.stderr[-3000:]}", flush=True)
            runs[name].append(None)
            continue
          res = json.loads(Path(result).read_text())
          res["setup_s"] = res.pop("wall_start") - t0
          res["load"] = load
          res["g1"] = dict(np.load(result + ".npz"))
          runs[name].append(res)
          print(f"  {name} K={k} rep {r}: rounds " +
                " ".join(f"{t:.3f}" for t in res["round_s"]) +
                f" s, setup {res['setup_s']:.1f} s, peak {res['peak_rss_mb']:.0f} MB",
                flush=True)
      ours = next((x["g1"] for x in runs.get("tracefl_jax", []) if x), None)
      for name in peers:
        ok = [x for x in runs[name] if x]
        if not ok:
          failed = True
          continue
        steady = [statistics.median(x["round_s"][1:]) for x in ok]
        diff = rel_diff(ok[0]["g1"], ours) if ours is not None else None
        row = {"bench": "peers", "simulator": name, "K": k, "samples_per_client": args.samples,
               "model": f"mlp_{IN}_{HIDDEN}_{OUT}", "batch_size": args.batch,
               "local_epochs": args.epochs, "client_lr": args.lr,
               "torch_threads": args.torch_threads if name == "pfl" else None, "rounds": args.rounds,
               "repeats": len(ok), "steady_s": statistics.median(steady),
               "steady_per_repeat_s": steady, "first_round_s": [x["round_s"][0] for x in ok],
               "round_s": [x["round_s"] for x in ok],
               "setup_s": [x["setup_s"] for x in ok],
               "peak_rss_mb": max(x["peak_rss_mb"] for x in ok),
               "peak_rss_self_mb": max(x["peak_rss_self_mb"] for x in ok),
               "load_avg_1m": [x["load"] for x in ok], "max_rel_diff": diff,
               "equivalent": None if diff is None else diff <= args.tolerance,
               "tolerance": args.tolerance, **machine,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        failed |= row["equivalent"] is False
        if args.out:
          Path(args.out).parent.mkdir(parents=True, exist_ok=True)
          with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k2: row[k2] for k2 in ("simulator", "K", "steady_s", "peak_rss_mb",
                                                  "max_rel_diff", "equivalent")}), flush=True)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
