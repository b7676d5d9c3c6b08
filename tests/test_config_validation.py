"""Every field of base_config() has a rule, and every rule names the field, the value and what
is valid: a table of one bad value (or more) per field, the edge values that stay valid, and
wrong types. No run starts: validate() is the first thing a run does."""

from __future__ import annotations

import math

import ml_collections
import pytest

from tracefl_jax.experiment import cli_args, config_checks
from tracefl_jax.experiment.config import FIELDS, base_config, config_fields, validate

# field -> [(bad value, what the message says)]; base_config() has 10 rounds and 20 clients,
# 5 per round.
BAD_VALUES: dict[str, list[tuple[object, str]]] = {
    "seed": [(-5, "seed=-5 must be in [0, 4294967295]"),
             (2**32, "seed=4294967296 must be in [0, 4294967295]")],
    "rounds": [(0, "rounds=0 must be >= 1")],
    "num_clients": [(0, "num_clients=0 must be >= 1")],
    "clients_per_round": [(200, "clients_per_round=200 must be in [1, num_clients=20]"),
                          (0, "clients_per_round=0 must be in [1, num_clients=20]")],
    "dataset.name": [("imagenet", "dataset.name='imagenet' is not one of cifar10, dbpedia, "
                                  "digits")],
    "dataset.data_dir": [("", "dataset.data_dir='' must be a directory or unset")],
    "dataset.num_train": [(-1000, "dataset.num_train=-1000 must be >= 0 (0: all)")],
    "dataset.num_test": [(-1, "dataset.num_test=-1 must be >= 0 (0: all)")],
    "dataset.tokenizer": [("/no/such/tokenizer", "dataset.tokenizer='/no/such/tokenizer' is "
                                                 "not an existing directory")],
    "dataset.placement": [("disk", "dataset.placement='disk' is not one of auto, device")],
    "dataset.max_length": [(0, "dataset.max_length=0 must be >= 1")],
    "dataset.synthetic_size": [(0, "dataset.synthetic_size=0 must be >= 1")],
    "dataset.synthetic_shape": [("32,x", "dataset.synthetic_shape='32,x' must be positive "
                                         "integers"),
                                ("8,0,1", "dataset.synthetic_shape='8,0,1' must be positive")],
    "dataset.synthetic_classes": [(1, "dataset.synthetic_classes=1 must be >= 2")],
    "dataset.synthetic_noise": [(-0.5, "dataset.synthetic_noise=-0.5 must be >= 0"),
                                (math.nan, "dataset.synthetic_noise=nan must be >= 0")],
    "dataset.synthetic_pixels": [("int8", "dataset.synthetic_pixels='int8' is not one of "
                                          "float32, uint8")],
    "dataset.vocab_size": [(1, "dataset.vocab_size=1 must be 0 (from the data) or >= 2")],
    "partition.method": [("zipf", "partition.method='zipf' is not one of iid, dirichlet")],
    "partition.alpha": [(0.0, "partition.alpha=0.0 must be > 0"),
                        (math.inf, "partition.alpha=inf must be > 0")],
    "partition.min_partition_size": [(-1, "partition.min_partition_size=-1 must be >= 0")],
    "partition.sizes": [("pareto", "partition.sizes='pareto' is not one of zipf, lognormal")],
    "partition.size_spread": [(0.0, "partition.size_spread=0.0 must be > 0")],
    "partition.classes_per_client": [(0, "partition.classes_per_client=0 must be >= 1")],
    "partition.shards_per_client": [(0, "partition.shards_per_client=0 must be >= 1")],
    "partition.min_label_count": [(-1, "partition.min_label_count=-1 must be >= 0")],
    "partition.max_per_client": [(0, "partition.max_per_client=0 must be >= 1")],
    "partition.min_client_size": [(-1, "partition.min_client_size=-1 must be >= 0")],
    "partition.max_clients": [(-1, "partition.max_clients=-1 must be >= 0 (0: all)"),
                              (3, "partition.max_clients=3 is below clients_per_round=5")],
    "model.name": [("vgg", "model.name='vgg' is not one of bert_base, bert_tiny, cnn")],
    "model.hf_path": [("/no/such/model", "model.hf_path='/no/such/model' is not an existing "
                                         "directory")],
    "model.torchvision_weights": [("/no/such.pt", "model.torchvision_weights='/no/such.pt' is "
                                                  "not an existing file")],
    "client.optimizer": [("lion", "client.optimizer='lion' is not one of adam")],
    "client.learning_rate": [(0.0, "client.learning_rate=0.0 must be > 0"),
                             (math.inf, "client.learning_rate=inf must be > 0")],
    "client.weight_decay": [(-1e-4, "client.weight_decay=-0.0001 must be >= 0")],
    "client.momentum": [(1.0, "client.momentum=1.0 must be in [0, 1)")],
    "client.batch_size": [(0, "client.batch_size=0 must be >= 1"),
                          (-4, "client.batch_size=-4 must be >= 1")],
    "client.local_epochs": [(0, "client.local_epochs=0 must be >= 1")],
    "client.divergence_factor": [(-1.0, "client.divergence_factor=-1.0 must be >= 0 (0: off)")],
    "aggregation.weighting": [("median", "aggregation.weighting='median' is not one of")],
    "simulation.strategy": [("pmap", "simulation.strategy='pmap' is not one of auto, vmap")],
    "simulation.clients_per_chunk": [(-1, "simulation.clients_per_chunk=-1 must be >= 0")],
    "simulation.compute_dtype": [("float16", "simulation.compute_dtype='float16' is not one "
                                             "of float32, bfloat16")],
    "eval.batch_size": [(0, "eval.batch_size=0 must be >= 1")],
    "eval.max_test_inputs": [(0, "eval.max_test_inputs=0 must be >= 1")],
    "provenance.rounds": [("3,99", "provenance.rounds [99] outside 1..10"),
                          ("a", "provenance.rounds='a' is not a list of integers")],
    "provenance.mode": [("all", "provenance.mode='all' is not one of")],
    "provenance.kernel": [("trak", "provenance.kernel='trak' is not one of")],
    "provenance.decay": [(0.0, "provenance.decay=0.0 must be in (0, 1]"),
                         (1.5, "provenance.decay=1.5 must be in (0, 1]")],
    "provenance.per_label": [(0, "provenance.per_label=0 must be >= 1")],
    "provenance.max_faulty_inputs": [(0, "provenance.max_faulty_inputs=0 must be >= 1")],
    "provenance.clients_per_chunk": [(-1, "provenance.clients_per_chunk=-1 must be >= 0")],
    "provenance.top_k": [(-1, "provenance.top_k=-1 must be >= 1"),
                         (0, "provenance.top_k=0 must be >= 1")],
    "provenance.block_mask": [("none", "provenance.block_mask='none' is not one of parity, "
                                       "fixed")],
    "provenance.feddebug_inputs": [(0, "provenance.feddebug_inputs=0 must be >= 1")],
    "provenance.feddebug_threshold": [(-0.1, "provenance.feddebug_threshold=-0.1 must be >= 0")],
    "provenance.store_rounds": [("11", "provenance.store_rounds [11] outside 1..10"),
                                ("0,last", "provenance.store_rounds='0,last' is not 'last', "
                                           "'all', a list of round numbers like '3,7,10', or "
                                           "'none' (or '')")],
    "dp.noise_multiplier": [(-1.0, "dp.noise_multiplier=-1.0 must be >= 0")],
    "dp.clip_norm": [(0.0, "dp.clip_norm=0.0 must be > 0")],
    "dp.delta": [(1.0, "dp.delta=1.0 must be in (0, 1)")],
    "dp.target_quantile": [(1.5, "dp.target_quantile=1.5 must be in [0, 1]")],
    "dp.clip_learning_rate": [(-0.2, "dp.clip_learning_rate=-0.2 must be >= 0")],
    "dp.count_stddev": [(-1.0, "dp.count_stddev=-1.0 must be >= 0 (0: clients_per_round / "
                               "20)")],
    "algorithm": [("fedprox", "algorithm='fedprox' is not one of fedavg, scaffold, feddyn, "
                              "fednova")],
    "feddyn.alpha": [(0.0, "feddyn.alpha=0.0 must be > 0")],
    "ditto.lam": [(-0.5, "ditto.lam=-0.5 must be >= 0")],
    "qffl.q": [(-1.0, "qffl.q=-1.0 must be >= 0")],
    "qffl.lipschitz": [(-2.0, "qffl.lipschitz=-2.0 must be >= 0")],
    "checkpoint.every": [(-1, "checkpoint.every=-1 must be >= 0")],
    "client.loss": [("prox", "client.loss='prox' is not one of cross_entropy, fedprox")],
    "client.prox_mu": [(-0.1, "client.prox_mu=-0.1 must be >= 0")],
    "aggregation.rule": [("mode", "aggregation.rule='mode' is not one of")],
    "aggregation.trim_beta": [(0.5, "aggregation.trim_beta=0.5 must be in [0, 0.5)")],
    "aggregation.num_byzantine": [(-1, "aggregation.num_byzantine=-1 must be >= 0")],
    "aggregation.num_selected": [(0, "aggregation.num_selected=0 must be >= 1")],
    "server.optimizer": [("lamb", "server.optimizer='lamb' is not one of")],
    "server.learning_rate": [(0.0, "server.learning_rate=0.0 must be > 0")],
    "server.momentum": [(1.0, "server.momentum=1.0 must be in [0, 1)")],
    "server.b1": [(1.0, "server.b1=1.0 must be in [0, 1)")],
    "server.b2": [(-0.5, "server.b2=-0.5 must be in [0, 1)")],
    "server.eps": [(0.0, "server.eps=0.0 must be > 0")],
    "provenance.score": [("loo", "provenance.score='loo' is not one of tracefl, first_order")],
    "provenance.use_size_factor": [],  # cross-field with provenance.score: its own test
    "attribution.explain_inputs": [(0, "attribution.explain_inputs=0 must be >= 1")],
    "attribution.federations_per_chunk": [(-1, "attribution.federations_per_chunk=-1 must be "
                                                ">= 0")],
    "attribution.round_decay": [(1.5, "attribution.round_decay=1.5 must be in [0, 1]")],
    "attribution.subsets": [(2, "attribution.subsets=2 must be 0 (no LDS) or >= 3"),
                            (-1, "attribution.subsets=-1 must be 0 (no LDS) or >= 3")],
    "attribution.noise_seed": [(-1, "attribution.noise_seed=-1 must be >= 1")],
    "attribution.truth_seeds": [(0, "attribution.truth_seeds=0 must be >= 1")],
    "attribution.bootstrap": [(0, "attribution.bootstrap=0 must be >= 1")],
    "attribution.topk_inputs": [(-1, "attribution.topk_inputs=-1 must be >= 0")],
    "attribution.topk": [(0, "attribution.topk=0 must be >= 1")],
    "provenance.output": [("prob", "provenance.output='prob' is not one of logit, margin")],
    "faulty.clients": [("20", "faulty.clients [20] outside 0..19"),
                       ("a", "faulty.clients='a' is not 'largest' or comma-separated")],
    "faulty.flip": [("1-0", "faulty.flip='1-0' is not 'src:dst,...'"),
                    ("-1:0", "faulty.flip labels [-1] must be >= 0")],
    "faulty.every_round": [(True, "faulty.every_round needs faulty.clients")],
}

