"""Part segmentation on ShapeNetPart: the official segmentation model, its instance / class mIoU
metric, and the fine-tuning recipe (official asymdsd/models/semantic_segmentation.py,
asymdsd/layers/point_upsampling.py, asymdsd/metrics/shapenetpart_mean_iou.py, configs/semseg/).

A separate file from evaluate.py: dense prediction is its own downstream task, with its own model,
metric and recipe; evaluate.py keeps the classification protocols and calls `run_partseg` here for
`python evaluate.py partseg CKPT`.

Shape legend as in asymdsd.py; in addition N = points per cloud (2048), P = parts (50),
C = categories (16), L = extracted blocks (3).
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import asymdsd

# ----------------------------------------------------------------------------------------------
# 1. Categories and their parts (official asymdsd/data/datasets_/ShapeNetPart/synset_map.py order)
# ----------------------------------------------------------------------------------------------

CATEGORIES = ["airplane", "bag", "cap", "car", "chair", "earphone", "guitar", "knife", "lamp", "laptop",
              "motorbike", "mug", "pistol", "rocket", "skateboard", "table"]
NUM_PARTS_PER_CATEGORY = [4, 2, 2, 4, 4, 3, 3, 2, 4, 2, 6, 2, 3, 3, 3, 3]  # global part ids are consecutive
NUM_PARTS = sum(NUM_PARTS_PER_CATEGORY)  # 50


def parts_mask() -> torch.Tensor:
    """(C, P) bool: True where part p belongs to category c."""
    mask = torch.zeros(len(CATEGORIES), NUM_PARTS, dtype=torch.bool)
    start = 0
    for c, n in enumerate(NUM_PARTS_PER_CATEGORY):
        mask[c, start:start + n] = True
        start += n
    return mask


# ----------------------------------------------------------------------------------------------
# 2. Inputs: masked unit-sphere normalisation, patches over the real points only
# ----------------------------------------------------------------------------------------------

def real_mask(num_points: torch.Tensor, n: int) -> torch.Tensor:
    """num_points (B,) -> (B, N) bool, True for the real (not zero-padded) rows."""
    return torch.arange(n, device=num_points.device)[None] < num_points[:, None]


def normalize_with_padding(points: torch.Tensor, num_points: torch.Tensor) -> torch.Tensor:
    """NormalizeUnitSpherePC with the padding mask: centroid and radius of the real points only; the
    padded rows are moved by the same shift and scale. points (B, N, 3), num_points (B,) -> (B, N, 3)"""
    real = real_mask(num_points, points.shape[1])[..., None]                  # (B, N, 1)
    centroid = (points * real).sum(1, keepdim=True) / num_points[:, None, None]
    x = points - centroid
    radius = (x.norm(dim=-1) * real[..., 0]).amax(dim=1).clamp_min(1e-12)      # (B,)
    return x / radius[:, None, None]


def patchify_real(points: torch.Tensor, num_points: torch.Tensor, num_patches: int, patch_size: int,
                  start_idx: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """FPS centres and kNN patches over each cloud's real points (official PatchifyPC runs before
    PadArrays). points (B, N, 3) -> centers (B, G, 3), patches (B, G, K, 3) relative to the centre"""
    centers, patches = [], []
    for b in range(points.shape[0]):
        real = points[b:b + 1, : int(num_points[b])]
        start = None if start_idx is None else start_idx[b:b + 1]
        c, p = asymdsd.patchify(real, num_patches, patch_size, generator=generator, start_idx=start)
        centers.append(c)
        patches.append(p)
    return torch.cat(centers), torch.cat(patches)


# ----------------------------------------------------------------------------------------------
# 3. Model: hidden states -> shared LayerNorm -> 3-NN upsampling -> global feature -> head
# ----------------------------------------------------------------------------------------------

class PointBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over batch x points of a (B, N, D) tensor (official TransposeBatchNorm1d)."""

    def forward(self, x):                                              # (B, N, D) -> (B, N, D)
        return super().forward(x.flatten(0, 1)).view_as(x)


