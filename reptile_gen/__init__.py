"""reptile_gen: gradient-based meta-learning (MAML, first-order MAML, Reptile) as a
generative sequence model, on Hydra and PyTorch Lightning."""

__version__ = "0.1.0"

from pathlib import Path as _Path

#: the Hydra config tree (``conf/`` at the repository top level; the package is installed
#: in editable mode, so it is found from any working directory and by console scripts)
CONF_DIR = str(_Path(__file__).resolve().parents[1] / "conf")
