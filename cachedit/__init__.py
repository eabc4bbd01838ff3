"""cachedit: a torch.compile backend that step-caches diffusion transformers."""

from cachedit.config import CacheditConfig

__all__ = ["CacheditConfig"]
