"""Guest images: the builder and the content-addressed store."""

from .builder import BuildConfig, ImageBuilder, ensure_image
from .store import Image, ImageStore

__all__ = ["BuildConfig", "Image", "ImageBuilder", "ImageStore", "ensure_image"]
