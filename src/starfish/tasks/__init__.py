"""Evaluation tasks: how models are scored on streamed evaluation batches (``--task``)."""

from starfish.tasks.base import TASKS, Evaluation, Task, get_task, list_tasks
from starfish.tasks.classification import Classification
from starfish.tasks.perplexity import Perplexity

__all__ = ["TASKS", "Classification", "Perplexity", "Evaluation", "Task", "get_task", "list_tasks"]
