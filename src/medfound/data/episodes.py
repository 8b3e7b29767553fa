"""Episodes for many-task in-context training: (query, support set) pairs drawn across datasets,
labels, slice axes and modalities, with task-level augmentation and synthetic shape tasks.

Every non-held-out label of every dataset is a task. A task is linked across datasets and cases when
the label name and the modality agree (AAL's ``Precentral_L`` on Colin27 and on MNI152; grey matter on
four brains), so support and query often come from different subjects. Held-out labels (DESIGN.md)
never become tasks, and neither do the labels named by ``exclude_labels``.

All slices live in one :class:`SliceBank` (a few hundred MB at 128 px for the sample data) that can sit
on the GPU; :func:`sample_episodes` draws index lists with numpy and gathers on the bank's device, and
:func:`augment_episodes` / :func:`synthetic_episodes` run batched on that device.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medfound.data.heldout import is_heldout
from medfound.errors import InputError


def relative_positions(mask_of_content: np.ndarray, axis: int) -> np.ndarray:
    """Position of every slice along ``axis`` relative to the extent of the image content (0..1);
    what lets a query prefer supports from the same height of another subject's volume."""
    other = tuple(d for d in range(mask_of_content.ndim) if d != axis)
    present = np.flatnonzero(mask_of_content.any(axis=other))
    n = mask_of_content.shape[axis]
    lo, hi = (present[0], present[-1]) if len(present) else (0, n - 1)
    return ((np.arange(n) - lo) / max(1, hi - lo)).astype(np.float32)


def content_mask(norm: np.ndarray) -> np.ndarray:
    """Voxels that belong to the imaged object (normalised intensity above a small floor)."""
    return norm > 0.05


@dataclass
class Block:
    """The slices of one (dataset, case, axis) inside the bank: rows ``start .. start + n``."""

    dataset: str
    case: str
    modality: str
    axis: int
    start: int
    n: int
    names: dict[str, int]  # label name -> value in this dataset
    positives: dict[int, np.ndarray] = field(default_factory=dict)  # value -> local slice indices


