"""AsymDSD in one file: Asymmetric Dual Self-Distillation for 3D self-supervised learning.

Paper: R. F. Leijenaar, H. Kasaei, "Asymmetric Dual Self-Distillation for 3D Self-Supervised
Representation Learning", NeurIPS 2025, arXiv:2506.21724. Official code: github.com/remcofl/AsymDSD.
Numbers follow the official code's live config, `configs/ssrl/ssrl.yaml` and the files it includes;
each non-obvious one names the official file or config key it comes from.

The method, top to bottom in the order the data flows:
   1. Views       multi_crop, augment_crops, normalize_unit_sphere      point-cloud multi-crop
   2. Patches     farthest_point_sample, knn_group, patchify            FPS centres + kNN groups
   3. Tokens      PatchTokenizer, PositionEmbedding                     mini-PointNet tokens, positional MLP
   4. Masks       inverse_block_masks, make_views                       multi-mask inverse-block masking
   5. Encoder     Attention, Block, TransformerEncoder, PointEncoder    pre-RMSNorm ViT with a CLS token
   6. Predictor   masked_query_attention, Predictor                     no attention between masked queries
   7. Heads       ProjectionHead, Centering                             prototype heads, teacher centering
   8. Losses      patch_loss, cls_loss, koleo_loss                      dual self-distillation
   9. Model       AsymDSD: forward_teacher, forward_student, forward_loss, update_teacher (EMA)
  10. Step        make_schedules, build_optimizer, train_step
  11. Loop        train, main (CLI); official checkpoints: convert_official_state_dict

Run:   python asymdsd.py --data modelnet40 --data-root data/ModelNet40      (AsymDSD-S, one GPU)
       python asymdsd.py --data shapes --preset tiny --epochs 2              (CPU, no download)
       torchrun --nproc_per_node 4 asymdsd.py --data shapenet ...            (several GPUs)

Deliberate departures from the official code: README, 'Deliberate departures', items 1-10; each is tagged
`# NOTE: (departure N)` at its line.

Dimension legend used in every shape comment:
  B batch, C global crops, L local crops, M masks per global crop, N points in a cloud,
  G patches (centres) per crop, K points per patch, V visible patches, Q masked patches,
  T tokens in a sequence, D encoder width, E predictor width, H heads, P prototypes.
"""
from __future__ import annotations

import argparse
import collections
import copy
import ctypes
import dataclasses
import json
import math
import os
import pickle
import sys
import time
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F
from einops import rearrange


# ----------------------------------------------------------------------------------------------
# Differences between torch versions (tested: 2.3.1, the official code's, and 2.13.0). Everything
# that depends on the torch version is decided here; the rest of the project uses these names.
# ----------------------------------------------------------------------------------------------

def trunc_normal_(tensor, std: float, a: float = -2.0, b: float = 2.0):
    """nn.init.trunc_normal_(tensor, std=std) as torch 2.13 draws it: normal(0, std), values outside
    [a, b] drawn again. Torch 2.3.1 draws uniform + erfinv + clamp instead, so the same seed gave other
    weights on each; written out, every version draws the same ones."""
    if tensor.is_meta:  # a model built on the meta device (shapes and counts only) holds no values
        return tensor
    with torch.no_grad():
        tensor.normal_(0.0, std)
        while True:
            outside = (tensor < a) | (tensor > b)
            if not outside.any():
                return tensor
            tensor[outside] = torch.empty_like(tensor).normal_(0.0, std)[outside]


def rms_norm(x, weight, eps: float):
    """x * rsqrt(mean(x^2) + eps) * w over the last dim (official asymdsd/layers/normalization.py).
    F.rms_norm (torch >= 2.4; one fused kernel on recent GPUs) where it exists; before 2.4 the same
    formula written out, in fp32 and returned in x's dtype, which is what F.rms_norm computes on CPU.
    A CPU training pass uses RMSNormCPU, whose backward is written out."""
    if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormCPU.apply(x, weight, eps)
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).type_as(x)


class RMSNormCPU(torch.autograd.Function):
    """RMSNorm with its gradient written out, for CPU training. The same forward as F.rms_norm; the
    backward keeps only x and the per-row scale r (autograd's composite keeps another tensor of x's
    size) and makes fewer passes over x. Computed in fp32, returned in x's dtype.
    y = x r w with r = rsqrt(mean(x^2) + eps);  dL/dx = r (g w) - x r^3 mean(g w x);  dL/dw = sum g x r"""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h, w = x.float(), weight.float()
        r = torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)          # (..., 1)
        ctx.save_for_backward(h, w, r)
        return (h * r * w).type_as(x)

    @staticmethod
    def backward(ctx, grad):
        h, w, r = ctx.saved_tensors
        grad_x, grad_w = rms_norm_backward(grad.float(), h, w, r)
        return grad_x.type_as(grad), grad_w.type_as(grad), None


def rms_norm_backward(grad, h, w, r):
    """Gradients of y = h r w (RMSNormCPU) for dL/dy = grad: (dL/dh, dL/dw). All fp32, (..., C)."""
    gw = grad * w                                                       # (..., C)
    dot = torch.linalg.vecdot(gw, h, dim=-1).unsqueeze(-1)              # (..., 1): sum_c g w x
    grad_h = torch.addcmul(gw.mul_(r), h, dot * r.pow(3) / -h.shape[-1])
    grad_w = (grad * h).flatten(0, -2).T @ r.flatten()                  # (C,)
    return grad_h, grad_w


class NormGELULinearCPU(torch.autograd.Function):
    """linear(gelu(rms_norm(x))) with its gradient written out, for the tokenizers' CPU training
    passes. Keeps only x and the per-row scale r and recomputes gelu(rms_norm(x)) in the backward;
    autograd would also keep the normed and the activated x, two more tensors of x's size. x is the
    tokenizers' per-point (B*C*G*K, 512) activation, the largest tensor of the step: on CPU this is
    about a quarter of the step's peak memory. The same forward ops, so the same numbers."""

    @staticmethod
    def forward(ctx, x, norm_weight, eps, weight, bias):
        h, w = x.float(), norm_weight.float()
        r = torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)          # (..., 1)
        ctx.save_for_backward(h, w, r, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(h * r * w).type_as(x), weight, bias)

    @staticmethod
    def backward(ctx, grad):                                            # grad (..., out)
        h, w, r, weight = ctx.saved_tensors
        n = h * r * w                                                   # (..., C): the normed x, again
        g = grad.flatten(0, -2)                                         # (rows, out)
        grad_weight = g.T @ F.gelu(n).type_as(grad).flatten(0, -2)     # (out, C)
        grad_bias = g.sum(0) if ctx.has_bias else None
        grad_n = torch.ops.aten.gelu_backward((grad @ weight).float(), n)
        del n
        grad_x, grad_norm = rms_norm_backward(grad_n, h, w, r)
        return grad_x.type_as(grad), grad_norm.type_as(grad), None, grad_weight, grad_bias


def cpu_autocast_enabled() -> bool:
    """Whether a CPU autocast region is active. torch.is_autocast_enabled takes a device from torch 2.4
    on (2.3.1 has only torch.is_autocast_cpu_enabled, which later versions deprecate). Decided by the
    attribute, not a try/except, so that torch.compile traces it."""
    if hasattr(torch, "get_autocast_dtype"):                 # torch >= 2.4, with the device-taking API
        return torch.is_autocast_enabled("cpu")
    return torch.is_autocast_cpu_enabled()


def norm_gelu_linear(x, norm: nn.Module, linear: nn.Linear):
    """linear(gelu(norm(x))) for an RMSNorm `norm`: NormGELULinearCPU in a CPU training pass (fp32),
    else the three modules one after another. (..., C) -> (..., out)"""
    if x.device.type == "cpu" and torch.is_grad_enabled() and not cpu_autocast_enabled():
        return NormGELULinearCPU.apply(x, norm.weight, norm.eps, linear.weight, linear.bias)
    return linear(F.gelu(norm(x)))


