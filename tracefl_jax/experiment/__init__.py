"""The experiment layer: the only code that reads a config. It translates an ml_collections
config into library calls and owns files, logging, checkpoints, sweeps, tables and plots."""
