"""Evaluate AsymDSD encoders with the protocols of the paper (arXiv:2506.21724), as the official configs run them.

Works on a checkpoint of this project (`asymdsd.py` -> <out>/last.pt, teacher encoder by default),
on the official released Lightning checkpoints (e.g. AsymDSD-S_ShapeNet.ckpt), on an encoder
written by `export`, or on a randomly initialised encoder (`--random-init`, the baseline).

Subcommands, in the order of this file (right: the official source, under configs/):
  svm       frozen features, linear SVM + kNN (k=5, cosine)      ssrl/ssrl_trainer.yaml: EmbeddingClassifierEval
  finetune  full fine-tuning, MLP head: ScanObjectNN, ModelNet40 classification/variants/finetune_*.yaml
            (--protocol modelnet40_8k: 8192 points)               classification/variants/finetune_ModelNet40_8k.yaml
  probe     frozen encoder, linear or MLP-3 head                 classification/variants/{linear,mlp3}_from_pretrained.yaml
  scratch   the fine-tuning baseline from random initialisation  classification/variants/scratch.yaml
  fewshot   few-shot ModelNet40, {5,10}-way x {10,20}-shot       classification/variants/fewshot.yaml
  export    the encoder alone: {"config": sizes, "state_dict"}   (ours, for other projects)
  partseg   ShapeNetPart part segmentation, in segment.py        semseg/semseg.yaml
  plot      learning curves of a pretraining log.jsonl           (ours, matplotlib)
  embed     features of your own clouds and meshes               (ours; the svm protocol's feature)
  predict   top-k classes with a classifier saved by --save      (ours)
  show      PNG of patches, crops, masks, CLS attention          (ours, matplotlib; make_views itself)

Run:  python evaluate.py svm runs/asymdsd/last.pt --data modelnet40 --data-root data/ModelNet40
      python evaluate.py svm --random-init --preset tiny --data modelnet40 --data-root data/ModelNet40
      python evaluate.py finetune AsymDSD-S_ShapeNet.ckpt --data scanobjectnn_pbt50rs --data-root data/ScanObjectNN
      python evaluate.py fewshot runs/asymdsd/last.pt --data-root data/ModelNetFewshot --ways 5 --shots 10
      python evaluate.py probe runs/asymdsd/last.pt --head mlp3 --data scanobjectnn_objbg --data-root data/ScanObjectNN
      python evaluate.py scratch --preset paper --data scanobjectnn_pbt50rs --data-root data/ScanObjectNN
Every command prints a table and appends one JSON line to --results (default results.jsonl); every
classification command also reports class-mean accuracy and writes a confusion matrix PNG, and the
trained ones (finetune, probe, scratch) report test-time voting beside the single pass.
`PretrainingEval` is the evaluation `asymdsd.py --eval-every N` runs on the teacher while it trains.

Departures from the official code: 1, 9, 11, 12, 19, 20, 21 (README, 'Deliberate departures'); 11, 12,
19 and 20 are tagged `# NOTE:` at their lines, 21 in asymdsd.py.

Dimension legend: B batch, N points, G patches, K points per patch, D width, T tokens (1 + G), F features.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import re
import sys
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
PROTOCOLS.update({
    # finetune_ModelNet40_8k.yaml: the two-stage lr of optim/classification_optim_finetune_two_stage.yaml
    # (linear 5e-4 -> 5e-5 for 50 epochs, then the cosine) over max_epochs 100, but freeze_encoder False
    # (the whole model trains from epoch 0) and no soft_init_head. Input: MODELNET40_8K.
    "modelnet40_8k": dict(epochs=100, frozen_epochs=50, frozen_lr=(5e-4, 5e-5), warmup_epochs=10, lr=2e-5,
                          warmup_start=0.0, final_lr=1e-7, rotate=False, scale=(0.6, 1.4), soft_init_head=False,
                          cls_feature=True, freeze_encoder=False),
})
# NOTE: (departure 18) the official repository has no 8k data config (the variant sets the recipe only);
# 8192 points in 512 patches of 32 are the ModelNet40 8k input of Point-MAE (cfgs/finetune_modelnet_8k.yaml:
# npoints, num_group, group_size).
MODELNET40_8K = dict(points=8192, patches=512)

# Training augmentation per benchmark family (official configs/data/ModelNet40-S.yaml, ScanObjectNN*-S.yaml:
# augmentation_transform); the recipes below take their dataset's.
AUGMENTATION = {"modelnet40": dict(rotate=False, scale=(0.6, 1.4)), "scanobjectnn": dict(rotate=True, scale=(0.9, 1.1))}
# Recipes that apply to every classification dataset, 150 epochs (classification_trainer.yaml: max_epochs):
RECIPES = {
    # variants/linear_from_pretrained.yaml and mlp3_from_pretrained.yaml: freeze_encoder true (encoder in
    # eval mode, only the head in the optimizer), head LINEAR (one Linear with bias) or MLP (mlp_head);
    # optim/classification_optim_frozen.yaml: warm-up 0 -> 5e-4 over 10 epochs, cosine to 1e-7.
    "frozen": dict(epochs=150, frozen_epochs=0, warmup_epochs=10, lr=5e-4, warmup_start=0.0, final_lr=1e-7,
                   soft_init_head=False, cls_feature=True, freeze_encoder=True),
    # variants/scratch.yaml on classification.yaml: no encoder checkpoint (the encoder keeps the initialisation
    # of NeuralClassifier.init_weights, trunc-normal 0.02, as `random_encoder`), map_cls_token false
    # ([mean, max] over all tokens, CLS included); optim classification_optim.yaml: 1e-7 -> 1e-3 over 10 epochs,
    # cosine to 1e-7.
    "scratch": dict(epochs=150, frozen_epochs=0, warmup_epochs=10, lr=1e-3, warmup_start=1e-7, final_lr=1e-7,
                    soft_init_head=False, cls_feature=False),
    # The linear probe of the pretraining callbacks (configs/ssrl/ssrl_trainer.yaml: NeuralClassifierEval,
    # classifier_name linear): 100 epochs, warm-up 0 -> 2e-4 over 10, cosine to 1e-7; its accuracy pools the
    # test passes of the last 10 epochs (eval_last_num_epochs 10). Used by `--eval-linear` in pretraining.
    "pretrain_linear": dict(epochs=100, frozen_epochs=0, warmup_epochs=10, lr=2e-4, warmup_start=0.0,
                            final_lr=1e-7, soft_init_head=False, cls_feature=True, freeze_encoder=True,
                            pooled_last_epochs=10),
}


def recipe(name: str, dataset: str) -> dict:
    """A RECIPES entry with the training augmentation of `dataset`'s benchmark family."""
    family = "scanobjectnn" if BENCHMARKS[dataset]["protocol"] == "scanobjectnn" else "modelnet40"
    return dict(RECIPES[name], **AUGMENTATION[family])


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
        if num_heads and num_heads != sizes["num_heads"]:
            raise ValueError(f"--num-heads {num_heads} contradicts the file, which was trained with "
                             f"{sizes['num_heads']} heads")
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
        if "hyper_parameters" in ckpt:  # a Lightning .ckpt of the official training: the file says its sizes
            sizes = asymdsd.official_encoder_sizes(ckpt, which, num_heads)
            glob = (((ckpt["hyper_parameters"].get("data") or {}).get("init_args") or {}).get("patchify") or {})
            glob = (glob.get("global_patchify") or {}).get("init_args") or {}
            patching = dict(num_patches=glob.get("num_patches"), patch_size=glob.get("patch_size"))
        else:
            sizes = infer_official_sizes(state, which, num_heads)
        encoder = asymdsd.load_official_encoder(asymdsd.PointEncoder(**sizes), state, which)
        mode = asymdsd.official_training_mode(ckpt) if "hyper_parameters" in ckpt else "unknown"
        n_keys = sum(k.startswith(f"{which}.point_encoder.") for k in state)
        print(f"loaded an official AsymDSD checkpoint: {describe_size(sizes)}, "
              f"{sum(p.numel() for p in encoder.parameters()):,} encoder parameters, training mode {mode}, "
              f"{n_keys} {which} encoder keys mapped (of {len(state)} in its state_dict; "
              f"{'no CLS token: features from the patch tokens' if not sizes['cls_token'] else 'with CLS token'})")
    return encoder.eval(), dict(kind=kind, sizes=sizes, **patching)


