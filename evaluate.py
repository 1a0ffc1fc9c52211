"""Evaluate AsymDSD encoders with the protocols of the paper (arXiv:2506.21724), as the official configs run them.

Works on a checkpoint of this project (`asymdsd.py` -> <out>/last.pt, teacher encoder by default),
on the official released Lightning checkpoints (e.g. AsymDSD-S_ShapeNet.ckpt), on an encoder
written by `export`, or on a randomly initialised encoder (`--random-init`, the baseline).

Subcommands, in the order of this file (right: the official source, under configs/):
  svm       frozen features, linear SVM + kNN (k=5, cosine)      ssrl/ssrl_trainer.yaml: EmbeddingClassifierEval
  finetune  full fine-tuning, MLP head: ScanObjectNN, ModelNet40 classification/variants/finetune_*.yaml
  fewshot   few-shot ModelNet40, {5,10}-way x {10,20}-shot       classification/variants/fewshot.yaml
  export    the encoder alone: {"config": sizes, "state_dict"}   (ours, for other projects)
  plot      learning curves of a pretraining log.jsonl           (ours, matplotlib)
Part segmentation (official configs/semseg/) is not implemented.

Run:  python evaluate.py svm runs/asymdsd/last.pt --data modelnet40 --data-root data/ModelNet40
      python evaluate.py svm --random-init --preset tiny --data modelnet40 --data-root data/ModelNet40
      python evaluate.py finetune AsymDSD-S_ShapeNet.ckpt --data scanobjectnn_pbt50rs --data-root data/ScanObjectNN
      python evaluate.py fewshot runs/asymdsd/last.pt --data-root data/ModelNetFewshot --ways 5 --shots 10
Every command prints a table and appends one JSON line to --results (default results.jsonl).

Departures from the official code: 1, 9, 11, 12 (README, 'Deliberate departures'); 11 and 12 are
tagged `# NOTE:` at their lines.

Dimension legend: B batch, N points, G patches, K points per patch, D width, T tokens (1 + G), F features.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import asymdsd

# Points per cloud and patches per cloud of each benchmark, 32 points per patch (official
# configs/data/{ModelNet40,ModelNet40_fewshot,ScanObjectNN}-S.yaml: max_num_points, patchify).
# These define the benchmark's input and apply to every encoder, whatever crop sizes it was
# pretrained on (the official callbacks fix them per dataset); --num-points/--patches/--patch-size override.
BENCHMARK_PATCH_SIZE = 32
BENCHMARKS = {
    "modelnet40": dict(points=1024, patches=64, protocol="modelnet40"),
    "modelnet40_fewshot": dict(points=1024, patches=64, protocol="fewshot"),
    "scanobjectnn_objbg": dict(points=2048, patches=128, protocol="scanobjectnn"),
    "scanobjectnn_objonly": dict(points=2048, patches=128, protocol="scanobjectnn"),
    "scanobjectnn_pbt50rs": dict(points=2048, patches=128, protocol="scanobjectnn"),
    "shapes": dict(points=1024, patches=64, protocol="modelnet40"),  # procedural, for smoke runs
    "objaverse_lvis": dict(points=1024, patches=64, protocol="objaverse_lvis"),   # configs/data/ObjaVerse_LVIS-S.yaml
}

# Fine-tuning recipes (official configs/classification/variants/ and their optim/ files; augmentation
# from configs/data/*-S.yaml), epochs as in the paper. `--epochs E` scales every epoch count
# by E / epochs, so a short run keeps the shape of the schedule.
PROTOCOLS = {
    # finetune_from_pretrained.yaml, optim/classification_optim_finetune.yaml: full fine-tuning from
    # epoch 0, one low lr for the encoder and the new head alike.
    "scanobjectnn": dict(epochs=150, frozen_epochs=0, warmup_epochs=10, lr=2e-5, warmup_start=0.0, final_lr=1e-7,
                         rotate=True, scale=(0.9, 1.1), soft_init_head=False, cls_feature=True),
    # finetune_two_stage_from_pretrained.yaml (freeze_encoder 50, soft_init_head), its optim file:
    # 50 epochs head only (linear lr 5e-4 -> 5e-5), then 100 epochs of full fine-tuning.
    "modelnet40": dict(epochs=150, frozen_epochs=50, frozen_lr=(5e-4, 5e-5), warmup_epochs=10, lr=2e-5,
                       warmup_start=0.0, final_lr=1e-7, rotate=False, scale=(0.6, 1.4), soft_init_head=True,
                       cls_feature=True),
    # fewshot.yaml, optim/classification_optim_fewshot.yaml: full fine-tuning; features [mean, max]
    # over all tokens, CLS included (map_cls_token false).
    "fewshot": dict(epochs=150, frozen_epochs=0, warmup_epochs=10, lr=1e-3, warmup_start=1e-7, final_lr=1e-6,
                    rotate=False, scale=(0.6, 1.4), soft_init_head=False, cls_feature=False),
    # classification/variants/objaverse_lvis.yaml: encoder frozen throughout, a LINEAR head on
    # [CLS, mean, max], AdamW cosine 5e-5 -> 1e-7 after 10 warm-up epochs from 0, top-1/3/5;
    # configs/data/ObjaVerse_LVIS-S.yaml: batch 128, z-rotation only.
    "objaverse_lvis": dict(epochs=150, frozen_epochs=0, warmup_epochs=10, lr=5e-5, warmup_start=0.0, final_lr=1e-7,
                           rotate=True, scale=(1.0, 1.0), soft_init_head=False, cls_feature=True,
                           freeze_encoder=True, linear_head=True, batch_size=128, top_k=(1, 3, 5)),
}
# official configs/data/*-S.yaml batch_size; optim files weight_decay; classification_model.yaml
# label_smoothing and encoder.drop_path_p
BATCH_SIZE, WEIGHT_DECAY, LABEL_SMOOTHING, DROP_PATH = 32, 0.05, 0.2, 0.2


# ----------------------------------------------------------------------------------------------
# 1. Encoders from checkpoints: this project's last.pt, official .ckpt, exported, random init
# ----------------------------------------------------------------------------------------------

# The official state dict does not store the number of heads; these are the released variants'
# (official configs/ssrl/ssrl_model.yaml and variants/model/ssrl_model_{base,large}.yaml: num_heads).
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16}


def checkpoint_kind(ckpt: dict) -> str:
    """'project' (asymdsd.py last.pt, or an epoch_NNN.pt snapshot: teacher only), 'export' (this
    file's export) or 'official' (Lightning)."""
    if isinstance(ckpt, dict) and {"teacher", "config"} <= set(ckpt):
        return "project"
    if isinstance(ckpt, dict) and "config" in ckpt and any(k.startswith("tokenizer.") for k in ckpt.get("state_dict", {})):
        return "export"
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    if any(str(k).startswith(("teacher.point_encoder.", "student.point_encoder.")) for k in state):
        return "official"
    keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"not an AsymDSD checkpoint: expected asymdsd.py's last.pt (student/teacher/config), an "
                     f"official Lightning .ckpt (state_dict with teacher.point_encoder.*) or an export; found {keys}")