class Dropout(nn.Module):
    """nn.Dropout(p) with its mask drawn by torch.rand: on CPU, nn.Dropout's bernoulli_(p) draws other
    masks from the same seed on torch 2.3.1 and 2.13; torch.rand draws the same numbers on both."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return x * (torch.rand_like(x) >= self.p) / (1 - self.p)   # keep with probability 1 - p, rescale


def fused_adamw_ok(device) -> bool:
    """Whether AdamW(fused=True) takes parameters on `device`: CUDA on every tested version, CPU from
    torch 2.4 on. Asks the constructor, which refuses an unsupported device."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except RuntimeError:
        return False
    return True


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for the next step instead of giving it back to the OS. By default
    every block over 32 MiB (the tokenizer's activations) is mmap'ed and unmapped when freed, and the
    next step faults in and zeroes each of its pages again: on a CPU that is system time worth about a
    fifth of a training step. Blocks of 256 MiB and more (at S batch 32, the largest activations) are
    still mmap'ed: kept in the heap too (a 1 GiB threshold), the S step at batch 32 was 4% faster
    with 9% more peak memory, the heap fragmenting (RESULTS.md §4).
    Returns whether the setting took (Linux with glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3              # mallopt parameters (malloc.h)
        # (one arena, M_ARENA_MAX 1, fragments less but made 2-thread steps slower: lock contention)
        return all(libc.mallopt(p, v) for p, v in ((M_MMAP_THRESHOLD, 256 << 20), (M_TRIM_THRESHOLD, 2**31 - 1)))
    except (OSError, AttributeError):                        # not glibc (e.g. musl): keep the default
        return False


# ----------------------------------------------------------------------------------------------
# Config: the single source of truth. Defaults are AsymDSD-S as the official code runs it.
# ----------------------------------------------------------------------------------------------

@dataclass
class Config:
    # data
    data: str = "modelnet40"          # dataset name understood by data.build_dataset
    data_root: str | None = None      # folder or archive; None -> data/<Name>
    source_points: int | None = None  # points per source cloud (None: as stored; meshes give 16384)
    download: bool = False            # fetch ModelNet40 if missing (never without being asked)
    skip_bad: bool = False            # skip unreadable files with a warning and a count (default: stop)
    mode: str = "cls_mask"            # cls_mask (AsymDSD) | cls (invariance only) | mask (MPM only): training_mode
    # multi-crop (configs/data/ShapeNetCore-U.yaml: multi_crop_config; aspect: SampleCropPC's default)
    num_global_crops: int | None = None   # None: the mode's (MODE_DEFAULTS): 2, or 1 in `mask` mode
    global_crop_scale: tuple = (0.4, 1.0)
    global_points: int = 1024
    num_local_crops: int | None = None    # None: 4, or 0 in `mask` mode
    local_crop_scale: tuple = (0.05, 0.4)
    local_points: int = 256
    crop_aspect: tuple = (0.33, 3.0)
    # augmentation per crop: z-rotation U(0, 2pi), anisotropic scale (ShapeNetCore-U.yaml: augmentation_transform)
    scale_range: tuple = (0.8, 1.2)
    # patches (ShapeNetCore-U.yaml: patchify)
    global_patches: int = 64
    local_patches: int = 16
    patch_size: int = 32
    # encoder (configs/ssrl/ssrl_model.yaml: encoder_config, patch_embedding)
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    tokenizer_dims: tuple = (128, 256, 512)  # point_embedding hidden_dims; nested per stage for B and L
    tokenizer_chunks: int = 1         # point_embedding process_num_chunks (B 2, L 4): memory only, same numbers
    pos_hidden: int = 128
    drop_path: float = 0.0            # encoder_config drop_path_p (B 0.2, L 0.4), the same in every block
    # masking (ssrl_model.yaml: mask_generator, InverseBlockPatchMasking)
    mask_ratio: float = 0.7
    num_masks: int | None = None      # multi_mask; None: 4, or 8 in `mask` mode
    block_ratio: float = 0.1
    adjust_ratio: float = 0.1
    # predictor (ssrl_model.yaml: predictor, a TransformerDecoderConfig)
    predictor_dim: int = 192
    predictor_depth: int = 6
    predictor_heads: int = 3
    predictor_attention: str = "cross"  # cross (official: self_attention false) | masked_self | full_self (leaky)
    # projection heads, teacher, losses (ssrl_model.yaml)
    head_hidden: int = 1024
    head_bottleneck: int = 256
    num_prototypes: int = 4096
    center_momentum: float = 0.9              # cls_centering_momentum, patch_centering_momentum
    student_temp: float = 0.1
    teacher_temp_cls: tuple = (0.04, 0.07)    # LinearWarmupSchedule over temp_warmup_epochs
    teacher_temp_patch: tuple = (0.05, 0.07)
    temp_warmup_epochs: int = 10
    ema_momentum: tuple = (0.995, 1.0)        # ema_decay: CosineAnnealingWarmupSchedule, no warm-up
    koleo_weight: float = 0.01                # koleo_loss_weight
    regression_weight: float = 1.0            # smooth-L1 term, `mask` mode only (variants/model/ssrl_model_mask.yaml)
    # optimisation (configs/ssrl/ssrl_optim.yaml)
    epochs: int = 300
    batch_size: int = 128
    lr: float = 5e-4
    lr_start: float = 1e-7
    lr_final: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.05
    grad_clip: float = 10.0
    betas: tuple = (0.9, 0.999)
    # run
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"           # auto (bf16 on CUDA if supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False
    grad_checkpoint: bool = False     # recompute the student's blocks (and B/L tokenizer chunks) in backward
    out: str = "runs/asymdsd"
    num_workers: int = 8
    log_every: int = 10
    ckpt_every: int = 0               # also checkpoint every n steps (0: only at epoch ends)
    snapshot_every: int = 0           # keep <out>/epoch_NNN.pt (teacher + config) every n epochs, for curves
    max_steps: int = 0                # stop after this many steps in total (0: run all epochs); for tests
    init: str | None = None           # start from an official .ckpt's student and teacher (fresh optimizer)
    # evaluation of the teacher while it trains (evaluate.PretrainingEval; ssrl_trainer.yaml callbacks)
    eval_every: int = 0               # linear SVM + kNN every n epochs (0: never)
    eval_data: str | None = None      # benchmark (None: ModelNet40 when present)
    eval_data_root: str | None = None
    eval_linear_epochs: int = 0       # also a frozen linear probe of this many epochs (official 100; 0: none)

    def __post_init__(self):
        for key, value in MODE_DEFAULTS.get(self.mode, MODE_DEFAULTS["cls_mask"]).items():
            if getattr(self, key) is None:
                setattr(self, key, value)


# The paper's three sizes, from configs/ssrl/ssrl.yaml (S) and configs/ssrl/variants/model/ssrl_model_{base,
# large}.yaml merged on top (B, L): encoder_config, predictor_config, projection_head_config, patch_embedding.
SMALL = {}                      # AsymDSD-S exactly as the official ShapeNet pretraining (the Config defaults)
BASE = dict(embed_dim=768, depth=12, num_heads=12, drop_path=0.2,
            tokenizer_dims=((256, 512, 1024), (2048,)), tokenizer_chunks=2,
            predictor_dim=384, predictor_depth=6, predictor_heads=6)
LARGE = dict(embed_dim=1024, depth=24, num_heads=16, drop_path=0.4,
             tokenizer_dims=((256, 512, 1024), (2048,)), tokenizer_chunks=4,
             predictor_dim=512, predictor_depth=6, predictor_heads=8, head_hidden=2048)

PRESETS = {
    "small": SMALL,
    "base": BASE,
    "large": LARGE,
    # `paper` is `small` under its first name: commands and records that say --preset paper keep working.
    "paper": SMALL,
    # A small model for CPU: 19 ModelNet40 epochs in under half an hour on 2 cores (RESULTS.md).
    # Crops keep 512 / 128 points in 16-point patches, because per-point tokenizer work dominates
    # a small model on CPU; D = 96 and a 512-prototype head cut the rest.
    "tiny": dict(embed_dim=96, depth=4, num_heads=3, tokenizer_dims=(32, 64, 64), pos_hidden=64,
                 global_points=512, local_points=128, global_patches=32, local_patches=8, patch_size=16,
                 # NOTE: (departure 10) official multi-crop has 4 local crops; 2 buy more epochs in the
                 # same time, which scored higher in short runs (RESULTS.md, "How the tiny preset was chosen").
                 num_local_crops=2,
                 predictor_dim=64, predictor_depth=2, predictor_heads=2, num_masks=2,
                 head_hidden=128, head_bottleneck=64, num_prototypes=512,
                 batch_size=32, epochs=19, warmup_epochs=1, temp_warmup_epochs=1, lr=5e-4,
                 # NOTE: (departure 10) official EMA is a cosine 0.995 -> 1.0, sized for 300 epochs; in 19
                 # epochs it freezes the evaluated teacher for the second half. A constant 0.998 keeps it following.
                 ema_momentum=(0.998, 0.998), num_workers=0),
}


# The crop and mask counts a mode implies. The `mask` variant (variants/model/ssrl_model_mask.yaml) has no
# multi-crop, one global crop, and 8 masks (multi_mask); it replaces a preset's counts, as the official variant
# file replaces the base config's. A value given explicitly (a flag, --set, a Config argument) wins over both.
MODE_DEFAULTS = {"cls_mask": dict(num_global_crops=2, num_local_crops=4, num_masks=4),
                 "cls": dict(num_global_crops=2, num_local_crops=4, num_masks=4),
                 "mask": dict(num_global_crops=1, num_local_crops=0, num_masks=8)}


def preset_settings(preset: str, mode: str | None = None) -> dict:
    """A preset's settings for a mode: in `mask` mode the variant's crop and mask counts replace the preset's."""
    settings = dict(PRESETS[preset])
    if (mode or settings.get("mode")) == "mask":
        settings.update(MODE_DEFAULTS["mask"], mode="mask")
    return settings


def config_from_dict(saved: dict) -> Config:
    """The Config stored in a checkpoint (lists back to tuples; keys of older versions ignored). A `mask`
    run's crop counts are the mode's: make_views cuts one global crop and no local ones whatever they say."""
    names = {f.name for f in dataclasses.fields(Config)}
    nested = lambda v: tuple(nested(x) for x in v) if isinstance(v, (list, tuple)) else v
    values = {k: nested(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}
    if values.get("mode") == "mask":
        values.update(num_global_crops=1, num_local_crops=0)
    return Config(**values)


def parameter_counts(cfg: Config) -> dict:
    """Parameters per part, counted as the official code's modules hold them (the model is built on the
    meta device: shapes only, no memory). tokenizer = tokenizer + position MLP; predictor without the
    mask token (a top-level official parameter); heads are each one projection head."""
    with torch.device("meta"):
        model = AsymDSD(cfg)
    count = lambda module: sum(p.numel() for n, p in module.named_parameters() if n != "mask_token")
    s = model.student
    return dict(encoder=count(s["encoder"]), tokenizer=count(s["encoder"].tokenizer) + count(s["encoder"].pos_embed),
                predictor=count(s["predictor"]) if "predictor" in s else 0,
                cls_head=count(s["cls_head"]) if "cls_head" in s else 0,
                patch_head=count(s["patch_head"]) if "patch_head" in s else 0)


def encoder_kwargs(cfg: Config) -> dict:
    """The PointEncoder arguments of a config: the one place where encoder sizes leave the Config."""
    return dict(dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                tokenizer_dims=tuple(cfg.tokenizer_dims), pos_hidden=cfg.pos_hidden, cls_token=cfg.mode != "mask",
                tokenizer_chunks=cfg.tokenizer_chunks)


# ----------------------------------------------------------------------------------------------
# 1. Views: point-cloud multi-crop, augmentation, normalisation (batched on the training device)
# ----------------------------------------------------------------------------------------------

def random_rotations(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """n uniformly random 3D rotation matrices (n, 3, 3), from normalised Gaussian quaternions."""
    # NOTE: (departure 1) official draws scipy Rotation.random() per crop on the CPU; the same (Haar)
    # distribution, batched on the device.
    q = torch.randn(n, 4, generator=generator, device=device)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=1).view(n, 3, 3)


def multi_crop(points: torch.Tensor, num_crops: int, num_points: int, scale: tuple, aspect: tuple,
               generator: torch.Generator) -> torch.Tensor:
    """Cut `num_crops` random box crops from every cloud (official asymdsd/data/multi_crop.py, SampleCropPC).

    Per crop: a random rotation R orients the box (the points themselves are not rotated), a
    fraction s ~ U(scale) of the N source points (at least num_points) nearest to a random source
    point c under the anisotropic Chebyshev distance max_a |f_a (R (p - c))_a| is kept, with the
    axis factors f a random permutation of [1, 1/sqrt(a), sqrt(a)], a ~ U(aspect); then num_points
    of those are drawn uniformly without replacement.
    points: (B, N, 3) -> crops (B, num_crops, num_points, 3)
    """
    B, N, _ = points.shape
    if N < num_points:
        raise ValueError(f"clouds have {N} points but a crop needs {num_points}; "
                         f"use a dataset with at least {num_points} points per shape")
    dev, R = points.device, B * num_crops
    src = points.repeat_interleave(num_crops, dim=0)                               # (R, N, 3)
    rot = random_rotations(R, generator, dev)                                       # (R, 3, 3)
    s = torch.empty(R, device=dev).uniform_(*scale, generator=generator)
    keep = (s * N).long().clamp(min=num_points)                                     # (R,) int(s*N), >= num_points
    a = torch.empty(R, device=dev).uniform_(*aspect, generator=generator)
    factors = torch.stack([torch.ones_like(a), a.rsqrt(), a.sqrt()], dim=1)         # (R, 3)
    perm = torch.rand(R, 3, generator=generator, device=dev).argsort(dim=1)
    factors = factors.gather(1, perm)                                               # random axis order
    centre_idx = torch.randint(0, N, (R, 1, 1), generator=generator, device=dev).expand(R, 1, 3)
    rel = src - src.gather(1, centre_idx)                                           # (R, N, 3) p - c
    dist = ((rel @ rot.transpose(1, 2)) * factors[:, None]).abs().amax(dim=2)      # (R, N) box distance
    order = dist.argsort(dim=1)                                                     # nearest first
    # Uniform subsample without replacement of the `keep` nearest: random keys for them, 2 otherwise.
    key = torch.rand(R, N, generator=generator, device=dev)
    key = torch.where(torch.arange(N, device=dev) < keep[:, None], key, 2.0)
    pick = order.gather(1, key.topk(num_points, dim=1, largest=False).indices)      # (R, num_points)
    crops = src.gather(1, pick[..., None].expand(-1, -1, 3))
    return crops.view(B, num_crops, num_points, 3)


def augment_crops(crops: torch.Tensor, scale_range: tuple, generator: torch.Generator) -> torch.Tensor:
    """Independent random z-rotation U(0, 2pi) and anisotropic scale U(scale_range)^3 per crop
    (official RandomRotateAxisPC, RandomAnisotropicScalePC).
    crops: (..., n, 3) -> (..., n, 3)"""
    lead = crops.shape[:-2]
    n = math.prod(lead)
    theta = torch.rand(n, device=crops.device, generator=generator) * (2 * math.pi)
    cos, sin, zero, one = theta.cos(), theta.sin(), torch.zeros_like(theta), torch.ones_like(theta)
    rot_z = torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], 1).view(n, 3, 3)
    scale = torch.empty(n, 1, 3, device=crops.device).uniform_(*scale_range, generator=generator)
    x = crops.reshape(n, -1, 3) @ rot_z.transpose(1, 2) * scale
    return x.view(crops.shape)


def normalize_unit_sphere(points: torch.Tensor) -> torch.Tensor:
    """Centre each cloud on its mean and divide by its largest point norm (NormalizeUnitSpherePC).
    points: (..., n, 3) -> (..., n, 3)"""
    x = points - points.mean(dim=-2, keepdim=True)
    return x / x.norm(dim=-1).amax(dim=-1)[..., None, None].clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------
# 2. Patches: farthest point sampling centres + kNN groups (plain batched PyTorch)
# ----------------------------------------------------------------------------------------------

def farthest_point_sample(xyz: torch.Tensor, num_samples: int, start_idx: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact farthest point sampling, batched. Each new centre is the point farthest from all
    centres chosen so far (ties: lowest index). Start from `start_idx` (B,) or a random point.
    xyz: (B, N, 3) -> indices (B, G) in selection order"""
    B, N, _ = xyz.shape
    if start_idx is None:
        start_idx = torch.randint(0, N, (B,), device=xyz.device, generator=generator)
    # x, y, z as contiguous (B, N) planes: faster than ((xyz - c) ** 2).sum(-1) on CPU, with
    # bit-identical distances.
    x, y, z = (c.contiguous() for c in xyz.unbind(-1))
    idx = torch.empty(B, num_samples, dtype=torch.long, device=xyz.device)
    min_dist = torch.full((B, N), float("inf"), device=xyz.device, dtype=xyz.dtype)  # to the chosen set
    cur = start_idx.to(xyz.device)[:, None]                                              # (B, 1)
    for g in range(num_samples):  # sequential by definition; batched over clouds
        idx[:, g] = cur[:, 0]
        d = (x - x.gather(1, cur)).square_()
        d += (y - y.gather(1, cur)).square_()
        d += (z - z.gather(1, cur)).square_()                                            # (B, N)
        torch.minimum(min_dist, d, out=min_dist)
        cur = min_dist.argmax(dim=1, keepdim=True)
    return idx


def knn_group(xyz: torch.Tensor, centers: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k nearest points of every centre, nearest first (the centre itself first).
    xyz: (B, N, 3), centers: (B, G, 3) -> (B, G, K)"""
    # Exact differences (not the |a|^2 - 2ab + |b|^2 matmul form) so that ties and the order of
    # near-equal neighbours match a KD-tree query.
    d = torch.cdist(centers, xyz, compute_mode="donot_use_mm_for_euclid_dist")      # (B, G, N)
    return d.topk(k, dim=2, largest=False, sorted=True).indices


def patchify(points: torch.Tensor, num_patches: int, patch_size: int,
             generator: torch.Generator | None = None, start_idx: torch.Tensor | None = None):
    """Split normalised clouds into patches: FPS centres, their kNN, points relative to the centre
    (official asymdsd/data/patchify.py, PatchifyPC). points: (B, N, 3) -> centers (B, G, 3), patches (B, G, K, 3)"""
    # NOTE: (departure 1) official runs fpsample / scipy KDTree per sample in CPU workers, before the
    # normalisation; here the same exact FPS + kNN run batched on the device (they commute with it).
    centers_idx = farthest_point_sample(points, num_patches, start_idx, generator)    # (B, G)
    centers = points.gather(1, centers_idx[..., None].expand(-1, -1, 3))             # (B, G, 3)
    patches_idx = knn_group(points, centers, patch_size)                             # (B, G, K)
    B, G, K = patches_idx.shape
    patches = points.gather(1, patches_idx.view(B, G * K, 1).expand(-1, -1, 3)).view(B, G, K, 3)
    return centers, patches - centers[:, :, None]


# ----------------------------------------------------------------------------------------------
# 3. Tokens: building blocks, the mini-PointNet patch tokenizer, the positional MLP
# ----------------------------------------------------------------------------------------------

INIT_STD = 0.02  # trunc-normal std of every Linear weight and of the CLS / mask tokens (init_weight_scale)


class Linear(nn.Linear):
    """nn.Linear initialised as the official `AsymDSD.init_weights`: weight ~ trunc-normal(0.02), bias 0."""

    def reset_parameters(self):
        trunc_normal_(self.weight, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, no bias (official asymdsd/layers/normalization.py)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def max_pool(x, keepdim: bool = False):
    """Max over the K points of each patch. (..., K, C) -> (..., C), or (..., 1, C) with keepdim"""
    # NOTE: (departure 25) official torch.amax, whose backward splits the gradient evenly between tied
    # maxima; max().values gives it to one of them. The same forward; the same parameter gradients
    # (ties come from duplicated points, whose identical rows pass their gradient to the same weights);
    # half the backward passes over the largest tensors of the step.
    return x.max(dim=-2, keepdim=keepdim).values


def linear_of_concat(linear: nn.Linear, point, pooled):
    """linear(cat([point, pooled expanded over K])) computed as the sum of the two halves of its
    weight: the pooled half once per patch, not once per point.
    point (..., K, a), pooled (..., 1, a) -> (..., K, out)"""
    # NOTE: (departure 26) official concatenates [point, pooled] (a (..., K, 2a) tensor) and applies one
    # Linear. The same numbers (within fp32 rounding) with 25% fewer tokenizer FLOPs for S and no
    # concatenated tensor; the Linear keeps its (out, 2a) weight, so checkpoints are unchanged.
    w_point, w_pooled = linear.weight.split(point.shape[-1], dim=1)
    return F.linear(point, w_point, linear.bias) + F.linear(pooled, w_pooled)


class PatchTokenizer(nn.Module):
    """Mini-PointNet per patch: 3->h1->h2, max-pool, concat [point, pooled], 2*h2->h3->D, max-pool.
    RMSNorm + GELU, no biases (official asymdsd/layers/tokenization.py, MemEfficientPointMaxEmbedding)."""

    def __init__(self, dim: int, hidden: tuple = (128, 256, 512)):
        super().__init__()
        h1, h2, h3 = hidden
        self.block_1 = nn.Sequential(Linear(3, h1, bias=False), RMSNorm(h1), nn.GELU(), Linear(h1, h2, bias=False))
        self.block_2 = nn.Sequential(Linear(2 * h2, h3, bias=False), RMSNorm(h3), nn.GELU(), Linear(h3, dim, bias=False))

    def forward(self, patches):                                       # (..., K, 3)
        linear_1, norm_1, _, linear_2 = self.block_1                  # _: the GELU, applied by norm_gelu_linear
        linear_3, norm_2, _, linear_4 = self.block_2
        f = norm_gelu_linear(linear_1(patches), norm_1, linear_2)     # (..., K, h2)
        pooled = max_pool(f, keepdim=True)                            # (..., 1, h2)
        h = linear_of_concat(linear_3, f, pooled)                     # (..., K, h3): Linear([point, pooled])
        return max_pool(norm_gelu_linear(h, norm_2, linear_4))        # (..., K, D) -> (..., D)


class TwoStageTokenizer(nn.Module):
    """The B and L tokenizer (official VarMemEfficientPointMaxEmbedding): stage MLPs with max-pool
    between them. Stage 1: 3->a1->..->an per point; max-pool over the K points; concat [point, pooled];
    stage 2: 2*an->b1->..->D per point; max-pool. Each hidden layer is Linear, RMSNorm, GELU, Dropout
    (p = 0 in every official config, so an Identity holds its place and the official indices 4h..4h+3
    keep their meaning). Every Linear has a bias: the official class does not pass its `bias: false` on.
    hidden: ((256, 512, 1024), (2048,)) for B and L. Chunks of the B*P patches run one after another
    (official process_num_chunks): less peak memory, the same numbers."""

    def __init__(self, dim: int, hidden: tuple = ((256, 512, 1024), (2048,)), num_chunks: int = 1):
        super().__init__()
        widths, stages = 3, []
        for i, dims in enumerate(hidden):
            sizes = [widths, *dims] + ([dim] if i == len(hidden) - 1 else [])
            layers = []
            for a, b in zip(sizes[:-2], sizes[1:-1]):
                layers += [Linear(a, b), RMSNorm(b), nn.GELU(), nn.Identity()]
            stages.append(nn.Sequential(*layers, Linear(sizes[-2], sizes[-1])))
            widths = 2 * sizes[-1]
        self.stages = nn.ModuleList(stages)
        self.num_chunks = num_chunks
        self.grad_checkpoint = False  # official allow_grad_ckpt: true for this tokenizer; set on the student

    @staticmethod
    def stage_mlp(stage: nn.Sequential, x):
        """The hidden layers of one stage after its first Linear: (norm, GELU, Dropout, Linear) each."""
        for i in range(1, len(stage), 4):
            x = norm_gelu_linear(x, stage[i], stage[i + 3])          # stage[i + 1], [i + 2]: GELU, Dropout(0)
        return x

    def embed(self, x):                                               # (N, K, 3) -> (N, D)
        x = self.stage_mlp(self.stages[0], self.stages[0][0](x))      # (N, K, a): stage 1, per point
        for stage in self.stages[1:]:
            pooled = max_pool(x, keepdim=True)                        # (N, 1, a)
            x = self.stage_mlp(stage, linear_of_concat(stage[0], x, pooled))  # (N, K, b): on [point, pooled]
        return max_pool(x)                                            # (N, D)

    def forward(self, patches):                                       # (..., K, 3)
        x = patches.reshape(-1, *patches.shape[-2:])                  # (N, K, 3)
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        embed = (lambda c: torch.utils.checkpoint.checkpoint(self.embed, c, use_reentrant=False)) if recompute else self.embed
        out = torch.cat([embed(c) for c in x.chunk(self.num_chunks, dim=0)], dim=0)
        return out.reshape(*patches.shape[:-2], -1)                   # (..., D)


def make_tokenizer(dim: int, hidden: tuple, num_chunks: int = 1) -> nn.Module:
    """S's PatchTokenizer for a flat (h1, h2, h3); the two-stage tokenizer for nested stage widths."""
    if all(isinstance(h, int) for h in hidden):
        return PatchTokenizer(dim, tuple(hidden))
    return TwoStageTokenizer(dim, tuple(tuple(h) for h in hidden), num_chunks)


class PositionEmbedding(nn.Module):
    """Linear(3->h) -> GELU -> Linear(h->D), with biases, of the patch centre (official
    PositionEmbedding with normalize: false)."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(Linear(3, hidden), nn.GELU(), Linear(hidden, dim))

    def forward(self, centers):                                       # (..., 3) -> (..., D)
        return self.mlp(centers)


# ----------------------------------------------------------------------------------------------
# 4. Masks: inverse-block multi-mask, and the views of one step
# ----------------------------------------------------------------------------------------------

def inverse_block_masks(centers: torch.Tensor, num_masks: int, mask_ratio: float = 0.7, block_ratio: float = 0.1,
                        adjust_ratio: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Masks whose *visible* part is a few blocks of neighbouring patches (InverseBlockPatchMasking).

    Per row (every crop repeated M times, independent draws): pick n_c distinct random patches,
    make each one's `block` nearest patches (itself included) visible, then fix the count exactly:
    a random order with non-block patches before block patches, the first Q of it are masked.
    With G = 64: Q = round(0.7 * 64) = 45 masked, 19 visible; block = 6; n_c = round(64*0.4/6) = 4.
    centers: (R, G, 3) -> mask (R*M, G) bool, True = masked, exactly Q per row; row r*M+m is crop r.
    """
    R, G, _ = centers.shape
    num_masked = round(mask_ratio * G)
    block = max(int(block_ratio * G), 1)
    num_blocks = max(round(G * (1 - mask_ratio + adjust_ratio) / block), 1)
    dev = centers.device
    neighbours = torch.cdist(centers, centers).topk(block, dim=2, largest=False).indices  # (R, G, block)
    neighbours = neighbours.repeat_interleave(num_masks, dim=0)                           # (R*M, G, block)
    rows = R * num_masks
    seeds = torch.rand(rows, G, generator=generator, device=dev).argsort(dim=1)[:, :num_blocks]  # distinct
    members = neighbours.gather(1, seeds[..., None].expand(-1, -1, block)).flatten(1)     # (R*M, n_c*block)
    in_block = torch.zeros(rows, G, dtype=torch.bool, device=dev).scatter_(1, members, True)
    key = torch.rand(rows, G, generator=generator, device=dev) + in_block                 # block patches last
    masked_idx = key.topk(num_masked, dim=1, largest=False).indices
    return torch.zeros(rows, G, dtype=torch.bool, device=dev).scatter_(1, masked_idx, True)


def split_mask(mask: torch.Tensor, num_masked: int):
    """Visible and masked patch indices, each in ascending patch order, with no host sync.
    mask: (R, G) bool with exactly `num_masked` True per row -> visible (R, V), masked (R, Q)"""
    order = mask.to(torch.int8).argsort(dim=1, stable=True)  # visible (0) first, each part ascending
    return order[:, : mask.shape[1] - num_masked], order[:, mask.shape[1] - num_masked:]


def make_views(points: torch.Tensor, cfg: Config, generator: torch.Generator) -> dict:
    """The inputs of one training step: global (and local) crops, augmented, normalised and
    patchified, and the student's M masks of every global crop. The `mask` mode cuts a single
    global crop and no local ones (the official code drops multi-crop in that mode). Every random
    draw of a step happens here, outside the model, so the model's forward is one graph for
    torch.compile (a draw from an explicit generator would break it).
    points (B, N, 3) -> {"global": (centers (B, C, G, 3), patches (B, C, G, K, 3)), "local": ...,
                         "mask": (B*C*M, G) bool, True = masked, row (b*C + c)*M + m}"""
    views = {}
    crops = {"global": (cfg.num_global_crops, cfg.global_points, cfg.global_crop_scale, cfg.global_patches)}
    if cfg.mode == "mask":
        crops = {"global": (1, cfg.global_points, cfg.global_crop_scale, cfg.global_patches)}
    elif cfg.num_local_crops > 0:
        crops["local"] = (cfg.num_local_crops, cfg.local_points, cfg.local_crop_scale, cfg.local_patches)
    for name, (n_crops, n_points, scale, n_patches) in crops.items():
        x = multi_crop(points, n_crops, n_points, scale, cfg.crop_aspect, generator)    # (B, c, n, 3)
        x = normalize_unit_sphere(augment_crops(x, cfg.scale_range, generator))
        B = x.shape[0]
        centers, patches = patchify(x.flatten(0, 1), n_patches, cfg.patch_size, generator)
        views[name] = (centers.view(B, n_crops, *centers.shape[1:]),
                       patches.view(B, n_crops, *patches.shape[1:]))
    if cfg.mode != "cls":  # multi-mask: M independent masks per global crop
        views["mask"] = inverse_block_masks(views["global"][0].flatten(0, 1), cfg.num_masks, cfg.mask_ratio,
                                            cfg.block_ratio, cfg.adjust_ratio, generator)
    return views


# ----------------------------------------------------------------------------------------------
# 5. Encoder: pre-RMSNorm transformer, no biases, position added before every block
# ----------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention with a packed q/k/v projection and no biases. Queries come from x,
    keys and values from `keys` (self-attention when `keys` is x).
    attn_mask (bool, True = may attend) broadcasts to (B, H, Tq, Tk)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # rows: [q; k; v] as nn.MultiheadAttention packs them
        # nn.MultiheadAttention's own init of its packed in_proj_weight (xavier-uniform over (3D, D)):
        # the official trunc-normal init only reaches nn.Linear modules, and in_proj_weight is not one.
        nn.init.xavier_uniform_(self.qkv.weight)
        self.proj = Linear(dim, dim, bias=False)

    def forward(self, x, keys, attn_mask=None):                          # x (B, Tq, D), keys (B, Tk, D)
        if keys is x:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            wq, wkv = self.qkv.weight.split([x.shape[-1], 2 * x.shape[-1]])
            q = F.linear(x, wq)
            k, v = F.linear(keys, wkv).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=self.num_heads) for t in (q, k, v))
        # NOTE: (departure 5) official uses nn.MultiheadAttention; SDPA computes the same, with fused kernels.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, Tq, D/H)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=False)
        self.fc2 = Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x, rate: float, training: bool):
    """Stochastic depth: zero the residual branch of a random fraction `rate` of the samples and
    rescale the rest by 1/(1-rate). Pretraining: off for S, 0.2 for B, 0.4 for L; fine-tuning: 0.2."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= rate   # (B, 1, 1)
    return x * keep / (1 - rate)


class Block(nn.Module):
    """x += pos; x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)): pre-norm, position added before
    every block (add_pos_enc_every_layer). An encoder block self-attends. A predictor block is
    given the context and a `query_form`, and its queries attend to what masked_query_attention
    allows."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, pos, context=None, query_form: str = "cross"):  # x, pos (B, T, D); context (B, Tc, D)
        x = x + pos
        h = self.norm1(x)
        keys, attn_mask = (h, None) if context is None else masked_query_attention(h, context, query_form)
        x = x + drop_path(self.attn(h, keys, attn_mask), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class TransformerEncoder(nn.Module):
    """A stack of pre-norm blocks and a final RMSNorm. Returns the normed output and, on request,
    every block's output before the final norm."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 uniform_drop_path: bool = False):
        super().__init__()
        # Fine-tuning: rising linearly over depth. Pretraining B and L: the same rate in every block
        # (encoder_config uniform_drop_path: true).
        # NOTE: (departure 13) official B/L pretraining uses efficient_drop_path: exactly round((1-p) B) samples
        # kept (torch.randperm), the branch computed on those only. Here each sample is kept with probability
        # 1-p (a Bernoulli draw, as official drop_path): the same expected rate and scaling, another count per batch.
        rates = [drop_path] * depth if uniform_drop_path else torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = RMSNorm(dim)
        self.grad_checkpoint = False  # set on the student by AsymDSD (Config.grad_checkpoint)

    def forward(self, x, pos, return_hidden: bool = False):            # (B, T, D), (B, T, D)
        # NOTE: (departure 4) official checkpoints the student's blocks by default (gradient_checkpointing:
        # true); here it is --grad-checkpoint, off by default: AsymDSD-S fits without, and steps are faster.
        hidden = []
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            # Non-reentrant checkpointing restores the RNG state, so a recomputed block drops the same paths.
            x = torch.utils.checkpoint.checkpoint(blk, x, pos, use_reentrant=False) if recompute else blk(x, pos)
            hidden.append(x)
        return (self.norm(x), hidden) if return_hidden else self.norm(x)


class PointEncoder(nn.Module):
    """Tokenizer + positional MLP + CLS token + transformer: the network evaluate.py uses and the
    part of the model the released checkpoints hold (`teacher.point_encoder.*`)."""

    def __init__(self, dim=384, depth=12, num_heads=6, mlp_ratio=4.0, tokenizer_dims=(128, 256, 512),
                 pos_hidden=128, cls_token=True, drop_path=0.0, tokenizer_chunks=1, uniform_drop_path=False):
        super().__init__()
        self.tokenizer = make_tokenizer(dim, tokenizer_dims, tokenizer_chunks)
        self.pos_embed = PositionEmbedding(dim, pos_hidden)
        # One CLS token with a zero positional encoding; absent in the `mask` mode.
        self.cls_token = nn.Parameter(trunc_normal_(torch.empty(1, 1, dim), std=INIT_STD)) if cls_token else None
        self.encoder = TransformerEncoder(dim, depth, num_heads, mlp_ratio, drop_path, uniform_drop_path)

    def embed(self, patches, centers):
        """patches (B, G, K, 3), centers (B, G, 3) -> tokens (B, G, D), pos (B, G, D)"""
        return self.tokenizer(patches), self.pos_embed(centers)

    def encode(self, tokens, pos, return_hidden=False):
        """Prepend CLS (zero position) and run the transformer.
        tokens, pos: (B, T, D) -> (B, 1 + T, D) with CLS first (or (B, T, D) without a CLS token)"""
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], 1)
            pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], 1)
        return self.encoder(tokens, pos, return_hidden)

    def forward(self, patches, centers, return_hidden=False):
        return self.encode(*self.embed(patches, centers), return_hidden=return_hidden)


# ----------------------------------------------------------------------------------------------
# 6. Predictor: masked queries see the context, never each other
# ----------------------------------------------------------------------------------------------

def masked_query_attention(queries: torch.Tensor, context: torch.Tensor, form: str = "cross"):
    """What the predictor's masked queries attend to. The paper's rule: masked queries do not attend
    to each other, so the prediction at one masked patch cannot use where the other masked patches
    are (that would leak the shape). Checked by test_masked_query_does_not_see_other_masked_queries.

    form "cross" (official, self_attention false): keys = context; queries see no query at all.
    form "masked_self": keys = [context ; queries], each query sees the context and itself only:

                      keys:  c_1 ... c_T | q_1 q_2 q_3
        query q_1             1  ...  1  |  1   0   0
        query q_2             1  ...  1  |  0   1   0         1 = may attend (the SDPA convention;
        query q_3             1  ...  1  |  0   0   1         the official code builds the complement)

    form "full_self": keys = [context ; queries], no mask: queries see each other (the leaky ablation).
    queries (R, Q, E) after the block's norm, context (R, T, E) -> keys (R, Tk, E), attn_mask (Q, Tk) or None
    """
    if form == "cross":
        return context, None
    if form not in ("masked_self", "full_self"):
        raise ValueError(f"predictor attention must be cross, masked_self or full_self, not {form!r}")
    keys = torch.cat([context, queries], dim=1)                                       # (R, T + Q, E)
    if form == "full_self":
        return keys, None
    Q, T = queries.shape[1], context.shape[1]
    sees_context = torch.ones(Q, T, dtype=torch.bool, device=queries.device)
    sees_itself = torch.eye(Q, dtype=torch.bool, device=queries.device)
    return keys, torch.cat([sees_context, sees_itself], dim=1)                        # (Q, T + Q)


class Predictor(nn.Module):
    """Predicts the encoder's tokens at the masked positions from the visible context.

    One shared Linear(D->E, bias) projects the mask token, the query positions and the context
    (the official ProjectionWrapper); E-wide pre-norm blocks add the query position before every
    block; a final RMSNorm; Linear(E->D, bias) back out. `attention` is the query form of
    masked_query_attention: cross (official), masked_self, or full_self (leaky ablation).
    """

    def __init__(self, dim: int, pred_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 attention: str = "cross"):
        super().__init__()
        if attention not in ("cross", "masked_self", "full_self"):
            raise ValueError(f"predictor attention must be cross, masked_self or full_self, not {attention!r}")
        self.attention = attention
        # NOTE: (departure 6) official keeps `mask_token` at the top of the model; it is the predictor's here.
        self.mask_token = nn.Parameter(trunc_normal_(torch.empty(1, 1, dim), std=INIT_STD))  # every query's
        self.embed = Linear(dim, pred_dim)                   # shared by queries, positions and context
        self.blocks = nn.ModuleList(Block(pred_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = RMSNorm(pred_dim)
        self.proj = Linear(pred_dim, dim)

    def forward(self, context, query_pos):          # context (R, T, D), query_pos (R, Q, D) -> (R, Q, D)
        R, Q, _ = query_pos.shape
        memory = self.embed(context)                                      # (R, T, E)
        pos = self.embed(query_pos)                                       # (R, Q, E)
        q = self.embed(self.mask_token).to(pos.dtype).expand(R, Q, -1)    # (R, Q, E)
        for blk in self.blocks:
            q = blk(q, pos, context=memory, query_form=self.attention)
        return self.proj(self.norm(q))


# ----------------------------------------------------------------------------------------------
# 7. Heads: prototype projection heads and the teacher's centering
# ----------------------------------------------------------------------------------------------

class ProjectionHead(nn.Module):
    """MLP D->h->h->b (GELU, biases), L2-normalise, weight-normalised Linear(b->P) with a bias and
    a trainable gain (official asymdsd/layers/projection_head.py)."""
    # NOTE: (departure 7) official wraps the last Linear in parametrizations.weight_norm; written out
    # here (w = g * v / |v|, the same g and v tensors) so the class copies out without parametrizations.

    def __init__(self, dim: int, hidden: int = 1024, bottleneck: int = 256, num_prototypes: int = 4096):
        super().__init__()
        self.mlp = nn.Sequential(Linear(dim, hidden), nn.GELU(), Linear(hidden, hidden), nn.GELU(),
                                 Linear(hidden, bottleneck))
        # v keeps PyTorch's default Linear init and g = |v|: the official trunc-normal init writes into
        # the weight that the parametrization recomputes, so it never reaches v. The bias is zeroed.
        prototypes = nn.Linear(bottleneck, num_prototypes)
        self.weight_v = nn.Parameter(prototypes.weight.detach().clone())                    # (P, b) direction
        self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=1, keepdim=True))      # (P, 1) gain
        self.bias = nn.Parameter(torch.zeros(num_prototypes))                               # (P,)

    def forward(self, x):                                                   # (..., D) -> (..., P)
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight, self.bias)


class Centering(nn.Module):
    """Subtract a running mean of the teacher logits (the old centre), then update it with momentum
    (official asymdsd/layers/centering.py); the batch mean is averaged over ranks under DDP."""

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))

    @torch.no_grad()
    def forward(self, logits):                                              # (..., P) -> (..., P)
        out = logits - self.center
        if self.training:
            mean = logits.flatten(0, -2).float().mean(dim=0)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            self.center.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)
        return out


# ----------------------------------------------------------------------------------------------
# 8. Losses: masked-patch distillation, CLS invariance distillation, KoLeo
# ----------------------------------------------------------------------------------------------

def patch_loss(student_logits, teacher_probs, student_temp: float):
    """Masked-patch loss (iBOT-style, official asymdsd/loss/patch_loss.py): mean over masked tokens
    of -sum_P p_teacher log softmax(s / tau_s).  (n, P), (n, P) -> ()"""
    return -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1).mean()


def cls_loss(student_logits, teacher_probs, student_temp: float):
    """Invariance loss (DINO-style, official asymdsd/loss/cls_loss.py): mean over every (sample,
    teacher crop, student crop) pair; same-view pairs are kept, as in the official code.
    student (B, S, P), teacher (B, T, P) -> ()"""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    # NOTE: (departure 8) official runs this einsum in fp16 under autocast; it stays fp32 here (bf16
    # would round the log-probabilities to 3 significant digits). Identical in fp32.
    with torch.autocast(log_p.device.type, enabled=False):
        return -torch.einsum("btp,bsp->bts", teacher_probs.float(), log_p).mean()


def koleo_loss(x, eps: float = 1e-6):
    """KoLeo regulariser (official asymdsd/loss/koleo_loss.py): per view column, -mean log of the
    distance to the nearest other sample of the batch, after L2 normalisation.  x (B, S, D) -> ()"""
    # NOTE: (departure 8) official computes the similarities in fp16 under autocast; here fp32: near 1
    # they tie in fp16 and bf16, and the argmax then picks a farther sample. Identical in fp32.
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1, eps=eps).transpose(0, 1)                # (S, B, D)
        sim = x @ x.transpose(1, 2)                                                 # (S, B, B)
        eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        nearest = sim.masked_fill(eye, -1.0).argmax(dim=2)                          # (S, B)
        other = x.gather(1, nearest[..., None].expand_as(x))
        # nn.PairwiseDistance, as the official calls it, adds its own eps 1e-6 to the difference
        # inside the norm; the loss then adds eps again outside it.
        return -torch.log((x - other + 1e-6).norm(dim=-1) + eps).mean()


# ----------------------------------------------------------------------------------------------
# 9. AsymDSD: the student, the EMA teacher, and the loss of one step
# ----------------------------------------------------------------------------------------------

@dataclass
class TeacherTargets:
    """What the EMA teacher gives the losses, from the full, unmasked global crops."""
    cls: torch.Tensor | None = None      # (B, C, P) CLS probabilities (cls_mask, cls modes)
    patch: torch.Tensor | None = None    # (B*C, G, P) probabilities of every patch token (cls_mask, mask)
    tokens: torch.Tensor | None = None   # (B*C, G, D) patch tokens: the `mask` mode's regression target


@dataclass
class StudentOutputs:
    """What the student's passes give the losses. CLS rows are grouped per sample: (B, views, .)."""
    masked: torch.Tensor | None = None        # (B*C*M, Q) masked patch indices of every masked view
    pred: torch.Tensor | None = None          # (B*C*M, Q, D) predicted tokens at those patches
    patch_logits: torch.Tensor | None = None  # (B*C*M, Q, P) patch head on the predictions
    cls_global: torch.Tensor | None = None    # (B, 1 or C, P) CLS head on unmasked global crops
    cls_masked: torch.Tensor | None = None    # (B, C*M, P) CLS head on the masked views
    cls_local: torch.Tensor | None = None     # (B, L, P) CLS head on the local crops
    emb_global: torch.Tensor | None = None    # (B, 1 or C, D) CLS embeddings (KoLeo's input)
    emb_masked: torch.Tensor | None = None    # (B, C*M, D)


class AsymDSD(nn.Module):
    """Student (encoder, predictor, heads) and EMA teacher (encoder, heads, centres).

    forward(views, ...) = forward_teacher -> forward_student -> forward_loss, so one call (and one
    DistributedDataParallel forward) is one training step's loss; update_teacher is the EMA.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.mode not in ("cls_mask", "cls", "mask"):
            raise ValueError(f"mode must be cls_mask, cls or mask, not {cfg.mode!r}")
        if cfg.mode != "mask" and cfg.num_global_crops != 2:
            raise ValueError("the CLS loss compares the two global crops: num_global_crops must be 2")
        self.cfg = cfg
        self.use_cls, self.use_patch = cfg.mode != "mask", cfg.mode != "cls"
        # B and L drop paths in pretraining. The teacher is built from the same encoder config and is in train
        # mode during the official fit (no .eval() on it in asymdsd/models/asymdsd.py), so its copy drops too.
        student = {"encoder": PointEncoder(**encoder_kwargs(cfg), drop_path=cfg.drop_path, uniform_drop_path=True)}
        head = lambda: ProjectionHead(cfg.embed_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.num_prototypes)
        if self.use_cls:
            student["cls_head"] = head()
        if self.use_patch:
            student["patch_head"] = head()
            student["predictor"] = Predictor(cfg.embed_dim, cfg.predictor_dim, cfg.predictor_depth,
                                             cfg.predictor_heads, cfg.mlp_ratio, cfg.predictor_attention)
        self.student = nn.ModuleDict(student)
        # The teacher is a copy of every student part it shares; gradients never train it.
        self.teacher = nn.ModuleDict({k: copy.deepcopy(v) for k, v in student.items() if k != "predictor"})
        if self.use_cls:
            self.teacher["cls_center"] = Centering(cfg.num_prototypes, cfg.center_momentum)
        if self.use_patch:
            self.teacher["patch_center"] = Centering(cfg.num_prototypes, cfg.center_momentum)
        self.teacher.requires_grad_(False)
        student["encoder"].encoder.grad_checkpoint = cfg.grad_checkpoint           # official: the student only
        student["encoder"].tokenizer.grad_checkpoint = cfg.grad_checkpoint         # (the S tokenizer ignores it)

    def ema_pairs(self):
        """(teacher tensor, student tensor) for every EMA'd parameter, matched by name."""
        s = dict(self.student.named_parameters())
        return [(p, s[n]) for n, p in self.teacher.named_parameters()]

    @torch.no_grad()
    def update_teacher(self, momentum: float):
        """EMA: theta_t <- m theta_t + (1 - m) theta_s, skipped at m >= 1 (official
        asymdsd/components/exponential_moving_average.py)."""
        if momentum >= 1.0:
            return
        teacher, student = zip(*self.ema_pairs())
        torch._foreach_lerp_(list(teacher), list(student), 1.0 - momentum)

    # -- 1. teacher ------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_teacher(self, centers, patches, temp_cls, temp_patch) -> TeacherTargets:
        """Full, unmasked global crops; one pass per crop, reused by all its masks.
        centers (B, C, G, 3), patches (B, C, G, K, 3) -> TeacherTargets"""
        B, C = centers.shape[:2]
        t = self.teacher
        x = t["encoder"](patches.flatten(0, 1), centers.flatten(0, 1))    # (BC, [1+]G, D)
        out = TeacherTargets()
        if self.use_cls:
            logits = t["cls_center"](t["cls_head"](x[:, 0]))               # (BC, P)
            out.cls = F.softmax(logits.float() / temp_cls, dim=-1).view(B, C, -1)
        if self.use_patch:
            out.tokens = x[:, 1:] if self.use_cls else x                   # (BC, G, D)
            logits = t["patch_center"](t["patch_head"](out.tokens))        # (BC, G, P)
            out.patch = F.softmax(logits.float() / temp_patch, dim=-1)
        return out

    # -- 2. student ------------------------------------------------------------------------------
    def forward_student(self, views) -> StudentOutputs:
        """All student passes of one step: the masked views (encoder on CLS + visible patches, then
        the predictor), crop 0 unmasked for the CLS loss (add_unmasked_global_cls), and the local
        crops. views["global"]: centers (B, C, G, 3), patches (B, C, G, K, 3); views["local"]
        likewise; views["mask"]: (BCM, G) bool, True = masked (drawn in make_views)."""
        cfg, s = self.cfg, self.student
        enc = s["encoder"]
        centers, patches = views["global"]
        B, C, G = centers.shape[:3]
        out = StudentOutputs()
        tokens, pos = enc.embed(patches.flatten(0, 1), centers.flatten(0, 1))  # (BC, G, D) once per crop
        cls_in = {}                                                        # view group -> CLS embeddings
        if self.use_patch:
            M = cfg.num_masks
            Q = round(cfg.mask_ratio * G)
            visible, out.masked = split_mask(views["mask"], Q)             # (BCM, V), (BCM, Q)
            crop = torch.arange(B * C, device=centers.device).repeat_interleave(M)[:, None]  # (BCM, 1)
            x = enc.encode(tokens[crop, visible], pos[crop, visible])      # (BCM, [1+]V, D): visible only
            out.pred = s["predictor"](x, pos[crop, out.masked])            # (BCM, Q, D)
            out.patch_logits = s["patch_head"](out.pred)                   # (BCM, Q, P)
        if self.use_cls:
            if self.use_patch:  # crop 0 again, unmasked, for the CLS loss only
                tok0, pos0 = tokens.view(B, C, G, -1)[:, 0], pos.view(B, C, G, -1)[:, 0]
                cls_in["global"] = enc.encode(tok0, pos0)[:, 0]                        # (B, D)
                cls_in["masked"] = x[:, 0]                                             # (BCM, D)
            else:               # cls mode: both global crops, unmasked
                cls_in["global"] = enc.encode(tokens, pos)[:, 0]                       # (BC, D)
            if "local" in views:
                lc, lp = views["local"]
                cls_in["local"] = enc(lp.flatten(0, 1), lc.flatten(0, 1))[:, 0]        # (BL, D)
            embs = list(cls_in.values())
            logits = s["cls_head"](torch.cat(embs)).split([e.shape[0] for e in embs])  # one head call
            for group, e, l in zip(cls_in, embs, logits):
                setattr(out, f"cls_{group}", l.view(B, -1, l.shape[-1]))
                if group != "local":
                    setattr(out, f"emb_{group}", e.view(B, -1, e.shape[-1]))
        return out

    # -- 3. loss ---------------------------------------------------------------------------------
    def forward_loss(self, student: StudentOutputs, teacher: TeacherTargets):
        """The dual self-distillation loss: (patch + cls + 0.01 koleo) / 2.01 in cls_mask mode, the
        weighted mean of the active terms in the ablation modes. Returns (loss, dict of detached logs)."""
        cfg, terms, weights = self.cfg, {}, {}
        if self.use_patch:
            masked, M = student.masked, cfg.num_masks
            crop = torch.arange(masked.shape[0], device=masked.device)[:, None] // M     # (BCM, 1)
            target = teacher.patch[crop, masked]                                         # (BCM, Q, P)
            terms["patch"] = patch_loss(student.patch_logits.flatten(0, 1), target.flatten(0, 1), cfg.student_temp)
            weights["patch"] = 1.0
        if self.use_cls:
            p = teacher.cls                                                              # (B, 2, P)
            cls_terms = []
            if student.cls_local is not None:
                cls_terms.append(cls_loss(student.cls_local, p, cfg.student_temp))       # local vs global
            if self.use_patch:
                cls_terms.append(cls_loss(student.cls_masked, p, cfg.student_temp))      # masked views vs global
                cls_terms.append(cls_loss(student.cls_global, p[:, 1:], cfg.student_temp))  # crop 0 vs teacher crop 1
                koleo_in = torch.cat([student.emb_global, student.emb_masked], 1)        # (B, 1+CM, D)
            else:
                cls_terms.append(cls_loss(student.cls_global, p, cfg.student_temp))      # global vs global
                koleo_in = student.emb_global                                            # (B, 2, D)
            terms["cls"] = torch.stack(cls_terms).mean()
            weights["cls"] = 1.0
            if cfg.koleo_weight > 0:
                terms["koleo"] = koleo_loss(koleo_in)
                weights["koleo"] = cfg.koleo_weight
        if cfg.mode == "mask" and cfg.regression_weight > 0:
            target = teacher.tokens[crop, masked]                                        # (BM, Q, D)
            terms["regression"] = F.smooth_l1_loss(student.pred.float(), target.float(), beta=2.0)
            weights["regression"] = cfg.regression_weight
        loss = sum(weights[k] * terms[k] for k in terms) / sum(weights.values())
        logs = {f"loss_{k}": v.detach() for k, v in terms.items()}
        for k in ("cls", "patch"):
            tp = getattr(teacher, k)
            if tp is not None:  # entropy of the teacher's distributions: collapse shows here first
                logs[f"teacher_entropy_{k}"] = -(tp * tp.clamp_min(1e-12).log()).sum(-1).mean()
        return loss, logs

    def forward(self, views, temp_cls: float | torch.Tensor, temp_patch: float | torch.Tensor):
        teacher = self.forward_teacher(*views["global"], temp_cls, temp_patch)
        student = self.forward_student(views)
        return self.forward_loss(student, teacher)


# ----------------------------------------------------------------------------------------------
# 10. Training step: per-step schedules, AdamW, mixed precision, one step
# ----------------------------------------------------------------------------------------------

def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> torch.Tensor:
    """Linear warm-up warmup_start -> base, then cosine base -> final (CosineAnnealingWarmupSchedule)."""
    warm = torch.linspace(warmup_start, base, warmup_steps + 1, dtype=torch.float64)[:-1]
    t = torch.arange(total_steps - warmup_steps, dtype=torch.float64) / max(total_steps - warmup_steps, 1)
    cos = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * t))
    return torch.cat([warm, cos])