def describe_size(sizes: dict) -> str:
    """'AsymDSD-B (width 768, 12 heads, 12 layers, two-stage tokenizer ...)'; a width no release has is 'custom'."""
    name = {384: "S", 768: "B", 1024: "L"}.get(sizes["dim"], "custom")
    two = not all(isinstance(h, int) for h in sizes["tokenizer_dims"])
    return (f"AsymDSD-{name} (width {sizes['dim']}, {sizes['num_heads']} heads, {sizes['depth']} layers, "
            f"{'two-stage' if two else 'S'} tokenizer {sizes['tokenizer_dims']})")


def load_encoder(path: str, which: str = "teacher", num_heads: int | None = None):
    """Read a checkpoint (asymdsd.load_allowlisted: tensors, plain values and the few official globals that
    released .ckpt files name, nothing else is unpickled) + encoder_from_checkpoint. Every problem ends in
    SystemExit naming the file."""
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}")
    try:
        ckpt = asymdsd.load_allowlisted(path)
    except Exception as e:  # pickle, zip or EOF errors of a truncated or foreign file; a refused global
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise SystemExit(f"{path}: refused: its pickle asks for {found.group(1)}, which is not one of the "
                             f"objects an AsymDSD checkpoint holds (tensors, plain values and "
                             f"{', '.join(list(asymdsd.OFFICIAL_STAND_INS) + list(asymdsd.OFFICIAL_TORCH_GLOBALS))}); "
                             "nothing in it was run") from None
        raise SystemExit(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    try:
        return encoder_from_checkpoint(ckpt, which, num_heads)
    except ValueError as e:
        raise SystemExit(f"{path}: {e}") from None


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

def svm_predict(train_x, train_y, test_x, C: float = 1.0) -> torch.Tensor:
    """sklearn LinearSVC with its defaults (C=1, squared hinge, one-vs-rest), as the official callback.
    -> predicted classes (S_test,)"""
    from sklearn.svm import LinearSVC
    clf = LinearSVC(C=C).fit(train_x.numpy(), train_y.numpy())
    return torch.as_tensor(clf.predict(test_x.numpy()))


def svm_accuracy(train_x, train_y, test_x, test_y, C: float = 1.0) -> float:
    return float((svm_predict(train_x, train_y, test_x, C) == test_y).float().mean())


def knn_predict(train_x, train_y, test_x, k: int = 5, chunk: int = 1024) -> torch.Tensor:
    """Majority vote of the k most cosine-similar training features (features are L2-normalised,
    so cosine = dot product); ties go to the lowest class index, as argmax does in the official code.
    -> predicted classes (S_test,)"""
    num_classes = int(train_y.max()) + 1
    preds = []
    for i in range(0, len(test_x), chunk):
        sim = test_x[i:i + chunk] @ train_x.T                                    # (b, S_train)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[sim.topk(k, dim=1).indices], torch.ones(sim.shape[0], k))
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 5, chunk: int = 1024) -> float:
    return float((knn_predict(train_x, train_y, test_x, k, chunk) == test_y).float().mean())


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
    """Encoder (with drop path) -> pooled feature -> head.
    cls_feature=True: [CLS, mean, max] of the patch tokens (3 x D, official NeuralClassifier.forward);
    False: [mean, max] over all tokens, CLS included (few-shot, variants/fewshot.yaml: map_cls_token false).
    head "mlp": mlp_head (MLP-3, classification_head_type MLP); "linear": one Linear with bias
    (classification_head_type LINEAR: MLPVarLen(in, classes, bias=True)), PyTorch's default init."""

    def __init__(self, encoder: asymdsd.PointEncoder, num_classes: int, cls_feature: bool = True,
                 drop_path_rate: float = DROP_PATH, soft_init_head: bool = False, head: str = "mlp"):
        super().__init__()
        self.encoder = add_drop_path(encoder, drop_path_rate)
        has_cls = encoder.cls_token is not None
        # official: map_cls_token falls back to False for an encoder without CLS
        self.parts = ("cls", "mean", "max") if cls_feature and has_cls else ("mean", "max")
        self.cls_in_pools = not cls_feature
        dim = encoder.encoder.norm.weight.shape[0]
        if head not in ("mlp", "linear"):
            raise ValueError(f"head must be 'mlp' or 'linear', got {head!r}")
        in_dim = len(self.parts) * dim
        self.head = mlp_head(in_dim, num_classes) if head == "mlp" else nn.Linear(in_dim, num_classes)
        if soft_init_head:   # trunc-normal 0.02 (soft_init_head, ModelNet40); otherwise PyTorch's default
            for m in self.head.modules():
                if isinstance(m, nn.Linear):
                    asymdsd.trunc_normal_(m.weight, std=0.02)

    def forward(self, patches, centers):                     # (B, G, K, 3), (B, G, 3) -> logits (B, classes)
        x = self.encoder(patches, centers)                   # (B, T, D)
        return self.head(pool_features(x, self.parts, self.encoder.cls_token is not None, self.cls_in_pools))


def lr_schedule(protocol: dict, epochs: int, steps_per_epoch: int):
    """Per-step learning rates of a protocol run for `epochs` epochs, and the number of epochs of its
    first stage (frozen in the two-stage recipe). First stage: linear frozen_lr[0] -> frozen_lr[1]; then
    warm-up warmup_start -> lr and cosine to final_lr (official optim/classification_optim_finetune_two_stage.yaml:
    SequentialSchedule; the other optim files are the cosine alone, with no first stage)."""
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


def gather_patches(points: torch.Tensor, centers_idx: torch.Tensor, patches_idx: torch.Tensor):
    """Patches of fixed indices, relative to their centre (official ToMultiPatches: knn_gather of the
    loader's patches_idx / centers_idx). points (B, N, 3), centers_idx (B, G), patches_idx (B, G, K)
    -> centers (B, G, 3), patches (B, G, K, 3)"""
    B, G, K = patches_idx.shape
    centers = points.gather(1, centers_idx[..., None].expand(-1, -1, 3))                  # (B, G, 3)
    patches = points.gather(1, patches_idx.reshape(B, G * K, 1).expand(-1, -1, 3)).view(B, G, K, 3)
    return centers, patches - centers[:, :, None]


