"""Provenance scoring dealt to the devices of a 1-D mesh (`trace_clients(mesh=...)`).

Clients (or, for the round's own removal, the re-aggregated models G and every G_{-k}) are
split over the devices with `shard_map`, padded to a multiple of the device count with
columns dropped before anything reads them; results are gathered onto every device so every
process can read them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tracefl_jax.provenance import kernels
from tracefl_jax.provenance.removal import map_models, removal_masks


def _pad_clients(tree, pad: int):
  """Appends `pad` all-zero clients to every leaf `[K, ...]`: their columns are dropped before
  the softmax, so they never affect an attribution."""
  return jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]),
                      tree)


def score_clients(score: kernels.Scorer, client_params, mesh: jax.sharding.Mesh) -> jax.Array:
  """`score` over the clients dealt to the devices of a 1-D `mesh`: `[L, N, K]`.

  Each device scores its `ceil(K / D)` clients (chunked within the device when the scorer
  chunks); K is padded to a multiple of D with zero clients whose columns are dropped here.
  G's share of the work, which `score` closes over, enters every device replicated.
  """
  axis = mesh.axis_names[0]
  k = jax.tree.leaves(client_params)[0].shape[0]
  pad = (-k) % mesh.size
  if pad:
    client_params = _pad_clients(client_params, pad)
  spec = jax.sharding.PartitionSpec(axis)
  # check_vma=False: the jvp scorer pushes device-varying client directions through G's
  # linearisation, whose primal point is replicated; the value checker rejects that mix.
  c = jax.shard_map(score, mesh=mesh, in_specs=(spec,),
                    out_specs=jax.sharding.PartitionSpec(None, None, axis),
                    check_vma=False)(client_params)
  return c[:, :, :k]


def removal_scores(score: kernels.Scorer, reaggregate, weights: jax.Array,
                    clients_per_chunk: int | None,
                    mesh: jax.sharding.Mesh | None) -> jax.Array:
  """`[L, N, K + 1]`: `score` of G re-computed by the round's server side (column 0) and of
  every G_{-k} (column k + 1), built `clients_per_chunk` at a time, the models dealt to the
  devices of `mesh` (padded with copies of G, dropped here)."""
  masks = removal_masks(weights)

  def on_masks(m):
    out = map_models(lambda models: jnp.moveaxis(score(models["params"]), -1, 0),
                     reaggregate, m, clients_per_chunk)  # [r, L, N]
    return jnp.moveaxis(out, 0, -1)

  if mesh is None:
    return on_masks(masks)
  rows, k = masks.shape
  pad = (-rows) % mesh.size
  masks = jnp.concatenate([masks, jnp.broadcast_to(masks[:1], (pad, k))])
  axis = mesh.axis_names[0]
  out = jax.shard_map(on_masks, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(axis),),
                      out_specs=jax.sharding.PartitionSpec(None, None, axis),
                      check_vma=False)(masks)
  return out[:, :, :rows]


def replicated(tree, mesh: jax.sharding.Mesh | None):
  """Gathers every leaf onto every device of `mesh` (every process can read the result)."""
  if mesh is None:
    return tree
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, rep), tree)
