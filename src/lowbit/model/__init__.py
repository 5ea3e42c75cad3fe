"""Model knowledge: loading pretrained models (and, later, adapters and the block walker)."""

from lowbit.model.loading import (
    default_model_path,
    describe_source,
    load_pretrained,
)

__all__ = ["default_model_path", "describe_source", "load_pretrained"]
