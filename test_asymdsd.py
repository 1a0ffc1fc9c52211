"""Tests for asymdsd.py, data.py and evaluate.py. CPU only; run: python -m pytest -q test_asymdsd.py

Tests that compare against the official code's outputs use ../shared/fixtures and skip where it
is absent (a fresh clone); everything else makes its own data.
"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import asymdsd as A

ROOT = Path(__file__).resolve().parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "official_small_asymdsd.pt"
needs_fixture = pytest.mark.skipif(not FIXTURE.exists(),
                                   reason=f"official oracle fixture not found at {FIXTURE} (fresh clone without ../shared)")

# A model small enough for many CPU training steps per second.
SMALL = dict(embed_dim=32, depth=1, num_heads=2, tokenizer_dims=(16, 32, 64), pos_hidden=16,
             global_points=256, local_points=64, global_patches=16, local_patches=4, patch_size=16,
             predictor_dim=16, predictor_depth=1, predictor_heads=2, num_masks=2, head_hidden=32,
             head_bottleneck=16, num_prototypes=64, batch_size=8, epochs=2, warmup_epochs=1,
             temp_warmup_epochs=1, num_workers=0, device="cpu", log_every=1, lr=1e-3)


def small_cfg(**kw):
    return A.Config(**{**SMALL, **kw})


def set_args(**kw):
    """SMALL as --set arguments for the CLI."""
    fmt = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    skip = {"batch_size", "epochs", "num_workers", "device", "log_every", "lr"}
    return [f"{k}={fmt(v)}" for k, v in {**SMALL, **kw}.items() if k not in skip]


def write_modelnet_folder(root: Path, n_per_class=8, n_points=300, classes=("box", "ball"), seed=0):
    """A tiny ModelNet-layout folder of .npy clouds: <class>/<train|test>/<class>_NNNN.npy."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        for split in ("train", "test"):
            d = root / name / split
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                x = rng.normal(size=(n_points, 3))
                x = x / np.abs(x).max(1, keepdims=True) if c == 0 else x / np.linalg.norm(x, axis=1, keepdims=True)
                np.save(d / f"{name}_{i:04d}.npy", (x * rng.uniform(0.5, 1, 3)).astype(np.float32))
    return root


# ---------------------------------------------------------------------------------------------
# 1-2. Multi-crop and patchify
# ---------------------------------------------------------------------------------------------

