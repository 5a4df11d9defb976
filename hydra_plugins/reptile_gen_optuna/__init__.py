"""reptile_gen's Optuna sweeper (a Hydra plugin: Hydra finds sweepers in the
``hydra_plugins`` namespace package). See :mod:`.sweeper`."""