def linear_warmup_schedule(start: float, end: float, warmup_steps: int, total_steps: int) -> torch.Tensor:
    """Linear start -> end over warmup_steps, then constant (LinearWarmupSchedule; teacher temperatures)."""
    ramp = torch.linspace(start, end, warmup_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([ramp, torch.full((max(total_steps - warmup_steps, 0),), end, dtype=torch.float64)])[:total_steps]


def make_schedules(cfg: Config, steps_per_epoch: int) -> dict:
    total = cfg.epochs * steps_per_epoch
    return {
        "lr": cosine_schedule(cfg.lr, cfg.lr_final, total, cfg.warmup_epochs * steps_per_epoch, cfg.lr_start),
        "ema": cosine_schedule(*cfg.ema_momentum, total),
        "temp_cls": linear_warmup_schedule(*cfg.teacher_temp_cls, cfg.temp_warmup_epochs * steps_per_epoch, total),
        "temp_patch": linear_warmup_schedule(*cfg.teacher_temp_patch, cfg.temp_warmup_epochs * steps_per_epoch, total),
    }


def build_optimizer(model: AsymDSD, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the student: one group, weight decay on everything (official ssrl_optim.yaml).
    Fused (one kernel for the whole update) where the torch version and device allow it."""
    device = next(model.student.parameters()).device
    return torch.optim.AdamW(model.student.parameters(), lr=cfg.lr, betas=cfg.betas,
                             weight_decay=cfg.weight_decay, fused=fused_adamw_ok(device))


def autocast_dtype(precision: str, device: torch.device):
    """bf16 where supported, fp16 (with a GradScaler) on older GPUs, fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        # NOTE: (departure 9) official trains in fp16 ("16-mixed"); bf16 needs no loss scaling and is as fast.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train_step(net, model: AsymDSD, optimizer, scaler, points, cfg: Config, sched: dict, gen, amp_dtype=None):
    """One AsymDSD step on a batch of clouds (B, N, 3) already on the device. `net` is the model, or
    its DDP / compiled wrapper; `sched` holds this step's lr, ema (floats), temp_cls, temp_patch
    (floats, or 0-d tensors on the device as train() passes them, so torch.compile never recompiles).
    Returns (loss, logs, grad_norm), detached, with no host sync."""
    for group in optimizer.param_groups:
        group["lr"] = sched["lr"]
    # 1. views: crops, augmentation, normalisation, patches, masks (no gradients)
    with torch.no_grad():
        views = make_views(points, cfg, gen)
    # 2-4. teacher pass, student passes, loss
    with torch.autocast(points.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss, logs = net(views, sched["temp_cls"], sched["temp_patch"])
    # 5. optimiser step (gradients unscaled before clipping, as Lightning does)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(model.student.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    # 6. EMA teacher
    model.update_teacher(sched["ema"])
    return loss.detach(), logs, grad_norm.detach()


# ----------------------------------------------------------------------------------------------
# 11. Training loop: data, checkpoints, logs, DDP, CLI
# ----------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a word",
              "tuple": "comma-separated numbers"}


def validate(cfg: Config):
    """Refuse a config that cannot train before any work starts: SystemExit with one line per problem."""
    problems = []
    for name, field in FIELDS.items():  # types first: the checks below compare numbers
        value = getattr(cfg, name)
        kind, _, optional = field.type.partition(" | ")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"int": number and isinstance(value, int), "float": number, "bool": isinstance(value, bool),
              "str": isinstance(value, str),
              "tuple": isinstance(value, tuple) and (name == "tokenizer_dims" or  # checked below: S or B/L form
                       len(value) == len(field.default or ()) and all(isinstance(x, (int, float)) for x in value))}[kind]
        if not (ok or (value is None and optional)):
            size = f" of {len(field.default)}" if kind == "tuple" else ""
            problems.append(f"{name}={value!r}: expected {TYPE_WORDS[kind]}{size}")
    if problems:
        raise SystemExit("these settings cannot train:\n  " + "\n  ".join(problems))

    def need(ok: bool, text: str):
        if not ok:
            problems.append(text)

    c = cfg
    need(c.mode in MODE_DEFAULTS, f"mode={c.mode!r}: one of {', '.join(MODE_DEFAULTS)}")
    need(c.predictor_attention in ("cross", "masked_self", "full_self"),
         f"predictor_attention={c.predictor_attention!r}: one of cross, masked_self, full_self")
    need(c.precision in ("auto", "fp32", "bf16", "fp16"), f"precision={c.precision!r}: one of auto, fp32, bf16, fp16")
    for name in ("epochs", "batch_size", "global_points", "local_points", "global_patches", "local_patches",
                 "patch_size", "embed_dim", "depth", "num_heads", "pos_hidden", "predictor_dim", "predictor_depth",
                 "predictor_heads", "head_hidden", "head_bottleneck", "num_prototypes", "num_global_crops",
                 "num_masks", "log_every", "lr", "student_temp", "mlp_ratio", "grad_clip", "source_points"):
        value = getattr(c, name)
        need(value is None or value > 0, f"{name}={value}: must be above 0")
    for name in ("num_local_crops", "warmup_epochs", "temp_warmup_epochs", "num_workers", "ckpt_every",
                 "snapshot_every", "max_steps", "eval_every", "eval_linear_epochs", "lr_start", "lr_final",
                 "weight_decay", "koleo_weight", "regression_weight"):
        need(getattr(c, name) >= 0, f"{name}={getattr(c, name)}: must not be negative")
    for name in ("global_crop_scale", "local_crop_scale", "crop_aspect", "scale_range",
                 "teacher_temp_cls", "teacher_temp_patch"):
        lo, hi = getattr(c, name)
        need(0 < lo <= hi and (hi <= 1 or not name.endswith("crop_scale")),
             f"{name}={lo},{hi}: expected 0 < low <= high" + (" <= 1" if name.endswith("crop_scale") else ""))
    need(0 <= min(c.ema_momentum) <= max(c.ema_momentum) <= 1, f"ema_momentum={c.ema_momentum}: within [0, 1]")
    need(0 <= min(c.betas) and max(c.betas) < 1, f"betas={c.betas}: within [0, 1)")
    need(0 <= c.center_momentum <= 1, f"center_momentum={c.center_momentum}: within [0, 1]")
    flat = [d for h in c.tokenizer_dims for d in (h if isinstance(h, tuple) else (h,))]
    need(all(isinstance(d, int) and d > 0 for d in flat) and (len(c.tokenizer_dims) == 3 or not
         all(isinstance(h, int) for h in c.tokenizer_dims)),
         f"tokenizer_dims={c.tokenizer_dims}: three widths (S) or one tuple of widths per stage (B, L), all above 0")
    need(c.tokenizer_chunks >= 1, f"tokenizer_chunks={c.tokenizer_chunks}: must be 1 or more")
    need(0.0 <= c.drop_path < 1.0, f"drop_path={c.drop_path}: must be in [0, 1)")
    need(c.embed_dim % c.num_heads == 0, f"embed_dim={c.embed_dim} is not a multiple of num_heads={c.num_heads}")
    need(c.predictor_dim % c.predictor_heads == 0,
         f"predictor_dim={c.predictor_dim} is not a multiple of predictor_heads={c.predictor_heads}")
    crops = [("global", c.global_points, c.global_patches)]
    if c.mode != "mask" and c.num_local_crops:
        crops.append(("local", c.local_points, c.local_patches))
    for name, points, patches in crops:
        need(c.patch_size <= points, f"patch_size={c.patch_size}: more than the {points} points of a {name} crop "
                                     f"({name}_points)")
        need(patches <= points, f"{name}_patches={patches}: more than the {points} points of a {name} crop")
    need(c.epochs >= c.warmup_epochs, f"epochs={c.epochs} is shorter than the lr warm-up (warmup_epochs="
                                      f"{c.warmup_epochs}): raise --epochs or lower --set warmup_epochs")
    need(c.epochs >= c.temp_warmup_epochs, f"epochs={c.epochs} is shorter than the teacher-temperature warm-up "
                                           f"(temp_warmup_epochs={c.temp_warmup_epochs})")
    if c.mode == "mask":
        need(c.num_global_crops == 1, f"num_global_crops={c.num_global_crops}: the mask mode cuts one global crop")
        need(c.num_local_crops == 0, f"num_local_crops={c.num_local_crops}: the mask mode cuts no local crops")
    elif c.mode in MODE_DEFAULTS:
        need(c.num_global_crops == 2, f"num_global_crops={c.num_global_crops}: the {c.mode} mode's CLS loss "
                                      "compares two global crops")
    if c.mode != "cls":
        masked = round(c.mask_ratio * c.global_patches)
        need(0 < masked < c.global_patches,
             f"mask_ratio={c.mask_ratio} masks {masked} of the {c.global_patches} patches of a global crop: "
             "the student needs at least one visible and one masked patch")
        need(0 < c.block_ratio <= 1, f"block_ratio={c.block_ratio}: within (0, 1]")
        need(c.adjust_ratio >= 0, f"adjust_ratio={c.adjust_ratio}: must not be negative")
    if c.device != "auto":
        try:
            torch.device(c.device)
        except RuntimeError:
            problems.append(f"device={c.device!r}: expected auto, cpu, cuda or cuda:N")
    if problems:
        raise SystemExit("these settings cannot train:\n  " + "\n  ".join(problems))


def save_checkpoint(path: str, state: dict):
    """Write atomically: a failure mid-write (a full disk, Ctrl-C) leaves the previous file intact and no .tmp."""
    tmp = f"{path}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            kept = f"the previous {os.path.basename(path)} is kept" if os.path.exists(path) else "none was written before"
            raise OSError(f"cannot write {path} ({e.strerror or e}); {kept}. "
                          "Free space there, or resume with another --out") from e
        raise


def lock_run_folder(out: str) -> int:
    """Create `out` and hold an exclusive lock on <out>/run.lock while this process trains, so a second run
    started on the same folder is refused at once with the first one's pid, host and start time. The OS
    releases the lock when the process ends, however it ends: a crashed run leaves nothing stuck.
    Returns the file descriptor; closing it releases the lock."""
    import fcntl
    import socket
    path = os.path.join(out, "run.lock")
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot write there ({e.strerror}); choose a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 400).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise SystemExit(f"--out {out} is in use by a run that is still going ({holder}); "
                         "wait for it to end, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    return fd


def check_batch(points: torch.Tensor, index: torch.Tensor, dataset):
    """Refuse NaN/inf coordinates with the shapes they came from (checked on the CPU copy: no sync)."""
    bad = ~torch.isfinite(points).all(dim=2).all(dim=1)
    if bad.any():
        names = [describe_item(dataset, int(i)) for i in index[bad][:5]]
        raise ValueError(f"non-finite (NaN/inf) coordinates in {int(bad.sum())} shapes of this batch: {names}")


def describe_item(dataset, i: int) -> str:
    files = getattr(dataset, "files", None)
    return str(files[i]) if files is not None and i < len(files) else f"{getattr(dataset, 'name', 'dataset')}[{i}]"


class IndexedDataset(torch.utils.data.Dataset):
    """Adds the item index to each sample so errors can name the shape it came from."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        points, _ = self.dataset[i]
        return torch.as_tensor(points, dtype=torch.float32), i


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list:
    """The epoch's batches of dataset indices for this rank: one permutation per (seed, epoch),
    split into equal per-rank shards, the incomplete last batch dropped (drop_last, as the official loader)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    per_rank = n // (batch_size * world) * batch_size
    shard = perm[rank * per_rank:(rank + 1) * per_rank]
    return shard.view(-1, batch_size).tolist()


def build_data(cfg: Config):
    """The pretraining dataset, checked once: every shape (N, 3) with N at least the crop size."""
    import data
    dataset = data.build_dataset(cfg.data, cfg.data_root, "train", num_points=cfg.source_points,
                                 download=cfg.download, skip_bad=cfg.skip_bad)
    if len(dataset) == 0:
        raise SystemExit(f"the {cfg.data} training split is empty")
    points, _ = dataset[0]
    points = torch.as_tensor(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise SystemExit(f"{describe_item(dataset, 0)}: expected points of shape (N, 3), got {tuple(points.shape)}")
    need = cfg.global_points if cfg.mode == "mask" else max(cfg.global_points, cfg.local_points)
    if points.shape[0] < need:
        raise SystemExit(f"{describe_item(dataset, 0)} has {points.shape[0]} points, but the crops need "
                         f"{need} (global_points={cfg.global_points}); use a dataset with more points "
                         "or lower --set global_points=...")
    return dataset


def setup_distributed(cfg: Config):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(cfg.device)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def train(cfg: Config, resume: dict | None = None) -> str:
    """Pretrain AsymDSD, or continue the run whose checkpoint dict is `resume`; returns the path of
    the last checkpoint. The config is validated first; the run folder is locked while it trains
    (by rank 0 under DDP)."""
    validate(cfg)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    lock = lock_run_folder(cfg.out) if rank0 else None
    try:
        if rank0:
            print(json.dumps(dataclasses.asdict(cfg)))
        return pretrain(cfg, resume)
    finally:
        if lock is not None:
            os.close(lock)


def pretrain(cfg: Config, resume: dict | None = None) -> str:
    """The training run of train(): data, model, optimizer, the loop, checkpoints and logs."""
    rank, world, device = setup_distributed(cfg)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank; augmentation streams differ (gen)
    dataset = build_data(cfg)
    steps_per_epoch = len(dataset) // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} training shapes are fewer than one batch of {cfg.batch_size} x "
                         f"{world} ranks; lower --batch-size")
    sched = make_schedules(cfg, steps_per_epoch)
    # The temperatures enter the model as tensors on the device: torch.compile guards on the value
    # of a Python float, so a new value each warm-up step would recompile the model.
    temps = torch.stack([sched["temp_cls"], sched["temp_patch"]]).float().to(device)   # (2, steps)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    model = AsymDSD(cfg)
    if cfg.init and not resume:
        init_from_official(model, cfg)
    model = model.to(device)
    optimizer = build_optimizer(model, cfg)
    amp_dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # All augmentation/masking randomness comes from this generator: saved, so resume is exact.
    # NOTE: (departure 2) official DataLoader workers copy one numpy stream each; here every rank has its own.
    gen = torch.Generator(device).manual_seed(cfg.seed * 7919 + rank)
    step = saved_step = 0
    ckpt_path = os.path.join(cfg.out, "last.pt")
    log_path = os.path.join(cfg.out, "log.jsonl")
    if resume:
        load_checked(model.student, resume["student"], "the checkpoint's student")
        load_checked(model.teacher, resume["teacher"], "the checkpoint's teacher")
        optimizer.load_state_dict(resume["optimizer"])
        if resume["scaler"]:  # empty when the checkpoint's run had no fp16 loss scaling: a new scaler starts
            scaler.load_state_dict(resume["scaler"])
        states = resume["generator"]
        gen.set_state((states[rank] if isinstance(states, list) else states).cpu())
        step = saved_step = resume["step"]
        if step > cfg.epochs * steps_per_epoch:
            raise SystemExit(f"the checkpoint is at step {step}, past the end of {cfg.epochs} epochs "
                             f"({cfg.epochs * steps_per_epoch} steps); give a larger --epochs")
        if step >= total_steps:
            if rank == 0:
                print(f"the checkpoint is at step {step}, the end of this run ({total_steps} steps): nothing to "
                      "train; a larger --epochs trains on")
            return ckpt_path
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)
    if cfg.compile:
        net = torch.compile(net)

    def checkpoint():
        nonlocal saved_step
        states = [gen.get_state()]
        if world > 1:  # each rank's augmentation stream, so every rank resumes exactly
            states = [None] * world
            dist.all_gather_object(states, gen.get_state())
        if rank == 0:
            save_checkpoint(ckpt_path, {"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
                                        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                        "generator": states if world > 1 else states[0], "step": step,
                                        "config": dataclasses.asdict(cfg)})
        saved_step = step

    import data
    from tqdm import tqdm
    evaluator = None
    if cfg.eval_every and rank == 0:
        import evaluate  # only here: the method itself needs no evaluation code
        evaluator = evaluate.PretrainingEval.from_config(cfg, device)
    log = open(log_path, "a") if rank == 0 else None
    if rank == 0:
        snapshots = f", teacher snapshots epoch_NNN.pt every {cfg.snapshot_every} epochs" if cfg.snapshot_every else ""
        print(f"run folder {cfg.out}: log {log_path}, checkpoint {ckpt_path}{snapshots}", flush=True)
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="pretrain", dynamic_ncols=True)
    shown = {}   # progress-bar fields: the last loss and lr, the last evaluation
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    window_t, window_n, data_wait = time.perf_counter(), 0, 0.0   # data_wait: s spent waiting for batches
    try:
        while step < total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            batches = epoch_batches(len(dataset), cfg.batch_size, epoch, cfg.seed, rank, world)[skip:]
            loader = torch.utils.data.DataLoader(IndexedDataset(dataset), batch_sampler=batches,
                                                 num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                                 worker_init_fn=getattr(data, "seed_worker", None))
            fetch_t = time.perf_counter()
            for points, index in loader:
                data_wait += time.perf_counter() - fetch_t
                check_batch(points, index, dataset)
                loss, logs, grad_norm = train_step(net, model, optimizer, scaler, points.to(device, non_blocking=True),
                                                   cfg, {"lr": float(sched["lr"][step]), "ema": float(sched["ema"][step]),
                                                         "temp_cls": temps[0, step], "temp_patch": temps[1, step]},
                                                   gen, amp_dtype)
                nonfinite |= ~torch.isfinite(loss)
                step += 1
                window_n += points.shape[0] * world
                bar.update(1)
                last = step == total_steps
                save_now = step % steps_per_epoch == 0 or last or (cfg.ckpt_every and step % cfg.ckpt_every == 0)
                if (step % cfg.log_every == 0 or save_now) and nonfinite.item():  # host sync only here
                    raise FloatingPointError(
                        f"non-finite loss by step {step}; stopping. The last good checkpoint is {ckpt_path} "
                        "(written before this happened). Try a lower --lr or --precision fp32.")
                if step % cfg.log_every == 0 or save_now:
                    vals = {k: round(float(v), 6) for k, v in zip(logs, torch.stack(list(logs.values())).tolist())}
                    elapsed = time.perf_counter() - window_t
                    rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": round(loss.item(), 6),
                           **vals, "grad_norm": round(float(grad_norm), 4), "lr": float(sched["lr"][step - 1]),
                           "ema_momentum": float(sched["ema"][step - 1]),
                           "teacher_temp_cls": float(sched["temp_cls"][step - 1]),
                           "teacher_temp_patch": float(sched["temp_patch"][step - 1]),
                           "samples_per_s": round(window_n / elapsed, 2),
                           "data_wait_frac": round(data_wait / elapsed, 4),   # share of the window spent waiting for data
                           "peak_mem_mb": round(peak_memory_mb(device), 1)}
                    window_t, window_n, data_wait = time.perf_counter(), 0, 0.0
                    if log:
                        try:
                            log.write(json.dumps(rec) + "\n")
                            log.flush()
                        except OSError as e:
                            raise OSError(f"cannot write {log_path} ({e.strerror or e})") from e
                    shown.update(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                    bar.set_postfix(shown)
                if save_now:
                    checkpoint()
                if evaluator and step % (cfg.eval_every * steps_per_epoch) == 0:
                    # NOTE: (departure 19) official: SVM + kNN every 5 epochs on ModelNet40 and ScanObjectNN,
                    # linear probes at fixed epochs, always on; here every --eval-every N epochs, one benchmark.
                    ev = {"step": step, "epoch": step // steps_per_epoch, **evaluator(model.teacher["encoder"])}
                    log.write(json.dumps(ev) + "\n")
                    log.flush()
                    shown.update({k[:-4]: f"{100 * v:.1f}" for k, v in ev.items() if k.endswith("_acc")})
                    bar.set_postfix(shown)
                if rank == 0 and cfg.snapshot_every and step % (cfg.snapshot_every * steps_per_epoch) == 0:
                    save_checkpoint(os.path.join(cfg.out, f"epoch_{step // steps_per_epoch:03d}.pt"),
                                    {"teacher": model.teacher.state_dict(), "config": dataclasses.asdict(cfg),
                                     "step": step})
                if last:
                    break
                fetch_t = time.perf_counter()
        if world > 1:  # rank 0 may still be writing the last checkpoint: all ranks shut down together
            dist.barrier()
    except KeyboardInterrupt:
        last_ckpt = f"the last checkpoint is {ckpt_path} (step {saved_step})" if saved_step else "no checkpoint yet"
        raise KeyboardInterrupt(f"interrupted at step {step}; {last_ckpt}") from None
    finally:
        bar.close()
        if log:
            log.close()
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        print(f"finished at step {step}: checkpoint {ckpt_path}, log {log_path}")
    return ckpt_path


# The command line: flags name the common settings, --set any Config field. A new run's settings are
# Config defaults <- the preset <- the mode's crop and mask counts (in `mask` mode) <- flags <- --set.

VALUE_FLAGS = ("data", "data_root", "mode", "epochs", "batch_size", "lr", "out", "device", "precision", "seed",
               "num_workers", "max_steps", "log_every", "init", "eval_every", "eval_data")
SWITCHES = ("compile", "download", "skip_bad", "grad_checkpoint")

# What a resumed run may change: where and how fast it runs, how often it logs and saves, how long it goes
# on. Every other setting defines what the run trains, and --resume refuses a new value for it.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "device", "precision", "compile", "grad_checkpoint", "num_workers",
                     "log_every", "ckpt_every", "snapshot_every", "out", "data_root", "download", "skip_bad",
                     "eval_every", "eval_data", "eval_data_root", "eval_linear_epochs")


def parse_value(key: str, text: str):
    """A --set value, parsed by the type of its Config field."""
    field = FIELDS[key]
    kind, _, optional = field.type.partition(" | ")
    if optional and text.lower() == "none":
        return None
    try:
        if kind == "bool":
            return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[text.lower()]
        if key == "tokenizer_dims" and "/" in text:  # per stage, stages split by "/": 256,512,1024/2048
            return tuple(tuple(int(v) for v in stage.split(",")) for stage in text.split("/"))
        if kind == "tuple":
            return tuple(type(field.default[0])(v) for v in text.split(","))
        return {"int": int, "float": float, "str": str}[kind](text)
    except (KeyError, ValueError):
        example = ",".join(map(str, field.default)) if kind == "tuple" else None
        raise SystemExit(f"--set {key}={text}: {key} takes {TYPE_WORDS[kind]}"
                         + (f", e.g. {key}={example}" if example else "")) from None


def given_settings(args) -> dict:
    """The settings this command line names: its value flags and switches, then every --set key=value."""
    given = {k: getattr(args, k) for k in VALUE_FLAGS if getattr(args, k) is not None}
    given.update({k: True for k in SWITCHES if getattr(args, k)})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in FIELDS:
            raise SystemExit(f"--set {item!r}: expected key=value with key one of: {', '.join(FIELDS)}")
        given[key] = parse_value(key, value)
    return given


def build_config(args) -> Config:
    """A new run's Config: the preset (and the mode's crop and mask counts) under the command line's settings."""
    given = given_settings(args)
    return Config(**{**preset_settings(args.preset or "paper", given.get("mode")), **given})


def flag_text(key: str, value, args) -> str:
    """How this command line said `key` = `value`: by its flag, or by --set."""
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    by_set = any(item.partition("=")[0] == key for item in args.set)
    return f"--{key.replace('_', '-')} {shown}" if key in VALUE_FLAGS and not by_set else f"--set {key}={shown}"


def unreadable_kind(path: str, error: Exception) -> str:
    """What a file is that torch.load(weights_only=True) cannot read."""
    import re
    import zipfile
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        return "a damaged or truncated PyTorch file" if head == b"PK\x03\x04" else "not a PyTorch file" if head else "empty"
    with zipfile.ZipFile(path) as z:
        pickled = b"".join(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    if b"pytorch-lightning_version" in pickled:
        return "a PyTorch Lightning checkpoint (such as the official AsymDSD code writes)"
    found = re.search(r"GLOBAL (\S+)", str(error))
    return f"a PyTorch file holding Python objects ({found.group(1) if found else type(error).__name__})"


def read_checkpoint(path: str) -> dict:
    """The checkpoint of an asymdsd.py run at `path`, or SystemExit naming the file and what it is.
    weights_only: such a checkpoint holds tensors and plain Python values only, so nothing in a foreign
    file is executed."""
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: no checkpoint at {path}" + (" (a folder)" if os.path.isdir(path) else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        what = unreadable_kind(path, e)
    else:
        keys = set(ckpt) if isinstance(ckpt, dict) else set()
        if {"student", "teacher", "optimizer", "scaler", "generator", "step", "config"} <= keys:
            return ckpt
        what = ("a teacher snapshot (epoch_NNN.pt: no student, optimizer or data position)" if {"teacher", "config"} <= keys
                else "an exported encoder (evaluate.py export)" if {"config", "state_dict"} <= keys
                else "a PyTorch Lightning checkpoint" if "state_dict" in keys
                else f"a PyTorch file holding {sorted(map(str, keys))[:6] if keys else type(ckpt).__name__}")
    raise SystemExit(f"--resume {path}: this is {what}, not a checkpoint of an asymdsd.py run. "
                     "--resume continues a run from its <out>/last.pt")


def resume_config(saved: Config, args, path: str, step: int) -> Config:
    """The checkpoint's settings with the changes this command line may make to a resumed run
    (RESUME_MAY_CHANGE): printed, one per line. Any other setting that differs, given by a flag, --set
    or --preset, is refused with SystemExit naming it, its checkpoint value and the new one.
    --max-steps belongs to one invocation: a resumed run goes on to the end unless it is given again.
    Without --out the run goes on in the checkpoint's folder."""
    given = {"max_steps": 0, **given_settings(args)}
    folder = os.path.dirname(os.path.abspath(path))
    if "out" not in given and os.path.abspath(saved.out) != folder:
        given["out"] = folder
    refused = [f"{flag_text(k, v, args)} (the checkpoint's: {getattr(saved, k)!r})" for k, v in given.items()
               if k not in RESUME_MAY_CHANGE and v != getattr(saved, k)]
    if args.preset:
        clash = [f"{k}={v!r} (the checkpoint's: {getattr(saved, k)!r})"
                 for k, v in preset_settings(args.preset, given.get("mode", saved.mode)).items()
                 if k not in given and k not in RESUME_MAY_CHANGE and v != getattr(saved, k)]
        if clash:
            refused.append(f"--preset {args.preset}: " + ", ".join(clash))
    if refused:
        raise SystemExit(f"--resume {path} continues that run and cannot change what it trains; these differ from "
                         "its settings:\n  " + "\n  ".join(refused) +
                         "\nDrop them to continue the run, or start a new run in another --out.")
    changes = {k: v for k, v in given.items() if v != getattr(saved, k)}
    lines = [f"resuming {path} at step {step}"]
    for k, v in changes.items():
        lines.append(f"  {k}: {getattr(saved, k)!r} -> {v!r}")
    if "epochs" in changes:
        lines.append(f"  the lr, EMA and teacher-temperature schedules are rebuilt for {changes['epochs']} epochs: "
                     f"the next steps follow them, steps 1-{step} followed the {saved.epochs}-epoch ones")
    if int(os.environ.get("RANK", 0)) == 0:
        print("\n".join(lines))
    return dataclasses.replace(saved, **changes)


def default_text(key: str) -> str:
    """' (default: 300; tiny preset: 19)': a flag's Config default and any preset's own value, for --help."""
    base = getattr(Config(), key)
    own = [f"{name} preset: {values[key]}" for name, values in PRESETS.items() if values.get(key, base) != base]
    return f" (default: {'; '.join([str(base), *own])})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="AsymDSD self-supervised pretraining on point clouds")
    d = default_text
    p.add_argument("--data", help="dataset: modelnet40, shapenet, shapenet55, shapes (procedural, no download), ...; "
                                  "several at once: a+b+c with --data-root r1,r2,r3, or mixture with --data-root LIST"
                                  + d("data"))
    p.add_argument("--data-root", help="dataset folder or archive (default: data/<dataset>); for a+b+c one per "
                                       "source, comma-separated ('-': the default); for mixture a file of 'name path' lines")
    p.add_argument("--download", action="store_true", help="download ModelNet40 if it is missing")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable shapes (warned, counted) instead of stopping")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="small, base, large = AsymDSD-S, -B, -L as the official code (paper = small); "
                        "tiny = small model for CPU (default: small)")
    p.add_argument("--mode", choices=list(MODE_DEFAULTS),
                   help="cls_mask = AsymDSD; cls = invariance only; mask = MPM only" + d("mode"))
    p.add_argument("--epochs", type=int, help="training epochs" + d("epochs"))
    p.add_argument("--batch-size", type=int, help="per GPU/process" + d("batch_size"))
    p.add_argument("--lr", type=float, help="peak learning rate, not scaled with the batch as in the official code"
                                            + d("lr"))
    p.add_argument("--out", help="run folder for log.jsonl and last.pt" + d("out"))
    p.add_argument("--resume", nargs="?", const="auto",
                   help="continue from a checkpoint (without PATH: <out>/last.pt) with its settings; flags may change "
                        "only " + ", ".join(RESUME_MAY_CHANGE))
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1" + d("device"))
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA where supported, else fp16; fp32 on CPU" + d("precision"))
    p.add_argument("--compile", action="store_true", help="torch.compile the model (faster steps, slow start)")
    p.add_argument("--init", metavar="PATH", help="start from a released official .ckpt (student, teacher, "
                   "centres; a fresh optimizer): its size and mode must match --preset and --mode")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute the student encoder's blocks in "
                   "backward (official gradient_checkpointing): less memory, slower steps, the same gradients")
    p.add_argument("--seed", type=int, help="weights, data order and augmentation" + d("seed"))
    p.add_argument("--num-workers", type=int, help="DataLoader workers per process" + d("num_workers"))
    p.add_argument("--max-steps", type=int, help="stop after this many steps in total (0: all epochs)" + d("max_steps"))
    p.add_argument("--log-every", type=int, help="steps between log lines (each costs one host sync)" + d("log_every"))
    p.add_argument("--eval-every", type=int, help="linear SVM + kNN of the teacher every N epochs, into log.jsonl "
                   "(--set eval_linear_epochs=E adds a linear probe)" + d("eval_every"))
    p.add_argument("--eval-data", help="benchmark for --eval-every, e.g. modelnet40, scanobjectnn_pbt50rs "
                                       "(default: ModelNet40 when present; root: --set eval_data_root=PATH)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override any Config field, e.g. --set num_masks=1 predictor_attention=masked_self "
                        "(repeatable: every --set applies)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    resume = None
    if args.resume:  # the checkpoint is read once, here: its config, then its state in train()
        path = os.path.join(given_settings(args).get("out", Config.out), "last.pt") if args.resume == "auto" else args.resume
        resume = read_checkpoint(path)
        cfg = resume_config(config_from_dict(resume["config"]), args, path, resume["step"])
    else:
        cfg = build_config(args)
    try:
        train(cfg, resume)
    except KeyboardInterrupt as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(str(e) or "interrupted before the first step", file=sys.stderr)
        raise SystemExit(130) from None
    except (FloatingPointError, FileNotFoundError, ValueError, OSError, ImportError) as e:
        # Bad input, a diverged run and a failed write end with the message alone, not a stack trace.
        raise SystemExit(f"error: {e}")
    if "RANK" in os.environ:
        end_torchrun_worker()


def end_torchrun_worker():
    """End a torchrun worker whose run has finished without Python's interpreter shutdown. The process
    group's worker threads outlive destroy_process_group (DDP keeps the group referenced) and can still be
    releasing the last collective's objects, which takes the GIL; a thread that asks for the GIL during
    interpreter shutdown is ended inside a C++ destructor, and the process aborts with "terminate called
    without an active exception" (pytorch/pytorch#190489). By now every rank has passed the final barrier
    and the checkpoint and log are written and closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------------------------
# 12. Official checkpoints: the official state_dict layout -> these modules, one key map
# ----------------------------------------------------------------------------------------------

OFFICIAL_KEY_MAP = [
    (r"point_encoder\.cls_token", "encoder.cls_token"),
    (r"point_encoder\.patch_embedding\.point_embedding\.(block_[12]\.[013]\.weight)", r"encoder.tokenizer.\1"),
    (r"point_encoder\.patch_embedding\.point_embedding\.blocks\.(\d+)\.mlp\.(\d+)\.(weight|bias)",
     r"encoder.tokenizer.stages.\1.\2.\3"),
    (r"point_encoder\.patch_embedding\.position_embedding\.position_embedding\.([02]\.(weight|bias))", r"encoder.pos_embed.mlp.\1"),
    (r"point_encoder\.encoder\.stack\.(\d+)\.self_attn\.norm\.weight", r"encoder.encoder.blocks.\1.norm1.weight"),
    (r"point_encoder\.encoder\.stack\.(\d+)\.self_attn\.attn\.in_proj_weight", r"encoder.encoder.blocks.\1.attn.qkv.weight"),
    (r"point_encoder\.encoder\.stack\.(\d+)\.self_attn\.attn\.out_proj\.weight", r"encoder.encoder.blocks.\1.attn.proj.weight"),
    (r"point_encoder\.encoder\.stack\.(\d+)\.ffn\.norm\.weight", r"encoder.encoder.blocks.\1.norm2.weight"),
    (r"point_encoder\.encoder\.stack\.(\d+)\.ffn\.mlp\.linear_([12])\.weight", r"encoder.encoder.blocks.\1.mlp.fc\2.weight"),
    (r"point_encoder\.encoder\.norm\.weight", "encoder.encoder.norm.weight"),
    (r"(cls|patch)_projection_head\.mlp\.mlp\.0\.(weight|bias)", r"\1_head.mlp.0.\2"),
    (r"(cls|patch)_projection_head\.mlp\.mlp\.4\.(weight|bias)", r"\1_head.mlp.2.\2"),
    (r"(cls|patch)_projection_head\.mlp\.mlp\.8\.(weight|bias)", r"\1_head.mlp.4.\2"),
    (r"(cls|patch)_projection_head\.linear\.bias", r"\1_head.bias"),
    (r"(cls|patch)_projection_head\.linear\.parametrizations\.weight\.original0", r"\1_head.weight_g"),
    (r"(cls|patch)_projection_head\.linear\.parametrizations\.weight\.original1", r"\1_head.weight_v"),
    (r"(cls|patch)_centering\.center", r"\1_center.center"),
    (r"predictor\.module\.stack\.(\d+)\.cross_attn\.norm\.weight", r"predictor.blocks.\1.norm1.weight"),
    (r"predictor\.module\.stack\.(\d+)\.cross_attn\.attn\.in_proj_weight", r"predictor.blocks.\1.attn.qkv.weight"),
    (r"predictor\.module\.stack\.(\d+)\.cross_attn\.attn\.out_proj\.weight", r"predictor.blocks.\1.attn.proj.weight"),
    (r"predictor\.module\.stack\.(\d+)\.ffn\.norm\.weight", r"predictor.blocks.\1.norm2.weight"),
    (r"predictor\.module\.stack\.(\d+)\.ffn\.mlp\.linear_([12])\.weight", r"predictor.blocks.\1.mlp.fc\2.weight"),
    (r"predictor\.module\.norm\.weight", "predictor.norm.weight"),
    (r"predictor\.embedding\.(weight|bias)", r"predictor.embed.\1"),
    (r"predictor\.projection\.(weight|bias)", r"predictor.proj.\1"),
]


def convert_official_state_dict(official: dict) -> dict:
    """Rename an official AsymDSD Lightning `state_dict` to this file's AsymDSD layout
    (`student.*`, `teacher.*`). The student-only `mask_token` moves into the predictor.
    Raises ValueError naming every key no rule covers."""
    import re
    out, unknown = {}, []
    for key, value in official.items():
        if key == "mask_token":
            out["student.predictor.mask_token"] = value
            continue
        side, _, rest = key.partition(".")
        for pattern, repl in OFFICIAL_KEY_MAP:
            if side in ("student", "teacher") and re.fullmatch(pattern, rest):
                out[f"{side}.{re.sub(pattern, repl, rest)}"] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not in the official AsymDSD layout, e.g. {unknown[:5]}; "
                         "is this an AsymDSD checkpoint (a Lightning .ckpt's 'state_dict')?")
    return out


def load_checked(module: nn.Module, state: dict, what: str):
    """load_state_dict(strict) that refuses with one clear message listing missing, unexpected and
    mis-shaped keys, so a checkpoint for another model size never half-loads."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{what} does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(shapes)} mis-shaped keys). Missing: {missing[:4]} Unexpected: {unexpected[:4]} "
                         f"Shapes: {shapes[:4]}. Build the model with the checkpoint's sizes "
                         "(embed_dim, depth, num_heads, tokenizer_dims, ...).")
    module.load_state_dict(state)


