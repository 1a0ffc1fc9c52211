"""Tests for asymdsd.py, data.py, evaluate.py and bench.py, on CPU. Run: python -m pytest -q test_asymdsd.py

The asymdsd.py tests follow its numbered sections (1. Views ... 12. Official checkpoints), under the same
headers; then one group each for data.py, evaluate.py and bench.py. Tests that need an optional package
(h5py, scikit-learn, matplotlib) or a file written by the official code skip, naming it, where it is absent.
"""
import argparse
import dataclasses
import http.server
import importlib.util
import io
import json
import math
import multiprocessing
import os
import pickle
import platform
import random
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import asymdsd as A
import bench
import data
import evaluate
import segment

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# Official fixtures: files written by the official AsymDSD code (github.com/remcofl/AsymDSD), the
# oracle that this reimplementation is compared against. They are not part of this repository: they
# are read from the folder named by $ASYMDSD_OFFICIAL_FIXTURES, by default shared/fixtures beside the
# repository, and the tests that need one skip, naming the file, where it is absent.
# ----------------------------------------------------------------------------------------------

OFFICIAL_FIXTURES = Path(os.environ.get("ASYMDSD_OFFICIAL_FIXTURES") or ROOT.parent / "shared" / "fixtures")
# A small S model built by the official code (width 96, 2 heads, 2 layers, weights re-drawn at random):
# its state_dict in the official layout, and its teacher encoder's outputs for four fixed clouds: the
# FPS centres and kNN patches, the tokens, the positions, every block's output, the CLS and patch tokens.
OFFICIAL_SMALL_S = OFFICIAL_FIXTURES / "official_small_asymdsd.pt"
# The same in the base (B) layout: the two-stage tokenizer (every Linear with a bias), 3 layers.
OFFICIAL_SMALL_B = OFFICIAL_FIXTURES / "official_small_base_asymdsd.pt"
# A Lightning checkpoint written by the official training of a tiny S model (width 32): one step at a
# learning rate of about 1e-7 after the official initialisation.
OFFICIAL_TINY_S_CKPT = OFFICIAL_FIXTURES / "official_tiny_S.ckpt"


def needs_official(path: Path):
    """Skip the test, naming the file, where this official fixture is absent."""
    return pytest.mark.skipif(not path.exists(), reason=f"official fixture {path.name} not found in {path.parent} "
                                                         "(set ASYMDSD_OFFICIAL_FIXTURES to the folder that holds it)")


@pytest.fixture(scope="module")
def oracle():
    """official_small_asymdsd.pt, loaded once."""
    return torch.load(OFFICIAL_SMALL_S, weights_only=False)


def oracle_encoder(oracle):
    """Our PointEncoder with the official small S model's teacher weights, in eval mode."""
    enc = A.PointEncoder(96, 2, 2, 4.0, (128, 256, 512), 128)
    return A.load_official_encoder(enc, oracle["state_dict"]).eval()


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a busy shared CPU: one thread avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes of a .npy file holding `array`, for archives and folders built in a test."""
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


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


# ==============================================================================================
# asymdsd.py, section by section
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# 1. Views: point-cloud multi-crop, augmentation, normalisation (batched on the training device)
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# 2. Patches: farthest point sampling centres + kNN groups (plain batched PyTorch)
# ----------------------------------------------------------------------------------------------

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


@needs_official(OFFICIAL_SMALL_S)
def test_oracle_fps_and_knn_exact(oracle):
    io = oracle["io"]
    pts = io["points_normalized"]
    idx = A.farthest_point_sample(pts, 64, io["centers_idx"][:, 0])
    assert torch.equal(idx, io["centers_idx"]), "FPS from the official start must give the official centres in order"
    centers = pts.gather(1, idx[..., None].expand(-1, -1, 3))
    assert torch.equal(A.knn_group(pts, centers, 32), io["patches_idx"])
    c, p = A.patchify(pts, 64, 32, start_idx=io["centers_idx"][:, 0])
    assert torch.equal(c, io["teacher"]["centers"]) and torch.allclose(p, io["teacher"]["patches"], atol=1e-7)


# ----------------------------------------------------------------------------------------------
# 3. Tokens: building blocks, the mini-PointNet patch tokenizer, the positional MLP
# ----------------------------------------------------------------------------------------------

# Every module class of sections 3-7, built alone with small sizes: builder, inputs, output shape.
MODULES = {
    "Linear": (lambda: A.Linear(16, 32), lambda: (torch.randn(2, 5, 16),), (2, 5, 32)),
    "RMSNorm": (lambda: A.RMSNorm(32), lambda: (torch.randn(2, 5, 32),), (2, 5, 32)),
    "PatchTokenizer": (lambda: A.PatchTokenizer(32, (16, 32, 64)), lambda: (torch.randn(2, 4, 8, 3),), (2, 4, 32)),
    "PositionEmbedding": (lambda: A.PositionEmbedding(32, 16), lambda: (torch.randn(2, 4, 3),), (2, 4, 32)),
    "Attention": (lambda: A.Attention(32, 2), lambda: (lambda x: (x, x))(torch.randn(2, 5, 32)), (2, 5, 32)),
    "FeedForward": (lambda: A.FeedForward(32, 64), lambda: (torch.randn(2, 5, 32),), (2, 5, 32)),
    "Block": (lambda: A.Block(32, 2, 2.0), lambda: (torch.randn(2, 5, 32), torch.randn(2, 5, 32)), (2, 5, 32)),
    "TransformerEncoder": (lambda: A.TransformerEncoder(32, 2, 2, 2.0),
                           lambda: (torch.randn(2, 5, 32), torch.randn(2, 5, 32)), (2, 5, 32)),
    "PointEncoder": (lambda: A.PointEncoder(64, 1, 2, 2.0, (16, 32, 64), 16),
                     lambda: (torch.randn(2, 4, 8, 3), torch.randn(2, 4, 3)), (2, 1 + 4, 64)),
    "Predictor": (lambda: A.Predictor(64, 16, 1, 2, 2.0), lambda: (torch.randn(2, 5, 64), torch.randn(2, 3, 64)),
                  (2, 3, 64)),
    "ProjectionHead": (lambda: A.ProjectionHead(32, 64, 16, 128), lambda: (torch.randn(2, 5, 32),), (2, 5, 128)),
    "Centering": (lambda: A.Centering(128), lambda: (torch.randn(2, 5, 128),), (2, 5, 128)),
}


@pytest.mark.parametrize("tokenizer_dims", [(8, 16, 32), ((8, 16), (24,), (32,))], ids=["S", "three-stage"])
def test_tokenizer_equals_the_official_concat_form_and_amax_gradients(tokenizer_dims):
    """The tokenizers compute Linear([point, pooled]) as two half-Linears and pool with max().values;
    the official concatenates and uses amax. The same outputs and parameter gradients, also when a
    patch holds duplicated points (tied maxima, where amax splits the gradient and max does not)."""
    torch.manual_seed(0)
    tok = A.make_tokenizer(16, tokenizer_dims)
    patches = torch.randn(3, 4, 6, 3)
    patches[:, :, 3] = patches[:, :, 1]                                 # a duplicated point in every patch

    def official(x):                                                     # concat + amax, layer by layer
        stages = [tok.block_1, tok.block_2] if isinstance(tok, A.PatchTokenizer) else list(tok.stages)
        for stage in stages[:-1]:
            x = stage(x)
            x = torch.cat([x, x.amax(-2, keepdim=True).expand_as(x)], -1)
        return stages[-1](x).amax(-2)
    ours = tok(patches)
    ours.square().sum().backward()
    grads = [p.grad.clone() for p in tok.parameters()]
    tok.zero_grad()
    theirs = official(patches)
    theirs.square().sum().backward()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    for g, p in zip(grads, tok.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)


def test_cpu_autocast_enabled_sees_the_region_on_every_torch():
    """The fused tokenizer Function is fp32-only: it must see a CPU autocast region on torch 2.3.1
    (no device argument) and on later versions alike."""
    assert not A.cpu_autocast_enabled()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert A.cpu_autocast_enabled()
    assert not A.cpu_autocast_enabled()


def test_norm_gelu_linear_saves_only_its_input_and_matches_the_modules():
    """linear(gelu(norm(x))) in one autograd Function (CPU training): the same output and gradients as
    the three modules, while it keeps x and a per-row scale for the backward, where autograd keeps the
    normed and the activated x as well (two more tensors of x's size)."""
    torch.manual_seed(0)
    norm, linear = A.RMSNorm(48), A.Linear(48, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        linear.bias.uniform_(-1, 1)
    x = torch.randn(6, 40, 48, requires_grad=True)

    def run(f):
        saved = {}
        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = f()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [t.grad.clone() for t in (x, norm.weight, linear.weight, linear.bias)]
        for t in (x, norm.weight, linear.weight, linear.bias):
            t.grad = None
        return out.detach(), grads, sum(saved.values())
    out, grads, fused_bytes = run(lambda: A.norm_gelu_linear(x, norm, linear))
    normed = lambda: x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm.eps) * norm.weight  # autograd's composite
    ref, ref_grads, module_bytes = run(lambda: linear(torch.nn.functional.gelu(normed())))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    x_bytes = x.numel() * 4
    assert fused_bytes < x_bytes * 1.2 and module_bytes > 2.5 * x_bytes, (fused_bytes, module_bytes, x_bytes)
    with torch.no_grad():                                                # outside training: the modules
        assert torch.equal(A.norm_gelu_linear(x, norm, linear), out)


@pytest.mark.parametrize("name", list(MODULES))
def test_every_module_builds_alone_runs_and_is_initialised_as_the_official_code(name):
    """Each module, without the model around it: the right output shape, finite outputs and gradients,
    and the official initialisation (AsymDSD.init_weights: trunc-normal 0.02 Linear weights and tokens,
    zero Linear biases, unit norm weights; nn.MultiheadAttention's xavier-uniform in_proj_weight; the
    prototype layer's default init with g = |v| and a zero bias)."""
    build, inputs, shape = MODULES[name]
    torch.manual_seed(0)
    module = build()
    assert type(module) is getattr(A, name)
    out = module(*inputs())
    assert out.shape == shape and torch.isfinite(out).all()
    params = list(module.parameters())
    if params:
        out.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    for path, m in module.named_modules():
        if isinstance(m, A.Linear):
            if m.weight.numel() >= 256:
                assert 0.75 < m.weight.std().item() / 0.02 < 1.25, (path, m.weight.std().item())
            assert m.bias is None or not m.bias.any(), path
        if isinstance(m, A.RMSNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), path
        if isinstance(m, A.Attention):
            w = m.qkv.weight                                   # (3D, D): xavier bound sqrt(6 / (3D + D))
            bound = math.sqrt(6 / (4 * w.shape[1]))
            assert 0.95 * bound < w.abs().max() <= bound, path
            assert 0.9 < w.std().item() / (bound / math.sqrt(3)) < 1.1, (path, w.std().item())
    token = {"PointEncoder": "cls_token", "Predictor": "mask_token"}.get(name)
    if token:
        t = getattr(module, token)
        assert t.any() and 0.7 < t.std().item() / 0.02 < 1.3, (token, t.std().item())
    if name == "ProjectionHead":
        assert not module.bias.any()
        assert torch.equal(module.weight_g, module.weight_v.norm(dim=1, keepdim=True))


# ----------------------------------------------------------------------------------------------
# 4. Masks: inverse-block multi-mask, and the views of one step
# ----------------------------------------------------------------------------------------------

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


def test_views_shapes_per_mode():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(3, 300, 3)
    cfg = small_cfg()
    v = A.make_views(pts, cfg, g)
    assert v["global"][1].shape == (3, 2, 16, 16, 3) and v["local"][1].shape == (3, 4, 4, 16, 3)
    assert v["mask"].shape == (3 * 2 * cfg.num_masks, 16) and (v["mask"].sum(1) == round(0.7 * 16)).all()
    v = A.make_views(pts, small_cfg(mode="mask", num_masks=8), g)
    assert set(v) == {"global", "mask"} and v["global"][0].shape == (3, 1, 16, 3) and v["mask"].shape == (24, 16)
    assert "mask" not in A.make_views(pts, small_cfg(mode="cls"), g), "cls mode has no masked views"


# ----------------------------------------------------------------------------------------------
# 5. Encoder: pre-RMSNorm transformer, no biases, position added before every block
# ----------------------------------------------------------------------------------------------

@needs_official(OFFICIAL_SMALL_S)
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


@needs_official(OFFICIAL_SMALL_B)
def test_oracle_base_layout_activations():
    """The B layout (two-stage tokenizer with biases, 2 chunks) reproduces the official teacher."""
    fx = torch.load(OFFICIAL_SMALL_B, weights_only=False)
    t = fx["io"]["teacher"]
    enc = A.PointEncoder(96, 3, 2, 4.0, ((32, 64, 128), (256,)), 128)
    assert isinstance(enc.tokenizer, A.TwoStageTokenizer)
    enc = A.load_official_encoder(enc, fx["state_dict"]).eval()
    assert sum(p.numel() for p in enc.tokenizer.parameters()) == 101_376           # the fixture's count
    assert sum(p.numel() for p in enc.parameters()) == 446_816
    with torch.no_grad():
        tok, pos = enc.embed(t["patches"], t["centers"])
        x, hidden = enc.encode(tok, pos, return_hidden=True)
        enc.tokenizer.num_chunks = 2                                              # official process_num_chunks
        tok2 = enc.tokenizer(t["patches"])
    diff = lambda a, b: (a - b).abs().max().item()
    assert diff(tok, t["token_embeddings"]) <= 1e-5 and torch.equal(tok, tok2)
    assert diff(pos, t["pos_embeddings"]) <= 1e-5
    assert len(hidden) == len(t["hidden_states"]) == 3
    for ours, theirs in zip(hidden, t["hidden_states"]):
        assert diff(ours, theirs) <= 1e-5
    assert diff(x[:, 0], t["cls"]) <= 1e-5 and diff(x[:, 1:], t["patch_tokens"]) <= 1e-5


# ----------------------------------------------------------------------------------------------
# 6. Predictor: masked queries see the context, never each other
# ----------------------------------------------------------------------------------------------

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


def test_masked_query_attention_keys_and_mask():
    context, queries = torch.randn(1, 2, 4), torch.randn(1, 3, 4)
    keys, m = A.masked_query_attention(queries, context, "masked_self")
    assert torch.equal(keys, torch.cat([context, queries], 1))
    assert m.tolist() == [[True, True, True, False, False],
                          [True, True, False, True, False],
                          [True, True, False, False, True]]
    keys, m = A.masked_query_attention(queries, context, "cross")
    assert keys is context and m is None, "cross-attention: the queries see the context only"
    keys, m = A.masked_query_attention(queries, context, "full_self")
    assert keys.shape == (1, 5, 4) and m is None, "the leaky form: every query sees every query"
    with pytest.raises(ValueError, match="cross, masked_self or full_self"):
        A.masked_query_attention(queries, context, "self")


# ----------------------------------------------------------------------------------------------
# 7. Heads: prototype projection heads and the teacher's centering
# ----------------------------------------------------------------------------------------------

def test_centering_subtracts_old_centre_then_updates():
    c = A.Centering(4, momentum=0.9)
    x = torch.arange(8.0).view(2, 4)
    assert torch.equal(c(x), x)                                   # old centre is zero
    assert torch.allclose(c.center, 0.1 * x.mean(0))
    c.eval()
    before = c.center.clone()
    c(x)
    assert torch.equal(c.center, before), "no update outside training"


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


# ----------------------------------------------------------------------------------------------
# 8. Losses: masked-patch distillation, CLS invariance distillation, KoLeo
# ----------------------------------------------------------------------------------------------

def test_cls_loss_and_koleo_by_hand():
    s, t = torch.randn(2, 3, 5), torch.softmax(torch.randn(2, 2, 5), -1)
    manual = torch.stack([-(t[b, i] * torch.log_softmax(s[b, j] / 0.1, -1)).sum()
                          for b in range(2) for i in range(2) for j in range(3)]).mean()
    assert torch.allclose(A.cls_loss(s, t, 0.1), manual)
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.6, 0.8]]])   # (B=3, S=1, D=2), already unit norm
    nn_dist = [math.dist((1, 0), (0.6, 0.8)), math.dist((0, 1), (0.6, 0.8)), math.dist((0, 1), (0.6, 0.8))]
    assert math.isclose(A.koleo_loss(x).item(), -np.mean(np.log(np.array(nn_dist) + 1e-6)), rel_tol=1e-5)
    # The distance as the official computes it: nn.PairwiseDistance (eps 1e-6 inside the norm), then + 1e-6.
    # Duplicated samples (distance 0) tell the two apart: log(1e-6 * sqrt(D) + 1e-6), not log(1e-6).
    x = torch.randn(6, 2, 8)
    x[1] = x[0]
    u = torch.nn.functional.normalize(x, dim=-1, eps=1e-6)
    match = torch.stack([u[(u[:, c] @ u[:, c].T).fill_diagonal_(-1).argmax(1), c] for c in range(2)], 1)
    official = -torch.log(torch.nn.PairwiseDistance(p=2)(u, match) + 1e-6).mean()
    assert torch.allclose(A.koleo_loss(x), official, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_stay_fp32_under_autocast(dtype):
    """Mixed precision must not change the losses. KoLeo's nearest neighbour is an argmax over
    cosine similarities near 1; in bf16 (spacing 2^-8 below 1) or fp16 they tie, and the argmax
    picks a farther sample. The CLS einsum would round log-probabilities to 3 digits in bf16."""
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([1.0, 0.0, 0.0]) + 0.02 * torch.randn(32, 2, 3, generator=g)   # (B, S, D), a narrow cone
    s, t = 3 * torch.randn(4, 5, 64, generator=g), torch.softmax(3 * torch.randn(4, 2, 64, generator=g), -1)
    exact = A.koleo_loss(x), A.cls_loss(s, t, 0.1)
    with torch.autocast("cpu", dtype=dtype):
        mixed = A.koleo_loss(x), A.cls_loss(s, t, 0.1)
    assert all(m.dtype == torch.float32 for m in mixed)
    assert torch.allclose(mixed[0], exact[0], rtol=1e-6), "KoLeo picked other neighbours under autocast"
    assert torch.allclose(mixed[1], exact[1], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# 9. AsymDSD: the student, the EMA teacher, and the loss of one step
# ----------------------------------------------------------------------------------------------

# The official counts (remcofl/AsymDSD, its configs for S, B, L): encoder, tokenizer + position MLP,
# predictor (without the mask token), each projection head.
OFFICIAL_PARAMS = {"small": (21_786_240, 542_592, 2_804_736, 2_763_008),
                   "base": (91_484_928, 6_530_304, 11_212_800, 3_156_224),
                   "large": (309_128_960, 7_087_872, 19_931_136, 7_876_864)}


@pytest.mark.parametrize("preset", sorted(OFFICIAL_PARAMS))
def test_param_counts_equal_official(preset):
    cfg = A.Config(**A.preset_settings(preset))
    A.validate(cfg)
    n = A.parameter_counts(cfg)
    assert (n["encoder"], n["tokenizer"], n["predictor"], n["cls_head"]) == OFFICIAL_PARAMS[preset]
    assert n["patch_head"] == n["cls_head"]


def test_paper_preset_is_small_and_sizes_reach_the_model():
    assert A.PRESETS["paper"] == A.PRESETS["small"] and A.Config(**A.PRESETS["paper"]) == A.Config()
    cfg = A.Config(**{**A.PRESETS["base"], "embed_dim": 48, "num_heads": 2, "depth": 2,
                      "tokenizer_dims": ((8, 16), (32,)), "predictor_dim": 24, "predictor_heads": 2,
                      "head_hidden": 16, "head_bottleneck": 8, "num_prototypes": 32})
    model = A.AsymDSD(cfg)
    for side in ("student", "teacher"):
        enc = getattr(model, side)["encoder"]
        assert isinstance(enc.tokenizer, A.TwoStageTokenizer) and enc.tokenizer.num_chunks == 2
        assert [b.drop_path for b in enc.encoder.blocks] == [0.2, 0.2]          # uniform, as the B config
    assert A.config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))).tokenizer_dims == ((8, 16), (32,))
    assert A.parse_value("tokenizer_dims", "256,512,1024/2048") == ((256, 512, 1024), (2048,))
    with pytest.raises(SystemExit, match="tokenizer_dims"):
        A.validate(dataclasses.replace(cfg, tokenizer_dims=((8, 0), (32,))))


def batch_views(cfg, seed=0, B=4):
    g = torch.Generator().manual_seed(seed)
    return A.make_views(torch.randn(B, 300, 3, generator=g), cfg, g), g


@pytest.mark.parametrize("mode", ["cls_mask", "cls", "mask"])
def test_teacher_gets_no_gradient_and_student_does(mode):
    cfg = small_cfg(mode=mode, num_masks=8 if mode == "mask" else 2)
    model = A.AsymDSD(cfg)
    views, g = batch_views(cfg)
    loss, logs = model(views, 0.04, 0.05)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters()), "every student parameter is trained"
    expected = {"cls_mask": {"loss_patch", "loss_cls", "loss_koleo"}, "cls": {"loss_cls", "loss_koleo"},
                "mask": {"loss_patch", "loss_regression"}}[mode]
    assert expected == {k for k in logs if k.startswith("loss_")}


@pytest.mark.parametrize("tokenizer_dims", [(16, 16, 32), ((8, 16), (32,))], ids=["S", "B"])
def test_grad_checkpoint_gives_the_same_gradients(tokenizer_dims):
    """--grad-checkpoint recomputes the student's blocks (and B's tokenizer chunks) in backward: the same loss
    and gradients, with drop path on (the recomputation replays the same random draws)."""
    grads = []
    for ckpt in (False, True):
        cfg = small_cfg(tokenizer_dims=tokenizer_dims, tokenizer_chunks=2, drop_path=0.2, grad_checkpoint=ckpt)
        torch.manual_seed(0)
        model = A.AsymDSD(cfg)
        views, _ = batch_views(cfg)
        torch.manual_seed(1)
        loss, _ = model(views, 0.04, 0.05)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.student.parameters()]))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and len(g0) == len(g1)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(g0, g1))


def test_total_loss_is_weighted_mean_of_terms():
    cfg = small_cfg()
    model = A.AsymDSD(cfg)
    views, g = batch_views(cfg)
    loss, logs = model(views, 0.04, 0.05)
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


def test_compiled_model_is_one_graph_and_never_recompiles():
    """--compile: all randomness is drawn in make_views, so dynamo traces the whole forward (teacher,
    student, losses) as one graph; a draw from an explicit generator inside it would break it. The
    temperatures come in as device tensors, as train() passes them: a new Python float every
    warm-up step would recompile. The backend here only counts graphs (no code generation)."""
    cfg = small_cfg()
    model = A.AsymDSD(cfg)
    graphs = []
    net = torch.compile(model, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    temps = torch.tensor([[0.04, 0.05, 0.06], [0.05, 0.06, 0.07]])      # (2, steps)
    for step in range(3):
        views, _ = batch_views(cfg, seed=step)
        loss, _ = net(views, temps[0, step], temps[1, step])
        assert torch.isfinite(loss)
    torch._dynamo.reset()
    assert len(graphs) == 1, f"{len(graphs)} graphs: a graph break or a recompile"


def load_official_ckpt_state(path):
    """The state_dict of an official Lightning .ckpt, without the official package: classes the
    pickle names but this environment lacks become inert stand-ins."""
    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                return type(name, (), {"__init__": lambda self, *a, **k: None, "__setstate__": lambda self, s: None})
    pickle_module = type("pickle_module", (), {"Unpickler": Unpickler, "load": pickle.load})
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module)["state_dict"]


