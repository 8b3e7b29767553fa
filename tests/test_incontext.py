"""In-context segmentation: model invariances, held-out rule in episodes, training CLI (resume, DDP),
``medfound segment`` with the packaged model, baselines, the support-size experiment and the bench."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfound.data.phantoms import make_phantom

HELD = {"background": 0, "organ": 1, "Left-Thalamus": 2, "lesion": 3, "bone": 4}


@pytest.fixture(scope="module")
def phantom_sets(tmp_path_factory):
    """A 4-case MR/CT phantom dataset whose label 2 is named like a held-out structure, and a 2-case
    query dataset."""
    from medfound.data.nnunet import write_dataset

    root = tmp_path_factory.mktemp("incontext")
    cases = []
    for i, m in enumerate(("MR", "MR", "CT", "CT")):
        image, label = make_phantom(m, shape=(48, 44, 20), seed=10 + i)
        image.format = "nifti"
        cases.append((f"case{i}", image, label))
    train = write_dataset(root / "Dataset900_Train", cases, HELD, {"0": "mixed"},
                          extra={"case_modalities": {c: m for c, m in zip(["case0", "case1", "case2", "case3"],
                                                                           ["MR", "MR", "CT", "CT"])}})
    q = []
    for i in range(2):
        image, label = make_phantom("MR", shape=(48, 44, 20), seed=50 + i)
        image.format = "nifti"
        q.append((f"query{i}", image, label))
    query = write_dataset(root / "Dataset901_Query", q, HELD, {"0": "MR"})
    return root, train.root, query.root


def test_model_is_order_invariant_and_shares_support_features():
    from medfound.models.incontext import InContextConfig, InContextSegmenter

    torch.manual_seed(0)
    m = InContextSegmenter(InContextConfig(size=32, widths=(8, 16, 16, 16))).eval()
    q = torch.rand(3, 1, 32, 32)
    si, sm = torch.rand(1, 5, 1, 32, 32), (torch.rand(1, 5, 1, 32, 32) > 0.5).float()
    pos = torch.rand(1, 5)
    with torch.no_grad():
        shared = m.decode(q, m.encode_support(si, sm, pos), torch.rand(3) * 0 + 0.5)
        perm = torch.tensor([3, 0, 4, 1, 2])
        permuted = m.decode(q, m.encode_support(si[:, perm], sm[:, perm], pos[:, perm]), torch.full((3,), 0.5))
        per_query = m(q, si.expand(3, -1, -1, -1, -1), sm.expand(3, -1, -1, -1, -1), torch.full((3,), 0.5),
                      pos.expand(3, -1))
        one = m(q[:1], si[:, :1], sm[:, :1])  # a single support, no positions
    assert torch.allclose(shared, permuted, atol=1e-5)
    assert torch.allclose(shared, per_query, atol=1e-5)
    assert one.shape == (1, 1, 32, 32) and torch.isfinite(one).all()


def test_local_cross_attention_is_the_windowed_softmax_it_describes():
    """The fused layout (strided windows, one SDPA call) against the definition written out pixel by
    pixel: softmax jointly over every support's window positions inside the image and the null sink,
    logits q.k / sqrt(dk) + window bias + support bias, the sink's value zero."""
    from medfound.models.incontext import LocalCrossAttention

    torch.manual_seed(0)
    heads, win, n, g, r, hw, c = 2, 3, 2, 1, 2, 5, 6
    att = LocalCrossAttention(c, 4, 6, heads, win).double()
    with torch.no_grad():
        att.rel_bias.normal_()
        att.null_logit.fill_(-0.5)
    sf, sm = torch.rand(g, n, c, hw, hw).double(), (torch.rand(g, n, 1, hw, hw) > 0.5).double()
    qf, sb = torch.rand(g * r, c, hw, hw).double(), torch.randn(g * r, n).double()
    with torch.no_grad():
        got = att(qf, att.support_kv(sf, sm), sb)[1]  # the mask votes (B, heads, H, W)
        q = att.to_q(qf)
        k = att.to_k(sf.flatten(0, 1))
        v = torch.cat([sm.flatten(0, 1)[:, None].expand(-1, heads, -1, -1, -1),
                       att.to_v(torch.cat([sf.flatten(0, 1), sm.flatten(0, 1) * 2 - 1], 1))
                       .view(n, heads, att.dv - 1, hw, hw)], 2)
        want = torch.zeros_like(got)
        for b in range(r):
            for h in range(heads):
                for y in range(hw):
                    for x in range(hw):
                        logits, votes = [att.null_logit[h]], [torch.tensor(0.0).double()]
                        for s in range(n):
                            for dy in range(win):
                                for dx in range(win):
                                    yy, xx = y + dy - win // 2, x + dx - win // 2
                                    if 0 <= yy < hw and 0 <= xx < hw:
                                        qv = q[b, h * att.dk:(h + 1) * att.dk, y, x]
                                        kv = k[s, h * att.dk:(h + 1) * att.dk, yy, xx]
                                        logits.append(qv @ kv / att.dk ** 0.5 + att.rel_bias[h, dy * win + dx] + sb[b, s])
                                        votes.append(v[s, h, 0, yy, xx])
                        want[b, h, y, x] = torch.stack(logits).softmax(0) @ torch.stack(votes)
    assert torch.allclose(got, want, atol=1e-10)


