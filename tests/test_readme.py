"""The README's Python example (own Flax module with BatchNorm, own arrays, rounds, trace)
runs as written and answers with the documented shapes."""

from __future__ import annotations

import numpy as np

from tests.test_docs import README, python_blocks


def test_readme_python_example_runs():
  blocks = python_blocks(README)
  assert len(blocks) == 1, "README has one ```python example (docs/ pages hold the others)"
  scope: dict = {}
  exec(compile(blocks[0], str(README), "exec"), scope)  # pylint: disable=exec-used
  result = scope["result"]
  assert result.scores.shape == result.probs.shape == (4, 5)
  np.testing.assert_allclose(np.asarray(result.probs).sum(axis=1), 1.0, rtol=1e-5)
  ids = np.array([1, 4, 9, 12, 17])
  np.testing.assert_array_equal(result.client_ids, ids)
  np.testing.assert_array_equal(result.traced_client, ids[np.argmax(result.probs, axis=1)])
  history = scope["history"]
  assert [h["round"] for h in history] == [1, 2, 3]
  assert "accuracy" in history[-1] and "inputs" in history[-1]["provenance"]
  assert "batch_stats" in scope["state"].variables and scope["state"].round == 4
