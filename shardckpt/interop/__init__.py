"""Checkpoints in and out of other formats.

- ``safetensors``: export to Hugging Face safetensors (no pickle; imported by ``shardckpt``).
- ``dcp`` and ``torch_save``: migration from formats that pickle, torch.distributed.checkpoint (DCP)
  directories and ``torch.save`` files. These are the only modules of shardckpt that unpickle
  anything, and only when called: nothing in ``save`` / ``load`` imports them. Only migrate
  checkpoints you trust.
"""