@dataclass
class SliceBank:
    images: torch.Tensor     # (T, S, S) float16 in [0, 1]
    labels: torch.Tensor     # (T, S, S) int16 dataset label values
    positions: torch.Tensor  # (T,) relative slice position, NaN for 2D images
    blocks: list[Block]
    tasks: dict[tuple[str, str], list[tuple[int, int]]]  # (name, modality) -> [(block, value)]
    _subjects: list[str] | None = field(default=None, repr=False)

    def to(self, device) -> SliceBank:
        return SliceBank(self.images.to(device), self.labels.to(device), self.positions.to(device), self.blocks,
                         self.tasks, self._subjects)

    def subjects(self) -> list[str]:
        """One id per block naming the scan it was cut from, by the pixels of its middle slice: blocks of
        two datasets that label the same scan (one template, several atlases) share an id, so
        "cross-subject" means another scan. Ids are comparable only between blocks of one slice axis."""
        if self._subjects is None:
            ids = []
            for b in self.blocks:
                mid = self.images[b.start + b.n // 2].cpu().numpy().tobytes()
                ids.append(f"{b.n}:{hashlib.sha1(mid).hexdigest()}")
            self._subjects = ids
        return self._subjects

    def summary(self) -> dict:
        return {"slices": int(self.images.shape[0]), "blocks": len(self.blocks), "tasks": len(self.tasks),
                "datasets": sorted({b.dataset for b in self.blocks}),
                "cross_subject_tasks": len(cross_subject_tasks(self))}


def build_bank(datasets: list[str], size: int = 128, axes: tuple[int, ...] = (0, 1, 2),
               exclude_labels: tuple[str, ...] = (), min_pixels: int = 6, progress: bool = True) -> SliceBank:
    """Read every case of every dataset into square normalised slices along ``axes``."""
    from rich.progress import track

    from medfound.data.nnunet import NnUNetDataset
    from medfound.data.normalize import normalize
    from medfound.data.orientation import to_canonical
    from medfound.data.slicing import iter_slices, to_square

    images, labels, positions, blocks = [], [], [], []
    exclude = {e.lower() for e in exclude_labels}
    start = 0
    jobs = []
    for root in datasets:
        ds = NnUNetDataset.open(root)
        for case in ds.cases():
            jobs.append((ds, case))
    if not jobs:
        raise InputError(None, "no labeled cases in the --datasets folders")
    for ds, case in (track(jobs, description="reading task datasets") if progress else jobs):
        image, label = ds.read_case(case)
        if label is None:
            continue
        names = {n: v for n, v in ds.labels.items()
                 if v != 0 and not is_heldout(n) and n.lower() not in exclude}
        if not names:
            continue
        norm = image.with_array(normalize(image.array, image.modality))
        lab = label.with_array(label.array.astype(np.int16))
        if norm.ndim == 3:
            norm, _ = to_canonical(norm)
            lab, _ = to_canonical(lab)
        # held-out / excluded label values are erased from the bank so no episode can ever see them
        keep = np.zeros(int(lab.array.max()) + 1, dtype=np.int16)
        for v in names.values():
            if v < len(keep):
                keep[v] = v
        lab = lab.with_array(keep[np.clip(lab.array, 0, len(keep) - 1)])
        content = content_mask(norm.array)
        for axis in (axes if norm.ndim == 3 else (2,)):
            pos = relative_positions(content, axis) if norm.ndim == 3 else np.array([np.nan], np.float32)
            imgs, labs, poss = [], [], []
            for (k, sl, spacing), (_, ls, _) in zip(iter_slices(norm, axis), iter_slices(lab, axis)):
                c = np.take(content, k, axis=axis) if norm.ndim == 3 else content
                if c.mean() < 0.01:
                    continue
                imgs.append(to_square(sl, spacing, size)[0])
                labs.append(to_square(ls.astype(np.float32), spacing, size, nearest=True)[0].astype(np.int16))
                poss.append(pos[k])
            if not imgs:
                continue
            labs_a = np.stack(labs)
            block = Block(ds.name, case, ds.case_modality(case), axis, start, len(imgs), names)
            for n, v in names.items():
                counts = (labs_a == v).sum((1, 2))
                idx = np.flatnonzero(counts >= min_pixels)
                if len(idx):
                    block.positives[v] = idx
            images.append(torch.from_numpy(np.stack(imgs)).half())
            labels.append(torch.from_numpy(labs_a))
            positions.append(torch.from_numpy(np.asarray(poss, np.float32)))
            blocks.append(block)
            start += len(imgs)
    return SliceBank(torch.cat(images), torch.cat(labels), torch.cat(positions), blocks, _tasks(blocks))


def _tasks(blocks: list[Block]) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(label name, modality) -> the (block, value) pairs that hold it: one task across subjects."""
    tasks: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for b, block in enumerate(blocks):
        for n, v in block.names.items():
            if v in block.positives:
                tasks.setdefault((n.lower(), block.modality), []).append((b, v))
    if not tasks:
        raise InputError(None, "no trainable in-context tasks: every label is held out, excluded or too small")
    return tasks


@dataclass
class Episodes:
    query: torch.Tensor            # (B, 1, S, S)
    query_mask: torch.Tensor       # (B, 1, S, S) float {0, 1}
    support: torch.Tensor          # (B, N, 1, S, S)
    support_mask: torch.Tensor     # (B, N, 1, S, S)
    query_pos: torch.Tensor        # (B,) NaN where unknown
    support_pos: torch.Tensor      # (B, N)


def _subject(bank: SliceBank, entry: tuple[int, int]) -> str:
    return bank.subjects()[entry[0]]


def _cross_axes(bank: SliceBank, entries: list[tuple[int, int]]) -> list[int]:
    """The slice axes along which a task is drawn in at least two subjects."""
    by_axis: dict[int, set[str]] = {}
    for e in entries:
        by_axis.setdefault(bank.blocks[e[0]].axis, set()).add(_subject(bank, e))
    return sorted(a for a, subjects in by_axis.items() if len(subjects) > 1)


def cross_subject_tasks(bank: SliceBank) -> list[tuple[str, str]]:
    """Tasks whose label is drawn in more than one subject along some slice axis."""
    return [key for key, entries in bank.tasks.items() if _cross_axes(bank, entries)]


def sample_episodes(bank: SliceBank, batch: int, n_support: int, rng: np.random.Generator,
                    p_negative: float = 0.3, p_merge: float = 0.1, p_drop_position: float = 0.2,
                    p_cross: float = 0.0) -> Episodes:
    """Draw ``batch`` episodes of ``n_support`` supports each from real tasks. With ``p_cross`` an
    episode is a cross-subject one (supports from one subject, the query from another), the way the
    model is used: a label drawn on one patient or atlas, another patient segmented."""
    keys = list(bank.tasks)
    cross = cross_subject_tasks(bank) if p_cross > 0 else []
    q_idx, s_idx, q_val, s_val, q_val2, s_val2, drop = [], [], [], [], [], [], []
    for _ in range(batch):
        want_cross = bool(cross) and rng.random() < p_cross
        pool = cross if want_cross else keys
        entries = bank.tasks[pool[rng.integers(len(pool))]]
        if want_cross:
            axes = _cross_axes(bank, entries)
            axis = axes[rng.integers(len(axes))]
        else:
            axis = bank.blocks[entries[rng.integers(len(entries))][0]].axis
        same_axis = [e for e in entries if bank.blocks[e[0]].axis == axis]
        sb, sv = same_axis[rng.integers(len(same_axis))]
        support_subject = _subject(bank, (sb, sv))
        others = [e for e in same_axis if _subject(bank, e) != support_subject] if want_cross else same_axis
        qb, qv = others[rng.integers(len(others))]
        sblock, qblock = bank.blocks[sb], bank.blocks[qb]
        qpos = qblock.positives[qv]
        if rng.random() < p_negative:  # the answer is "nothing": half just outside the structure, half anywhere
            lo, hi = qpos.min(), qpos.max()
            margin = max(2, int(0.15 * (hi - lo + 1))) if rng.random() < 0.5 else qblock.n
            cand = np.setdiff1d(np.arange(max(0, lo - margin), min(qblock.n, hi + margin + 1)), qpos)
            qi = int(cand[rng.integers(len(cand))]) if len(cand) else int(qpos[rng.integers(len(qpos))])
        else:
            qi = int(qpos[rng.integers(len(qpos))])
        spos = sblock.positives[sv]
        if sb == qb and len(spos) > 1:
            spos = spos[spos != qi]
        chosen = rng.choice(spos, size=n_support, replace=len(spos) < n_support)
        # task-level augmentation: merge a second label present in both volumes into the task
        qv2 = sv2 = 0
        if rng.random() < p_merge:
            shared = [n for n in sblock.names if n in qblock.names and sblock.names[n] != sv
                      and qblock.names[n] != qv and sblock.names[n] in sblock.positives]
            if shared:
                name = shared[rng.integers(len(shared))]
                sv2, qv2 = sblock.names[name], qblock.names[name]
        q_idx.append(qblock.start + qi)
        s_idx.append(sblock.start + chosen)
        q_val.append(qv), s_val.append(sv), q_val2.append(qv2), s_val2.append(sv2)
        drop.append(rng.random() < p_drop_position)
    dev = bank.images.device
    q_idx_t = torch.as_tensor(np.asarray(q_idx), device=dev)
    s_idx_t = torch.as_tensor(np.stack(s_idx), device=dev)  # (B, N)

    def binary(lab: torch.Tensor, v: list[int], v2: list[int]) -> torch.Tensor:
        shape = (-1,) + (1,) * (lab.ndim - 1)
        a = torch.as_tensor(v, device=dev).view(shape)
        b = torch.as_tensor(v2, device=dev).view(shape)
        return ((lab == a) | ((lab == b) & (b > 0))).float()

    qm = binary(bank.labels[q_idx_t].long(), q_val, q_val2)
    sm = binary(bank.labels[s_idx_t].long(), s_val, s_val2)
    drop_t = torch.as_tensor(drop, device=dev)
    qp = bank.positions[q_idx_t].masked_fill(drop_t, float("nan"))
    sp = bank.positions[s_idx_t].masked_fill(drop_t[:, None], float("nan"))
    return Episodes(bank.images[q_idx_t].float()[:, None], qm[:, None], bank.images[s_idx_t].float()[:, :, None],
                    sm[:, :, None], qp, sp)


def _smooth_noise(n: int, size: int, coarse: int, generator: torch.Generator, device) -> torch.Tensor:
    """(n, 1, size, size) smooth random fields (bicubic upsampled coarse noise)."""
    z = torch.randn(n, 1, coarse, coarse, generator=generator, device=device)
    return F.interpolate(z, size=(size, size), mode="bicubic", align_corners=False)


def synthetic_episodes(batch: int, n_support: int, size: int, generator: torch.Generator, device) -> Episodes:
    """Shape tasks from random label maps: K smooth random fields, arg-max -> regions; each image of an
    episode is the same map under its own smooth deformation, with region intensities, texture and noise
    drawn per episode (SynthSeg-style, no real labels involved)."""
    k = 6
    fields = torch.cat([_smooth_noise(batch, size, int(c), generator, device)
                        for c in torch.randint(3, 9, (k,), generator=generator, device=device).tolist()], 1)
    fields = fields + 0.8 * torch.linspace(-1, 1, size, device=device)[None, None, :, None] * torch.randn(batch, k, 1, 1, generator=generator, device=device)
    m = n_support + 1
    warped = warp(fields.repeat_interleave(m, 0), generator, strength=0.08, affine=0.1)
    regions = warped.argmax(1)  # (B*m, S, S)
    means = torch.rand(batch, k, generator=generator, device=device).repeat_interleave(m, 0)
    img = torch.gather(means, 1, regions.flatten(1)).view(-1, 1, size, size)
    img = img + 0.05 * _smooth_noise(batch * m, size, 16, generator, device) + 0.03 * torch.randn(img.shape, generator=generator, device=device)
    target = torch.randint(0, k, (batch,), generator=generator, device=device).repeat_interleave(m)
    mask = (regions == target[:, None, None]).float()[:, None]
    img, mask = img.view(batch, m, 1, size, size), mask.view(batch, m, 1, size, size)
    nan = torch.full((batch,), float("nan"), device=device)
    return Episodes(img[:, 0].clamp(0, 1), mask[:, 0], img[:, 1:].clamp(0, 1), mask[:, 1:], nan,
                    nan[:, None].expand(-1, n_support).clone())


def warp(x: torch.Tensor, generator: torch.Generator, strength: float = 0.05, affine: float = 0.1,
         mode: str = "bilinear") -> torch.Tensor:
    """Random affine (rotation, scale, shift ~ ``affine``) plus smooth elastic displacement per image."""
    n, _, h, w = x.shape
    dev = x.device
    r = lambda *s: torch.rand(*s, generator=generator, device=dev) * 2 - 1  # noqa: E731
    ang = r(n) * affine * 1.5
    sc = 1 + r(n) * affine * 1.2
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, r(n) * affine * 0.6], 1),
                         torch.stack([sin, cos, r(n) * affine * 0.6], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
    if strength > 0:
        disp = torch.randn(n, 2, 5, 5, generator=generator, device=dev) * strength
        grid = grid + F.interpolate(disp, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _random_curve(n: int, generator: torch.Generator, device, knots: int = 6) -> torch.Tensor:
    """(n, knots) random intensity transfer curves: sometimes monotone, sometimes not (contrast
    inversions, as between MR sequences)."""
    vals = torch.rand(n, knots, generator=generator, device=device)
    mono = torch.rand(n, 1, generator=generator, device=device) < 0.5
    return torch.where(mono, vals.sort(1).values, vals)


def _apply_curve(x: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
    # x (n, 1, S, S) in [0, 1]; piecewise-linear lookup per image
    k = curve.shape[1] - 1
    pos = x.clamp(0, 1) * k
    i0 = pos.floor().clamp(max=k - 1).long()
    frac = pos - i0
    c = curve[:, None, None, :].expand(-1, x.shape[2], x.shape[3], -1)[:, None]
    lo = torch.gather(c, -1, i0[..., None])[..., 0]
    hi = torch.gather(c, -1, (i0 + 1)[..., None])[..., 0]
    return lo + frac * (hi - lo)


def augment_episodes(ep: Episodes, generator: torch.Generator, p_shared_contrast: float = 0.7) -> Episodes:
    """Batched task-level augmentation: independent geometry per image, an episode-wide left/right
    mirror, a random contrast curve (shared by the episode with ``p_shared_contrast``), bias field,
    gamma and noise. Query and supports stay one task."""
    b, n = ep.support.shape[:2]
    dev, s = ep.query.device, ep.query.shape[-1]
    imgs = torch.cat([ep.query[:, None], ep.support], 1).flatten(0, 1)      # (B*(N+1), 1, S, S)
    masks = torch.cat([ep.query_mask[:, None], ep.support_mask], 1).flatten(0, 1)
    both = warp(torch.cat([imgs, masks], 1), generator, strength=0.03, affine=0.1)
    imgs, masks = both[:, :1], (both[:, 1:] > 0.5).float()
    m = n + 1
    flip = (torch.rand(b, generator=generator, device=dev) < 0.5).repeat_interleave(m)
    imgs = torch.where(flip[:, None, None, None], imgs.flip(-1), imgs)
    masks = torch.where(flip[:, None, None, None], masks.flip(-1), masks)
    curve = _random_curve(b * m, generator, dev)
    shared = (torch.rand(b, generator=generator, device=dev) < p_shared_contrast).repeat_interleave(m)
    curve = torch.where(shared[:, None], curve.view(b, m, -1)[:, :1].expand(-1, m, -1).reshape(b * m, -1), curve)
    use = (torch.rand(b * m, 1, 1, 1, generator=generator, device=dev) < 0.6)
    fg = imgs > 0.02
    imgs = torch.where(use & fg, _apply_curve(imgs, curve), imgs)
    gamma = torch.exp(0.25 * (torch.rand(b * m, 1, 1, 1, generator=generator, device=dev) * 2 - 1))
    bias = torch.exp(0.25 * _smooth_noise(b * m, s, 4, generator, dev))
    noise = 0.04 * torch.rand(b * m, 1, 1, 1, generator=generator, device=dev)
    imgs = (imgs.clamp(0, 1) ** gamma) * bias + noise * torch.randn(imgs.shape, generator=generator, device=dev)
    imgs = imgs.clamp(0, 1).view(b, m, 1, s, s)
    masks = masks.view(b, m, 1, s, s)
    return Episodes(imgs[:, 0], masks[:, 0], imgs[:, 1:], masks[:, 1:], ep.query_pos, ep.support_pos)


def zoom_episodes(ep: Episodes, size: int, generator: torch.Generator, p_zoom: float = 0.5,
                  zoom: tuple[float, float] = (2.0, 3.0), jitter: float = 0.1) -> Episodes:
    """Episodes drawn from a bank at twice the working ``size`` -> ``size``: with ``p_zoom`` per episode,
    query and supports all cut to one window of the frame around the task's masks at ``zoom`` times
    the density (the view of the refinement pass, :mod:`medfound.infer.refine`); otherwise the whole
    slice, averaged down 2x. One window per episode, so the frame correspondence holds within it."""
    b, n = ep.support.shape[:2]
    big = ep.query.shape[-1]
    if big != 2 * size:
        raise ValueError(f"zoom episodes need a bank at twice the working size ({2 * size}), got {big}")
    dev = ep.query.device
    m = n + 1
    imgs = torch.cat([ep.query[:, None], ep.support], 1)                      # (B, m, 1, 2S, 2S)
    masks = torch.cat([ep.query_mask[:, None], ep.support_mask], 1)
    union = masks.amax((1, 2)) > 0.5                                            # (B, 2S, 2S)
    coord = torch.arange(big, device=dev, dtype=torch.float32)
    inf = torch.tensor(float("inf"), device=dev)

    def span(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, 2S) -> first, last index present
        return torch.where(present, coord, inf).amin(1), torch.where(present, coord, -inf).amax(1)

    (lo_r, hi_r), (lo_c, hi_c) = span(union.any(2)), span(union.any(1))
    r = lambda k: torch.rand(k, generator=generator, device=dev)  # noqa: E731
    z = zoom[0] + (zoom[1] - zoom[0]) * r(b)
    use = (r(b) < p_zoom) & union.flatten(1).any(1)
    scale = torch.where(use, 1.0 / z, torch.ones_like(z))  # window side / source side: size / z frame px
    centre_r = torch.where(use, (lo_r + hi_r) / 2, torch.full_like(z, (big - 1) / 2))
    centre_c = torch.where(use, (lo_c + hi_c) / 2, torch.full_like(z, (big - 1) / 2))
    shift = jitter * scale * big * (r(2 * b).view(2, b) * 2 - 1) * use
    ty = (2 * (centre_r + shift[0]) + 1) / big - 1                             # normalised, align_corners=False
    tx = (2 * (centre_c + shift[1]) + 1) / big - 1
    zeros = torch.zeros_like(z)
    theta = torch.stack([torch.stack([scale, zeros, tx], 1), torch.stack([zeros, scale, ty], 1)], 1)
    theta = theta.repeat_interleave(m, 0)                                       # (B*m, 2, 3)
    grid = F.affine_grid(theta, (b * m, 1, size, size), align_corners=False)
    flat = lambda t: t.flatten(0, 1).float()  # noqa: E731
    whole_i = F.avg_pool2d(flat(imgs), 2)
    whole_m = (F.avg_pool2d(flat(masks), 2) > 0.5).float()
    crop_i = F.grid_sample(flat(imgs), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    crop_m = (F.grid_sample(flat(masks), grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    sel = use.repeat_interleave(m)[:, None, None, None]
    out_i = torch.where(sel, crop_i, whole_i).view(b, m, 1, size, size)
    out_m = torch.where(sel, crop_m, whole_m).view(b, m, 1, size, size)
    return Episodes(out_i[:, 0], out_m[:, 0], out_i[:, 1:], out_m[:, 1:], ep.query_pos, ep.support_pos)


def cat_episodes(a: Episodes, b: Episodes) -> Episodes:
    return Episodes(*(torch.cat([getattr(a, f), getattr(b, f)]) for f in Episodes.__dataclass_fields__))


def episode_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice per episode (an empty target contributes through BCE only)."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target)
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.flatten(1)
    inter, denom = (p * t).sum(1), (p + t).sum(1)
    has = t.sum(1) > 0
    dice = 1 - (2 * inter + 1) / (denom + 1)
    dice = (dice * has).sum() / has.sum().clamp(min=1)
    return bce + dice



def save_bank(bank: SliceBank, path: str | os.PathLike) -> Path:
    """One compressed ``.npz`` (uint8 pixels, each distinct image block stored once) + JSON metadata:
    lets a bank built where the readers are installed train on a machine that only has torch."""
    from medfound.io.atomic import atomic_file

    arrays, meta, seen = {}, [], {}
    imgs = (bank.images.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    labs = bank.labels.numpy()
    for i, b in enumerate(bank.blocks):
        block_imgs = imgs[b.start:b.start + b.n]
        key = hashlib.sha1(block_imgs.tobytes()).hexdigest()
        if key not in seen:
            seen[key] = i
            arrays[f"img{i}"] = block_imgs
        arrays[f"lab{i}"] = labs[b.start:b.start + b.n]
        arrays[f"pos{i}"] = bank.positions[b.start:b.start + b.n].numpy()
        meta.append({"dataset": b.dataset, "case": b.case, "modality": b.modality, "axis": b.axis, "n": b.n,
                     "names": b.names, "image_of": seen[key]})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return path


def load_bank(path: str | os.PathLike, min_pixels: int = 6, exclude_labels: tuple[str, ...] = (),
              exclude_datasets: tuple[str, ...] = ()) -> SliceBank:
    """Read a bank written by :func:`save_bank`; excluded labels are erased, excluded datasets dropped."""
    try:
        z = np.load(path, allow_pickle=False)
        meta = json.loads(bytes(z["meta"]).decode())
    except (OSError, ValueError, KeyError) as e:
        raise InputError(path, f"not a medfound slice bank ({type(e).__name__})") from None
    exclude = {e.lower() for e in exclude_labels}
    images, labels, positions, blocks, start = [], [], [], [], 0
    for i, m in enumerate(meta):
        if m["dataset"] in exclude_datasets:
            continue
        names = {n: v for n, v in m["names"].items() if n.lower() not in exclude and not is_heldout(n)}
        lab = z[f"lab{i}"]
        gone = [v for n, v in m["names"].items() if n not in names]
        if gone:
            lab = np.where(np.isin(lab, gone), 0, lab)
        block = Block(m["dataset"], m["case"], m["modality"], m["axis"], start, m["n"], names)
        for v in names.values():
            idx = np.flatnonzero((lab == v).sum((1, 2)) >= min_pixels)
            if len(idx):
                block.positives[v] = idx
        images.append(torch.from_numpy(z[f"img{m['image_of']}"].astype(np.float16) / 255))
        labels.append(torch.from_numpy(lab.astype(np.int16)))
        positions.append(torch.from_numpy(z[f"pos{i}"]))
        blocks.append(block)
        start += m["n"]
    if not blocks:
        raise InputError(path, "no slices left after the exclusions")
    return SliceBank(torch.cat(images), torch.cat(labels), torch.cat(positions), blocks, _tasks(blocks))