class StandIn:
    """An object of the official package that a released checkpoint's pickle names (an enum member, a layer
    class, a jsonargparse Path), kept as plain data: the arguments it was rebuilt with and its state. Nothing
    of the official package is imported or run; a subclass per name records which one it stands for."""

    official_name = ""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"{self.official_name}{self.args or ''}"


# The non-tensor globals of a Lightning checkpoint of the official training (hyper_parameters: training_mode,
# cls_predictor, norm_layer, act_layer, the logger's config path). GELU is torch's own and comes as itself.
OFFICIAL_STAND_INS = {name: type(name.rsplit(".", 1)[1], (StandIn,), {"official_name": name})
                      for name in ("asymdsd.models.asymdsd.TraingingMode", "asymdsd.models.asymdsd.ClsPredictor",
                                   "asymdsd.layers.normalization.RMSNorm", "jsonargparse._util.Path")}
OFFICIAL_TORCH_GLOBALS = {"torch.nn.modules.activation.GELU": nn.GELU}


class _AllowlistUnpickler(pickle.Unpickler):
    """For torch before 2.4, which has no safe_globals: the same allowlist as a restricted find_class. Tensors
    reach it through torch's own storage handling; everything else must be on the list."""

    PLAIN = {"collections.OrderedDict": collections.OrderedDict, "torch._utils._rebuild_tensor_v2": None,
             "torch._utils._rebuild_parameter": None}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full in OFFICIAL_STAND_INS:
            return OFFICIAL_STAND_INS[full]
        if full in OFFICIAL_TORCH_GLOBALS:
            return OFFICIAL_TORCH_GLOBALS[full]
        if full in self.PLAIN or (module == "torch" and name.endswith("Storage")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {full}")


def load_allowlisted(path: str, fallback: bool = False) -> dict:
    """torch.load of a file whose pickle may name the official globals above and nothing else: weights_only
    with safe_globals (torch 2.4 and later), else the restricted unpickler. Raises pickle.UnpicklingError
    naming any other global; the project's own module name `asymdsd` is never imported for it."""
    if hasattr(torch.serialization, "safe_globals") and not fallback:
        allow = [(cls, name) for name, cls in OFFICIAL_STAND_INS.items()] + list(OFFICIAL_TORCH_GLOBALS.values())
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location="cpu", weights_only=True)
    module = types.SimpleNamespace(__name__="pickle", Unpickler=_AllowlistUnpickler, load=pickle.load)
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)


