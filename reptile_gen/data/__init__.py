"""Task distributions as Lightning DataModules that yield :class:`TaskBatch` meta-batches."""

from reptile_gen.data.task_batch import TaskBatch
from reptile_gen.data.task_spec import TaskSpec

__all__ = ["TaskBatch", "TaskSpec"]
