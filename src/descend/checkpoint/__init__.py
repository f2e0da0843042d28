"""descend.checkpoint: checkpoints without pickle, every byte checksummed, written atomically.

- ``_tensorfile``: what every checkpoint shares: the JSON + tensors codec and the checksummed manifest;
- ``_local``: the one-process format (safetensors + JSON step directories under a root with
  ``latest.json``): :func:`save_checkpoint`, :func:`load_checkpoint`;
- ``_distributed``: the resharding format written by every rank with torch.distributed.checkpoint,
  offered as :func:`descend.distributed.save_checkpoint` and :func:`descend.distributed.load_checkpoint`.
"""

from descend.checkpoint._local import Checkpoint, load_checkpoint, save_checkpoint
from descend.checkpoint._tensorfile import CheckpointError, CheckpointWarning

__all__ = ["Checkpoint", "CheckpointError", "CheckpointWarning", "load_checkpoint", "save_checkpoint"]
