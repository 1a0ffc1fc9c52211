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
from tqdm import tqdm

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
    """BatchNorm1d over batch x points of a (B, N, D) tensor (official TransposeBatchNorm1d). The same
    statistics and affine map; official feeds BatchNorm1d the (B, D, N) transpose, here the (B*N, D)
    rows, several times faster on CPU (RESULTS.md §11), rounding differently by at most 1 ulp."""

    def forward(self, x):                                              # (B, N, D) -> (B, N, D)
        # NOTE: (departure 27) official normalises the (B, D, N) transpose; the (B*N, D) rows give the same
        # statistics within 1 ulp and run several times faster on a CPU.
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
        # NOTE: (departure 16) official accumulates the per-category counts with a scatter_add_ whose
        # source has 16 elements, so an update of more than 16 clouds raises; bincount counts any number
        # (the same values for 16 or fewer).
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


# ----------------------------------------------------------------------------------------------
# 5. Fine-tuning (configs/semseg/semseg_optim.yaml, semseg_model.yaml, ShapeNetPart-S.yaml)
# ----------------------------------------------------------------------------------------------

# AdamW, one group, weight decay 0.05 on every parameter; warm-up 1e-7 -> 2e-4 over 10 epochs, cosine
# to 1e-7 at 300 epochs, per step; batch 16, drop_last; drop path 0..0.2; no label smoothing;
# training augmentation: anisotropic scale U(0.8, 1.25) per axis on the raw points; 128 patches x 32.
RECIPE = dict(epochs=300, warmup_epochs=10, lr=2e-4, warmup_start=1e-7, final_lr=1e-7, weight_decay=0.05,
              batch_size=16, drop_path=0.2, scale=(0.8, 1.25), num_patches=128, patch_size=32)


def prepare(points, num_points, num_patches: int, patch_size: int, generator: torch.Generator | None = None,
            scale: tuple | None = None):
    """Raw padded clouds -> the model's inputs. With `scale`: the training augmentation (one factor per
    axis per cloud) and random FPS starts from `generator`; without: FPS from the middle real point.
    points (B, N, 3), num_points (B,) -> points (B, N, 3) normalised, centers (B, G, 3), patches (B, G, K, 3)"""
    if scale is not None:
        s = torch.empty(points.shape[0], 1, 3, device=points.device).uniform_(*scale, generator=generator)
        points = points * s
        start = (torch.rand(points.shape[0], generator=generator, device=points.device) * num_points).long()
    else:
        # NOTE: (departure 15) official re-draws the validation FPS start every pass
        # (deterministic_val_data false); a fixed start makes a reported mIoU reproducible.
        start = num_points // 2
    x = normalize_with_padding(points, num_points)
    centers, patches = patchify_real(x, num_points, num_patches, patch_size, start_idx=start)
    return x, centers, patches


@torch.no_grad()
def evaluate_miou(model: PartSegmenter, dataset, num_patches: int = 128, patch_size: int = 32, batch_size: int = 32,
                  device="cpu", desc: str = "evaluate") -> dict:
    """Instance / class mIoU, per-category IoU and point accuracy (unrestricted argmax, padding
    included, as the official top1_acc) of `dataset`, without augmentation or voting."""
    device = torch.device(device)
    model.eval().to(device)
    metric, correct, total = PartMIoU(), 0, 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    for points, parts, n, category in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        points, parts, n, category = points.to(device), parts.to(device), n.to(device), category.to(device)
        logits = model(*prepare(points, n, num_patches, patch_size), category).float()
        metric.update(logits.cpu(), parts.cpu(), category.cpu())
        correct += int((logits.argmax(-1) == parts).sum())
        total += parts.numel()
    return dict(metric.compute(), point_acc=correct / total)