@torch.no_grad()
def predict(model: Classifier, dataset, num_patches: int, patch_size: int, batch_size: int = 64,
            device: str | torch.device = "cpu", votes: int = 1, augmentation: dict | None = None, seed: int = 0):
    """Logits of every test cloud, single pass and voted (official NeuralClassifier.validation_step): the
    first pass sees the clean cloud; with `votes` V > 1, V - 1 more passes see it augmented by
    `augmentation` (dict(rotate, scale) as `augment`), normalised again, and grouped by the same patch
    indices (the official voting pass re-gathers the loader's patches_idx); the logits of all V passes are
    summed. -> single (S, C), voted (S, C) (the single pass when V = 1), labels (S,)"""
    device = torch.device(device)
    model.eval()
    amp = asymdsd.autocast_dtype("auto", device)
    gen = torch.Generator(device).manual_seed(seed)
    single, voted, labels = [], [], []
    for points, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        points = points.to(device)
        B, N, _ = points.shape
        x = asymdsd.normalize_unit_sphere(points)
        # NOTE: (departure 11) FPS from N // 2 (official: a random start when deterministic_val_data is false)
        centers_idx = asymdsd.farthest_point_sample(x, num_patches, torch.full((B,), N // 2, device=device))
        patches_idx = asymdsd.knn_group(x, x.gather(1, centers_idx[..., None].expand(-1, -1, 3)), patch_size)
        total = None
        for v in range(votes):
            if v:
                x = asymdsd.normalize_unit_sphere(augment(points, augmentation["rotate"], augmentation["scale"], gen))
            centers, patches = gather_patches(x, centers_idx, patches_idx)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(patches, centers).float()                            # (B, C)
            if v == 0:
                single.append(logits.cpu())
            total = logits if total is None else total + logits
        voted.append(total.cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(single), torch.cat(voted), torch.cat(labels)


def evaluate_accuracy(model: Classifier, dataset, num_patches: int, patch_size: int, batch_size: int = 64,
                      device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of one pass without augmentation (official classification_model.yaml: voting empty)."""
    logits, _, labels = predict(model, dataset, num_patches, patch_size, batch_size, device)
    return float((logits.argmax(1) == labels).float().mean())


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
    """Train `model` with a protocol of PROTOCOLS or RECIPES; test after every epoch. The encoder is frozen
    (eval mode, no gradients) for the whole run when protocol["freeze_encoder"] is True, never when False,
    and during the schedule's first stage when absent (official freeze_encoder true / false / 50).
    Returns per-epoch [{"epoch", "lr" (of its last step), "train_loss", "test_acc", "test_class_mean"}]."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model.to(device)
    gen = torch.Generator(device).manual_seed(seed)   # augmentation and random FPS starts
    # drop_last as the official steps_per_epoch = len // batch_size; a tiny set still gets one batch
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True,
                                         drop_last=len(train_set) >= batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    lrs, frozen_epochs = lr_schedule(protocol, epochs, len(loader))
    freeze = protocol.get("freeze_encoder")
    # always frozen: the head alone in the optimizer (official NeuralClassifier.configure_optimizers)
    params = model.head.parameters() if freeze is True else model.parameters()
    optimizer = torch.optim.AdamW(params, lr=float(lrs[0]), weight_decay=WEIGHT_DECAY)
    criterion = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    amp = asymdsd.autocast_dtype("auto", device)      # mixed precision on CUDA (official 16-mixed), fp32 on CPU
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    history, step = [], 0
    bar = tqdm(range(epochs), desc=desc, dynamic_ncols=True)
    for epoch in bar:
        frozen = (freeze if isinstance(freeze, bool) else epoch < frozen_epochs) or protocol.get("freeze_encoder", False)
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
        logits, _, labels = predict(model, test_set, num_patches, patch_size, 2 * batch_size, device)
        conf = confusion_matrix(logits.argmax(1), labels, logits.shape[1])
        acc, class_mean = float(np.trace(conf) / conf.sum()), class_accuracies(conf)[1]
        history.append(dict(epoch=epoch + 1, lr=float(lrs[step - 1]), train_loss=torch.stack(losses).mean().item(),
                            test_acc=acc, test_class_mean=class_mean))
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", acc=f"{acc:.4f}", frozen=frozen)
    return history


def summarize(history: list[dict]) -> dict:
    """Both scores: the official evaluation variants keep no checkpoint (callbacks: null) and log the
    last and the max top1_acc (NeuralClassifier, summary "last,max"), so which is reported is open.
    Class-mean accuracy (official mean_acc, macro accuracy) of the last epoch and its maximum."""
    best = max(history, key=lambda h: h["test_acc"])
    return dict(last_acc=history[-1]["test_acc"], best_acc=best["test_acc"], best_epoch=best["epoch"],
                last_class_mean=history[-1].get("test_class_mean"),
                best_class_mean=max((h.get("test_class_mean") or 0.0) for h in history))


def mean_std(values: list[float]) -> str:
    """'mean ± std' in percent, std over the runs or folds (numpy's, ddof 0), as the papers' tables print it."""
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"


# ----------------------------------------------------------------------------------------------
# 5. Per-class accuracy, class-mean accuracy and the confusion matrix of every classification protocol
# ----------------------------------------------------------------------------------------------

def confusion_matrix(pred, target, num_classes: int) -> np.ndarray:
    """counts[i, j]: test clouds of class i predicted as j. pred, target (S,) -> (C, C) int64"""
    pred, target = np.asarray(pred, dtype=np.int64), np.asarray(target, dtype=np.int64)
    return np.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def class_accuracies(conf: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class accuracy (recall: diagonal / row sum; NaN for a class without test clouds) and their mean
    over the classes that have test clouds: the class-mean accuracy (mAcc; official mean_acc, torchmetrics
    Accuracy(average="macro"), which leaves out classes absent from targets and predictions alike)."""
    support = conf.sum(1)
    per_class = np.where(support > 0, np.diag(conf) / np.maximum(support, 1), np.nan)
    return per_class, float(np.nanmean(per_class)) if (support > 0).any() else float("nan")


def accuracy_metrics(conf: np.ndarray, classes: list[str]) -> dict:
    """Overall, class-mean and per-class accuracy of a confusion matrix, for a results record."""
    per_class, mean = class_accuracies(conf)
    return dict(acc=float(np.trace(conf) / max(conf.sum(), 1)), class_mean_acc=mean,
                per_class={c: (None if np.isnan(a) else round(float(a), 4)) for c, a in zip(classes, per_class)})


def save_confusion_png(conf: np.ndarray, classes: list[str], path: str, title: str) -> str | None:
    """Row-normalised confusion matrix as a PNG (matplotlib, headless). Returns the path, or None with a
    note when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed; no confusion matrix PNG ({path})")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    n = len(classes)
    size = max(4.0, 0.22 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=6 if n > 15 else 8)
    ax.set_yticks(range(n), classes, fontsize=6 if n > 15 else 8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    per_class, mean = class_accuracies(conf)
    ax.set_title(f"{title}\nacc {100 * np.trace(conf) / max(conf.sum(), 1):.2f}%, class-mean {100 * mean:.2f}%",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_path(args, command: str, dataset: str, suffix: str = "") -> str | None:
    """Where a command's confusion matrix goes: --confusion-dir (default: confusion/ beside --results),
    named by command, dataset, tag and suffix; None with --confusion-dir none."""
    if (args.confusion_dir or "").lower() == "none":
        return None
    folder = args.confusion_dir or os.path.join(os.path.dirname(args.results), "confusion")
    name = "_".join(x for x in (command, dataset, re.sub(r"[^\w.-]+", "-", args.tag or ""), suffix) if x)
    return os.path.join(folder, name + ".png")


# ----------------------------------------------------------------------------------------------
# 6. Evaluation while pretraining: asymdsd.py --eval-every N
# ----------------------------------------------------------------------------------------------

class PretrainingEval:
    """The teacher's evaluation during pretraining (official configs/ssrl/ssrl_trainer.yaml callbacks:
    EmbeddingClassifierEval, linear SVM + kNN; NeuralClassifierEval `linear`, a frozen linear probe). The
    benchmark is read once; each call extracts features of the current teacher encoder, fits the SVM and kNN
    and, with `linear_epochs` > 0, trains the pretraining linear probe (RECIPES["pretrain_linear"], its epochs
    set to `linear_epochs`) on a copy. Neither the encoder (its mode is restored) nor any random stream of
    the training run is changed. -> {"eval_data", "svm_acc", "knn_acc", ["linear_acc"], "eval_seconds"}"""

    def __init__(self, dataset: str, root: str | None, device, linear_epochs: int = 0, batch_size: int = 64):
        import data
        try:
            import sklearn.svm  # noqa: F401  (before any data is read: a missing package ends the run at once)
        except ImportError:
            raise ImportError("--eval-every fits a linear SVM: it needs scikit-learn (pip install scikit-learn)") from None
        if dataset not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {dataset!r}; one of {', '.join(BENCHMARKS)}")
        self.dataset, self.device, self.linear_epochs, self.batch_size = dataset, torch.device(device), linear_epochs, batch_size
        bench = BENCHMARKS[dataset]
        self.points, self.patches, self.patch_size = bench["points"], bench["patches"], BENCHMARK_PATCH_SIZE
        self.train = data.build_dataset(dataset, root, "train", num_points=self.points)
        self.test = data.build_dataset(dataset, root, "test", num_points=self.points)

    @classmethod
    def from_config(cls, cfg, device) -> "PretrainingEval | None":
        """The evaluator a pretraining Config asks for: cfg.eval_data (its root cfg.eval_data_root), else
        ModelNet40 (the run's own data root when it pretrains on ModelNet40, else data/ModelNet40) when it is
        there, else None with a note. Named data that cannot be read ends the run before it starts."""
        name, root = cfg.eval_data, cfg.eval_data_root
        if name is None:
            name, root = "modelnet40", root or (cfg.data_root if cfg.data == "modelnet40" else None)
        try:
            return cls(name, root, device, cfg.eval_linear_epochs)
        except ImportError as e:
            raise SystemExit(f"error: {e}") from None
        except (FileNotFoundError, ValueError) as e:
            if cfg.eval_data is not None:
                raise SystemExit(f"--eval-data {cfg.eval_data}: {e}") from None
            print(f"note: --eval-every {cfg.eval_every}: no evaluation data (ModelNet40 is not at "
                  f"{root or 'data/ModelNet40'}); name one with --eval-data NAME --set eval_data_root=PATH. "
                  "Pretraining goes on without evaluation.", flush=True)
            return None

    def __call__(self, encoder: asymdsd.PointEncoder) -> dict:
        import copy
        t0 = time.perf_counter()
        was_training = encoder.training
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            fit = [extract_features(encoder, ds, self.patches, self.patch_size, self.batch_size, self.device,
                                    f"eval {split}") for ds, split in ((self.train, "train"), (self.test, "test"))]
            rec = dict(eval_data=self.dataset, svm_acc=round(svm_accuracy(*fit[0], *fit[1]), 6),
                       knn_acc=round(knn_accuracy(*fit[0], *fit[1]), 6))
            if self.linear_epochs:
                protocol = dict(recipe("pretrain_linear", self.dataset), epochs=self.linear_epochs)
                model = Classifier(copy.deepcopy(encoder), len(self.train.classes), True, 0.0, False, "linear")
                history = finetune(model, self.train, self.test, protocol, self.linear_epochs, self.patches,
                                   self.patch_size, BATCH_SIZE, self.device, desc="eval linear probe")
                last = history[-protocol["pooled_last_epochs"]:]
                rec["linear_acc"] = round(float(np.mean([h["test_acc"] for h in last])), 6)
        encoder.train(was_training)
        rec["eval_seconds"] = round(time.perf_counter() - t0, 1)
        return rec


# ----------------------------------------------------------------------------------------------
# 7. Command line: the protocols, a table on stdout, one JSON line per command in --results
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
    svm_pred = svm_predict(fit[0][0], fit[0][1], fit[1][0], C=args.C)
    t_svm = time.perf_counter()
    knn_pred = knn_predict(fit[0][0], fit[0][1], fit[1][0], k=args.k)
    C = len(test.classes)
    svm_m = accuracy_metrics(confusion_matrix(svm_pred, fit[1][1], C), test.classes)
    knn_m = accuracy_metrics(confusion_matrix(knn_pred, fit[1][1], C), test.classes)
    svm, knn = svm_m["acc"], knn_m["acc"]
    png = confusion_path(args, "svm", args.data)
    if png:
        png = save_confusion_png(confusion_matrix(svm_pred, fit[1][1], C), test.classes, png,
                                 f"linear SVM | {source} | {args.data}")
    metrics = dict(svm_acc=svm, knn_acc=knn, svm_class_mean_acc=svm_m["class_mean_acc"],
                   knn_class_mean_acc=knn_m["class_mean_acc"], train_size=len(train), test_size=len(test),
                   svm_per_class=svm_m["per_class"], knn_per_class=knn_m["per_class"], confusion_png=png,
                   seconds=dict(data=round(t_data - t0, 1), features=round(t_feat - t_data, 1),
                                svm=round(t_svm - t_feat, 1), total=round(time.perf_counter() - t0, 1)))
    settings = dict(dataset=args.data, data_root=args.data_root, points=points, patches=patches, patch_size=k,
                    encoder=info["kind"], branch="student" if args.student else "teacher", sizes=info["sizes"],
                    feature="[cls, mean] L2-normalised", svm_C=args.C, knn_k=args.k)
    report(args, "svm", source, settings, metrics,
           [("linear SVM acc / class-mean", f"{100 * svm:.2f} / {100 * svm_m['class_mean_acc']:.2f}"),
            (f"kNN (k={args.k}) acc / class-mean", f"{100 * knn:.2f} / {100 * knn_m['class_mean_acc']:.2f}"),
            ("train / test shapes", f"{len(train)} / {len(test)}"), ("patches x points", f"{patches} x {k}"),
            ("seconds (features / svm)", f"{metrics['seconds']['features']} / {metrics['seconds']['svm']}")])


def train_classifiers(args, command: str, protocol_name: str, protocol: dict, head: str = "mlp") -> dict:
    """`args.runs` classifiers trained with `protocol` (seeds 0..runs-1), each from fresh encoder weights
    (build_encoder), tested after every epoch; the final model is also tested with `args.votes` votes
    (`predict`). Prints the table, writes the confusion matrix of the last epochs (summed over the runs) and
    appends the record. Returns the metrics."""
    epochs = args.epochs or protocol["epochs"]
    _, info, source = build_encoder(args)
    points, patches, k = patch_settings(args, args.data)
    train, test = load_split(args, "train", points), load_split(args, "test", points)
    augmentation = dict(rotate=protocol["rotate"], scale=protocol["scale"])
    C = len(train.classes)
    runs, single_conf, vote_conf = [], np.zeros((C, C), np.int64), np.zeros((C, C), np.int64)
    for seed in range(args.runs):
        encoder = build_encoder(args)[0]     # fresh pretrained weights for every run
        model = Classifier(encoder, C, protocol["cls_feature"], args.drop_path, protocol["soft_init_head"], head)
        history = finetune(model, train, test, protocol, epochs, patches, k, args.batch_size, args.device, seed,
                           desc=f"{command} seed {seed}")
        single, voted, labels = predict(model, test, patches, k, 2 * args.batch_size, args.device,
                                        max(args.votes, 1), augmentation, seed)
        conf, vconf = confusion_matrix(single.argmax(1), labels, C), confusion_matrix(voted.argmax(1), labels, C)
        single_conf += conf
        vote_conf += vconf
        run = dict(seed=seed, **summarize(history))
        if args.votes > 1:
            vm = accuracy_metrics(vconf, test.classes)
            run.update(vote_acc=vm["acc"], vote_class_mean=vm["class_mean_acc"])
        if "pooled_last_epochs" in protocol:   # the pretraining probe's score: the last epochs' tests pooled
            run["pooled_acc"] = float(np.mean([h["test_acc"] for h in history[-protocol["pooled_last_epochs"]:]]))
        runs.append(dict(run, history=history))
        if getattr(args, "save", None):
            save_classifier(model, info, train.classes, points, patches, k, args.save)
    if getattr(args, "save", None):
        print(f"saved the classifier (seed {args.runs - 1}, last epoch) to {args.save}: `python evaluate.py predict {args.save} FILES`")
    col = lambda key: [r[key] for r in runs]
    metrics = dict(last_acc_mean=float(np.mean(col("last_acc"))), last_acc_std=float(np.std(col("last_acc"))),
                   best_acc_mean=float(np.mean(col("best_acc"))), best_acc_std=float(np.std(col("best_acc"))),
                   class_mean_acc_mean=float(np.mean(col("last_class_mean"))),
                   class_mean_acc_std=float(np.std(col("last_class_mean"))))
    rows = [(f"seed {r['seed']}", f"last {100 * r['last_acc']:.2f}   best {100 * r['best_acc']:.2f} (epoch "
             f"{r['best_epoch']})   class-mean {100 * r['last_class_mean']:.2f}"
             + (f"   voting {100 * r['vote_acc']:.2f}" if "vote_acc" in r else "")) for r in runs]
    rows += [("last epoch acc", mean_std(col("last_acc"))), ("best epoch acc", mean_std(col("best_acc"))),
             ("class-mean acc (last epoch)", mean_std(col("last_class_mean")))]
    if args.votes > 1:
        metrics.update(vote_acc_mean=float(np.mean(col("vote_acc"))), vote_acc_std=float(np.std(col("vote_acc"))),
                       vote_class_mean_acc_mean=float(np.mean(col("vote_class_mean"))))
        rows += [(f"voting acc ({args.votes} votes)", mean_std(col("vote_acc"))),
                 ("voting class-mean acc", mean_std(col("vote_class_mean")))]
    png = confusion_path(args, command, args.data)
    if png:
        png = save_confusion_png(single_conf, test.classes, png, f"{command} | {source} | {args.data}")
    metrics.update(per_class=accuracy_metrics(single_conf, test.classes)["per_class"], confusion_png=png, runs=runs)
    settings = dict(dataset=args.data, data_root=args.data_root, protocol=protocol_name, head=head, epochs=epochs,
                    runs=args.runs, points=points, patches=patches, patch_size=k, encoder=info["kind"], sizes=info["sizes"],
                    drop_path=args.drop_path, batch_size=args.batch_size, votes=args.votes,
                    vote_augmentation=augmentation if args.votes > 1 else None, saved=getattr(args, "save", None))
    report(args, command, source, settings, metrics, rows)
    return metrics


def cmd_finetune(args):
    protocol_name = args.protocol or BENCHMARKS[args.data]["protocol"]
    if protocol_name == "modelnet40_8k":   # the 8k input unless the flags say otherwise
        args.num_points = args.num_points or MODELNET40_8K["points"]
        args.patches = args.patches or MODELNET40_8K["patches"]
    return train_classifiers(args, "finetune", protocol_name, PROTOCOLS[protocol_name])


def cmd_probe(args):
    """Frozen encoder, linear or MLP-3 head (variants/linear_from_pretrained.yaml, mlp3_from_pretrained.yaml)."""
    return train_classifiers(args, f"probe_{args.head}", "frozen", recipe("frozen", args.data),
                             "linear" if args.head == "linear" else "mlp")


def cmd_scratch(args):
    """The fine-tuning baseline without pretraining (variants/scratch.yaml): a random-init encoder of --preset."""
    if args.checkpoint:
        raise SystemExit("scratch trains from random initialisation: give --preset, not a checkpoint")
    args.random_init = True
    return train_classifiers(args, "scratch", "scratch", recipe("scratch", args.data))


def cmd_partseg(args):
    """ShapeNetPart part segmentation: the model, metric and recipe live in segment.py."""
    import segment
    segment.run_partseg(args)


def cmd_fewshot(args):
    protocol = PROTOCOLS["fewshot"]
    epochs = args.epochs or protocol["epochs"]
    _, info, source = build_encoder(args)
    args.data = "modelnet40_fewshot"
    points, patches, k = patch_settings(args, args.data)
    results, rows = {}, []
    for way in args.ways:
        for shot in args.shots:
            folds, names, pairs = [], {}, []   # pairs: (true, predicted) class names of every fold's last epoch
            for fold in args.folds:
                train = load_split(args, "train", points, way=way, shot=shot, fold=fold)
                test = load_split(args, "test", points, way=way, shot=shot, fold=fold)
                model = Classifier(build_encoder(args)[0], way, protocol["cls_feature"], args.drop_path,
                                   protocol["soft_init_head"])
                history = finetune(model, train, test, protocol, epochs, patches, k, args.batch_size, args.device,
                                   args.seed, desc=f"{way}-way {shot}-shot fold {fold}")
                folds.append(dict(fold=fold, **summarize(history)))
                if args.save:   # overwritten fold by fold: the last way, shot and fold's classifier stays
                    save_classifier(model, info, train.classes, points, patches, k, args.save)
                logits, _, labels = predict(model, test, patches, k, 2 * args.batch_size, args.device)
                pairs += [(test.classes[t], test.classes[p]) for t, p in zip(labels.tolist(), logits.argmax(1).tolist())]
            last, best = [f["last_acc"] for f in folds], [f["best_acc"] for f in folds]
            class_mean = [f["last_class_mean"] for f in folds]
            # every fold draws its own classes: one confusion matrix over the ModelNet40 names they cover
            for t, p in pairs:
                names.setdefault(t, len(names))
                names.setdefault(p, len(names))
            conf = confusion_matrix([names[p] for _, p in pairs], [names[t] for t, _ in pairs], len(names))
            png = confusion_path(args, "fewshot", args.data, f"{way}way{shot}shot")
            if png:
                png = save_confusion_png(conf, list(names), png, f"fewshot {way}-way {shot}-shot, "
                                                                 f"{len(folds)} folds | {source}")
            results[f"{way}way_{shot}shot"] = dict(last_acc_mean=float(np.mean(last)), last_acc_std=float(np.std(last)),
                                                   best_acc_mean=float(np.mean(best)), best_acc_std=float(np.std(best)),
                                                   class_mean_acc_mean=float(np.mean(class_mean)),
                                                   class_mean_acc_std=float(np.std(class_mean)),
                                                   confusion_png=png, folds=folds)
            rows.append((f"{way}-way {shot}-shot ({len(folds)} folds)", f"last {mean_std(last)}   best "
                         f"{mean_std(best)}   class-mean {mean_std(class_mean)}"))
    settings = dict(dataset=args.data, data_root=args.data_root, epochs=epochs, folds=args.folds, points=points,
                    patches=patches, patch_size=k, encoder=info["kind"], sizes=info["sizes"], seed=args.seed)
    report(args, "fewshot", source, settings, results, rows)
    if args.save:
        print(f"saved the classifier ({args.ways[-1]}-way {args.shots[-1]}-shot fold {args.folds[-1]}, last epoch) "
              f"to {args.save}: `python evaluate.py predict {args.save} FILES`")
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
                           protocol["soft_init_head"], head="linear")
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
    (`<run>/epoch_NNN.pt`, evaluated with `svm` into --results) and of the evaluations the run logged
    itself (`--eval-every`, with the linear probe's accuracy when it ran), one panel per dataset, and
    the loss terms, teacher entropies and lr of its log.jsonl, all against the epoch. Returns the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines = [json.loads(line) for line in open(args.log) if line.strip()]
    recs = [r for r in lines if "loss" in r]                  # training steps; the rest are evaluations
    keys = [k for k in recs[0] if k.startswith(("loss", "teacher_entropy")) or k == "lr"]
    run_dir = os.path.dirname(os.path.abspath(args.log))
    acc = {}  # dataset -> {epoch -> (svm, knn[, linear])}, the latest record of each epoch of this run
    for r in lines:
        if "svm_acc" in r:                                      # asymdsd.py --eval-every
            acc.setdefault(r.get("eval_data"), {})[r["epoch"]] = (r["svm_acc"], r["knn_acc"], r.get("linear_acc"))
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
            linear = [(e, by_epoch[e][2]) for e in epochs if len(by_epoch[e]) > 2 and by_epoch[e][2] is not None]
            if linear:
                ax.plot([e for e, _ in linear], [100 * a for _, a in linear], "^-.", label="linear probe")
            if args.baseline is not None:
                ax.axhline(args.baseline, color="gray", ls=":", label="random init (SVM)")
            ax.set_title(f"{dataset} test accuracy (%)" if dataset else "test accuracy (%)")
            ax.legend(fontsize=7)
        else:
            ax.plot([r["epoch"] for r in recs if key in r], [r[key] for r in recs if key in r])
            ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.93, wspace=0, hspace=0.08)
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



# ----------------------------------------------------------------------------------------------
# 7. Your own point clouds: embed, predict, show (ours; not in the official code)
# ----------------------------------------------------------------------------------------------

USER_EXT = (".npy", ".npz", ".txt", ".xyz", ".csv", ".ply", ".off", ".obj")


def find_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (searched recursively) and globs -> sorted-per-argument list of supported files."""
    import glob
    found = []
    for arg in inputs:
        if os.path.isdir(arg):
            hits = sorted(os.path.join(d, f) for d, _, fs in os.walk(arg) for f in fs if f.lower().endswith(USER_EXT))
        elif os.path.isfile(arg):
            hits = [arg]
        else:
            hits = sorted(h for h in glob.glob(arg, recursive=True) if h.lower().endswith(USER_EXT))
        if not hits:
            raise SystemExit(f"error: {arg}: no point cloud or mesh file there (supported: {' '.join(USER_EXT)})")
        found += hits
    return found


def read_user_cloud(path: str, num_points: int, seed: int = 0) -> np.ndarray:
    """One user file -> (num_points, 3) float32, prepared as the benchmark data is (data.py load_cloud):
    meshes sampled on the surface (PRE_SAMPLE_POINTS area-weighted samples), then any cloud with
    more points than the model's input reduced by farthest point sampling from a start seeded by
    the file name. A cloud with fewer points than the input is refused (stated rule: no padding,
    a repeated point would change the patches). Errors are data.DataFileError naming the file."""
    import data
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise data.DataFileError(path, f"cannot read ({e.strerror})") from None
    if ext in data.MESH_EXT or ext in (".npy", ".txt", ".xyz"):
        return data.load_cloud(path, raw, num_points, "fps", seed, None)
    rng = data.item_rng(seed, path)
    if ext == ".csv":   # a header row is allowed: rows that are not numbers are dropped
        rows = [r for r in raw.decode("latin-1").splitlines() if r.strip()]
        keep = [r for r in rows if all(_is_number(c) for c in r.replace(",", " ").split()[:3])]
        pts = data.read_points("\n".join(keep).encode(), path)
    elif ext == ".npz":
        try:
            arrays = np.load(io.BytesIO(raw), allow_pickle=False)
            name = "points" if "points" in arrays.files else (arrays.files[0] if arrays.files else None)
            if name is None:
                raise ValueError("no arrays in it")
            buf = io.BytesIO()
            np.save(buf, arrays[name])
        except (ValueError, EOFError, OSError) as e:
            raise data.DataFileError(path, f"unreadable .npz ({e})") from None
        pts = data.read_points(buf.getvalue(), path + ".npy")
    elif ext == ".ply":
        pts = _read_ply(path, raw, num_points, rng)
    else:
        raise data.DataFileError(path, f"unsupported extension {ext!r} (supported: {' '.join(USER_EXT)})")
    return np.ascontiguousarray(data.resample(pts, num_points, "fps", rng, path))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _read_ply(path: str, raw: bytes, num_points: int, rng) -> np.ndarray:
    """ASCII or binary .ply through trimesh: a mesh (faces present) is sampled on its surface as
    data.py samples .off meshes; a point cloud gives its vertices."""
    import data
    try:
        import trimesh
    except ImportError:
        raise SystemExit("reading .ply needs trimesh: pip install trimesh") from None
    try:
        geom = trimesh.load(io.BytesIO(raw), file_type="ply", process=False)
        vertices = np.asarray(geom.vertices, dtype=np.float64)
        faces = np.asarray(getattr(geom, "faces", np.zeros((0, 3))), dtype=np.int64)
    except Exception as e:   # trimesh raises many kinds on a broken file
        raise data.DataFileError(path, f"unreadable .ply ({type(e).__name__}: {e})") from None
    if len(vertices) == 0:
        raise data.DataFileError(path, "no vertices")
    if not np.isfinite(vertices).all():
        raise data.DataFileError(path, "non-finite coordinates (NaN or inf)")
    if len(faces):
        try:
            return data.sample_surface(vertices, faces, max(data.PRE_SAMPLE_POINTS, num_points), rng)
        except ValueError as e:
            raise data.DataFileError(path, str(e)) from None
    return vertices.astype(np.float32)


def read_user_clouds(paths: list[str], num_points: int, skip_bad: bool, seed: int = 0):
    """Read every file; a bad one ends the command with its name and problem, or with --skip-bad
    is skipped, named on stderr and counted. -> clouds (S, N, 3) float32, kept paths"""
    import data
    clouds, kept, bad = [], [], []
    for path in tqdm(paths, desc="read", dynamic_ncols=True, disable=len(paths) < 20):
        try:
            clouds.append(read_user_cloud(path, num_points, seed))
            kept.append(path)
        except data.DataFileError as e:
            if not skip_bad:
                raise SystemExit(f"error: {e}  (--skip-bad skips such files)") from None
            bad.append(str(e))
    for msg in bad:
        print(f"skipped {msg}", file=sys.stderr)
    if bad:
        print(f"skipped {len(bad)} of {len(paths)} files", file=sys.stderr)
    if not clouds:
        raise SystemExit("error: no readable input file")
    return np.stack(clouds), kept


def input_settings(args, info: dict) -> tuple[int, int, int]:
    """(points, patches, patch size): the flags, else a saved classifier's own (`info`), else the
    ModelNet40 SVM protocol's (1024 points, 64 x 32), as `svm` evaluates every encoder."""
    bench = BENCHMARKS["modelnet40"]
    return (args.num_points or info.get("num_points") or bench["points"],
            args.patches or info.get("num_patches") or bench["patches"],
            args.patch_size or info.get("patch_size") or BENCHMARK_PATCH_SIZE)


@torch.no_grad()
def embed_clouds(encoder: asymdsd.PointEncoder, clouds: np.ndarray, num_patches: int, patch_size: int,
                 batch_size: int = 64, device: str = "cpu", tokens: bool = False):
    """The SVM protocol's feature (extract_features: L2-normalised [CLS, mean]) of every cloud, and
    optionally the normed per-patch tokens. clouds (S, N, 3) -> (S, F), (S, G, D) or None"""
    labels = torch.zeros(len(clouds), dtype=torch.long)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(clouds), labels)
    feats, _ = extract_features(encoder, dataset, num_patches, patch_size, batch_size, device, desc="embed")
    if not tokens:
        return feats.numpy(), None
    dev, out = torch.device(device), []
    for points in torch.utils.data.DataLoader(torch.from_numpy(clouds), batch_size=batch_size):
        centers, patches = eval_patches(points.to(dev), num_patches, patch_size)
        x = encoder.to(dev)(patches, centers).float()                           # (B, T, D)
        out.append((x[:, 1:] if encoder.cls_token is not None else x).cpu())
    return feats.numpy(), torch.cat(out).numpy()


def cmd_embed(args):
    if args.random_init and args.checkpoint:   # no checkpoint given: the first positional is an input
        args.inputs, args.checkpoint = [args.checkpoint] + args.inputs, None
    encoder, info, source = build_encoder(args)
    points, patches, k = input_settings(args, {})   # the SVM protocol's input, as `svm` measures it
    clouds, kept = read_user_clouds(find_inputs(args.inputs), points, args.skip_bad, args.seed)
    feats, toks = embed_clouds(encoder, clouds, patches, k, args.batch_size, args.device, args.tokens)
    out = args.out
    if out.endswith(".npz"):
        extra = dict(tokens=toks) if toks is not None else {}
        np.savez(out, features=feats, files=np.array(kept), **extra)
        print(f"wrote {out}: features {feats.shape}" + (f", tokens {toks.shape}" if toks is not None else "") + ", files")
    else:
        np.save(out, feats)
        names = os.path.splitext(out)[0] + ".txt"
        with open(names, "w") as fh:
            fh.write("\n".join(kept) + "\n")
        print(f"wrote {out} (features {feats.shape}, row i = line i of {names})")
        if toks is not None:
            tok_path = os.path.splitext(out)[0] + "_tokens.npy"
            np.save(tok_path, toks)
            print(f"wrote {tok_path} (per-patch tokens {toks.shape})")
    print(f"encoder {source}: {points} points, {patches} patches x {k}")


def save_classifier(model: Classifier, info: dict, classes: list[str], num_points: int, num_patches: int,
                    patch_size: int, path: str):
    """Everything `predict` needs: encoder sizes, encoder + head weights, class names, pooling and
    the input preprocessing (points, patches, patch size)."""
    head = "linear" if isinstance(model.head, nn.Linear) else "mlp"
    torch.save({"classifier": True, "config": dict(info["sizes"]), "state_dict": model.state_dict(),
                "classes": list(classes), "parts": list(model.parts), "cls_in_pools": model.cls_in_pools,
                "head": head,
                "patchify": dict(num_points=num_points, num_patches=num_patches, patch_size=patch_size)}, path)


def load_classifier(path: str) -> tuple[Classifier, dict]:
    """A file written by save_classifier -> (Classifier in eval mode, its patchify + classes)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no classifier at {path}")
    try:
        ckpt = asymdsd.load_allowlisted(path)   # no arbitrary code from a downloaded file
    except Exception as e:
        raise SystemExit(f"error: {path} is not a torch file ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not ckpt.get("classifier"):
        raise SystemExit(f"error: {path} is not a classifier saved by `finetune`, `probe`, `scratch` or `fewshot` "
                         "with --save (an encoder? use `embed`)")
    encoder = asymdsd.PointEncoder(**ckpt["config"])
    model = Classifier(encoder, len(ckpt["classes"]), cls_feature=not ckpt["cls_in_pools"], drop_path_rate=0.0,
                       head=ckpt.get("head", "mlp"))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), dict(classes=ckpt["classes"], **ckpt["patchify"])


@torch.no_grad()
def predict_probs(model: Classifier, clouds: np.ndarray, num_patches: int, patch_size: int, batch_size: int = 64,
                  device: str = "cpu") -> np.ndarray:
    """Class probabilities, patches drawn as evaluation draws them. clouds (S, N, 3) -> (S, classes)"""
    dev = torch.device(device)
    model = model.eval().to(dev)
    out = []
    for points in tqdm(torch.utils.data.DataLoader(torch.from_numpy(clouds), batch_size=batch_size),
                          desc="predict", dynamic_ncols=True, disable=len(clouds) <= batch_size):
        centers, patches = eval_patches(points.to(dev), num_patches, patch_size)
        out.append(model(patches, centers).float().softmax(-1).cpu())
    return torch.cat(out).numpy()


def cmd_predict(args):
    if args.out and not args.out.lower().endswith((".csv", ".json")):
        raise SystemExit(f"error: --out {args.out}: give a .csv or .json file")
    model, info = load_classifier(args.classifier)
    points, patches, k = input_settings(args, info)
    clouds, kept = read_user_clouds(find_inputs(args.inputs), points, args.skip_bad, args.seed)
    probs = predict_probs(model, clouds, patches, k, args.batch_size, args.device)
    top = min(args.top_k, probs.shape[1])
    order = np.argsort(-probs, axis=1)[:, :top]
    rows = [dict(file=f, top=[dict(label=info["classes"][j], prob=float(probs[i, j])) for j in order[i]])
            for i, f in enumerate(kept)]
    if args.out and args.out.lower().endswith(".json"):
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    elif args.out:
        import csv
        with open(args.out, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file"] + [c for r in range(1, top + 1) for c in (f"label{r}", f"prob{r}")])
            for r in rows:
                w.writerow([r["file"]] + [c for t in r["top"] for c in (t["label"], f"{t['prob']:.4f}")])
    cells = [[r["file"]] + [f"{t['label']} {100 * t['prob']:.1f}%" for t in r["top"]] for r in rows]
    cells.insert(0, ["file"] + [f"top-{j + 1}" for j in range(top)])
    widths = [max(len(c[j]) for c in cells) for j in range(top + 1)]
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip())
    if args.out:
        print(f"wrote {args.out}")


def cls_attention(encoder: asymdsd.PointEncoder, patches: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Attention of the CLS token to the patch tokens in the last block, averaged over heads: the
    block's input is caught by a hook, then softmax(q_cls k^T / sqrt(d)) is recomputed from the
    block's own weights (Block.forward: x + pos, RMSNorm, packed qkv).
    patches (B, G, K, 3), centers (B, G, 3) -> (B, G), rows sum to 1 - (CLS-to-CLS weight)"""
    if encoder.cls_token is None:
        raise SystemExit("error: this encoder has no CLS token (a `mask` mode model): no CLS attention to show")
    block = encoder.encoder.blocks[-1]
    seen = {}
    handle = block.register_forward_pre_hook(lambda mod, inp: seen.update(x=inp[0], pos=inp[1]))
    try:
        with torch.no_grad():
            encoder(patches, centers)
    finally:
        handle.remove()
    with torch.no_grad():
        h = block.norm1(seen["x"] + seen["pos"])                               # (B, T, D)
        q, k, _ = block.attn.qkv(h).chunk(3, dim=-1)
        heads = block.attn.num_heads
        q = q[:, :1].unflatten(-1, (heads, -1)).transpose(1, 2)               # (B, H, 1, D/H)
        k = k.unflatten(-1, (heads, -1)).transpose(1, 2)                      # (B, H, T, D/H)
        attn = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # (B, H, 1, T)
    return attn.mean(1)[:, 0, 1:]                                              # (B, G)


def draw_views(points: torch.Tensor, preset: str, seed: int, num_patches: int, patch_size: int) -> dict:
    """The figure's inputs, drawn by the training code itself: eval patches (eval_patches ->
    asymdsd.patchify) and one pretraining step's views (asymdsd.make_views: crops, augmentation,
    patches, inverse-block masks) of the preset's config. points (N, 3) -> dict of tensors"""
    cfg = asymdsd.config_from_dict(asymdsd.preset_settings(preset))
    for key, value in asymdsd.MODE_DEFAULTS[cfg.mode].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    gen = torch.Generator().manual_seed(seed)
    centers, patches = eval_patches(points[None], num_patches, patch_size)     # (1, G, 3), (1, G, K, 3)
    views = asymdsd.make_views(points[None], cfg, gen)
    return dict(cfg=cfg, centers=centers, patches=patches, views=views)


def cmd_show(args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("show needs matplotlib: pip install matplotlib") from None
    import data
    info, encoder = {}, None
    if args.ckpt:
        try:
            encoder, info = load_encoder(args.ckpt)
        except ValueError as e:
            raise SystemExit(f"error: {args.ckpt}: {e}")
    points_n, patches_n, k = input_settings(args, {})
    try:
        cloud = torch.from_numpy(read_user_cloud(args.cloud, points_n, args.seed))
    except data.DataFileError as e:
        raise SystemExit(f"error: {e}") from None
    drawn = draw_views(asymdsd.normalize_unit_sphere(cloud[None])[0], args.preset, args.seed, patches_n, k)
    cfg, views = drawn["cfg"], drawn["views"]
    g_centers, g_patches = views["global"]                                      # (1, C, G, 3), (1, C, G, K, 3)
    crops = [("global", c) for c in range(g_centers.shape[1])]
    if "local" in views:
        crops += [("local", c) for c in range(views["local"][0].shape[1])]
    masks = views.get("mask")                                                   # (C*M, G) or None
    n_masks = 0 if masks is None else cfg.num_masks
    cols = max(len(crops), n_masks, 2)
    fig = plt.figure(figsize=(2.6 * cols, 8 if masks is not None else 5.4))
    rows = 3 if masks is not None else 2

    def panel(i, title):
        ax = fig.add_subplot(rows, cols, i)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
        ax.set_aspect("equal")
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        return ax

    def scatter(ax, pts, c, s=3, **kw):
        """Seen from above (z is up in ModelNet40): x-y, the highest points drawn last."""
        pts = pts.reshape(-1, 3).numpy()
        order = np.argsort(pts[:, 2])
        if not isinstance(c, str):
            c = np.asarray(c)[order]
        ax.scatter(pts[order, 0], pts[order, 1], c=c, s=s, linewidths=0 if kw.get("marker") != "x" else 1, **kw)

    # row 1: the evaluation patches, coloured by patch, FPS centres marked; and the CLS attention
    centers, patches = drawn["centers"][0], drawn["patches"][0]                 # (G, 3), (G, K, 3) centred
    G, K = patches.shape[:2]
    absolute = patches + centers[:, None]                                       # back to cloud coordinates
    ax = panel(1, f"{G} patches x {K} (FPS + kNN)")
    scatter(ax, absolute, np.repeat(np.arange(G), K), cmap="tab20")
    scatter(ax, centers, "k", s=10, marker="x")
    if encoder is not None:
        attn = cls_attention(encoder, patches[None], centers[None])[0]        # (G,)
        ax = panel(2, "CLS attention to patches, last block")
        scatter(ax, absolute, np.repeat(attn.numpy(), K), cmap="inferno")
    # row 2: the multi-crop views as one pretraining step draws them (after augmentation and normalisation)
    for i, (kind, c) in enumerate(crops):
        p = views[kind][1][0, c] + views[kind][0][0, c][:, None]               # (G', K', 3) cloud coordinates
        ax = panel(cols + i + 1, f"{kind} crop {c + 1}: {p.shape[0]} x {p.shape[1]}")
        scatter(ax, p, np.repeat(np.arange(p.shape[0]), p.shape[1]), cmap="tab20")
    # row 3: the student's inverse-block masks of global crop 1: visible patches coloured, masked grey
    if masks is not None:
        p = g_patches[0, 0] + g_centers[0, 0][:, None]                          # (G', K', 3) cloud coordinates
        for m in range(n_masks):
            mask = masks[m]                                                     # (G',) True = masked
            ax = panel(2 * cols + m + 1, f"mask {m + 1} of crop 1: {int((~mask).sum())} visible")
            scatter(ax, p[mask], "lightgrey", s=1)
            scatter(ax, p[~mask], "tab:red", s=3)
    fig.suptitle(f"{os.path.basename(args.cloud)}: views of the {args.preset} preset (seed {args.seed})", fontsize=10)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.93, wspace=0, hspace=0.08)
    fig.savefig(args.out, dpi=args.dpi)
    plt.close(fig)
    print(f"wrote {args.out}")


def main(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("checkpoint", nargs="?", help="asymdsd.py last.pt, an official .ckpt, or an export")
    common.add_argument("--student", action="store_true", help="evaluate the student encoder (default: the teacher)")
    common.add_argument("--random-init", action="store_true", help="untrained encoder of --preset (the baseline)")
    common.add_argument("--preset", default="paper", choices=sorted(asymdsd.PRESETS),
                        help="asymdsd.py preset for --random-init (default: %(default)s)")
    common.add_argument("--num-heads", type=int, help="heads of a checkpoint that does not store them (a bare "
                                                      "official state_dict; default 6/12/16 for width 384/768/1024); "
                                                      "a value that contradicts the file is refused")
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
    data_flags.add_argument("--confusion-dir", help="folder for the confusion matrix PNG (default: confusion/ "
                                                    "beside --results; 'none': no PNG)")
    trained = argparse.ArgumentParser(add_help=False)   # the commands that train a classification head
    trained.add_argument("--epochs", type=int, help="default: the recipe's (150; 100 for modelnet40_8k); warm-up "
                                                    "and first-stage epochs scale with it")
    trained.add_argument("--runs", type=int, default=1, help="repeat with seeds 0..runs-1; report mean and std "
                                                             "(default: 1)")
    trained.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="(default: %(default)s)")
    trained.add_argument("--drop-path", type=float, default=DROP_PATH, help="last block's drop path rate, rising "
                                                                        "linearly from 0 (default: %(default)s)")
    # NOTE: (departure 17) the official configs leave voting empty (classification_model.yaml: voting,
    # voting_augmentations); 10 votes (Point-BERT's and Point-MAE's test_vote count) with the recipe's
    # training augmentation, reported beside the single pass.
    trained.add_argument("--save", help="write the trained classifier (encoder, head, class names, points and "
                         "patches) here, for `predict`; with --runs > 1 the last run's")
    trained.add_argument("--votes", type=int, default=10, help="test-time votes of the final model: the clean "
                         "pass plus votes-1 augmented passes, logits summed; 1: none (default: %(default)s)")

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
    s = sub.add_parser("finetune", help="fine-tuning classification", parents=[common, data_flags, trained])
    s.add_argument("--data", default="scanobjectnn_pbt50rs", choices=CLASSIFICATION, help="(default: %(default)s)")
    s.add_argument("--protocol", choices=sorted(PROTOCOLS), help="default: the dataset's (ModelNet40 two-stage, "
                   "ScanObjectNN one stage); modelnet40_8k: 8192 points in 512 x 32 patches, 100 epochs")
    s.set_defaults(func=cmd_finetune)
    s = sub.add_parser("probe", help="frozen encoder, linear or MLP-3 head", parents=[common, data_flags, trained])
    s.add_argument("--data", default="modelnet40", choices=CLASSIFICATION, help="(default: %(default)s)")
    s.add_argument("--head", default="linear", choices=["linear", "mlp3"], help="(default: %(default)s)")
    s.set_defaults(func=cmd_probe)
    s = sub.add_parser("scratch", help="fine-tuning recipe from random initialisation (the baseline)",
                       parents=[common, data_flags, trained])
    s.add_argument("--data", default="scanobjectnn_pbt50rs", choices=CLASSIFICATION, help="(default: %(default)s)")
    s.set_defaults(func=cmd_scratch)
    s = sub.add_parser("fewshot", help="few-shot ModelNet40", **fmt)
    s.add_argument("--ways", type=int, nargs="+", default=[5, 10], help="(default: 5 10)")
    s.add_argument("--shots", type=int, nargs="+", default=[10, 20], help="(default: 10 20)")
    s.add_argument("--folds", type=int, nargs="+", default=list(range(10)), help="(default: 0 .. 9)")
    s.add_argument("--epochs", type=int, help="default 150; the warm-up scales with it")
    s.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="(default: %(default)s)")
    s.add_argument("--drop-path", type=float, default=DROP_PATH, help="(default: %(default)s)")
    s.add_argument("--save", help="write the classifier of the last way, shot and fold (encoder, head, that "
                   "fold's class names, points and patches) here, for `predict`")
    s.set_defaults(func=cmd_fewshot)
    s = sub.add_parser("partseg", help="fine-tune and test part segmentation on ShapeNetPart (segment.py)", **fmt)
    s.add_argument("--epochs", type=int, help="default 300; the warm-up scales with it")
    s.add_argument("--runs", type=int, default=1, help="repeat with seeds 0..runs-1; report mean and std (default: 1)")
    s.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    s.add_argument("--drop-path", type=float, default=DROP_PATH, help="(default: %(default)s)")
    s.add_argument("--data", default="shapenetpart", choices=["shapenetpart"], help="(default: %(default)s)")
    s.add_argument("--out", default="partseg", help="folder for the trained models (default: %(default)s)")
    s.set_defaults(func=cmd_partseg)
    s = sub.add_parser("objaverse_lvis", help="Objaverse-LVIS few-shot: frozen encoder, linear head, top-1/3/5", **fmt)
    s.add_argument("--shot", type=int, default=10, help="(default: %(default)s)")
    s.add_argument("--folds", type=int, nargs="+", default=list(range(10)), help="(default: 0 .. 9)")
    s.add_argument("--epochs", type=int, help="default 150; the warm-up scales with it")
    s.add_argument("--batch-size", type=int, default=PROTOCOLS["objaverse_lvis"]["batch_size"], help="(default: %(default)s)")
    s.set_defaults(func=cmd_objaverse_lvis)
    s = sub.add_parser("export", help="write the encoder alone for use in another project", parents=[common])
    s.add_argument("--out", required=True, help="output .pt: {'config': PointEncoder kwargs, 'state_dict': ...}")
    s.set_defaults(func=cmd_export)
    inputs_help = ("point cloud / mesh files, folders (recursive) or globs: .npy .npz .txt .xyz .csv "
                   "(x y z first) .ply .off .obj")
    user = argparse.ArgumentParser(add_help=False)
    user.add_argument("--skip-bad", action="store_true", help="skip unreadable files (named on stderr, counted)")
    user.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    sizes = argparse.ArgumentParser(add_help=False)
    sizes.add_argument("--num-points", type=int, help="points per cloud (default: a classifier's own, else 1024 as `svm` on ModelNet40). Meshes "
                       "are sampled on the surface; larger clouds are reduced by FPS as evaluation does; "
                       "smaller ones are refused")
    sizes.add_argument("--patches", type=int, help="patches per cloud (default: a classifier's own, else 64)")
    sizes.add_argument("--patch-size", type=int, help="points per patch (default: a classifier's own, else 32)")
    s = sub.add_parser("embed", help="features of your own point clouds / meshes", parents=[common, user, sizes])
    s.add_argument("inputs", nargs="+", help=inputs_help)
    s.add_argument("--out", default="features.npy", help=".npy (+ a .txt of file names beside it) or .npz "
                   "(features, files[, tokens]) (default: %(default)s)")
    s.add_argument("--tokens", action="store_true", help="also write the per-patch tokens (S, G, D)")
    s.set_defaults(func=cmd_embed)
    s = sub.add_parser("predict", help="classify your own point clouds with a classifier saved by --save",
                       parents=[user, sizes])
    s.add_argument("classifier", help="a file written by `finetune`, `probe`, `scratch` or `fewshot` with --save")
    s.add_argument("inputs", nargs="+", help=inputs_help)
    s.add_argument("--top-k", type=int, default=5, help="(default: %(default)s)")
    s.add_argument("--out", help="also write the table as .csv or .json")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed of mesh sampling / FPS start (default: %(default)s)")
    s.add_argument("--threads", type=int, help="CPU threads for torch")
    s.set_defaults(func=cmd_predict)
    s = sub.add_parser("show", help="PNG of a cloud's patches, crops, masks (and CLS attention with --ckpt)",
                       parents=[sizes])
    s.add_argument("cloud", help="one point cloud or mesh file")
    s.add_argument("--ckpt", help="a checkpoint: adds the last block's CLS attention to the patches")
    s.add_argument("--preset", default="tiny", choices=sorted(asymdsd.PRESETS), help="whose crops and masks "
                   "to draw (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed of the drawn views (default: %(default)s)")
    s.add_argument("--dpi", type=int, default=100, help="(default: %(default)s)")
    s.add_argument("--out", default="figure.png", help="(default: %(default)s)")
    s.set_defaults(func=cmd_show)

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
