"""Test-only shim: let accelerate run FSDP2 on CPU processes (gloo), which it refuses by design.

accelerate 1.15 enables FSDP only for GPU-like distributed types: on CPU, `accelerate launch` with an FSDP config
starts processes whose state is MULTI_CPU (or NO), and training silently runs as DDP. Importing this module (the
distributed worker does when RLHF_EXT_FSDP_ON_CPU=1) re-labels such a state as FSDP with the plugin accelerate built
from the launcher's environment, so the trainers' accelerate FSDP2 path (prepare_model -> fully_shard, FULL_STATE_DICT
saves) runs on 2 CPU processes. Nothing in rlhf_ext imports it.
"""

from __future__ import annotations

import os

from accelerate import state as accelerate_state
from accelerate.utils import DistributedType

_original_init = accelerate_state.AcceleratorState.__init__


_plugins = []  # the plugin accelerate built, kept for a state re-created later without it


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    if kwargs.get("fsdp_plugin") is not None:
        _plugins[:] = [kwargs["fsdp_plugin"]]
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and _plugins and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugins[0]


accelerate_state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

