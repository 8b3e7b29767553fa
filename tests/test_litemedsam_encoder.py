"""LiteMedSAM's TinyViT as an encoder for adaptation with few labels: a U-Net on its feature pyramid
fine-tunes (full, linear on cached features, LoRA), reloads and predicts in the input's geometry; a
classifier trains on its pooled features; label-efficiency takes several encoders as arms."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_cli
from medfound.data.phantoms import write_phantom_dataset
from medfound.models import litemedsam
from medfound.models.export import save_encoder
from medfound.models.segmenter import encoder_for, load_segmenter
from medfound.models.vit import VIT_CONFIGS, ViTEncoder

needs_weights = pytest.mark.skipif(not litemedsam.weights_path().is_file(),
                                   reason=f"LiteMedSAM weights absent; {litemedsam.HOW_TO_GET}")


def test_pyramid_shapes_and_size_rule():
    enc, info = encoder_for("scratch:tinyvit", 64)
    assert info["kind"] == "scratch" and enc.dims == (128, 160, 320)
    with torch.no_grad():
        feats = enc.features(torch.rand(2, 1, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 128, 32, 32), (2, 160, 16, 16), (2, 320, 16, 16)]
    assert enc.pooled(torch.rand(2, 1, 64, 64)).shape == (2, enc.pooled_dim) == (2, 480)
    from medfound.errors import InputError

    with pytest.raises(InputError, match="multiple of 16"):
        encoder_for("scratch:tinyvit", 72)


@needs_weights
def test_released_encoder_weights_load_at_another_size():
    enc, info = encoder_for("litemedsam", 128)
    assert info["kind"] == "litemedsam" and enc.config.image_size == 128
    state = torch.load(str(litemedsam.weights_path()), weights_only=True)
    w = state["image_encoder.layers.2.blocks.0.attn.qkv.weight"]
    assert torch.equal(enc.tinyvit.layers[2].blocks[0].attn.qkv.weight, w)


@needs_weights
@pytest.mark.parametrize("mode", ["linear", "lora"])
def test_finetune_on_litemedsam_trains_reloads_and_predicts(tmp_path, mode):
    ds = write_phantom_dataset(tmp_path / "Dataset700_Ph", ("CT",), cases_per_modality=4)
    run = tmp_path / "run"
    r = run_cli("finetune", "--dataset", ds.root, "--output", run, "--encoder", "litemedsam", "--mode", mode,
                "--max-steps", "4", "--batch-size", "4", "--image-size", "64", "--val-every", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["architecture"]["type"] == "tinyvit" and cfg["encoder"]["kind"] == "litemedsam"
    assert cfg["encoder"]["features_cached"] is True  # the frozen encoder, or with LoRA its frozen stages 0-1
    assert cfg["lora_stages"] == ([2, 3] if mode == "lora" else None)
    t = cfg["training"]
    if mode == "linear":
        assert t["encoder_trainable_parameters"] == 0
    else:  # LoRA: a few adapters on stages 2-3's attention, everything else frozen
        assert 0 < t["encoder_trainable_parameters"] < t["encoder_parameters"] // 20
    model, _ = load_segmenter(run)
    state = torch.load(str(litemedsam.weights_path()), weights_only=True)
    # a frozen encoder comes back exactly as released
    assert torch.equal(model.encoder.tinyvit.patch_embed.seq[0].c.weight, state["image_encoder.patch_embed.seq.0.c.weight"])
    case = ds.cases()[0]
    image_path = ds.image_path(case)
    r = run_cli("predict", "--model", run, "--input", image_path, "--output", tmp_path / "pred")
    assert r.returncode == 0, r.stderr[-3000:]
    out = next((tmp_path / "pred").glob("*.nii.gz"))
    src = nib.load(image_path)
    pred = nib.load(out)
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)


def test_lora_on_later_stages_trains_on_the_frozen_stages_output():
    """LoRA on stages 2-3 only: the adapters sit there alone, and the logits from the frozen stages'
    output (what fine-tuning caches) are the model's own, with gradients reaching the adapters."""
    from medfound.models.segmenter import add_encoder_lora, segmenter_for
    from medfound.models.tinyvit_unet import LORA_STAGES

    enc, _ = encoder_for("scratch:tinyvit", 64)
    model = segmenter_for(add_encoder_lora(enc, 2, LORA_STAGES), 3).eval()
    adapted = {n.split(".")[2] for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert adapted == {"2", "3"} and model.first_adapted == 2
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # non-zero adapters, so that they change the function
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        part = model.encode_frozen(x)
    assert [tuple(t.shape) for t in part] == [(2, 128, 32, 32), (2, 16 * 16, 160)]
    logits = model.decode_frozen(x, part)
    assert torch.allclose(logits, model(x), atol=1e-5)
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_lora_stages_are_chosen_recorded_and_checked(tmp_path):
    """--lora-stages 1,3: adapters on those stages' attention alone, recorded, rebuilt on reload;
    a stage without attention, a mode without LoRA or a ViT encoder is refused before anything is written."""
    ds = write_phantom_dataset(tmp_path / "Dataset700_Ph", ("CT",), cases_per_modality=4)
    common = ("finetune", "--dataset", ds.root, "--max-steps", "2", "--batch-size", "2", "--image-size", "32",
              "--val-every", "2")
    run = tmp_path / "run"
    r = run_cli(*common, "--output", run, "--encoder", "scratch:tinyvit", "--mode", "lora", "--lora-stages", "3,1")
    assert r.returncode == 0, r.stderr[-3000:]
    model, cfg = load_segmenter(run)
    assert cfg["lora_stages"] == [1, 3] and cfg["encoder"]["features_cached"] is True
    adapted = {n.split(".")[2] for n, _ in model.encoder.named_parameters() if "lora_" in n}
    assert adapted == {"1", "3"} and model.first_adapted == 1
    for args, why in [(("--encoder", "scratch:tinyvit", "--mode", "lora", "--lora-stages", "0"), "1..3"),
                      (("--encoder", "scratch:tinyvit", "--mode", "linear", "--lora-stages", "2"), "--mode lora"),
                      (("--encoder", "scratch:vit-micro", "--mode", "lora", "--lora-stages", "2"), "TinyViT"),
                      (("--encoder", "scratch:tinyvit", "--mode", "lora", "--lora-stages", "2-3"), "integers")]:
        bad = tmp_path / f"bad{len(why)}"
        r = run_cli(*common, "--output", bad, *args)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert len(r.stderr.strip().splitlines()) == 1 and not bad.exists()


def test_full_finetune_on_a_scratch_tinyvit(tmp_path):
    ds = write_phantom_dataset(tmp_path / "Dataset700_Ph", ("CT",), cases_per_modality=4)
    r = run_cli("finetune", "--dataset", ds.root, "--output", tmp_path / "run", "--encoder", "scratch:tinyvit",
                "--max-steps", "3", "--batch-size", "2", "--image-size", "32", "--val-every", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    model, cfg = load_segmenter(tmp_path / "run")
    assert cfg["mode"] == "full" and model(torch.rand(1, 1, 32, 32)).shape == (1, cfg["n_classes"], 32, 32)


@pytest.mark.parametrize("mode", ["linear", "lora"])
def test_classifier_trains_on_what_its_frozen_encoder_gives_once(mode):
    """A linear probe's pooled features, or a TinyViT's stages before LoRA's, computed once per image
    (what classify train caches), give the classifier's own logits; gradients reach what trains."""
    from medfound.models.sam import to_sam_input
    from medfound.models.segmenter import add_encoder_lora
    from medfound.models.tinyvit_unet import LORA_STAGES
    from medfound.train.classify import ViTClassifier

    enc, _ = encoder_for("scratch:tinyvit", 64)
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():  # the pyramid is TinyViT's own stages 1-3
        pyramid = zip(enc.features(x), enc.tinyvit.features(to_sam_input(x))[1:], strict=True)
        assert all(torch.allclose(a, b) for a, b in pyramid)
    if mode == "lora":
        enc = add_encoder_lora(enc, 2, LORA_STAGES)
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    else:
        enc.requires_grad_(False)
    model = ViTClassifier(enc, 2).eval()
    assert model.caches(mode) and not model.caches("full")
    with torch.no_grad():
        part = model.frozen_part(x, mode)
    logits = model.forward_frozen(part, mode)
    assert torch.allclose(logits, model(x), atol=1e-5)
    logits.square().mean().backward()
    trained = [p for n, p in model.named_parameters() if "lora_" in n or n.startswith("head.")]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_tinyvit_norms_stay_frozen_when_a_distributed_run_syncs_batch_norms():
    """Lightning's sync_batchnorm (classify train on GPUs) turns every BatchNorm into SyncBatchNorm;
    TinyViT's keep the released statistics in training all the same, and answer as before."""
    enc, _ = encoder_for("scratch:tinyvit", 32)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        before = enc.eval().features(x)
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(enc).train()
        norms = [m for m in synced.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        assert norms and not any(m.training for m in norms)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(synced.features(x), before, strict=True))


def test_classifier_on_a_tinyvit(tmp_path):
    from test_classify import _csv

    path = _csv(tmp_path)
    r = run_cli("classify", "train", "--csv", path, "--out", tmp_path / "c", "--encoder", "scratch:tinyvit",
                "--mode", "lora", "--lora-stages", "3", "--max-steps", "4", "--batch-size", "4", "--image-size", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["architecture"]["type"] == "tinyvit" and cfg["lora_stages"] == [3]
    assert 0 < cfg["training"]["trainable_parameters"] < 100_000  # the adapters and the head
    bad = run_cli("classify", "train", "--csv", path, "--out", tmp_path / "bad", "--encoder", "scratch:tinyvit",
                  "--mode", "linear", "--lora-stages", "2")
    assert bad.returncode == 2 and "--mode lora" in bad.stderr and not (tmp_path / "bad").exists()
    r = run_cli("classify", "predict", "--model", tmp_path / "c", "--input", tmp_path, "--out", tmp_path / "p.csv")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 12


def test_label_efficiency_with_several_encoders(tmp_path):
    ds = write_phantom_dataset(tmp_path / "Dataset700_Ph", ("CT",), cases_per_modality=4)
    enc = tmp_path / "mae"
    save_encoder(ViTEncoder(VIT_CONFIGS["vit-micro"]), enc, {"image_size": 32})
    r = run_cli("experiment", "label-efficiency", "--dataset", ds.root, "--encoder",
                f"scratch,{enc},scratch:tinyvit=linear+lora", "--lora-stages", "3,1",
                "--output", tmp_path / "exp", "--fractions", "1", "--seeds", "1", "--max-steps", "2",
                "--image-size", "32", "--batch-size", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "exp" / "results.csv")))
    assert [r["arm"] for r in rows] == ["scratch-full", "mae-full", "scratch-tinyvit-linear",
                                        "scratch-tinyvit-lora-stages-1-3"]
    assert [r["lora_stages"] for r in rows] == ["", "", "", "1-3"]
    scratch = json.loads((tmp_path / "exp" / "runs" / "scratch-full_f1_s0" / "config.json").read_text())
    assert scratch["architecture"]["width"] == VIT_CONFIGS["vit-micro"].width  # shaped like the MAE run
    lora = json.loads((tmp_path / "exp" / "runs" / "scratch-tinyvit-lora-stages-1-3_f1_s0" / "config.json").read_text())
    assert lora["lora_stages"] == [1, 3]
    bad = run_cli("experiment", "label-efficiency", "--dataset", ds.root, "--encoder", f"scratch,{enc}=lora",
                  "--lora-stages", "2", "--output", tmp_path / "exp2")
    assert bad.returncode == 2 and "TinyViT" in bad.stderr and not (tmp_path / "exp2").exists()
    bad = run_cli("experiment", "label-efficiency", "--dataset", ds.root, "--encoder", f"{enc}=sideways",
                       "--output", tmp_path / "exp2")
    assert bad.returncode == 2 and "sideways" in bad.stderr and not (tmp_path / "exp2").exists()
    bad = run_cli("experiment", "label-efficiency", "--dataset", ds.root, "--encoder", "scratch",
                       "--precision", "16", "--output", tmp_path / "exp2")
    assert bad.returncode == 2 and "--precision" in bad.stderr and not (tmp_path / "exp2").exists()


@needs_weights
def test_incontext_on_litemedsam_with_lora_trains_reloads_and_segments(tmp_path):
    """GMISeg's mechanism: the in-context model on LiteMedSAM's frozen TinyViT with LoRA adapters."""
    from medfound.models.incontext_weights import load_incontext

    ds = write_phantom_dataset(tmp_path / "Dataset700_Ph", ("MR",), cases_per_modality=3)
    run = tmp_path / "run"
    r = run_cli("incontext", "train", "--datasets", ds.root, "--output", run, "--image-size", "32", "--batch-size", "1",
                "--support-sizes", "1", "--max-steps", "2", "--precision", "32", "--accelerator", "cpu",
                "--encoder", "litemedsam", "--rank", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["encoder"] == "litemedsam" and cfg["encoder"] == {"base": "litemedsam", "lora_rank": 2}
    assert 0 < cfg["trainable_parameters"] < cfg["parameters"]
    net, _ = load_incontext(run)
    state = torch.load(str(litemedsam.weights_path()), weights_only=True)
    params = dict(net.encoder.tinyvit.named_parameters())
    base = next(n for n in params if n.endswith("layers.1.blocks.0.attn.qkv.base_layer.weight"))
    assert torch.equal(params[base], state["image_encoder.layers.1.blocks.0.attn.qkv.weight"])  # frozen, as released
    r = run_cli("segment", "--support", ds.root, "--input", ds.image_path(ds.cases()[0]), "--output", tmp_path / "m",
                "--model", run, "--support-size", "2", "--no-refine", "--no-flip", "--label", "organ")
    assert r.returncode == 0, r.stderr[-3000:]
    from medfound.models.incontext_weights import DEFAULT_MODEL_DIR

    bad = run_cli("incontext", "train", "--datasets", ds.root, "--output", tmp_path / "run2", "--image-size", "32",
                       "--max-steps", "1", "--accelerator", "cpu", "--encoder", "litemedsam",
                       "--init", DEFAULT_MODEL_DIR)
    assert bad.returncode == 2 and "more than their encoder" in bad.stderr, bad.stderr[-2000:]


def test_incontext_pyramid_shapes_and_warm_start_from_a_conv_model():
    """The TinyViT pyramid gives the conv encoder's four maps; a conv in-context model's attention,
    decoder and full-resolution stage start a TinyViT one, and nothing of another shape is taken."""
    from medfound.models.incontext import InContextConfig, InContextSegmenter, load_shared_weights
    from medfound.models.tinyvit import TinyViT, TinyViTConfig

    cfg = InContextConfig(size=32, encoder="litemedsam", vit=TinyViTConfig(image_size=32).as_dict(), lora_rank=2)
    gm = InContextSegmenter(cfg)
    with torch.no_grad():
        maps = gm.encoder(torch.rand(2, 1, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 48, 8, 8), (2, 64, 4, 4)]
    conv = InContextSegmenter(InContextConfig(size=32))
    tiny_before = {k: v.clone() for k, v in gm.encoder.tinyvit.state_dict().items()}
    assert load_shared_weights(gm, conv) > 0
    mine, theirs = gm.state_dict(), conv.state_dict()
    for key in ("attn.0.to_k.weight", "attn.1.null_logit", "dec0.conv1.weight", "head.bias", "position_weight"):
        assert torch.equal(mine[key], theirs[key])
    assert torch.equal(mine["encoder.stem.conv1.weight"], theirs["encoder.stages.0.conv1.weight"])
    assert all(torch.equal(v, tiny_before[k]) for k, v in gm.encoder.tinyvit.state_dict().items())
    with pytest.raises(ValueError, match="more than their encoder"):
        load_shared_weights(gm, InContextSegmenter(InContextConfig(size=32, widths=(8, 16, 24, 32))))
    assert isinstance(gm.encoder.tinyvit, TinyViT)
