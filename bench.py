"""Speed and memory of asymdsd.py: one training step, patchify (FPS + kNN), predictor forms.

  python bench.py step      --presets paper tiny --batch-sizes 2 4   time / memory / FLOPs of train_step
  python bench.py patchify  --batch-size 32                         FPS + kNN as N and G grow
  python bench.py predictor --rows 64                               cross vs masked-self vs full-self
  python bench.py profile   --presets tiny --batch-sizes 16         top ops by self time (torch.profiler)
  python bench.py matmuls   --batch-sizes 8 --compile off on        the step's matmuls alone vs the step
  python bench.py params                                            parameters per part, every preset
  python bench.py cache     --shapes 200                           mixture cache: shapes/s, disk per 100k
  python bench.py all --json bench_cpu.json                         everything at CPU-friendly sizes
  GPU:  python bench.py step --presets small base --batch-sizes 128 --precision bf16 --compile off on --grad-checkpoint off on
        python bench.py step --presets large --batch-sizes 64 --precision bf16 (L: the largest batch that fits)
        (several precisions / compile settings run one after another in one invocation, for ratios)
  On a CPU shared with other busy processes add --threads 1 (OpenMP regions with more threads stall
  when one of their cores is taken).

How to read the numbers:
  - Times are min / median over --repeats after --warmup steps; each step is timed alone, with
    torch.cuda.synchronize() on both sides on a GPU. On a shared CPU compare ratios from one run.
  - Peak memory: on CUDA torch.cuda.max_memory_allocated. On CPU every (preset, batch) runs in a
    fresh spawned process and we report its peak RSS (ru_maxrss) minus its RSS just before the
    model is built: model + AdamW state + activations + allocator slack (an upper bound).
  - Model FLOPs are counted analytically from the Config (matmuls and attention, 2 FLOPs per MAC;
    student passes x3 for forward + backward, the teacher x1) and cross-checked against
    torch.utils.flop_counter.FlopCounterMode on one step. Achieved FLOP/s = analytic FLOPs / median
    step time, compared with a large matmul measured in the same process before and after the steps
    (the better of the two: the practical peak; on a shared VM one measurement can be 30% low) and,
    on an H100, the 989 TFLOP/s dense bf16 datasheet peak. `matmuls` times the step's own matmuls
    alone: the most the step could reach if every other op took no time.
Dimension letters as in asymdsd.py: B batch, C global / L local crops, M masks, G patches,
K points per patch, V visible, Q masked, D width, E predictor width, P prototypes.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import asymdsd as A

H100_BF16_PEAK = 989e12  # dense (no sparsity) bf16 tensor-core FLOP/s, H100 SXM datasheet
# Dense bf16 / fp16 tensor-core datasheet peaks (FLOP/s, no sparsity), matched on the GPU's name.
BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12}


# ----------------------------------------------------------------------------------------------
# 1. Timing and memory helpers
# ----------------------------------------------------------------------------------------------

def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device) -> float:
    """Seconds for one call of fn, with the device queue drained on both sides."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def summarize(times: list) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times), "all_s": [round(t, 5) for t in times]}


