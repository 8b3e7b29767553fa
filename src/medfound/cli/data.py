"""`medfound data ...`: inspect, ingest, samples, phantoms, check, convert-msd, convert-rtstruct."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medfound.cli.common import data_app
from medfound.errors import InputError


@data_app.command("inspect")
def data_inspect(
    path: Annotated[Path, typer.Argument(help="Image file (NIfTI, MGZ, NRRD, MHA, DICOM, PNG, JPEG, TIFF), DICOM folder, or DICOMweb study/series (dicomweb+http://HOST:PORT/dicom-web/studies/UID or .../series/UID).")],
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID, when a DICOM folder holds several.")] = None,
    modality: Annotated[Optional[str], typer.Option(help="Modality to assume (ct, mr, pet, xray, us) if the file has none.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print what medfound reads from an image: shape, spacing, orientation, modality, range."""
    from medfound.io import read_image
    from medfound.io.dicomweb import is_dicomweb

    if is_dicomweb(path):
        from medfound.io.dicomweb import parse, series_in

        ref = parse(path)
        found_remote = [s for s in series_in(ref) if series is None or s.series == series]
        if series is not None and not found_remote:
            raise InputError(ref.url, f"no series {series} in this study")
        if len(found_remote) > 1:
            _list_series(ref.url, [{"series_uid": s.series, "modality": s.modality, "files": s.instances,
                                    "description": s.description, "url": s.url(ref)} for s in found_remote],
                         "add /series/UID, or --series UID", as_json)
            return
        path, series = found_remote[0].url(ref), None
    elif path.is_dir() and series is None:
        from medfound.io.dicom import find_series

        found, _ = find_series([f for f in sorted(path.rglob("*")) if f.is_file()])
        if len(found) > 1:
            _list_series(str(path), [{"series_uid": s.uid, "modality": s.modality, "files": len(s.files),
                                      "description": s.description} for s in found],
                         "choose one with --series UID", as_json)
            return
    image = read_image(path, modality=modality, series_uid=series)
    info = image.summary()
    if as_json:
        print(json.dumps(info, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(path), show_header=False)
    for k, v in info.items():
        table.add_row(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
    Console().print(table)


def _list_series(where: str, rows: list[dict], hint: str, as_json: bool) -> None:
    """What `data inspect` prints for a folder or study that holds several series."""
    if as_json:
        print(json.dumps({"path": where, "series": rows}, indent=1))
        return
    print(f"{where}: {len(rows)} DICOM series ({hint})")
    for r in rows:
        print(f"  {r['series_uid']}  {r['modality']:3s} {r['files'] or 0:5d} files  {r['description']}")


@data_app.command("ingest")
def data_ingest(
    sources: Annotated[list[str], typer.Argument(help="Pool folders, files or DICOMweb studies/queries (dicomweb+http://...); prefix with a modality to declare it: ct:/data/ct.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Output folder: manifest.json + shards/.")],
    modality: Annotated[Optional[list[str]], typer.Option(help="Modality per source, in order (or one for all).")] = None,
    size: Annotated[int, typer.Option("--image-size", help="Square slice size in pixels.")] = 224,
    axis: Annotated[int, typer.Option(help="Slice axis of 3D volumes after reorientation to RAS (2 = axial).")] = 2,
    stride: Annotated[int, typer.Option(help="Keep every N-th slice.")] = 1,
    ct_window: Annotated[str, typer.Option(help="CT window preset: wide, soft_tissue, lung, bone, brain, ...")] = "wide",
    shard_size: Annotated[int, typer.Option(help="Slices per shard.")] = 5000,
    workers: Annotated[int, typer.Option(help="Reader processes.")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Scan unlabeled pools of mixed formats into a manifest and normalised 2D slice shards."""
    from medfound.data.ingest import IngestOptions, ingest
    from medfound.data.normalize import CT_WINDOWS
    from medfound.data.sources import Source
    from medfound.io.image import canonical_modality, is_known_modality

    parsed = [Source.parse(s) for s in sources]
    if modality:
        if len(modality) not in (1, len(parsed)):
            raise InputError(None, f"--modality given {len(modality)} times for {len(parsed)} sources; give one, or one per source")
        for m in modality:
            if not is_known_modality(m):
                raise InputError(None, f"unknown modality {m!r} (use ct, mr, pet, nm, xray, us)")
        mods = modality * len(parsed) if len(modality) == 1 else modality
        parsed = [Source(s.path, canonical_modality(m)) for s, m in zip(parsed, mods)]
    if ct_window not in CT_WINDOWS:
        raise InputError(None, f"unknown --ct-window {ct_window!r}; choose from {', '.join(CT_WINDOWS)}")
    if size < 16 or stride < 1 or axis not in (0, 1, 2) or shard_size < 1:
        raise InputError(None, "--size must be >= 16, --stride >= 1, --axis 0/1/2, --shard-size >= 1")
    manifest = ingest(parsed, out, IngestOptions(size=size, axis=axis, stride=stride, ct_window=ct_window,
                                                 shard_size=shard_size), workers=workers, overwrite=overwrite)
    print(f"{out}: {manifest['num_images']} images, {manifest['num_slices']} slices "
          f"({', '.join(f'{k} {v}' for k, v in manifest['slices_per_modality'].items())}) in "
          f"{len(manifest['shards'])} shard(s); {len(manifest['errors'])} file(s) skipped")


@data_app.command("samples")
def data_samples(
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder for the sample datasets and pool.")],
    only: Annotated[Optional[str], typer.Option(help="Comma-separated parts: tissue,lesions,atlases,colin27,phantoms,pool.")] = None,
) -> None:
    """Materialise real sample images from installed packages as nnU-Net datasets and a DICOM pool."""
    from medfound.data.samples import PARTS, materialise_samples

    parts = tuple(p.strip() for p in only.split(",")) if only else PARTS
    made = materialise_samples(out, parts)
    for part, folders in made.items():
        print(f"{part}: {', '.join(folders) or '(skipped)'}")


@data_app.command("phantoms")
def data_phantoms(
    out: Annotated[Path, typer.Option("--output", "-o", help="nnU-Net dataset folder to write.")],
    modalities: Annotated[str, typer.Option(help="Comma-separated: CT,MR,PT,XR,US.")] = "CT,MR,PT,XR,US",
    cases: Annotated[int, typer.Option(help="Cases per modality.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write synthetic multi-structure phantoms as an nnU-Net dataset."""
    from medfound.data.phantoms import PHANTOM_MODALITIES, write_phantom_dataset
    from medfound.io.image import canonical_modality

    mods = tuple(canonical_modality(m) for m in modalities.split(","))
    bad = [m for m, c in zip(modalities.split(","), mods) if c not in PHANTOM_MODALITIES]
    if bad or cases < 1:
        raise InputError(None, f"phantom modalities are {', '.join(PHANTOM_MODALITIES)} and --cases >= 1 (got {', '.join(bad) or cases})")
    ds = write_phantom_dataset(out, mods, cases, seed)
    print(f"{out}: {len(ds.cases())} phantom cases")


@data_app.command("check")
def data_check(dataset: Annotated[Path, typer.Argument(help="nnU-Net v2 raw dataset folder.")]) -> None:
    """Validate an nnU-Net dataset: every image readable, every label on its image's grid."""
    from medfound.data.nnunet import NnUNetDataset

    ds = NnUNetDataset.open(dataset)
    cases = ds.cases()
    if not cases:
        raise InputError(dataset / "imagesTr", f"no images named CASE_0000{ds.file_ending}")
    declared = ds.info.get("numTraining")
    if declared != len(cases):
        raise InputError(dataset / "dataset.json", f"numTraining is {declared!r} but imagesTr holds {len(cases)} case(s)")
    for split in ("Tr", "Ts"):
        folder = dataset / f"labels{split}"
        known = set(ds.cases(split))
        found = sorted(folder.glob(f"*{ds.file_ending}")) if folder.is_dir() else []
        orphans = [f.name for f in found if f.name[: -len(ds.file_ending)] not in known]
        if orphans:
            raise InputError(folder / orphans[0], f"label map without an image in images{split}/ "
                                                  f"({len(orphans)} such file(s))")
    for case in cases:
        ds.read_case(case)
    for case in ds.cases("Ts"):
        ds.read_case(case, "Ts")
    print(f"{dataset}: {len(cases)} training case(s), {len(ds.cases('Ts'))} test case(s), "
          f"{len(ds.labels) - 1} label(s), held out: {', '.join(ds.heldout) or 'none'}: OK")


@data_app.command("convert-msd")
def data_convert_msd(
    task: Annotated[Path, typer.Argument(help="Medical Segmentation Decathlon task folder (TaskXX_Name).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="nnU-Net v2 raw dataset folder to write.")],
) -> None:
    """Convert a Decathlon task folder to an nnU-Net v2 raw dataset."""
    from medfound.data.nnunet import convert_msd

    ds = convert_msd(task, out)
    print(f"{out}: {len(ds.cases())} training case(s)")


@data_app.command("convert-rtstruct")
def data_convert_rtstruct(
    series: Annotated[Path, typer.Argument(help="The image series the structure set was drawn on (DICOM folder, or a DICOMweb series).")],
    rtstruct: Annotated[Path, typer.Argument(help="RT Structure Set file (RTSTRUCT .dcm).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="nnU-Net v2 dataset folder to write (one case, a label per ROI).")],
    roi: Annotated[Optional[list[str]], typer.Option("--roi", help="Only this ROI (by name); repeat, in label order (default: every contoured ROI).")] = None,
) -> None:
    """RT contours -> an nnU-Net dataset on the series' grid: a label per ROI, usable as an example set
    or training labels. Where ROIs overlap, the later ROI keeps the voxel (said on stderr)."""
    import sys

    from medfound.data.rtstruct_convert import convert_rtstruct

    ds, covered = convert_rtstruct(series, rtstruct, out, roi)
    if covered:
        print(f"medfound: {', '.join(covered)} overlap(s) an earlier ROI; the later ROI keeps those voxels", file=sys.stderr)
    labels = {k: v for k, v in ds.labels.items() if v}
    print(f"{out}: 1 case, {len(labels)} label(s): {', '.join(f'{v} {k}' for k, v in labels.items())}")


@data_app.command("make-support")
def data_make_support(
    pairs: Annotated[list[Path], typer.Argument(help="IMAGE MASK [IMAGE MASK ...]: each image followed by its label map (same grid).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Example-set folder to write (nnU-Net: imagesTr/, labelsTr/, dataset.json).")],
    labels: Annotated[Optional[Path], typer.Option(help='JSON of label names: {"1": "tumour"} (or {"tumour": 1}).')] = None,
    modality: Annotated[Optional[str], typer.Option(help="Modality of images that do not record one (ct, mr, pet, xray, us).")] = None,
) -> None:
    """Write an example set for `medfound segment` from image/mask pairs.

    Sparse labels are welcome: in a 3D mask only the slices that hold a label are examples, so labelling
    8 slices of one study gives 8 examples. Every pair is checked (same grid, integer labels) first."""
    from medfound.data.support_set import make_support, read_label_names
    from medfound.io.image import is_known_modality
    from medfound.io.outputs import check_output_dir

    if len(pairs) % 2:
        raise InputError(pairs[-1], "give images and masks in pairs: IMAGE MASK [IMAGE MASK ...]")
    if modality and not is_known_modality(modality):
        raise InputError(None, f"unknown modality {modality!r} (use ct, mr, pet, nm, xray, us)")
    check_output_dir(out, pairs)
    if out.exists():
        raise InputError(out, "exists; choose a new folder for the example set")
    names = read_label_names(labels) if labels else None
    ds = make_support([(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)], out, names, modality)
    print(f"{out}: {len(ds.cases())} case(s), labels {', '.join(f'{v}={n}' for n, v in ds.labels.items() if v)}")