@needs_official(OFFICIAL_TINY_S_CKPT)
def test_initialisation_matches_a_checkpoint_the_official_training_wrote():
    """The official tiny S checkpoint is one lr-1e-7 step after the official init: every tensor's
    spread (trunc-normal 0.02, xavier-uniform qkv, default-init prototypes, zero biases, ones norms)
    must match our fresh model's, tensor by tensor."""
    official = A.convert_official_state_dict(load_official_ckpt_state(OFFICIAL_TINY_S_CKPT))
    cfg = A.Config(embed_dim=32, depth=2, num_heads=2, tokenizer_dims=(16, 32, 64), pos_hidden=128,
                   predictor_dim=16, predictor_depth=1, predictor_heads=2, head_hidden=32, head_bottleneck=16,
                   num_prototypes=64)
    torch.manual_seed(0)
    ours = A.AsymDSD(cfg).state_dict()
    student = [k for k in official if k.startswith("student.")]
    assert student and set(student) <= set(ours)
    for k in student:
        a, b = ours[k].float(), official[k].float()
        if b.std() < 1e-5:                                 # zero biases, unit norm weights (+ one lr-1e-7 step)
            assert torch.allclose(a, b, atol=1e-5), k
        elif b.numel() >= 256:                             # random: the same spread
            assert 0.85 < a.std() / b.std() < 1.18, (k, a.std().item(), b.std().item())
        else:                                              # a few dozen values: the spread, loosely
            assert 0.6 < a.std() / b.std() < 1.6, (k, a.std().item(), b.std().item())


# ----------------------------------------------------------------------------------------------
# 10. Training step: per-step schedules, AdamW, mixed precision, one step
# ----------------------------------------------------------------------------------------------

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


@pytest.mark.skipif(not A.fused_adamw_ok("cpu"), reason="fused AdamW on CPU needs torch 2.4; "
                    "the unfused AdamW reads its step counters back with .item()")
def test_train_step_reads_nothing_back_to_the_host():
    """No host-device syncs in the step. bench.setup_step runs train_step with the optimizer
    train() builds (fused AdamW); on CPU the profiler still records the ops that would sync on a GPU."""
    from torch.profiler import ProfilerActivity, profile
    _, _, step = bench.setup_step("tiny", 2, torch.device("cpu"), "fp32", False, source_points=1024)
    step()                                  # the first step creates the AdamW state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    assert bench.host_reads(prof) == []     # the default (foreach) AdamW would read its step counts back


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU bf16 rms_norm: unfused path
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_step_in_mixed_precision(precision):
    """The GPU paths, under CPU autocast: bf16 (our default where supported) and fp16 with a
    GradScaler (the official). The first step's loss matches fp32; fp16 skips the steps whose
    scaled gradients overflow (weights untouched), lowers the scale, then trains."""
    cpu = torch.device("cpu")
    _, ref, ref_step = bench.setup_step("tiny", 2, cpu, "fp32", False, source_points=1024)
    _, model, step = bench.setup_step("tiny", 2, cpu, precision, False, source_points=1024)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters())), "same seed, same init"
    init = [p.detach().clone() for p in model.student.parameters()]
    losses = [step()[0]]
    assert torch.allclose(losses[0], ref_step()[0], rtol=0.02)
    while len(losses) < 12 and all(torch.equal(a, b) for a, b in zip(init, model.student.parameters())):
        losses.append(step()[0])
    assert all(torch.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    changed = sum(not torch.equal(a, b) for a, b in zip(init, model.student.parameters()))
    assert changed == len(init), f"{precision}: the optimizer updated {changed} of {len(init)} student tensors"
    if precision == "bf16":
        assert len(losses) == 1, "bf16 needs no loss scaling: the first step already trains"


# ----------------------------------------------------------------------------------------------
# 11. Training loop: data, checkpoints, logs, DDP, CLI
# ----------------------------------------------------------------------------------------------

def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def cli(root, out, *extra, **kw):
    return ["--data", "modelnet40", "--data-root", str(root), "--out", str(out), "--device", "cpu",
            "--batch-size", "4", "--epochs", "2", "--num-workers", "0", "--log-every", "1",
            *extra, "--set", *set_args(**kw)]


@needs_official(OFFICIAL_TINY_S_CKPT)
def test_init_from_a_released_checkpoint_starts_pretraining(tmp_path, capsys):
    """--init: a released-format file's student and teacher start a run; a run of another size is refused."""
    sizes = dict(depth=2, pos_hidden=128, predictor_depth=1)         # the tiny official S file's, beside SMALL's
    cfg = small_cfg(**sizes, init=str(OFFICIAL_TINY_S_CKPT))
    model = A.AsymDSD(cfg)
    A.init_from_official(model, cfg)
    state = A.load_allowlisted(str(OFFICIAL_TINY_S_CKPT))["state_dict"]
    assert torch.equal(model.teacher["encoder"].encoder.norm.weight, state["teacher.point_encoder.encoder.norm.weight"])
    assert torch.equal(model.teacher["patch_center"].center, state["teacher.patch_centering.center"])
    assert "training mode cls_mask" in capsys.readouterr().out
    root = write_modelnet_folder(tmp_path / "mn")
    A.main(cli(root, tmp_path / "run", "--init", str(OFFICIAL_TINY_S_CKPT), "--max-steps", "1", **sizes))
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1]
    with pytest.raises(SystemExit, match="depth: file 2 vs run 1"):
        A.main(cli(root, tmp_path / "bad", "--init", str(OFFICIAL_TINY_S_CKPT), "--max-steps", "1",
                   pos_hidden=128, predictor_depth=1))


def test_run_logs_checkpoints_and_resumes_exactly(tmp_path):
    root = write_modelnet_folder(tmp_path / "mn")        # 16 train shapes -> 4 steps per epoch
    A.main(cli(root, tmp_path / "full"))
    full = read_log(tmp_path / "full")
    assert [r["step"] for r in full] == list(range(1, 9))
    for key in ("loss", "loss_patch", "loss_cls", "loss_koleo", "lr", "ema_momentum", "teacher_temp_cls",
                "teacher_entropy_cls", "samples_per_s", "data_wait_frac", "peak_mem_mb"):
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


def test_clear_errors_for_bad_input(tmp_path, capsys):
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
    capsys.readouterr()
    with pytest.warns(UserWarning, match="ball_0003"):   # --skip-bad: warned and counted, training goes on
        A.main(cli(bad, tmp_path / "skipped", "--skip-bad", "--max-steps", "1"))
    assert "skipped 1 bad file" in capsys.readouterr().out
    flat = write_modelnet_folder(tmp_path / "flat")
    np.save(flat / "box" / "train" / "box_0001.npy", np.zeros((300, 2), np.float32))
    with pytest.raises(SystemExit, match="box_0001"):
        A.main(cli(flat, tmp_path / "o"))
    with pytest.raises(SystemExit, match="expected key=value"):
        A.main(["--set", "no_such_field=1"])


def test_cli_presets_and_repeated_set_flags_all_apply():
    args = A.build_parser().parse_args(["--preset", "tiny", "--lr", "1e-3", "--set", "num_masks=1",
                                        "--set", "ema_momentum=0.995,1.0", "predictor_attention=masked_self"])
    cfg = A.build_config(args)
    assert (cfg.embed_dim, cfg.lr, cfg.num_masks) == (96, 1e-3, 1)
    assert cfg.ema_momentum == (0.995, 1.0) and cfg.predictor_attention == "masked_self"
    tiny = A.build_config(A.build_parser().parse_args(["--preset", "tiny"]))
    # the tiny preset's own settings
    assert (tiny.lr, tiny.ema_momentum, tiny.num_local_crops, tiny.epochs) == (5e-4, (0.998, 0.998), 2, 19)


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
    assert r.returncode == 0 and "terminate called" not in r.stderr, r.stderr[-3000:]
    log = read_log(tmp_path / "ddp")
    assert [x["step"] for x in log] == [1, 2, 3, 4]       # 16 shapes / (4 per rank x 2 ranks) = 2 steps per epoch
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    g0, g1 = ckpt["generator"]
    assert not torch.equal(g0, g1), "each rank draws its own crops"


def test_every_route_to_a_mode_gives_the_same_config():
    """--mode, --set mode=, Config(mode=) and a preset under them: one run per meaning."""
    def cfg(*argv):
        return A.build_config(A.build_parser().parse_args(list(argv)))

    mask = [cfg("--mode", "mask"), cfg("--set", "mode=mask"), A.Config(mode="mask"), cfg("--preset", "paper", "--mode", "mask")]
    assert all(c == mask[0] for c in mask)
    assert (mask[0].num_masks, mask[0].num_global_crops, mask[0].num_local_crops) == (8, 1, 0)   # the official variant
    tiny_mask = [cfg("--preset", "tiny", "--mode", "mask"), cfg("--preset", "tiny", "--set", "mode=mask")]
    assert tiny_mask[0] == tiny_mask[1] and (tiny_mask[0].num_masks, tiny_mask[0].embed_dim) == (8, 96)
    assert cfg("--preset", "tiny").num_masks == 2 and cfg("--preset", "tiny").num_local_crops == 2
    assert cfg("--preset", "tiny", "--mode", "mask", "--set", "num_masks=3").num_masks == 3   # explicit wins
    assert cfg() == A.Config() and (A.Config().num_masks, A.Config().num_local_crops) == (4, 4)
    assert A.Config(mode="cls").num_global_crops == 2
    for c in [*mask, *tiny_mask, A.Config(), cfg("--preset", "tiny")]:
        A.validate(c)


@pytest.mark.parametrize("argv, named", [
    (["--epochs", "0"], "epochs=0"),
    (["--epochs", "5"], "warmup_epochs=10"),                     # the paper's lr warm-up is 10 epochs
    (["--preset", "tiny", "--epochs", "3", "--set", "temp_warmup_epochs=4"], "temp_warmup_epochs=4"),
    (["--batch-size", "0"], "batch_size=0"),
    (["--lr=-0.001"], "lr=-0.001"),
    (["--set", "mask_ratio=1.0"], "mask_ratio=1.0"),
    (["--set", "patch_size=2000"], "patch_size=2000"),
    (["--mode", "mask", "--set", "num_local_crops=2"], "num_local_crops=2"),
    (["--set", "num_global_crops=3"], "num_global_crops=3"),
    (["--set", "embed_dim=100"], "num_heads=6"),
    (["--set", "global_crop_scale=0.4"], "global_crop_scale"),
    (["--set", "ema_momentum=0.9,1.5"], "ema_momentum"),
    (["--set", "num_masks=abc"], "num_masks=abc"),
    (["--set", "compile=perhaps"], "compile=perhaps"),
])
def test_impossible_settings_are_refused_before_any_work(tmp_path, monkeypatch, argv, named):
    out = tmp_path / "run"
    monkeypatch.setattr(A, "build_data", lambda cfg: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as e:
        A.main(["--data", "shapes", "--device", "cpu", "--out", str(out), *argv])
    assert named in str(e.value), str(e.value)
    assert not out.exists(), "nothing is written"


def test_validate_lists_every_problem_on_its_own_line():
    with pytest.raises(SystemExit) as e:
        A.validate(A.Config(epochs=0, batch_size=0, mask_ratio=1.0, mode="masked"))
    lines = str(e.value).splitlines()[1:]
    named = ["mode='masked'", "epochs=0: must", "batch_size=0", "warmup_epochs=10", "temp_warmup_epochs=10",
             "mask_ratio=1.0"]
    assert len(lines) == len(named) and all(any(n in line for line in lines) for n in named), lines


def test_help_shows_real_defaults():
    text = A.build_parser().format_help()
    assert "None" not in text
    assert re.search(r"--epochs EPOCHS\s+training epochs \(default: 300; tiny preset: 19\)", text)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU fp16 rms_norm: unfused path
def test_resume_applies_allowed_changes_and_refuses_the_rest(tmp_path, capsys):
    root = write_modelnet_folder(tmp_path / "mn")                  # 4 steps per epoch
    out = tmp_path / "run"
    A.main(cli(root, out, "--max-steps", "2"))
    printed = capsys.readouterr().out
    assert f"run folder {out}" in printed and "finished at step 2" in printed and str(out / "last.pt") in printed
    last = str(out / "last.pt")
    # Settings that define the run: refused, each named with both values; nothing runs.
    with pytest.raises(SystemExit) as e:
        A.main(["--resume", last, "--lr", "0.01", "--data", "shapes", "--set", "num_masks=1", "seed=3"])
    msg = str(e.value)
    for text in ("--lr 0.01 (the checkpoint's: 0.0005)", "--data shapes (the checkpoint's: 'modelnet40')",
                 "--set num_masks=1 (the checkpoint's: 2)", "--set seed=3 (the checkpoint's: 0)"):
        assert text in msg, msg
    with pytest.raises(SystemExit, match=r"--preset tiny: embed_dim=96 \(the checkpoint's: 32\)"):
        A.main(["--resume", last, "--preset", "tiny"])
    assert [r["step"] for r in read_log(out)] == [1, 2]
    # How the run goes on may change: here fp16 loss scaling starts mid-run, for one more step.
    capsys.readouterr()
    A.main(["--resume", last, "--precision", "fp16", "--max-steps", "3"])
    printed = capsys.readouterr().out
    assert "precision: 'auto' -> 'fp16'" in printed and "max_steps: 2 -> 3" in printed
    # No flags: the checkpoint's own settings (num_workers 0, device cpu, fp16), not the paper defaults
    # (8, auto, auto); the stop step of the last invocation is dropped; more epochs: applied, and said so.
    A.main(["--resume", last, "--epochs", "3", "--log-every", "2"])
    printed = capsys.readouterr().out
    assert "epochs: 2 -> 3" in printed and "rebuilt for 3 epochs" in printed and "log_every: 1 -> 2" in printed
    assert "max_steps: 3 -> 0" in printed
    run = json.loads(next(line for line in printed.splitlines() if line.startswith("{")))
    assert (run["num_workers"], run["device"], run["precision"], run["epochs"], run["num_masks"]) == (
        0, "cpu", "fp16", 3, 2)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["step"] == 12 and ckpt["config"]["epochs"] == 3 and ckpt["scaler"]
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 6, 8, 10, 12]
    A.main(["--resume", last])                                      # at its end: says so, trains nothing
    assert "nothing to train" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="past the end of 2 epochs"):
        A.main(["--resume", last, "--epochs", "2"])


class _LightningState(dict):
    """Stands in for the hyper-parameter objects a Lightning checkpoint pickles."""


def test_resume_names_files_that_are_not_run_checkpoints(tmp_path):
    torch.save({"a": torch.zeros(1000)}, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    files = {
        "random.pt": (os.urandom(2000), "not a PyTorch file"),
        "truncated.pt": (whole[: len(whole) // 2], "damaged or truncated"),
        "empty.pt": (b"", "empty"),
        "official.ckpt": ({"state_dict": {"teacher.point_encoder.cls_token": torch.zeros(1, 1, 8)}, "epoch": 3,
                           "pytorch-lightning_version": "2.4.0", "hyper_parameters": _LightningState(lr=1)},
                          "Lightning checkpoint"),
        "plain.ckpt": ({"state_dict": {"teacher.point_encoder.cls_token": torch.zeros(1, 1, 8)}},
                       "Lightning checkpoint"),
        "encoder.pt": ({"config": {"dim": 8}, "state_dict": {"tokenizer.w": torch.zeros(1)}}, "exported encoder"),
        "epoch_001.pt": ({"teacher": {}, "config": {}, "step": 4}, "teacher snapshot"),
        "other.pt": ({"weights": torch.zeros(1)}, "['weights']"),
    }
    for name, (content, kind) in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        with pytest.raises(SystemExit) as e:
            A.main(["--resume", str(path), "--out", str(tmp_path / "run")])
        assert str(path) in str(e.value) and kind in str(e.value), (name, str(e.value))
        assert "not a checkpoint of an asymdsd.py run" in str(e.value)
    with pytest.raises(SystemExit, match="a folder"):
        A.main(["--resume", str(tmp_path)])
    assert not (tmp_path / "run").exists()


def test_unwritable_out_folder_is_named(tmp_path, monkeypatch):
    import errno
    root = write_modelnet_folder(tmp_path / "mn")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"--out .*file/run: cannot write there \(Not a directory\)"):
        A.main(cli(root, tmp_path / "file" / "run"))
    read_only, real_open = tmp_path / "ro", os.open        # root may write anywhere: the OS's answer is faked
    read_only.mkdir()

    def refuse(path, *args, **kw):
        if str(path).startswith(str(read_only)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(SystemExit, match=r"--out .*ro: cannot write there \(Read-only file system\)"):
        A.main(cli(root, read_only))
    assert list(read_only.iterdir()) == []


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno
    root = write_modelnet_folder(tmp_path / "mn")
    real_save, calls = torch.save, []

    def fill_disk(obj, f, *args, **kw):      # the second checkpoint (step 8) runs out of space half-way
        calls.append(f)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kw)
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", fill_disk)
    with pytest.raises(SystemExit) as e:
        A.main(cli(root, tmp_path / "run"))
    assert "No space left on device" in str(e.value) and "the previous last.pt is kept" in str(e.value)
    assert str(tmp_path / "run" / "last.pt") in str(e.value)
    assert not list((tmp_path / "run").glob("*.tmp"))
    monkeypatch.undo()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 4


def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    root = write_modelnet_folder(tmp_path / "mn")
    real, calls = A.train_step, []

    def interrupted_at_step_6(*args, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(A, "train_step", interrupted_at_step_6)
    with pytest.raises(SystemExit) as e:
        A.main(cli(root, tmp_path / "run"))
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"interrupted at step 5; the last checkpoint is {tmp_path / 'run' / 'last.pt'} (step 4)"
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_second_run_on_a_folder_is_refused_and_a_crashed_one_leaves_no_lock(tmp_path):
    import signal
    root = write_modelnet_folder(tmp_path / "mn")
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"import asymdsd, time; asymdsd.lock_run_folder({str(out)!r}); "
                               "print('locked', flush=True); time.sleep(300)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as e:
            A.main(cli(root, out))
        assert f"pid {holder.pid} on {socket.gethostname()}, started " in str(e.value), str(e.value)
        assert not (out / "log.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)             # a crash: the OS drops the lock with the process
        holder.wait()
    A.main(cli(root, out, "--max-steps", "1"))
    assert [r["step"] for r in read_log(out)] == [1]


# ----------------------------------------------------------------------------------------------
# 12. Official checkpoints: the official state_dict layout -> these modules, one key map
# ----------------------------------------------------------------------------------------------

@needs_official(OFFICIAL_SMALL_S)
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



# -- part segmentation (segment.py): the official segmentation model and metric -----------------

OFFICIAL_SMALL_PARTSEG = OFFICIAL_FIXTURES / "official_small_partseg.pt"


def partseg_oracle_model(fixture):
    """Our PartSegmenter with the official small segmentation model's weights (eval mode)."""
    enc = A.PointEncoder(96, 3, 2, 4.0, (32, 64, 128), 128)
    model = segment.PartSegmenter(enc, layers=(0, 1, 2), upsample_dim=96, label_dim=16, head_dims=(128, 64))
    A.load_checked(model, segment.convert_official_seg_state_dict(fixture["state_dict"]), "official partseg fixture")
    return model.eval()


@needs_official(OFFICIAL_SMALL_PARTSEG)
def test_oracle_partseg_model_matches_official():
    fx = torch.load(OFFICIAL_SMALL_PARTSEG, weights_only=False)
    io = fx["io"]
    assert torch.equal(fx["state_dict"]["mean_iou.parts_mask"], segment.parts_mask())
    model = partseg_oracle_model(fx)
    pts = segment.normalize_with_padding(io["points"], io["num_points"])
    torch.testing.assert_close(pts, io["points_normalized"], atol=1e-6, rtol=0)
    # our FPS + kNN over the real points, from the official start, give the official patches
    centers, patches = segment.patchify_real(pts, io["num_points"], 128, 32, start_idx=io["centers_idx"][:, 0])
    torch.testing.assert_close(centers, io["centers"], atol=1e-6, rtol=0)
    trace = {}
    with torch.no_grad():
        logits = model(pts, centers, patches, io["cloud_label"], trace=trace)
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for ours, theirs in zip(trace["hidden"], io["hidden_states"]):
        close(ours, theirs)
    close(trace["cls"], io["cls_features"])
    close(trace["feats"][:, io["patch_subset"]], io["layer_norm_out_subset"])
    close(trace["feats"].mean(1), io["patch_features_mean"])
    close(trace["feats"].amax(1), io["patch_features_max"])
    close(trace["glob"], io["global_feature"])
    close(model.category_embed(io["cloud_label"]), io["label_embedding"])
    # the 3 neighbours come in topk(sorted=False) order: compare as sets, weights in the same order
    ours, theirs = trace["idx"].sort(-1), io["upsample_idx"].sort(-1)
    assert torch.equal(ours.values, theirs.values)
    close(trace["weights"].gather(-1, ours.indices), io["upsample_weights"].gather(-1, theirs.indices))
    sub = io["subset"]
    pick = lambda t: t.gather(1, io["point_subset"][..., None].expand(-1, -1, t.shape[-1]))
    close(pick(trace["sqdist"]).sort(-1).values, sub["upsample_sqdist"].sort(-1).values)
    close(pick(trace["interp"]), sub["interp"])
    # every module on the official input of that module (the stored output of the one before)
    x = torch.cat([pick(pts), sub["interp"]], -1)
    with torch.no_grad():
        for j, m in enumerate(model.upsample):
            close(m(x), sub[f"upsample_mlp.{j}"])
            x = sub[f"upsample_mlp.{j}"]
        x = torch.cat([x, io["global_feature"][:, None].expand(-1, 16, -1)], -1)
        for j, m in enumerate(model.head):
            if j == 3:  # dropout: identity in eval mode, not stored
                continue
            close(m(x), sub[f"segmentation_head.{j}"])
            x = sub[f"segmentation_head.{j}"]
    # End to end, fp32 rounding on the CPU that wrote the file sets the floor: the official code itself,
    # re-run on an x86 CPU, misses these logits by 1.1e-5 to 2.3e-5 across MKL/ATen instruction sets,
    # ours by 1.2e-5 to 2.4e-5 (RESULTS.md section 11).
    torch.testing.assert_close(logits, io["logits"], atol=3e-5, rtol=0)
    assert (logits.argmax(-1) == io["logits"].argmax(-1)).float().mean() > 0.999
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits.transpose(1, 2), io["semantic_labels"].long()),
                               io["loss_eval"], atol=1e-5, rtol=0)
    metric = segment.PartMIoU()
    metric.update(logits, io["semantic_labels"], io["cloud_label"])
    assert metric.compute()["instance_miou"] == pytest.approx(io["metric_on_batch"]["instance_mIoU"], abs=1e-5)
    assert math.isnan(metric.compute()["class_miou"])


@needs_official(OFFICIAL_SMALL_PARTSEG)
def test_oracle_partseg_official_checkpoint_loads_with_inferred_sizes(tmp_path):
    """An official segmentation checkpoint (state_dict with the metric's parts_mask) loads by itself:
    sizes from the shapes, blocks (0, 1, 2) = the last of each third of 3; the same logits."""
    fx = torch.load(OFFICIAL_SMALL_PARTSEG, weights_only=False)
    torch.save({"state_dict": fx["state_dict"]}, tmp_path / "seg.ckpt")
    model = segment.load_model(str(tmp_path / "seg.ckpt"), num_heads=2)
    ref = partseg_oracle_model(fx)
    assert model.layers == (0, 1, 2)
    io = fx["io"]
    pts = segment.normalize_with_padding(io["points"], io["num_points"])
    centers, patches = segment.patchify_real(pts, io["num_points"], 128, 32, start_idx=io["centers_idx"][:, 0])
    with torch.no_grad():
        assert torch.equal(model(pts, centers, patches, io["cloud_label"]), ref(pts, centers, patches, io["cloud_label"]))
    with pytest.raises(ValueError, match="not in the official segmentation layout"):
        segment.convert_official_seg_state_dict({**fx["state_dict"], "extra_head.weight": torch.zeros(1)})


@needs_official(OFFICIAL_SMALL_PARTSEG)
def test_oracle_partseg_metric_case():
    fx = torch.load(OFFICIAL_SMALL_PARTSEG, weights_only=False)
    case, metric = fx["metric_case"], segment.PartMIoU()
    for j, u in enumerate(case["updates"]):
        B, N = u["target"].shape
        logits = torch.zeros(B, 50, N)
        logits.scatter_(1, u["pred_cat_top"].long()[:, None], 1.0)
        logits.scatter_(1, u["pred_any_top"].long()[:, None], 2.0)
        scores = metric.update(logits.transpose(1, 2), u["target"].long(), u["cloud_label"])
        torch.testing.assert_close(scores, u["per_cloud_score"].double(), atol=1e-5, rtol=0)
        got, want = metric.compute(), case["results"][f"after_update_{j + 1}"]
        assert got["instance_miou"] == pytest.approx(want["instance_mIoU"], abs=1e-5)
        if math.isnan(want["class_mIoU"]):
            assert math.isnan(got["class_miou"]) and len(got["unseen"]) == 7
        else:
            assert got["class_miou"] == pytest.approx(want["class_mIoU"], abs=1e-5) and not got["unseen"]
        torch.testing.assert_close(metric.count.double(), want["instances_per_class"].double())
        torch.testing.assert_close(metric.score_sum, want["class_score_sum"].double(), atol=1e-5, rtol=0)


def test_partseg_metric_edge_cases_and_many_clouds():
    """Absent-from-both parts count 1; a predicted-but-absent part counts 0; predictions outside the
    category are never chosen; more than 16 clouds in one update work (the official raises)."""
    N = 8
    target = torch.full((20, N), 12)                     # chair parts 12..15; only part 12 present
    logits = torch.zeros(20, N, 50)
    logits[..., 0] = 9.0                                  # airplane part: outside the category, ignored
    logits[..., 12] = 1.0
    metric = segment.PartMIoU()
    scores = metric.update(logits, target, torch.full((20,), 4))
    assert torch.allclose(scores, torch.ones(20, dtype=torch.float64))  # 12 perfect, 13-15 absent from both
    logits[0, 0, 13] = 5.0                                # one point predicted as part 13, absent in target
    scores = segment.PartMIoU().cloud_scores(logits[:1], target[:1], torch.tensor([4]))
    assert scores.item() == pytest.approx((7 / 8 + 0 + 1 + 1) / 4)
    res = metric.compute()
    assert res["instance_miou"] == 1.0 and math.isnan(res["class_miou"]) and "airplane" in res["unseen"]


def test_partseg_model_shapes_layers_and_padding_normalisation():
    enc = A.PointEncoder(32, 6, 2, 2.0, (8, 16, 32), 16)
    model = segment.PartSegmenter(enc, upsample_dim=16, label_dim=8, head_dims=(16, 8))
    assert model.layers == (1, 3, 5)                      # the last block of each third; (3, 7, 11) of 12
    assert segment.PartSegmenter(A.PointEncoder(32, 12, 2, 2.0, (8, 16, 32), 16)).layers == (3, 7, 11)
    pts = torch.rand(2, 64, 3) * 4 + 1
    n = torch.tensor([64, 40])
    pts[1, 40:] = 0
    x = segment.normalize_with_padding(pts, n)
    real = x[1, :40]
    assert real.mean(0).abs().max() < 1e-5 and real.norm(dim=-1).max() == pytest.approx(1.0, abs=1e-6)
    centers, patches = segment.patchify_real(x, n, 8, 4, generator=torch.Generator().manual_seed(0))
    # centres and patch points come from the real rows only (official PatchifyPC runs before padding)
    gap = lambda q: (q[:, None] - real[None]).norm(dim=-1).min(1).values.max()
    assert gap(centers[1]) == 0 and gap((patches[1] + centers[1][:, None]).flatten(0, 1)) < 1e-6
    logits = model.eval()(x, centers, patches, torch.tensor([0, 4]))
    assert logits.shape == (2, 64, 50) and torch.isfinite(logits).all()


# ==============================================================================================
# data.py: archives, file formats, bad input, download, worker seeding
# ==============================================================================================

CUBE_V = [(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
CUBE_QUADS = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]


def cube_off(scale=1.0, glued_header=False, comments=False, crlf=False) -> str:
    """A cube as OFF with quad faces, optionally in ModelNet's odd spellings."""
    head = ["OFF8 6 0"] if glued_header else ["OFF", "8 6 0"]
    if comments:
        head = ["# made by a test", ""] + head[:1] + ["# counts next", ""] + head[1:]
    lines = head + [" ".join(str(scale * c) for c in v) for v in CUBE_V]
    lines += [("" if not comments else "\n") + "4 " + " ".join(map(str, q)) for q in CUBE_QUADS]
    return ("\r\n" if crlf else "\n").join(lines) + "\n"


def tri_off(vertices, faces) -> str:
    return "OFF\n%d %d 0\n" % (len(vertices), len(faces)) + "".join(
        " ".join(map(str, v)) + "\n" for v in vertices) + "".join("3 %d %d %d\n" % tuple(f) for f in faces)


def write_off_tree(base, files: dict):
    """files: {'<class>/<split>/<name>': text or bytes} under base/ModelNet40."""
    for rel, content in files.items():
        p = base / "ModelNet40" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return base / "ModelNet40"


def zip_tree(folder, zip_path):
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for d, _, names in os.walk(folder):
            for n in sorted(names):
                full = os.path.join(d, n)
                zf.write(full, os.path.relpath(full, os.path.dirname(folder)))
    return zip_path


def tiny_modelnet(tmp_path):
    files = {}
    for c, s in (("chair", 1.0), ("table", 2.0)):
        for split in ("train", "test"):
            for k in range(2):
                files[f"{c}/{split}/{c}_{k:04d}.off"] = cube_off(s * (1 + k), glued_header=(k == 1))
    return write_off_tree(tmp_path / "src", files)


# -- geometry ----------------------------------------------------------------------------------

def naive_fps_numpy(points, k, start):
    chosen = [start]
    for _ in range(1, k):
        best, best_d = None, -1.0
        for i, p in enumerate(points):
            d = min(float(((p - points[j]) ** 2).sum()) for j in chosen)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
    return np.array(chosen)


def test_fps_equals_naive_loop_and_batch_equals_single():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(3, 120, 3))
    for b in range(3):
        np.testing.assert_array_equal(data.farthest_point_sample(pts[b], 20, start=b), naive_fps_numpy(pts[b], 20, b))
    batched = data.farthest_point_sample(pts, 20, start=np.array([0, 1, 2]))
    for b in range(3):
        np.testing.assert_array_equal(batched[b], data.farthest_point_sample(pts[b], 20, start=b))
    assert len(set(batched[0])) == 20
    with pytest.raises(ValueError):
        data.farthest_point_sample(pts[0], 121)


def test_surface_sampling_is_area_weighted_and_on_surface():
    # two triangles in z=0 with areas 0.5 (x<1) and 1.5 (x>2): expect 25% / 75%
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0], [3, 0, 0], [2, 3, 0]], dtype=float)
    f = np.array([[0, 1, 2], [3, 4, 5]])
    pts = data.sample_surface(v, f, 20000, np.random.default_rng(0))
    assert pts.dtype == np.float32 and pts.shape == (20000, 3)
    assert np.all(pts[:, 2] == 0)
    left = pts[:, 0] < 1.5
    assert abs(left.mean() - 0.25) < 0.02
    # inside the first triangle: x, y >= 0 and x + y <= 1
    assert np.all(pts[left, :2] >= -1e-6) and np.all(pts[left].sum(1) <= 1 + 1e-5)


