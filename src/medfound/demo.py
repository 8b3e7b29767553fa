"""``medfound demo``: the main job end to end on the real sample data, into a report folder.

Stages run in order and each adds a section to ``OUT/report/index.html``: sample data, overlays of
every labeled dataset, ingest of the unlabeled pool into shards (with a look at what the shards
hold), MAE pretraining, adaptation with few labels, the SAM path, in-context segmentation and the
web viewer (the last four may be left out with ``--skip``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from medfound.data.ingest import IngestOptions, ingest
from medfound.data.nnunet import NnUNetDataset
from medfound.data.orientation import to_canonical
from medfound.data.samples import materialise_samples
from medfound.data.shards import ShardSliceDataset
from medfound.data.sources import Source
from medfound.io.figures import best_slice, overlay, save_figure
from medfound.eval.report import Report
from medfound.train.checkpoint import training_precision

#: Datasets whose images are distinct (the MNI152 atlases share one T1): the demo's pool.
POOL_DATASETS = ("Dataset001_BrainTissue", "Dataset002_Lesions", "Dataset011_MNI152_AAL",
                 "Dataset021_Colin27_AAL", "Dataset100_Phantoms")


#: The stages after pretraining, each of which a run may leave out (``medfound demo --skip``).
OPTIONAL_STAGES = ("adaptation", "sam", "incontext", "viewer")


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def dataset_overlays(data: Path, report: Report) -> None:
    import matplotlib.pyplot as plt

    report.section("Labeled sample datasets (nnU-Net v2 raw folders)")
    rows = []
    for root in sorted(p for p in data.iterdir() if (p / "dataset.json").is_file()):
        ds = NnUNetDataset.open(root)
        cases = ds.cases()
        held = ds.heldout
        rows.append([ds.root.name, len(cases), ds.channel_names.get("0"), len(ds.labels) - 1,
                     ", ".join(list(held)[:6]) + (" ..." if len(held) > 6 else "") or "-"])
        shown = cases[:5]
        fig, axes = plt.subplots(1, len(shown), figsize=(3 * len(shown), 3.2), squeeze=False)
        for ax, case in zip(axes[0], shown):
            image, label = ds.read_case(case)
            if image.ndim == 3:
                image_c, _ = to_canonical(image)
                label_c, _ = to_canonical(label)
                k = best_slice(label_c.array)
                img2, lab2 = image_c.array[:, :, k], label_c.array[:, :, k]
            else:
                img2, lab2, k = image.array, label.array, 0
            overlay(ax, img2, lab2, title=f"{case} [{ds.case_modality(case)}] k={k}")
        rel = f"img/{ds.root.name}.png"
        save_figure(fig, report.folder / rel)
        report.image(rel, f"{ds.root.name}: {ds.info.get('description', '')}")
    report.table(["dataset", "cases", "channel", "labels", "held-out labels (never trained on)"], rows)


def shard_gallery(shards: Path, report: Report, per_modality: int = 6) -> None:
    import matplotlib.pyplot as plt

    by_mod: dict[str, list] = defaultdict(list)
    for x, meta in ShardSliceDataset(shards):
        if len(by_mod[meta["modality"]]) < per_modality * 8:
            by_mod[meta["modality"]].append((x[0].numpy(), meta))
    mods = sorted(by_mod)
    fig, axes = plt.subplots(len(mods), per_modality, figsize=(1.8 * per_modality, 1.9 * len(mods)), squeeze=False)
    rng = np.random.default_rng(0)
    for r, m in enumerate(mods):
        items = by_mod[m]
        pick = rng.choice(len(items), size=min(per_modality, len(items)), replace=False)
        for c in range(per_modality):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(pick):
                img, meta = items[pick[c]]
                overlay(ax, img, None, vmin=0.0, vmax=1.0, title=f"{m} {Path(meta['source']).name[:18]}")
    rel = "img/shards_by_modality.png"
    save_figure(fig, report.folder / rel)
    report.image(rel, "Normalised 224x224 slices as the shards hold them (random picks per modality)")


def pretrain_stage(out: Path, report: Report, steps: int, size: int) -> None:
    """MAE pretraining on the ingested pool; loss curve and first/last reconstruction grids."""
    import csv
    import shutil

    import matplotlib.pyplot as plt

    from medfound.train.pretrain import PretrainConfig, run_pretrain

    run = out / "pretrain"
    if run.exists():
        shutil.rmtree(run)
    cfg = PretrainConfig(model="vit-tiny", image_size=size, batch_size=32, max_steps=steps, num_workers=1,
                         checkpoint_every=max(steps // 3, 1), precision="auto", accelerator="cpu", devices=1)
    config = run_pretrain([str(out / "shards")], run, cfg)
    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    loss = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([s for s, _ in loss], [v for _, v in loss], lw=0.8)
    k = max(1, len(loss) // 20)
    smooth = np.convolve([v for _, v in loss], np.ones(k) / k, mode="valid")
    ax.plot([s for s, _ in loss][k - 1:], smooth, lw=2)
    ax.set_xlabel("step")
    ax.set_ylabel("masked-patch MSE (normalised pixels)")
    save_figure(fig, report.folder / "img/pretrain_loss.png")
    previews = sorted((run / "previews").glob("epoch_*.png"))
    for p in (previews[0], previews[-1]):
        shutil.copy(p, report.folder / "img" / f"pretrain_{p.name}")
    t = config["training"]
    report.section("MAE pretraining (ViT-Tiny/16, mask ratio 0.75)")
    report.text(f"{t['steps']} steps of batch {t['global_batch']} at {size} px, {t['precision']}, "
                f"{t['seconds']:.0f} s on this machine; loss {loss[0][1]:.3f} -> {np.mean([v for _, v in loss[-10:]]):.3f} "
                f"(mean of the last 10 steps). Modality sampling weights: "
                + ", ".join(f"{m} {w:.2f}" for m, w in config["data"]["sampling_weights"].items())
                + f". Encoder exported to {run / 'encoder.safetensors'} with config.json.")
    report.image("img/pretrain_loss.png", "Training loss per step (thin) and its running mean (thick)")
    report.image(f"img/pretrain_{previews[0].name}", "Reconstructions after the first epoch")
    report.image(f"img/pretrain_{previews[-1].name}", "Reconstructions at the end: original / masked / reconstruction per modality")


def adaptation_stage(out: Path, report: Report, steps: int) -> None:
    """Label efficiency on Dataset001_BrainTissue (10 % and 100 % of the training cases), the
    demo's pretrained encoder against the same ViT from scratch, tested on a held-out brain."""
    import csv
    import json
    import shutil

    from medfound.data.nnunet import NnUNetDataset
    from medfound.eval.experiments import label_efficiency
    from medfound.train.finetune import FinetuneConfig

    tissue = out / "data" / "Dataset001_BrainTissue"
    exp = out / "label_efficiency"
    if exp.exists():
        shutil.rmtree(exp)
    label_efficiency(tissue, str(out / "pretrain"), [0.1, 1.0], 1, exp,
                     ["full"], steps, base=FinetuneConfig(image_size=128, batch_size=8, lr=1e-3, num_workers=0),
                     log=_log)
    meta = json.loads((exp / "experiment.json").read_text())
    shutil.copy(exp / "label_efficiency.png", report.folder / "img" / "label_efficiency.png")
    report.section("Adaptation with few labels: brain tissue (grey / white matter)")
    report.text(f"ViT-UNETR fine-tuned for {steps} steps at 128 px on {', '.join(meta['train_pool'])} "
                f"(validation and labeled cases drawn from these by case), tested on {', '.join(meta['test_cases'])}, "
                "a brain never used for training or model selection. One seed: read the numbers as a smoke "
                "test of the pipeline, not as evidence for or against pretraining (DESIGN.md: gaps need >= 5 seeds).")
    sources = NnUNetDataset.open(tissue).info.get("medfound", {}).get("label_sources", {})
    conventions: dict[str, list[str]] = {}
    for case, how in sources.items():
        conventions.setdefault(how, []).append(case)
    if len(conventions) > 1:  # more labeled brains can then score lower, which would look like a bug
        report.text(f"The brains' tissue labels follow {len(conventions)} conventions: "
                    + " | ".join(f"[{', '.join(cases)}] {how}" for how, cases in conventions.items())
                    + ". A model learns the convention of the brains it is given, so a second labeled brain "
                    "need not raise the test Dice.")
    rows = list(csv.DictReader(open(exp / "summary.csv")))
    report.table(["arm", "label fraction", "labeled cases", "test Dice"],
                 [[r["arm"], r["fraction"], r["labeled_cases"], f"{float(r['test_dice_mean']):.3f}"] for r in rows])
    report.image("img/label_efficiency.png", "Test Dice vs label fraction")
    for run in sorted((exp / "runs").iterdir())[:1]:
        for f in sorted(run.glob("failure_*.png"))[:1]:
            shutil.copy(f, report.folder / "img" / f"adapt_{run.name}_{f.name}")
            report.image(f"img/adapt_{run.name}_{f.name}", f"{run.name}: truth vs prediction on the test brain (model_card.md beside the run)")