def test_flip_augmentation_makes_predictions_mirror_equivariant():
    """With mirrored test-time augmentation, mirroring the whole task (query and supports) mirrors the
    prediction exactly; the plain model owes no such thing."""
    from medfound.infer.incontext import SupportEncodings, SupportPool
    from medfound.models.incontext import InContextConfig, InContextSegmenter

    torch.manual_seed(0)
    m = InContextSegmenter(InContextConfig(size=32, widths=(8, 16, 16, 16))).eval()
    rng = np.random.default_rng(0)
    imgs, masks = rng.random((4, 32, 32), np.float32), (rng.random((4, 32, 32)) > 0.5).astype(np.float32)
    pool = SupportPool(1, "x", imgs, masks, np.linspace(0.2, 0.8, 4).astype(np.float32), ["s"] * 4)
    mirrored = SupportPool(1, "x", imgs[..., ::-1].copy(), masks[..., ::-1].copy(), pool.positions, ["s"] * 4)
    q, qpos = torch.rand(2, 1, 32, 32), torch.tensor([0.3, 0.6])
    with torch.inference_mode():
        for flip in (False, True):
            enc = SupportEncodings(m, {1: [pool]}, torch.device("cpu"), flip)
            enc_m = SupportEncodings(m, {1: [mirrored]}, torch.device("cpu"), flip)
            p, p_m = enc.probability(1, q, qpos), enc_m.probability(1, q.flip(-1), qpos)
            assert p.shape == (2, 1, 32, 32) and ((p >= 0) & (p <= 1)).all()
            assert torch.allclose(p, p_m.flip(-1), atol=1e-5) == flip
        plain = SupportEncodings(m, {1: [pool]}, torch.device("cpu")).probability(1, q, qpos)
        both = (plain + SupportEncodings(m, {1: [mirrored]}, torch.device("cpu")).probability(1, q.flip(-1), qpos).flip(-1)) / 2
    assert torch.allclose(p, both, atol=1e-5)  # the augmented prediction is the mean of the two views


def test_support_encodings_hold_one_label_at_a_time_and_labels_stay_independent():
    """Labels are encoded lazily and one at a time (an atlas of many labels must fit in memory);
    a label segmented with others gives exactly what it gives alone."""
    from medfound.infer.incontext import SupportEncodings, SupportPool, prepare_slices, segment_prepared
    from medfound.io import MedImage
    from medfound.models.incontext import InContextConfig, InContextSegmenter

    torch.manual_seed(0)
    m = InContextSegmenter(InContextConfig(size=32, widths=(8, 16, 16, 16))).eval()
    rng = np.random.default_rng(0)
    pools = {v: SupportPool(v, f"l{v}", rng.random((3, 32, 32), np.float32),
                            (rng.random((3, 32, 32)) > 0.6).astype(np.float32),
                            np.linspace(0.3, 0.7, 3).astype(np.float32), ["s"] * 3) for v in (1, 2, 5)}
    enc = SupportEncodings(m, {v: [p] for v, p in pools.items()}, torch.device("cpu"))
    first = enc.encode(1)
    assert enc.encode(1) is first  # kept while label 1 is in use
    assert enc.encode(2) is not first and enc.encode(1) is not first  # released once another label is asked for
    prep = prepare_slices(MedImage(rng.normal(size=(20, 24, 10)).astype(np.float32), np.eye(4), modality="MR"), 32)
    together = segment_prepared(m, prep, enc, batch_size=4, extent_margin=0.0)
    for v, p in pools.items():
        alone = segment_prepared(m, prep, SupportEncodings(m, {v: [p]}, torch.device("cpu")), batch_size=4,
                                 extent_margin=0.0)
        assert np.array_equal(together[v], alone[v])
    assert sorted(together) == [1, 2, 5]


def test_bank_never_holds_heldout_labels(phantom_sets):
    from medfound.data.episodes import augment_episodes, build_bank, sample_episodes, synthetic_episodes

    _, train, _ = phantom_sets
    bank = build_bank([str(train)], size=32, progress=False)
    assert not (bank.labels == 2).any()  # "Left-Thalamus" erased from every slice
    assert all(name != "left-thalamus" for name, _ in bank.tasks)
    assert {"organ", "bone"} <= {name for name, _ in bank.tasks}
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    ep = augment_episodes(sample_episodes(bank, 4, 3, rng), gen)
    assert ep.support.shape == (4, 3, 1, 32, 32) and ep.query_mask.shape == (4, 1, 32, 32)
    assert set(torch.unique(ep.support_mask).tolist()) <= {0.0, 1.0}
    assert ep.support_mask.flatten(2).amax(2).min() == 1  # every support holds its structure
    syn = synthetic_episodes(2, 3, 32, gen, "cpu")
    assert syn.support_mask.flatten(2).amax(2).min() == 1 and torch.isnan(syn.query_pos).all()