# -- OFF / OBJ parsing, quirks and bad inputs --------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"glued_header": True}, {"comments": True}, {"crlf": True},
                                {"glued_header": True, "comments": True, "crlf": True}])
def test_off_quirks_parse(kw):
    v, f = data.parse_off(cube_off(2.0, **kw), "cube.off")
    assert v.shape == (8, 3) and f.shape == (12, 3)          # 6 quads -> 12 triangles
    assert np.abs(v).max() == 2.0
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1).sum()
    assert area == pytest.approx(6 * 16)


@pytest.mark.parametrize("text, problem", [
    (tri_off([(0, 0, 0), (1, 0, 0), (0, 1, 0)], [(0, 1, 3)]), "face index 3 out of range"),
    (tri_off([(0, 0, 0), (1, 0, 0), (0, 1, 0)], [(0, -1, 2)]), "out of range"),
    (tri_off([(0, 0, 0), (1, "nan", 0), (0, 1, 0)], [(0, 1, 2)]), "non-finite"),
    (tri_off([(0, 0, 0), (1, "inf", 0), (0, 1, 0)], [(0, 1, 2)]), "non-finite"),
    ("OFF\n0 0 0\n", "empty mesh"),
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n", "truncated"),
    ("PLY\n3 1 0\n", "no 'OFF' header"),
    ("OFF\n3 1 0\n0 0 zero\n1 0 0\n0 1 0\n3 0 1 2\n", "unparsable"),
])
def test_bad_off_names_file_and_problem(text, problem):
    with pytest.raises(data.DataFileError, match=problem) as e:
        data.parse_off(text, "some/bad_0001.off")
    assert "some/bad_0001.off" in str(e.value)


def test_off_colour_columns_and_short_face_line():
    text = "OFF\n4 2 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n3 0 1 2 255 0 0\n3 0 2 3 0 255 0\n"
    v, f = data.parse_off(text, "c.off")
    np.testing.assert_array_equal(f, [[0, 1, 2], [0, 2, 3]])
    with pytest.raises(data.DataFileError, match="unparsable"):
        data.parse_off("OFF\n3 2 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n4 0 1\n", "short.off")


def test_obj_slashes_negative_indices_polygons():
    text = ("# obj\nmtllib x.mtl\no a\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvn 0 0 1\n"
            "f 1/1/1 2/1/1 3/1/1 4/1/1\n"          # quad with v/vt/vn
            "g b\nv 0 0 5\nv 1 0 5\nv 0 1 5\n"
            "f -3//1 -2//1 -1//1\n")               # negative = relative to vertices so far
    v, f = data.parse_obj(text, "m.obj")
    assert v.shape == (7, 3)
    np.testing.assert_array_equal(f, [[0, 1, 2], [0, 2, 3], [4, 5, 6]])
    with pytest.raises(data.DataFileError, match="out of range"):
        data.parse_obj("v 0 0 0\nv 1 0 0\nf 1 2 9\n", "m.obj")
    with pytest.raises(data.DataFileError, match="empty mesh"):
        data.parse_obj("# nothing\n", "m.obj")
    with pytest.raises(data.DataFileError, match="index 0"):
        data.parse_obj("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 0 1 2\n", "m.obj")
    flat = "v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n".encode()      # a valid mesh with zero area
    with pytest.raises(data.DataFileError, match=r"line\.obj: mesh has zero surface area"):
        data.load_cloud("line.obj", flat, 8, "fps", 0, None)


def test_point_files_npy_txt_xyz():
    arr = np.arange(60, dtype=np.float64).reshape(10, 6)
    buf = io.BytesIO()
    np.save(buf, arr)
    np.testing.assert_array_equal(data.read_points(buf.getvalue(), "a.npy"), arr[:, :3])
    txt = "\n".join(",".join(map(str, r)) for r in arr) + "\n\n"
    np.testing.assert_array_equal(data.read_points(txt.encode(), "a.txt"), arr[:, :3])
    xyz = "\n".join(" ".join(map(str, r[:3])) for r in arr)
    np.testing.assert_array_equal(data.read_points(xyz.encode(), "a.xyz"), arr[:, :3])
    buf = io.BytesIO()
    np.save(buf, np.zeros((10, 2)))
    with pytest.raises(data.DataFileError, match=r"a\.npy.*shape"):
        data.read_points(buf.getvalue(), "a.npy")
    with pytest.raises(data.DataFileError, match="non-finite"):
        data.read_points(b"1 2 nan\n", "b.xyz")


# An L-shaped hexagon in the plane z = 0, listed so that a fan around its first vertex (2, 1) covers
# the notch (1, 2] x (1, 2]; the (0, 1) vertex lies on the edge between its neighbours.
L_SHAPE = [(2, 1), (1, 1), (1, 2), (0, 2), (0, 1), (0, 0), (2, 0)]


def l_shape_in_3d(reverse=False):
    """The L in a tilted plane: (7, 3) vertices and the rotation that maps them back to z = 0."""
    rot = data.random_rotation(np.random.default_rng(3))
    flat = np.array([(x, y, 0.0) for x, y in (L_SHAPE[::-1] if reverse else L_SHAPE)])
    return flat @ rot.T + [5.0, -2.0, 1.0], rot


def triangle_area(v, f):
    return 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1).sum()


@pytest.mark.parametrize("fmt", ["off", "obj"])
@pytest.mark.parametrize("reverse", [False, True])
def test_non_convex_polygons_are_ear_clipped_in_their_plane(fmt, reverse):
    v, rot = l_shape_in_3d(reverse)
    rows = "".join(" ".join(f"{c:.17g}" for c in p) + "\n" for p in v)
    if fmt == "off":   # with a convex quad (a cube side) and a triangle beside the L
        text = f"OFF\n{len(v) + 4} 3 0\n{rows}" + "9 9 9\n9 10 9\n10 10 9\n10 9 9\n"
        text += "7 " + " ".join(map(str, range(7))) + "\n4 7 8 9 10\n3 7 8 9\n"
        v3, f = data.parse_off(text, "l.off")
    else:
        v3, f = data.parse_obj("".join("v " + ln for ln in rows.splitlines(True)) + "f 1 2 3 4 5 6 7\n", "l.obj")
    lmask = np.all(f < 7, axis=1)
    assert triangle_area(v3, f[lmask]) == pytest.approx(3.0)           # the L's area, no overlap
    pts = data.sample_surface(v3, f[lmask], 20000, np.random.default_rng(0))
    back = (pts - [5.0, -2.0, 1.0]) @ rot                                # into the plane z = 0 again
    assert np.abs(back[:, 2]).max() < 1e-4
    assert not np.any((back[:, 0] > 1 + 1e-4) & (back[:, 1] > 1 + 1e-4)), "samples in the notch"
    if fmt == "off":
        assert triangle_area(v3, f[~lmask]) == pytest.approx(1.5)       # convex quad + triangle: fans, as before


def test_polygon_that_crosses_itself_is_refused_with_its_face_number():
    bowtie = "OFF\n4 2 0\n0 0 0\n2 2 0\n2 0 0\n0 1 0\n3 0 2 3\n4 0 1 2 3\n"
    with pytest.raises(data.DataFileError, match=r"bow\.off: face 1 .*crosses itself"):
        data.parse_off(bowtie, "bow.off")
    square_bowtie = "v 0 0 0\nv 1 1 0\nv 1 0 0\nv 0 1 0\nf 1 2 3 4\n"      # zero net area
    with pytest.raises(data.DataFileError, match="crosses itself"):
        data.parse_obj(square_bowtie, "bow.obj")
    line = "v 0 0 0\nv 1 0 0\nv 2 0 0\nv 3 0 0\nf 1 2 3 4\nv 0 0 1\nv 1 0 1\nv 0 1 1\nf 5 6 7\n"
    v, f = data.parse_obj(line, "line.obj")                               # a polygon on a line: no area, no triangle
    np.testing.assert_array_equal(f, [[4, 5, 6]])


@pytest.mark.parametrize("header, vertex_extra", [("COFF", " 255 0 0 255"), ("NOFF", " 0 0 1"),
                                                  ("CNOFF", " 0 0 1 0.5 0.5 0.5 1.0"), ("OFF", "")])
def test_off_colour_and_normal_headers_and_float_face_colours(header, vertex_extra):
    text = (f"{header}\n4 2 0\n" + "".join(f"{x} {y} 0{vertex_extra}\n" for x, y in ((0, 0), (1, 0), (1, 1), (0, 1)))
            + "3 0 1 2 0.5 0.5 0.5 1.0\n3 0 2 3\n")
    v, f = data.parse_off(text, "c.off")
    np.testing.assert_array_equal(v[:, 2], 0)
    np.testing.assert_array_equal(v[:, :2], [[0, 0], [1, 0], [1, 1], [0, 1]])
    np.testing.assert_array_equal(f, [[0, 1, 2], [0, 2, 3]])


# -- ModelNet40: folder and zip, cache, point files, bad files, missing data, download ---------

def test_modelnet40_zip_and_folder_agree_and_cache(tmp_path, monkeypatch):
    folder = tiny_modelnet(tmp_path)
    zpath = zip_tree(folder, tmp_path / "ModelNet40.zip")
    a = data.build_dataset("modelnet40", str(folder), "train", num_points=64)
    b = data.build_dataset("modelnet40", str(zpath), "train", num_points=64)
    assert a.classes == b.classes == ["chair", "table"] and len(a) == 4
    np.testing.assert_array_equal(a.points, b.points)              # same samples from zip and folder
    x, y = a[2]
    assert x.dtype == torch.float32 and x.shape == (64, 3) and y == 1
    assert np.abs(a.points[0]).max() <= 1 + 1e-6 and np.abs(a.points[3]).max() > 2.5  # chair small, table 2x
    cache = tmp_path / "ModelNet40_cache"                          # next to the zip
    assert sorted(p.name for p in cache.iterdir()) == ["modelnet40_train_64pts_fps_seed0.json",
                                                       "modelnet40_train_64pts_fps_seed0.npy"]
    # the second build reads the cache: sampling is never called
    monkeypatch.setattr(data, "load_cloud", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    c = data.build_dataset("modelnet40", str(zpath), "train", num_points=64)
    np.testing.assert_array_equal(c.points, b.points)
    assert [c[i][1] for i in range(4)] == [0, 0, 1, 1]


def test_modelnet40_test_split_deterministic_and_seed_dependent(tmp_path):
    folder = tiny_modelnet(tmp_path)
    kw = dict(num_points=32, cache_dir=str(tmp_path / "c1"))
    a = data.build_dataset("modelnet40", str(folder), "test", **kw)
    b = data.build_dataset("modelnet40", str(folder), "test", num_points=32, cache_dir=str(tmp_path / "c2"))
    np.testing.assert_array_equal(a.points, b.points)
    c = data.build_dataset("modelnet40", str(folder), "test", num_points=32, seed=1, cache_dir=str(tmp_path / "c3"))
    assert not np.array_equal(a.points, c.points)
    full = data.build_dataset("modelnet40", str(folder), "test", cache_dir=str(tmp_path / "c4"))
    assert full.points.shape == (4, data.PRE_SAMPLE_POINTS, 3)   # num_points=None: 16384 mesh samples


def test_stale_cache_is_rebuilt(tmp_path):
    folder = tiny_modelnet(tmp_path)
    a = data.build_dataset("modelnet40", str(folder), "train", num_points=16)
    (folder / "chair/train/chair_0000.off").write_text(cube_off(7.0))
    b = data.build_dataset("modelnet40", str(folder), "train", num_points=16)
    assert np.abs(b.points[0]).max() == pytest.approx(7.0, rel=1e-5) != np.abs(a.points[0]).max()


def test_read_only_data_folder_caches_under_home(tmp_path, monkeypatch):
    folder = tiny_modelnet(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)        # as on a read-only mount
    with pytest.warns(UserWarning, match="cannot write the cache"):
        ds = data.build_dataset("modelnet40", str(folder), "train", num_points=8)
    assert len(ds) == 4 and list((tmp_path / "home" / ".cache" / "asymdsd").glob("*/modelnet40_train_8pts*.json"))


def test_point_file_tree_subsample_and_too_few(tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    for k in range(3):
        files[f"lamp/train/lamp_{k:04d}.npy"] = npy_bytes(rng.normal(size=(100, 6)).astype(np.float32))
    files["lamp/train/lamp_0003.txt"] = "\n".join(",".join(map(str, r)) for r in rng.normal(size=(100, 6)))
    folder = write_off_tree(tmp_path, files)
    full = data.build_dataset("modelnet40", str(folder), "train")
    assert full.points.shape == (4, 100, 3)
    ds = data.build_dataset("modelnet40", str(folder), "train", num_points=10)
    src = np.load(folder / "lamp/train/lamp_0000.npy")[:, :3]
    start = int(data.item_rng(0, "lamp/train/lamp_0000.npy").integers(100))
    np.testing.assert_array_equal(ds.points[0], src[data.farthest_point_sample(src, 10, start)])
    rnd = data.build_dataset("modelnet40", str(folder), "train", num_points=10, sampling="random")
    assert all(any(np.allclose(p, q) for q in src) for p in rnd.points[0])     # a subset of the file
    with pytest.raises(ValueError, match=r"lamp_0000\.npy: has 100 points, 500 were requested"):
        data.build_dataset("modelnet40", str(folder), "train", num_points=500)


def test_missing_folder_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download") as e:
        data.build_dataset("modelnet40", str(tmp_path / "nope"), "train")
    assert "ModelNet40.zip" in str(e.value) and data.MODELNET40_URL in str(e.value)
    with pytest.raises(FileNotFoundError, match="shapenet.org"):
        data.build_dataset("shapenet", str(tmp_path / "nope"), "train")
    with pytest.raises(FileNotFoundError, match="Point-BERT"):
        data.build_dataset("modelnet40_fewshot", str(tmp_path / "nope"), "train", way=5, shot=10, fold=0)
    with pytest.raises(FileNotFoundError, match="hkust-vgd.github.io/scanobjectnn"):
        data.build_dataset("scanobjectnn_pbt50rs", str(tmp_path / "nope"), "train")


def test_bad_files_raise_or_skip_with_warning_and_count(tmp_path, capsys):
    files = {f"cup/train/cup_{k:04d}.off": cube_off(1 + k) for k in range(3)}
    files["cup/train/cup_0003.off"] = tri_off([(0, 0, 0), (1, 0, 0), (0, 1, 0)], [(0, 1, 5)])
    files["cup/train/cup_0004.off"] = tri_off([(0, 0, 0), (1, "nan", 0), (0, 1, 0)], [(0, 1, 2)])
    files["cup/train/cup_0005.off"] = "OFF\n0 0 0\n"
    folder = write_off_tree(tmp_path, files)
    with pytest.raises(data.DataFileError, match=r"cup_0003\.off: face index 5 out of range"):
        data.build_dataset("modelnet40", str(folder), "train", num_points=8)
    assert not (tmp_path / "ModelNet40_cache" / "modelnet40_train_8pts_fps_seed0.json").exists()
    for attempt in range(2):                  # the second time from the cache: still reported
        with pytest.warns(UserWarning) as rec:
            ds = data.build_dataset("modelnet40", str(folder), "train", num_points=8, skip_bad=True)
        msgs = " | ".join(str(w.message) for w in rec)
        assert "cup_0003.off" in msgs and "cup_0004.off: non-finite" in msgs and "cup_0005.off: empty mesh" in msgs
        assert len(ds) == 3 and "skipped 3 bad file(s)" in capsys.readouterr().out
    # a cache built with skip_bad must not hide the bad files from a strict run
    with pytest.raises(data.DataFileError, match="cup_0003"):
        data.build_dataset("modelnet40", str(folder), "train", num_points=8)


def test_corrupt_zip_member_and_truncated_zip(tmp_path, capsys):
    folder = tiny_modelnet(tmp_path)
    zpath = zip_tree(folder, tmp_path / "ModelNet40.zip")
    raw = bytearray(zpath.read_bytes())
    with zipfile.ZipFile(zpath) as zf:
        info = zf.getinfo("ModelNet40/chair/train/chair_0001.off")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start:start + 8] = b"\x00" * 8       # damage the member's compressed data (CRC / inflate fails)
    bad = tmp_path / "bad" / "ModelNet40.zip"
    bad.parent.mkdir()
    bad.write_bytes(bytes(raw))
    with pytest.raises(data.DataFileError, match=r"chair_0001\.off: unreadable"):
        data.build_dataset("modelnet40", str(bad), "train", num_points=8)
    with pytest.warns(UserWarning, match="chair_0001.off"):
        ds = data.build_dataset("modelnet40", str(bad), "train", num_points=8, skip_bad=True)
    assert len(ds) == 3 and "skipped 1 bad file(s)" in capsys.readouterr().out
    cut = tmp_path / "cut" / "ModelNet40.zip"          # an interrupted copy: no central directory
    cut.parent.mkdir()
    cut.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(data.DataFileError, match="not a readable zip"):
        data.build_dataset("modelnet40", str(cut), "train")


def test_empty_and_truncated_point_files_are_named_and_skippable(tmp_path, capsys):
    rng = np.random.default_rng(0)
    files = {}
    for k in range(3):
        files[f"cup/train/cup_{k:04d}.npy"] = npy_bytes(rng.normal(size=(50, 3)).astype(np.float32))
    files["cup/train/cup_0003.npy"] = b""                                  # 0 bytes: an interrupted copy
    files["cup/train/cup_0004.npy"] = files["cup/train/cup_0000.npy"][:100]  # cut inside the data
    files["cup/train/cup_0005.txt"] = b""
    files["cup/train/cup_0006.xyz"] = b"1 2 3\n4 5"                         # cut inside a row
    folder = write_off_tree(tmp_path, files)
    with pytest.raises(data.DataFileError, match=r"cup_0003\.npy: .*empty.*skip.bad") as e:
        data.build_dataset("modelnet40", str(folder), "train", num_points=16)
    assert "\n" not in str(e.value)
    with pytest.warns(UserWarning) as rec:
        ds = data.build_dataset("modelnet40", str(folder), "train", num_points=16, skip_bad=True)
    msgs = " | ".join(str(w.message) for w in rec)
    assert all(f"cup_000{k}." in msgs for k in (3, 4, 5, 6))
    assert len(ds) == 3 and "skipped 4 bad file(s)" in capsys.readouterr().out


def test_truncated_or_stale_cache_is_rebuilt(tmp_path):
    folder = tiny_modelnet(tmp_path)
    cache = tmp_path / "c"
    first = data.build_dataset("modelnet40", str(folder), "train", num_points=16, cache_dir=str(cache))
    npy, meta = cache / "modelnet40_train_16pts_fps_seed0.npy", cache / "modelnet40_train_16pts_fps_seed0.json"
    whole = npy.read_bytes()
    np.save(tmp_path / "other.npy", np.zeros((4, 8, 3), np.float32))
    for damage in (lambda: npy.write_bytes(whole[: len(whole) - 40]),       # cut short
                   lambda: npy.write_bytes(b""),                             # emptied
                   lambda: npy.write_bytes((tmp_path / "other.npy").read_bytes()),   # another cache's file
                   lambda: meta.write_text(meta.read_text()[:20])):          # the json cut short
        damage()
        with pytest.warns(UserWarning, match=r"modelnet40_train_16pts_fps_seed0.*rebuilding"):
            again = data.build_dataset("modelnet40", str(folder), "train", num_points=16, cache_dir=str(cache))
        np.testing.assert_array_equal(again.points, first.points)
        assert npy.read_bytes() == whole


def test_pool_build_equals_serial_build(tmp_path):
    rng = np.random.default_rng(1)
    files = {}
    for k in range(70):                                   # > 64 files: the 2-process pool is used
        files[f"vase/train/vase_{k:04d}.npy"] = npy_bytes(rng.normal(size=(40, 3)).astype(np.float32))
    folder = write_off_tree(tmp_path, files)
    a = data.build_dataset("modelnet40", str(folder), "train", num_points=8, workers=2, cache_dir=str(tmp_path / "a"))
    b = data.build_dataset("modelnet40", str(folder), "train", num_points=8, workers=1, cache_dir=str(tmp_path / "b"))
    np.testing.assert_array_equal(a.points, b.points)
    assert a.files == b.files and len(a) == 70


class _Server:
    """http.server on 127.0.0.1 serving routes {path: (body, declared_length)}."""

    def __init__(self, routes):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body, length = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)            # fewer bytes than declared: the connection just closes
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_good_interrupted_and_corrupt(tmp_path):
    folder = tiny_modelnet(tmp_path)
    good = zip_tree(folder, tmp_path / "served.zip").read_bytes()
    server = _Server({"/ok.zip": (good, len(good)), "/short.zip": (good[:500], len(good)),
                      "/junk.zip": (b"x" * 1000, 1000)})
    try:
        root = tmp_path / "data" / "ModelNet40"
        for route, problem in (("/short.zip", "incomplete"), ("/junk.zip", "not a valid zip")):
            with pytest.raises(OSError, match=problem):
                data.build_modelnet40(str(root), "train", 8, download_missing=True, url=server.url + route)
            assert not (root / "ModelNet40.zip").exists() and not (root / "ModelNet40.zip.part").exists()
        root.mkdir(parents=True, exist_ok=True)
        (root / "ModelNet40.zip.part").write_bytes(good)  # a leftover .part is never taken for data
        with pytest.raises(FileNotFoundError):    # and without download=True nothing is fetched
            data.build_modelnet40(str(root), "train", 8, url=server.url + "/ok.zip")
        ds = data.build_modelnet40(str(root), "train", 8, download_missing=True, url=server.url + "/ok.zip")
        assert (root / "ModelNet40.zip").read_bytes() == good and len(ds) == 4
        again = data.build_modelnet40(str(root), "train", 8)        # now found next to its cache
        np.testing.assert_array_equal(again.points, ds.points)
    finally:
        server.close()


