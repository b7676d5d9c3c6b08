from tracefl_jax.cli import main

main()
