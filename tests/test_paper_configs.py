"""Every paper experiment config builds, validates, and its CPU preset runs end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tracefl_jax.experiment import runner as experiment, sweep
from tracefl_jax.experiment.config import validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _module(name):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name,presets", [
    ("image_main", ["resnet18-mnist", "densenet121-cifar10", "resnet18-pathmnist",
                    "densenet121-organamnist"]),
    ("text_main", ["gpt-dbpedia", "bert-yahoo"]),
    ("faulty", ["resnet18-mnist", "densenet121-pathmnist", "gpt-yahoo", "bert-dbpedia"]),
    ("scale", ["", "cpu", "gpu", "smoke"]), ("sweep_alpha", [""]), ("dp", [""]),
])
def test_full_presets_validate(name, presets):
  for preset in presets:
    validate(_module(name).get_config(preset))


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="unknown preset 'vgg-mnist'"):
    _module("image_main").get_config("vgg-mnist")


# End to end: the digits preset and the stand-ins whose class counts or models differ from
# it (cpu-mnist and cpu-cifar10 are the same 10-class CNN configuration, cpu-yahoo is
# cpu-dbpedia's text model with 10 classes; all validated above).
FAULTY_CPU = ["cpu", *(f"cpu-{d}" for d in _module("faulty").DATASETS
                       if d not in ("mnist", "cifar10", "yahoo"))]


# configs/scale.py's study runs end to end in tests/test_scale.py (its smoke preset).
@pytest.mark.parametrize("name,preset", [("image_main", "cpu"), ("text_main", "cpu"),
                                         ("dp", "cpu"),
                                         ("sweep_alpha", "cpu"),
                                         *(("faulty", p) for p in FAULTY_CPU)])
def test_cpu_presets_run_end_to_end(name, preset, tmp_path):
  module = _module(name)
  config = module.get_config(preset)
  if hasattr(module, "get_sweep"):
    grid = {k: v[:1] for k, v in module.get_sweep("cpu").items()}  # one point suffices here
    config.rounds = 3  # and a few of its rounds
    rows = sweep.run_sweep(config, grid, tmp_path, progress=False)
    summary = rows[0]
  else:
    summary = experiment.run(config, tmp_path, progress=False)
  assert summary["rounds"] == config.rounds
  prov = summary["provenance"]
  assert prov["rounds_traced"] + prov["rounds_skipped"] == config.rounds
  if name == "faulty":  # the flip acts on the labels each dataset has, and a round traces
    assert prov["rounds_traced"] >= 1 and 0.0 <= prov["accuracy"] <= 1.0
    image = config.dataset.name != "synthetic_text"
    assert (prov["feddebug_accuracy"] is not None) == image  # FedDebug: image models only


@pytest.mark.parametrize("model,dataset,shape", [("densenet_tiny", "synthetic", "32,32,3"),
                                                 ("bert_tiny", "synthetic_text", "12")])
def test_more_models_train_and_trace_in_the_federated_loop(tmp_path, model, dataset, shape):
  config = _module("image_main").get_config("cpu")
  config.model.name, config.dataset.name = model, dataset
  config.dataset.synthetic_shape = shape
  config.dataset.synthetic_size = 600
  config.provenance.per_label = 1
  summary = experiment.run(config, tmp_path, progress=False)
  assert summary["rounds"] == 2 and 0.0 <= summary["final_accuracy"] <= 1.0
  assert summary["provenance"]["inputs"] > 0