def test_download_via_build_dataset_uses_module_url(tmp_path, monkeypatch):
    folder = tiny_modelnet(tmp_path)
    good = zip_tree(folder, tmp_path / "served.zip").read_bytes()
    server = _Server({"/ModelNet40.zip": (good, len(good))})
    try:
        monkeypatch.setattr(data, "MODELNET40_URL", server.url + "/ModelNet40.zip")
        ds = data.build_dataset("modelnet40", str(tmp_path / "dl.zip"), "test", num_points=8, download=True)
        assert len(ds) == 4 and (tmp_path / "dl.zip").exists()
    finally:
        server.close()


def test_download_without_network_says_what_to_do(tmp_path):
    with socket.socket() as s:                       # a port nobody listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/ModelNet40.zip"
    root = tmp_path / "data" / "ModelNet40"
    with pytest.raises(FileNotFoundError) as e:
        data.build_modelnet40(str(root), "train", 8, download_missing=True, url=url)
    msg = str(e.value)
    assert "\n" not in msg and url in msg and str(root / "ModelNet40.zip") in msg and "by hand" in msg
    assert not root.exists(), "nothing is left behind"


# -- ShapeNet, ShapeNet-55, ScanObjectNN, few-shot ---------------------------------------------

def test_shapenet_zip_of_obj_is_z_up(tmp_path):
    root = tmp_path / "ShapeNetCore.v2"
    # a flat square at y = 5 (y is up in ShapeNet): after z-up all z must be 5
    obj = "v 0 5 0\nv 1 5 0\nv 1 5 1\nv 0 5 1\nf 1/1/1 2/2/2 3/3/3 4/4/4\n"
    for syn, model in (("02691156", "aaa"), ("02691156", "bbb"), ("03001627", "ccc")):
        p = root / syn / model / "models" / "model_normalized.obj"
        p.parent.mkdir(parents=True)
        p.write_text(obj)
        (p.parent / "model_normalized.mtl").write_text("newmtl x\n")
    zpath = zip_tree(root, tmp_path / "ShapeNetCore.v2.zip")
    import shutil
    shutil.rmtree(root)                                    # only the zip: found via root + '.zip'
    ds = data.build_dataset("shapenet", str(root), "train", num_points=32)
    assert len(ds) == 3 and ds.classes == ["02691156", "03001627"] and [ds[i][1] for i in range(3)] == [0, 0, 1]
    assert np.all(ds.points[:, :, 2] == 5) and ds.points[:, :, :2].std() > 0.1
    full = data.build_dataset("shapenet", str(zpath), "train")
    assert full.points.shape == (3, data.PRE_SAMPLE_POINTS, 3)
    with pytest.raises(ValueError, match="single split"):
        data.build_dataset("shapenet", str(zpath), "test")


def test_shapenet55_layout(tmp_path):
    top = tmp_path / "ShapeNet55-34"
    (top / "shapenet_pc").mkdir(parents=True)
    (top / "ShapeNet-55").mkdir()
    names = ["02691156-1a04e3eab45ca15dd86060f189eb133.npy", "03001627-1a6ad7a24bb89733f412783097373bdc.npy",
             "02691156-ffff.npy"]
    for k, n in enumerate(names):
        pts = np.zeros((64, 3), np.float32)
        pts[:, 1] = k                                  # y = k -> z after z-up
        pts[:, 0] = np.arange(64)
        np.save(top / "shapenet_pc" / n, pts)
    (top / "ShapeNet-55" / "train.txt").write_text(names[0] + "\n" + names[1] + "\n")
    (top / "ShapeNet-55" / "test.txt").write_text(names[2] + "\n")
    tr = data.build_dataset("shapenet55", str(tmp_path), "train")
    te = data.build_dataset("shapenet55", str(top), "test", num_points=16)
    assert tr.classes == ["02691156", "03001627"] and [tr[i][1] for i in range(2)] == [0, 1]
    assert np.all(tr.points[1, :, 2] == 1) and te.points.shape == (1, 16, 3) and np.all(te.points[0, :, 2] == 2)


def write_scanobjectnn(h5_dir, n=6, points=32):
    import h5py
    rng = np.random.default_rng(0)
    made = {}
    for folder, suffix in set(data.SCANOBJECTNN_FILES.values()):
        for prefix in ("training", "test"):
            p = h5_dir / folder / f"{prefix}_{suffix}"
            p.parent.mkdir(parents=True, exist_ok=True)
            pts = rng.normal(size=(n, points, 3)).astype(np.float32)
            lab = np.arange(n) % 15
            with h5py.File(p, "w") as h5:
                h5["data"], h5["label"] = pts, lab
            made[(folder, suffix, prefix)] = (pts, lab)
    return made


def test_scanobjectnn_variants_folder_and_zip(tmp_path):
    pytest.importorskip("h5py")
    made = write_scanobjectnn(tmp_path / "ScanObjectNN" / "h5_files")
    for name, (folder, suffix) in data.SCANOBJECTNN_FILES.items():
        for split, prefix in (("train", "training"), ("test", "test")):
            ds = data.build_dataset(name, str(tmp_path / "ScanObjectNN"), split)
            pts, lab = made[(folder, suffix, prefix)]
            np.testing.assert_array_equal(ds.points, pts[:, :, [2, 0, 1]])
            assert [ds[i][1] for i in range(len(ds))] == list(lab) and len(ds.classes) == 15
    zpath = zip_tree(tmp_path / "ScanObjectNN" / "h5_files", tmp_path / "h5_files.zip")
    ds = data.build_dataset("scanobjectnn_objonly", str(zpath), "test", num_points=8)
    assert ds.points.shape == (6, 8, 3)
    with pytest.raises(ValueError, match="has 32 points, 64 were requested"):
        data.build_dataset("scanobjectnn_objbg", str(zpath), "train", num_points=64)


def test_scanobjectnn_nan_sample_skipped_with_warning(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    p = tmp_path / "h5_files" / "main_split" / "training_objectdataset.h5"
    p.parent.mkdir(parents=True)
    pts = np.ones((3, 16, 3), np.float32)
    pts[1, 4, 0] = np.nan
    with h5py.File(p, "w") as h5:
        h5["data"], h5["label"] = pts, np.array([0, 1, 2])
    with pytest.raises(data.DataFileError, match=r"\[1\]: non-finite"):
        data.build_dataset("scanobjectnn_objbg", str(tmp_path), "train")
    with pytest.warns(UserWarning, match=r"\[1\]"):
        ds = data.build_dataset("scanobjectnn_objbg", str(tmp_path), "train", skip_bad=True)
    assert [ds[i][1] for i in range(len(ds))] == [0, 2] and "skipped 1" in capsys.readouterr().out


def test_scanobjectnn_without_h5py_still_says_where_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)          # as if h5py were not installed
    with pytest.raises(FileNotFoundError, match="hkust-vgd.github.io/scanobjectnn"):
        data.build_dataset("scanobjectnn_pbt50rs", str(tmp_path / "nope"), "train")
    h5 = tmp_path / "ScanObjectNN" / "h5_files" / "main_split" / "training_objectdataset.h5"
    h5.parent.mkdir(parents=True)
    h5.write_bytes(b"\x89HDF")
    with pytest.raises(ImportError, match="pip install h5py"):      # the data is there: then the package is named
        data.build_dataset("scanobjectnn_objbg", str(tmp_path / "ScanObjectNN"), "train")