def infer_official_sizes(state: dict, which: str = "teacher", num_heads: int | None = None) -> dict:
    """PointEncoder sizes from the tensor shapes of an official state dict (heads: HEADS_BY_WIDTH)."""
    p = f"{which}.point_encoder."
    tok = p + "patch_embedding.point_embedding."
    try:
        dim = state[tok + "block_2.3.weight"].shape[0]
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(p) + r"encoder\.stack\.(\d+)\.", k)))
        sizes = dict(dim=dim, depth=depth, mlp_ratio=state[p + "encoder.stack.0.ffn.mlp.linear_1.weight"].shape[0] / dim,
                     tokenizer_dims=(state[tok + "block_1.0.weight"].shape[0], state[tok + "block_1.3.weight"].shape[0],
                                     state[tok + "block_2.0.weight"].shape[0]),
                     pos_hidden=state[p + "patch_embedding.position_embedding.position_embedding.0.weight"].shape[0],
                     cls_token=p + "cls_token" in state)
    except (KeyError, ValueError) as e:  # ValueError: max() of no blocks
        raise ValueError(f"cannot read the encoder sizes of this official checkpoint ({which}): {e!r} is missing. "
                         "Only the AsymDSD-S layout (MemEfficientPointMaxEmbedding tokenizer) is supported.") from None
    heads = num_heads or HEADS_BY_WIDTH.get(dim)
    if heads is None:
        raise ValueError(f"the number of heads is not stored in the checkpoint and width {dim} is not a released "
                         f"variant ({HEADS_BY_WIDTH}); pass --num-heads")
    return dict(sizes, num_heads=heads)


def encoder_from_checkpoint(ckpt: dict, which: str = "teacher", num_heads: int | None = None):
    """A loaded checkpoint -> (PointEncoder in eval mode, info). info: kind, sizes, num_patches and
    patch_size the encoder was pretrained with (None when unknown: the paper's 64 x 32 apply).
    Every load is strict: a mismatched state dict raises ValueError, never half-loads."""
    kind = checkpoint_kind(ckpt)
    patching = dict(num_patches=None, patch_size=None)
    if kind == "project":
        cfg = asymdsd.config_from_dict(ckpt["config"])
        sizes = asymdsd.encoder_kwargs(cfg)
        if num_heads:
            sizes["num_heads"] = num_heads
        if which not in ckpt:
            raise ValueError(f"this checkpoint holds no {which} weights (an epoch snapshot keeps the teacher only)")
        state = {k[len("encoder."):]: v for k, v in ckpt[which].items() if k.startswith("encoder.")}
        encoder = asymdsd.PointEncoder(**sizes)
        asymdsd.load_checked(encoder, state, f"the {which} encoder of this checkpoint")
        patching = dict(num_patches=cfg.global_patches, patch_size=cfg.patch_size, num_points=cfg.global_points)
    elif kind == "export":
        sizes = dict(ckpt["config"])
        encoder = asymdsd.PointEncoder(**sizes)
        asymdsd.load_checked(encoder, ckpt["state_dict"], "the exported encoder")
        patching.update(ckpt.get("patchify", {}))
    else:
        state = ckpt.get("state_dict", ckpt)
        sizes = infer_official_sizes(state, which, num_heads)
        encoder = asymdsd.load_official_encoder(asymdsd.PointEncoder(**sizes), state, which)
    return encoder.eval(), dict(kind=kind, sizes=sizes, **patching)


def load_encoder(path: str, which: str = "teacher", num_heads: int | None = None):
    """torch.load + encoder_from_checkpoint. `weights_only=False`: Lightning checkpoints hold
    Python objects; only load files you trust."""
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle, zip or EOF errors of a truncated or foreign file
        raise SystemExit(f"{path} is not a torch checkpoint ({type(e).__name__}: {e})") from None
    return encoder_from_checkpoint(ckpt, which, num_heads)


def random_encoder(preset: str = "paper", seed: int = 0):
    """An untrained encoder of a preset, initialised as pretraining starts (trunc-normal 0.02; official
    AsymDSD.init_weights in asymdsd/models/asymdsd.py): the baseline."""
    cfg = asymdsd.Config(**asymdsd.PRESETS[preset])
    sizes = asymdsd.encoder_kwargs(cfg)
    torch.manual_seed(seed)
    encoder = asymdsd.PointEncoder(**sizes)
    return encoder.eval(), dict(kind="random", sizes=sizes, num_patches=cfg.global_patches, patch_size=cfg.patch_size,
                                num_points=cfg.global_points)