# Values at the edge of each range, valid.
EDGE_VALUES = [("seed", 0), ("seed", 2**32 - 1), ("dataset.num_train", 0),
               ("dataset.synthetic_noise", 0.0), ("dataset.vocab_size", 0),
               ("dataset.vocab_size", 2), ("client.momentum", 0.0), ("provenance.decay", 1.0),
               ("provenance.top_k", 1), ("checkpoint.every", 0), ("partition.max_clients", 5),
               ("eval.batch_size", 1), ("eval.max_test_inputs", 1), ("clients_per_round", 20),
               ("dataset.synthetic_shape", "16"), ("faulty.clients", "largest"),
               ("provenance.store_rounds", "none"), ("provenance.store_rounds", ""),
               ("provenance.store_rounds", "all")]


def _set(config, field, value):
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  return config


def test_every_field_has_a_rule_and_a_bad_value_case():
  """Each field's default, meaning and rule are one entry of `FIELDS`, from which
  `base_config()` is built; every field with a rule beyond its type has a bad value here."""
  rules = (config_checks.Range, config_checks.Choices, config_checks.Parse)
  assert sorted(config_fields(base_config())) == sorted(FIELDS)
  for name, field in FIELDS.items():
    assert field.help and "\n" not in field.help, name
    assert isinstance(field.rule, rules) or field.rule in (config_checks.CROSS,
                                                           config_checks.FREE), name
  need_case = {name for name, field in FIELDS.items() if field.rule != config_checks.FREE}
  assert need_case <= set(BAD_VALUES), (
      f"add a bad value to BAD_VALUES for {sorted(need_case - set(BAD_VALUES))}")