def test_fewshot_pickle(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "ModelNetFewshot" / "5way10shot"
    d.mkdir(parents=True)
    origin = [3, 7, 11, 20, 39]
    fold = {s: [(rng.normal(size=(200, 6)).astype(np.float32), i % 5, origin[i % 5]) for i in range(10)]
            for s in ("train", "test")}
    fold["test"][0] = (fold["test"][0][0], [2], np.array([origin[2]]))   # list / array label forms
    with open(d / "3.pkl", "wb") as fh:
        pickle.dump(fold, fh)
    ds = data.build_fewshot(str(tmp_path / "ModelNetFewshot"), 5, 10, 3, "train", num_points=32)
    same = data.build_dataset("modelnet40_fewshot", str(tmp_path / "ModelNetFewshot"), "train", 32, way=5, shot=10, fold=3)
    np.testing.assert_array_equal(ds.points, same.points)
    assert ds.classes == ["bench", "car", "curtain", "laptop", "xbox"]   # MODELNET40_CLASSES[origin]
    src = fold["train"][4][0][:, [0, 2, 1]]                                # y <-> z
    start = int(data.item_rng(0, "5way10shot/3.pkl[train][4]").integers(200))   # seeded by a relative key
    np.testing.assert_array_equal(ds.points[4], src[data.farthest_point_sample(src, 32, start)])
    te = data.build_fewshot(str(tmp_path / "ModelNetFewshot"), 5, 10, 3, "test")
    assert te.points.shape == (10, 200, 3) and te[0][1] == 2


# -- ShapeNetPart: official layout as folder, zip and tar; z-up; padding; bad files -------------

def make_shapenetpart(root: Path, shapes: dict, splits: dict, extra: dict | None = None) -> Path:
    """A ShapeNetPart tree in the official layout under root/<benchmark dir>/. shapes: 'synset/id' ->
    (n, 7) array; splits: split -> ['synset/id', ...]; extra: member -> raw text (bad files)."""
    top = root / data.SHAPENETPART_DIR
    for key, rows in shapes.items():
        (top / key).parent.mkdir(parents=True, exist_ok=True)
        np.savetxt(top / f"{key}.txt", rows, fmt="%.6f")
    for member, text in (extra or {}).items():
        (top / member).parent.mkdir(parents=True, exist_ok=True)
        (top / member).write_text(text)
    (top / "train_test_split").mkdir(parents=True, exist_ok=True)
    (top / "synsetoffset2category.txt").write_text("Airplane\t02691156\nChair\t03001627\n")
    for split, keys in splits.items():
        (top / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(
            json.dumps([f"shape_data/{k}" for k in keys]))
    return top


def part_rows(n: int, part: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.zeros((n, 7), np.float32)
    rows[:, :3] = rng.normal(size=(n, 3))
    rows[:, 3:6] = 1.0
    rows[:, 6] = part
    return rows


def test_shapenetpart_reader_layout_zup_padding_and_archives(tmp_path):
    big, small = part_rows(3000, 1, seed=1), part_rows(100, 13, seed=2)
    big[:, 6] = np.arange(3000) % 4                       # airplane parts 0..3
    top = make_shapenetpart(tmp_path / "d", {"02691156/a1": big, "03001627/c1": small},
                            {"train": ["02691156/a1", "03001627/c1"], "val": ["03001627/c1"], "test": []})
    ds = data.build_shapenetpart(str(top), "train", num_points=2048, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 2 and list(ds.category) == [0, 4]
    pts, parts, n, cat = ds[1]
    assert n == 100 and pts.shape == (2048, 3) and parts.shape == (2048,) and cat == 4
    assert torch.equal(pts[100:], torch.zeros(1948, 3)) and (parts[100:] == 0).all() and (parts[:100] == 13).all()
    # z-up: stored (x, y, z) = file's (z, x, y), normals dropped
    np.testing.assert_allclose(pts[:100].numpy(), np.round(small[:, [2, 0, 1]], 6), atol=1e-6)
    pts, parts, n, _ = ds[0]                              # 3000 points: 2048 distinct ones, labels kept with them
    assert n == 2048 and len(np.unique(pts.numpy(), axis=0)) == 2048
    nearest = np.linalg.norm(pts.numpy()[:, None] - big[None, :, [2, 0, 1]], axis=-1).argmin(1)   # (2048,)
    assert len(np.unique(nearest)) == 2048 and np.array_equal(big[nearest, 6], parts.numpy())
    assert len(data.build_shapenetpart(str(top), "val", cache_dir=str(tmp_path / "cache"))) == 1
    # the zip and the tar of the same folder give the same clouds
    import tarfile
    shutil_make = __import__("shutil").make_archive
    zpath = shutil_make(str(tmp_path / "z" / data.SHAPENETPART_DIR), "zip", tmp_path / "d", data.SHAPENETPART_DIR)
    tpath = tmp_path / "t" / f"{data.SHAPENETPART_DIR}.tar"
    tpath.parent.mkdir()
    with tarfile.open(tpath, "w") as tar:
        tar.add(top, arcname=data.SHAPENETPART_DIR)
    for archive in (zpath, str(tpath)):
        other = data.build_shapenetpart(archive, "train", cache_dir=str(tmp_path / f"c{len(archive)}"))
        assert np.array_equal(other.points, ds.points) and np.array_equal(other.parts, ds.parts)
    with pytest.raises(FileNotFoundError, match="ShapeNetPart not found"):
        data.build_shapenetpart(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("text,problem", [("1 2 3 0 0 1\n", "expected 7 columns"), ("1 2 3 0 0 1 50\n", "part id 50"),
                                          ("", "empty file"), ("1 2 x 0 0 1 3\n", "not a table")])
def test_shapenetpart_bad_files_named_or_skipped(tmp_path, text, problem):
    top = make_shapenetpart(tmp_path, {"02691156/ok": part_rows(50, 2)}, {"train": ["02691156/ok", "02691156/bad"]},
                            extra={"02691156/bad.txt": text})
    with pytest.raises(data.DataFileError, match=re.escape("bad.txt") + ".*" + problem):
        data.build_shapenetpart(str(top), cache_dir=str(tmp_path / "c1"))
    with pytest.warns(UserWarning, match=problem):
        ds = data.build_shapenetpart(str(top), skip_bad=True, cache_dir=str(tmp_path / "c2"))
    assert len(ds) == 1


def test_partseg_command_on_bad_or_missing_data_ends_in_one_line(tmp_path):
    top = make_shapenetpart(tmp_path, {"02691156/ok": part_rows(50, 2)}, {"train": ["02691156/ok", "02691156/bad"]},
                            extra={"02691156/bad.txt": "1 2 3\n"})
    args = ["partseg", "--random-init", "--preset", "tiny", "--cache-dir", str(tmp_path / "c"), "--results",
            str(tmp_path / "r.jsonl"), "--data-root"]
    with pytest.raises(SystemExit, match=r"error: .*bad\.txt: expected 7 columns.*--skip-bad"):
        evaluate.main(args + [str(top)])
    with pytest.raises(SystemExit, match="error: ShapeNetPart not found"):
        evaluate.main(args + [str(tmp_path / "nowhere")])
    assert not (tmp_path / "r.jsonl").exists()


def test_shapenetpart_list_entry_without_file(tmp_path):
    top = make_shapenetpart(tmp_path, {"02691156/ok": part_rows(50, 2)}, {"train": ["02691156/ok", "02691156/gone"]})
    with pytest.raises(data.DataFileError, match="shuffled_train_file_list.json.*gone.*missing"):
        data.build_shapenetpart(str(top), cache_dir=str(tmp_path / "c"))


# -- procedural shapes and worker seeding ------------------------------------------------------

def test_shapes_deterministic_labels_and_splits():
    a = data.build_dataset("shapes", None, "train", num_points=128, num_shapes=40)
    b = data.build_dataset("shapes", "ignored", "train", num_points=128, num_shapes=40)
    np.testing.assert_array_equal(a.points, b.points)
    assert len(a) == 40 and a.points.shape == (40, 128, 3) and np.isfinite(a.points).all()
    labels = [a[i][1] for i in range(len(a))]
    assert set(labels) == set(range(len(a.classes))) and 8 <= len(a.classes) <= 10
    te = data.build_dataset("shapes", None, "test", num_points=128, num_shapes=40)
    assert not np.array_equal(a.points, te.points)
    other = data.build_dataset("shapes", None, "train", num_points=128, num_shapes=40, seed=1)
    assert not np.array_equal(a.points, other.points)
    # shape i does not depend on how many shapes are built
    np.testing.assert_array_equal(data.build_shapes("train", 128, 5).points, a.points[:5])
    default = data.build_dataset("shapes", None, "test")
    assert default.points.shape == (512, 1024, 3)
    # the plane is flat: its points have one near-zero principal extent
    plane = a.points[a.classes.index("plane")]
    assert np.linalg.svd(plane - plane.mean(0), compute_uv=False)[-1] < 1e-3


class _RngDataset(torch.utils.data.Dataset):
    """Holds a numpy Generator, as the official data transforms do."""

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return info.id, self.rng.random(), np.random.rand()


def _draws(worker_init_fn):
    loader = torch.utils.data.DataLoader(_RngDataset(), batch_size=None, num_workers=2,
                                         worker_init_fn=worker_init_fn)
    by_worker = {}
    for wid, g, n in loader:
        by_worker.setdefault(int(wid), []).append((float(g), float(n)))
    return by_worker


def test_seed_worker_gives_distinct_streams():
    plain = _draws(None)
    # the bug seed_worker fixes: a Generator copied into each worker yields the same stream
    assert [g for g, _ in plain[0]] == [g for g, _ in plain[1]]
    seeded = _draws(data.seed_worker)
    assert [g for g, _ in seeded[0]] != [g for g, _ in seeded[1]]
    assert [n for _, n in seeded[0]] != [n for _, n in seeded[1]]


# -- mixture: several sources, the trimesh mesh path, the streamed cache -----------------------

def write_mesh_sources(root: Path, n=3):
    """Synthetic trees: meshes/ (OBJ, OFF), objaverse/ (GLB meshes + one Cap3D-style .ply cloud).
    Every shape is an axis-aligned box of extents (1, 2, 3), so axis conventions can be read off."""
    trimesh = pytest.importorskip("trimesh")
    box = trimesh.creation.box(extents=(1, 2, 3))
    (root / "meshes" / "sub").mkdir(parents=True)
    (root / "objaverse" / "000-001").mkdir(parents=True)
    for i in range(n):
        (root / "meshes" / "sub" / f"m{i}.obj").write_text(box.export(file_type="obj"))
        (root / "meshes" / f"m{i}.off").write_text(box.export(file_type="off"))
        (root / "objaverse" / "000-001" / f"uid{i}.glb").write_bytes(box.export(file_type="glb"))
    cloud = trimesh.PointCloud(np.random.default_rng(0).uniform(-0.5, 0.5, (3000, 3)) * (1, 2, 3))
    (root / "objaverse" / "cap3d.ply").write_bytes(cloud.export(file_type="ply"))
    return root / "meshes", root / "objaverse"


def test_mixture_table_axes_and_source_labels(tmp_path, capsys):
    meshes, objav = write_mesh_sources(tmp_path)
    mn = write_modelnet_folder(tmp_path / "mn")
    mix = data.build_dataset("modelnet40+meshes+objaverse", f"{mn},{meshes},{objav}", num_points=256)
    table = capsys.readouterr().out
    assert len(mix) == 16 + 6 + 4
    for row in ("modelnet40", "meshes", "objaverse", "total"):
        assert row in table
    assert "61.5%" in table and "23.1%" in table and "15.4%" in table     # 16, 6, 4 of 26
    labels = [mix[i][1] for i in range(len(mix))]
    assert labels == [0] * 16 + [1] * 6 + [2] * 4
    ext = lambda p: (p.max(0).values - p.min(0).values).numpy()
    assert ext(mix[16][0]) == pytest.approx([1, 2, 3], abs=0.05)           # meshes: axes as stored
    for i in (22, 23, 24):                                                   # objaverse GLB: [2, 0, 1] (z-up)
        assert ext(mix[i][0]) == pytest.approx([3, 1, 2], abs=0.1), mix.files[i]
    assert ext(mix[25][0]) == pytest.approx([1, 2, 3], abs=0.1)              # Cap3D .ply: as stored (V2 builder)
    assert mix[0][0].shape == (256, 3) and "cap3d.ply" in mix.files[25]
    # the list-file form gives the same mixture; a missing root is named before any work
    lst = tmp_path / "sources.txt"
    lst.write_text(f"# name path\nmodelnet40 {mn}\nmeshes {meshes}\nobjaverse {objav}\n")
    again = data.build_dataset("mixture", str(lst), num_points=256)
    assert len(again) == len(mix) and torch.equal(again[20][0], mix[20][0])
    lst.write_text(f"meshes {meshes}\nobjaverse {tmp_path / 'nowhere'}\n")
    with pytest.raises(data.DataFileError, match="nowhere.*root of source objaverse does not exist"):
        data.build_dataset("mixture", str(lst), num_points=128)                # 128: no cache of meshes yet
    assert not list((tmp_path / "meshes_cache").glob("*128pts*"))
    with pytest.raises(data.DataFileError, match="2 sources .* 1 comma-separated"):
        data.build_dataset("meshes+objaverse", str(meshes), num_points=128)
    with pytest.raises(data.DataFileError, match="different sizes"):           # 300 stored vs 16384 sampled
        data.build_dataset("modelnet40+meshes", f"{mn},{meshes}")


def test_mixture_broken_mesh_named_or_skipped_and_counted(tmp_path, capsys):
    meshes, _ = write_mesh_sources(tmp_path)
    (meshes / "broken.glb").write_bytes(b"glTF not really")
    with pytest.raises(data.DataFileError, match="broken.glb.*not a readable GLB.*--skip-bad"):
        data.build_dataset("meshes", str(meshes), num_points=64)
    with pytest.warns(UserWarning, match="broken.glb"):
        ds = data.build_dataset("meshes", str(meshes), num_points=64, skip_bad=True)
    assert len(ds) == 6 and "meshes: skipped 1 bad file" in capsys.readouterr().out


def test_omniobject3d_reader_rows_axes_labels_and_bad_file(tmp_path):
    h5py = pytest.importorskip("h5py")
    folder = tmp_path / "OmniObject3D"
    folder.mkdir()
    box = (np.random.default_rng(0).uniform(-0.5, 0.5, (2, 512, 3)) * (1, 2, 3)).astype(np.float32)
    for name, rows in (("apple_0.hdf5", box), ("toy_car_1.hdf5", box[:1])):
        with h5py.File(folder / name, "w") as f:
            f["data"] = rows
    zip_tree(folder, tmp_path / "OmniObject3D.zip")
    ds = data.build_dataset("omniobject3d", str(tmp_path / "OmniObject3D.zip"), num_points=512)
    assert len(ds) == 3 and ds.classes == ["apple", "toy_car"] and ds.labels.tolist() == [0, 0, 1]
    p = ds[1][0].numpy()                                       # official: data[index][:, [2, 0, 1]]
    assert np.array_equal(p, box[1][:, [2, 0, 1]])
    assert data.build_dataset("omniobject3d", str(folder), num_points=256)[0][0].shape == (256, 3)
    (folder / "broken_2.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(data.DataFileError, match="broken_2.hdf5.*not an HDF5 file"):
        data.build_dataset("omniobject3d", str(folder), num_points=256)


def test_s3dis_objects_reader_drops_small_objects_and_names_bad_files(tmp_path):
    base = tmp_path / "Stanford3dDataset_v1.2"
    rng = np.random.default_rng(0)
    for area, obj, n in (("Area_1", "chair_1", 3000), ("Area_1", "table_2", 1000), ("Area_6", "sofa_1", 2500),
                         ("Area_7", "chair_9", 3000)):                         # Area_7 is not an S3DIS area
        d = base / area / "office_1" / "Annotations"
        d.mkdir(parents=True, exist_ok=True)
        rows = np.hstack([rng.uniform(0, 1, (n, 3)), rng.integers(0, 255, (n, 3))])
        np.savetxt(d / f"{obj}.txt", rows, fmt="%.6f")
    (base / "Area_1" / "office_1" / "office_1.txt").write_text("1 2 3 4 5 6\n")   # the room, not an object
    zip_tree(base, tmp_path / "s3dis.zip")
    ds = data.build_dataset("s3dis_objects", str(tmp_path / "s3dis.zip"))
    assert len(ds) == 2 and ds.points.shape[1:] == (2048, 3)               # table_2 (1000 < 2048) left out
    assert [f.split("/")[-1] for f in ds.files] == ["chair_1.txt", "sofa_1.txt"]
    src = np.loadtxt(base / "Area_1" / "office_1" / "Annotations" / "chair_1.txt")[:, :3]
    assert np.isin(ds.points[0][:, 0], src[:, 0].astype(np.float32)).all()   # xyz as stored, a subset
    (base / "Area_1" / "office_1" / "Annotations" / "door_1.txt").write_text("1 2 x\n")
    with pytest.raises(data.DataFileError, match="door_1.txt: not rows of numbers"):
        data.build_dataset("s3dis_objects", str(base))


def _extent(points):
    points = np.asarray(points)
    return points.max(0) - points.min(0)


def write_official_mesh_layouts(root: Path):
    """Tiny trees in the layouts the official builders read (box meshes of extents (1, 2, 3)):
    ScannedObjects/<object>.zip with meshes/model.obj (one zip without it); toys4k_obj_files.zip with
    toys4k_obj_files/<category>/<object>/mesh.obj; 3D-Future/3D-FUTURE-model-part{1,2}.zip with
    <part>/<model id>/normalized_model.obj beside raw_model.obj and a __MACOSX copy; ABO/abo-3dmodels.tar
    with 3dmodels/original/<x>/<id>.glb."""
    import tarfile
    trimesh = pytest.importorskip("trimesh")
    box = trimesh.creation.box(extents=(1, 2, 3))
    obj, glb = box.export(file_type="obj"), box.export(file_type="glb")
    (root / "ScannedObjects").mkdir()
    for name in ("Bowl_A", "Shoe_B"):
        with zipfile.ZipFile(root / "ScannedObjects" / f"{name}.zip", "w") as z:
            z.writestr("meshes/model.obj", obj)
            z.writestr("meshes/model.mtl", "newmtl material_0\n")
            z.writestr("materials/textures/texture.png", b"\x89PNG")
            z.writestr("model.sdf", "<sdf/>")
    with zipfile.ZipFile(root / "ScannedObjects" / "Empty_C.zip", "w") as z:
        z.writestr("model.sdf", "<sdf/>")                                    # no meshes/model.obj: bad
    (root / "ScannedObjects" / "Broken_D.zip").write_bytes(b"PK cut short")      # not a zip: bad
    with zipfile.ZipFile(root / "toys4k_obj_files.zip", "w") as z:
        for cat, name in (("airplane", "airplane_000"), ("cup", "cup_012")):
            z.writestr(f"toys4k_obj_files/{cat}/{name}/mesh.obj", obj)
            z.writestr(f"toys4k_obj_files/{cat}/{name}/mesh.mtl", "")
    (root / "3D-Future").mkdir()
    for part, ids in ((1, ("0a1b", "0c2d")), (2, ("ff00",))):
        with zipfile.ZipFile(root / "3D-Future" / f"3D-FUTURE-model-part{part}.zip", "w") as z:
            for i in ids:
                z.writestr(f"3D-FUTURE-model-part{part}/{i}/normalized_model.obj", obj)
                z.writestr(f"3D-FUTURE-model-part{part}/{i}/raw_model.obj", obj)      # not read (official)
                z.writestr(f"__MACOSX/3D-FUTURE-model-part{part}/{i}/._normalized_model.obj", b"\0")
            if part == 1:
                z.writestr("3D-FUTURE-model-part1/model_info.json", json.dumps([{"model_id": i} for i in ids]))
    (root / "ABO").mkdir()
    with tarfile.open(root / "ABO" / "abo-3dmodels.tar", "w") as tar:
        for i, name in enumerate(("B01LR5RSG0", "B07B4YH3TS", "B075X4N3JJ")):
            info = tarfile.TarInfo(f"3dmodels/original/{i}/{name}.glb")
            info.size = len(glb)
            tar.addfile(info, io.BytesIO(glb))
    return root


@pytest.mark.parametrize("source, root, count, axes", [
    ("scannedobjects", "ScannedObjects", 2, (1, 2, 3)),          # official ScannedObjectsBuilder: as stored
    ("toys4k", "toys4k_obj_files.zip", 2, (3, 1, 2)),            # official Toys4KBuilder: [2, 0, 1]
    ("3dfuture", "3D-Future", 3, (3, 1, 2)),                     # official Future3DBuilder: [2, 0, 1]
    ("abo", "ABO", 3, (3, 1, 2)),                                # official ABOBuilder: [2, 0, 1]
])
def test_mesh_sources_read_their_official_layouts(tmp_path, source, root, count, axes):
    write_official_mesh_layouts(tmp_path)
    skip_bad = source == "scannedobjects"
    if skip_bad:                                                 # a broken zip, a zip without meshes/model.obj
        with pytest.raises(data.DataFileError, match="Broken_D.zip: not a readable zip archive.*--skip-bad"):
            data.build_dataset(source, str(tmp_path / root))
        with pytest.warns(UserWarning) as caught:
            ds = data.build_dataset(source, str(tmp_path / root), skip_bad=True)
        names = [str(w.message) for w in caught]
        assert len(names) == 2 and "Broken_D.zip: not a readable zip" in names[0] and "Empty_C.zip:" in names[1]
        (tmp_path / root / "Broken_D.zip").unlink()
        with pytest.raises(data.DataFileError, match="Empty_C.zip:meshes/model.obj: missing from the archive"):
            data.build_dataset(source, str(tmp_path / root), num_points=64)
    else:
        ds = data.build_dataset(source, str(tmp_path / root))
    assert len(ds) == count and ds.points.shape[1:] == (16384, 3)    # official num_pre_sample_points
    for p in ds.points:
        assert _extent(p) == pytest.approx(axes, abs=0.02)
    assert not any("raw_model" in f or "__MACOSX" in f or f.endswith(".mtl") for f in ds.files), ds.files


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_source_files_hold_one_archive_open_at_a_time(tmp_path):
    """A Google Scanned Objects download is about 1000 zips: listing and reading them must not keep
    one file handle per zip open (the default limit is 1024)."""
    for i in range(40):
        with zipfile.ZipFile(tmp_path / f"object_{i:02d}.zip", "w") as z:
            z.writestr("meshes/model.obj", f"v {i} 0 0\n")
    before = len(os.listdir("/proc/self/fd"))
    files = data.SourceFiles(str(tmp_path), ("meshes/model.obj",), "meshes/model.obj")
    assert len(files.keys) == 40 and len(os.listdir("/proc/self/fd")) <= before + 1
    assert [files.read(k) for k in files.keys] == [f"v {i} 0 0\n".encode() for i in range(40)]
    assert len(os.listdir("/proc/self/fd")) <= before + 2


def test_objaverse_cap3d_zips_read_in_place_and_the_official_point_rule(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    rng = np.random.default_rng(0)
    cloud = lambda k: rng.uniform(-0.5, 0.5, (k, 3)) * (1, 2, 3)
    nan = cloud(3000)
    nan[5] = np.nan
    few_unique = np.repeat(cloud(100), 30, axis=0)                     # 3000 points, 100 distinct
    clouds = {"uid_ok": cloud(3000), "uid_small": cloud(2500), "uid_few": cloud(1500), "uid_nan": nan,
              "uid_dup": few_unique}
    zips = tmp_path / "objaverse" / "PointCloud_zips"
    zips.mkdir(parents=True)
    with zipfile.ZipFile(zips / "compressed_pcs_00.zip", "w") as z:   # the Cap3D layout, read without unpacking
        for uid, pts in clouds.items():
            z.writestr(f"Cap3D_pcs/{uid}.ply", trimesh.PointCloud(pts, process=False).export(file_type="ply"))
    ds = data.build_dataset("objaverse", str(tmp_path / "objaverse"), num_points=2048)
    kept = [f.split("/")[-1] for f in ds.files]
    assert kept == ["uid_ok.ply", "uid_small.ply"], kept              # < 2048 points, NaN, < 2048 unique: left out
    assert all(":Cap3D_pcs/" in f and "compressed_pcs_00.zip" in f for f in ds.files)
    assert _extent(ds.points[0]) == pytest.approx([1, 2, 3], abs=0.05)   # Cap3D: as stored
    (tmp_path / "objaverse" / "lvis-annotations.json").write_text(json.dumps({"mug": ["uid_ok", "uid_small", "uid_nan"]}))
    lvis = data.build_dataset("objaverse_lvis", str(tmp_path / "objaverse"), "test", shot=1)   # uids inside the zip
    assert len(lvis) == 1 and lvis.classes == ["mug"] and lvis.points.shape[1:] == (1024, 3)
    big = data.build_dataset("objaverse", str(tmp_path / "objaverse"), num_points=4096)
    row = big.points[1]                                                # 2500 points: the rest drawn again
    assert row.shape == (4096, 3) and len(np.unique(row, axis=0)) == 2500
    assert np.isin(row[:, 0], clouds["uid_small"][:, 0].astype(np.float32)).all()
    # the official unique-point rule itself: tolerance 1e-6 x the largest extent, counted as np.unique does
    for pts in (cloud(5000), few_unique, np.round(cloud(3000), 2), cloud(3000) * (1, 1e-7, 1) + 100):
        pts = pts.astype(np.float32)
        tol = float(np.max(pts.max(0) - pts.min(0))) * 1e-6
        assert data.distinct_rounded(pts, tol) == len(np.unique(np.round(pts / tol) * tol, axis=0))
    flat = np.zeros((4000, 3), np.float32)
    flat[:, 0] = np.arange(4000) * 1e-3
    assert data.objaverse_rule(flat, rng) is not None
    flat[:, 0] = np.arange(4000) % 2000 * 1e-3                         # 2000 distinct positions
    assert data.objaverse_rule(flat, rng) is None
    assert data.objaverse_rule(np.zeros((4000, 3), np.float32), rng) is None   # zero extent
    assert len(data.objaverse_rule(cloud(20000).astype(np.float32), rng)) == 16384


def test_sunrgbd_depth_points_decoding_axes_and_tilt():
    """official rgbd_to_pc: PNG value rotated right by 3 bits = mm, capped at 8 m, 0 = no depth;
    pixel (x, y) at d -> ((x - cx) d / fx, d, -(y - cy) d / fy), then Rtilt applied."""
    Image = pytest.importorskip("PIL.Image")
    mm = np.array([[1000, 0], [9000, 2500]], np.uint16)
    raw = ((mm.astype(np.uint32) << 3 | mm >> 13) & 0xFFFF).astype(np.uint16)      # 9000 mm sets a low bit
    png = io.BytesIO()
    Image.fromarray(raw).save(png, format="PNG")
    K = np.array([[2.0, 0, 0.5], [0, 4.0, 0.5], [0, 0, 1]])
    tilt = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])                         # 90 degrees about z
    got = data.sunrgbd_depth_points(png.getvalue(), K, tilt, "d.png")
    want = [(x, y, min(mm[y, x] / 1000, 8.0)) for y in range(2) for x in range(2) if mm[y, x]]
    want = np.array([tilt @ ((x - 0.5) * d / 2, d, -(y - 0.5) * d / 4) for x, y, d in want])
    assert np.allclose(got, want, atol=1e-6)
    with pytest.raises(data.DataFileError, match="d.png: not a readable PNG"):
        data.sunrgbd_depth_points(b"nope", K, tilt, "d.png")


def test_sunrgbd_objects_cut_by_boxes_axes_counts_and_bad_files(tmp_path):
    pytest.importorskip("scipy")
    Image = pytest.importorskip("PIL.Image")
    import scipy.io
    root = tmp_path / "SUNRGBD"
    root.mkdir()
    # two 128 x 192 px frames (fx = fy = 100, centre (96, 64)): upper half at 2 m, lower half at 3 m
    H, W = 128, 192
    mm = np.full((H, W), 2000, np.uint16)
    mm[H // 2:] = 3000
    mm[0] = 0                                                          # row 0 has no depth
    png = io.BytesIO()
    Image.fromarray(mm << 3).save(png, format="PNG")                   # SUN RGB-D stores mm << 3
    K = np.array([[100.0, 0, 96], [0, 100, 64], [0, 0, 1]])
    box = lambda c, h: (np.array([c], float), np.array([h], float))
    up = box((0, 2, 0.4), (0.81, -0.1, 0.31))   # upper half at 2 m: 81 x 31 = 2511 points (|coeffs| used)
    frames = [("kv1/NYUdata/NYU0001", [up, box((0, 3, -0.4), (0.21, 0.1, 0.21)),   # 15 x 15 = 225 points
                                       box((0, 2, -0.4), (0.81, 0.1, 0.31))]),      # lower half is at 3 m: none
              ("kv1/NYUdata/NYU0002", [up]),                                       # a test frame
              ("kv1/NYUdata/NYU0003", [])]                                         # no boxes
    meta = np.empty((1, 3), [("sequenceName", "O"), ("depthpath", "O"), ("K", "O"), ("Rtilt", "O"),
                             ("groundtruth3DBB", "O")])
    for i, (seq, boxes) in enumerate(frames):
        bb = np.empty((1, len(boxes)), [("centroid", "O"), ("coeffs", "O")])
        for j, b in enumerate(boxes):
            bb[0, j] = b
        meta[0, i] = (f"SUNRGBD/{seq}", f"/n/fs/sun3d/data/SUNRGBD/{seq}/depth_bfx/{seq[-7:]}.png", K, np.eye(3),
                      bb if boxes else np.zeros((0, 0)))
    scipy.io.savemat(root / "SUNRGBDMeta3DBB_v2.mat", {"SUNRGBDMeta": meta})
    cell = lambda seqs: np.array([[f"/n/fs/sun3d/data/SUNRGBD/kv1/NYUdata/{s}" for s in seqs]], dtype=object)
    split = io.BytesIO()
    scipy.io.savemat(split, {"alltrain": cell(["NYU0001", "NYU0003"]), "alltest": cell(["NYU0002"])})
    with zipfile.ZipFile(root / "SUNRGBDtoolbox.zip", "w") as z:
        z.writestr("SUNRGBDtoolbox/traintestSUNRGBD/allsplit.mat", split.getvalue())
    with zipfile.ZipFile(root / "SUNRGBD.zip", "w") as z:
        for seq, _ in frames[:2]:
            z.writestr(f"SUNRGBD/{seq}/depth_bfx/{seq[-7:]}.png", png.getvalue())

    ds = data.build_dataset("sunrgbd_objects", str(root))
    assert ds.files == ["kv1_NYUdata_NYU0001_0"] and ds.points.shape == (1, 2048, 3)   # under 2048: left out
    p = ds.points[0]                                  # (x, depth, up): the upper image half is z > 0
    assert np.allclose(p[:, 1], 2) and p[:, 2].min() >= 0.1 - 1e-6 and p[:, 2].max() <= 0.7 + 1e-6
    assert _extent(p)[0] == pytest.approx(1.6, abs=1e-5)
    assert len(data.build_dataset("sunrgbd_objects", str(root), num_points=2511)) == 1    # every point of the box
    with pytest.raises(data.DataFileError, match="no readable shapes"):                  # 2512 > 2511: left out
        data.build_dataset("sunrgbd_objects", str(root), num_points=2512)
    with zipfile.ZipFile(root / "SUNRGBD.zip") as z:                                     # SUNRGBD.zip extracted
        z.extractall(root)
    (root / "SUNRGBD.zip").rename(tmp_path / "frames.zip")
    assert np.array_equal(data.build_dataset("sunrgbd_objects", str(root)).points, ds.points)
    (tmp_path / "frames.zip").rename(root / "SUNRGBD.zip")
    meshes, _ = write_mesh_sources(tmp_path)                                             # a Mixture source
    mix = data.build_dataset("sunrgbd_objects+meshes", f"{root},{meshes}", num_points=2048)
    assert len(mix) == 1 + 6 and mix.files[0] == "sunrgbd_objects: kv1_NYUdata_NYU0001_0"
    with zipfile.ZipFile(root / "SUNRGBD.zip", "a") as z:                                # a damaged depth map
        z.writestr("SUNRGBD/kv1/NYUdata/NYU0003/depth_bfx/NYU0003.png", b"not a png")
    meta[0, 2]["groundtruth3DBB"] = np.array([[up]], [("centroid", "O"), ("coeffs", "O")])
    scipy.io.savemat(root / "SUNRGBDMeta3DBB_v2.mat", {"SUNRGBDMeta": meta})
    with pytest.raises(data.DataFileError, match="NYU0003.png: not a readable PNG depth map"):
        data.build_dataset("sunrgbd_objects", str(root))
    with pytest.warns(UserWarning, match="NYU0003.png"):
        assert len(data.build_dataset("sunrgbd_objects", str(root), skip_bad=True)) == 1
    (root / "SUNRGBDtoolbox.zip").rename(tmp_path / "elsewhere.zip")
    with pytest.raises(data.DataFileError, match="SUNRGBDtoolbox.zip: missing"):
        data.build_dataset("sunrgbd_objects", str(root))


def test_mixture_keeps_every_source_memory_mapped(tmp_path):
    """ModelNet40's small cache and ScanObjectNN's h5 rows, in RAM when read alone, are memory-mapped
    .npy files inside a mixture, with the same clouds."""
    pytest.importorskip("h5py")
    write_scanobjectnn(tmp_path / "ScanObjectNN" / "h5_files", points=64)
    mn = write_modelnet_folder(tmp_path / "mn")
    alone = [data.build_dataset("modelnet40", str(mn), num_points=64),
             data.build_dataset("scanobjectnn_objbg", str(tmp_path / "ScanObjectNN"))]
    assert not any(isinstance(ds.points, np.memmap) for ds in alone)
    mix = data.build_dataset("modelnet40+scanobjectnn_objbg", f"{mn},{tmp_path / 'ScanObjectNN'}", num_points=64)
    for (_, _, ds), ref in zip(mix.sources, alone):
        assert isinstance(ds.points, np.memmap) and np.array_equal(ds.points, ref.points)
        assert ds.labels.tolist() == ref.labels.tolist()
    assert list((tmp_path / "ScanObjectNN_cache").glob("scanobjectnn_objbg_64pts_*.npy"))


def _clouds(n_points):
    return lambda key: np.full((n_points, 3), float(key), np.float32)


def test_stream_cache_resumes_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_PROGRESS_EVERY", 4)
    keys, calls = [str(i) for i in range(10)], []

    def flaky(key):
        calls.append(key)
        if key == "7" and len(calls) == 8:
            raise KeyboardInterrupt                       # Ctrl-C while shape 7 is being sampled
        return _clouds(8)(key)

    with pytest.raises(KeyboardInterrupt):
        data.stream_cache(str(tmp_path / "c.npy"), keys, flaky, 8, False, "toy")
    assert json.load(open(tmp_path / "c.npy.progress.json"))["next"] == 7
    calls.clear()
    out, bad = data.stream_cache(str(tmp_path / "c.npy"), keys, flaky, 8, False, "toy")
    assert calls == ["7", "8", "9"]                       # only what was left
    assert bad == [] and isinstance(out, np.memmap) and out[:, 0, 0].tolist() == list(range(10))
    calls.clear()
    assert data.stream_cache(str(tmp_path / "c.npy"), keys, flaky, 8, False, "toy")[0].shape == (10, 8, 3)
    assert calls == [] and not (tmp_path / "c.npy.progress.json").exists()


def test_stream_cache_memory_stays_flat_as_shapes_grow_tenfold(tmp_path):
    import tracemalloc
    peaks = {}
    for n in (50, 500):
        keys = [str(i) for i in range(n)]
        tracemalloc.start()
        out, _ = data.stream_cache(str(tmp_path / f"c{n}.npy"), keys, _clouds(1024), 1024, False, "toy")
        ds = data.MixtureDataset([("toy", "-", data.PointCloudDataset(out, np.zeros(n), ["toy"], "toy"))])
        assert ds[n - 1][0][0, 0] == n - 1
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    total = 500 * 1024 * 3 * 4                                # 6 MB of points in the bigger cache
    assert peaks[500] < total / 10, peaks
    assert peaks[500] < 1.5 * peaks[50] + 64_000, peaks       # flat: not ten times more


def _build_toy_cache(path, queue):
    calls = []

    def load(k):
        calls.append(k)
        return np.full((64, 3), float(k), np.float32)

    out, _ = data.stream_cache(path, [str(i) for i in range(300)], load, 64, False, "toy")
    queue.put((len(calls), float(out[:, 0, 0].sum())))


def test_stream_cache_two_processes_build_it_once(tmp_path):
    """torchrun ranks ask for the same cache at once: one builds it, the other waits and reads it."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_toy_cache, args=(str(tmp_path / "c.npy"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    outs = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert outs == [(0, float(sum(range(300)))), (300, float(sum(range(300))))]


def test_pretraining_on_a_three_source_mixture(tmp_path):
    meshes, objav = write_mesh_sources(tmp_path)
    mn = write_modelnet_folder(tmp_path / "mn")
    args = cli(f"{mn},{meshes},{objav}", tmp_path / "run", "--max-steps", "3", source_points=256)
    args[args.index("modelnet40")] = "modelnet40+meshes+objaverse"
    A.main(args)
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)


# ==============================================================================================
# evaluate.py: features, SVM/kNN, fine-tuning, checkpoints, few-shot
# ==============================================================================================

TINY = dict(dim=32, depth=2, num_heads=2, mlp_ratio=2.0, tokenizer_dims=(16, 16, 32), pos_hidden=16)

# The released checkpoints' format: Lightning files written by the official training at tiny sizes (width 32,
# 2 heads, 2 layers), one per release: AsymDSD-S, -S-CLS (no predictor, patch heads), -S-MPM (no CLS), -B.
RELEASED = {"S": ("cls_mask", True, (16, 32, 64)), "S-CLS": ("cls", True, (16, 32, 64)),
            "S-MPM": ("mask", False, (16, 32, 64)), "B": ("cls_mask", True, ((16, 32, 64), (128,)))}


@pytest.mark.parametrize("name", sorted(RELEASED))
@pytest.mark.parametrize("fallback", [False, True])   # True: the restricted unpickler torch 2.3 uses
def test_released_checkpoint_format_loads(name, fallback, capsys, monkeypatch):
    path = OFFICIAL_FIXTURES / f"official_tiny_{name}.ckpt"
    if not path.exists():
        pytest.skip(f"official fixture {path.name} not found in {path.parent}")
    if fallback:
        original = A.load_allowlisted
        monkeypatch.setattr(A, "load_allowlisted", lambda p: original(p, fallback=True))
    mode, has_cls, dims = RELEASED[name]
    encoder, info = evaluate.load_encoder(str(path))
    out = capsys.readouterr().out
    assert f"training mode {mode}" in out and "width 32, 2 heads, 2 layers" in out
    assert info["sizes"]["tokenizer_dims"] == dims and (encoder.cls_token is not None) == has_cls
    assert info["num_patches"] == 64 and info["patch_size"] == 32
    state = A.load_allowlisted(str(path))["state_dict"]
    assert torch.equal(encoder.encoder.norm.weight, state["teacher.point_encoder.encoder.norm.weight"])
    x = encoder(torch.randn(2, 8, 32, 3), torch.randn(2, 8, 3))
    assert x.shape == (2, 8 + has_cls, 32) and torch.isfinite(x).all()
    with pytest.raises(SystemExit, match="--num-heads 4 contradicts the file, which was trained with 2 heads"):
        evaluate.load_encoder(str(path), num_heads=4)


@needs_official(OFFICIAL_TINY_S_CKPT)
def test_released_checkpoint_truncated_or_foreign_is_refused(tmp_path):
    data = OFFICIAL_TINY_S_CKPT.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="cut.ckpt is not a readable torch checkpoint"):
        evaluate.load_encoder(str(tmp_path / "cut.ckpt"))


@pytest.mark.parametrize("fallback", [False, True])
def test_checkpoint_with_a_global_off_the_list_is_refused(tmp_path, fallback):
    import fractions
    torch.save({"state_dict": {}, "hyper_parameters": {"x": fractions.Fraction(1, 3)}}, tmp_path / "f.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="fractions.Fraction"):
        A.load_allowlisted(str(tmp_path / "f.ckpt"), fallback=fallback)
    with pytest.raises(SystemExit, match="refused: its pickle asks for fractions.Fraction"):
        evaluate.load_encoder(str(tmp_path / "f.ckpt"))


def tiny_encoder(seed=0, **kw):
    torch.manual_seed(seed)
    enc = A.PointEncoder(**{**TINY, **kw})
    for p in enc.parameters():   # default init leaves norms at 1 and the CLS at 0: randomise everything
        p.data.normal_(0, 0.3)
    return enc.eval()


def toy_clouds(n, num_points=128, seed=0):
    """Two easily told apart classes: points on a sphere (0) and on a flat square (1)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    sphere = torch.nn.functional.normalize(torch.randn(n, num_points, 3, generator=g), dim=-1)
    square = torch.rand(n, num_points, 3, generator=g) * 2 - 1
    square[..., 2] = 0.01 * square[..., 2]
    points = torch.where(labels[:, None, None] == 0, sphere, square)
    return [(points[i], int(labels[i])) for i in range(n)]


class ListDataset(list):
    classes = ["sphere", "square"]


# -- features ----------------------------------------------------------------------------------

def test_features_shape_and_unit_norm():
    data = toy_clouds(10)
    x, y = evaluate.extract_features(tiny_encoder(), data, num_patches=8, patch_size=8, batch_size=4)
    assert x.shape == (10, 2 * TINY["dim"]) and y.tolist() == [i % 2 for i in range(10)]
    assert torch.allclose(x.norm(dim=1), torch.ones(10), atol=1e-5)
    # no CLS token (MPM-only model): the mean of the patch tokens alone
    x, _ = evaluate.extract_features(tiny_encoder(cls_token=False), data, 8, 8, batch_size=4)
    assert x.shape == (10, TINY["dim"])


def test_pool_features_parts_and_cls_in_pools():
    x = torch.randn(3, 5, 4)                                   # CLS + 4 patch tokens
    out = evaluate.pool_features(x, ("cls", "mean", "max"))
    assert torch.equal(out, torch.cat([x[:, 0], x[:, 1:].mean(1), x[:, 1:].amax(1)], -1))
    out = evaluate.pool_features(x, ("mean", "max"), cls_in_pools=True)   # few-shot: CLS inside the pools
    assert torch.equal(out, torch.cat([x.mean(1), x.amax(1)], -1))
    with pytest.raises(ValueError, match="no CLS token"):
        evaluate.pool_features(x, ("cls",), has_cls=False)


def test_eval_patches_deterministic_start():
    pts = torch.randn(2, 64, 3)
    c1, p1 = evaluate.eval_patches(pts, 8, 4)
    c2, p2 = evaluate.eval_patches(pts, 8, 4)
    assert torch.equal(c1, c2) and torch.equal(p1, p2)
    centre = A.normalize_unit_sphere(pts)[:, 32]          # FPS starts at N//2
    assert torch.allclose(c1[:, 0], centre)


@needs_official(OFFICIAL_SMALL_S)
def test_oracle_fixture_features_equal_official():
    fx = torch.load(OFFICIAL_SMALL_S, map_location="cpu", weights_only=False)
    enc, info = evaluate.encoder_from_checkpoint({"state_dict": fx["state_dict"]}, num_heads=2)
    assert info["sizes"]["dim"] == 96 and info["sizes"]["depth"] == 2
    io = fx["io"]
    points = io["points_normalized"]
    centers, patches = evaluate.eval_patches(points, 64, 32, start_idx=io["centers_idx"][:, 0])
    with torch.no_grad():
        x = enc(patches, centers)
    ours = torch.nn.functional.normalize(evaluate.pool_features(x, ("cls", "mean")), dim=-1)
    t = io["teacher"]
    official = torch.nn.functional.normalize(torch.cat([t["cls"], t["patch_tokens"].mean(1)], -1), dim=-1)
    assert torch.allclose(ours, official, atol=1e-5)


def test_svm_and_knn_separable():
    g = torch.Generator().manual_seed(0)
    means = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1) * 3
    def sample(n):
        y = torch.arange(n) % 4
        return torch.nn.functional.normalize(means[y] + 0.3 * torch.randn(n, 16, generator=g), dim=1), y
    (xa, ya), (xb, yb) = sample(200), sample(100)
    assert evaluate.knn_accuracy(xa, ya, xb, yb, k=5, chunk=7) > 0.95
    pytest.importorskip("sklearn")
    assert evaluate.svm_accuracy(xa, ya, xb, yb) > 0.95


def test_knn_majority_vote():
    train = torch.tensor([[1.0, 0], [0.9, 0.1], [0.8, 0.2], [0, 1.0], [0.1, 0.9]])
    train = torch.nn.functional.normalize(train, dim=1)
    labels = torch.tensor([0, 1, 1, 2, 2])
    # nearest neighbour of [1, 0] is class 0, but 2 of its 3 nearest are class 1
    assert evaluate.knn_accuracy(train, labels, torch.tensor([[1.0, 0]]), torch.tensor([1]), k=3) == 1.0


# -- fine-tuning -------------------------------------------------------------------------------

def test_drop_path_rates_keep_keys_and_eval_output():
    enc = tiny_encoder()
    keys = list(enc.state_dict())
    patches, centers = torch.randn(3, 8, 8, 3), torch.randn(3, 8, 3)
    ref = enc(patches, centers)
    evaluate.add_drop_path(enc, 0.5)
    assert list(enc.state_dict()) == keys                      # loads into a plain PointEncoder
    assert [b.drop_path for b in enc.encoder.blocks] == [0.0, 0.5]  # linear 0 -> max over depth
    assert torch.allclose(enc(patches, centers), ref, atol=1e-6)   # eval: exactly the Block
    enc.train()
    torch.manual_seed(0)
    assert not torch.allclose(enc(patches, centers), ref, atol=1e-3)  # training: branches dropped


def test_classifier_feature_and_head():
    model = evaluate.Classifier(tiny_encoder(), 5, cls_feature=True)
    assert model.head[0].in_features == 3 * TINY["dim"]
    assert all(m.bias is None for m in model.head if isinstance(m, torch.nn.Linear))
    assert evaluate.Classifier(tiny_encoder(), 5, cls_feature=False).parts == ("mean", "max")
    model.eval()
    assert model(torch.randn(2, 8, 8, 3), torch.randn(2, 8, 3)).shape == (2, 5)


def test_lr_schedules_follow_the_protocols():
    lr, frozen = evaluate.lr_schedule(evaluate.PROTOCOLS["modelnet40"], 150, 10)
    assert frozen == 50 and len(lr) == 1500
    assert lr[0] == pytest.approx(5e-4) and lr[499] == pytest.approx(5e-5, rel=0.02)
    assert lr[500] == 0 and lr[600] == pytest.approx(2e-5) and lr[-1] == pytest.approx(1e-7, rel=0.05)
    lr, frozen = evaluate.lr_schedule(evaluate.PROTOCOLS["fewshot"], 15, 4)   # --epochs scales the warm-up
    assert frozen == 0 and lr[0] == pytest.approx(1e-7) and lr[4] == pytest.approx(1e-3)
    assert lr.max() == pytest.approx(1e-3) and 1e-6 <= lr[-1] < 2e-6   # cosine ends near 1e-6


def test_finetune_reduces_loss():
    train, test = ListDataset(toy_clouds(32, seed=1)), ListDataset(toy_clouds(8, seed=2))
    model = evaluate.Classifier(tiny_encoder(), 2)
    protocol = dict(evaluate.PROTOCOLS["scanobjectnn"], epochs=8, warmup_epochs=0, lr=3e-3, final_lr=3e-3)
    hist = evaluate.finetune(model, train, test, protocol, epochs=8, num_patches=8, patch_size=8, batch_size=16)
    assert len(hist) == 8 and all(0 <= h["test_acc"] <= 1 for h in hist)
    assert np.mean([h["train_loss"] for h in hist[-2:]]) < np.mean([h["train_loss"] for h in hist[:2]])
    assert hist[-1]["test_acc"] >= 0.75                         # spheres vs flat squares: easy
    s = evaluate.summarize(hist)
    assert s["last_acc"] == hist[-1]["test_acc"] and s["best_acc"] == max(h["test_acc"] for h in hist)


def test_frozen_stage_trains_the_head_only():
    train = ListDataset(toy_clouds(16))
    model = evaluate.Classifier(tiny_encoder(), 2)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head[0].weight.clone()
    protocol = dict(evaluate.PROTOCOLS["modelnet40"], epochs=1, frozen_epochs=1)
    evaluate.finetune(model, train, train, protocol, epochs=1, num_patches=8, patch_size=8, batch_size=8)
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(head_before, model.head[0].weight)


# -- checkpoints -------------------------------------------------------------------------------

def to_official(encoder_state: dict, which="teacher") -> dict:
    """PointEncoder state -> official Lightning layout: the inverse of A.OFFICIAL_KEY_MAP,
    written out independently so that the test checks the mapping rather than restating it."""
    rules = [(r"cls_token", "cls_token"),
             (r"tokenizer\.(.*)", r"patch_embedding.point_embedding.\1"),
             (r"pos_embed\.mlp\.(.*)", r"patch_embedding.position_embedding.position_embedding.\1"),
             (r"encoder\.blocks\.(\d+)\.norm1\.weight", r"encoder.stack.\1.self_attn.norm.weight"),
             (r"encoder\.blocks\.(\d+)\.attn\.qkv\.weight", r"encoder.stack.\1.self_attn.attn.in_proj_weight"),
             (r"encoder\.blocks\.(\d+)\.attn\.proj\.weight", r"encoder.stack.\1.self_attn.attn.out_proj.weight"),
             (r"encoder\.blocks\.(\d+)\.norm2\.weight", r"encoder.stack.\1.ffn.norm.weight"),
             (r"encoder\.blocks\.(\d+)\.mlp\.fc([12])\.weight", r"encoder.stack.\1.ffn.mlp.linear_\2.weight"),
             (r"encoder\.norm\.weight", "encoder.norm.weight")]
    out = {}
    for key, value in encoder_state.items():
        pattern, repl = next((p, r) for p, r in rules if re.fullmatch(p, key))
        out[f"{which}.point_encoder." + re.sub(pattern, repl, key)] = value
    return out


def test_official_layout_round_trip_and_refusals():
    enc = tiny_encoder()
    official = to_official(enc.state_dict())
    loaded, info = evaluate.encoder_from_checkpoint({"state_dict": official}, num_heads=2)
    assert info["kind"] == "official" and info["sizes"] == dict(TINY, cls_token=True)
    patches, centers = torch.randn(2, 8, 8, 3), torch.randn(2, 8, 3)
    assert torch.equal(loaded(patches, centers), enc(patches, centers))
    with pytest.raises(ValueError, match="--num-heads"):          # width 32 is no released variant
        evaluate.encoder_from_checkpoint({"state_dict": official})
    missing = {k: v for k, v in official.items() if not k.endswith("encoder.norm.weight")}
    with pytest.raises(ValueError, match="1 missing"):
        evaluate.encoder_from_checkpoint({"state_dict": missing}, num_heads=2)
    reshaped = dict(official)
    reshaped["teacher.point_encoder.encoder.stack.1.ffn.mlp.linear_1.weight"] = torch.zeros(48, 32)
    with pytest.raises(ValueError, match="mis-shaped"):
        evaluate.encoder_from_checkpoint({"state_dict": reshaped}, num_heads=2)
    with pytest.raises(ValueError, match="not in the official AsymDSD layout"):
        evaluate.encoder_from_checkpoint({"state_dict": {**official, "teacher.point_encoder.extra": torch.zeros(1)}},
                                         num_heads=2)
    with pytest.raises(ValueError, match="not an AsymDSD checkpoint"):
        evaluate.encoder_from_checkpoint({"model": {}})


def test_project_checkpoint_loads_teacher_or_student():
    cfg = A.Config(**A.PRESETS["tiny"])
    cfg = dataclasses.replace(cfg, embed_dim=32, depth=1, num_heads=2, tokenizer_dims=(8, 8, 16), head_hidden=16,
                              head_bottleneck=8, num_prototypes=16, predictor_dim=16, predictor_depth=1)
    model = A.AsymDSD(cfg)
    with torch.no_grad():
        model.student["encoder"].cls_token.add_(1.0)             # make the branches differ
    ckpt = {"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
            "config": dataclasses.asdict(cfg), "step": 0}
    for which in ("teacher", "student"):
        enc, info = evaluate.encoder_from_checkpoint(ckpt, which)
        assert info["kind"] == "project" and (info["num_patches"], info["patch_size"]) == (cfg.global_patches, cfg.patch_size)
        assert info["num_points"] == cfg.global_points
        assert torch.equal(enc.cls_token, getattr(model, which)["encoder"].cls_token)
    bad = dict(ckpt, config=dict(ckpt["config"], depth=2))
    with pytest.raises(ValueError, match="missing"):
        evaluate.encoder_from_checkpoint(bad)


def test_patch_settings_are_the_benchmark_protocol_for_every_encoder():
    """The benchmark input: ModelNet40 at 1024 points in 64 x 32 patches, ScanObjectNN at 2048 in 128 x 32,
    whatever crop sizes the encoder was pretrained on; flags override each value."""
    none = argparse.Namespace(num_points=None, patches=None, patch_size=None)
    assert evaluate.patch_settings(none, "modelnet40") == (1024, 64, 32)
    assert evaluate.patch_settings(none, "scanobjectnn_pbt50rs") == (2048, 128, 32)
    flags = argparse.Namespace(num_points=512, patches=32, patch_size=16)
    assert evaluate.patch_settings(flags, "modelnet40") == (512, 32, 16)


def test_export_round_trip_with_only_point_encoder(tmp_path):
    enc = tiny_encoder()
    info = dict(kind="random", sizes=dict(TINY, cls_token=True), num_patches=16, patch_size=8)
    path = tmp_path / "encoder.pt"
    evaluate.export_encoder(enc, info, str(path))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)   # plain tensors and numbers only
    other = A.PointEncoder(**ckpt["config"])
    other.load_state_dict(ckpt["state_dict"])
    patches, centers = torch.randn(2, 8, 8, 3), torch.randn(2, 8, 3)
    assert torch.equal(other.eval()(patches, centers), enc(patches, centers))
    again, info2 = evaluate.encoder_from_checkpoint(ckpt)
    assert info2["kind"] == "export" and info2["num_patches"] == 16


# -- command line, data through data.py --------------------------------------------------------

def write_npy_tree(root, per_class=(4, 2), num_points=128):
    clouds = toy_clouds(2 * sum(per_class), num_points, seed=3)
    i = 0
    for split, n in zip(("train", "test"), per_class):
        for k in range(2 * n):
            pts, label = clouds[i]
            i += 1
            folder = root / ["sphere", "square"][label] / split
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{k:04d}.npy", pts.numpy())


def test_svm_command_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    write_npy_tree(tmp_path / "mn")
    results = tmp_path / "results.jsonl"
    evaluate.main(["svm", "--random-init", "--preset", "tiny", "--data", "modelnet40", "--data-root",
                   str(tmp_path / "mn"), "--cache-dir", str(tmp_path / "cache"), "--num-points", "128",
                   "--patches", "8", "--patch-size", "8", "--results", str(results)])
    rec = json.loads(results.read_text().splitlines()[-1])
    assert rec["command"] == "svm" and rec["checkpoint"] == "random-init:tiny" and rec["dataset"] == "modelnet40"
    assert rec["settings"]["patches"] == 8 and rec["metrics"]["test_size"] == 4
    assert {"svm_acc", "knn_acc"} <= set(rec["metrics"]) and "date" in rec


def test_bad_or_missing_data_ends_in_a_message_and_skip_bad_skips(tmp_path):
    pytest.importorskip("sklearn")
    write_npy_tree(tmp_path / "mn")
    (tmp_path / "mn" / "square" / "train" / "0001.npy").write_bytes(b"")        # an interrupted copy
    results = tmp_path / "results.jsonl"
    base = ["svm", "--random-init", "--preset", "tiny", "--data", "modelnet40", "--cache-dir", str(tmp_path / "cache"),
            "--num-points", "128", "--patches", "8", "--patch-size", "8", "--results", str(results)]
    with pytest.raises(SystemExit) as e:
        evaluate.main(base + ["--data-root", str(tmp_path / "nowhere")])
    assert "nowhere" in str(e.value) and "--download" in str(e.value)
    with pytest.raises(SystemExit) as e:
        evaluate.main(base + ["--data-root", str(tmp_path / "mn")])
    assert re.search(r"square/train/0001\.npy: .*--skip-bad", str(e.value)) and not results.exists()
    with pytest.warns(UserWarning, match=r"0001\.npy"):
        evaluate.main(base + ["--data-root", str(tmp_path / "mn"), "--skip-bad"])
    assert json.loads(results.read_text())["metrics"]["train_size"] == 7


def test_finetune_command_two_stage_end_to_end(tmp_path):
    write_npy_tree(tmp_path / "mn")
    results = tmp_path / "results.jsonl"
    evaluate.main(["finetune", "--random-init", "--preset", "tiny", "--data", "modelnet40", "--data-root",
                   str(tmp_path / "mn"), "--cache-dir", str(tmp_path / "cache"), "--num-points", "128",
                   "--patches", "8", "--patch-size", "8", "--epochs", "3", "--runs", "2", "--batch-size", "4",
                   "--results", str(results), "--save", str(tmp_path / "clf.pt")])
    model, info = evaluate.load_classifier(str(tmp_path / "clf.pt"))   # what `predict` loads
    assert (info["num_points"], info["num_patches"], info["patch_size"]) == (128, 8, 8)
    assert len(info["classes"]) == model.head[-1].out_features >= 2
    rec = json.loads(results.read_text().splitlines()[-1])
    assert rec["settings"]["protocol"] == "modelnet40" and rec["settings"]["epochs"] == 3
    assert [r["seed"] for r in rec["metrics"]["runs"]] == [0, 1]
    assert all(len(r["history"]) == 3 for r in rec["metrics"]["runs"])
    assert {"last_acc_mean", "last_acc_std", "best_acc_mean", "best_acc_std"} <= set(rec["metrics"])


def test_export_and_plot_commands(tmp_path, capsys):
    cfg = dataclasses.replace(A.Config(**A.PRESETS["tiny"]), embed_dim=32, depth=1, num_heads=2,
                              tokenizer_dims=(8, 8, 16), head_hidden=16, head_bottleneck=8, num_prototypes=16,
                              predictor_dim=16, predictor_depth=1)
    model = A.AsymDSD(cfg)
    torch.save({"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
                "config": dataclasses.asdict(cfg), "step": 0}, tmp_path / "last.pt")
    evaluate.main(["export", str(tmp_path / "last.pt"), "--out", str(tmp_path / "enc.pt")])
    ckpt = torch.load(tmp_path / "enc.pt", weights_only=True)
    enc = A.PointEncoder(**ckpt["config"])
    enc.load_state_dict(ckpt["state_dict"])
    assert torch.equal(enc.cls_token, model.teacher["encoder"].cls_token)
    capsys.readouterr()
    results = tmp_path / "results.jsonl"
    svm_rec = lambda ckpt, acc: json.dumps({"command": "svm", "checkpoint": str(ckpt),
                                            "metrics": {"svm_acc": acc, "knn_acc": acc}})
    tagged = lambda tag, acc: json.dumps({"command": "svm", "tag": tag, "metrics": {"svm_acc": acc, "knn_acc": acc}})
    results.write_text("\n".join([tagged("cls_only/seed0", 0.60), tagged("cls_only/seed1", 0.70),
                                  tagged("asymdsd/seed0", 0.80), svm_rec(tmp_path / "untagged.pt", 0.1)]))
    evaluate.main(["table", str(results)])
    table = capsys.readouterr().out.splitlines()
    assert table[2] == "| cls_only | not recorded | 0, 1 | 60.00, 70.00 | 65.00 | 60.00, 70.00 | -20.00 (1) |"
    assert table[3].startswith("| asymdsd | not recorded | 0 |")
    assert len(table) == 4, "untagged records are not rows"
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "epoch": s / 2, "loss": 1.0 / s, "loss_cls": 0.5, "lr": 1e-4})
                             for s in (1, 2, 3)))
    results.write_text("\n".join([svm_rec(tmp_path / "epoch_001.pt", 0.5), svm_rec(tmp_path / "epoch_002.pt", 0.7),
                                  svm_rec(tmp_path / "other" / "epoch_003.pt", 0.9)]))  # another run: ignored
    evaluate.main(["plot", str(log), "--results", str(results), "--baseline", "40", "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "(2 evaluated snapshots)" in capsys.readouterr().out


def test_plot_titles_name_the_dataset_of_the_records(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "epoch": s, "loss": 1.0 / s}) for s in (1, 2)))
    rec = lambda epoch, dataset, acc: json.dumps({"command": "svm", "checkpoint": str(tmp_path / f"epoch_{epoch:03d}.pt"),
                                                  "dataset": dataset, "metrics": {"svm_acc": acc, "knn_acc": acc}})
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join([rec(1, "scanobjectnn_objbg", 0.5), rec(2, "scanobjectnn_objbg", 0.6),
                                  rec(2, "shapes", 0.9)]))
    fig = evaluate.main(["plot", str(log), "--results", str(results), "--out", str(tmp_path / "c.png")])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["scanobjectnn_objbg test accuracy (%)", "shapes test accuracy (%)", "loss"]
    svm_line = fig.axes[0].get_lines()[0]
    assert list(svm_line.get_xdata()) == [1, 2] and list(svm_line.get_ydata()) == [50, 60]   # the datasets never mix


