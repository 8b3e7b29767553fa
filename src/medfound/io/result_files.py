"""The files of one segmentation result: the mask in the input's geometry, and for DICOM series the
DICOM-SEG and RT Structure Set that PACS, viewers and radiotherapy systems read. One place for every
command that writes results (predict, segment, sam segment, batch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfound.io.image import MedImage

#: the result files that go into a PACS with --push
PACS_SUFFIXES = ("_seg.dcm", "_rtstruct.dcm")


@dataclass(frozen=True)
class ResultFormats:
    """Which DICOM objects accompany the mask of a DICOM input, and what they say made them."""

    dicom_seg: bool = False
    rtstruct: bool = False
    algorithm: str = "medfound"

    def check(self, image: MedImage, path=None) -> None:
        """Before any work: raise InputError unless the requested objects can reference ``image``."""
        if self.dicom_seg:
            from medfound.io.dicomseg import check_dicom_seg_source

            check_dicom_seg_source(image, path)
        if self.rtstruct:
            from medfound.io.rtstruct import check_rtstruct_source

            check_rtstruct_source(image, path)

    def write(self, mask: np.ndarray, image: MedImage, folder: Path, case: str, labels: dict[int, str],
              extension: str | None = None) -> list[Path]:
        """``folder/case.<ext>`` and, for a DICOM input, ``case_seg.dcm`` / ``case_rtstruct.dcm``."""
        from medfound.io.write import mask_extension, write_mask

        written = [write_mask(mask, image, Path(folder) / f"{case}{extension or mask_extension(image)}")]
        if image.format != "dicom":
            return written
        if self.dicom_seg:
            from medfound.io.dicomseg import write_dicom_seg

            written.append(write_dicom_seg(mask, image, Path(folder) / f"{case}_seg.dcm", labels=labels,
                                           algorithm=self.algorithm))
        if self.rtstruct:
            from medfound.io.rtstruct import write_rtstruct

            written.append(write_rtstruct(mask, image, Path(folder) / f"{case}_rtstruct.dcm", labels=labels,
                                          algorithm=self.algorithm))
        return written