def official_encoder_sizes(ckpt: dict, which: str = "teacher", num_heads: int | None = None) -> dict:
    """PointEncoder sizes of an official Lightning checkpoint, read from hyper_parameters (encoder_config
    init_args: width, heads, depth; the tokenizer's class_path and hidden_dims) and confirmed by the tensor
    shapes. The `embed_dim` entries under patch_embedding are the config class's default (384) whatever the
    real width, so they are not read. A num_heads that contradicts the file raises ValueError naming both."""
    hp, state = ckpt.get("hyper_parameters") or {}, ckpt["state_dict"]
    p = f"{which}.point_encoder."
    enc = (hp.get("encoder_config") or {}).get("init_args") or {}
    tok_cfg = (((hp.get("patch_embedding") or {}).get("init_args") or {}).get("point_embedding")) or {}
    if "embed_dim" not in enc or "num_layers" not in enc:
        raise ValueError("its hyper_parameters hold no encoder_config (width, heads, depth)")
    dim, depth, heads = int(enc["embed_dim"]), int(enc["num_layers"]), enc.get("num_heads")
    dims = (tok_cfg.get("init_args") or {}).get("hidden_dims")
    two_stage = str(tok_cfg.get("class_path", "")).endswith("VarMemEfficientPointMaxEmbeddingConfig")
    if dims is None:
        raise ValueError("its hyper_parameters hold no tokenizer hidden_dims")
    dims = tuple(tuple(int(d) for d in stage) for stage in dims) if two_stage else tuple(int(d) for d in dims)
    if heads is None and num_heads is None:
        raise ValueError("the file does not say how many attention heads the encoder has; pass --num-heads")
    if heads is not None and num_heads is not None and int(num_heads) != int(heads):
        raise ValueError(f"--num-heads {num_heads} contradicts the file, which was trained with {heads} heads")
    width = state.get(p + "encoder.norm.weight")
    blocks = {k[len(p + "encoder.stack."):].split(".")[0] for k in state if k.startswith(p + "encoder.stack.")}
    if width is None or width.shape[0] != dim or len(blocks) != depth:
        raise ValueError(f"its hyper_parameters (width {dim}, {depth} layers) contradict its tensors "
                         f"(width {None if width is None else width.shape[0]}, {len(blocks)} layers)")
    pos = state[p + "patch_embedding.position_embedding.position_embedding.0.weight"].shape[0]
    return dict(dim=dim, depth=depth, num_heads=int(heads if heads is not None else num_heads),
                mlp_ratio=float(enc.get("hidden_ratio", 4.0)), tokenizer_dims=dims, pos_hidden=pos,
                cls_token=p + "cls_token" in state)


