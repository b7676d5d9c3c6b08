"""`python -m tracefl_jax`: the experiment runner's command line (needs the `experiment` extra)."""

try:
  from tracefl_jax.experiment.cli import main
except ModuleNotFoundError as e:  # the library alone is installed
  raise SystemExit(f"error: the experiment runner needs the 'experiment' extra ({e}); install it "
                   f"with: pip install 'tracefl_jax[experiment]'") from e

main()
