"""Where a point of one volume lies in another: a fast affine registration between two scans.

In-context segmentation leans on *position*: a query slice should listen to the support slices taken
at the same anatomical height. A position relative to each volume's own extent of content is not
comparable across scans: one whole-head T1 and one skull-stripped brain disagree by a tenth of the
volume (measured on Colin27 vs MNI152), more than most deep structures are tall. An affine
registration of the support volume onto the query volume maps each support slice to the query height
it shows, whatever the field of view or skull stripping. Both volumes are smoothed and resampled to
``resolution_mm`` first, so one registration takes well under a second at 4 mm (SimpleITK, Mattes
mutual information, so a contrast change between the two scans is no obstacle).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from medfound.io.image import LPS_TO_RAS, MedImage
from medfound.io.itk import medimage_to_sitk

# Fixed seed for the metric's random sampling: SimpleITK reads seed 0 as "the wall clock"
# (sitk.sitkWallClock), which made the same registration come out differently run to run.
SAMPLING_SEED = 1
MIN_SAMPLES = 20000


def _coarse(image: sitk.Image, mm: float) -> sitk.Image:
    """Gaussian-smoothed copy on an isotropic ``mm`` grid (the registration's working image)."""
    smooth = sitk.SmoothingRecursiveGaussian(image, mm / 2)
    size = [max(4, int(round(n * s / mm))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), (mm,) * 3,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


def register_affine(fixed: MedImage, moving: MedImage, resolution_mm: float = 4.0,
                    max_scale_change: float = 1.5) -> np.ndarray | None:
    """4x4 matrix taking world RAS mm of ``moving`` to world RAS mm of ``fixed``, or ``None`` when the
    two cannot be registered (2D images, a failed optimisation, or an implausible result: a volume
    change beyond ``max_scale_change`` either way)."""
    if fixed.ndim != 3 or moving.ndim != 3 or min(fixed.shape) < 4 or min(moving.shape) < 4:
        return None
    f = _coarse(medimage_to_sitk(fixed.with_array(fixed.array.astype(np.float32))), resolution_mm)
    m = _coarse(medimage_to_sitk(moving.with_array(moving.array.astype(np.float32))), resolution_mm)
    # a quarter of the voxels of a head at 4 mm (~28,000); small volumes use more, up to all of them
    tx = _affine_registration(f, m, min(1.0, max(0.25, MIN_SAMPLES / np.prod(f.GetSize()))), (1.0, 1e-4, 200), [2, 1], [1, 0])
    if tx is None:
        return None
    # ITK's transform maps fixed (LPS) points to moving points: y = A (x - c) + c + t
    a = np.array(tx.GetMatrix()).reshape(3, 3)
    c, t = np.array(tx.GetCenter()), np.array(tx.GetTranslation())
    fixed_to_moving = np.eye(4)
    fixed_to_moving[:3, :3] = a
    fixed_to_moving[:3, 3] = c + t - a @ c
    det = np.linalg.det(a)
    if not np.isfinite(det) or not 1 / max_scale_change <= det <= max_scale_change:
        return None
    # moving RAS -> moving LPS -> fixed LPS -> fixed RAS
    return LPS_TO_RAS @ np.linalg.inv(fixed_to_moving) @ LPS_TO_RAS


def _affine_registration(f: sitk.Image, m: sitk.Image, sampling: float, steps: tuple[float, float, int],
                         shrink: list[int], smoothing: list[float]) -> sitk.AffineTransform | None:
    """The affine (2D or 3D, as the images) taking ``f`` points to ``m`` points: Mattes mutual
    information on a seeded random ``sampling`` share of the voxels, regular-step gradient descent
    (``steps``: largest step, smallest step, iterations) from the centres of mass, over the
    resolutions ``shrink`` / ``smoothing``; ``None`` when the optimisation fails."""
    try:
        init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(f.GetDimension()),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling, seed=SAMPLING_SEED)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(*steps)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(shrink)
        reg.SetSmoothingSigmasPerLevel(smoothing)
        reg.SetInitialTransform(init, inPlace=False)
        return _as_affine(reg.Execute(f, m))
    except RuntimeError:
        return None


def _as_affine(tx: sitk.Transform) -> sitk.AffineTransform | None:
    """The registration's result as one AffineTransform (it may come wrapped in a composite)."""
    if tx.GetName() == "CompositeTransform":
        tx = sitk.CompositeTransform(tx)
        if tx.GetNumberOfTransforms() != 1:
            return None
        tx = tx.GetNthTransform(0)
    return sitk.AffineTransform(tx) if tx.GetName() == "AffineTransform" else None


def map_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(n, 3) world points through a 4x4 matrix."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def register_slice(fixed: np.ndarray, moving: np.ndarray, fixed_spacing: tuple[float, float] = (1.0, 1.0),
                   moving_spacing: tuple[float, float] = (1.0, 1.0), max_scale_change: float = 2.0) -> sitk.Transform | None:
    """A 2D affine registration of one slice onto another (Mattes mutual information, three
    resolutions from the images' centres of mass): the transform taking ``fixed`` points (mm, array
    index x spacing) to ``moving`` points, or ``None`` when it fails or changes the area by more than
    ``max_scale_change`` either way. What lets example slices of another subject, field of view and
    scale be compared with a query slice pixel for pixel, when no volume gives their geometry."""
    f = sitk.GetImageFromArray(np.ascontiguousarray(fixed.T, np.float32))   # sitk's x is the array's last axis
    m = sitk.GetImageFromArray(np.ascontiguousarray(moving.T, np.float32))
    f.SetSpacing(tuple(float(s) for s in fixed_spacing))
    m.SetSpacing(tuple(float(s) for s in moving_spacing))
    tx = _affine_registration(f, m, 0.25, (2.0, 1e-3, 150), [4, 2, 1], [2, 1, 0])
    if tx is None:
        return None
    det = np.linalg.det(np.array(tx.GetMatrix()).reshape(2, 2))
    return tx if np.isfinite(det) and 1 / max_scale_change <= det <= max_scale_change else None