def matmul_flops_per_s(device, dtype=torch.float32, n: int | None = None, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul (default 4096 on CUDA, 1536 on CPU): the practical peak of
    this device in this process."""
    n = n or (4096 if device.type == "cuda" else 1536)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    return 2 * n ** 3 / min(time_once(lambda: a @ b, device) for _ in range(repeats))


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_isolated(fn, **kwargs):
    """fn(**kwargs) in a fresh spawned process: its own peak memory, and a crash or an out-of-memory
    error there is an exception here."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(fn, **kwargs).result()


def saved_activations_mb(fn, params) -> float:
    """MiB of tensors autograd saves for backward while fn() runs, each storage once, parameters
    excluded: the activation memory of a forward, exact, and the same on any device for a given dtype."""
    seen, skip = {}, {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


# ----------------------------------------------------------------------------------------------
# 2. Parameter counts and analytic FLOPs
# ----------------------------------------------------------------------------------------------

def param_counts(model: A.AsymDSD) -> dict:
    """Student parameters by part (they sum to student_total) and the EMA teacher's total."""
    s = model.student
    n = lambda m: sum(p.numel() for p in m.parameters())
    parts = {"tokenizer": n(s["encoder"].tokenizer), "pos_mlp": n(s["encoder"].pos_embed),
             "transformer": n(s["encoder"].encoder) + s["encoder"].cls_token.numel(),
             "predictor": n(s["predictor"]), "cls_head": n(s["cls_head"]), "patch_head": n(s["patch_head"])}
    return {**parts, "encoder_total": parts["tokenizer"] + parts["pos_mlp"] + parts["transformer"],
            "student_total": n(s), "teacher_total": n(model.teacher)}


def block_macs(tq: int, tk: int, dim: int, hidden: int) -> int:
    """One pre-norm block on one sequence: q and output projections on tq tokens, k/v projections
    on tk key tokens, scores and weighted sum (tq x tk x dim each), FFN dim->hidden->dim on tq."""
    return tq * (2 * dim * dim + 2 * dim * hidden) + tk * 2 * dim * dim + 2 * tq * tk * dim


def predictor_macs(cfg: A.Config, Tc: int, Q: int) -> int:
    """One predictor row: shared D->E projection of Tc context + Q positions, the blocks (keys are the
    context, or [context ; queries] in the self-attention forms), the E->D output projection."""
    D, E = cfg.embed_dim, cfg.predictor_dim
    Tk = Tc if cfg.predictor_attention == "cross" else Tc + Q
    return D * E * (Tc + Q) + cfg.predictor_depth * block_macs(Q, Tk, E, int(E * cfg.mlp_ratio)) + Q * E * D


def tokenizer_macs(cfg: A.Config) -> int:
    """One patch through the tokenizer: every Linear per point, except the pooled half of the first
    Linear after each max-pool, which runs once per patch (asymdsd.linear_of_concat)."""
    K, D, dims = cfg.patch_size, cfg.embed_dim, cfg.tokenizer_dims
    if all(isinstance(h, int) for h in dims):    # S: 3 -> h1 -> h2 | pool | [h2 ; h2] -> h3 -> D
        h1, h2, h3 = dims
        dims = ((h1, h2), (h3,))
    stages = [[3, *dims[0]]] + [[prev[-1], *cur] for prev, cur in zip(dims, dims[1:])]
    stages[-1].append(D)                         # each stage's widths, its input first
    macs = 0
    for i, sizes in enumerate(stages):
        macs += K * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
        if i > 0:                                # the pooled half of the first Linear, once per patch
            macs += sizes[0] * sizes[1]
    return macs


def step_flops(cfg: A.Config, B: int) -> dict:
    """Model FLOPs of one cls_mask training step by part (the passes of official AsymDSD.training_step,
    asymdsd/models/asymdsd.py), 2 FLOPs per multiply-add.
    Trained student passes count x3 (forward + backward for inputs and weights), the teacher x1."""
    assert cfg.mode == "cls_mask", "the analytic count covers the AsymDSD (cls_mask) step"
    C, L, M, G, Gl, K, D = (cfg.num_global_crops, cfg.num_local_crops, cfg.num_masks, cfg.global_patches,
                            cfg.local_patches, cfg.patch_size, cfg.embed_dim)
    Q = round(cfg.mask_ratio * G)
    V, E, P = G - Q, cfg.predictor_dim, cfg.num_prototypes
    tok = tokenizer_macs(cfg)                                            # per patch
    pos = 3 * cfg.pos_hidden + cfg.pos_hidden * D                        # per centre
    head = D * cfg.head_hidden + cfg.head_hidden ** 2 + cfg.head_hidden * cfg.head_bottleneck + cfg.head_bottleneck * P
    enc = lambda T: cfg.depth * block_macs(T, T, D, int(D * cfg.mlp_ratio))      # per sequence of T tokens
    pred = predictor_macs(cfg, 1 + V, Q)                                # per row
    teacher = {"tokenizer": B * C * G * tok, "pos_mlp": B * C * G * pos,
               "transformer": B * C * enc(1 + G),                         # C full crops of 1+G tokens
               "heads": (B * C + B * C * G) * head}                       # CLS + every patch token
    student = {"tokenizer": B * (C * G + L * Gl) * tok, "pos_mlp": B * (C * G + L * Gl) * pos,
               "transformer": B * C * M * enc(1 + V) + B * enc(1 + G) + B * L * enc(1 + Gl),
               "predictor": B * C * M * pred,                             # C*M rows of Q queries
               "heads": (B * C * M * Q + B + B * C * M + B * L) * head}   # patch head on Q per row; CLS heads
    # CLS-loss einsums (teacher crops x student views), forward + grad; KoLeo's B x B similarity
    # and the small matmuls of view generation are left out (well under 1% of the step)
    loss = 2 * B * P * (C * L + C * C * M + 1)
    parts = {f"teacher_{k}": 2 * v for k, v in teacher.items()}
    parts.update({f"student_{k}": 3 * 2 * v for k, v in student.items()})
    parts["losses"] = 2 * loss
    return {"total": sum(parts.values()), **parts}


def counted_flops(fn) -> int:
    """FLOPs FlopCounterMode sees while fn() runs. Attention is forced onto the math SDPA backend,
    whose matmuls it counts (it has no formula for the fused CPU attention kernel)."""
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------
# 3. One training step
# ----------------------------------------------------------------------------------------------

def setup_step(preset: str, B: int, device, precision: str, compile: bool, source_points: int, seed: int = 0,
               grad_checkpoint: bool = False, overrides: dict | None = None):
    """Model, AdamW (as train() builds it), a random batch and a closure running one train_step."""
    cfg = dataclasses.replace(A.Config(**A.PRESETS[preset]), batch_size=B, grad_checkpoint=grad_checkpoint,
                              **(overrides or {}))
    torch.manual_seed(seed)
    model = A.AsymDSD(cfg).to(device)
    optimizer = A.build_optimizer(model, cfg)
    amp_dtype = A.autocast_dtype(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    gen = torch.Generator(device).manual_seed(seed)
    points = torch.randn(B, source_points, 3, device=device)
    sched = {"lr": cfg.lr, "ema": 0.996, "temp_cls": 0.04, "temp_patch": 0.05}   # mid-schedule values
    net = torch.compile(model) if compile else model
    # step(eager=True) bypasses torch.compile (the FLOP counter runs on the eager model)
    step = lambda eager=False: A.train_step(model if eager else net, model, optimizer, scaler, points, cfg, sched,
                                            gen, amp_dtype)
    return cfg, model, step


def step_activations_mb(cfg, model, B, device, amp_dtype, source_points) -> float:
    """Activations the student saves for backward in one step's forward (as train_step runs it):
    linear in B, so it predicts the GPU batch that fits."""
    gen = torch.Generator(device).manual_seed(1)
    with torch.no_grad():
        views = A.make_views(torch.randn(B, source_points, 3, device=device), cfg, gen)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return saved_activations_mb(lambda: model(views, 0.04, 0.05), model.parameters())


def bench_step_config(preset: str, B: int, device: str = "cpu", precision: str = "auto", compile: bool = False,
                      repeats: int = 3, warmup: int = 1, source_points: int = 16384, count: bool = False,
                      threads: int = 0, grad_checkpoint: bool = False, overrides: dict | None = None) -> dict:
    """Time, memory and FLOPs of train_step for one (preset, batch size). Runs in its own process on CPU."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cpu":
        A.keep_freed_memory()   # as train() does on a CPU
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 (official train_ssrl.sh: CUDA_MATMUL_TF32=high)
    amp = A.autocast_dtype(precision, device)
    peak = matmul_flops_per_s(device, amp or torch.float32)   # again after the steps: the best of both
    rss0 = rss_mb()
    cfg, model, step = setup_step(preset, B, device, precision, compile, source_points, grad_checkpoint=grad_checkpoint,
                                  overrides=overrides)
    warm = [time_once(step, device) for _ in range(warmup)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cpu0 = time.process_time()
    times = [time_once(step, device) for _ in range(repeats)]
    cpu_per_step = (time.process_time() - cpu0) / repeats   # robust to other processes on a shared CPU
    mem = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb() - rss0)
    acts = step_activations_mb(cfg, model, B, device, amp, source_points)
    peak = max(peak, matmul_flops_per_s(device, amp or torch.float32))
    flops = step_flops(cfg, B)
    t = summarize(times)
    out = {"preset": preset, "batch_size": B, "overrides": overrides or {}, "device": str(device), "precision": str(amp or "fp32"),
           "compile": compile, "grad_checkpoint": grad_checkpoint, "source_points": source_points, "warmup_s": [round(w, 4) for w in warm], **t,
           "cpu_s_per_step": cpu_per_step, "samples_per_s": B / t["median_s"], "peak_mem_mb": mem,
           "saved_activations_mb": acts,
           "mem_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_delta",
           "params": param_counts(model), "flops_per_step": flops["total"], "flops_per_sample": flops["total"] / B,
           "flops_by_part": flops, "achieved_flops_per_s": flops["total"] / t["median_s"],
           "matmul_peak_flops_per_s": peak, "fraction_of_matmul_peak": flops["total"] / t["median_s"] / peak}
    if device.type == "cuda" and datasheet_peak(torch.cuda.get_device_name(device)):
        out["gpu"] = torch.cuda.get_device_name(device)
        out["fraction_of_datasheet_bf16_peak"] = out["achieved_flops_per_s"] / datasheet_peak(out["gpu"])
    if count:  # one extra step under FlopCounterMode
        out["flops_counted"] = counted_flops(lambda: step(eager=True))
        out["flops_analytic_over_counted"] = flops["total"] / out["flops_counted"]
    return out


def batch_sizes(args, preset: str) -> list:
    return args.tiny_batch_sizes if preset == "tiny" and args.tiny_batch_sizes else args.batch_sizes


def run_step(args) -> list:
    """Every (preset, batch size, precision, compile setting); on CPU each in a fresh spawned process
    so its peak RSS is its own. The first of each preset also gets the FlopCounterMode cross-check."""
    results = []
    for preset in args.presets:
        for i, B in enumerate(batch_sizes(args, preset)):
            combos = [(p, c, g) for p in args.precision for c in args.compile for g in args.grad_checkpoint]
            for j, (prec, comp, gc) in enumerate(combos):
                kw = dict(preset=preset, B=B, device=args.device, precision=prec, compile=comp == "on", grad_checkpoint=gc == "on",
                          repeats=args.repeats, warmup=args.warmup, source_points=args.source_points,
                          count=i == 0 and j == 0, threads=args.threads)
                if torch.device(args.device).type == "cpu":
                    r = run_isolated(bench_step_config, **kw)
                else:
                    r = bench_step_config(**kw)
                results.append(r)
                print_step_row(r)
    return results


def print_step_row(r: dict):
    counted = (f"  counted {r['flops_counted'] / 1e9:8.1f} GF (analytic/counted {r['flops_analytic_over_counted']:.3f})"
               if "flops_counted" in r else "")
    print(f"{r['preset']:>6} B={r['batch_size']:<4} {r['precision']:>15}{' compiled' if r['compile'] else ''}{' grad-ckpt' if r.get('grad_checkpoint') else ''}  step min {r['min_s']:7.3f} s  "
          f"median {r['median_s']:7.3f} s  {r['samples_per_s']:8.2f} samples/s  mem {r['peak_mem_mb']:8.1f} MiB  "
          f"{r['flops_per_sample'] / 1e9:7.2f} GF/sample  {r['achieved_flops_per_s'] / 1e9:8.1f} GF/s = "
          f"{100 * r['fraction_of_matmul_peak']:.0f}% of matmul peak {r['matmul_peak_flops_per_s'] / 1e9:.0f} GF/s"
          + counted, flush=True)


# ----------------------------------------------------------------------------------------------
# 4. Patchify: FPS and kNN as the cloud (N) and the number of centres (G) grow
# ----------------------------------------------------------------------------------------------

def run_patchify(args) -> dict:
    """Time FPS and kNN (K = 32) per (N, G), smallest G*N first; a combination whose time, scaled
    linearly in G*N from the largest one measured, would exceed --budget-s is skipped and listed."""
    device, B, k = torch.device(args.device), args.batch_size, 32
    combos = sorted(((n, g) for n in args.points for g in args.centres), key=lambda c: c[0] * c[1])
    rows, skipped, last = [], [], None
    for N, G in combos:
        if last is not None and (last["fps_s"] + last["knn_s"]) * N * G / (last["N"] * last["G"]) > args.budget_s:
            skipped.append({"N": N, "G": G, "why": f"predicted > {args.budget_s:.0f} s"})
            continue
        gen = torch.Generator(device).manual_seed(0)
        xyz = A.normalize_unit_sphere(torch.rand(B, N, 3, device=device, generator=gen))
        fps, knn = [], []
        for _ in range(args.repeats):  # alternate the two so load changes hit both alike
            fps.append(time_once(lambda: A.farthest_point_sample(xyz, G, generator=gen), device))
            centres = xyz[:, :G]
            knn.append(time_once(lambda: A.knn_group(xyz, centres, k), device))
        last = {"N": N, "G": G, "B": B, "fps_s": min(fps), "knn_s": min(knn)}
        rows.append(last)
        print(f"patchify B={B} N={N:>6} G={G:>4}: FPS {last['fps_s'] * 1e3:9.1f} ms  kNN {last['knn_s'] * 1e3:9.1f} ms",
              flush=True)
    for s in skipped:
        print(f"patchify N={s['N']} G={s['G']} skipped: {s['why']}")
    return {"batch_size": B, "k": k, "rows": rows, "skipped": skipped, "fit": fit_growth(rows)}


def fit_growth(rows: list) -> dict:
    """Least-squares exponents of time ~ c * N^a * G^b for FPS and kNN (expect a = b = 1)."""
    if len(rows) < 3:
        return {}
    X = np.array([[1, math.log(r["N"]), math.log(r["G"])] for r in rows])
    fit = {}
    for op in ("fps", "knn"):
        coef = np.linalg.lstsq(X, np.log([r[f"{op}_s"] for r in rows]), rcond=None)[0]
        fit[op] = {"exponent_N": round(float(coef[1]), 2), "exponent_G": round(float(coef[2]), 2)}
        print(f"{op}: time ~ N^{coef[1]:.2f} * G^{coef[2]:.2f}")
    return fit


# ----------------------------------------------------------------------------------------------
# 5. Predictor forms side by side (forward + backward)
# ----------------------------------------------------------------------------------------------

def run_predictor(args) -> dict:
    """cross / masked_self / full_self at the paper's predictor shapes: R rows of 1+V = 20 context
    tokens and Q = 45 queries, D = 384 -> E = 192, 6 layers, 3 heads. Repeats interleave the forms."""
    device, cfg = torch.device(args.device), A.Config()
    Q = round(cfg.mask_ratio * cfg.global_patches)
    R, Tc = args.rows, 1 + cfg.global_patches - Q                        # context = CLS + V visible
    forms = ("cross", "masked_self", "full_self")
    torch.manual_seed(0)
    nets = {f: A.Predictor(cfg.embed_dim, cfg.predictor_dim, cfg.predictor_depth, cfg.predictor_heads,
                           cfg.mlp_ratio, f).to(device) for f in forms}
    context = torch.randn(R, Tc, cfg.embed_dim, device=device, requires_grad=True)
    query_pos = torch.randn(R, Q, cfg.embed_dim, device=device, requires_grad=True)
    amp = A.autocast_dtype(args.precision[0], device)

    def fwd(f):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return nets[f](context, query_pos).float().square().mean()
    step = {f: (lambda f=f: fwd(f).backward()) for f in forms}
    for f in forms:
        [step[f]() for _ in range(args.warmup)]
    times = {f: [] for f in forms}
    for _ in range(args.repeats):
        for f in forms:
            times[f].append(time_once(step[f], device))
    out = {"rows": R, "context": Tc, "queries": Q, "precision": str(amp or "fp32"), "forms": {}}
    for f in forms:
        analytic = 3 * 2 * R * predictor_macs(dataclasses.replace(cfg, predictor_attention=f), Tc, Q)  # fwd + bwd
        row = {**summarize(times[f]), "saved_activations_mb": saved_activations_mb(lambda: fwd(f), nets[f].parameters()),
               "flops_counted": counted_flops(step[f]), "flops_analytic": analytic}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step[f]()
            row["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out["forms"][f] = row
    ref = out["forms"]["cross"]["median_s"]
    for f, r in out["forms"].items():
        r["time_vs_cross"] = r["median_s"] / ref
        print(f"predictor {f:>11} R={R}: median {r['median_s'] * 1e3:8.1f} ms (x{r['time_vs_cross']:.2f} of cross)  "
              f"saved activations {r['saved_activations_mb']:7.1f} MiB  {r['flops_counted'] / 1e9:7.2f} GF counted")
    return out


# ----------------------------------------------------------------------------------------------
# 6. Profile of one step (top ops by self time, host syncs)
# ----------------------------------------------------------------------------------------------

SYNC_OPS = ("aten::item", "aten::nonzero", "aten::masked_select")   # copy a device value to the host


def host_reads(prof) -> list:
    """Names of the profiled ops that copy a value back to the host (on a GPU: wait for it). Reads
    inside the fused AdamW kernel are left out: on CPU it reads its step counters, which live on
    the host there; on CUDA they live on the device and the kernel does not read them back."""
    def under_fused_adamw(e):
        while e is not None and e.name != "aten::_fused_adamw_":
            e = e.cpu_parent
        return e is not None
    return [e.name for e in prof.events() if e.name in SYNC_OPS and not under_fused_adamw(e)]


def run_profile(args) -> dict:
    """torch.profiler over --repeats steps after warm-up. Ops that copy a device value to the host
    (host_reads) would show a hidden sync inside the step."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device(args.device)
    preset = "tiny" if args.what == "all" else args.presets[0]
    B = batch_sizes(args, preset)[0]
    _, _, step = setup_step(preset, B, device, args.precision[0], False, args.source_points)
    for _ in range(max(args.warmup, 1)):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.repeats):
            step()
            sync(device)
    events = prof.key_averages()
    self_us = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    total = sum(self_us(e) for e in events)
    top = sorted(events, key=self_us, reverse=True)[:15]
    rows = [{"op": e.key, "self_ms_per_step": self_us(e) / 1e3 / args.repeats, "self_pct": 100 * self_us(e) / total,
             "calls_per_step": e.count / args.repeats} for e in top]
    syncs = {k: v // args.repeats for k, v in collections.Counter(host_reads(prof)).items()}
    print(f"profile {preset} B={B}: top ops by self {device.type.upper()} time per step")
    for r in rows:
        print(f"  {r['op'][:60]:<60} {r['self_ms_per_step']:9.1f} ms  {r['self_pct']:5.1f}%  {r['calls_per_step']:6.0f} calls")
    print(f"  host-sync ops per step: {syncs or 'none'}")
    phases = phase_times(preset, B, device, args.precision[0], args.source_points, args.repeats)
    print("  phases (median ms): " + "  ".join(f"{k} {v * 1e3:.0f} ({100 * v / sum(phases.values()):.0f}%)"
                                              for k, v in phases.items()))
    return {"preset": preset, "batch_size": B, "top_ops": rows, "sync_ops_per_step": syncs, "phases_s": phases}


def phase_times(preset, B, device, precision, source_points, repeats) -> dict:
    """Median seconds of each part of a step, run as train_step runs them (synchronised after each,
    which adds syncs the real step does not have)."""
    device = torch.device(device)
    cfg, model, _ = setup_step(preset, B, device, precision, False, source_points)
    opt = torch.optim.AdamW(model.student.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    amp = A.autocast_dtype(precision, device)
    gen, points = torch.Generator(device).manual_seed(0), torch.randn(B, source_points, 3, device=device)
    parts = {k: [] for k in ("views", "teacher", "student", "loss", "backward", "clip_adamw", "ema")}
    for i in range(repeats + 1):                                  # the first round is warm-up
        t, state = [], {}
        mark = lambda: (sync(device), t.append(time.perf_counter()))
        mark()
        with torch.no_grad():
            views = A.make_views(points, cfg, gen)
        mark()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            state["teacher"] = model.forward_teacher(*views["global"], 0.04, 0.05)
            mark()
            state["student"] = model.forward_student(views)
            mark()
            loss, _ = model.forward_loss(state["student"], state["teacher"])
            mark()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark()
        torch.nn.utils.clip_grad_norm_(model.student.parameters(), cfg.grad_clip)
        opt.step()
        mark()
        model.update_teacher(0.996)
        mark()
        for k, a, b in zip(parts, t, t[1:]):
            parts[k] += [b - a] if i else []
    return {k: statistics.median(v) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------
# 7. The matmul bound: the step's own matmuls, timed alone
# ----------------------------------------------------------------------------------------------

def step_matmuls(step) -> collections.Counter:
    """(op, operand shapes) -> calls, for every mm / addmm / bmm one step runs, as torch.profiler
    records them. The products inside the fused attention kernel are not among them."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    calls = collections.Counter()
    for e in prof.events():
        if e.name in ("aten::mm", "aten::addmm", "aten::bmm"):
            a, b = [tuple(s) for s in e.input_shapes if isinstance(s, list) and len(s) >= 2][-2:]  # addmm: bias first
            calls[(e.name, a, b)] += 1
    return calls


def matmuls_alone_s(calls: collections.Counter, device, dtype=torch.float32) -> float:
    """Seconds the recorded matmuls take by themselves: each shape on random operands into a
    preallocated output, the best of two timed calls after a first, times its calls per step."""
    total = 0.0
    for (op, a, b), n in calls.items():
        x, y = torch.randn(a, device=device, dtype=dtype), torch.randn(b, device=device, dtype=dtype)
        out = torch.empty(*a[:-1], b[-1], device=device, dtype=dtype)
        f = torch.bmm if op == "aten::bmm" else torch.mm
        f(x, y, out=out)
        total += n * min(time_once(lambda: f(x, y, out=out), device) for _ in range(2))
    return total


def matmul_bound_config(preset: str, B: int, device: str = "cpu", compile_modes=("off",), rounds: int = 4,
                        source_points: int = 16384, threads: int = 0) -> dict:
    """How close the fp32 step can come to the matmul peak. One eager step's matmuls are recorded,
    then --alternations rounds each time: the 1536^3 (CUDA: 4096^3) peak, the recorded matmuls alone,
    and the step (eager and/or compiled, best of 2), then the peak again. The peak is the best seen in
    the run; times are the best round's. matmul_rate / peak is the most the step could reach if every
    other op took no time."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cpu":
        A.keep_freed_memory()
    steps = {}
    for mode in compile_modes:
        cfg, _, steps[mode] = setup_step(preset, B, device, "fp32", mode == "on", source_points)
    t0 = time.perf_counter()
    for step in steps.values():                                       # warm-up; compiles the compiled one
        for _ in range(2):
            step()
    warm = time.perf_counter() - t0
    calls = step_matmuls(lambda: step(eager=True))                    # any of the steps, run eagerly
    mm_flops = sum(2 * math.prod(a) * b[-1] * n for (_, a, b), n in calls.items())
    per_round = []
    for _ in range(rounds):
        row = {"peak": matmul_flops_per_s(device), "matmuls_alone_s": matmuls_alone_s(calls, device)}
        for mode, step in steps.items():
            row[f"step_{mode}_s"] = min(time_once(step, device) for _ in range(2))
        row["peak"] = max(row["peak"], matmul_flops_per_s(device))
        per_round.append(row)
    flops, peak = step_flops(cfg, B)["total"], max(r["peak"] for r in per_round)
    mm_s = min(r["matmuls_alone_s"] for r in per_round)
    out = {"preset": preset, "batch_size": B, "device": str(device), "threads": torch.get_num_threads(),
           "warmup_s": round(warm, 1), "rounds": per_round, "flops_per_step": flops, "matmul_calls": sum(calls.values()),
           "matmul_shapes": len(calls), "matmul_flops": mm_flops, "matmul_peak_flops_per_s": peak,
           "matmuls_alone_s": mm_s, "matmul_rate_of_peak": mm_flops / mm_s / peak,
           "step_s_for_70pct": flops / (0.7 * peak)}
    for mode in steps:
        t = min(r[f"step_{mode}_s"] for r in per_round)
        out[f"step_{mode}_s"] = t
        out[f"step_{mode}_of_peak"] = flops / t / peak
        out[f"rest_{mode}_s"] = t - mm_s                 # what the step spends outside its matmuls
    return out


def run_matmul_bound(args) -> list:
    """matmul_bound_config for every (preset, batch size), each in its own process."""
    results = []
    for preset in args.presets:
        for B in batch_sizes(args, preset):
            r = run_isolated(matmul_bound_config, preset=preset, B=B, device=args.device, compile_modes=tuple(args.compile),
                             rounds=args.alternations, source_points=args.source_points, threads=args.threads)
            results.append(r)
            print_bound_row(r)
    return results


def print_bound_row(r: dict):
    steps = "  ".join(f"step {'compiled' if m == 'on' else 'eager'} {r[f'step_{m}_s']:.3f} s = "
                      f"{100 * r[f'step_{m}_of_peak']:.0f}% (outside matmuls {r[f'rest_{m}_s']:.2f} s)"
                      for m in ("off", "on") if f"step_{m}_s" in r)
    print(f"{r['preset']:>6} B={r['batch_size']:<3} peak {r['matmul_peak_flops_per_s'] / 1e9:.0f} GF/s  "
          f"{r['matmul_calls']} matmuls ({r['matmul_shapes']} shapes, {r['matmul_flops'] / 1e9:.1f} of "
          f"{r['flops_per_step'] / 1e9:.1f} GF) alone {r['matmuls_alone_s']:.3f} s = "
          f"{100 * r['matmul_rate_of_peak']:.0f}% of peak  {steps}  70% needs {r['step_s_for_70pct']:.3f} s", flush=True)


# ----------------------------------------------------------------------------------------------
# 8. Scaling: step time and memory against batch size and points per cloud, patchify against N*G
# ----------------------------------------------------------------------------------------------

def points_overrides(n: int) -> dict:
    """Crops of n points, with the patch count scaled as the official configs scale it for larger
    inputs: G = n / 16 patches of 32 (64 for 1024 points; 512 for 8192, finetune_ModelNet40_8k.yaml),
    and the local crops a quarter of that."""
    return {"global_points": n, "global_patches": n // 16, "local_points": n // 4, "local_patches": n // 64}


def run_scaling(args) -> dict:
    """The paper preset's training step against batch size (--batch-sizes, default 8 16 32 64) and
    against points per crop (--crop-points, default 1024 2048 4096 at the first batch size), each
    setting in a fresh process; then patchify against N and G. Writes a table and --plot PNG."""
    preset = args.presets[0]
    base = A.Config(**A.PRESETS[preset])
    by_batch, by_points = [], []
    for B in args.batch_sizes:
        by_batch.append(run_isolated(bench_step_config, preset=preset, B=B, device=args.device, precision="fp32",
                                     repeats=args.repeats, warmup=args.warmup, source_points=args.source_points,
                                     threads=args.threads))
        print_step_row(by_batch[-1])
    for n in args.crop_points:
        row = next((r for r in by_batch if r["batch_size"] == args.batch_sizes[0]), None) if n == base.global_points else None
        if row is None:
            row = run_isolated(bench_step_config, preset=preset, B=args.batch_sizes[0], device=args.device,
                               precision="fp32", repeats=args.repeats, warmup=args.warmup,
                               source_points=max(args.source_points, n), threads=args.threads,
                               overrides=points_overrides(n))
        by_points.append({**row, "crop_points": n})
        print_step_row(row)
    patch = run_patchify(args)
    out = {"preset": preset, "crop_points": base.global_points, "patches": base.global_patches,
           "by_batch": by_batch, "by_points": by_points, "patchify": patch}
    print(scaling_table(out))
    if args.plot:
        plot_scaling(out, args.plot)
    return out


def scaling_table(res: dict) -> str:
    """Markdown: step time, time per sample and peak memory by batch and by crop size; patchify time
    and its time per N*G (constant where the growth is O(N*G))."""
    b0 = res["by_batch"][0]
    lines = ["| batch | points per crop | patches | step (s) | s per sample | vs linear in batch | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["by_batch"]:
        linear = b0["median_s"] * r["batch_size"] / b0["batch_size"]
        lines.append(f"| {r['batch_size']} | {res['crop_points']} | {res['patches']} | {r['median_s']:.2f} | {r['median_s'] / r['batch_size']:.3f} | "
                     f"{r['median_s'] / linear:.2f} | {r['peak_mem_mb']:.0f} |")
    p0 = res["by_points"][0]
    for r in res["by_points"][1:]:
        G = r["overrides"].get("global_patches", res["patches"])
        lines.append(f"| {r['batch_size']} | {r['crop_points']} | {G} | {r['median_s']:.2f} | "
                     f"{r['median_s'] / r['batch_size']:.3f} | {r['median_s'] / p0['median_s']:.2f}x the {p0['crop_points']}-point step | "
                     f"{r['peak_mem_mb']:.0f} |")
    rows = res["patchify"]["rows"]
    lines += ["", "| N | G | FPS (ms) | kNN (ms) | FPS per N*G (ns) | kNN per N*G (ns) |", "|---|---|---|---|---|---|"]
    for r in rows:
        ng = r["N"] * r["G"] * r["B"]
        lines.append(f"| {r['N']} | {r['G']} | {r['fps_s'] * 1e3:.1f} | {r['knn_s'] * 1e3:.1f} | "
                     f"{r['fps_s'] / ng * 1e9:.2f} | {r['knn_s'] / ng * 1e9:.2f} |")
    return "\n".join(lines)


def plot_scaling(res: dict, path: str):
    """Three panels: step time and peak memory against batch, against points per crop, and patchify
    time against N*G on log axes with an O(N*G) line through the smallest point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for a, rows, key, label in ((ax[0], res["by_batch"], "batch_size", f"batch size ({res['crop_points']}-point crops)"),
                                (ax[1], res["by_points"], "crop_points", "points per global crop (patches = points / 16)")):
        xs = [r[key] for r in rows]
        a.plot(xs, [r["median_s"] for r in rows], "o-", color="C0", label="step time")
        a.plot(xs, [rows[0]["median_s"] * x / xs[0] for x in xs], ":", color="C0", label="linear")
        a.set_xlabel(label)
        a.set_ylabel("seconds per step", color="C0")
        a.set_xscale("log", base=2)
        a.set_xticks(xs, [str(x) for x in xs])
        m = a.twinx()
        m.plot(xs, [r["peak_mem_mb"] / 1024 for r in rows], "s--", color="C1", label="peak RSS")
        m.set_ylabel("peak memory (GiB)", color="C1")
        a.legend(loc="upper left")
    rows = res["patchify"]["rows"]
    ng = [r["N"] * r["G"] for r in rows]
    for op, c in (("fps", "C2"), ("knn", "C3")):
        ax[2].loglog(ng, [r[f"{op}_s"] for r in rows], "o", color=c, label=op.upper())
        i = int(np.argmin(ng))
        ax[2].loglog(sorted(ng), [rows[i][f"{op}_s"] * x / ng[i] for x in sorted(ng)], ":", color=c)
    ax[2].set_xlabel("N x G (points x centres)")
    ax[2].set_ylabel("seconds per batch")
    ax[2].set_title("patchify; dotted: O(N G) from the smallest", fontsize=9)
    ax[2].legend()
    fig.suptitle(f"{res['preset']} preset training step on the CPU (fp32); patchify batch {res['patchify']['batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# 9. A/B: this checkout's training step against another checkout's, alternating, same weights
# ----------------------------------------------------------------------------------------------

def load_code(code_dir: str, name: str):
    """Import code_dir/asymdsd.py as module `name` (so two versions can be told apart)."""
    import importlib.util
    path = os.path.join(code_dir, "asymdsd.py")
    if not os.path.isfile(path):
        raise SystemExit(f"bench.py ab: no asymdsd.py in {code_dir!r} (give a checkout of this project, "
                         "e.g. `git worktree add ../baseline <commit>`)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def ab_run(code_dir: str, preset: str, B: int, weights: str, threads: int, repeats: int, warmup: int,
           source_points: int, seed: int = 0) -> dict:
    """One process, one version: load the shared weights, run one step from them (its loss terms and
    gradient norm are the numerics compared across versions), then time warmup + repeats more steps."""
    if threads:
        torch.set_num_threads(threads)
    code = load_code(code_dir, "asymdsd_under_test")
    getattr(code, "keep_freed_memory", lambda: None)()   # as that version's train() does on a CPU
    cfg = dataclasses.replace(code.Config(**code.PRESETS[preset]), batch_size=B)
    torch.manual_seed(seed)
    rss0 = rss_mb()
    model = code.AsymDSD(cfg)
    state = torch.load(weights, weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"bench.py ab: {code_dir} has other parameter names; missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    optimizer = code.build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(B, source_points, 3, generator=torch.Generator().manual_seed(seed))
    sched = {"lr": cfg.lr, "ema": 0.996, "temp_cls": 0.04, "temp_patch": 0.05}   # mid-schedule values
    step = lambda: code.train_step(model, model, optimizer, scaler, points, cfg, sched, gen)
    loss, logs, grad_norm = step()
    numerics = {"loss": float(loss), "grad_norm": float(grad_norm),
                **{k: float(v) for k, v in logs.items() if k.startswith("loss_")}}
    cpu = torch.device("cpu")
    for _ in range(warmup):
        step()
    times = [time_once(step, cpu) for _ in range(repeats)]
    return {"code": code_dir, "preset": preset, "batch_size": B, **summarize(times), "numerics": numerics,
            "peak_mem_mb": peak_rss_mb() - rss0}


def run_ab(args) -> list:
    """--alternations rounds of (baseline, this checkout) on the CPU, each run in a fresh spawned
    process, the order swapped every round. Reports the median over runs of each run's fastest
    step, their ratio, the largest difference of the first step's loss terms and gradient norm
    (both versions start from the same weights, batch and generator), and each version's peak RSS."""
    if not args.baseline:
        raise SystemExit("bench.py ab needs --baseline DIR: a checkout of the code to compare with")
    import tempfile
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for preset in args.presets:
        for B in args.batch_sizes:
            with tempfile.TemporaryDirectory() as tmp:
                weights = os.path.join(tmp, "weights.pt")
                torch.manual_seed(0)   # this checkout's initialisation, loaded by both versions
                torch.save(A.AsymDSD(dataclasses.replace(A.Config(**A.PRESETS[preset]), batch_size=B)).state_dict(),
                           weights)
                runs = {"baseline": [], "this": []}
                for i in range(args.alternations):
                    order = ["baseline", "this"] if i % 2 == 0 else ["this", "baseline"]
                    for who in order:
                        kw = dict(code_dir=args.baseline if who == "baseline" else here, preset=preset, B=B,
                                  weights=weights, threads=args.threads, repeats=args.repeats,
                                  warmup=args.warmup, source_points=args.source_points)
                        r = run_isolated(ab_run, **kw)
                        runs[who].append(r)
                        print(f"  {preset} B={B} round {i + 1}/{args.alternations} {who:>8}: min {r['min_s']:.3f} s",
                              flush=True)
            row = ab_summary(preset, B, runs)
            rows.append(row)
            print_ab_row(row)
    return rows


def ab_summary(preset: str, B: int, runs: dict) -> dict:
    """Median of per-run minima for each version, the speed-up, and the numerics difference."""
    med = {k: statistics.median(r["min_s"] for r in v) for k, v in runs.items()}
    first = {k: v[0]["numerics"] for k, v in runs.items()}
    keys = sorted(set(first["baseline"]) & set(first["this"]))
    diff = {k: abs(first["this"][k] - first["baseline"][k]) for k in keys}
    rel = {k: diff[k] / max(abs(first["baseline"][k]), 1e-30) for k in keys}
    return {"preset": preset, "batch_size": B, "runs": len(runs["this"]),
            "baseline_median_min_s": med["baseline"], "this_median_min_s": med["this"],
            "speedup": med["baseline"] / med["this"],
            "baseline_peak_mem_mb": max(r["peak_mem_mb"] for r in runs["baseline"]),
            "this_peak_mem_mb": max(r["peak_mem_mb"] for r in runs["this"]),
            "numerics_baseline": first["baseline"], "numerics_this": first["this"],
            "max_abs_diff": max(diff.values()), "max_rel_diff": max(rel.values()),
            "all_min_s": {k: [round(r["min_s"], 4) for r in v] for k, v in runs.items()}}


def print_ab_row(r: dict):
    print(f"{r['preset']:>6} B={r['batch_size']:<3} baseline {r['baseline_median_min_s']:7.3f} s  this "
          f"{r['this_median_min_s']:7.3f} s  speed-up {r['speedup']:.3f}x  (median of {r['runs']} run minima each)  "
          f"peak RSS {r['baseline_peak_mem_mb']:.0f} -> {r['this_peak_mem_mb']:.0f} MiB  "
          f"loss terms / grad norm differ by <= {r['max_rel_diff']:.1e} (relative)", flush=True)


# ----------------------------------------------------------------------------------------------
# 10. GPU: one prepared command for the README's GPU table
# ----------------------------------------------------------------------------------------------

def datasheet_peak(gpu_name: str):
    """Dense bf16 datasheet FLOP/s of a GPU by name (the longest matching key), or None."""
    keys = [k for k in BF16_PEAKS if k in gpu_name]
    return BF16_PEAKS[max(keys, key=len)] if keys else None


def gpu_plan(presets: list, precisions: list, compile: list, grad_checkpoint: list) -> list:
    """Every asked-for row, most wanted first, so that a budget cut drops the least wanted: the first
    preset (S) in the first precision eager and compiled, its end-to-end compiled run (the goal row),
    then its other precisions and gradient checkpointing, the other sizes eager, the eager end-to-end
    run, and last the remaining compiled and other-precision rows."""
    step = lambda preset, prec, comp, gc: {"kind": "step", "preset": preset, "precision": prec, "compile": comp,
                                           "grad_checkpoint": gc}
    e2e = lambda preset, prec, comp: {"kind": "e2e", "preset": preset, "precision": prec, "compile": comp,
                                      "grad_checkpoint": "off"}
    first, rest, p0 = presets[0], presets[1:], precisions[0]
    want = [step(first, p0, "off", "off"), step(first, p0, "on", "off"), e2e(first, p0, "on")]
    want += [step(first, p, "off", g) for p in precisions for g in ("off", "on")]
    want += [step(r, p0, "off", g) for r in rest for g in ("off", "on")]
    want += [e2e(first, p0, "off")]
    want += [step(first, p, c, g) for c in ("on",) for p in precisions for g in ("off", "on")]
    want += [step(r, p0, "on", g) for r in rest for g in ("off", "on")]
    want += [step(r, p, c, g) for r in rest for p in precisions[1:] for c in ("off", "on") for g in ("off", "on")]
    rows = []
    for row in want:
        if row["compile"] in compile and row["grad_checkpoint"] in grad_checkpoint and row not in rows:
            rows.append(row)
    return rows


def estimated_s(row: dict) -> float:
    """A generous guess of a row's wall time on one H100/H200 (a fresh process, CUDA start-up, model
    build, warm-up and timed steps), for the budget; torch.compile adds about a minute."""
    base = {"e2e": 45.0, "step": 12.0}[row["kind"]] * {"large": 4.0, "base": 2.0}.get(row["preset"], 1.0)
    return base + (60.0 if row["compile"] == "on" else 0.0)


def run_e2e(preset: str, B: int, precision: str, compile: bool, steps: int, workers: int) -> dict:
    """A short real pretraining run (asymdsd.py, DataLoader with `workers` processes, procedural
    16384-point clouds): samples/s with data loading included and the share of time the loop waited
    for batches, from the log windows after the first that hold no checkpoint write."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "asymdsd.py"),
               "--data", "shapes", "--set", "source_points=16384", "--preset", preset, "--batch-size", str(B),
               "--max-steps", str(steps), "--precision", precision, "--num-workers", str(workers),
               "--log-every", "4", "--out", out, "--device", "cuda"] + (["--compile"] if compile else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300] if (proc.stderr or proc.stdout) else "failed"}
        with open(os.path.join(out, "log.jsonl")) as f:
            recs = [json.loads(line) for line in f if '"samples_per_s"' in line]
    steps_per_epoch = 2048 // B   # the procedural set's 2048 training shapes; a checkpoint ends each epoch
    clean = [r for r in recs[1:] if r["step"] % steps_per_epoch and (r["step"] - 4) // steps_per_epoch == r["step"] // steps_per_epoch]
    clean = clean or recs[1:] or recs
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in clean),
            "data_wait_frac": statistics.median(r.get("data_wait_frac", float("nan")) for r in clean),
            "peak_mem_mb": max(r["peak_mem_mb"] for r in recs), "windows": len(clean), "command": " ".join(cmd[1:])}


def run_gpu(args) -> list:
    """Every planned row in its own process (its own peak memory; an out-of-memory row does not end
    the run), within --budget-s: rows predicted not to fit are listed as skipped. Prints JSON lines
    and, at the end, the table."""
    if not torch.cuda.is_available():
        raise SystemExit("bench.py gpu measures a CUDA GPU, and torch sees none here (torch.cuda.is_available() "
                         "is False). On a CPU use `python bench.py step` or `python bench.py ab`.")
    presets = args.presets_given or [p for p in ("small", "base", "large") if p in A.PRESETS]
    precisions = [p for p in args.precision if p != "auto"] or ["bf16", "fp16"]
    plan = gpu_plan(presets, precisions, args.compile_given or ["off", "on"], args.grad_checkpoint_given or ["off", "on"])
    B = args.batch_sizes[0]
    start, rows = time.perf_counter(), []
    gpu = torch.cuda.get_device_name()
    phases = None
    for row in plan:
        left = args.budget_s - (time.perf_counter() - start)
        if estimated_s(row) > left:
            r = {**row, "batch_size": B, "skipped": f"budget: about {estimated_s(row):.0f} s needed, {left:.0f} s left"}
        elif row["kind"] == "e2e":
            r = {**row, "batch_size": B, **run_e2e(row["preset"], B, row["precision"], row["compile"] == "on",
                                                    args.e2e_steps, args.workers)}
        else:
            kw = dict(preset=row["preset"], B=B, device="cuda", precision=row["precision"], compile=row["compile"] == "on",
                      grad_checkpoint=row["grad_checkpoint"] == "on", repeats=args.repeats, warmup=args.warmup,
                      source_points=args.source_points)
            try:
                r = {**row, **run_isolated(bench_step_config, **kw)}
            except Exception as e:  # out of memory, a compile failure: recorded, the run goes on
                r = {**row, "batch_size": B, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            if phases is None and "error" not in r:   # where the first row's step time goes
                phases = r["phases_s"] = run_isolated(phase_times, preset=row["preset"], B=B, device="cuda",
                                                      precision=row["precision"], source_points=args.source_points,
                                                      repeats=5)
        r.update(gpu=gpu, date=datetime.date.today().isoformat(), elapsed_s=round(time.perf_counter() - start, 1))
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(gpu_table(rows))
    return rows


def gpu_table(rows: list) -> str:
    """The README's GPU table (markdown), one line per row, skipped and failed rows included."""
    lines = ["| size | what | precision | compile | grad ckpt | samples/s | peak memory | FLOP/s, share of datasheet bf16 peak | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    names = {"small": "S", "base": "B", "large": "L"}
    for r in rows:
        what = "step" if r["kind"] == "step" else "with data loading"
        sps = f"{r['samples_per_s']:,.0f}" if "samples_per_s" in r else "-"
        mem = f"{r['peak_mem_mb'] / 1024:.1f} GiB" if "peak_mem_mb" in r else "-"
        frac = f"{100 * r['fraction_of_datasheet_bf16_peak']:.1f}%" if "fraction_of_datasheet_bf16_peak" in r else "-"
        note = r.get("skipped") or r.get("error") or (
            f"data wait {100 * r['data_wait_frac']:.0f}% of the time" if "data_wait_frac" in r else "")
        if "phases_s" in r:
            p = r["phases_s"]
            note = f"views (crops, FPS, kNN) {100 * p['views'] / sum(p.values()):.0f}% of the step"
        lines.append(f"| {names.get(r['preset'], r['preset'])} | {what} | {r['precision']} | {r['compile']} | "
                     f"{r['grad_checkpoint']} | {sps} | {mem} | {frac} | {note} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 11. Parameters: every preset's parts, counted as the official modules hold them
# ----------------------------------------------------------------------------------------------

def run_params(args) -> list:
    """One JSON line per preset (all presets unless --presets), then a table. The official counts of S, B
    and L (remcofl/AsymDSD, configs/ssrl/ssrl.yaml and variants/model/ssrl_model_{base,large}.yaml) are
    equal to these; test_param_counts_equal_official checks them."""
    presets = args.presets_given or [p for p in A.PRESETS if A.PRESETS[p] is not A.SMALL or p == "small"]
    rows = [{"preset": p, **A.parameter_counts(A.Config(**A.preset_settings(p)))} for p in presets]
    for r in rows:
        print(json.dumps(r))
    keys = ["encoder", "tokenizer", "predictor", "cls_head", "patch_head"]
    print(f"{'preset':>7} " + " ".join(f"{k:>12}" for k in keys) + "   (tokenizer = tokenizer + position MLP)")
    for r in rows:
        print(f"{r['preset']:>7} " + " ".join(f"{r[k]:>12,}" for k in keys))
    return rows


# ----------------------------------------------------------------------------------------------
# 12. CLI
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=["step", "ab", "matmuls", "gpu", "scaling", "patchify", "predictor", "profile", "params", "cache", "all"])
    p.add_argument("--shapes", type=int, default=200, help="cache: synthetic meshes to cache (not part of 'all')")
    p.add_argument("--cache-source", choices=["meshes", "objaverse"], default="meshes",
                   help="cache: OBJ files read as 'meshes', or GLB files read as 'objaverse' (its official point rule)")
    p.add_argument("--presets", nargs="+", default=None, choices=sorted(A.PRESETS), help="default: paper tiny")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help="default: 128 on CUDA, 2 4 on CPU (tiny: see --tiny-batch-sizes)")
    p.add_argument("--tiny-batch-sizes", nargs="+", type=int, default=None, help="batch sizes for the tiny preset "
                   "when they should differ from --batch-sizes (default on CPU with no --batch-sizes: 16 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU. step runs every value given, "
                   "one after another; predictor and profile use the first")
    p.add_argument("--compile", nargs="*", choices=["off", "on"], default=None,
                   help="torch.compile the model (the first warm-up step compiles): --compile alone is 'on'; "
                   "'--compile off on' runs both, one after another (step only)")
    p.add_argument("--grad-checkpoint", nargs="*", choices=["off", "on"], default=None,
                   help="step: recompute the student's blocks in backward: alone 'on'; '--grad-checkpoint off on' "
                   "runs both, for the memory and time they trade")
    p.add_argument("--source-points", type=int, default=16384, help="points per input cloud (ShapeNet: 16384)")
    p.add_argument("--batch-size", type=int, default=None, help="patchify: clouds per batch (CPU 32, CUDA 128)")
    p.add_argument("--points", nargs="+", type=int, default=[1024, 2048, 8192, 16384], help="patchify: N")
    p.add_argument("--centres", nargs="+", type=int, default=[64, 128, 512], help="patchify: G")
    p.add_argument("--budget-s", type=float, default=None, help="patchify: skip combos predicted slower than this "
                   "(default 20); gpu: the wall-clock budget, rows predicted not to fit are listed as skipped (default 450)")
    p.add_argument("--rows", type=int, default=None, help="predictor: R = B*C*M rows (paper 1024; CPU default 64)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default). On a CPU shared "
                   "with busy processes use 1: OpenMP regions with 2 threads stall when a core is taken")
    p.add_argument("--baseline", default=None, help="ab: a checkout of the code to compare this one with")
    p.add_argument("--alternations", type=int, default=5, help="ab: rounds of (baseline, this), order swapped each round; matmuls: rounds of (peak, matmuls alone, step)")
    p.add_argument("--crop-points", nargs="+", type=int, default=[1024, 2048, 4096],
                   help="scaling: points per global crop (patches scaled to points / 16)")
    p.add_argument("--plot", default=None, help="scaling: write the PNG plot here")
    p.add_argument("--e2e-steps", type=int, default=48, help="gpu: steps of the end-to-end (data loading) runs")
    p.add_argument("--workers", type=int, default=8, help="gpu: DataLoader workers of the end-to-end runs")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.device = str(A.resolve_device(args.device))
    cpu = args.device == "cpu"
    args.presets_given = args.presets
    if args.what == "scaling":
        args.presets = args.presets or ["paper"]
        args.batch_sizes = args.batch_sizes or [8, 16, 32, 64]
    if args.what == "matmuls":
        args.presets = args.presets or ["paper"]
        args.batch_sizes = args.batch_sizes or [8]
    args.budget_s = args.budget_s if args.budget_s is not None else (450.0 if args.what == "gpu" else 20.0)
    args.compile_given, args.grad_checkpoint_given = args.compile, args.grad_checkpoint
    args.presets = args.presets or ["paper", "tiny"]
    args.compile = ["off"] if args.compile is None else (args.compile or ["on"])
    args.grad_checkpoint = ["off"] if args.grad_checkpoint is None else (args.grad_checkpoint or ["on"])
    if args.batch_sizes is None:
        args.batch_sizes = [2, 4] if cpu else [128]
        if cpu and args.tiny_batch_sizes is None:
            args.tiny_batch_sizes = [16, 32]
    args.batch_size = args.batch_size or (32 if cpu else 128)
    args.rows = args.rows or (64 if cpu else 1024)
    return args


def run_cache(args):
    """Mixture cache building (data.py, section 10): --shapes synthetic meshes (icospheres of 1280
    faces, random aspect; OBJ, or GLB for --cache-source objaverse) written to a temporary folder,
    then cached as source --cache-source at --source-points points each
    by the streamed mesh path (trimesh load, area-weighted sampling, memmap rows) in this process.
    Reports shapes/s and the cache's bytes, and its size per 100k shapes."""
    import tempfile
    import trimesh
    import data
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, args.cache_source)
        os.makedirs(root)
        ext = "glb" if args.cache_source == "objaverse" else "obj"
        for i in range(args.shapes):
            mesh = trimesh.creation.icosphere(subdivisions=3)
            mesh.vertices *= rng.uniform(0.5, 1.5, 3)
            with open(os.path.join(root, f"shape_{i:06d}.{ext}"), "wb") as fh:
                fh.write(mesh.export(file_type=ext).encode() if ext == "obj" else mesh.export(file_type=ext))
        t0 = time.perf_counter()
        ds = data.build_dataset(args.cache_source, root, num_points=args.source_points)
        seconds = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root + "_cache") for f in fs)
    out = {"source": args.cache_source, "shapes": len(ds), "points": args.source_points, "seconds": round(seconds, 2),
           "shapes_per_s": round(len(ds) / seconds, 1), "cache_bytes": size,
           "gb_per_100k_shapes": round(size / len(ds) * 100_000 / 1e9, 2)}
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(["python", "bench.py"] + (sys.argv[1:] if argv is None else list(argv)))
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
            "device": args.device, "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                                                   else platform.processor() or platform.machine()),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    results = {"meta": meta}
    if args.what == "params":  # counts only: no timing, nothing to add to "all"
        results["params"] = run_params(args)
        return results
    jobs = {"step": run_step, "ab": run_ab, "matmuls": run_matmul_bound, "gpu": run_gpu, "scaling": run_scaling, "patchify": run_patchify, "predictor": run_predictor, "profile": run_profile}
    if args.what == "cache":
        jobs["cache"] = run_cache
    for name in ([j for j in jobs if j not in ("ab", "matmuls", "gpu", "scaling")] if args.what == "all" else [args.what]):
        results[name] = jobs[name](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
