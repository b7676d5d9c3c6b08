"""`python -m tracefl_jax` and the installed `tracefl-jax` command: the experiment layer's
command line (`experiment.cli`, which needs the `experiment` extra)."""


def main(argv: list[str] | None = None) -> None:
  """The console script's entry point (pyproject.toml); `argv` defaults to `sys.argv[1:]`."""
  try:
    from tracefl_jax.experiment.cli import main as cli_main  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if (e.name or "").partition(".")[0] == "tracefl_jax":
      raise  # a module of this package missing is a bug, not a missing extra
    raise SystemExit(f"error: the experiment runner needs the 'experiment' extra ({e}); "
                     f"install it with: pip install 'tracefl_jax[experiment]'") from e
  cli_main(argv)


if __name__ == "__main__":
  main()