def sam_stage(out: Path, report: Report, steps: int = 300) -> None:
    """LoRA fine-tuning of SAM on the brain-tissue slices, Dice by prompt type against the un-adapted
    model with the same prompts, and a box prompt propagated through the held-back brain."""
    import matplotlib.pyplot as plt

    from medfound.data.nnunet import NnUNetDataset
    from medfound.eval.sam_eval import compare
    from medfound.infer.sam_segment import SamSession
    from medfound.models.sam import load_sam, load_sam_model
    from medfound.train.sam_finetune import SamFinetuneConfig, run_sam_finetune

    run = out / "sam"
    if run.exists():
        shutil.rmtree(run)
    ds_root = out / "data" / "Dataset001_BrainTissue"
    cfg = run_sam_finetune(ds_root, "tiny", run, SamFinetuneConfig(image_size=128, max_steps=steps, batch_size=4,
                                                                    lr=1e-3, progress=False, accelerator="cpu"))
    ds = NnUNetDataset.open(ds_root)
    adapted, _ = load_sam_model(run)
    base, _ = load_sam("tiny", 128)
    rows = compare({"base (un-adapted)": base.eval(), "LoRA-adapted": adapted}, ds, cfg["data"]["val_cases"], 128,
                   run / "dice_by_prompt.csv")
    case = cfg["data"]["val_cases"][0]
    image, truth = ds.read_case(case)
    can, _ = to_canonical(image)
    lab = to_canonical(truth)[0].array
    k = int(np.argmax((lab == 2).sum(axis=(0, 1))))
    xs, ys = np.nonzero(lab[:, :, k] == 2)
    box = (xs.min(), ys.min(), xs.max(), ys.max())
    mask = SamSession(adapted, can, 128).segment(k, box=box)
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    overlay(axes[0], can.array[:, :, k], (lab[:, :, k] == 2).astype(np.uint8), title=f"{case}: white matter (truth)")
    overlay(axes[1], can.array[:, :, k], mask.astype(np.uint8), title="LoRA SAM, box prompt")
    save_figure(fig, report.folder / "img" / "sam_box.png")
    report.section("SAM path: LoRA on the image encoder, box and point prompts")
    report.text(f"No released SAM weights ship in any registry package, so the demo adapts a tiny SAM (random "
                f"initialisation, the same code path as ViT-B/L/H and MedSAM checkpoints) for {steps} steps at 128 px "
                f"on {', '.join(cfg['data']['train_cases'])}; Dice on the held-back {case}, same prompts for both models. "
                f"Adapters file: {(run / 'adapters.safetensors').stat().st_size / 2**20:.2f} MiB.")
    report.table(["model", "prompt", "Dice", "slices x labels"],
                 [[r["model"], r["prompt"], f"{r['dice_mean']:.3f}", r["n"]] for r in rows])
    report.image("img/sam_box.png", "Box prompt on the held-back brain")
    shipped_sam_section(out, report)


