"""Image I/O that keeps geometry: every format read into :class:`MedImage`, masks written back."""

from medfound.io.image import MODALITIES, MedImage, canonical_modality
from medfound.io.read import read_image
from medfound.io.write import mask_extension, write_image, write_mask

__all__ = ["MODALITIES", "MedImage", "canonical_modality", "read_image", "write_image", "write_mask",
           "mask_extension"]