def naive_fps(xyz, n, start):
    chosen, dist = [start], np.full(len(xyz), np.inf)
    for _ in range(n - 1):
        dist = np.minimum(dist, ((xyz - xyz[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(dist.argmax()))
    return chosen


def test_fps_and_knn_match_naive_loops():
    g = torch.Generator().manual_seed(0)
    xyz = torch.rand(3, 200, 3, generator=g, dtype=torch.float64)
    start = torch.tensor([0, 17, 199])
    idx = A.farthest_point_sample(xyz, 20, start)
    for b in range(3):
        assert idx[b].tolist() == naive_fps(xyz[b].numpy(), 20, int(start[b]))
    centers = xyz.gather(1, idx[..., None].expand(-1, -1, 3))
    knn = A.knn_group(xyz, centers, 8)
    for b in range(3):
        for gi in range(20):
            d = ((xyz[b] - centers[b, gi]) ** 2).sum(1).numpy()
            assert knn[b, gi].tolist() == np.argsort(d, kind="stable")[:8].tolist()
    assert (knn[..., 0] == idx).all(), "each centre must be its own nearest neighbour, first"


def test_patchify_shapes_and_relative_points():
    pts = A.normalize_unit_sphere(torch.randn(2, 500, 3))
    centers, patches = A.patchify(pts, 16, 8, generator=torch.Generator().manual_seed(0))
    assert centers.shape == (2, 16, 3) and patches.shape == (2, 16, 8, 3)
    assert torch.allclose(patches[:, :, 0], torch.zeros(2, 16, 3)), "the centre is the first point, at the origin"


def test_multi_crop_properties():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, 1000, 3)
    crops = A.multi_crop(src, 4, 128, (0.05, 0.4), (0.33, 3.0), g)
    assert crops.shape == (2, 4, 128, 3)
    for b in range(2):  # crops are subsets of their own cloud, without repeated points
        for c in range(4):
            d = torch.cdist(crops[b, c], src[b], compute_mode="donot_use_mm_for_euclid_dist")
            assert d.min(1).values.max() < 1e-6
            assert d.argmin(1).unique().numel() == 128
    full = A.multi_crop(src, 2, 1000, (0.4, 1.0), (0.33, 3.0), g)  # crop size = cloud size: the whole cloud
    assert torch.allclose(full[0, 0].sort(0).values, src[0].sort(0).values)
    norm = A.normalize_unit_sphere(A.augment_crops(crops, (0.8, 1.2), g))
    assert torch.allclose(norm.mean(2), torch.zeros(2, 4, 3), atol=1e-5)
    assert torch.allclose(norm.norm(dim=-1).amax(-1), torch.ones(2, 4))
    with pytest.raises(ValueError, match="fewer|needs"):
        A.multi_crop(torch.randn(1, 100, 3), 2, 128, (0.4, 1.0), (0.33, 3.0), g)


def test_views_shapes_per_mode():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(3, 300, 3)
    v = A.make_views(pts, small_cfg(), g)
    assert v["global"][1].shape == (3, 2, 16, 16, 3) and v["local"][1].shape == (3, 4, 4, 16, 3)
    v = A.make_views(pts, small_cfg(mode="mask"), g)
    assert set(v) == {"global"} and v["global"][0].shape == (3, 1, 16, 3)


# ---------------------------------------------------------------------------------------------
# Oracle: the official code's outputs (../shared/fixtures/official_small_asymdsd.pt)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oracle():
    return torch.load(FIXTURE, weights_only=False)


def oracle_encoder(oracle):
    enc = A.PointEncoder(96, 2, 2, 4.0, (128, 256, 512), 128)
    return A.load_official_encoder(enc, oracle["state_dict"]).eval()


@needs_fixture
def test_oracle_fps_and_knn_exact(oracle):
    io = oracle["io"]
    pts = io["points_normalized"]
    idx = A.farthest_point_sample(pts, 64, io["centers_idx"][:, 0])
    assert torch.equal(idx, io["centers_idx"]), "FPS from the official start must give the official centres in order"
    centers = pts.gather(1, idx[..., None].expand(-1, -1, 3))
    assert torch.equal(A.knn_group(pts, centers, 32), io["patches_idx"])
    c, p = A.patchify(pts, 64, 32, start_idx=io["centers_idx"][:, 0])
    assert torch.equal(c, io["teacher"]["centers"]) and torch.allclose(p, io["teacher"]["patches"], atol=1e-7)


@needs_fixture
def test_oracle_encoder_activations(oracle):
    t = oracle["io"]["teacher"]
    enc = oracle_encoder(oracle)
    with torch.no_grad():
        tok, pos = enc.embed(t["patches"], t["centers"])
        x, hidden = enc.encode(tok, pos, return_hidden=True)
    diff = lambda a, b: (a - b).abs().max().item()
    assert diff(tok, t["token_embeddings"]) <= 1e-5
    assert diff(pos, t["pos_embeddings"]) <= 1e-5
    assert len(hidden) == len(t["hidden_states"])
    for ours, theirs in zip(hidden, t["hidden_states"]):
        assert diff(ours, theirs) <= 1e-5
    assert diff(x[:, 0], t["cls"]) <= 1e-5 and diff(x[:, 1:], t["patch_tokens"]) <= 1e-5


@needs_fixture
def test_oracle_full_state_dict_maps_and_refuses_mismatch(oracle):
    sd = oracle["state_dict"]
    cfg = A.Config(embed_dim=96, depth=2, num_heads=2, predictor_dim=64, predictor_heads=2, predictor_depth=2,
                   head_hidden=64, head_bottleneck=32, num_prototypes=128)
    model = A.AsymDSD(cfg)
    A.load_checked(model, A.convert_official_state_dict(sd), "official fixture")
    assert torch.equal(model.teacher["cls_center"].center, sd["teacher.cls_centering.center"])
    assert torch.equal(model.student["predictor"].mask_token, sd["mask_token"])
    with pytest.raises(ValueError, match="not in the official AsymDSD layout"):
        A.convert_official_state_dict({**sd, "teacher.something_else.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="mis-shaped"):  # a wider model
        A.load_official_encoder(A.PointEncoder(128, 2, 2), sd)
    with pytest.raises(ValueError, match="missing"):      # a deeper model
        A.load_official_encoder(A.PointEncoder(96, 3, 2), sd)


# ---------------------------------------------------------------------------------------------
# 5-6. Masks and the predictor's attention rule
# ---------------------------------------------------------------------------------------------

def test_inverse_block_masks_exact_count_and_independent():
    g = torch.Generator().manual_seed(0)
    pts = A.normalize_unit_sphere(torch.randn(6, 1024, 3, generator=g))
    centers, _ = A.patchify(pts, 64, 32, g)
    mask = A.inverse_block_masks(centers, 4, 0.7, 0.1, 0.1, g)
    assert mask.shape == (24, 64) and mask.dtype == torch.bool
    assert (mask.sum(1) == 45).all(), "exactly round(0.7*64) = 45 masked per row"
    assert len({tuple(r.tolist()) for r in mask}) == 24, "masks differ per sample and per mask"
    visible, masked = A.split_mask(mask, 45)
    assert visible.shape == (24, 19) and (visible.diff(dim=1) > 0).all() and (masked.diff(dim=1) > 0).all()
    assert (~mask.gather(1, visible)).all() and mask.gather(1, masked).all()
    # The visible set is built from blocks of neighbouring patches: visible patches are closer
    # to each other than random sets of the same size.
    def spread(rows, idx):
        c = centers.repeat_interleave(4, 0)[rows]
        pick = c.gather(1, idx[..., None].expand(-1, -1, 3))
        return torch.cdist(pick, pick).mean().item()
    rand_idx = torch.rand(24, 64, generator=g).argsort(1)[:, :19]
    assert spread(torch.arange(24), visible) < 0.9 * spread(torch.arange(24), rand_idx)


def test_query_attention_mask_drawing():
    m = A.query_attention_mask(2, 3)
    assert m.tolist() == [[True, True, True, False, False],
                          [True, True, False, True, False],
                          [True, True, False, False, True]]
    assert A.query_attention_mask(2, 3, queries_see_each_other=True).all()


@pytest.mark.parametrize("form", ["cross", "masked_self"])
def test_masked_query_does_not_see_other_masked_queries(form):
    torch.manual_seed(0)
    pred = A.Predictor(32, 16, 2, 2, attention=form).eval()
    context, qpos = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    out = pred(context, qpos)
    moved = qpos.clone()
    moved[:, 3] += 5.0
    out2 = pred(context, moved)
    others = [j for j in range(6) if j != 3]
    assert torch.allclose(out[:, others], out2[:, others], atol=1e-6), "another query's position leaked"
    assert not torch.allclose(out[:, 3], out2[:, 3], atol=1e-4)
    out3 = pred(context + torch.randn_like(context), qpos)
    assert (out3 - out).abs().amax(dim=2).min() > 1e-4, "every query must depend on the context"


def test_leaky_predictor_does_see_other_queries():
    """The check above can fail: the full self-attention form leaks positions between queries."""
    torch.manual_seed(0)
    pred = A.Predictor(32, 16, 2, 2, attention="full_self").eval()
    context, qpos = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    moved = qpos.clone()
    moved[:, 3] += 5.0
    assert not torch.allclose(pred(context, qpos)[:, 0], pred(context, moved)[:, 0], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 7-9. Teacher, EMA, losses
# ---------------------------------------------------------------------------------------------

def batch_views(cfg, seed=0, B=4):
    g = torch.Generator().manual_seed(seed)
    return A.make_views(torch.randn(B, 300, 3, generator=g), cfg, g), g


@pytest.mark.parametrize("mode", ["cls_mask", "cls", "mask"])
def test_teacher_gets_no_gradient_and_student_does(mode):
    cfg = small_cfg(mode=mode, num_masks=8 if mode == "mask" else 2)
    model = A.AsymDSD(cfg)
    views, g = batch_views(cfg)
    loss, logs = model(views, 0.04, 0.05, g)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters()), "every student parameter is trained"
    expected = {"cls_mask": {"loss_patch", "loss_cls", "loss_koleo"}, "cls": {"loss_cls", "loss_koleo"},
                "mask": {"loss_patch", "loss_regression"}}[mode]
    assert expected == {k for k in logs if k.startswith("loss_")}


def test_total_loss_is_weighted_mean_of_terms():
    cfg = small_cfg()
    model = A.AsymDSD(cfg)
    views, g = batch_views(cfg)
    loss, logs = model(views, 0.04, 0.05, g)
    expect = (logs["loss_patch"] + logs["loss_cls"] + 0.01 * logs["loss_koleo"]) / 2.01
    assert torch.allclose(loss.detach(), expect)


def test_ema_momentum_one_changes_nothing_and_lerps_otherwise():
    model = A.AsymDSD(small_cfg())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.update_teacher(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
    model.update_teacher(0.75)
    for t, s in model.ema_pairs():
        name = next(n for n, p in model.teacher.named_parameters() if p is t)
        assert torch.allclose(t, 0.75 * before[name] + 0.25 * s)
    assert len(model.ema_pairs()) == len(list(model.teacher.parameters())) > 0


def test_centering_subtracts_old_centre_then_updates():
    c = A.Centering(4, momentum=0.9)
    x = torch.arange(8.0).view(2, 4)
    assert torch.equal(c(x), x)                                   # old centre is zero
    assert torch.allclose(c.center, 0.1 * x.mean(0))
    c.eval()
    before = c.center.clone()
    c(x)
    assert torch.equal(c.center, before), "no update outside training"


def test_cls_loss_and_koleo_by_hand():
    s, t = torch.randn(2, 3, 5), torch.softmax(torch.randn(2, 2, 5), -1)
    manual = torch.stack([-(t[b, i] * torch.log_softmax(s[b, j] / 0.1, -1)).sum()
                          for b in range(2) for i in range(2) for j in range(3)]).mean()
    assert torch.allclose(A.cls_loss(s, t, 0.1), manual)
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.6, 0.8]]])   # (B=3, S=1, D=2), already unit norm
    nn_dist = [math.dist((1, 0), (0.6, 0.8)), math.dist((0, 1), (0.6, 0.8)), math.dist((0, 1), (0.6, 0.8))]
    assert math.isclose(A.koleo_loss(x).item(), -np.mean(np.log(np.array(nn_dist) + 1e-6)), rel_tol=1e-5)


def test_projection_head_weight_norm():
    h = A.ProjectionHead(8, 16, 4, 10)
    assert torch.allclose(h.weight_g.squeeze(1), h.weight_v.norm(dim=1))
    with torch.no_grad():
        h.weight_v.mul_(3.0)  # direction only: scaling v changes nothing
    x = torch.randn(5, 8)
    y = h(x)
    with torch.no_grad():
        h.weight_v.div_(3.0)
    assert torch.allclose(y, h(x), atol=1e-6)


def test_schedules_endpoints():
    s = A.make_schedules(A.Config(epochs=300), steps_per_epoch=10)
    assert len(s["lr"]) == 3000
    assert math.isclose(s["lr"][0], 1e-7) and math.isclose(s["lr"][100], 5e-4) and s["lr"][-1] < 1.1e-6
    assert math.isclose(s["ema"][0], 0.995) and s["ema"][-1] > 0.99999 and (s["ema"].diff() >= 0).all()
    assert math.isclose(s["temp_cls"][0], 0.04) and math.isclose(s["temp_cls"][100], 0.07)
    assert math.isclose(s["temp_patch"][0], 0.05) and math.isclose(s["temp_patch"][-1], 0.07)


def test_loss_decreases_when_overfitting_a_tiny_batch():
    """With the teacher and its centres held fixed (momentum 1, eval mode) the student must fit its
    targets. (In real training the cross-entropy can rise while the student improves: centering
    flattens the targets towards uniform.)"""
    torch.manual_seed(0)
    cfg = small_cfg()
    model = A.AsymDSD(cfg)
    model.teacher.eval()
    opt = torch.optim.AdamW(model.student.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    pts = torch.randn(8, 300, 3, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(40):
        sched = {"lr": 2e-3, "ema": 1.0, "temp_cls": 0.04, "temp_patch": 0.05}
        loss, _, _ = A.train_step(model, model, opt, scaler, pts, cfg, sched, torch.Generator().manual_seed(2))
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


# ---------------------------------------------------------------------------------------------
# 10. Training loop: log, checkpoints, resume, errors, DDP
# ---------------------------------------------------------------------------------------------

def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def cli(root, out, *extra, **kw):
    return ["--data", "modelnet40", "--data-root", str(root), "--out", str(out), "--device", "cpu",
            "--batch-size", "4", "--epochs", "2", "--num-workers", "0", "--log-every", "1",
            *extra, "--set", *set_args(**kw)]


def test_run_logs_checkpoints_and_resumes_exactly(tmp_path):
    root = write_modelnet_folder(tmp_path / "mn")        # 16 train shapes -> 4 steps per epoch
    A.main(cli(root, tmp_path / "full"))
    full = read_log(tmp_path / "full")
    assert [r["step"] for r in full] == list(range(1, 9))
    for key in ("loss", "loss_patch", "loss_cls", "loss_koleo", "lr", "ema_momentum", "teacher_temp_cls",
                "teacher_entropy_cls", "samples_per_s", "peak_mem_mb"):
        assert key in full[0]
    ckpt = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    assert {"student", "teacher", "optimizer", "scaler", "generator", "step", "config"} <= set(ckpt)
    assert ckpt["step"] == 8 and "cls_center.center" in ckpt["teacher"]
    assert not list((tmp_path / "full").glob("*.tmp")), "checkpoint writes are atomic"
    # Stop mid-epoch 2 (step 6), then resume: the losses must equal the unbroken run's.
    A.main(cli(root, tmp_path / "part", "--max-steps", "6"))
    A.main(cli(root, tmp_path / "part", "--resume"))
    part = read_log(tmp_path / "part")
    assert [r["step"] for r in part] == list(range(1, 9))
    for a, b in zip(full, part):
        for k in ("loss", "loss_patch", "loss_cls", "loss_koleo"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a["step"], k)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    root = write_modelnet_folder(tmp_path / "mn")
    real = A.koleo_loss
    calls = {"n": 0}

    def poisoned(x, eps=1e-6):  # NaN from step 6 on (epoch 1 = steps 1-4 is clean)
        calls["n"] += 1
        return real(x, eps) * (float("nan") if calls["n"] >= 6 else 1.0)

    monkeypatch.setattr(A, "koleo_loss", poisoned)
    with pytest.raises(SystemExit, match="non-finite loss"):
        A.main(cli(root, tmp_path / "run"))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())


def test_clear_errors_for_bad_input(tmp_path):
    with pytest.raises(SystemExit) as e:
        A.main(cli(tmp_path / "nowhere", tmp_path / "o"))
    assert "nowhere" in str(e.value) and "download" in str(e.value).lower()
    few = write_modelnet_folder(tmp_path / "few", n_points=100)     # crops need 256 points
    with pytest.raises(SystemExit, match="100 points"):
        A.main(cli(few, tmp_path / "o"))
    bad = write_modelnet_folder(tmp_path / "nan")
    x = np.load(bad / "ball" / "train" / "ball_0003.npy")
    x[5, 1] = np.nan
    np.save(bad / "ball" / "train" / "ball_0003.npy", x)
    with pytest.raises(SystemExit, match="ball_0003"):
        A.main(cli(bad, tmp_path / "o"))
    flat = write_modelnet_folder(tmp_path / "flat")
    np.save(flat / "box" / "train" / "box_0001.npy", np.zeros((300, 2), np.float32))
    with pytest.raises(SystemExit, match="box_0001"):
        A.main(cli(flat, tmp_path / "o"))
    with pytest.raises(SystemExit, match="expected key=value"):
        A.main(["--set", "no_such_field=1"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_torchrun(tmp_path):
    root = write_modelnet_folder(tmp_path / "mn")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "asymdsd.py"),
           *cli(root, tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_log(tmp_path / "ddp")
    assert [x["step"] for x in log] == [1, 2, 3, 4]       # 16 shapes / (4 per rank x 2 ranks) = 2 steps per epoch
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    g0, g1 = ckpt["generator"]
    assert not torch.equal(g0, g1), "each rank draws its own crops"