def shipped_sam_section(out: Path, report: Report, structures: tuple[str, ...] = ("Thalamus_L", "Caudate_R",
                                                                                  "Hippocampus_L")) -> None:
    """The small SAM shipped with medfound, prompted on structures it never trained on (held out)."""
    import matplotlib.pyplot as plt

    from medfound.data.nnunet import NnUNetDataset
    from medfound.eval.sam_eval import structure_prompt_dice, summarise_prompts
    from medfound.infer.sam_segment import SamSession
    from medfound.models.sam import load_sam_model

    root = out / "data" / "Dataset011_MNI152_AAL"
    report.section("The shipped small SAM on held-out structures")
    if not root.is_dir():
        report.text("Skipped: the MNI152 AAL sample dataset is missing.")
        return
    sam, cfg = load_sam_model(None)
    ds = NnUNetDataset.open(root)
    chosen = {ds.labels[n]: n for n in structures if n in ds.labels}
    rows = structure_prompt_dice(sam, cfg, ds, ds.cases()[:1], chosen, seed=0, max_slices=4)
    image, truth = ds.read_case(ds.cases()[0])
    can, lab = to_canonical(image)[0], to_canonical(truth)[0].array
    session = SamSession.for_model(sam, cfg, can)
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.4 * len(chosen), 3.6), squeeze=False)
    for ax, (v, name) in zip(axes[0], chosen.items()):
        k = int(np.argmax((lab == v).sum(axis=(0, 1))))
        xs, ys = np.nonzero(lab[:, :, k] == v)
        box = (xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2)
        m = session.segment(k, box=box)
        overlay(ax, can.array[:, :, k], m.astype(np.uint8) + ((lab[:, :, k] == v) & ~m).astype(np.uint8) * 2,
                title=f"{name}: box -> mask (2nd colour: missed)")
    save_figure(fig, report.folder / "img" / "sam_shipped.png")
    t = cfg["training"]
    report.text(f"`medfound sam segment` / `medfound serve` use this model when no other is given: a conv image "
                f"encoder with SAM's prompt encoder and mask decoder ({cfg['parameters'] / 1e6:.1f} M parameters), "
                f"trained from scratch for {t['steps']} steps on {t['device']} ({t['seconds'] / 60:.0f} min) on every "
                f"non-held-out structure of the sample datasets. The structures below were never trained on; boxes "
                f"are drawn from their true outline (sides off by up to 2 px), on MNI152 slices.")
    report.table(["prompt", "Dice (mean over structures)", "structures"],
                 [[r["prompt"], f"{r['dice_mean']:.3f}", r["n"]] for r in summarise_prompts(rows)])
    report.image("img/sam_shipped.png", "Shipped SAM, one box per held-out structure on MNI152")


