from tracefl_jax.experiment.cli import main

main()
