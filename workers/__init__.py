"""batch-infer's actor side: model loading and the `Replica` actor (read -> forward -> write)."""

from workers.model import MLP, ModelSpec, inspect_model, read_model
from workers.replica import Replica, ReplicaJob

__all__ = ["MLP", "ModelSpec", "Replica", "ReplicaJob", "inspect_model", "read_model"]