def incontext_stage(out: Path, report: Report, structures: tuple[str, ...] = ("Thalamus_L", "Caudate_R"),
                    n_support: int = 8, baseline_steps: int = 100) -> None:
    """Held-out structures of Colin27 (AAL) as the example set, the MNI152 T1 as the new study."""
    import matplotlib.pyplot as plt
    import torch

    from medfound.eval.support_size import support_size_experiment
    from medfound.infer.incontext import (SupportEncodings, inference_settings, place_members, prepare_slices,
                                          segment_prepared, support_pools)
    from medfound.models.incontext_weights import load_incontext

    support, test = out / "data" / "Dataset021_Colin27_AAL", out / "data" / "Dataset011_MNI152_AAL"
    report.section("In-context segmentation of structures never trained on")
    if not support.is_dir() or not test.is_dir():
        report.text("Skipped: the Colin27 AAL dataset needs Debian's mricron-data (see the Makefile).")
        return
    model, cfg = load_incontext()
    size = int(cfg["model"]["size"])
    sds, tds = NnUNetDataset.open(support), NnUNetDataset.open(test)
    wanted = {sds.labels[n]: n for n in structures}
    pools = support_pools(support, wanted, size)
    image, label = tds.read_case(tds.cases()[0])
    prep = prepare_slices(image, size)
    truth = to_canonical(label)[0].array
    members = place_members(pools, prep, n_support)  # support slices at the MNI152 height and grid they show
    settings = inference_settings(cfg)
    flip = settings.pop("flip")  # a property of the encodings; the rest are segment_prepared's keywords
    settings.pop("deform_2d")  # a property of placing 2D examples; this query is a volume
    probs = segment_prepared(model, prep, SupportEncodings(model, members, torch.device("cpu"), flip), 32, **settings)
    fig, axes = plt.subplots(len(wanted), 4, figsize=(12, 3.2 * len(wanted)), squeeze=False)
    rows = []
    for r, (v, name) in enumerate(wanted.items()):
        pred, t = probs[v] > 0.5, truth == tds.labels[name]
        dice = 2 * (pred & t).sum() / max(1, pred.sum() + t.sum())
        rows.append([name, len(members[v][0]), f"{dice:.3f}"])
        sup = members[v][0]
        for c, i in enumerate((0, len(sup) // 2)):
            overlay(axes[r][c], sup.images[i], sup.masks[i].astype(np.uint8), title=f"support {sup.sources[i]} ({name})")
        k = best_slice(t.astype(np.uint8))
        overlay(axes[r][2], prep.view.array[:, :, k], t[:, :, k].astype(np.uint8), title=f"MNI152 truth k={k}")
        overlay(axes[r][3], prep.view.array[:, :, k], pred[:, :, k].astype(np.uint8), title=f"in-context, 3D Dice {dice:.2f}")
    save_figure(fig, report.folder / "img" / "incontext_overlays.png")
    report.text(f"The packaged in-context model ({cfg['parameters']:,} parameters, trained on every non-held-out "
                f"label of the sample datasets plus synthetic shape tasks; {cfg['training']['device']}) segments "
                f"structures it never saw from {n_support} support slices of another brain (Colin27) — no gradient step. "
                f"An affine registration of the Colin27 volume onto MNI152 (well under a second) tells each support "
                f"slice which MNI152 height it shows.")
    report.table(["structure", "support slices", "3D Dice on MNI152"], rows)
    report.image("img/incontext_overlays.png", "Support slices (Colin27) and the query brain (MNI152): truth vs in-context")
    exp = out / "incontext_support_size"
    res = support_size_experiment(support, test, [1, 4, 16], exp, seeds=1, structures=list(structures),
                                  finetune_steps=baseline_steps, progress=False)
    shutil.copy(exp / "support_size.png", report.folder / "img" / "support_size.png")
    report.table(["method", "support slices", "mean 3D Dice", "seconds per run"],
                 [[r["method"], r["size"], f"{r['dice_mean']:.3f}", f"{r['seconds_mean']:.1f}"] for r in res["by_size"]])
    report.image("img/support_size.png", "Dice vs support size: in-context vs label fusion vs fine-tuning a U-Net "
                 "on the support slices (1 seed here; the README has the multi-seed run)")


def viewer_stage(out: Path, report: Report, structures: tuple[str, ...] = ("Thalamus_L", "Thalamus_R", "Caudate_L",
                                                                             "Caudate_R")) -> None:
    """Screenshot of ``medfound serve`` after segmenting MNI152 from a Colin27 example set in Chromium."""
    from medfound.data.nnunet import write_dataset
    from medfound.viewer.browser import chromium_path, screenshot_example_set

    report.section("Web viewer (medfound serve)")
    colin, study = out / "data" / "Dataset021_Colin27_AAL", out / "data" / "Dataset011_MNI152_AAL" / "imagesTr" / "mni152_0000.nii.gz"
    if chromium_path() is None or not colin.is_dir() or not study.is_file():
        report.text("Skipped: needs Debian's chromium and mricron-data (the Makefile installs both where apt works).")
        return
    ds = NnUNetDataset.open(colin)
    image, label = ds.read_case("colin27")
    names = {"background": 0} | {n: i + 1 for i, n in enumerate(structures)}
    sub = np.zeros(label.shape, dtype=np.uint8)
    for n, v in names.items():
        if v:
            sub[label.array == ds.labels[n]] = v
    support = write_dataset(out / "viewer" / "Dataset031_Colin27_Subcortical", [("colin27", image, sub)], names,
                            {"0": "MR"}, description="Colin27 AAL deep grey structures: the viewer's example set").root
    png = screenshot_example_set(out / "viewer" / "work", study, support, report.folder / "img" / "viewer.png")
    report.text("`medfound serve --support " + support.name + "`, MNI152 T1 uploaded on the page, 'Segment volume' "
                "pressed: the example set (Colin27, held-out deep grey structures) segments the new brain in the browser.")
    report.image(f"img/{png.name}", "The viewer in headless Chromium (Playwright), after in-context segmentation")


def run_demo(out: str | Path, size: int = 224, stride: int = 2, pretrain_steps: int = 300,
             finetune_steps: int = 150, sam_steps: int = 300, baseline_steps: int = 100,
             skip: tuple[str, ...] = ()) -> Path:
    """Every stage in order into ``out/report/index.html``; the stages named in ``skip`` (of
    :data:`OPTIONAL_STAGES`) are left out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "report", "medfound demo report")
    timings = {}

    t = time.time()
    _log("materialising sample data from installed packages ...")
    made = materialise_samples(out / "data")
    timings["samples"] = time.time() - t
    _log(f"samples: {sum(len(v) for v in made.values())} folders in {timings['samples']:.0f}s")

    t = time.time()
    dataset_overlays(out / "data", report)
    timings["overlays"] = time.time() - t

    t = time.time()
    _log("ingesting the unlabeled pool into shards ...")
    sources = [Source(out / "data" / "pool")]
    sources += [Source(out / "data" / d / "imagesTr") for d in POOL_DATASETS if (out / "data" / d).is_dir()]
    manifest = ingest(sources, out / "shards", IngestOptions(size=size, stride=stride), overwrite=True)
    timings["ingest"] = time.time() - t
    _log(f"ingest: {manifest['num_images']} images -> {manifest['num_slices']} slices in {timings['ingest']:.0f}s")

    report.section("Unlabeled pool ingested into shards")
    report.text(f"{manifest['num_images']} images from {len(sources)} sources became {manifest['num_slices']} "
                f"normalised {size}x{size} slices in {len(manifest['shards'])} WebDataset shard(s); "
                f"{len(manifest['errors'])} unreadable file(s) were skipped and listed.")
    per_mod = defaultdict(lambda: [0, 0])
    for im in manifest["images"]:
        per_mod[im["modality"]][0] += 1
    for m, n in manifest["slices_per_modality"].items():
        per_mod[m][1] = n
    report.table(["modality", "images", "slices", "normalisation"],
                 [[m, a, b, json.dumps(manifest["normalisation"].get(m, {}))] for m, (a, b) in sorted(per_mod.items())])
    if manifest["errors"]:
        report.table(["skipped file", "reason"], [[Path(e["path"]).name, e["reason"]] for e in manifest["errors"]])
    shard_gallery(out / "shards", report)

    t = time.time()
    # bf16 where this CPU computes it natively (AMX, AVX512-BF16), else fp32: emulated bf16 is ~10x slower
    _log(f"pretraining an MAE ViT-Tiny for {pretrain_steps} steps on the shards "
         f"({training_precision('auto', 'cpu')}) ...")
    pretrain_stage(out, report, pretrain_steps, size)
    timings["pretrain"] = time.time() - t

    stages = {
        "adaptation": ("label efficiency: fine-tuning on the brain-tissue dataset, pretrained vs scratch ...",
                       lambda: adaptation_stage(out, report, finetune_steps)),
        "sam": ("SAM path: LoRA fine-tuning of a tiny SAM with simulated prompts ...",
                lambda: sam_stage(out, report, sam_steps)),
        "incontext": ("in-context: held-out structures from a handful of support slices ...",
                      lambda: incontext_stage(out, report, baseline_steps=baseline_steps)),
        "viewer": ("viewer: segmenting from an example set in the browser for a screenshot ...",
                   lambda: viewer_stage(out, report)),
    }
    for name, (message, stage) in stages.items():
        if name in skip:
            _log(f"{name}: left out (--skip)")
            continue
        t = time.time()
        _log(message)
        stage()
        timings[name] = time.time() - t

    report.section("Timings")
    report.table(["stage", "seconds"], [[k, round(v, 1)] for k, v in timings.items()])
    path = report.write()
    _log(f"report: {path}")
    return path