def official_training_mode(ckpt: dict) -> str:
    """'cls_mask', 'cls' or 'mask': hyper_parameters' training_mode, else what the state_dict holds."""
    mode = (ckpt.get("hyper_parameters") or {}).get("training_mode")
    if isinstance(mode, StandIn) and mode.args:
        return str(mode.args[0])
    state = ckpt["state_dict"]
    has_cls, has_mpm = "teacher.point_encoder.cls_token" in state, "student.predictor.module.norm.weight" in state
    return "cls_mask" if has_cls and has_mpm else "cls" if has_cls else "mask"


def init_from_official(model: AsymDSD, cfg: Config):
    """--init: the student and teacher (encoders, heads, predictor, centres, mask token) of an official
    Lightning .ckpt, for further pretraining. The file's size and training mode must be the run's; a
    difference is refused naming both values. Optimizer and schedules start fresh."""
    try:
        ckpt = load_allowlisted(cfg.init)
    except Exception as e:
        raise ValueError(f"--init {cfg.init}: not a readable official checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"--init {cfg.init}: not an official Lightning checkpoint (no state_dict / hyper_parameters)")
    sizes, mode = official_encoder_sizes(ckpt), official_training_mode(ckpt)
    ours = encoder_kwargs(cfg)
    differ = [f"{k}: file {sizes[k]} vs run {ours[k]}" for k in ("dim", "depth", "num_heads", "tokenizer_dims",
                                                                 "pos_hidden") if sizes[k] != ours[k]]
    differ += [f"mode: file {mode} vs run {cfg.mode}"] if mode != cfg.mode else []
    if differ:
        raise ValueError(f"--init {cfg.init} does not fit this run ({'; '.join(differ)}); choose the matching "
                         "--preset and --mode")
    state = convert_official_state_dict(ckpt["state_dict"])
    load_checked(model, state, f"--init {cfg.init}")
    print(f"initialised from {cfg.init}: width {sizes['dim']}, {sizes['num_heads']} heads, {sizes['depth']} layers, "
          f"training mode {mode}, {sum(p.numel() for p in model.parameters()):,} parameters, {len(state)} keys mapped")


def load_official_encoder(encoder: PointEncoder, official: dict, which: str = "teacher") -> PointEncoder:
    """Load `<which>.point_encoder.*` of an official checkpoint state_dict into a PointEncoder."""
    converted = convert_official_state_dict({k: v for k, v in official.items()
                                             if k.startswith(f"{which}.point_encoder.")})
    prefix = f"{which}.encoder."
    load_checked(encoder, {k[len(prefix):]: v for k, v in converted.items()}, f"the official {which} encoder")
    return encoder


if __name__ == "__main__":
    main()