def test_table_groups_seeds_and_keeps_inputs_apart(tmp_path, capsys):
    def rec(tag, acc, points=1024, patches=64, size=32):
        return json.dumps({"command": "svm", "tag": tag, "metrics": {"svm_acc": acc, "knn_acc": acc / 2},
                           "settings": {"points": points, "patches": patches, "patch_size": size}})
    path = tmp_path / "abl.jsonl"
    path.write_text("\n".join([rec("a/seed0", 0.70), rec("a/seed1", 0.80), rec("a/seed0", 0.60, 512, 32, 16),
                               rec("a/seed1", 0.90), rec("b/seed10", 0.20), rec("b/seed0", 0.75), rec("b/seed2", 0.10),
                               json.dumps({"command": "finetune", "tag": "x"})]) + "\n")
    evaluate.main(["table", str(path), "--reference", "a"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("| a ", "| b "))]
    assert lines == ["| a | 1024 pts, 64 x 32 | 0, 1 | 70.00, 90.00 | 80.00 | 35.00, 45.00 |  |",   # latest seed1 counts
                     "| a | 512 pts, 32 x 16 | 0 | 60.00 | 60.00 | 30.00 |  |",
                     # seeds sort as numbers (10 after 2); seed 0 only is paired
                     "| b | 1024 pts, 64 x 32 | 0, 2, 10 | 75.00, 10.00, 20.00 | 35.00 | 37.50, 5.00, 10.00 | +5.00 (1) |"]


