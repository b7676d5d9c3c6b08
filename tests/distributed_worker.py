"""One process of the multi-process test (tests/test_multiprocess.py), and the shared workload.

`python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz` joins a
`jax.distributed` job on localhost (CPU collectives: gloo, jax's default), runs
`round_and_trace` over every process's devices, and process 0 writes the results. The test
process runs the same function on its own 4 fake devices as the single-process reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import optax

NUM_CLIENTS = 6  # not a multiple of 4 devices: the round and the trace both pad


def round_and_trace() -> dict[str, np.ndarray]:
  """One sharded FedAvg round and a sharded `trace_clients` of its clients, over all devices.

  Returns host arrays: the new global params (`param_<i>`, leaves in tree order), the round's
  client losses, and the provenance scores, traced clients and predictions; every value is
  read back from the (replicated) global arrays.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from tracefl_jax import federate, federated_averaging, get_model, round_key, trace_clients  # pylint: disable=g-import-not-at-top
  from tracefl_jax.fl.strategies import client_mesh  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = rng.normal(size=(48, 6, 6, 1)).astype(np.float32)
  y = rng.integers(0, 3, size=48).astype(np.int32)
  sizes = [7, 4, 9, 0, 6, 5, 8]  # uneven, one empty client
  parts = np.split(rng.permutation(48)[:sum(sizes)], np.cumsum(sizes)[:-1])
  model = get_model("mlp", (6, 6, 1), 3)
  variables = model.init(jax.random.key(1))
  algorithm = federated_averaging(model, optax.sgd(0.1, momentum=0.9), batch_size=4,
                                  local_epochs=1, strategy="sharded")
  clients = np.array([0, 1, 2, 3, 5, 6])
  state, out = algorithm.round(algorithm.init(variables), clients=clients,
                               data=federate(x, y, parts), key=round_key(jax.random.key(0), 1))
  res = trace_clients(model, state.variables, out.clients.variables, x[:10], kernel="grad",
                      client_ids=clients, client_sizes=np.asarray(sizes)[clients] + 1,
                      use_size_factor=True, clients_per_chunk=1, mesh=client_mesh())
  params = multihost_utils.process_allgather(state.variables["params"], tiled=True)
  losses = multihost_utils.process_allgather(out.clients.loss, tiled=True)
  result = {f"param_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(params))}
  # The trace's result is replicated on every device, so each process reads it directly.
  result.update(losses=np.asarray(losses), scores=np.asarray(res.scores),
                traced_client=np.asarray(res.traced_client),
                predicted=np.asarray(res.predicted), devices=np.asarray(jax.device_count()))
  return result


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60)
  result = round_and_trace()
  if process_id == 0:
    np.savez(out, **result)
  jax.distributed.shutdown()


if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