def three_nn_weights(points: torch.Tensor, centers: torch.Tensor, eps: float = torch.finfo(torch.float32).eps):
    """The 3 nearest centres of every point and inverse *squared*-distance weights summing to 1
    (official PointUpsampling: d^2 by the expansion -2 p.c + |p|^2 + |c|^2, topk unsorted, clamp 0).
    points (B, N, 3), centers (B, G, 3) -> idx (B, N, 3), weights (B, N, 3), sqdist (B, N, 3)"""
    d = -2 * points @ centers.transpose(1, 2)                                  # (B, N, G)
    d += points.square().sum(-1, keepdim=True)
    d += centers.square().sum(-1)[:, None]
    sqdist, idx = d.topk(3, dim=-1, largest=False, sorted=False)
    sqdist = sqdist.clamp_min(0)
    w = 1.0 / (sqdist + eps)
    return idx, w / w.sum(-1, keepdim=True), sqdist


class PartSegmenter(nn.Module):
    """The official SemanticSegementationModel: hidden states of blocks `layers` (before the final
    norm, CLS dropped) through one shared affine LayerNorm, concatenated (L*D); interpolated to every
    point from its 3 nearest centres; MLP on [xyz, interpolated]; the global feature [category
    embedding, CLS after the final norm, mean, max of the L*D patch features] appended to every
    point; head -> P logits per point."""

    def __init__(self, encoder: asymdsd.PointEncoder, layers: tuple | None = None, upsample_dim: int = 384,
                 label_dim: int = 64, head_dims: tuple = (512, 256), dropout: float = 0.5):
        super().__init__()
        depth = len(encoder.encoder.blocks)
        dim = encoder.encoder.norm.weight.shape[0]
        # the last block of each third of the encoder: (3, 7, 11) of 12 (semseg_model.yaml extract_hidden_layers)
        self.layers = tuple(layers) if layers is not None else tuple(depth * (i + 1) // 3 - 1 for i in range(3))
        feat = len(self.layers) * dim
        self.encoder = encoder
        self.norm = nn.LayerNorm(dim)                                  # shared by all extracted blocks
        self.upsample = nn.Sequential(nn.Linear(3 + feat, upsample_dim, bias=False), PointBatchNorm(upsample_dim),
                                      nn.GELU(), nn.Linear(upsample_dim, upsample_dim, bias=False),
                                      PointBatchNorm(upsample_dim), nn.GELU())
        self.category_embed = nn.Embedding(len(CATEGORIES), label_dim)
        h1, h2 = head_dims
        in_dim = upsample_dim + label_dim + dim + 2 * feat
        self.head = nn.Sequential(nn.Linear(in_dim, h1, bias=False), PointBatchNorm(h1), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(h1, h2, bias=False), PointBatchNorm(h2), nn.GELU(), nn.Linear(h2, NUM_PARTS))

    def forward(self, points, centers, patches, category, trace: dict | None = None):
        """points (B, N, 3) normalised, centers (B, G, 3), patches (B, G, K, 3), category (B,)
        -> logits (B, N, P). `trace`, when a dict, receives the intermediates."""
        cls, hidden = self.encoder(patches, centers, return_hidden=True)     # (B, 1+G, D), L x (B, 1+G, D)
        feats = torch.cat([self.norm(hidden[i][:, 1:]) for i in self.layers], -1)  # (B, G, L*D)
        idx, w, sqdist = three_nn_weights(points, centers)                   # (B, N, 3)
        B, N, _ = idx.shape
        near = feats.gather(1, idx.view(B, N * 3, 1).expand(-1, -1, feats.shape[-1])).view(B, N, 3, -1)
        interp = (w[..., None] * near).sum(2)                                 # (B, N, L*D)
        up = self.upsample(torch.cat([points, interp], -1))                  # (B, N, U)
        glob = torch.cat([self.category_embed(category), cls[:, 0], feats.mean(1), feats.amax(1)], -1)
        x = torch.cat([up, glob[:, None].expand(-1, N, -1)], -1)             # (B, N, U + global)
        if trace is not None:
            trace.update(hidden=hidden, cls=cls[:, 0], feats=feats, idx=idx, weights=w, sqdist=sqdist,
                         interp=interp, glob=glob, upsample=[], head=[])
            h = torch.cat([points, interp], -1)
            for m in self.upsample:
                h = m(h)
                trace["upsample"].append(h)
            h = x
            for m in self.head:
                h = m(h)
                trace["head"].append(h)
        return self.head(x)


# Official segmentation state_dict -> PartSegmenter (the encoder through asymdsd.OFFICIAL_KEY_MAP).
OFFICIAL_SEG_KEY_MAP = [
    (r"layer_norm\.(weight|bias)", r"norm.\1"),
    (r"point_upsample\.mlp\.(\d)\.(.+)", r"upsample.\1.\2"),
    (r"label_embedding\.weight", "category_embed.weight"),
    (r"segmentation_head\.(\d)\.(.+)", r"head.\1.\2"),
]
DROPPED_SEG_KEYS = ("mean_iou.parts_mask",)  # the metric's category -> parts buffer; parts_mask() rebuilds it


def convert_official_seg_state_dict(official: dict) -> dict:
    """Rename an official segmentation checkpoint's `state_dict` to PartSegmenter's keys.
    Raises ValueError naming the keys no rule covers."""
    enc = {f"teacher.{k}": v for k, v in official.items() if k.startswith("point_encoder.")}
    out = {"encoder." + k[len("teacher.encoder."):]: v for k, v in asymdsd.convert_official_state_dict(enc).items()}
    unknown = []
    for key, value in official.items():
        if key.startswith("point_encoder.") or key in DROPPED_SEG_KEYS:
            continue
        for pattern, repl in OFFICIAL_SEG_KEY_MAP:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not in the official segmentation layout, e.g. {unknown[:5]}")
    return out


# ----------------------------------------------------------------------------------------------
# 4. Metric: instance and class mIoU (official ShapeNetPartMeanIoU)
# ----------------------------------------------------------------------------------------------

class PartMIoU:
    """Instance mIoU (mean over clouds) and class mIoU (mean over the 16 categories of their mean
    cloud score), as the official metric: predictions restricted to the cloud's category, per-part
    IoU over all N points, a part absent from both prediction and target counts 1. Any number of
    clouds per update (the official raises above 16). Class mIoU is NaN until every category has
    been seen, as the official's."""

    def __init__(self):
        self.mask = parts_mask()
        self.score_sum = torch.zeros(len(CATEGORIES), dtype=torch.float64)
        self.count = torch.zeros(len(CATEGORIES), dtype=torch.long)

    def cloud_scores(self, logits, target, category):
        """logits (B, N, P), target (B, N), category (B,) -> per-cloud score (B,) float32"""
        allowed = self.mask.to(logits.device)[category]                      # (B, P)
        pred = logits.masked_fill(~allowed[:, None], float("-inf")).argmax(-1)  # (B, N)
        p = F.one_hot(pred, NUM_PARTS).bool()
        t = F.one_hot(target.long().clamp(0, NUM_PARTS - 1), NUM_PARTS).bool() & (target[..., None] < NUM_PARTS)
        inter, union = (p & t).sum(1), (p | t).sum(1)                         # (B, P) int64
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones((), device=logits.device)).float()
        return (iou * allowed).sum(1) / allowed.sum(1)

    def update(self, logits, target, category):
        scores = self.cloud_scores(logits, target, category).double().cpu()
        self.score_sum.index_add_(0, category.cpu(), scores)
        self.count += torch.bincount(category.cpu(), minlength=len(CATEGORIES))
        return scores

    def compute(self) -> dict:
        """instance_miou, class_miou (NaN while a category is unseen), per-category IoU (NaN if unseen)."""
        per_cat = self.score_sum / self.count                                 # 0/0 = NaN for unseen
        n = int(self.count.sum())
        return dict(instance_miou=float(self.score_sum.sum() / n) if n else float("nan"),
                    class_miou=float(per_cat.mean()),
                    per_category={c: float(v) for c, v in zip(CATEGORIES, per_cat)},
                    unseen=[c for c, k in zip(CATEGORIES, self.count) if k == 0])
