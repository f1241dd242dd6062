"""Checkpoints in and out of other formats.

- ``safetensors``: export to Hugging Face safetensors; ``safetensors_import``: import from them,
  into a sharded state (``load_safetensors``) or as plain tensors (``read_safetensors``);
  ``safetensors_format``: the file format both share, and the validation of files we did not
  write. No pickle; imported by ``shardckpt`` on first use.
- ``dcp`` and ``torch_save``: migration from formats that pickle, torch.distributed.checkpoint (DCP)
  directories and ``torch.save`` files. These are the only modules of shardckpt that unpickle
  anything, and only when called: nothing in ``save`` / ``load`` imports them. Only migrate
  checkpoints you trust.
"""
