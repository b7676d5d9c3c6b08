"""The experiment configuration: `base_config()`, `FIELD_HELP` and `validate(config)`.

Configs are ml_collections `ConfigDict`s, locked so that a misspelt override
(`--config.clinets_per_round=5`) fails instead of being silently added. Experiment files under
`configs/` start from `base_config()` and set what differs (big_vision style).

`FIELD_HELP` (config_help.py, importable from here) holds one line of meaning per field of
`base_config()`; `python -m tracefl_jax --help` and `python -m tracefl_jax config` print them.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from tracefl_jax.experiment.algorithms import algorithm_errors
from tracefl_jax.experiment.config_help import FIELD_HELP  # noqa: F401  (re-exported)

__all__ = ["FIELD_HELP", "base_config", "config_fields", "parse_faulty_clients", "parse_flip",
           "parse_int_list", "parse_store_rounds", "validate"]


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the original's protocol (spec sections 3-4) at the embedded dataset's size.

  The paper runs 100 clients with 10 per round; the embedded digits set (1,437 training
  images) supports 20 clients after the partition fix-up's 32-example floor, so the defaults
  are 20 clients with 5 per round and the paper presets (configs/) set 100 and 10.
  """
  c = ml_collections.ConfigDict()
  # Comma-separated Python modules imported before the run: they may register your own
  # datasets and models by name (tracefl_jax.data.register_dataset, models.register_model).
  c.imports = ""
  c.seed = 42
  c.rounds = 10
  c.num_clients = 20
  c.clients_per_round = 5

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "digits"
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)
  c.dataset.download = False  # fetch missing mnist/cifar10/MedMNIST data into data_dir
  c.dataset.num_train = 0  # 0: all; >0 keeps the first num_train training examples
  c.dataset.num_test = 0
  c.dataset.tokenizer = ml_collections.config_dict.placeholder(str)  # text: local HF tokenizer
  c.dataset.max_length = 128
  c.dataset.synthetic_size = 2000      # synthetic / synthetic_text: training examples
  c.dataset.synthetic_shape = "32,32,3"  # image shape, or "seq_len" for synthetic_text
  c.dataset.synthetic_classes = 10
  c.dataset.synthetic_noise = 1.0      # synthetic: std of the per-pixel noise on the prototypes
  c.dataset.vocab_size = 0             # text models without a tokenizer (synthetic_text)

  c.partition = ml_collections.ConfigDict()
  c.partition.method = "dirichlet"
  c.partition.alpha = 0.3
  c.partition.self_balancing = True
  c.partition.min_partition_size = 0
  c.partition.classes_per_client = 2   # pathological
  c.partition.shards_per_client = 2    # shards
  c.partition.fixup = True             # the original's per-client fix-up (spec section 4):
                                       # drop labels < min_label_count, keep max_per_client,
                                       # drop clients < min_client_size; False: raw partition
  c.partition.min_label_count = 10
  c.partition.max_per_client = 2048
  c.partition.min_client_size = 32
  c.partition.max_clients = 0          # keep the first max_clients after the fix-up (0: all)

  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn"
  c.model.hf_path = ml_collections.config_dict.placeholder(str)  # a local HF checkpoint
  c.model.torchvision_weights = ml_collections.config_dict.placeholder(str)  # .pt/.safetensors

  c.client = ml_collections.ConfigDict()
  c.client.optimizer = "adam"
  c.client.learning_rate = 1e-3
  c.client.weight_decay = 0.0
  c.client.momentum = 0.0
  c.client.batch_size = 32
  c.client.local_epochs = 2
  c.client.divergence_factor = 1e3  # stop when a round's mean loss > factor * ln(classes)
  c.client.loss = "cross_entropy"   # or "fedprox" (Li et al. 2020) with prox_mu
  c.client.prox_mu = 0.01

  c.aggregation = ml_collections.ConfigDict()
  c.aggregation.weighting = "batches"  # the original's floor(n_k / batch_size); or examples
  c.aggregation.rule = "mean"       # FedAvg; or median, trimmed_mean, krum (robust rules)
  c.aggregation.trim_beta = 0.2
  c.aggregation.num_byzantine = 0
  c.aggregation.num_selected = 1

  # The server optimizer over the pseudo-gradient G - aggregate (Reddi et al., ICLR 2021):
  # "none" is FedAvg; sgd with momentum is FedAvgM; adam, yogi, adagrad the FedOpt family.
  c.server = ml_collections.ConfigDict()
  c.server.optimizer = "none"
  c.server.learning_rate = 1.0
  c.server.momentum = 0.0
  c.server.b1 = 0.9
  c.server.b2 = 0.99
  c.server.eps = 1e-3

  c.simulation = ml_collections.ConfigDict()
  c.simulation.strategy = "auto"
  c.simulation.clients_per_chunk = 0
  c.simulation.compute_dtype = "float32"  # "bfloat16": mixed precision, float32 master weights

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 512
  c.eval.max_test_inputs = 2048  # the server test set: the first 2048 test examples

  c.provenance = ml_collections.ConfigDict()
  c.provenance.enabled = True
  c.provenance.rounds = ""          # "" = every round; else comma-separated round numbers
  c.provenance.mode = "correct"     # "faulty": label-flipping clients (Table I)
  c.provenance.kernel = "auto"
  c.provenance.decay = 0.9
  c.provenance.use_decay = True
  c.provenance.use_size_factor = False
  c.provenance.score = "tracefl"    # "first_order": weight-aware w_k / (W - w_k) * (T_k - T_G)
  c.provenance.multi_round = False  # also attribute over all rounds so far (multiround.py)
  c.provenance.per_label = 2
  c.provenance.max_faulty_inputs = 10
  c.provenance.clients_per_chunk = 0
  c.provenance.shard_clients = False
  c.provenance.top_k = 3            # top clients written per input to provenance.jsonl
  c.provenance.block_mask = "parity"  # BERT blocks scored without the attention mask, as the
                                      # original did; "fixed": with G's mask
  c.provenance.counterfactual = True  # exact leave-one-client-out truth per traced input
  c.provenance.feddebug = True        # faulty mode: FedDebug beside TraceFL (image models)
  c.provenance.feddebug_inputs = 10
  c.provenance.feddebug_threshold = 0.003
  c.provenance.store_rounds = "last"  # keep rounds' client models in WORKDIR/rounds to trace
                                      # new inputs later: "last", "all", "3,7,10" or "none"
                                      # (disk: clients_per_round + 1 models per round)

  # The comparison of attribution methods against retrained federations
  # (tracefl_jax/experiment/attribution.py, configs/attribution.py).
  c.attribution = ml_collections.ConfigDict()
  c.attribution.enabled = False     # run the comparison instead of the plain experiment
  c.attribution.setting = ""        # the cell's name in the comparison table
  c.attribution.explain_inputs = 100  # test inputs explained (correct mode: first correct)
  c.attribution.subsets = 20        # M random half-subsets retrained for the LDS (0: no LDS)
  c.attribution.noise_seed = 1      # the noise-floor federation's data seed is seed + this
  c.attribution.round_decay = 1.0   # multi-round: gamma^(R - r) per round r
  c.attribution.federations_per_chunk = 0  # retrained federations run at once (0: all)
  c.attribution.per_round = True    # trace every round (paper's and weight-aware) for curves

  c.dp = ml_collections.ConfigDict()
  c.dp.enabled = False
  c.dp.noise_multiplier = 0.0       # z
  c.dp.clip_norm = 1.0              # C
  c.dp.delta = 1e-5                 # for the reported epsilon
  c.dp.parity = False               # the original's defects: noise BatchNorm stats too, and
                                    # trace the pre-noise aggregate

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 5            # rounds between checkpoints (0: only at the end)
  c.checkpoint.resume = True        # resume from workdir/checkpoints when present
  c.checkpoint.overwrite = False    # move a previous run aside to WORKDIR/previous/<time>/

  c.faulty = ml_collections.ConfigDict()
  c.faulty.clients = ""             # comma-separated faulty client ids, e.g. "0"; or
                                    # "largest": the client with most examples to flip
  c.faulty.flip = ""                # "src:dst,..." e.g. "1:0,2:0"
  c.faulty.every_round = False      # the faulty clients take part in every round

  c.lock()
  return c