def finetune(model: PartSegmenter, train_set, val_set=None, epochs: int = RECIPE["epochs"],
             batch_size: int = RECIPE["batch_size"], device="cpu", seed: int = 0, num_patches: int = 128,
             patch_size: int = 32, desc: str = "partseg", lr: float = RECIPE["lr"]) -> tuple[list[dict], dict | None]:
    """Train with RECIPE (the warm-up scales with `epochs` / 300; `lr` replaces its peak learning rate). After each epoch the `val` split,
    if given, is scored; its best-instance-mIoU weights are kept.
    Returns (per-epoch history, state_dict of the best epoch on val or None)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model.to(device)
    gen = torch.Generator(device).manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True,
                                         drop_last=len(train_set) >= batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    steps = epochs * len(loader)
    warmup = round(RECIPE["warmup_epochs"] * epochs / RECIPE["epochs"]) * len(loader)
    lrs = asymdsd.cosine_schedule(lr, RECIPE["final_lr"], steps, warmup, RECIPE["warmup_start"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(lrs[0]), weight_decay=RECIPE["weight_decay"])
    amp = asymdsd.autocast_dtype("auto", device)   # official 16-mixed on a GPU; fp32 on CPU
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    history, best, step = [], None, 0
    bar = tqdm(range(epochs), desc=desc, dynamic_ncols=True)
    for epoch in bar:
        model.train()
        losses = []
        for points, parts, n, category in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True):
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[step])
            points, parts, n, category = points.to(device), parts.to(device), n.to(device), category.to(device)
            with torch.no_grad():
                inputs = prepare(points, n, num_patches, patch_size, gen, RECIPE["scale"])
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(*inputs, category).float()
            # every point, padding included (target 0), as the official loss
            loss = F.cross_entropy(logits.transpose(1, 2), parts)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.detach())
            step += 1
        record = dict(epoch=epoch + 1, lr=float(lrs[step - 1]), train_loss=torch.stack(losses).mean().item())
        if val_set is not None:
            record["val"] = {k: v for k, v in evaluate_miou(model, val_set, num_patches, patch_size, 2 * batch_size,
                                                            device, "val").items() if k != "per_category"}
            if best is None or record["val"]["instance_miou"] > best[0]:
                best = (record["val"]["instance_miou"],
                        {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_miou=f"{record['val']['instance_miou']:.4f}")
        history.append(record)
    return history, (best[1] if best else None)


# ----------------------------------------------------------------------------------------------
# 6. The trained model on file, and on a cloud of one's own
# ----------------------------------------------------------------------------------------------

def save_model(model: PartSegmenter, encoder_sizes: dict, path: str, extra: dict | None = None):
    """{"encoder": PointEncoder kwargs, "segmenter": PartSegmenter kwargs, "state_dict", ...}."""
    up = model.upsample[0].out_features
    seg = dict(layers=list(model.layers), upsample_dim=up, label_dim=model.category_embed.embedding_dim,
               head_dims=[model.head[0].out_features, model.head[4].out_features])
    torch.save(dict(kind="asymdsd-partseg", encoder=dict(encoder_sizes), segmenter=seg,
                    state_dict=model.state_dict(), **(extra or {})), path)


def load_model(path: str, num_heads: int | None = None) -> PartSegmenter:
    """A model written by save_model, or an official segmentation checkpoint (Lightning `state_dict`
    layout), in eval mode. Ends with one line for a foreign file."""
    import os
    if not os.path.isfile(path):
        raise SystemExit(f"no segmentation model at {path}")
    try:
        ckpt = asymdsd.load_allowlisted(path)   # no arbitrary code from a downloaded file
    except Exception as e:
        raise SystemExit(f"{path} is not a torch file ({type(e).__name__}: {e})") from None
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    if isinstance(ckpt, dict) and "segmentation_head.0.weight" in state:   # an official segmentation checkpoint
        try:
            return official_model(state, num_heads).eval()
        except ValueError as e:
            raise SystemExit(f"{path}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "asymdsd-partseg":
        raise SystemExit(f"{path} is not a part-segmentation model written by `evaluate.py partseg` (no kind "
                         "'asymdsd-partseg') nor an official segmentation checkpoint")
    model = PartSegmenter(asymdsd.PointEncoder(**ckpt["encoder"]), **ckpt["segmenter"])
    asymdsd.load_checked(model, ckpt["state_dict"], path)
    return model.eval()


def official_model(state: dict, num_heads: int | None = None, layers: tuple | None = None) -> PartSegmenter:
    """A PartSegmenter holding an official segmentation `state_dict`, its sizes read from the tensor
    shapes (heads: evaluate.HEADS_BY_WIDTH unless given; blocks: the last of each third unless given)."""
    import evaluate
    sizes = evaluate.infer_official_sizes({f"teacher.{k}": v for k, v in state.items()}, "teacher", num_heads)
    model = PartSegmenter(asymdsd.PointEncoder(**sizes), layers, upsample_dim=state["point_upsample.mlp.0.weight"].shape[0],
                          label_dim=state["label_embedding.weight"].shape[1],
                          head_dims=(state["segmentation_head.0.weight"].shape[0], state["segmentation_head.4.weight"].shape[0]))
    asymdsd.load_checked(model, convert_official_seg_state_dict(state), "the official segmentation checkpoint")
    return model


def read_cloud(path: str) -> torch.Tensor:
    """xyz of a .npy or a whitespace text file (extra columns, e.g. normals and labels, ignored) -> (n, 3)."""
    import numpy as np
    import data
    try:
        if path.endswith(".npy"):
            pts = np.load(path)
        else:
            pts = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read a point cloud ({e})") from None
    if pts.ndim != 2 or pts.shape[1] < 3 or len(pts) == 0 or not np.isfinite(pts[:, :3]).all():
        raise SystemExit(f"{path}: expected an (n, 3+) table of finite numbers, got shape {pts.shape}")
    return torch.as_tensor(np.ascontiguousarray(pts[:, :3]), dtype=torch.float32)


@torch.no_grad()
def predict(model: PartSegmenter, xyz: torch.Tensor, category: int, num_points: int = 2048, seed: int = 0,
            num_patches: int = 128, patch_size: int = 32) -> torch.Tensor:
    """Part id (global, within the category) of every point of one cloud xyz (n, 3), already z-up.
    A cloud larger than `num_points` is labelled in chunks of num_points (each its own pass), so every
    point gets a label; a smaller one is zero-padded as in training."""
    n = len(xyz)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    labels = torch.empty(n, dtype=torch.long)
    allowed = parts_mask()[category]
    for chunk in order.split(num_points):
        if len(chunk) < min(num_points, n):     # top up the last chunk with points seen before
            chunk = torch.cat([chunk, order[: min(num_points, n) - len(chunk)]])
        pts = torch.zeros(1, num_points, 3)
        pts[0, : len(chunk)] = xyz[chunk]
        count = torch.tensor([len(chunk)])
        patches_here = min(num_patches, len(chunk))
        logits = model(*prepare(pts, count, patches_here, min(patch_size, len(chunk))), torch.tensor([category]))
        pred = logits[0, : len(chunk)].masked_fill(~allowed, float("-inf")).argmax(-1)
        labels[chunk] = pred
    return labels


def plot_parts(xyz: torch.Tensor, labels: torch.Tensor, path: str, title: str = ""):
    """A PNG of the cloud coloured by part (matplotlib, headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(projection="3d")
    ax.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], c=labels.numpy() % 20, cmap="tab20", vmin=0, vmax=19, s=2)
    ax.set_title(title)
    ax.set_axis_off()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# 7. Command line: `evaluate.py partseg CKPT` (train + test) and `segment.py apply MODEL CLOUD`
