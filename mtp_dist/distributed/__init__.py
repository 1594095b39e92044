"""Distributed training: topology, Megatron-core tensor parallelism, head parallelism, the
DeepSpeed pipeline and ZeRO engine. Model code imports nothing from here."""

from .runtime import DistributedRuntime, LaunchEnv, make_runtime
from .topology import Topology, TopologyError

__all__ = ["DistributedRuntime", "LaunchEnv", "Topology", "TopologyError", "make_runtime"]