@pytest.mark.parametrize("field,value,message", [
    (field, value, message) for field, cases in BAD_VALUES.items() for value, message in cases])
def test_bad_value_is_named_on_one_line(field, value, message):
  config = _set(base_config(), field, value)
  with pytest.raises(ValueError) as e:
    validate(config)
  text = str(e.value)
  assert message in text, text
  line = next(l for l in text.splitlines() if message in l)
  assert line.startswith(("invalid config: ", "  - ")) and field in line


@pytest.mark.parametrize("field,value", EDGE_VALUES)
def test_edge_values_stay_valid(field, value):
  validate(_set(base_config(), field, value))


def test_defaults_and_existing_paths_are_valid(tmp_path):
  validate(base_config())
  weights = tmp_path / "w.pt"
  weights.write_bytes(b"")
  c = base_config()
  c.model.torchvision_weights, c.dataset.tokenizer = str(weights), str(tmp_path)
  c.model.hf_path, c.model.name = str(tmp_path), "not-a-registry-name"  # hf_path wins
  validate(c)


def test_every_problem_listed_at_once():
  c = _set(_set(base_config(), "seed", -5), "eval.batch_size", 0)
  with pytest.raises(ValueError) as e:
    validate(c)
  lines = str(e.value).splitlines()
  assert lines[0] == "invalid config:" and len(lines) == 3
  assert "seed=-5" in lines[1] and "eval.batch_size=0" in lines[2]


