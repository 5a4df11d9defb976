"""Meta-algorithms as LightningModules on one base (:class:`MetaLearner`)."""

from reptile_gen.algorithms.base import MetaLearner
from reptile_gen.algorithms.joint import JointTraining
from reptile_gen.algorithms.lstm import LSTMBaseline, LSTMNetwork
from reptile_gen.algorithms.maml import FOMAML, MAML
from reptile_gen.algorithms.reptile import Reptile, linear_decay

__all__ = [
    "MetaLearner",
    "MAML",
    "FOMAML",
    "Reptile",
    "JointTraining",
    "LSTMBaseline",
    "LSTMNetwork",
    "linear_decay",
]