def write_fewshot_folds(root, way=5, shot=10, folds=(0, 1), num_points=256):
    """The Point-BERT layout: <way>way_<shot>shot/<fold>.pkl = {'train': [(points (P, 6), label, mn40 idx)], 'test': ...};
    fewer shots than the name says, to stay tiny."""
    rng = np.random.default_rng(0)
    for fold in folds:
        d = root / f"{way}way_{shot}shot"
        d.mkdir(parents=True, exist_ok=True)
        entry = lambda lab: (rng.normal(size=(num_points, 6)).astype(np.float32) * (1 + lab), lab, 10 + lab + fold)
        folds_data = {"train": [entry(i % way) for i in range(2 * way)], "test": [entry(i % way) for i in range(way)]}
        with open(d / f"{fold}.pkl", "wb") as fh:
            pickle.dump(folds_data, fh)


def test_fewshot_runs_every_requested_fold(tmp_path):
    write_fewshot_folds(tmp_path / "fs")
    results = tmp_path / "results.jsonl"
    base = ["fewshot", "--random-init", "--preset", "tiny", "--data-root", str(tmp_path / "fs"), "--ways", "5",
            "--shots", "10", "--epochs", "1", "--num-points", "128", "--patches", "8", "--patch-size", "8",
            "--results", str(results)]
    out = evaluate.main(base + ["--folds", "0", "1", "--save", str(tmp_path / "clf.pt")])
    r = out["5way_10shot"]
    # --save keeps the last fold's classifier (its classes: ModelNet40 11-15), pooled as few-shot pools
    model, info = evaluate.load_classifier(str(tmp_path / "clf.pt"))
    assert info["classes"] == list(data.MODELNET40_CLASSES[11:16]) and model.parts == ("mean", "max")
    assert (info["num_points"], info["num_patches"], info["patch_size"]) == (128, 8, 8)
    np.save(tmp_path / "x.npy", _user_cloud(200))
    evaluate.main(["predict", str(tmp_path / "clf.pt"), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text())[0]["top"][0]["label"] in info["classes"]
    assert [f["fold"] for f in r["folds"]] == [0, 1]
    assert r["last_acc_mean"] == pytest.approx(np.mean([f["last_acc"] for f in r["folds"]]))
    assert r["class_mean_acc_mean"] == pytest.approx(np.mean([f["last_class_mean"] for f in r["folds"]]))
    assert r["last_acc_std"] == pytest.approx(np.std([f["last_acc"] for f in r["folds"]]))   # over the folds
    rec = json.loads(results.read_text().splitlines()[-1])
    assert rec["command"] == "fewshot" and rec["settings"]["folds"] == [0, 1]
    with pytest.raises(SystemExit, match="2.pkl"):            # fold 2 was never written: its name, no traceback
        evaluate.main(base + ["--folds", "2"])


# -- part segmentation: fine-tuning on synthetic ShapeNetPart, the command, a cloud of one's own ---

def synthetic_parts(n: int, seed: int) -> dict:
    """n ellipsoids, alternately airplane (parts 0-3) and chair (12-15), each point's part set by the
    signs of its x and y (file coordinates), 300-400 points."""
    rng, out = np.random.default_rng(seed), {}
    for i in range(n):
        cat, base = [(0, 0), (4, 12)][i % 2]
        m = int(rng.integers(300, 400))
        p = rng.normal(size=(m, 3))
        p = p / np.linalg.norm(p, axis=1, keepdims=True) * rng.uniform(0.8, 1.2, 3)
        rows = np.concatenate([p, np.ones((m, 3)), (base + 2 * (p[:, 1] > 0) + (p[:, 0] > 0))[:, None]], 1)
        out[f"{data.SHAPENETPART_SYNSETS[cat]}/s{seed}_{i}"] = rows
    return out


def test_partseg_finetune_beats_random_init(tmp_path):
    """A short fine-tuning run on tiny synthetic ShapeNetPart data lifts the instance mIoU well above
    the same model before training (the random-init baseline). Peak lr 3e-3 instead of the recipe's
    2e-4 so that 72 steps suffice; the schedule's shape is the recipe's."""
    torch.manual_seed(0)
    train_shapes, test_shapes = synthetic_parts(24, 1), synthetic_parts(8, 2)
    top = make_shapenetpart(tmp_path, {**train_shapes, **test_shapes},
                            {"train": list(train_shapes), "val": list(test_shapes), "test": list(test_shapes)})
    train = data.build_shapenetpart(str(top), "train", 256, cache_dir=str(tmp_path / "c"))
    test = data.build_shapenetpart(str(top), "test", 256, cache_dir=str(tmp_path / "c"))
    model = segment.PartSegmenter(A.PointEncoder(32, 3, 2, 2.0, (16, 32, 32), 16), upsample_dim=32, label_dim=8,
                                  head_dims=(32, 16))
    before = segment.evaluate_miou(model, test, 16, 16)
    history, best = segment.finetune(model, train, test, epochs=12, batch_size=4, num_patches=16, patch_size=16, lr=3e-3)
    after = segment.evaluate_miou(model, test, 16, 16)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert after["instance_miou"] > before["instance_miou"] + 0.3, (before, after)
    assert math.isnan(after["class_miou"]) and len(after["unseen"]) == 14     # two categories only
    assert best is not None and set(best) == set(model.state_dict())


def test_partseg_command_saves_model_and_apply_writes_labels_and_png(tmp_path, capsys):
    shapes = synthetic_parts(4, 3)
    top = make_shapenetpart(tmp_path / "d", shapes, {"train": list(shapes), "val": list(shapes)[:2],
                                                     "test": list(shapes)[2:]})
    out, results = tmp_path / "runs", tmp_path / "r.jsonl"
    evaluate.main(["partseg", "--random-init", "--preset", "tiny", "--data-root", str(top), "--epochs", "1",
                   "--num-points", "128", "--patches", "8", "--patch-size", "8", "--batch-size", "4",
                   "--out", str(out), "--results", str(results), "--cache-dir", str(tmp_path / "c")])
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["command"] == "partseg" and record["settings"]["reported"] == "last epoch"
    assert math.isnan(record["metrics"]["class_miou_mean"]) and "best_on_val" in record["metrics"]["runs"][0]
    assert "class mIoU is NaN" in capsys.readouterr().out
    cloud = tmp_path / "mine.txt"
    np.savetxt(cloud, np.random.default_rng(0).normal(size=(300, 3)))
    pytest.importorskip("matplotlib")
    segment.main(["apply", str(out / "partseg_seed0.pt"), str(cloud), "--category", "chair", "--png",
                  str(tmp_path / "mine.png"), "--num-points", "128"])
    labels = np.loadtxt(tmp_path / "mine.parts.txt")
    assert labels.shape == (300,) and set(labels.astype(int)) <= {12, 13, 14, 15}
    assert (tmp_path / "mine.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="unknown category"):
        segment.main(["apply", str(out / "partseg_seed0.pt"), str(cloud), "--category", "sofa"])
    with pytest.raises(SystemExit, match="mine.txt is not a torch file"):
        segment.main(["apply", str(cloud), str(cloud), "--category", "chair"])
    torch.save({"config": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a part-segmentation model"):
        segment.main(["apply", str(tmp_path / "other.pt"), str(cloud), "--category", "chair"])
# Your own point clouds: embed, predict, show.

def _user_cloud(n=300, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


def _write_user_formats(folder, pts):
    """The same cloud in every point format, and a cube in both mesh formats."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "a.npy", pts)
    np.savez(folder / "b.npz", points=pts)
    np.savetxt(folder / "c.txt", np.c_[pts, np.ones(len(pts))])          # a 4th column is ignored
    np.savetxt(folder / "d.xyz", pts)
    np.savetxt(folder / "e.csv", pts, delimiter=",", header="x,y,z", comments="")
    v = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    (folder / "f.off").write_text("OFF\n8 6 0\n" + "".join(f"{a} {b} {c}\n" for a, b, c in v)
                                  + "".join("4 " + " ".join(map(str, q)) + "\n" for q in quads))
    (folder / "g.obj").write_text("".join(f"v {a} {b} {c}\n" for a, b, c in v)
                                  + "".join("f " + " ".join(str(j + 1) for j in q) + "\n" for q in quads))
    return v, quads


def test_read_user_cloud_reads_every_format(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    pts = _user_cloud(300)
    v, quads = _write_user_formats(tmp_path, pts)
    trimesh.PointCloud(pts).export(tmp_path / "h_binary.ply", file_type="ply", encoding="binary")
    trimesh.PointCloud(pts).export(tmp_path / "i_ascii.ply", file_type="ply", encoding="ascii")
    tris = [t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))]
    trimesh.Trimesh(v, tris, process=False).export(tmp_path / "j_mesh.ply", file_type="ply")
    files = evaluate.find_inputs([str(tmp_path)])
    assert [os.path.basename(f) for f in files] == ["a.npy", "b.npz", "c.txt", "d.xyz", "e.csv", "f.off", "g.obj",
                                                    "h_binary.ply", "i_ascii.ply", "j_mesh.ply"]
    for f in files:
        cloud = evaluate.read_user_cloud(f, 128)
        assert cloud.shape == (128, 3) and cloud.dtype == np.float32, f
        if "mesh" in f or f.endswith((".off", ".obj")):     # surface samples: one coordinate at +-1
            assert np.allclose(np.abs(cloud).max(1), 1, atol=1e-5), f
        else:                                              # an FPS subset of the file's points
            d = np.abs(cloud[:, None] - pts[None]).max(-1).min(1)
            assert d.max() < 1e-4 and len(np.unique(cloud, axis=0)) == 128, f
    # the reduction is evaluation's: FPS (data.resample) from the start seeded by the file name
    rng = data.item_rng(0, str(tmp_path / "a.npy"))
    assert np.array_equal(evaluate.read_user_cloud(str(tmp_path / "a.npy"), 128),
                          data.resample(pts, 128, "fps", rng, "a.npy"))


def test_read_user_clouds_bad_input_named_and_skipped(tmp_path, capsys):
    np.save(tmp_path / "good.npy", _user_cloud(300))
    np.save(tmp_path / "small.npy", _user_cloud(50))
    (tmp_path / "broken.csv").write_text("1,2\n3\n")
    files = evaluate.find_inputs([str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        evaluate.read_user_clouds(files, 128, skip_bad=False)
    assert "broken.csv" in str(e.value) and "--skip-bad" in str(e.value)
    clouds, kept = evaluate.read_user_clouds(files, 128, skip_bad=True)
    assert clouds.shape == (1, 128, 3) and [os.path.basename(k) for k in kept] == ["good.npy"]
    err = capsys.readouterr().err
    assert "small.npy: has 50 points, 128 were requested" in err and "skipped 2 of 3 files" in err
    with pytest.raises(SystemExit, match="nothing_here"):
        evaluate.find_inputs([str(tmp_path / "nothing_here*.npy")])


def _tiny_export(tmp_path):
    encoder, info = evaluate.random_encoder("tiny", seed=0)
    evaluate.export_encoder(encoder, info, str(tmp_path / "enc.pt"))
    return encoder, str(tmp_path / "enc.pt")


def test_embed_command_writes_svm_features_in_input_order(tmp_path):
    encoder, ckpt = _tiny_export(tmp_path)
    names = ("z.npy", "a.npy", "m.npy")
    for seed, name in enumerate(names):
        np.save(tmp_path / name, _user_cloud(400, seed))
    args = ["embed", ckpt, *(str(tmp_path / n) for n in names),
            "--num-points", "256", "--patches", "16", "--patch-size", "16", "--batch-size", "2"]
    evaluate.main(args + ["--out", str(tmp_path / "f.npy")])
    feats = np.load(tmp_path / "f.npy")
    assert (tmp_path / "f.txt").read_text().split() == [str(tmp_path / n) for n in names]
    clouds = np.stack([evaluate.read_user_cloud(str(tmp_path / n), 256) for n in names])
    ref, _ = evaluate.extract_features(encoder, torch.utils.data.TensorDataset(torch.from_numpy(clouds),
                                       torch.zeros(3)), 16, 16)
    assert feats.shape == (3, 2 * 96) and np.allclose(feats, ref.numpy(), atol=1e-5)
    evaluate.main(args + ["--out", str(tmp_path / "f.npz"), "--tokens"])
    z = np.load(tmp_path / "f.npz")
    assert np.allclose(z["features"], feats, atol=1e-5) and z["tokens"].shape == (3, 16, 96)
    assert list(z["files"]) == [str(tmp_path / n) for n in names]


def test_predict_loads_a_saved_classifier(tmp_path, capsys):
    encoder, info = evaluate.random_encoder("tiny", seed=0)
    model = evaluate.Classifier(encoder, 3, cls_feature=True, drop_path_rate=0.0)
    evaluate.save_classifier(model, info, ["cup", "lamp", "vase"], 256, 16, 16, str(tmp_path / "clf.pt"))
    np.save(tmp_path / "x.npy", _user_cloud(300))
    evaluate.main(["predict", str(tmp_path / "clf.pt"), str(tmp_path / "x.npy"), "--top-k", "2",
                   "--out", str(tmp_path / "p.json")])
    rows = json.loads((tmp_path / "p.json").read_text())
    probs = [t["prob"] for t in rows[0]["top"]]
    assert len(probs) == 2 and probs[0] >= probs[1] and sum(probs) <= 1 + 1e-6
    cloud = evaluate.read_user_cloud(str(tmp_path / "x.npy"), 256)             # the classifier's stored points
    ref = evaluate.predict_probs(model, cloud[None], 16, 16)[0]
    assert rows[0]["top"][0]["label"] == ["cup", "lamp", "vase"][int(ref.argmax())]
    assert abs(probs[0] - float(ref.max())) < 1e-5 and "x.npy" in capsys.readouterr().out
    evaluate.main(["predict", str(tmp_path / "clf.pt"), str(tmp_path / "x.npy"), "--top-k", "2",
                   "--out", str(tmp_path / "p.csv")])
    header, row = (tmp_path / "p.csv").read_text().splitlines()
    assert header == "file,label1,prob1,label2,prob2" and row.split(",")[1] == rows[0]["top"][0]["label"]
    assert abs(float(row.split(",")[2]) - probs[0]) < 1e-4
    with pytest.raises(SystemExit, match="not a classifier"):
        evaluate.main(["predict", _tiny_export(tmp_path)[1], str(tmp_path / "x.npy")])
    with pytest.raises(SystemExit, match=r"p\.txt: give a \.csv or \.json"):
        evaluate.main(["predict", str(tmp_path / "clf.pt"), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.txt")])


def test_saved_classifier_keeps_head_and_pooling(tmp_path):
    """Every head and pooling the protocols train (finetune / fewshot MLP-3, probe linear) loads back into the
    same model: `predict` gives the saved model's logits."""
    torch.manual_seed(0)
    clouds = torch.from_numpy(np.stack([_user_cloud(256, s) for s in range(2)]))
    centers, patches = evaluate.eval_patches(A.normalize_unit_sphere(clouds), 16, 16)
    for head, cls_feature in (("mlp", True), ("mlp", False), ("linear", True)):
        encoder, info = evaluate.random_encoder("tiny", seed=0)
        model = evaluate.Classifier(encoder, 4, cls_feature=cls_feature, drop_path_rate=0.1, head=head).eval()
        evaluate.save_classifier(model, info, list("abcd"), 256, 16, 16, str(tmp_path / "clf.pt"))
        loaded, _ = evaluate.load_classifier(str(tmp_path / "clf.pt"))
        assert type(loaded.head) is type(model.head) and loaded.parts == model.parts, (head, cls_feature)
        with torch.no_grad():
            assert torch.allclose(loaded(patches, centers), model(patches, centers), atol=1e-5), (head, cls_feature)


def test_cls_attention_uniform_when_queries_are_zero():
    encoder = A.PointEncoder(dim=16, depth=2, num_heads=1, tokenizer_dims=(8, 8, 16), pos_hidden=8).eval()
    patches, centers = torch.randn(2, 5, 4, 3), torch.randn(2, 5, 3)
    attn = evaluate.cls_attention(encoder, patches, centers)
    assert attn.shape == (2, 5) and (attn > 0).all() and (attn.sum(1) < 1).all()
    with torch.no_grad():
        encoder.encoder.blocks[-1].attn.qkv.weight[:16] = 0              # q = 0: softmax of zeros
    assert torch.allclose(evaluate.cls_attention(encoder, patches, centers), torch.full((2, 5), 1 / 6))


def test_show_writes_png_from_the_training_code_draws(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    _, ckpt = _tiny_export(tmp_path)
    np.save(tmp_path / "x.npy", _user_cloud(1200))
    calls = {}
    for name in ("make_views", "patchify", "inverse_block_masks"):
        real = getattr(A, name)
        monkeypatch.setattr(A, name, lambda *a, _real=real, _name=name, **k: calls.setdefault(_name, []).append(1)
                            or _real(*a, **k))
    out = tmp_path / "fig.png"
    evaluate.main(["show", str(tmp_path / "x.npy"), "--ckpt", ckpt, "--out", str(out), "--seed", "3"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert set(calls) == {"make_views", "patchify", "inverse_block_masks"}
    monkeypatch.undo()
    # the drawn views are exactly one pretraining step's: make_views with the preset's config and the seed
    cloud = A.normalize_unit_sphere(torch.from_numpy(evaluate.read_user_cloud(str(tmp_path / "x.npy"), 1024))[None])[0]
    drawn = evaluate.draw_views(cloud, "tiny", 3, 64, 32)
    ref = A.make_views(cloud[None], drawn["cfg"], torch.Generator().manual_seed(3))
    assert torch.equal(drawn["views"]["global"][1], ref["global"][1]) and torch.equal(drawn["views"]["mask"], ref["mask"])
    assert drawn["views"]["mask"].shape[0] == drawn["cfg"].num_global_crops * drawn["cfg"].num_masks


def test_shipped_checkpoint_and_examples_run(tmp_path):
    root = os.path.dirname(os.path.abspath(__file__))
    ckpt, examples = os.path.join(root, "checkpoints", "tiny_modelnet40.pt"), os.path.join(root, "examples")
    if any(f.endswith(".ply") for f in os.listdir(examples)):
        pytest.importorskip("trimesh")
    evaluate.main(["embed", ckpt, examples, "--out", str(tmp_path / "f.npy")])
    feats = np.load(tmp_path / "f.npy")
    assert feats.shape[0] == len(os.listdir(examples)) >= 4 and np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-4)
    # the shipped classifier (README's first predict) loads and ranks ModelNet40 classes for every example
    clf = os.path.join(root, "checkpoints", "tiny_modelnet40_probe.pt")
    model, info = evaluate.load_classifier(clf)
    assert info["classes"] == list(data.MODELNET40_CLASSES) and model.head[-1].out_features == 40
    evaluate.main(["predict", clf, examples, "--top-k", "3", "--out", str(tmp_path / "p.json")])
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [os.path.basename(r["file"]) for r in rows] == sorted(os.listdir(examples))
    for r in rows:
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5


# -- frozen probes, voting, class-mean accuracy, evaluation while pretraining -----------------------

def test_class_mean_accuracy_on_a_hand_made_confusion_matrix():
    # class 0: 8 of 10 right; class 1: 1 of 2 right; class 2: no test clouds (left out of the mean)
    target = [0] * 10 + [1] * 2
    pred = [0] * 8 + [1, 2] + [1, 0]
    conf = evaluate.confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[8, 1, 1], [1, 1, 0], [0, 0, 0]]
    per_class, mean = evaluate.class_accuracies(conf)
    assert per_class[:2].tolist() == [0.8, 0.5] and np.isnan(per_class[2])
    assert mean == pytest.approx(0.65)                          # not the overall 9 / 12 = 0.75
    m = evaluate.accuracy_metrics(conf, ["a", "b", "c"])
    assert m["acc"] == pytest.approx(0.75) and m["per_class"] == {"a": 0.8, "b": 0.5, "c": None}


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_frozen_probe_learns_a_separable_toy_set_and_leaves_the_encoder_alone(head):
    train, test = ListDataset(toy_clouds(32, seed=1)), ListDataset(toy_clouds(16, seed=2))
    model = evaluate.Classifier(tiny_encoder(), 2, head=head)
    assert isinstance(model.head, torch.nn.Linear) == (head == "linear")
    if head == "linear":
        assert model.head.bias is not None and model.head.in_features == 3 * TINY["dim"]   # [CLS, mean, max]
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    protocol = dict(evaluate.recipe("frozen", "modelnet40"), epochs=20, warmup_epochs=0, lr=1e-2, final_lr=1e-3)
    hist = evaluate.finetune(model, train, test, protocol, epochs=20, num_patches=8, patch_size=8, batch_size=8)
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    assert hist[-1]["test_acc"] >= 0.9 and hist[-1]["test_class_mean"] >= 0.9   # spheres vs flat squares


def test_recipes_follow_the_official_variants():
    frozen, scratch = evaluate.recipe("frozen", "scanobjectnn_objbg"), evaluate.recipe("scratch", "modelnet40")
    assert frozen["freeze_encoder"] is True and frozen["rotate"] and frozen["scale"] == (0.9, 1.1)
    lr, first = evaluate.lr_schedule(frozen, 150, 2)              # optim/classification_optim_frozen.yaml
    assert first == 0 and lr[0] == 0 and lr[20] == pytest.approx(5e-4) and 1e-7 <= lr[-1] < 2e-7
    assert not scratch["cls_feature"] and scratch["lr"] == 1e-3 and scratch["scale"] == (0.6, 1.4)
    mn8k = evaluate.PROTOCOLS["modelnet40_8k"]                   # two-stage lr, nothing frozen, 100 epochs
    lr, first = evaluate.lr_schedule(mn8k, 100, 2)
    assert first == 50 and len(lr) == 200 and lr[0] == pytest.approx(5e-4) and mn8k["freeze_encoder"] is False
    data = ListDataset(toy_clouds(8))
    for freeze, trains in ((False, True), (None, False)):    # one epoch, all of it in the first stage
        model = evaluate.Classifier(tiny_encoder(), 2)
        before = next(model.encoder.parameters()).clone()
        protocol = {k: v for k, v in dict(mn8k, frozen_epochs=100, freeze_encoder=freeze).items() if v is not None}
        evaluate.finetune(model, data, data, protocol, 1, 8, 8, batch_size=8)
        assert torch.equal(before, next(model.encoder.parameters())) != trains   # 8k: the encoder trains at once


class FirstCallModel(torch.nn.Module):
    """Logits [1, 0] on its first call, [0, 1] on every later one (one batch holds the whole test set);
    records its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, patches, centers):
        self.calls.append((patches, centers))
        return torch.tensor([1.0, 0.0] if len(self.calls) == 1 else [0.0, 1.0]).expand(patches.shape[0], 2)


def test_voting_sums_the_clean_pass_and_the_augmented_passes():
    data = ListDataset(toy_clouds(6))
    model = FirstCallModel()
    iso = dict(rotate=False, scale=(2.0, 2.0))                  # isotropic: the same cloud once normalised
    single, voted, labels = evaluate.predict(model, data, 8, 8, batch_size=6, votes=3, augmentation=iso)
    assert single.argmax(1).tolist() == [0] * 6                 # the single pass alone says class 0
    assert voted.tolist() == [[1.0, 2.0]] * 6                   # 1 clean + 2 augmented passes, logits summed
    clean_centers, clean_patches = evaluate.eval_patches(torch.stack([p for p, _ in data]), 8, 8)
    for patches, centers in model.calls:                        # every vote: the single pass's patches
        assert torch.allclose(centers, clean_centers, atol=1e-5) and torch.allclose(patches, clean_patches, atol=1e-5)
    model = FirstCallModel()
    aniso = dict(rotate=False, scale=(0.5, 1.5))
    evaluate.predict(model, data, 8, 8, batch_size=6, votes=2, augmentation=aniso)
    (p0, c0), (p1, c1) = model.calls
    assert not torch.allclose(c0, c1)                           # the augmented pass sees another cloud
    model = FirstCallModel()
    single, voted, _ = evaluate.predict(model, data, 8, 8, batch_size=6)
    assert torch.equal(single, voted) and len(model.calls) == 1


def test_probe_and_scratch_commands_write_class_mean_voting_and_confusion(tmp_path):
    write_npy_tree(tmp_path / "mn")
    results = tmp_path / "results.jsonl"
    base = ["--data", "modelnet40", "--data-root", str(tmp_path / "mn"), "--cache-dir", str(tmp_path / "cache"),
            "--num-points", "128", "--patches", "8", "--patch-size", "8", "--epochs", "1", "--batch-size", "4",
            "--results", str(results), "--votes", "2"]
    evaluate.main(["probe", "--random-init", "--preset", "tiny", "--head", "mlp3", *base])
    evaluate.main(["scratch", "--preset", "tiny", *base, "--confusion-dir", "none"])
    probe, scratch = [json.loads(line) for line in results.read_text().splitlines()]
    assert probe["command"] == "probe_mlp3" and probe["settings"]["protocol"] == "frozen"
    assert scratch["command"] == "scratch" and scratch["checkpoint"] == "random-init:tiny"
    for rec in (probe, scratch):
        m = rec["metrics"]
        assert {"last_acc_mean", "class_mean_acc_mean", "vote_acc_mean", "per_class"} <= set(m)
        assert set(m["per_class"]) == {"sphere", "square"} and rec["settings"]["votes"] == 2
    assert scratch["metrics"]["confusion_png"] is None
    if importlib.util.find_spec("matplotlib"):
        assert os.path.getsize(probe["metrics"]["confusion_png"]) > 0
        assert os.path.dirname(probe["metrics"]["confusion_png"]) == str(tmp_path / "confusion")
    with pytest.raises(SystemExit, match="random initialisation"):
        evaluate.main(["scratch", "some.pt", *base])


def test_eval_every_logs_the_teacher_evaluation_and_leaves_training_unchanged(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    root = write_modelnet_folder(tmp_path / "mn")               # 300-point clouds: a benchmark input of 256
    monkeypatch.setitem(evaluate.BENCHMARKS, "modelnet40", dict(points=256, patches=8, protocol="modelnet40"))
    A.main(cli(root, tmp_path / "eval", "--eval-every", "1", eval_data_root=str(root), eval_linear_epochs=2))
    A.main(cli(root, tmp_path / "plain"))
    log = read_log(tmp_path / "eval")
    evals = [r for r in log if "svm_acc" in r]
    assert [(r["epoch"], r["step"]) for r in evals] == [(1, 4), (2, 8)]
    for r in evals:
        assert r["eval_data"] == "modelnet40" and 0 <= r["svm_acc"] <= 1 and 0 <= r["knn_acc"] <= 1
        assert 0 <= r["linear_acc"] <= 1 and r["eval_seconds"] >= 0
    train = [r for r in log if "loss" in r]
    assert [r["loss"] for r in train] == [r["loss"] for r in read_log(tmp_path / "plain")]   # no stream touched
    if importlib.util.find_spec("matplotlib"):
        fig = evaluate.main(["plot", str(tmp_path / "eval" / "log.jsonl"), "--out", str(tmp_path / "c.png")])
        assert fig.axes[0].get_title() == "modelnet40 test accuracy (%)"
        assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["linear SVM", "kNN (k=5)", "linear probe"]
    # no --eval-data and no ModelNet40 where it is looked for: a note, and the run trains on
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    A.main(["--data", "shapes", "--out", str(tmp_path / "none"), "--device", "cpu", "--batch-size", "4",
            "--epochs", "1", "--num-workers", "0", "--eval-every", "1", "--max-steps", "2",
            "--set", *set_args(warmup_epochs=0, temp_warmup_epochs=0)])
    assert "no evaluation data" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--eval-data scanobjectnn_objbg"):
        A.main(cli(root, tmp_path / "bad", "--eval-every", "1", "--eval-data", "scanobjectnn_objbg",
                   eval_data_root=str(tmp_path / "nowhere")))


def test_objaverse_lvis_split_follows_the_official_rule():
    lvis = {"mug": [f"m{i}" for i in range(13)], "rare": ["r0", "r1"], "car": [f"c{i}" for i in range(12)]}
    available = set(lvis["mug"]) | set(lvis["rare"]) | {f"c{i}" for i in range(11)}     # c11 not downloaded
    train, test, classes = data.objaverse_lvis_split(lvis, available, shot=10, fold=3)
    assert classes == ["mug", "car"]                          # 'rare' has fewer than 10 objects: dropped
    rng = random.Random(3)                                   # official: one Random(seed), a shuffle per category in turn
    mug, car = list(lvis["mug"]), [f"c{i}" for i in range(11)]
    rng.shuffle(mug)
    rng.shuffle(car)
    assert train == [(u, 0) for u in mug[:10]] + [(u, 1) for u in car[:10]]
    assert test == [(u, 0) for u in mug[10:]] + [(u, 1) for u in car[10:]]
    assert data.objaverse_lvis_split(lvis, available, 10, 4)[0] != train


def test_objaverse_lvis_protocol_keeps_the_encoder_frozen_and_head_linear():
    train = data.build_shapes("train", num_points=128, num_shapes=8)
    model = evaluate.Classifier(tiny_encoder(), 8, True, 0.0, head="linear")
    assert isinstance(model.head, torch.nn.Linear)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head = model.head.weight.clone()
    evaluate.finetune(model, train, train, evaluate.PROTOCOLS["objaverse_lvis"], 2, 8, 8, batch_size=4)
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(head, model.head.weight)


def test_objaverse_lvis_command_top_k(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    root = tmp_path / "objaverse" / "000-000"
    root.mkdir(parents=True)
    shapes = {"box": trimesh.creation.box(extents=(1, 2, 3)), "ball": trimesh.creation.icosphere(subdivisions=2)}
    lvis = {c: [f"{c}{i}" for i in range(11)] for c in shapes}
    for c, mesh in shapes.items():
        for u in lvis[c]:
            (root / f"{u}.glb").write_bytes(mesh.export(file_type="glb"))
    (tmp_path / "objaverse" / "lvis-annotations.json").write_text(json.dumps(lvis))
    out = evaluate.main(["objaverse_lvis", "--random-init", "--preset", "tiny", "--data-root", str(tmp_path / "objaverse"),
                         "--folds", "0", "--epochs", "1", "--num-points", "128", "--patches", "8", "--patch-size", "8",
                         "--batch-size", "4", "--results", str(tmp_path / "r.jsonl")])
    assert set(out) == {"last_top1_mean", "last_top3_mean", "last_top5_mean"}
    assert out["last_top3_mean"] == out["last_top5_mean"] == 1.0       # 2 classes: always in the top 3
    rec = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])
    f = rec["metrics"]["folds"][0]
    assert (f["classes"], f["train"], f["test"]) == (2, 20, 2) and rec["command"] == "objaverse_lvis"
    (tmp_path / "objaverse" / "lvis-annotations.json").write_text("{not json")
    with pytest.raises(SystemExit, match="lvis-annotations.json: not a readable LVIS"):
        evaluate.main(["objaverse_lvis", "--random-init", "--preset", "tiny", "--data-root", str(tmp_path / "objaverse"),
                       "--folds", "0", "--epochs", "1"])


# ==============================================================================================
# bench.py: FLOP counts, parameter counts, benchmark commands
# ==============================================================================================

def test_bench_params_prints_one_json_line_per_preset(capsys):
    rows = bench.main(["params", "--presets", "small", "base", "tiny"])["params"]
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert lines == rows and [r["preset"] for r in rows] == ["small", "base", "tiny"]
    assert all(isinstance(r[k], int) for r in rows for k in ("encoder", "tokenizer", "predictor", "cls_head", "patch_head"))
    assert rows[1]["encoder"] == OFFICIAL_PARAMS["base"][0]


def test_two_stage_tokenizer_macs_match_flop_counter():
    cfg = A.Config(embed_dim=16, tokenizer_dims=((4, 8), (12,)), patch_size=5)
    tok = A.TwoStageTokenizer(16, cfg.tokenizer_dims)
    counted = bench.counted_flops(lambda: tok(torch.randn(3, 5, 3)))
    assert counted == 2 * 3 * bench.tokenizer_macs(cfg)


def test_analytic_step_flops_match_flop_counter():
    """The closed-form count (x3 for trained passes, x1 for the teacher) against FlopCounterMode on
    one real train_step of the tiny preset."""
    cfg, _, step = bench.setup_step("tiny", 2, torch.device("cpu"), "fp32", False, source_points=1024)
    analytic = bench.step_flops(cfg, 2)
    assert analytic["total"] == sum(v for k, v in analytic.items() if k != "total")
    counted = bench.counted_flops(step)
    assert counted > 0
    # Tight: a second teacher pass per mask, or a head called per crop, would be far outside this.
    assert abs(analytic["total"] / counted - 1) < 0.01


@pytest.mark.parametrize("form", ["cross", "masked_self", "full_self"])
def test_analytic_predictor_flops_match_flop_counter(form):
    cfg = dataclasses.replace(A.Config(**A.PRESETS["tiny"]), predictor_attention=form)
    net = A.Predictor(cfg.embed_dim, cfg.predictor_dim, cfg.predictor_depth, cfg.predictor_heads, cfg.mlp_ratio, form)
    R, Tc, Q = 3, 7, 22
    context = torch.randn(R, Tc, cfg.embed_dim, requires_grad=True)
    query_pos = torch.randn(R, Q, cfg.embed_dim, requires_grad=True)
    counted = bench.counted_flops(lambda: net(context, query_pos).square().mean().backward())
    analytic = 3 * 2 * R * bench.predictor_macs(cfg, Tc, Q)
    assert abs(analytic / counted - 1) < 0.15


@pytest.fixture(scope="module")
def paper_model():
    return A.AsymDSD(A.Config())


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_param_counts_by_part_sum_to_total(preset, paper_model):
    model = paper_model if preset == "paper" else A.AsymDSD(A.Config(**A.PRESETS[preset]))
    c = bench.param_counts(model)
    parts = ("tokenizer", "pos_mlp", "transformer", "predictor", "cls_head", "patch_head")
    assert sum(c[k] for k in parts) == c["student_total"] == sum(p.numel() for p in model.student.parameters())
    assert c["teacher_total"] == c["student_total"] - c["predictor"]  # the teacher is the student minus predictor


def test_paper_encoder_has_about_21_8M_parameters(paper_model):
    """AsymDSD-S: ~21.24M transformer + 0.49M tokenizer + 0.05M pos-MLP = ~21.8M, the official README's count."""
    c = bench.param_counts(paper_model)
    assert c["transformer"] == pytest.approx(21.24e6, rel=0.01)
    assert c["tokenizer"] == pytest.approx(0.49e6, rel=0.02)
    assert c["pos_mlp"] == pytest.approx(0.05e6, rel=0.02)
    assert c["encoder_total"] == pytest.approx(21.8e6, rel=0.01)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU bf16 rms_norm: unfused path
def test_step_benchmark_cli_writes_finite_numbers_and_expected_keys(tmp_path):
    assert [bench.parse_args(["step", *a]).compile for a in ([], ["--compile"], ["--compile", "off", "on"])] == \
        [["off"], ["on"], ["off", "on"]]
    out = tmp_path / "bench.json"
    bench.main(["step", "--presets", "tiny", "--batch-sizes", "2", "--repeats", "2", "--warmup", "1",
                "--device", "cpu", "--source-points", "1024", "--threads", "1", "--precision", "fp32", "bf16",
                "--json", str(out)])
    data = json.loads(out.read_text())
    assert {"date", "command", "device", "torch"} <= set(data["meta"])
    r, r_bf16 = data["step"]   # one row per precision, side by side in one run
    assert (r["precision"], r_bf16["precision"]) == ("fp32", "torch.bfloat16") and not r["compile"]
    assert "flops_counted" not in r_bf16 and r_bf16["median_s"] > 0
    keys = {"preset", "batch_size", "min_s", "median_s", "samples_per_s", "peak_mem_mb", "mem_kind",
            "saved_activations_mb", "params", "flops_per_step", "flops_per_sample", "flops_by_part",
            "achieved_flops_per_s", "matmul_peak_flops_per_s", "fraction_of_matmul_peak", "flops_counted"}
    assert keys <= set(r)
    for k in ("min_s", "median_s", "samples_per_s", "peak_mem_mb", "saved_activations_mb", "flops_per_step",
              "achieved_flops_per_s", "matmul_peak_flops_per_s", "flops_counted"):
        assert math.isfinite(r[k]) and r[k] > 0, k
    assert r["min_s"] <= r["median_s"]
    assert abs(r["flops_analytic_over_counted"] - 1) < 0.15


def test_bench_ab_same_code_gives_identical_numerics(tmp_path):
    """bench.py ab against itself: both versions load the same weights, batch and generator, so the
    first step's loss terms and gradient norm agree exactly; a folder without asymdsd.py is refused."""
    here = str(Path(bench.__file__).parent)
    rows = bench.main(["ab", "--baseline", here, "--presets", "tiny", "--batch-sizes", "2", "--alternations", "1",
                       "--repeats", "1", "--warmup", "0", "--threads", "1", "--source-points", "512"])["ab"]
    (r,) = rows
    assert r["runs"] == 1 and r["max_abs_diff"] == 0.0 and r["speedup"] > 0
    assert {"loss", "grad_norm", "loss_patch", "loss_cls"} <= set(r["numerics_this"])
    with pytest.raises(SystemExit, match="no asymdsd.py"):
        bench.main(["ab", "--baseline", str(tmp_path), "--presets", "tiny", "--batch-sizes", "2"])


def test_bench_matmuls_records_the_steps_matmuls_and_times_them_alone(capsys):
    """bench.py matmuls: the recorded mm / addmm / bmm calls have matching inner dimensions (addmm's
    bias is not taken for an operand) and their FLOPs are the analytic count less attention's
    products inside the fused kernel; timed alone, they take less than the step."""
    args = bench.parse_args(["matmuls"])
    assert (args.presets, args.batch_sizes, args.compile) == (["paper"], [8], ["off"])
    r = bench.matmul_bound_config("tiny", 2, compile_modes=("off",), rounds=1, source_points=512, threads=1)
    _, _, step = bench.setup_step("tiny", 2, torch.device("cpu"), "fp32", False, 512)
    calls = bench.step_matmuls(step)
    assert {op for op, _, _ in calls} >= {"aten::mm", "aten::addmm"}
    assert all(a[-1] == b[-2] and len(a) == len(b) for _, a, b in calls)
    assert sum(calls.values()) == r["matmul_calls"] and len(calls) == r["matmul_shapes"]
    assert 0.9 < r["matmul_flops"] / r["flops_per_step"] < 1.0
    for k in ("matmuls_alone_s", "step_off_s", "matmul_peak_flops_per_s", "matmul_rate_of_peak", "step_off_of_peak"):
        assert math.isfinite(r[k]) and r[k] > 0, k
    # the step does its matmuls and more: alone they take less time, at a higher rate than the step's
    assert 0 < r["matmuls_alone_s"] < r["step_off_s"] and r["step_off_of_peak"] < r["matmul_rate_of_peak"]
    bench.print_bound_row(r)
    assert "step eager" in capsys.readouterr().out


def test_keep_freed_memory_is_set_on_linux_glibc():
    took = A.keep_freed_memory()
    assert isinstance(took, bool)
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert took


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_gpu_fails_fast_without_cuda():
    t = time.perf_counter()
    with pytest.raises(SystemExit, match="CUDA GPU"):
        bench.main(["gpu"])
    assert time.perf_counter() - t < 5


def test_gpu_plan_budget_and_table(monkeypatch, capsys):
    """The GPU command's CPU-side logic: the goal rows come first, filters hold, a row predicted past
    the budget is listed as skipped, an out-of-memory row is recorded and the run goes on, and the
    table has a line per row."""
    plan = bench.gpu_plan(["small", "base"], ["bf16", "fp16"], ["off", "on"], ["off", "on"])
    assert [(r["kind"], r["preset"], r["precision"], r["compile"]) for r in plan[:3]] == \
        [("step", "small", "bf16", "off"), ("step", "small", "bf16", "on"), ("e2e", "small", "bf16", "on")]
    assert len(plan) == len({json.dumps(r, sort_keys=True) for r in plan})
    assert not [r for r in bench.gpu_plan(["small"], ["bf16"], ["off"], ["off"]) if r["compile"] == "on"]
    assert bench.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12 and bench.datasheet_peak("Tesla T4") is None
    # run_gpu with the GPU work replaced by stand-ins: the loop, the budget and the table
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")

    def fake(fn, **kw):
        if fn is bench.phase_times:
            return {"views": 0.2, "teacher": 0.1, "student": 0.3, "loss": 0.0, "backward": 0.4, "clip_adamw": 0.0, "ema": 0.0}
        if kw["precision"] == "fp16":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"preset": kw["preset"], "batch_size": kw["B"], "samples_per_s": 1000.0, "peak_mem_mb": 2048.0,
                "fraction_of_datasheet_bf16_peak": 0.1}
    monkeypatch.setattr(bench, "run_isolated", fake)
    monkeypatch.setattr(bench, "run_e2e", lambda *a: {"samples_per_s": 900.0, "data_wait_frac": 0.05, "peak_mem_mb": 1.0})
    rows = bench.main(["gpu", "--presets", "small", "base", "--compile", "off", "--grad-checkpoint", "off",
                       "--budget-s", "20"])["gpu"]
    assert [(r["kind"], r["preset"], r["precision"]) for r in rows] == [
        ("step", "small", "bf16"), ("step", "small", "fp16"), ("step", "base", "bf16"), ("e2e", "small", "bf16"),
        ("step", "base", "fp16")]
    assert "phases_s" in rows[0] and rows[0]["gpu"].startswith("NVIDIA H100")
    assert "out of memory" in rows[1]["error"]                         # recorded, and the run went on
    assert all("budget" in r["skipped"] for r in rows[2:])             # 24 s and 45 s rows past a 20 s budget
    table = capsys.readouterr().out.split("| size |")[-1].splitlines()
    assert len([l for l in table if l.startswith("| ")]) == len(rows)


def test_patchify_and_predictor_benchmarks_run(tmp_path):
    res = bench.main(["patchify", "--device", "cpu", "--batch-size", "2", "--points", "256", "512",
                      "--centres", "16", "32", "--repeats", "1"])["patchify"]
    assert len(res["rows"]) == 4 and all(r["fps_s"] > 0 and r["knn_s"] > 0 for r in res["rows"])
    assert set(res["fit"]) == {"fps", "knn"}
    res = bench.main(["predictor", "--device", "cpu", "--rows", "2", "--repeats", "1", "--warmup", "0"])["predictor"]
    forms = res["forms"]
    assert set(forms) == {"cross", "masked_self", "full_self"}
    # Self-attention forms attend to 20 + 45 keys instead of 20: more FLOPs and more saved activations.
    assert forms["masked_self"]["flops_counted"] > forms["cross"]["flops_counted"]
    assert forms["masked_self"]["saved_activations_mb"] > forms["cross"]["saved_activations_mb"]
