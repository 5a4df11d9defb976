"""reptile_gen: gradient-based meta-learning (MAML, first-order MAML, Reptile) as a
generative sequence model, on Hydra and PyTorch Lightning."""

__version__ = "0.1.0"

from pathlib import Path as _Path

#: the Hydra config tree (``conf/`` at the repository top level; the package is installed
#: in editable mode, so it is found from any working directory and by console scripts)
CONF_DIR = str(_Path(__file__).resolve().parents[1] / "conf")

# the OmegaConf resolvers of the Slurm launcher configs (conf/hydra/launcher/), registered
# before any Hydra app resolves them
from reptile_gen.utils.slurm import register_resolvers as _register_resolvers  # noqa: E402

_register_resolvers()

# conf/hydra/launcher/submitit_{slurm,local}.yaml share their names with the plugin's
# structured configs, so Hydra checks them against those (typos in keys are caught) and
# warns that it may stop doing so one day; the files set every key themselves either way
import warnings as _warnings  # noqa: E402

_warnings.filterwarnings(
    "ignore",
    message=r"\s*'hydra/launcher/submitit_(slurm|local)' is validated against ConfigStore schema",
    category=UserWarning,
)