def test_incontext_train_resume_and_export(phantom_sets, cli, tmp_path):
    _, train, _ = phantom_sets
    run = tmp_path / "run"
    args = ["incontext", "train", "--datasets", train, "--out", run, "--size", "32", "--batch-size", "2",
            "--support-sizes", "1,3", "--precision", "32", "--accelerator", "cpu", "--checkpoint-every", "2"]
    r = cli(*args, "--steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["global_step"] == 2
    r = cli(*args, "--steps", "4", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["kind"] == "incontext" and cfg["training"]["steps"] == 4
    assert "Dataset900_Train" in cfg["data"]["datasets"] and (run / "model.safetensors").is_file()
    assert (run / "previews" / "episodes.png").is_file()
    r = cli(*args, "--steps", "2")  # refuses to overwrite a run
    assert r.returncode == 2 and "resume" in r.stderr


def test_incontext_train_on_an_mae_encoder_with_lora(phantom_sets, cli, tmp_path):
    """The MAE variant: a pretrained ViT (here a micro one) frozen under LoRA adapters; the run
    reloads and segments like the conv model."""
    from medfound.models.export import save_encoder
    from medfound.models.incontext_weights import load_incontext
    from medfound.models.vit import VIT_CONFIGS, ViTEncoder

    _, train, query = phantom_sets
    vit = ViTEncoder(VIT_CONFIGS["vit-micro"])
    save_encoder(vit, tmp_path / "mae", {"kind": "mae-encoder", "image_size": 32})
    run = tmp_path / "run"
    r = cli("incontext", "train", "--datasets", train, "--out", run, "--size", "32", "--batch-size", "2",
            "--support-sizes", "2", "--steps", "2", "--precision", "32", "--accelerator", "cpu",
            "--encoder", tmp_path / "mae", "--lora-rank", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["encoder"] == "mae" and cfg["encoder"]["lora_rank"] == 2
    assert 0 < cfg["trainable_parameters"] < cfg["parameters"]
    net, _ = load_incontext(run)
    frozen = dict(net.encoder.vit.named_parameters())
    base = [n for n in frozen if "blocks.0.attn.qkv.base_layer.weight" in n]
    assert base and torch.equal(frozen[base[0]], vit.blocks[0].attn.qkv.weight)  # the MAE weights, untouched
    r = cli("segment", "--support", train, "--input", query / "imagesTr" / "query0_0000.nii.gz", "--output",
            tmp_path / "masks", "--model", run, "--label", "organ", "--support-size", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("incontext", "train", "--datasets", train, "--out", tmp_path / "r2", "--encoder", tmp_path / "nope")
    assert r.returncode == 2 and "nope" in r.stderr


def test_incontext_train_ddp_two_cpu_processes(phantom_sets, cli, tmp_path):
    _, train, _ = phantom_sets
    run = tmp_path / "ddp"
    r = cli("incontext", "train", "--datasets", train, "--out", run, "--size", "32", "--batch-size", "2",
            "--support-sizes", "2", "--steps", "3", "--precision", "32", "--accelerator", "cpu", "--devices", "2",
            "--strategy", "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["training"]["world_size"] == 2 and cfg["training"]["global_batch"] == 4


def test_segment_with_packaged_model_keeps_geometry(phantom_sets, cli, tmp_path):
    _, train, query = phantom_sets
    out = tmp_path / "masks"
    src = query / "imagesTr" / "query0_0000.nii.gz"
    r = cli("segment", "--support", train, "--input", src, "--output", out, "--label", "organ", "--label", "3",
            "--support-size", "4", "--ensemble", "2", "--keep-largest", "--prior-weight", "0.33")
    assert r.returncode == 0, r.stderr[-2000:]
    img, mask = nib.load(src), nib.load(out / "query0.nii.gz")
    assert mask.shape == img.shape and np.allclose(mask.affine, img.affine)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 3}
    r = cli("segment", "--support", train, "--input", src, "--output", tmp_path / "plain", "--label", "organ",
            "--support-size", "4", "--no-refine", "--no-register", "--flip")  # the first pass alone, mirrored TTA
    assert r.returncode == 0, r.stderr[-2000:]
    assert nib.load(tmp_path / "plain" / "query0.nii.gz").shape == img.shape


def test_segment_bad_input(phantom_sets, cli, tmp_path):
    _, train, query = phantom_sets
    src = query / "imagesTr" / "query0_0000.nii.gz"
    r = cli("segment", "--support", tmp_path, "--input", src, "--output", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(tmp_path) in r.stderr
    r = cli("segment", "--support", train, "--input", src, "--output", tmp_path / "o", "--label", "liver")
    assert r.returncode == 2 and "liver" in r.stderr
    r = cli("segment", "--support", train, "--input", src, "--output", tmp_path / "o", "--prior-weight", "2")
    assert r.returncode == 2 and "--prior-weight" in r.stderr and not (tmp_path / "o").exists()
    r = cli("segment", "--support", train, "--input", src, "--output", tmp_path / "o",
                 "--through-plane-sigma", "-1")
    assert r.returncode == 2 and "--through-plane-sigma" in r.stderr and not (tmp_path / "o").exists()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    r = cli("segment", "--support", train, "--input", bad, "--output", tmp_path / "o2")
    assert r.returncode == 2 and "bad.nii.gz" in r.stderr and not (tmp_path / "o2").exists()


def test_label_fusion_copies_the_matching_support():
    from medfound.infer.label_fusion import label_fusion

    rng = np.random.default_rng(0)
    sup = rng.random((3, 32, 32)).astype(np.float32)
    masks = (rng.random((3, 32, 32)) > 0.5).astype(np.float32)
    out = label_fusion(sup[[2, 0]] * 2 + 0.1, sup, masks)  # same images up to contrast
    assert np.array_equal(out, masks[[2, 0]])


def test_registered_label_fusion_takes_the_nearest_height_within_the_supports_range():
    from medfound.infer.label_fusion import registered_label_fusion

    masks = np.stack([np.full((4, 4), v, np.float32) for v in (1, 2, 3)])
    query = np.array([0.0, 0.31, 0.44, 0.62, 0.9])
    out = registered_label_fusion(query, np.array([0.3, 0.5, 0.45]), masks, (query > 0.2) & (query < 0.7))
    assert [float(o.max()) for o in out] == [0, 1, 3, 2, 0]  # outside the range: empty
    assert registered_label_fusion(np.array([0.0]), np.array([0.3]), masks[:1]).max() == 1  # 2D: everywhere


def test_prior_weight_blends_in_the_registered_supports_masks():
    """prior_weight 1 gives registered label fusion on the slices the supports speak for; 0 the model."""
    from medfound.data.slicing import from_square
    from medfound.infer.incontext import SupportEncodings, SupportPool, prepare_slices, segment_prepared
    from medfound.infer.label_fusion import registered_label_fusion
    from medfound.io import MedImage
    from medfound.models.incontext import InContextConfig, InContextSegmenter

    torch.manual_seed(0)
    m = InContextSegmenter(InContextConfig(size=32, widths=(8, 16, 16, 16))).eval()
    prep = prepare_slices(MedImage(_blobs(), np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR"), 32)
    ks = [12, 18, 24]
    masks = np.zeros((3, 32, 32), np.float32)
    masks[:, 8:20, 10:22] = 1
    pool = SupportPool(1, "x", prep.squares[ks], masks, prep.positions[ks], [f"c:{k}" for k in ks])
    enc = SupportEncodings(m, {1: [pool]}, torch.device("cpu"))
    model_only = segment_prepared(m, prep, enc, extent_margin=0.0)[1].astype(np.float32)
    prior = segment_prepared(m, prep, enc, extent_margin=0.0, prior_weight=1.0)[1].astype(np.float32)
    third = segment_prepared(m, prep, enc, extent_margin=0.0, prior_weight=1 / 3)[1].astype(np.float32)
    expect = np.zeros(prep.view.shape, np.float32)
    for k, sq in enumerate(registered_label_fusion(prep.positions, pool.positions, masks, enc.gate(1, prep, 0.0))):
        expect[:, :, k] = from_square(sq, prep.geoms[k])
    assert np.allclose(prior, expect, atol=2e-3) and prior[:, :, 18].max() > 0.99 and prior[:, :, 0].max() == 0
    assert np.allclose(third, (2 * model_only + expect) / 3, atol=2e-3)


def test_largest_component_keeps_one_piece():
    from medfound.infer.incontext import largest_component

    m = np.zeros((10, 10, 6), bool)
    m[1:4, 1:4, 1:3] = True   # 18 voxels
    m[6:9, 6:9, 2:5] = True   # 27 voxels: kept
    m[5, 5, 5] = True         # diagonal neighbour of the big piece: 26-connected, kept with it
    out = largest_component(m)
    assert out.sum() == 28 and not out[1:4, 1:4, 1:3].any()
    assert not largest_component(np.zeros((4, 4), bool)).any()


def test_structure_names_match_across_atlases():
    from medfound.eval.support_size import structure_key

    assert structure_key("Thalamus_L") == structure_key("Left-Thalamus-Proper") == structure_key("Left_Thalamus_Proper")
    assert structure_key("Caudate_R") == structure_key("Right_Caudate") != structure_key("Left_Caudate")


def test_support_size_experiment(phantom_sets, cli, tmp_path):
    _, train, query = phantom_sets
    out = tmp_path / "exp"
    r = cli("experiment", "support-size", "--support", train, "--test", query, "--out", out, "--sizes", "1,2",
            "--seeds", "1", "--structure", "organ", "--finetune-steps", "3", "--also-largest")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("structure,") and len(rows) == 1 + 2 * 2 * 5  # sizes x query cases x methods
    s = json.loads((out / "summary.json").read_text())
    assert {r["method"] for r in s["by_size"]} == {"incontext", "incontext+largest", "label-fusion",
                                                  "registered-label-fusion", "finetune"}
    assert (out / "support_size.png").stat().st_size > 1000


def test_bench_incontext_prints_json(capsys):
    from medfound.bench.incontext import main

    res = main(["--repeats", "1", "--supports", "2", "--query-size", "64"])
    assert json.loads(capsys.readouterr().out.strip())["results"][0]["supports"] == 2
    timings = ("query_ms", "batched_query_ms", "refined_query_ms", "refined_flip_query_ms", "support_encode_ms")
    assert all(res["results"][0][k] > 0 for k in timings)


def test_bank_then_train_from_bank(phantom_sets, cli, tmp_path):
    _, train, _ = phantom_sets
    bank = tmp_path / "bank.npz"
    r = cli("incontext", "bank", "--datasets", train, "--out", bank, "--size", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "from_bank"
    r = cli("incontext", "train", "--bank", bank, "--out", run, "--size", "32", "--batch-size", "2", "--steps", "2",
            "--support-sizes", "2", "--precision", "32", "--accelerator", "cpu", "--exclude-label", "bone")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["datasets"] == ["Dataset900_Train"] and "--bank" in cfg["command"]
    # a run continued with --init keeps the inference settings its parent was validated with
    cfg["inference"] = {"refine": True, "register": True, "extent_margin": 0.01}
    (run / "config.json").write_text(json.dumps(cfg))
    r = cli("incontext", "train", "--bank", bank, "--out", tmp_path / "child", "--init", run, "--size", "32",
            "--batch-size", "2", "--steps", "1", "--support-sizes", "2", "--precision", "32", "--accelerator", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    child = json.loads((tmp_path / "child" / "config.json").read_text())
    assert child["inference"]["refine"] is True and child["inference"]["extent_margin"] == 0.01
    assert child["inference"]["inherited_from"] == str(run)
    r = cli("incontext", "train", "--bank", bank, "--datasets", train, "--out", tmp_path / "x")
    assert r.returncode == 2 and "either" in r.stderr
    r = cli("incontext", "train", "--bank", tmp_path / "missing.npz", "--out", tmp_path / "y")
    assert r.returncode == 2 and "missing.npz" in r.stderr


def _blobs(shape=(40, 40, 40), shift=(0, 0, 0)) -> np.ndarray:
    """A smooth asymmetric volume (three Gaussian blobs), content moved by ``shift`` voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    out = np.zeros(shape, np.float32)
    for centre, width, value in (((20, 20, 18), 9, 1.0), ((12, 26, 26), 4, 0.6), ((27, 14, 10), 5, 0.8)):
        d2 = ((grid - (np.array(centre) + np.array(shift))) ** 2).sum(-1)
        out += value * np.exp(-d2 / (2 * width ** 2))
    return out


def test_register_affine_recovers_a_known_shift():
    from medfound.data.correspondence import map_points, register_affine

    image, _ = make_phantom("MR", shape=(64, 64, 40), seed=3)  # 1 x 1 x 3 mm
    moved = np.zeros_like(image.array)
    moved[:, :, :-4] = image.array[:, :, 4:]  # the same body, 4 slices (12 mm) lower in its volume
    m = register_affine(image, image.with_array(moved))
    assert m is not None
    centre = image.affine[:3, :3] @ (np.array(image.shape) / 2) + image.affine[:3, 3]
    p = map_points(m, (centre - [0, 0, 12.0])[None])[0]  # a point of the moved body -> where it is in the original
    assert np.allclose(p, centre, atol=1.5), (p, centre)
    from medfound.io import MedImage

    assert register_affine(MedImage(image.array[:, :, 0], image.affine), image) is None  # 2D: no registration


def test_register_affine_gives_the_same_answer_every_run():
    """The metric samples voxels at random: with a fixed seed (not SimpleITK's seed 0, the wall clock)
    and every voxel of a small volume, runs on any number of threads agree (up to the order in which
    threads add up the metric: 1e-6 here; with the wall-clock seed they differed by millimetres or failed)."""
    import SimpleITK as sitk

    from medfound.data.correspondence import register_affine

    fixed, _ = make_phantom("MR", shape=(48, 44, 16), seed=99, oblique=True)
    moving, _ = make_phantom("MR", shape=(48, 44, 16), seed=21)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        runs = []
        for threads in (1, 2, 2):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            runs.append(register_affine(fixed, moving))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    assert runs[0] is not None and all(np.allclose(runs[0], r, atol=1e-4) for r in runs[1:])


def test_supports_are_placed_at_the_query_height_they_show():
    from medfound.infer.incontext import SupportPool, in_query_frame, prepare_slices, support_extent
    from medfound.io import MedImage

    query = prepare_slices(MedImage(_blobs(), np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR"), 32)
    # two support slices whose masks are centred at world z = 20 mm and 40 mm, in a volume "c" that the
    # registration says is the query shifted 8 mm up
    centres = np.array([[40.0, 40.0, 20.0], [40.0, 40.0, 40.0]])
    pool = SupportPool(1, "x", np.zeros((2, 32, 32), np.float32), np.ones((2, 32, 32), np.float32),
                       np.array([0.9, 0.95], np.float32), ["c:10", "c:20"], ["c", "c"], centres, {})
    shift = np.eye(4)
    shift[2, 3] = 8.0
    placed = in_query_frame(pool, query, {"c": shift})
    assert np.allclose(placed.positions, query.positions[[14, 24]], atol=1e-5)
    assert np.allclose(in_query_frame(pool, query, {"c": None}).positions, pool.positions)  # unregistered: kept
    lo, hi = support_extent(np.array([0.2, 0.3, 0.4]))
    assert np.isclose(lo, 0.1) and np.isclose(hi, 0.5)  # widened by the mean gap
    assert support_extent(np.array([np.nan])) is None


def test_support_slices_are_resampled_onto_the_query_grid():
    """A support scan with another field of view and pixel size than the query: once warped through
    the registration, its support mask falls on the query's own structure in the square frame."""
    from medfound.infer.incontext import SupportPool, in_query_frame, prepare_slices
    from medfound.infer.refine import native_supports
    from medfound.io import MedImage

    blobs = _blobs((48, 48, 40))
    label = (blobs > 0.6).astype(np.uint8)
    # the query: the same anatomy on a 1.5 mm grid with 24 mm more field of view on one side
    q_aff = np.diag([1.5, 1.5, 2.0, 1.0])
    q_aff[0, 3] = -24.0
    world = np.indices((80, 64, 40), dtype=np.float64)
    idx = np.stack([(world[0] * 1.5 - 24.0) / 2.0, world[1] * 1.5 / 2.0, world[2]])
    from scipy import ndimage

    q_img = ndimage.map_coordinates(blobs, idx, order=1).astype(np.float32)
    q_lab = ndimage.map_coordinates(label.astype(np.float32), idx, order=1) > 0.5
    query = prepare_slices(MedImage(q_img, q_aff, modality="MR"), 32)
    support = prepare_slices(MedImage(blobs, np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR"), 32)
    ks = [14, 18, 22]
    masks = np.stack([to_sq(label[:, :, k], 2.0) for k in ks])
    centres = np.array([[*np.argwhere(label[:, :, k]).mean(0) * 2.0, 2.0 * k] for k in ks])
    pool = SupportPool(1, "x", support.squares[ks], masks, support.positions[ks], [f"c:{k}" for k in ks],
                       ["c"] * 3, centres, {"c": support.view}, {"c": label}, 2)
    placed = in_query_frame(pool, query, {"c": np.eye(4)})  # the scans share world coordinates
    for i, k in enumerate(ks):
        truth = to_sq(q_lab[:, :, k], 1.5) > 0.5
        before = 2 * (truth & (masks[i] > 0.5)).sum() / (truth.sum() + masks[i].sum())
        after = 2 * (truth & (placed.masks[i] > 0.5)).sum() / (truth.sum() + placed.masks[i].sum())
        assert after > 0.9 and after > before + 0.1, (k, before, after)
        image, mask, spacing = native_supports(placed)[i]
        assert image.shape == mask.shape == (80, 64) and spacing == (1.5, 1.5)
    assert np.array_equal(in_query_frame(pool, query, {"c": None}).masks, pool.masks)  # unregistered: kept


def test_slice_tilt_measures_how_oblique_the_support_planes_are():
    from medfound.infer.incontext import slice_tilt
    from medfound.io import MedImage

    vol = MedImage(np.zeros((8, 8, 8), np.float32), np.diag([1.0, 1.0, 3.0, 1.0]))
    assert slice_tilt(np.eye(4), vol, vol, 2) < 1e-9
    turn = np.eye(4)
    a = np.deg2rad(30)
    turn[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]  # 30 degrees about x
    assert np.isclose(slice_tilt(turn, vol, vol, 2), 0.5)
    assert slice_tilt(turn, vol, vol, 0) < 1e-9  # a turn within the sagittal plane keeps sagittal slices parallel


def to_sq(plane: np.ndarray, mm: float) -> np.ndarray:
    from medfound.data.slicing import to_square

    return to_square(plane.astype(np.float32), (mm, mm), 32, nearest=True)[0]


def test_windows_keep_geometry_both_ways():
    from medfound.data.slicing import crop_windows, paste_windows

    yy, xx = np.mgrid[:90, :70]
    disk = (((yy - 40) * 0.8) ** 2 + ((xx - 30) * 1.2) ** 2 <= 15 ** 2).astype(np.float32)  # 15 mm radius
    centre = np.array([[40.0, 30.0]])
    win = crop_windows(disk[None], (0.8, 1.2), centre, 48.0, 96)  # 0.5 mm pixels
    assert np.isclose(win.sum() * 0.25, np.pi * 15 ** 2, rtol=0.03)  # area in mm^2 kept
    assert win[0, 48, 48] == 1 and win[0, 0, 0] == 0  # centred on the disk
    back = paste_windows(win, (0.8, 1.2), disk.shape, centre, 48.0) > 0.5
    assert (back != (disk > 0.5)).sum() <= 0.03 * disk.sum()


def test_refinement_windows_match_between_supports_and_query():
    """Support and query cut the same window of the frame: a support taken from the query volume itself
    gives, for its slice, exactly the query's window; the refined map stays inside the window."""
    from medfound.infer.incontext import SupportPool, prepare_slices
    from medfound.data.slicing import crop_windows, slice_coords
    from medfound.infer.refine import crop_support, plan_window, refine_label
    from medfound.io import MedImage
    from medfound.models.incontext import InContextConfig, InContextSegmenter

    vol = _blobs((48, 40, 12))
    truth = (vol > 0.6).astype(np.uint8)
    image = MedImage(vol, np.diag([1.0, 1.5, 3.0, 1.0]), modality="MR")
    prep = prepare_slices(image, 32)
    ks = [k for k in range(12) if truth[:, :, k].any()][::2]
    from medfound.data.slicing import to_square

    sp = (1.0, 1.5)
    masks = np.stack([to_square(truth[:, :, k].astype(np.float32), sp, 32, nearest=True)[0] for k in ks])
    pool = SupportPool(1, "blob", prep.squares[ks], masks, prep.positions[ks], [f"q:{k}" for k in ks], ["q"] * len(ks),
                       None, {"q": prep.view}, {"q": truth}, 2)
    geom = prep.geoms[0]
    window = plan_window(truth.any(2), geom, masks)
    assert window is not None and window.size % 8 == 0 and 64 <= window.size <= 256
    cropped = crop_support(pool, window, geom.size)
    assert cropped.images.shape == (len(ks), window.size, window.size)
    centre, side = slice_coords(window.centre, geom), window.side * geom.pixel_mm
    q = crop_windows(prep.view.array[:, :, ks[0]][None], sp, centre[None], side, window.size)[0]
    assert np.allclose(q, cropped.images[0], atol=1e-5)
    assert cropped.masks.sum() > 0
    model = InContextSegmenter(InContextConfig(size=32, widths=(8, 8, 8, 8), key_dim=8, value_dim=8, heads=2)).eval()
    prob = truth.astype(np.float16)
    out = refine_label(model, prep, [pool], prob, np.ones(12, bool), batch_size=4)
    assert out.shape == prob.shape and np.isfinite(out.astype(np.float32)).all()
    rows = (np.abs(np.arange(48) - centre[0]) * sp[0] > side / 2 + 1)
    cols = (np.abs(np.arange(40) - centre[1]) * sp[1] > side / 2 + 1)
    assert not out[rows].any() and not out[:, cols].any()  # nothing painted outside the window
    empty = np.zeros_like(prob)
    assert refine_label(model, prep, [pool], empty, np.ones(12, bool)) is empty  # nothing found: first pass kept


def test_zoom_episodes_cut_one_window_per_episode():
    from medfound.data.episodes import Episodes, zoom_episodes

    b, n, big = 3, 2, 64
    img = torch.rand(b, n + 1, 1, big, big)
    mask = torch.zeros(b, n + 1, 1, big, big)
    mask[:, :, :, 10:18, 40:48] = 1  # an 8x8 structure off-centre in every image
    ep = Episodes(img[:, 0], mask[:, 0], img[:, 1:], mask[:, 1:], torch.zeros(b), torch.zeros(b, n))
    gen = torch.Generator().manual_seed(0)
    whole = zoom_episodes(ep, 32, gen, p_zoom=0.0)
    assert whole.query.shape == (b, 1, 32, 32) and whole.support.shape == (b, n, 1, 32, 32)
    assert torch.allclose(whole.query, torch.nn.functional.avg_pool2d(img[:, 0], 2))
    assert whole.query_mask.sum((1, 2, 3)).eq(16).all()  # 4x4 at half the resolution
    zoomed = zoom_episodes(ep, 32, gen, p_zoom=1.0, zoom=(2.0, 2.0), jitter=0.0)
    # twice the frame's density: the 8x8 source structure (4x4 in the frame) is 8x8 and centred
    assert zoomed.query_mask.sum((1, 2, 3)).eq(64).all() and zoomed.support_mask.sum((2, 3, 4)).eq(64).all()
    assert zoomed.query_mask[0, 0, 12:20, 12:20].all()
    with pytest.raises(ValueError):
        zoom_episodes(whole, 32, gen)


def test_cross_subject_episodes_take_query_and_supports_from_different_subjects():
    from medfound.data.episodes import Block, SliceBank, _tasks, cross_subject_tasks, sample_episodes

    n, s = 6, 16
    images, labels, blocks = [], [], []
    for k, (case, level) in enumerate([("a", 0.2), ("b", 0.8), ("c", 0.5)]):
        images.append(torch.full((n, s, s), level, dtype=torch.float16))
        lab = torch.zeros(n, s, s, dtype=torch.int16)
        lab[:, 4:10, 4:10] = 1
        if case == "c":
            lab[:, 1:4, 1:4] = 2  # "only_c" is drawn in one subject: never a cross-subject task
        labels.append(lab)
        names = {"organ": 1} | ({"only_c": 2} if case == "c" else {})
        block = Block("D", case, "MR", 0, k * n, n, names)
        block.positives = {v: np.arange(n) for v in names.values()}
        blocks.append(block)
    bank = SliceBank(torch.cat(images), torch.cat(labels), torch.zeros(3 * n), blocks, _tasks(blocks))
    assert cross_subject_tasks(bank) == [("organ", "MR")]
    rng = np.random.default_rng(0)
    ep = sample_episodes(bank, 64, 3, rng, p_cross=1.0)
    q = ep.query.flatten(1)[:, 0]
    sup = ep.support.flatten(2)[:, :, 0]
    assert (sup != q[:, None]).all()  # every support from another subject than its query
    assert (sup == sup[:, :1]).all()  # all supports of an episode from one subject
    mixed = sample_episodes(bank, 64, 3, rng, p_cross=0.0)
    assert (mixed.support.flatten(2)[:, 0, 0] == mixed.query.flatten(1)[:, 0]).any()  # same-subject ones too


def test_inference_settings_are_the_models_with_the_callers_overrides():
    from medfound.infer.incontext import inference_settings

    cfg = {"inference": {"refine": True, "flip": True, "chosen_on": "validation structures"}}
    assert inference_settings(cfg) == {"extent_margin": 0.0, "refine": True, "flip": True, "prior_weight": 0.0,
                                       "through_plane_sigma": 0.0, "deform_2d": False}
    assert inference_settings(cfg, flip=False, prior_weight=None)["flip"] is False  # None: the model's
    assert inference_settings({}, prior_weight=0.4)["prior_weight"] == 0.4
    with pytest.raises(TypeError):
        inference_settings(cfg, flips=True)
    from medfound.errors import InputError

    for bad in ({"prior_weight": 1.5}, {"through_plane_sigma": -1}):  # segment and support-size share the check
        with pytest.raises(InputError):
            inference_settings(cfg, **bad)


def test_through_plane_smoothing_is_a_gaussian_of_the_stated_width_in_mm():
    """sigma_px pixels of the model's in-plane grid become sigma_px x pixel_mm / slice spacing slices;
    mass is kept; 2D images are left alone."""
    from medfound.infer.incontext import prepare_slices, smooth_through_plane
    from medfound.io import MedImage

    affine = np.diag([0.8, 0.8, 2.5, 1.0])  # RAS already: the canonical view is the array itself
    image = MedImage(np.random.default_rng(0).normal(size=(40, 64, 30)).astype(np.float32), affine, modality="MR")
    prep = prepare_slices(image, 32)
    pixel_mm = 64 * 0.8 / 32
    assert prep.geoms[0].pixel_mm == pytest.approx(pixel_mm)
    spike = np.zeros(image.shape, np.float32)
    spike[10, 20, 15] = 1.0
    out = smooth_through_plane(spike, prep, 1.5)
    z = np.arange(image.shape[2])
    profile = out[10, 20]
    assert out.sum() == pytest.approx(1.0, abs=1e-5) and out[:, :19].sum() == 0  # only along the slice axis
    var = (profile * (z - 15) ** 2).sum() / profile.sum()
    assert np.sqrt(var) == pytest.approx(1.5 * pixel_mm / 2.5, rel=0.05)
    flat = MedImage(np.ones((20, 30), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]), modality="XR")
    p2 = prepare_slices(flat, 32)
    probs = np.random.default_rng(1).random((20, 30)).astype(np.float16)
    assert smooth_through_plane(probs, p2, 1.0) is probs


def _box_prompts(train, cases, label_value, label_name, slices_per_case=2):
    """Boxes from the true masks of a few slices per case (as a user would draw them)."""
    prompts = {}
    for case in cases:
        lab = np.asarray(nib.load(train / "labelsTr" / f"{case}.nii.gz").dataobj)
        ks = [k for k in range(lab.shape[2]) if (lab[:, :, k] == label_value).sum() > 20]
        chosen = [ks[len(ks) * (i + 1) // (slices_per_case + 1)] for i in range(slices_per_case)]
        entries = []
        for k in chosen:
            xs, ys = np.nonzero(lab[:, :, k] == label_value)
            entries.append({"slice": int(k), "box": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]})
        prompts[case] = {label_name: entries}
    return prompts


def test_segment_from_an_example_set_given_as_prompts(phantom_sets, cli, tmp_path):
    _, train, query = phantom_sets
    images = tmp_path / "support_images"
    (images / "imagesTr").mkdir(parents=True)
    for f in (train / "imagesTr").glob("case[01]_0000.nii.gz"):  # images only: no labels anywhere
        (images / "imagesTr" / f.name).write_bytes(f.read_bytes())
    prompts = _box_prompts(train, ["case0", "case1"], 1, "organ")
    prompts["case1"]["organ"].append({"slice": prompts["case1"]["organ"][0]["slice"] + 1,
                                      "points": [[24, 22, 1]]})
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    src = query / "imagesTr" / "query0_0000.nii.gz"
    r = cli("segment", "--support", images, "--support-prompts", tmp_path / "prompts.json", "--input", src,
            "--output", tmp_path / "o", "--no-refine", "--no-flip")
    assert r.returncode == 0, r.stderr[-2000:]
    mask = np.asarray(nib.load(tmp_path / "o" / "query0.nii.gz").dataobj)
    truth = np.asarray(nib.load(query / "labelsTr" / "query0.nii.gz").dataobj) == 1
    assert mask.shape == truth.shape and set(np.unique(mask).tolist()) <= {0, 1}
    dice = 2 * ((mask == 1) & truth).sum() / ((mask == 1).sum() + truth.sum())
    assert dice > 0.5, dice
    assert json.loads((tmp_path / "o" / "labels.json").read_text()) == {"0": "background", "1": "organ"}
    import tempfile

    assert not list(Path(tempfile.gettempdir()).glob("medfound-prompted-support-*"))  # the drawn set is removed
    # bad prompts: exit 2 naming the file, nothing written
    (tmp_path / "bad.json").write_text(json.dumps({"nobody": {"organ": [{"slice": 3, "box": [1, 1, 5, 5]}]}}))
    r = cli("segment", "--support", images, "--support-prompts", tmp_path / "bad.json", "--input", src,
                 "--output", tmp_path / "o2")
    assert r.returncode == 2 and "bad.json" in r.stderr and "nobody" in r.stderr and not (tmp_path / "o2").exists()
    (tmp_path / "noslice.json").write_text(json.dumps({"case0": {"organ": [{"box": [1, 1, 5, 5]}]}}))
    r = cli("segment", "--support", images, "--support-prompts", tmp_path / "noslice.json", "--input", src,
                 "--output", tmp_path / "o3")
    assert r.returncode == 2 and "slice" in r.stderr and not (tmp_path / "o3").exists()


def test_support_prompts_experiment(phantom_sets, cli, tmp_path):
    _, train, query = phantom_sets
    r = cli("experiment", "support-prompts", "--support", train, "--test", query, "--output", tmp_path / "sp",
            "--label", "organ", "--support-size", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "sp" / "summary.json").read_text())
    assert summary["structures"] == ["organ"] and summary["prompted_slices"] > 4
    s = summary["summary"]
    assert 0 <= s["mask_defined"]["mean"] <= 1 and 0 <= s["prompt_defined"]["mean"] <= 1
    assert s["sam_mask_dice_on_support_slices"]["n"] == summary["prompted_slices"]
    rows = (tmp_path / "sp" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # two query volumes x one structure