def export_encoder(encoder: asymdsd.PointEncoder, info: dict, path: str):
    """Write {"config": PointEncoder kwargs, "state_dict", "patchify"}; reload elsewhere with
    `enc = PointEncoder(**ckpt["config"]); enc.load_state_dict(ckpt["state_dict"])`."""
    torch.save({"config": dict(info["sizes"]), "state_dict": encoder.state_dict(),
                "patchify": dict(num_patches=info["num_patches"], patch_size=info["patch_size"], num_points=info.get("num_points"))}, path)


# ----------------------------------------------------------------------------------------------
# 2. Frozen features (official asymdsd/models/embedding_model.py): normalise, patches, encoder, pooling
# ----------------------------------------------------------------------------------------------

def eval_patches(points: torch.Tensor, num_patches: int, patch_size: int, start_idx: torch.Tensor | None = None):
    """Unit-sphere normalisation then FPS + kNN patches, FPS started at N//2 (the official
    deterministic start, asymdsd/data/patchify.py: PatchifyPC) unless `start_idx` (B,) is given.
    points (B, N, 3) -> centers (B, G, 3), patches (B, G, K, 3)"""
    B, N, _ = points.shape
    # NOTE: (departure 11) official fine-tuning starts test FPS at random every epoch
    # (deterministic_val_data false); a fixed start makes a reported accuracy reproducible.
    if start_idx is None:
        start_idx = torch.full((B,), N // 2, dtype=torch.long, device=points.device)
    return asymdsd.patchify(asymdsd.normalize_unit_sphere(points), num_patches, patch_size, start_idx=start_idx)


def pool_features(x: torch.Tensor, parts: tuple, has_cls: bool = True, cls_in_pools: bool = False) -> torch.Tensor:
    """Concatenate the requested parts of the encoder output (NeuralClassifier.forward):
    'cls' the CLS token, 'mean' / 'max' pooled over the patch tokens, or over all tokens when
    `cls_in_pools` (map_cls_token false).  x (B, T, D) -> (B, len(parts) * D)"""
    if "cls" in parts and not has_cls:
        raise ValueError("this encoder has no CLS token (an MPM-only model); use parts without 'cls'")
    tokens = x if cls_in_pools or not has_cls else x[:, 1:]                    # (B, G or T, D)
    pick = {"cls": lambda: x[:, 0], "mean": lambda: tokens.mean(1), "max": lambda: tokens.amax(1)}
    return torch.cat([pick[p]() for p in parts], dim=-1)


@torch.no_grad()
def extract_features(encoder: asymdsd.PointEncoder, dataset, num_patches: int, patch_size: int,
                     batch_size: int = 64, device: str | torch.device = "cpu", desc: str = "features"):
    """L2-normalised [CLS, mean of patch tokens] for every cloud, in dataset order (official
    EmbeddingModel: normalize_embeddings; ssrl_trainer.yaml: map_cls_token, map_avg_pooling).
    Encoders without a CLS token give the mean alone. -> features (S, F) float32, labels (S,) long"""
    device = torch.device(device)
    encoder = encoder.eval().to(device)
    amp = asymdsd.autocast_dtype("auto", device)
    parts = ("cls", "mean") if encoder.cls_token is not None else ("mean",)
    feats, labels = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for points, y in tqdm(loader, desc=desc, dynamic_ncols=True):
        centers, patches = eval_patches(points.to(device), num_patches, patch_size)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            x = encoder(patches, centers)                                        # (B, T, D)
        feats.append(F.normalize(pool_features(x.float(), parts, encoder.cls_token is not None), dim=-1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


# ----------------------------------------------------------------------------------------------
# 3. Linear SVM and kNN on frozen features (official asymdsd/models/{linear_svm,knn}_classifier.py)
# ----------------------------------------------------------------------------------------------

def svm_accuracy(train_x, train_y, test_x, test_y, C: float = 1.0) -> float:
    """sklearn LinearSVC with its defaults (C=1, squared hinge, one-vs-rest), as the official callback."""
    from sklearn.svm import LinearSVC
    clf = LinearSVC(C=C).fit(train_x.numpy(), train_y.numpy())
    return float((clf.predict(test_x.numpy()) == test_y.numpy()).mean())


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 5, chunk: int = 1024) -> float:
    """Majority vote of the k most cosine-similar training features (features are L2-normalised,
    so cosine = dot product); ties go to the lowest class index, as argmax does in the official code."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for i in range(0, len(test_x), chunk):
        sim = test_x[i:i + chunk] @ train_x.T                                    # (b, S_train)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[sim.topk(k, dim=1).indices], torch.ones(sim.shape[0], k))
        correct += int((votes.argmax(1) == test_y[i:i + chunk]).sum())
    return correct / len(test_x)


# ----------------------------------------------------------------------------------------------
# 4. Fine-tuning (official asymdsd/models/neural_classifier.py): drop path, MLP head, schedules, loop
# ----------------------------------------------------------------------------------------------

def add_drop_path(encoder: asymdsd.PointEncoder, max_rate: float = DROP_PATH) -> asymdsd.PointEncoder:
    """Set drop path rates rising linearly 0 -> max_rate over depth (official classification_model.yaml:
    drop_path_p, uniform_drop_path false) on the blocks of a loaded encoder. In place; returns the encoder."""
    blocks = encoder.encoder.blocks
    for blk, rate in zip(blocks, torch.linspace(0, max_rate, len(blocks)).tolist()):
        blk.drop_path = rate
    return encoder


def mlp_head(in_dim: int, num_classes: int, hidden: int = 256, dropout: float = 0.5) -> nn.Sequential:
    """Linear -> BN -> GELU -> Dropout, twice, then Linear; all three Linears bias-free (official
    classification_model.yaml: mlp_head_config)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU(), asymdsd.Dropout(dropout),
        nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU(), asymdsd.Dropout(dropout),
        nn.Linear(hidden, num_classes, bias=False))


class Classifier(nn.Module):
    """Encoder (with drop path) -> pooled feature -> MLP head.
    cls_feature=True: [CLS, mean, max] of the patch tokens (3 x D, official NeuralClassifier.forward);
    False: [mean, max] over all tokens, CLS included (few-shot, variants/fewshot.yaml: map_cls_token false)."""

    def __init__(self, encoder: asymdsd.PointEncoder, num_classes: int, cls_feature: bool = True,
                 drop_path_rate: float = DROP_PATH, soft_init_head: bool = False, linear_head: bool = False):
        super().__init__()
        self.encoder = add_drop_path(encoder, drop_path_rate)
        has_cls = encoder.cls_token is not None
        # official: map_cls_token falls back to False for an encoder without CLS
        self.parts = ("cls", "mean", "max") if cls_feature and has_cls else ("mean", "max")
        self.cls_in_pools = not cls_feature
        dim = encoder.encoder.norm.weight.shape[0]
        self.head = (nn.Linear(len(self.parts) * dim, num_classes) if linear_head   # classification_head_type LINEAR
                     else mlp_head(len(self.parts) * dim, num_classes))
        if soft_init_head:   # trunc-normal 0.02 (soft_init_head, ModelNet40); otherwise PyTorch's default
            for m in self.head.modules():
                if isinstance(m, nn.Linear):
                    asymdsd.trunc_normal_(m.weight, std=0.02)

    def forward(self, patches, centers):                     # (B, G, K, 3), (B, G, 3) -> logits (B, classes)
        x = self.encoder(patches, centers)                   # (B, T, D)
        return self.head(pool_features(x, self.parts, self.encoder.cls_token is not None, self.cls_in_pools))


def lr_schedule(protocol: dict, epochs: int, steps_per_epoch: int):
    """Per-step learning rates of a protocol run for `epochs` epochs, and the number of frozen epochs.
    Frozen stage: linear frozen_lr[0] -> frozen_lr[1]; then warm-up warmup_start -> lr and cosine to
    final_lr (official optim/classification_optim_finetune_two_stage.yaml: SequentialSchedule; the
    finetune and fewshot optim files are the cosine alone, with no frozen stage)."""
    f = epochs / protocol["epochs"]
    frozen = round(protocol["frozen_epochs"] * f)
    warmup = min(round(protocol["warmup_epochs"] * f), epochs - frozen)
    stage_1 = torch.linspace(*protocol.get("frozen_lr", (0, 0)), frozen * steps_per_epoch, dtype=torch.float64)
    stage_2 = asymdsd.cosine_schedule(protocol["lr"], protocol["final_lr"], (epochs - frozen) * steps_per_epoch,
                                      warmup * steps_per_epoch, protocol["warmup_start"])
    return torch.cat([stage_1, stage_2]), frozen


def augment(points: torch.Tensor, rotate: bool, scale: tuple, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation before normalisation: optional z-rotation U(0, 2pi) and anisotropic
    scale U(scale)^3 per cloud (official configs/data/*-S.yaml: augmentation_transform).
    (B, N, 3) -> (B, N, 3)"""
    if rotate:
        return asymdsd.augment_crops(points, scale, generator)      # z-rotation + anisotropic scale
    s = torch.empty(points.shape[0], 1, 3, device=points.device).uniform_(*scale, generator=generator)
    return points * s


@torch.no_grad()
def evaluate_accuracy(model: Classifier, dataset, num_patches: int, patch_size: int, batch_size: int = 64,
                  device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy without augmentation or voting (official classification_model.yaml: voting empty)."""
    device = torch.device(device)
    model.eval()
    amp = asymdsd.autocast_dtype("auto", device)
    correct = 0
    for points, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        centers, patches = eval_patches(points.to(device), num_patches, patch_size)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(patches, centers)
        correct += int((logits.argmax(1).cpu() == torch.as_tensor(y)).sum())
    return correct / len(dataset)


@torch.no_grad()
def topk_accuracy(model: Classifier, dataset, num_patches: int, patch_size: int, ks=(1, 3, 5), batch_size: int = 64,
                  device: str | torch.device = "cpu") -> dict:
    """{k: share of test shapes whose label is among the k highest logits} (official top_k_metrics)."""
    device = torch.device(device)
    model.eval()
    hits = dict.fromkeys(ks, 0)
    for points, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        centers, patches = eval_patches(points.to(device), num_patches, patch_size)
        logits = model(patches, centers).float().cpu()
        top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices          # (B, k)
        for k in ks:
            hits[k] += int((top[:, :k] == torch.as_tensor(y)[:, None]).any(1).sum())
    return {k: hits[k] / len(dataset) for k in ks}


def finetune(model: Classifier, train_set, test_set, protocol: dict, epochs: int, num_patches: int,
             patch_size: int, batch_size: int = BATCH_SIZE, device: str | torch.device = "cpu", seed: int = 0,
             desc: str = "finetune") -> list[dict]:
    """Train `model` with a protocol of PROTOCOLS; test after every epoch.
    Returns per-epoch [{"epoch", "lr" (of its last step), "train_loss", "test_acc"}]."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model.to(device)
    gen = torch.Generator(device).manual_seed(seed)   # augmentation and random FPS starts
    # drop_last as the official steps_per_epoch = len // batch_size; a tiny set still gets one batch
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True,
                                         drop_last=len(train_set) >= batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    lrs, frozen_epochs = lr_schedule(protocol, epochs, len(loader))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(lrs[0]), weight_decay=WEIGHT_DECAY)
    criterion = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    amp = asymdsd.autocast_dtype("auto", device)      # mixed precision on CUDA (official 16-mixed), fp32 on CPU
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    history, step = [], 0
    bar = tqdm(range(epochs), desc=desc, dynamic_ncols=True)
    for epoch in bar:
        frozen = epoch < frozen_epochs or protocol.get("freeze_encoder", False)
        model.train()
        model.encoder.requires_grad_(not frozen)
        if frozen:   # Lightning's freeze() (official NeuralClassifier.on_train_epoch_start): eval mode, no drop path
            model.encoder.eval()
        losses = []
        for points, labels in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True):
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[step])
            points, labels = points.to(device), torch.as_tensor(labels).to(device)
            with torch.no_grad():
                x = asymdsd.normalize_unit_sphere(augment(points, protocol["rotate"], protocol["scale"], gen))
                centers, patches = asymdsd.patchify(x, num_patches, patch_size, generator=gen)   # random FPS start
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = criterion(model(patches, centers).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.detach())                # no host sync per step
            step += 1
        acc = evaluate_accuracy(model, test_set, num_patches, patch_size, 2 * batch_size, device)
        history.append(dict(epoch=epoch + 1, lr=float(lrs[step - 1]), train_loss=torch.stack(losses).mean().item(),
                            test_acc=acc))
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", acc=f"{acc:.4f}", frozen=frozen)
    return history


def summarize(history: list[dict]) -> dict:
    """Both scores: the official evaluation variants keep no checkpoint (callbacks: null) and log the
    last and the max top1_acc (NeuralClassifier, summary "last,max"), so which is reported is open."""
    best = max(history, key=lambda h: h["test_acc"])
    return dict(last_acc=history[-1]["test_acc"], best_acc=best["test_acc"], best_epoch=best["epoch"])


def mean_std(values: list[float]) -> str:
    return f"{100 * np.mean(values):.2f} +- {100 * np.std(values):.2f}"


# ----------------------------------------------------------------------------------------------
# 5. Command line: the protocols, a table on stdout, one JSON line per command in --results
# ----------------------------------------------------------------------------------------------

def build_encoder(args):
    """(encoder, info, label) from the shared flags: a checkpoint path or --random-init."""
    if args.random_init:
        encoder, info = random_encoder(args.preset, args.seed)
        return encoder, info, f"random-init:{args.preset}"
    if not args.checkpoint:
        raise SystemExit("give a checkpoint path, or --random-init for the untrained baseline")
    torch.manual_seed(args.seed)   # the classification head built next draws from it, as after random_encoder
    try:
        encoder, info = load_encoder(args.checkpoint, "student" if args.student else "teacher", args.num_heads)
    except ValueError as e:
        raise SystemExit(f"{args.checkpoint}: {e}")
    return encoder, info, args.checkpoint


def patch_settings(args, benchmark: str) -> tuple[int, int, int]:
    """(points, patches, patch size): the flags, else the benchmark's protocol (official kNN/SVM callbacks
    of ssrl_trainer.yaml: ModelNet40 1024 points, 64 patches x 32; ScanObjectNN 2048, 128 x 32), for
    every encoder. The tiny preset is pretrained on 512-point crops in 32 x 16 patches;
    `--num-points 512 --patches 32 --patch-size 16` evaluates it at that density instead."""
    bench = BENCHMARKS[benchmark]
    return args.num_points or bench["points"], args.patches or bench["patches"], args.patch_size or BENCHMARK_PATCH_SIZE


def load_split(args, split: str, num_points: int, **kw):
    """One split through data.py. Missing or bad data ends the command with data.py's message,
    which names the file and what to do (--download, --skip-bad), instead of a traceback."""
    import data
    try:
        return data.build_dataset(args.data, args.data_root, split, num_points=num_points, cache_dir=args.cache_dir,
                                  download=args.download, skip_bad=args.skip_bad, **kw)
    except (FileNotFoundError, ValueError, ImportError) as e:   # DataFileError is a ValueError
        raise SystemExit(f"error: {e}") from None


def report(args, command: str, checkpoint: str, settings: dict, metrics: dict, rows: list[tuple]):
    """Print `rows` as an aligned table and append the JSON record to args.results."""
    width = max(len(str(r[0])) for r in rows)
    print(f"\n{command} | {checkpoint} | {settings.get('dataset')}")
    for name, value in rows:
        print(f"  {str(name):<{width}}  {value}")
    settings.update(device=str(args.device), threads=torch.get_num_threads())
    record = dict(command=command, tag=args.tag, checkpoint=checkpoint, dataset=settings.pop("dataset"), settings=settings,
                  metrics=metrics, date=datetime.datetime.now().isoformat(timespec="seconds"))
    with open(args.results, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(f"appended to {args.results}")


def cmd_svm(args):
    encoder, info, source = build_encoder(args)
    points, patches, k = patch_settings(args, args.data)
    print(f"{source} ({info['kind']}, {info['sizes']}): {points} points, {patches} patches x {k}")
    t0 = time.perf_counter()
    train, test = load_split(args, "train", points), load_split(args, "test", points)
    t_data = time.perf_counter()
    # NOTE: (departure 12) official fits on the shuffled train loader with drop_last (up to one batch
    # fewer); every training shape here, so the fit does not depend on the shuffle.
    fit = [extract_features(encoder, ds, patches, k, args.batch_size, args.device, f"features {split}")
           for ds, split in ((train, "train"), (test, "test"))]
    t_feat = time.perf_counter()
    svm = svm_accuracy(*fit[0], *fit[1], C=args.C)
    t_svm = time.perf_counter()
    knn = knn_accuracy(*fit[0], *fit[1], k=args.k)
    metrics = dict(svm_acc=svm, knn_acc=knn, train_size=len(train), test_size=len(test),
                   seconds=dict(data=round(t_data - t0, 1), features=round(t_feat - t_data, 1),
                                svm=round(t_svm - t_feat, 1), total=round(time.perf_counter() - t0, 1)))
    settings = dict(dataset=args.data, data_root=args.data_root, points=points, patches=patches, patch_size=k,
                    encoder=info["kind"], branch="student" if args.student else "teacher", sizes=info["sizes"],
                    feature="[cls, mean] L2-normalised", svm_C=args.C, knn_k=args.k)
    report(args, "svm", source, settings, metrics,
           [("linear SVM acc", f"{100 * svm:.2f}"), (f"kNN (k={args.k}) acc", f"{100 * knn:.2f}"),
            ("train / test shapes", f"{len(train)} / {len(test)}"), ("patches x points", f"{patches} x {k}"),
            ("seconds (features / svm)", f"{metrics['seconds']['features']} / {metrics['seconds']['svm']}")])


def cmd_finetune(args):
    protocol_name = args.protocol or BENCHMARKS[args.data]["protocol"]
    protocol = PROTOCOLS[protocol_name]
    epochs = args.epochs or protocol["epochs"]
    _, info, source = build_encoder(args)
    points, patches, k = patch_settings(args, args.data)
    train, test = load_split(args, "train", points), load_split(args, "test", points)
    runs = []
    for seed in range(args.runs):
        encoder = build_encoder(args)[0]     # fresh pretrained weights for every run
        model = Classifier(encoder, len(train.classes), protocol["cls_feature"], args.drop_path, protocol["soft_init_head"])
        history = finetune(model, train, test, protocol, epochs, patches, k, args.batch_size, args.device, seed,
                           desc=f"finetune seed {seed}")
        runs.append(dict(seed=seed, **summarize(history), history=history))
    last, best = [r["last_acc"] for r in runs], [r["best_acc"] for r in runs]
    metrics = dict(last_acc_mean=float(np.mean(last)), last_acc_std=float(np.std(last)),
                   best_acc_mean=float(np.mean(best)), best_acc_std=float(np.std(best)), runs=runs)
    settings = dict(dataset=args.data, protocol=protocol_name, epochs=epochs, runs=args.runs, points=points,
                    patches=patches, patch_size=k, encoder=info["kind"], sizes=info["sizes"],
                    drop_path=args.drop_path, batch_size=args.batch_size)
    rows = [(f"seed {r['seed']}", f"last {100 * r['last_acc']:.2f}   best {100 * r['best_acc']:.2f} "
             f"(epoch {r['best_epoch']})") for r in runs]
    rows += [("last epoch acc", mean_std(last)), ("best epoch acc", mean_std(best))]
    report(args, "finetune", source, settings, metrics, rows)


def cmd_fewshot(args):
    protocol = PROTOCOLS["fewshot"]
    epochs = args.epochs or protocol["epochs"]
    _, info, source = build_encoder(args)
    args.data = "modelnet40_fewshot"
    points, patches, k = patch_settings(args, args.data)
    results, rows = {}, []
    for way in args.ways:
        for shot in args.shots:
            folds = []
            for fold in args.folds:
                train = load_split(args, "train", points, way=way, shot=shot, fold=fold)
                test = load_split(args, "test", points, way=way, shot=shot, fold=fold)
                model = Classifier(build_encoder(args)[0], way, protocol["cls_feature"], args.drop_path,
                                   protocol["soft_init_head"])
                history = finetune(model, train, test, protocol, epochs, patches, k, args.batch_size, args.device,
                                   args.seed, desc=f"{way}-way {shot}-shot fold {fold}")
                folds.append(dict(fold=fold, **summarize(history)))
            last, best = [f["last_acc"] for f in folds], [f["best_acc"] for f in folds]
            results[f"{way}way_{shot}shot"] = dict(last_acc_mean=float(np.mean(last)), last_acc_std=float(np.std(last)),
                                                   best_acc_mean=float(np.mean(best)), best_acc_std=float(np.std(best)),
                                                   folds=folds)
            rows.append((f"{way}-way {shot}-shot ({len(folds)} folds)", f"last {mean_std(last)}   best {mean_std(best)}"))
    settings = dict(dataset=args.data, data_root=args.data_root, epochs=epochs, folds=args.folds, points=points,
                    patches=patches, patch_size=k, encoder=info["kind"], sizes=info["sizes"], seed=args.seed)
    report(args, "fewshot", source, settings, results, rows)
    return results


def cmd_objaverse_lvis(args):
    """Objaverse-LVIS few-shot (official shell_scripts/py/Objaverse_fewshot_evals.py: 10 shots, folds 0-9)."""
    protocol = PROTOCOLS["objaverse_lvis"]
    epochs = args.epochs or protocol["epochs"]
    _, info, source = build_encoder(args)
    args.data = "objaverse_lvis"
    points, patches, k = patch_settings(args, args.data)
    folds, rows = [], []
    for fold in args.folds:
        train = load_split(args, "train", points, shot=args.shot, fold=fold)
        test = load_split(args, "test", points, shot=args.shot, fold=fold)
        model = Classifier(build_encoder(args)[0], len(train.classes), protocol["cls_feature"], 0.0,
                           protocol["soft_init_head"], linear_head=True)
        history = finetune(model, train, test, protocol, epochs, patches, k, args.batch_size, args.device,
                           args.seed, desc=f"objaverse-lvis {args.shot}-shot fold {fold}")
        top = topk_accuracy(model, test, patches, k, protocol["top_k"], 2 * args.batch_size, args.device)
        folds.append(dict(fold=fold, classes=len(train.classes), train=len(train), test=len(test),
                          **{f"last_top{n}": v for n, v in top.items()}, **summarize(history)))
        rows.append((f"fold {fold}", "   ".join(f"top-{n} {100 * v:.2f}" for n, v in top.items())))
    metrics = {f"last_top{n}_mean": float(np.mean([f[f"last_top{n}"] for f in folds])) for n in protocol["top_k"]}
    rows.append((f"mean of {len(folds)} folds", "   ".join(f"top-{n} {100 * metrics[f'last_top{n}_mean']:.2f}"
                                                           for n in protocol["top_k"])))
    settings = dict(dataset=args.data, data_root=args.data_root, shot=args.shot, epochs=epochs, folds=args.folds,
                    points=points, patches=patches, patch_size=k, encoder=info["kind"], sizes=info["sizes"], seed=args.seed)
    report(args, "objaverse_lvis", source, settings, dict(metrics, folds=folds), rows)
    return metrics


def cmd_export(args):
    encoder, info, source = build_encoder(args)
    export_encoder(encoder, info, args.out)
    print(f"wrote the {info['kind']} encoder of {source} to {args.out}: config {info['sizes']}")


def cmd_plot(args):
    """Learning curves of one pretraining run: linear-SVM / kNN accuracy of its epoch snapshots
    (`<run>/epoch_NNN.pt`, evaluated with `svm` into --results), one panel per dataset named in
    the records, and the loss terms, teacher entropies and lr of its log.jsonl, all against the
    epoch. Returns the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(line) for line in open(args.log) if line.strip()]
    keys = [k for k in recs[0] if k.startswith(("loss", "teacher_entropy")) or k == "lr"]
    run_dir = os.path.dirname(os.path.abspath(args.log))
    acc = {}  # dataset -> {epoch -> (svm, knn)}, the latest record of each snapshot of this run
    if args.results and os.path.exists(args.results):
        for line in open(args.results):
            r = json.loads(line)
            name = os.path.basename(str(r.get("checkpoint")))
            m = re.fullmatch(r"epoch_(\d+)\.pt", name)
            if r.get("command") != "svm" or os.path.dirname(os.path.abspath(r["checkpoint"])) != run_dir:
                continue
            if m or name == "last.pt":  # last.pt: the run's final epoch
                epoch = int(m.group(1)) if m else round(recs[-1]["epoch"])
                acc.setdefault(r.get("dataset"), {})[epoch] = (r["metrics"]["svm_acc"], r["metrics"]["knn_acc"])
    panels = [("accuracy", d) for d in acc] + [(k, None) for k in keys]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (key, dataset) in zip(axes.flat, panels):
        if key == "accuracy":
            by_epoch = acc[dataset]
            epochs = sorted(by_epoch)
            ax.plot(epochs, [100 * by_epoch[e][0] for e in epochs], "o-", label="linear SVM")
            ax.plot(epochs, [100 * by_epoch[e][1] for e in epochs], "s--", label="kNN (k=5)")
            if args.baseline is not None:
                ax.axhline(args.baseline, color="gray", ls=":", label="random init (SVM)")
            ax.set_title(f"{dataset} test accuracy (%)" if dataset else "test accuracy (%)")
            ax.legend(fontsize=7)
        else:
            ax.plot([r["epoch"] for r in recs if key in r], [r[key] for r in recs if key in r])
            ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} ({sum(len(a) for a in acc.values())} evaluated snapshots)")
    return fig


def cmd_table(args):
    """A results file as a markdown table: one row per tag (the part before '/seed') and benchmark
    input (points, patches x patch size), with the SVM / kNN accuracy of every seed and their mean,
    so runs made at different times add up and results of different inputs never mix. The latest
    record of a (row, input, seed) counts. The last column is the mean SVM difference to the
    --reference row over the seeds both have (paired by seed: seeds share the data order and
    initialisation, so this removes the part of the spread that all rows share)."""
    rows = {}
    for line in open(args.results):
        r = json.loads(line)
        if r.get("command") != "svm" or not r.get("tag"):
            continue
        name, _, seed = r["tag"].partition("/seed")
        s = r.get("settings", {})
        key = (name, f"{s['points']} pts, {s['patches']} x {s['patch_size']}" if "points" in s else "not recorded")
        rows.setdefault(key, {})[seed or "0"] = (100 * r["metrics"]["svm_acc"], 100 * r["metrics"]["knn_acc"])
    print(f"| row | input | seeds | linear SVM (per seed) | mean SVM | kNN (per seed) | SVM vs {args.reference} (paired) |")
    print("|---|---|---|---|---|---|---|")
    first = {}                                      # rows in order of first appearance, inputs grouped
    for name, _ in rows:
        first.setdefault(name, len(first))
    for (name, inp), seeds in sorted(rows.items(), key=lambda kv: first[kv[0][0]]):
        order = sorted(seeds, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else k))  # 2 before 10
        svm = [seeds[k][0] for k in order]
        knn = [seeds[k][1] for k in order]
        ref = rows.get((args.reference, inp), {})
        diffs = [seeds[k][0] - ref[k][0] for k in order if k in ref]
        paired = "" if name == args.reference or not diffs else f"{np.mean(diffs):+.2f} ({len(diffs)})"
        print(f"| {name} | {inp} | {', '.join(order)} | {', '.join(f'{v:.2f}' for v in svm)} | "
              f"{np.mean(svm):.2f} | {', '.join(f'{v:.2f}' for v in knn)} | {paired} |")


def main(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("checkpoint", nargs="?", help="asymdsd.py last.pt, an official .ckpt, or an export")
    common.add_argument("--student", action="store_true", help="evaluate the student encoder (default: the teacher)")
    common.add_argument("--random-init", action="store_true", help="untrained encoder of --preset (the baseline)")
    common.add_argument("--preset", default="paper", choices=sorted(asymdsd.PRESETS),
                        help="asymdsd.py preset for --random-init (default: %(default)s)")
    common.add_argument("--num-heads", type=int, help="heads of an official checkpoint (not stored; default 6/12/16 "
                                                      "for width 384/768/1024)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    common.add_argument("--seed", type=int, default=0, help="init / training seed (default: %(default)s)")
    common.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 can be "
                                                    "much faster on a CPU shared with other jobs)")
    common.add_argument("--tag", help="a label stored with the result (e.g. the ablation row)")
    common.add_argument("--results", default="results.jsonl", help="append one JSON line per command here (default: %(default)s)")
    data_flags = argparse.ArgumentParser(add_help=False)
    data_flags.add_argument("--data-root", help="dataset folder or archive (data.py)")
    data_flags.add_argument("--cache-dir", help="where data.py caches sampled clouds (default: next to the data)")
    data_flags.add_argument("--download", action="store_true", help="download ModelNet40 if it is missing")
    data_flags.add_argument("--skip-bad", action="store_true", help="skip unreadable shapes (warned, counted) "
                                                                    "instead of stopping")
    data_flags.add_argument("--num-points", type=int, help="points per cloud (default 1024 ModelNet40, 2048 ScanObjectNN)")
    data_flags.add_argument("--patches", type=int, help="patches per cloud (default: the benchmark's, 64 ModelNet40, 128 ScanObjectNN)")
    data_flags.add_argument("--patch-size", type=int, help="points per patch (default: 32)")

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    fmt = dict(parents=[common, data_flags])
    CLASSIFICATION = [name for name in BENCHMARKS if name != "modelnet40_fewshot"]   # fewshot has its own command
    s = sub.add_parser("svm", help="linear SVM + kNN on frozen features", **fmt)
    s.add_argument("--data", default="modelnet40", choices=CLASSIFICATION, help="(default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=64, help="feature extraction batch (default: %(default)s)")
    s.add_argument("--C", type=float, default=1.0, help="LinearSVC C (official: sklearn's default, 1.0)")
    s.add_argument("--k", type=int, default=5, help="kNN neighbours (default: %(default)s)")
    s.set_defaults(func=cmd_svm)
    s = sub.add_parser("finetune", help="fine-tuning classification", **fmt)
    s.add_argument("--data", default="scanobjectnn_pbt50rs", choices=CLASSIFICATION, help="(default: %(default)s)")
    s.add_argument("--protocol", choices=sorted(PROTOCOLS), help="default: the dataset's (ModelNet40 two-stage, ...)")
    s.add_argument("--epochs", type=int, help="default 150; schedule epochs (warm-up, frozen) scale with it")
    s.add_argument("--runs", type=int, default=1, help="repeat with seeds 0..runs-1; report mean and std (default: 1)")
    s.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="(default: %(default)s)")
    s.add_argument("--drop-path", type=float, default=DROP_PATH, help="last block's drop path rate, rising "
                                                                    "linearly from 0 (default: %(default)s)")
    s.set_defaults(func=cmd_finetune)
    s = sub.add_parser("fewshot", help="few-shot ModelNet40", **fmt)
    s.add_argument("--ways", type=int, nargs="+", default=[5, 10], help="(default: 5 10)")
    s.add_argument("--shots", type=int, nargs="+", default=[10, 20], help="(default: 10 20)")
    s.add_argument("--folds", type=int, nargs="+", default=list(range(10)), help="(default: 0 .. 9)")
    s.add_argument("--epochs", type=int, help="default 150; the warm-up scales with it")
    s.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="(default: %(default)s)")
    s.add_argument("--drop-path", type=float, default=DROP_PATH, help="(default: %(default)s)")
    s.set_defaults(func=cmd_fewshot)
    s = sub.add_parser("objaverse_lvis", help="Objaverse-LVIS few-shot: frozen encoder, linear head, top-1/3/5", **fmt)
    s.add_argument("--shot", type=int, default=10, help="(default: %(default)s)")
    s.add_argument("--folds", type=int, nargs="+", default=list(range(10)), help="(default: 0 .. 9)")
    s.add_argument("--epochs", type=int, help="default 150; the warm-up scales with it")
    s.add_argument("--batch-size", type=int, default=PROTOCOLS["objaverse_lvis"]["batch_size"], help="(default: %(default)s)")
    s.set_defaults(func=cmd_objaverse_lvis)
    s = sub.add_parser("export", help="write the encoder alone for use in another project", parents=[common])
    s.add_argument("--out", required=True, help="output .pt: {'config': PointEncoder kwargs, 'state_dict': ...}")
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("plot", help="plot a pretraining log.jsonl")
    s.add_argument("log", help="a pretraining run's log.jsonl")
    s.add_argument("--results", help="results file holding `svm` records of the run's epoch_NNN.pt snapshots")
    s.add_argument("--baseline", type=float, help="random-init SVM accuracy (%%) to draw as a line "
                                                  "on every accuracy panel")
    s.add_argument("--out", default="curves.png")
    s.set_defaults(func=cmd_plot)
    s = sub.add_parser("table", help="a results file's tagged svm records as a markdown table (seeds grouped)")
    s.add_argument("results")
    s.add_argument("--reference", default="asymdsd", help="row the paired differences are taken to (default: %(default)s)")
    s.set_defaults(func=cmd_table)
    args = p.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    main()