@pytest.mark.parametrize("field,value,message", [
    ("rounds", 2.5, "rounds=2.5 must be an integer"),
    ("seed", True, "seed=True must be an integer"),
    ("dp.enabled", "yes", "dp.enabled='yes' must be true or false"),
    ("client.learning_rate", "fast", "client.learning_rate='fast' must be a number"),
    ("imports", 3, "imports=3 must be a string"),
    ("dataset.data_dir", 7, "dataset.data_dir=7 must be a string"),
])
def test_wrong_types_are_named(field, value, message):
  """A config built without ml_collections' type safety (a dict, a loose ConfigDict)."""
  loose = ml_collections.ConfigDict(base_config().to_dict(), type_safe=False)
  loose.dataset.data_dir = None
  with pytest.raises(ValueError, match=f"invalid config: {message}"):
    validate(_set(loose, field, value))


def test_trace_arguments_are_checked_before_tracing(tmp_path):
  """`trace --top_k=-2` listed fewer clients; `--out` into a missing directory or onto a
  directory failed with a traceback after the whole trace (issue 23)."""
  check = cli_args.trace_arg_errors
  assert check(3, None) == [] and check(1, str(tmp_path / "rows.jsonl")) == []
  assert check(-2, None) == ["--top_k=-2 must be >= 1 (top clients listed per input)"]
  assert check(0, None) == ["--top_k=0 must be >= 1 (top clients listed per input)"]
  missing = tmp_path / "no" / "rows.jsonl"
  assert check(3, str(missing)) == [f"--out={str(missing)!r}: the directory {missing.parent} "
                                    f"does not exist; create it first"]
  (message,) = check(3, str(tmp_path))
  assert message.startswith(f"--out={str(tmp_path)!r} is a directory; give the path of a file")
  assert len(check(-1, str(tmp_path))) == 2