def config_fields(config: ml_collections.ConfigDict | Mapping[str, object],
                  prefix: str = "") -> dict[str, object]:
  """`{dotted field: value}` of every leaf field, in the config's order (a config, or the
  nested dict of its JSON, e.g. a workdir's config.json)."""
  fields: dict[str, object] = {}
  for name, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
      fields.update(config_fields(value, f"{prefix}{name}."))
    else:
      fields[f"{prefix}{name}"] = value
  return fields


def parse_int_list(text: str) -> list[int]:
  return [int(t) for t in str(text).replace(" ", "").split(",") if t]


def parse_store_rounds(text: str, rounds: int) -> set[int]:
  """The rounds `provenance.store_rounds` keeps: "" or "none" none, "all", "last", or a
  list."""
  text = str(text).strip()
  if text == "none":
    return set()
  if text == "all":
    return set(range(1, rounds + 1))
  if text == "last":
    return {rounds}
  return set(parse_int_list(text))


def parse_faulty_clients(text: str) -> list[int] | None:
  """`faulty.clients` as ids, or None for "largest" (resolved on the partition by the run)."""
  if str(text).strip() == "largest":
    return None
  return parse_int_list(text)


def parse_flip(text: str) -> dict[int, int]:
  flip = {}
  for item in str(text).replace(" ", "").split(","):
    if not item:
      continue
    src, sep, dst = item.partition(":")
    if not sep:
      raise ValueError(f"faulty.flip entry {item!r} is not 'src:dst'")
    flip[int(src)] = int(dst)
  return flip


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises `ValueError` listing every problem of the config at once, before any work: each
  field of `base_config()` is checked for its type, its range or choices, and against the
  fields it depends on (config_checks.py lists the rules); one problem is one line naming the
  field, the value and what is valid."""
  from tracefl_jax.experiment import config_checks as checks  # pylint: disable=g-import-not-at-top
  errors = checks.type_errors(c, config_fields(base_config()))
  if errors:  # the value checks below assume the types
    _raise_invalid(errors)
  errors += checks.range_errors(c)
  errors += checks.choice_errors(c)
  errors += checks.cross_field_errors(c)
  try:
    rounds = parse_int_list(c.provenance.rounds)
    bad = [r for r in rounds if not 1 <= r <= c.rounds]
    if bad:
      errors.append(f"provenance.rounds {bad} outside 1..{c.rounds}")
  except ValueError:
    errors.append(f"provenance.rounds={c.provenance.rounds!r} is not a list of integers")
  try:
    bad = [r for r in parse_store_rounds(c.provenance.store_rounds, c.rounds)
           if not 1 <= r <= c.rounds]
    if bad:
      errors.append(f"provenance.store_rounds {bad} outside 1..{c.rounds}")
  except ValueError:
    errors.append(f"provenance.store_rounds={c.provenance.store_rounds!r} is not 'last', "
                  f"'all', a list of round numbers like '3,7,10', or 'none' (or '')")
  try:
    faulty = parse_faulty_clients(c.faulty.clients)
  except ValueError:
    errors.append(f"faulty.clients={c.faulty.clients!r} is not 'largest' or comma-separated "
                  f"client ids, e.g. '0,3'")
    faulty = []
  faulty = [0] if faulty is None else faulty  # "largest": one client, id known later
  try:
    flip = parse_flip(c.faulty.flip)
  except ValueError:
    errors.append(f"faulty.flip={c.faulty.flip!r} is not 'src:dst,...' with integer labels, "
                  f"e.g. '1:0,2:0'")
    flip = {}
  errors += checks.flip_errors(flip)
  if c.provenance.mode == "faulty" and not (faulty and flip):
    errors.append("provenance.mode='faulty' needs faulty.clients and faulty.flip")
  bad = [k for k in faulty if not 0 <= k < c.num_clients]
  if bad:
    errors.append(f"faulty.clients {bad} outside 0..{c.num_clients - 1}")
  if c.faulty.every_round and not faulty:
    errors.append("faulty.every_round needs faulty.clients")
  if c.faulty.every_round and len(set(faulty)) > c.clients_per_round:
    errors.append(f"faulty.every_round: {len(set(faulty))} faulty clients exceed "
                  f"clients_per_round={c.clients_per_round}")
  errors.extend(algorithm_errors(c))  # client.loss, aggregation.rule, server.*
  if errors:
    _raise_invalid(errors)


def _raise_invalid(errors: list[str]) -> None:
  if len(errors) == 1:
    raise ValueError(f"invalid config: {errors[0]}")
  raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))