# ----------------------------------------------------------------------------------------------

def load_parts(args, split: str):
    """One ShapeNetPart split through data.py; missing or bad data ends with data.py's message."""
    import data
    try:
        return data.build_shapenetpart(args.data_root, split, args.num_points or 2048, args.skip_bad, args.seed,
                                       args.cache_dir)
    except (FileNotFoundError, ValueError) as e:   # DataFileError is a ValueError
        raise SystemExit(f"error: {e}") from None


def run_partseg(args):
    """Fine-tune on `train`, score `test` with the last epoch's weights and, labelled, with the best
    epoch on `val`; --runs seeds; a table, a JSON record and the trained models in --out."""
    import os
    import numpy as np
    import evaluate
    _, info, source = evaluate.build_encoder(args)
    patches, k = args.patches or RECIPE["num_patches"], args.patch_size or RECIPE["patch_size"]
    epochs = args.epochs or RECIPE["epochs"]
    # NOTE: (departure 14) official validates every epoch on the `test` split (val_dataloader asks for
    # 'validation', the data has 'val') and keeps the best point accuracy there; we train on `train`,
    # select on `val` only, and report `test` for the last epoch (and, labelled, the best-on-val epoch).
    train, val, test = load_parts(args, "train"), load_parts(args, "val"), load_parts(args, "test")
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for seed in range(args.runs):
        encoder = evaluate.add_drop_path(evaluate.build_encoder(args)[0], args.drop_path)
        torch.manual_seed(seed)
        model = PartSegmenter(encoder)
        history, best_state = finetune(model, train, val, epochs, args.batch_size, args.device, seed, patches, k,
                                       desc=f"partseg seed {seed}")
        last = evaluate_miou(model, test, patches, k, 2 * args.batch_size, args.device, "test")
        path = os.path.join(args.out, f"partseg_seed{seed}.pt")
        save_model(model, info["sizes"], path, dict(source=source, epochs=epochs, test=last))
        run = dict(seed=seed, last=last, model=path, history=history)
        if best_state is not None:
            model.load_state_dict(best_state)
            run["best_on_val"] = evaluate_miou(model, test, patches, k, 2 * args.batch_size, args.device, "test")
        runs.append(run)
    pct = lambda v: "NaN (a category has no test shape)" if np.isnan(v) else f"{100 * v:.2f}"
    inst, cls = [r["last"]["instance_miou"] for r in runs], [r["last"]["class_miou"] for r in runs]
    metrics = dict(instance_miou_mean=float(np.mean(inst)), instance_miou_std=float(np.std(inst)),
                   class_miou_mean=float(np.mean(cls)), class_miou_std=float(np.std(cls)), runs=runs)
    settings = dict(dataset="shapenetpart", epochs=epochs, runs=args.runs, points=args.num_points or 2048,
                    patches=patches, patch_size=k, encoder=info["kind"], sizes=info["sizes"],
                    drop_path=args.drop_path, batch_size=args.batch_size, reported="last epoch")
    rows = []
    for r in runs:
        rows.append((f"seed {r['seed']} last epoch", f"instance {pct(r['last']['instance_miou'])}   "
                                                     f"class {pct(r['last']['class_miou'])}"))
        if "best_on_val" in r:
            rows.append((f"seed {r['seed']} best on val", f"instance {pct(r['best_on_val']['instance_miou'])}   "
                                                          f"class {pct(r['best_on_val']['class_miou'])}"))
    for c in CATEGORIES:
        per_cat = [r["last"]["per_category"][c] for r in runs]
        rows.append((f"  {c}", "no test shape" if np.isnan(per_cat[0]) else " ".join(f"{100 * v:.2f}" for v in per_cat)))
    rows += [("instance mIoU (last)", evaluate.mean_std(inst)), ("class mIoU (last)", evaluate.mean_std(cls))]
    unseen = runs[0]["last"]["unseen"]
    if unseen:
        rows.append(("note", f"class mIoU is NaN, as the official's: no test shape of {', '.join(unseen)}"))
    evaluate.report(args, "partseg", source, settings, metrics, rows)