def deform_slice(fixed: np.ndarray, moving: np.ndarray, tx: sitk.Transform,
                 fixed_spacing: tuple[float, float] = (1.0, 1.0), moving_spacing: tuple[float, float] = (1.0, 1.0),
                 smoothing_px: float = 3.0, iterations: int = 60) -> sitk.Transform:
    """:func:`register_slice`'s affine ``tx`` refined by a smooth deformation: the moving slice is
    resampled through ``tx``, its intensities matched to the fixed slice's histogram (an exported PNG
    and a NIfTI of another scan do not share a scale), and symmetric-forces demons on three
    resolutions find a displacement field (Gaussian-regularised, ``smoothing_px`` pixels). An affine
    brings the same anatomy to the same region; between two subjects the structures inside still differ
    by several pixels in place and shape, which the deformation takes up. Returns the composite
    taking ``fixed`` points to ``moving`` points (the affine alone when the refinement fails)."""
    f = sitk.GetImageFromArray(np.ascontiguousarray(fixed.T, np.float32))
    f.SetSpacing(tuple(float(s) for s in fixed_spacing))
    m = sitk.GetImageFromArray(np.ascontiguousarray(warp_slice(moving, tx, fixed.shape, fixed_spacing, moving_spacing).T,
                                                    np.float32))
    m.CopyInformation(f)
    try:
        m = sitk.HistogramMatching(m, f, numberOfHistogramLevels=64, numberOfMatchPoints=12, thresholdAtMeanIntensity=True)
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(iterations)
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(smoothing_px * float(fixed_spacing[0]))
        field = None
        for shrink in (4, 2, 1):  # coarse to fine, each level starting from the last level's field
            fs, ms = (sitk.Shrink(f, [shrink] * 2), sitk.Shrink(m, [shrink] * 2)) if shrink > 1 else (f, m)
            if field is not None:
                field = sitk.Resample(field, fs, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
            field = demons.Execute(fs, ms) if field is None else demons.Execute(fs, ms, field)
        field = sitk.Cast(field, sitk.sitkVectorFloat64)
    except RuntimeError:
        return tx
    out = sitk.CompositeTransform(2)
    out.AddTransform(tx)                                # applied second: fixed grid -> moving slice
    out.AddTransform(sitk.DisplacementFieldTransform(field))  # applied first: the deformation on the fixed grid
    return out


def warp_slice(moving: np.ndarray, tx: sitk.Transform, fixed_shape: tuple[int, int],
               fixed_spacing: tuple[float, float] = (1.0, 1.0), moving_spacing: tuple[float, float] = (1.0, 1.0),
               nearest: bool = False) -> np.ndarray:
    """``moving`` resampled onto the fixed slice's pixels through :func:`register_slice`'s transform
    (zero outside it)."""
    m = sitk.GetImageFromArray(np.ascontiguousarray(moving.T, np.float32))
    m.SetSpacing(tuple(float(s) for s in moving_spacing))
    ref = sitk.Image(int(fixed_shape[0]), int(fixed_shape[1]), sitk.sitkFloat32)
    ref.SetSpacing(tuple(float(s) for s in fixed_spacing))
    out = sitk.Resample(m, ref, tx, sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out).T
