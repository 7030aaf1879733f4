"""Guest images: the builders (default, build file, OCI import) and the content-addressed store."""

from .builder import BuildConfig, ImageBuilder, ensure_image
from .config import ImageConfig, load_config
from .custom import build_image
from .oci import import_oci
from .store import Image, ImageStore

__all__ = ["BuildConfig", "Image", "ImageBuilder", "ImageConfig", "ImageStore", "build_image", "ensure_image",
           "import_oci", "load_config"]