def cmd_apply(args):
    model = load_model(args.model, args.num_heads)
    if args.category not in CATEGORIES:
        raise SystemExit(f"unknown category {args.category!r}; choose from {CATEGORIES}")
    xyz = read_cloud(args.cloud)
    if args.y_up:   # the ShapeNetPart files are y-up; the model sees z-up (official permutation [2, 0, 1])
        xyz = xyz[:, [2, 0, 1]]
    labels = predict(model, xyz, CATEGORIES.index(args.category), args.num_points, args.seed)
    out = args.out or args.cloud.rsplit(".", 1)[0] + ".parts.txt"
    import numpy as np
    np.savetxt(out, labels.numpy(), fmt="%d")
    print(f"{len(labels)} part labels (global ids, {args.category}: "
          f"{parts_mask()[CATEGORIES.index(args.category)].nonzero().flatten().tolist()}) written to {out}")
    if args.png:
        plot_parts(xyz, labels, args.png, f"{args.category}: predicted parts")
        print(f"picture written to {args.png}")


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Apply a part-segmentation model trained by `evaluate.py partseg`.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("apply", help="label the points of one cloud (.txt with x y z [...] per line, or .npy)")
    s.add_argument("model", help="a partseg_seed*.pt written by `evaluate.py partseg`, or an official segmentation .ckpt")
    s.add_argument("--num-heads", type=int, help="heads of an official checkpoint (not stored; default by width)")
    s.add_argument("cloud")
    s.add_argument("--category", required=True, help=f"the object's category, one of {', '.join(CATEGORIES)}")
    s.add_argument("--out", help="labels file, one part id per point (default: CLOUD.parts.txt)")
    s.add_argument("--png", help="also write a picture of the cloud coloured by part")
    s.add_argument("--y-up", action="store_true", help="the cloud is y-up, like the ShapeNetPart files")
    s.add_argument("--num-points", type=int, default=2048, help="points per pass (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_apply)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
