"""Checkpoints: lowbit's native format (safetensors + manifest in the header)."""

from lowbit.io.checkpoint import load_checkpoint, read_manifest, save_checkpoint

__all__ = ["load_checkpoint", "read_manifest", "save_checkpoint"]
