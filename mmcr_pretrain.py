"""MMCR pretraining of a CIFAR ResNet18: Maximum Manifold Capacity Representations.

Yerxa, Kuang, Simoncelli, Chung, NeurIPS 2023, https://arxiv.org/abs/2303.03307
Every image gets V augmented views; the loss is minus the nuclear norm of the matrix of the per-image view
centroids. The whole dataset lives on the device as uint8 and every view is augmented there in one batch, so the
GPU, not PIL on CPU workers, sets the speed.

    python mmcr_pretrain.py                                   # CIFAR-10, the reference's recipe, 500 epochs
    python mmcr_pretrain.py --dataset path/to/imagefolder     # train/<class>/* and test/<class>/*
    python mmcr_pretrain.py --max-epochs 50 --eval-every 5 --output-dir runs/mmcr/c10
    python mmcr_pretrain.py --resume auto --output-dir runs/mmcr/c10    # continue it after a stop or a crash
    torchrun --nproc_per_node 4 mmcr_pretrain.py              # same script, 4 GPUs (--batch-size is global)
    python mmcr_finetune.py --checkpoint runs/mmcr/c10/best.pt
A one-minute try on a CPU (CIFAR-10 as an ImageFolder, or any other; 41 s, kNN 31.6 on 2 cores): 2,048 images
    python mmcr_pretrain.py --dataset path/to/cifar10 --limit-train 2048 --limit-test 500 --batch-size 64 \\
        --num-views 4 --width 32 --max-epochs 1 --output-dir runs/try/mmcr

Where to edit (a copy of this file is a complete program):
    the loss          mmcr_loss() in "loss", called in main() on z of shape (images, views, dim)
    an augmentation   the op as a function in "augmentation", one line in augment_views(), its parameters in AUGMENT
    the backbone      ResNet18 in "model", built in MMCRModel as ResNet18(width); another class Net(width) with a
                      feature_dim fine-tunes too (mmcr_finetune.py --model-from this file)
    the recipe        Config below: every field is a flag
    the loop          main(): data -> views -> model -> loss -> backward -> step, log steps, the epoch's end
Below the "plumbing" line (errors, DDP, the run folder, checkpoint files, log steps) nothing needs reading.

Outputs in --output-dir: config.json, metrics.jsonl, views.png, last.pt (resumable), best.pt (best kNN top-1).
Exit codes: 0 done, 2 bad input or an unwritable file, 3 training diverged, 128 + signal after Ctrl-C / SIGTERM.
"""
import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.models.resnet import BasicBlock
from tqdm import tqdm

from knn import features, knn_accuracy

# the kind of checkpoint this script writes (a renamed copy keeps it, so mmcr_finetune.py reads its checkpoints too)
SCRIPT, RUNS = "mmcr_pretrain", "runs/mmcr"

# ----------------------------------------------------------------------------- config


def arg(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Config:
    # the method: edit these
    dataset: str = arg("cifar10", "cifar10, cifar100, or an ImageFolder root with train/<class>/* and test/<class>/*")
    batch_size: int = arg(64, "images per step over all GPUs (x num-views views)")
    num_views: int = arg(16, "augmented views per image")
    max_epochs: int = arg(500, "epochs of training")
    learning_rate: float = arg(1e-3, "Adam peak learning rate")
    weight_decay: float = arg(1e-6, "Adam (L2) weight decay")
    warmup_duration: float = arg(0.1, "fraction of all steps spent in linear warm-up before the cosine decay")
    width: int = arg(64, "channels of the ResNet18's first stage (64: the standard ResNet18, 512-d features)")
    projection_dim: int = arg(128, "output dimension of the projector")
    lmbda: float = arg(0.0, "weight of the mean per-image nuclear norm (0 in the paper's CIFAR runs)")
    grayscale_prob: float = arg(0.1, "probability of a grey view (the reference's RandomGrayscale(); the paper: 0.2)")
    solarize_threshold: int = arg(1, "solarize inverts pixels >= this many levels of 255: 1 is what the reference's "
                                  "RandomSolarize(0.5) does to uint8 images (a colour negative); 128: the textbook one")
    num_neighbours: int = arg(200, "k of the weighted kNN monitor")
    temperature: float = arg(0.5, "temperature of the weighted kNN monitor")
    eval_every: int = arg(1, "kNN evaluation every this many epochs (0: only after the last, always done)")
    image_size: int = arg(32, "side of the square training images")
    normalize: str = arg("auto", "auto: CIFAR's mean and std for cifar10 / cifar100, an ImageFolder's own otherwise; "
                         "cifar10 or cifar100: those constants for any dataset; dataset: the training set's own")
    # the run: where, how, how often
    data_dir: str = arg("./data", "where CIFAR is downloaded and decoded ImageFolders are cached")
    output_dir: str = arg("", f"the run's folder (default: {RUNS}/<date-time>); one that holds a run needs --resume")
    resume: str = arg("", "a checkpoint to go on from, or auto: <output-dir>/last.pt if any (default: a new run)")
    limit_train: int = arg(0, "use a random subset of this many training images (0 = all)")
    limit_test: int = arg(0, "use a random subset of this many test images (0 = all)")
    device: str = arg("auto", "auto, cuda or cpu")
    precision: str = arg("auto", "auto (bf16 if supported, else fp16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    compile: bool = arg(False, "torch.compile the model and the augmentation")
    log_every: int = arg(50, "most steps between log steps, the loop's only host syncs (they also come every 2 s)")
    checkpoint_minutes: float = arg(30.0, "also save last.pt at a log step this long after the last save (0: never)")
    seed: int = arg(42, "random seed, 0 to 2^32 - 1")


def check_config(cfg):
    """The first impossible flag value is a UserError; returns cfg with absolute paths (so that a resume or
    mmcr_finetune.py finds them from any directory)."""
    for bad, message in [
            # first what every script checks: a NaN would pass every comparison unnoticed
            *[(isinstance(v, float) and not math.isfinite(v), f"--{k.replace('_', '-')} must be a finite number")
              for k, v in dataclasses.asdict(cfg).items()],
            (cfg.resume == "auto" and not cfg.output_dir, "--resume auto needs --output-dir, the folder of the run"),
            (cfg.log_every < 1 or cfg.checkpoint_minutes < 0, "--log-every must be >= 1, --checkpoint-minutes >= 0"),
            (not 0 <= cfg.seed < 2 ** 32, "--seed must be in 0 .. 2^32 - 1"),
            (cfg.device not in ("auto", "cuda", "cpu") or cfg.precision not in ("auto", "bf16", "fp16", "fp32") or
             cfg.device == "cuda" and not torch.cuda.is_available(), "--device must be auto, cpu or cuda (with a GPU), "
             "--precision auto, bf16, fp16 or fp32"),
            (cfg.num_views < 2, "--num-views must be at least 2 (MMCR averages views)"),
            (cfg.batch_size < 1 or cfg.max_epochs < 1, "--batch-size and --max-epochs must be positive"),
            (cfg.learning_rate <= 0 or cfg.weight_decay < 0 or not 0 <= cfg.warmup_duration < 1,
             "--learning-rate must be positive, --weight-decay >= 0, --warmup-duration in [0, 1)"),
            (cfg.width < 1 or cfg.projection_dim < 1, "--width and --projection-dim must be positive"),
            (not 0 <= cfg.grayscale_prob <= 1 or not 0 <= cfg.solarize_threshold <= 256,
             "--grayscale-prob must be in [0, 1], --solarize-threshold in 0..256 (levels of 255)"),
            (cfg.num_neighbours < 1 or cfg.temperature <= 0, "--num-neighbours and --temperature must be positive"),
            (cfg.eval_every < 0 or cfg.image_size < 8, "--eval-every must be >= 0, --image-size at least 8"),
            (cfg.normalize not in ("auto", "cifar10", "cifar100", "dataset"), "--normalize must be auto, cifar10, ..."),
            (cfg.limit_train < 0 or cfg.limit_test < 0, "--limit-train and --limit-test must be >= 0")]:
        if bad:
            raise UserError(message)
    dataset = cfg.dataset if cfg.dataset in ("cifar10", "cifar100") else os.path.abspath(cfg.dataset)
    return dataclasses.replace(cfg, dataset=dataset, data_dir=os.path.abspath(cfg.data_dir))


# Flags that a resume may change: they do not change what the run computes. Every other flag comes from the checkpoint.
RESUME_MAY_CHANGE = {"max_epochs", "eval_every", "log_every", "checkpoint_minutes", "device", "precision", "compile",
                     "data_dir", "output_dir", "resume"}


# ----------------------------------------------------------------------------- data


def load_dataset(cfg, ctx):
    """--dataset on the device: CIFAR (downloaded) or an ImageFolder (decoded, cached), cut to --limit-train/test, as
    train_x, test_x (uint8 images N x 3 x S x S), train_y, test_y (int64 labels) and the class names."""
    # under DDP rank 0 comes first: it downloads or decodes into the cache, which the other ranks then read
    if ctx.ddp and not ctx.master:
        dist.barrier()
    if cfg.dataset in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
        try:
            sets = [cls(cfg.data_dir, train=train, download=True) for train in (True, False)]
        except Exception as e:
            raise UserError(f"could not load or download {cfg.dataset} into {cfg.data_dir} ({type(e).__name__}: {e}); "
                            f"offline, put https://www.cs.toronto.edu/~kriz/cifar.html's python archive there, or "
                            f"pass an ImageFolder root") from None
        classes = sets[0].classes
        splits = [(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)) for s in sets]
        if cfg.image_size != 32:
            resize = lambda x: F.interpolate(x.float(), size=cfg.image_size, mode="bicubic", antialias=True)
            splits = [(resize(x).round().clamp(0, 255).byte(), y) for x, y in splits]
    else:
        if not all(os.path.isdir(os.path.join(cfg.dataset, s)) for s in ("train", "test")):
            raise UserError(f"--dataset {cfg.dataset}: no train/ and test/ in it (expected cifar10, cifar100 or an "
                            f"ImageFolder root)")
        (xtr, ytr, classes), (xte, yte, test_classes) = (
            load_image_folder(os.path.join(cfg.dataset, s), cfg.image_size, os.path.join(cfg.data_dir, "cache"), n)
            for s, n in (("train", cfg.limit_train), ("test", cfg.limit_test)))
        if test_classes != classes:
            raise UserError(f"--dataset {cfg.dataset}: train has the classes {classes[:5]}... ({len(classes)}), test "
                            f"has {test_classes[:5]}... ({len(test_classes)})")
        splits = [(xtr, ytr), (xte, yte)]
    for i, limit in enumerate((cfg.limit_train, cfg.limit_test)):
        if 0 < limit < len(splits[i][0]):
            keep = torch.randperm(len(splits[i][0]), generator=torch.Generator().manual_seed(0))[:limit]
            splits[i] = (splits[i][0][keep], splits[i][1][keep])
    if ctx.ddp and ctx.master:
        dist.barrier()
    (train_x, train_y), (test_x, test_y) = ((x.to(ctx.device), y.to(ctx.device)) for x, y in splits)
    return SimpleNamespace(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=list(classes))


def load_image_folder(root, size, cache_dir, limit=0):
    """root/<class>/* decoded once into uint8 (N, 3, size, size): RGB, the shorter side resized to size, the centre
    cropped. Cached in cache_dir by the file list, sizes and times; a broken or stale cache is decoded again."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    from torchvision.transforms.v2 import functional as TF
    # the files of torchvision's ImageFolder: no images skipped, a class without images an error
    try:
        classes, class_to_idx = find_classes(root)
        files = make_dataset(root, class_to_idx, IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise UserError(f"{root}: {e} (expected {root}/<class>/<image>.jpg|png|...)") from None
    if 0 < limit < len(files):
        # the subset of load_dataset(), and only its images decoded
        files = [files[i] for i in torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:limit]]
    labels = [label for _, label in files]
    stats = repr((os.path.abspath(root), size, [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f, _ in files]))
    cache = os.path.join(cache_dir, f"imagefolder-{hashlib.sha1(stats.encode()).hexdigest()[:16]}.pt")
    try:
        d = torch.load(cache, weights_only=True)
        return d["images"], d["labels"], d["classes"]
    except (FileNotFoundError, NotADirectoryError):
        pass
    except Exception as e:
        print(f"warning: cannot use the cached decoded images {cache} ({type(e).__name__}: {str(e)[:100]}); decoding "
              f"again", file=sys.stderr)
    images, unreadable = torch.empty(len(files), 3, size, size, dtype=torch.uint8), []
    for i, (path, _) in enumerate(tqdm(files, desc=f"decoding {root}", unit="img", leave=False)):
        try:
            with Image.open(path) as im:
                # grayscale, palette and RGBA all occur in the wild
                im = TF.resize(im.convert("RGB"), size, TF.InterpolationMode.BICUBIC)
                images[i] = TF.pil_to_tensor(TF.center_crop(im, size))
        except Exception as e:
            unreadable.append(f"{path} ({e})")
    if unreadable:
        raise UserError(f"cannot read {len(unreadable)} images: {'; '.join(unreadable[:10])}" +
                        (f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""))
    # the cache is optional: a full or read-only --data-dir costs a decoding next time, not this run
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_open(cache) as f:
            torch.save({"images": images, "labels": torch.tensor(labels), "classes": classes}, f)
    except (OSError, UserError) as e:
        print(f"warning: cannot cache the decoded images in {cache_dir} ({e}); the next run decodes again",
              file=sys.stderr)
    return images, torch.tensor(labels), classes


# CIFAR-10's std is the reference's (0.2023, ...), widely copied from kuangliu/pytorch-cifar; the dataset's own
# pixel std is (0.2470, 0.2435, 0.2616). The first convolution and its BatchNorm absorb the difference.
CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


def normalization(kind, dataset, images):
    """(mean, std) per channel for --normalize: CIFAR's usual constants, or the uint8 images' own statistics."""
    if (dataset if kind == "auto" else kind) in CIFAR_STATS:
        return CIFAR_STATS[dataset if kind == "auto" else kind]
    # in chunks: no float copy of the whole training set
    n = images.shape[0] * images.shape[2] * images.shape[3]
    m1 = sum(c.double().sum((0, 2, 3)) for c in images.split(4096)) / (255 * n)
    m2 = sum(c.double().square().sum((0, 2, 3)) for c in images.split(4096)) / (255 ** 2 * n)
    return tuple(m1.tolist()), tuple((m2 - m1 ** 2).sqrt().tolist())


# ----------------------------------------------------------------------------- augmentation
# Every op takes a float batch (N, 3, H, W) in [0, 1] and per-view parameters, and matches
# torchvision.transforms.v2.functional applied to one image with those parameters (the tests check each op).


def sample_crops(draws, height, width, scale, ratio):
    """RandomResizedCrop.get_params of n views from 22 uniform draws each (10 tries, the position): top, left, h, w."""
    target = height * width * (scale[0] + (scale[1] - scale[0]) * draws[:, :10])
    log_ratio = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[:, 10:20])
    w, h = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # torchvision takes the first of 10 tries that fits
    first = ok.float().argmax(1, keepdim=True)
    w, h, ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(1)
    # when no try fits: the whole image, clamped to the ratio range
    in_ratio = width / height
    fw = width if ratio[0] <= in_ratio <= ratio[1] else (width if in_ratio < ratio[0] else round(height * ratio[1]))
    fh = height if ratio[0] <= in_ratio <= ratio[1] else (round(width / ratio[0]) if in_ratio < ratio[0] else height)
    w, h = torch.where(ok, w, float(fw)), torch.where(ok, h, float(fh))
    top = torch.where(ok, (draws[:, 20] * (height - h + 1)).floor(), ((height - h) / 2).floor())
    left = torch.where(ok, (draws[:, 21] * (width - w + 1)).floor(), ((width - w) / 2).floor())
    return top, left, h, w


def resized_crop_flip(x, top, left, h, w, flip, size):
    """Crop each view to its box, resize to size x size (bilinear) and mirror where flip: one grid_sample."""
    n, _, height, width = x.shape
    # Output pixel centre u in [-1, 1] samples the source at left + (u + 1) / 2 * w (half-pixel centres, as interpolate
    # with align_corners=False); clamped to the box's edge pixel centres, as interpolate on the cropped image.
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.where(flip, -w, w) / width, zero, (2 * left + w) / width - 1, zero, h / height,
                         (2 * top + h) / height - 1], 1).view(n, 2, 3)
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    lo = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], -1).view(n, 1, 1, 2)
    hi = torch.stack([(2 * (left + w) - 1) / width - 1, (2 * (top + h) - 1) / height - 1], -1).view(n, 1, 1, 2)
    return F.grid_sample(x, grid.clamp(lo, hi), mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x):
    # ITU-R 601-2 luma, as torchvision
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def blend(x, factor, target):
    """torchvision's _blend, a factor per view: brightness (target 0), contrast (mean grey), saturation (grey)."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * target).clamp(0, 1)


def adjust_hue(x, hue):
    """RGB -> HSV (torchvision's _rgb_to_hsv), the hue rotated by `hue` turns, HSV -> RGB by the closed form channel_n =
    V - V S clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6, n = 5, 3, 1 for r, g, b (torchvision's values, 3x faster:
    https://en.wikipedia.org/wiki/HSL_and_HSV#HSV_to_RGB_alternative)."""
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    eqc = maxc == minc
    sat = (maxc - minc) / torch.where(eqc, 1.0, maxc)
    rc, gc, bc = ((maxc - x) / torch.where(eqc, 1.0, maxc - minc)).unbind(1)
    r, g, _ = x.unbind(1)
    m = maxc[:, 0]
    h = torch.where(m == r, bc - gc, torch.where(m == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(torch.fmod(h / 6.0 + 1.0, 1.0) + hue.view(-1, 1, 1), 1.0) * 6
    k = torch.remainder(torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1) + h[:, None], 6.0)
    return maxc - maxc * sat * torch.minimum(k, 4 - k).clamp(0, 1)


def gaussian_blur(x, sigma):
    """3x3 Gaussian blur with a per-view sigma, reflect padding (torchvision's gaussian_blur, kernel 3)."""
    # weight of the two side taps; the centre tap is 1
    k = torch.exp(-0.5 / sigma.view(-1, 1, 1, 1) ** 2)
    k0, k1 = k / (1 + 2 * k), 1 / (1 + 2 * k)
    p = F.pad(x, (1, 1, 0, 0), mode="reflect")
    x = k0 * p[..., :-2] + k1 * p[..., 1:-1] + k0 * p[..., 2:]
    p = F.pad(x, (0, 0, 1, 1), mode="reflect")
    return k0 * p[..., :-2, :] + k1 * p[..., 1:-1, :] + k0 * p[..., 2:, :]


def solarize(x, threshold=0.5):
    return torch.where(x >= threshold, 1 - x, x)


def color_jitter(x, factors, hue, order):
    """ColorJitter per view: brightness, contrast and saturation factors (N, 3), hue (N,), and order (N, 4): the op at
    each position (0 brightness, 1 contrast, 2 saturation, 3 hue), as torchvision's random order."""
    # the factor of the op at each position (1 at hue's), and whether the position comes after hue
    at = torch.where(order < 3, factors.gather(1, order.clamp(max=2)), 1.0)
    after = torch.arange(4, device=x.device) > order.argsort(1)[:, 3:]
    kind = order.view(-1, 1, 4, 1, 1)
    for after_hue in (False, True):
        # the linear ops before hue sit at positions 0-2, those after it at 1-3
        for k in (range(1, 4) if after_hue else range(3)):
            # each view's blend at position k (on this side of hue), in one pass; factor 1 is an exact identity
            factor = torch.where(after[:, k] == after_hue, at[:, k], 1.0)
            gray = grayscale(x)
            target = torch.where(kind[:, :, k] == 0, 0.0,
                                 torch.where(kind[:, :, k] == 1, gray.mean((1, 2, 3), keepdim=True), gray))
            x = blend(x, factor, target)
        if not after_hue:
            x = adjust_hue(x, hue)
    return x


def sample_jitter(u, strength, p):
    """color_jitter's parameters as RandomApply([ColorJitter(*strength)], p) draws them (the identity, coin down)."""
    apply = (next(u) < p)[:, None]
    order = torch.stack([next(u) for _ in range(4)], 1).argsort(1)
    factors = torch.where(apply, torch.stack([1 - j + 2 * j * next(u) for j in strength[:3]], 1), 1.0)
    hue = torch.where(apply[:, 0], -strength[3] + 2 * strength[3] * next(u), 0.0)
    return factors, hue, order


def where(coin, changed, x):
    """changed for the views whose coin came up, x for the others."""
    return torch.where(coin.view(-1, 1, 1, 1), changed, x)


# Uniform random numbers drawn per view, more than augment_views takes.
DRAWS = 48


def augment(images, gen, aug):
    """uint8 images (N, 3, H, W) -> N augmented float views, normalised, channels_last. aug: AUGMENT with the run's
    size, norm ((mean, std) per channel) and compile. One generator call draws every random number; augment_views is
    tensor maths alone: a few hundred small kernels, which --compile (torch.compile) fuses into a few."""
    numbers = torch.rand(images.shape[0], DRAWS, device=images.device, generator=gen)
    mean, std = channel_stats(*aug["norm"], images.device)
    try:
        return (compiled(augment_views) if aug.get("compile") else augment_views)(images, numbers, mean, std, aug)
    except StopIteration:
        raise ValueError(f"augment_views takes more than the {DRAWS} random numbers that augment() draws per view: "
                         f"raise DRAWS") from None


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """torch.compile(fn), made once per function; a run's shapes are fixed, so no dynamic shapes."""
    return torch.compile(fn, dynamic=False)


def augment_views(images, numbers, mean, std, aug):
    """uint8 images (N, 3, H, W), DRAWS uniform numbers per view -> the views, normalised with mean and std (1, 3, 1,
    1): the reference's per-image pipeline, each parameter drawn per view: RandomResizedCrop and flip, ColorJitter
    (random order) with probability p_jitter, grayscale, Gaussian blur (sigma 0.1-2), solarize.

    To add an op: batched tensor maths over all views (x: (N, 3, H, W) in [0, 1], a parameter per view), one line here
    that takes its numbers from u, x = where(next(u) < aug["p_new"], new_op(x, lo + (hi - lo) * next(u)), x), and
    p_new in AUGMENT. No loop over views, no .item(), no random call: the GPU stays busy and torch.compile works.
    """
    # each next(u): the next uniform number of every view
    u = iter(numbers.unbind(1))
    x = images.float().div_(255)
    box = sample_crops(torch.stack([next(u) for _ in range(22)], 1), x.shape[2], x.shape[3], aug["scale"], aug["ratio"])
    x = resized_crop_flip(x, *box, next(u) < 0.5, aug["size"])
    x = color_jitter(x, *sample_jitter(u, aug["jitter"], aug["p_jitter"]))
    x = where(next(u) < aug["p_gray"], grayscale(x).expand(-1, 3, -1, -1), x)
    x = where(next(u) < aug["p_blur"], aug["blur"](x, 0.1 + 1.9 * next(u)), x)
    x = where(next(u) < aug["p_solarize"], solarize(x, aug["solarize_threshold"] / 255), x)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


# The reference's transforms run on PIL images, so RandomSolarize(0.5) compares uint8 values 0..255 with 0.5 and
# inverts every pixel >= 1 (solarize_threshold is in levels of 255). RandomGrayscale() without p is torchvision's p 0.1.
AUGMENT = dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.1,
               p_blur=0.1, blur=gaussian_blur, p_solarize=0.2, solarize_threshold=1)


@functools.lru_cache(maxsize=None)
def channel_stats(mean, std, device):
    """mean and std as (1, 3, 1, 1) tensors on the device, made once (a host-to-device copy per step stalls the GPU)."""
    return tuple(torch.tensor(t, device=device).view(1, 3, 1, 1).float() for t in (mean, std))


def normalize(x, norm):
    """uint8 images or floats in [0, 1] -> standardised float images, channels_last; norm: (mean, std) per channel."""
    mean, std = channel_stats(*norm, x.device)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def save_views(images, views, norm, path, rows=8, columns=8):
    """A PNG of the first `rows` images, each followed by its first `columns` views as the model gets them."""
    mean, std = channel_stats(*norm, views.device)
    rows = min(rows, len(images))
    size = views.shape[-1]
    shown = (views.float() * std + mean).clamp(0, 1).view(len(images), -1, 3, size, size)[:rows, :columns]
    originals = F.interpolate(images[:rows].float() / 255, size=(size, size), mode="bilinear", antialias=True)
    grid = torch.cat([originals[:, None], shown], 1).flatten(0, 1).cpu()
    with atomic_open(path) as f:
        torchvision.utils.save_image(grid, f, nrow=1 + shown.shape[1], padding=1, format="png")


# ----------------------------------------------------------------------------- model


class ResNet18(nn.Module):
    """torchvision's ResNet18 (its blocks, layer names and initialisation) for 32x32 images: a 3x3 stride-1 stem, no
    max-pool, no classifier; `width` channels in the first stage, 8 x width features; `blocks` per stage."""

    def __init__(self, width=64, blocks=(2, 2, 2, 2)):
        super().__init__()
        self.width, self.blocks, self.feature_dim = width, list(blocks), 8 * width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        c = [width, width, 2 * width, 4 * width, 8 * width]
        for i, n in enumerate(blocks):
            # each stage after the first halves the size and doubles the width, its shortcut through a 1x1 convolution
            down = nn.Sequential(nn.Conv2d(c[i], c[i + 1], 1, 2, bias=False), nn.BatchNorm2d(c[i + 1])) if i else None
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(c[i], c[i + 1], 2 if i else 1, down),
                                                         *[BasicBlock(c[i + 1], c[i + 1]) for _ in range(n - 1)]))
        # torchvision's initialisation; the stem keeps PyTorch's default, as in the reference code
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.conv1:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class MMCRModel(nn.Module):
    """A backbone (ResNet18) -> projector Linear (no bias)-BN-ReLU-Linear: z, the embedding the loss sees."""

    def __init__(self, width, projection_dim):
        super().__init__()
        self.backbone = ResNet18(width)
        hidden = 2 * projection_dim
        self.projector = nn.Sequential(nn.Linear(self.backbone.feature_dim, hidden, bias=False),
                                       nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, projection_dim))
        # what mmcr_finetune.py reads from a checkpoint to rebuild the backbone, as Class(width[, blocks])
        self.architecture = {"backbone": type(self.backbone).__name__, "file": os.path.abspath(__file__),
                             "width": width, "feature_dim": self.backbone.feature_dim, "projection_dim": projection_dim,
                             "blocks": self.backbone.blocks if isinstance(self.backbone, ResNet18) else None}

    def forward(self, x):
        return self.projector(self.backbone(x))


# ----------------------------------------------------------------------------- loss


def mmcr_loss(z, lmbda=0.0):
    """MMCR loss of z (batch, views, dim), in float32: -||C||_* + lmbda * mean_b ||Z_b||_*, C the per-image centroids of
    the L2-normalised views (Yerxa et al. 2023, eq. 3), gathered from all DDP ranks: the norm is the global batch's."""
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=-1)
        # The CPU SVD raises on non-finite input where CUDA's returns NaN: on the CPU such a z becomes zeros and the
        # loss NaN, so that the run stops at its next log step with exit code 3 (no GPU sync), and DDP ranks gather.
        finite = z.device.type != "cpu" or bool(torch.isfinite(z).all())
        z = z if finite else torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        loss = -torch.linalg.svdvals(gather(z.mean(1))).sum()
        if lmbda:
            loss = loss + lmbda * gather(torch.linalg.svdvals(z).sum(-1)).mean()
        return loss if finite else loss * math.nan


class Gather(torch.autograd.Function):
    """all_gather along dim 0, whose backward sums the ranks' gradients and returns this rank's slice: every rank
    computes the same global loss, so that is world_size x the one-process gradient, which DDP's average cancels."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # (a transposed use sends a strided gradient)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(z):
    """z of all DDP ranks, concatenated along dim 0, with autograd (z itself without DDP)."""
    return Gather.apply(z) if dist.is_initialized() and dist.get_world_size() > 1 else z


# ----------------------------------------------------------------------------- eval


def evaluate(cfg, model, data, aug, ctx):
    """{knn_top1, knn_top5} (%) of the backbone's features of the images as they are, on rank 0 ({} on the others)."""
    if not ctx.master:
        return {}
    with ctx.autocast:
        train, test = (features(model.backbone, x, lambda x: normalize(x, aug["norm"]), f"backbone features of the {s} "
                                "images") for x, s in ((data.train_x, "train"), (data.test_x, "test")))
    top1, top5 = knn_accuracy(train, data.train_y, test, data.test_y, cfg.num_neighbours, cfg.temperature,
                              len(data.classes))
    return {"knn_top1": top1, "knn_top5": top5}


# ----------------------------------------------------------------------------- train


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up from base_lr / warmup_steps to base_lr, then cosine decay to 0: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def batch(order, i, batch_size, ctx):
    """This rank's share of the indices of the epoch's i-th batch (each rank: its slice of the same global batch)."""
    return order[i * batch_size + ctx.rank * (batch_size // ctx.world):][:batch_size // ctx.world]


def epoch_order(n, seed, epoch, device):
    """The epoch's order; as a step's views (its own seed): a pure function, so a resume needs no random state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).to(device)


def main(cfg, given=frozenset()):
    # the run: a resume continues its checkpoint's recipe; this process's device and DDP rank; the run folder, locked
    cfg = check_config(cfg)
    cfg, ckpt, changed = load_resume(cfg, given)
    ctx = setup(cfg)
    cfg.output_dir, lock = claim_output_dir(cfg, ckpt, ctx)

    # data: each split once on the device as uint8; the augmentation recipe with this run's flags
    data = load_dataset(cfg, ctx)
    cfg.batch_size = fit_batch_size(cfg, given, len(data.train_x), ctx)
    aug = dict(AUGMENT, p_gray=cfg.grayscale_prob, solarize_threshold=cfg.solarize_threshold, size=cfg.image_size,
               norm=normalization(cfg.normalize, cfg.dataset, data.train_x), compile=cfg.compile)
    # the last partial batch is dropped
    steps_per_epoch = len(data.train_x) // cfg.batch_size
    total_steps = cfg.max_epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_duration * total_steps)

    # model and optimizer; a resume loads their states and goes on from the checkpoint's step
    model = MMCRModel(cfg.width, cfg.projection_dim).to(ctx.device, memory_format=torch.channels_last)
    # fused: one kernel, and no host sync under fp16
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                 fused=ctx.device.type == "cuda")
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == "fp16")
    step, best, run_id = load_states(ckpt, model=model, optimizer=optimizer, scaler=scaler)
    # what the loop calls: the model compiled (--compile), in DDP under torchrun; checkpoints save the model itself
    net = torch.compile(model) if cfg.compile else model
    net = DDP(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) if ctx.ddp else net
    gen = torch.Generator(ctx.device)

    def state():
        """What last.pt (and best.pt) hold: all that a resume needs."""
        return dict(script=SCRIPT, run_id=run_id, config=dataclasses.asdict(cfg), best=best, norm=aug["norm"],
                    step=step, running=running.cpu(), model=model.state_dict(), architecture=model.architecture,
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), classes=data.classes)

    # config.json; from here Ctrl-C or SIGTERM stops the run at its next log step, once last.pt is saved
    write_config(cfg, ctx, ckpt, run_id, changed, num_train=len(data.train_x), num_test=len(data.test_x),
                 num_classes=len(data.classes), steps_per_epoch=steps_per_epoch, norm=aug["norm"])
    SIGNALS.clear()
    t_start = saved_at = time.time()
    next_log = step + 1
    for epoch in range(step // steps_per_epoch, cfg.max_epochs):
        order = epoch_order(len(data.train_x), cfg.seed, epoch, ctx.device)
        # the sum of the epoch's losses (a resume inside the epoch continues the checkpoint's)
        inside = ckpt and step == ckpt["step"] and step % steps_per_epoch
        running = ckpt["running"].to(ctx.device) if inside else torch.zeros(1, device=ctx.device)
        first, t_epoch = step, time.time()
        with tqdm(total=steps_per_epoch, initial=step % steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.max_epochs}",
                  unit="step", disable=not ctx.master, leave=False) as bar:
            while step < (epoch + 1) * steps_per_epoch:
                lr = lr_at(step, total_steps, warmup_steps, cfg.learning_rate)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = data.train_x[batch(order, step % steps_per_epoch, cfg.batch_size, ctx)]
                # the views of an image are consecutive: (images x views, 3, size, size); a step's own random stream
                views = augment(images.repeat_interleave(cfg.num_views, 0),
                                gen.manual_seed((cfg.seed * 100003 + step) * 1024 + ctx.rank), aug)
                if step == 0 and ctx.master:
                    save_views(images, views, aug["norm"], os.path.join(cfg.output_dir, "views.png"))
                with ctx.autocast:
                    z = net(views).view(len(images), cfg.num_views, -1)
                loss = mmcr_loss(z, cfg.lmbda)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                running += loss.detach()
                step += 1
                bar.update()
                if step == next_log or step % steps_per_epoch == 0:
                    # a log step (every 2 s or --log-every steps): the one GPU sync; the ranks agree to stop or save
                    shown = dict(loss=running.item() / (step - epoch * steps_per_epoch), lr=lr)
                    stop, timed, next_log = log_step(bar, cfg, ctx, model, step, shown, saved_at)
                    # (at the epoch's end, its evaluation and files come first)
                    if (stop or timed) and step % steps_per_epoch:
                        saved_at = save_checkpoint(cfg, ctx, state())
                    if stop and step % steps_per_epoch:
                        raise stopped(cfg, ctx, step)
        # the epoch's end: kNN (every --eval-every epochs, and after the last), metrics.jsonl, last.pt, best.pt
        seconds = time.time() - t_epoch
        due = (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or epoch + 1 == cfg.max_epochs
        scores = evaluate(cfg, model, data, aug, ctx) if due else {}
        improved = scores.get("knn_top1", -1) > best.get("knn_top1", -1)
        best = dict(scores, epoch=epoch + 1) if improved else best
        write_metrics(cfg, ctx, dict(epoch=epoch + 1, step=step, loss=running.item() / steps_per_epoch, lr=lr, **scores,
                                     epoch_seconds=round(seconds, 3), views_per_second=round(
                                         (step - first) * cfg.batch_size * cfg.num_views / seconds)))
        saved_at = save_checkpoint(cfg, ctx, state(), best=improved)
        # a stop asked for during the evaluation ends the run here, with its files written
        if agree(ctx, bool(SIGNALS))[0]:
            raise stopped(cfg, ctx, step)
    if ctx.master:
        print(f"done: best {in_words(best)} in {time.time() - t_start:.1f}s; checkpoints in {cfg.output_dir}")


# ----------------------------------------------------------------------------- plumbing
# A hacker need not read further: flag checks and errors, DDP, the run folder, checkpoint files, log steps and stops.


class UserError(Exception):
    """Bad input or a file that cannot be written: one line on stderr, exit code 2, never a traceback."""


class Diverged(Exception):
    """Non-finite weights: one line on stderr, exit code 3."""


class Stopped(BaseException):
    """Stopped(signal, message) after Ctrl-C or SIGTERM: exit 128 + signal; no `except Exception` takes it."""


def parse_config(argv=None):
    """Config from argparse made from it (the defaults as config.json writes them), and the names of the flags given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        shown = f.metadata["help"] + (f" (default: {json.dumps(f.default)})" if f.default != "" else "")
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        parser.add_argument("--" + f.name.replace("_", "-"), help=shown.replace("%", "%%"), **kind)
    given = vars(parser.parse_args(argv))
    return Config(**given), frozenset(given)


def setup(cfg):
    """This process's device, precision (`with ctx.autocast:`; auto: bf16 on GPUs that have it, else fp16, fp32 on a
    CPU) and rank: DDP when torchrun set RANK, one process per GPU (NCCL) or per CPU process (gloo)."""
    cuda, ddp = cfg.device != "cpu" and torch.cuda.is_available(), "RANK" in os.environ
    if ddp:
        # rank 0 evaluates (and decodes a new ImageFolder) while the others wait: allow that more than 10 minutes
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    precision = cfg.precision if cfg.precision != "auto" else "fp32" if not cuda else (
        "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16")
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    rank, dtype = dist.get_rank() if ddp else 0, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return SimpleNamespace(device=device, precision=precision, rank=rank, world=dist.get_world_size() if ddp else 1,
                           ddp=ddp, master=rank == 0, autocast=torch.autocast(device.type, dtype, enabled=bool(dtype)))


def fit_batch_size(cfg, given, n, ctx):
    """--batch-size for n training images: a default larger than n shrinks to n, a given one is an error."""
    batch_size = cfg.batch_size if cfg.batch_size <= n or "batch_size" in given else n - n % ctx.world
    if batch_size > n or batch_size % ctx.world or batch_size < 1:
        raise UserError(f"--batch-size {batch_size} is larger than the training set ({n} images) or not divisible by "
                        f"the {ctx.world} processes")
    return batch_size


def load_resume(cfg, given):
    """(cfg, checkpoint, {flag: [the run's, the new]}) of --resume (auto: <output-dir>/last.pt, if any): the flags
    from its config but those of RESUME_MAY_CHANGE given (another flag given another value is a UserError)."""
    path = os.path.join(cfg.output_dir, "last.pt") if cfg.resume == "auto" else cfg.resume
    if not path or (cfg.resume == "auto" and not os.path.exists(path)):
        return cfg, None, {}
    ckpt = dict(load_checkpoint(path, SCRIPT), file=os.path.abspath(path))
    saved = {k: v for k, v in ckpt["config"].items() if hasattr(cfg, k) and k not in ("resume", "output_dir")}
    changed = {n: [saved[n], getattr(cfg, n)] for n in sorted(given) if n in saved and saved[n] != getattr(cfg, n)}
    if set(changed) - RESUME_MAY_CHANGE:
        listed = ", ".join(f"--{n.replace('_', '-')} {new} (the run's: {old})" for n, (old, new) in changed.items()
                           if n not in RESUME_MAY_CHANGE)
        raise UserError(f"{path} continues its run's recipe, and the command line changes it: {listed}; leave these "
                        f"flags out to continue the run, or start a new run in another --output-dir")
    return dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k not in given}), ckpt, changed


def load_states(ckpt, **objects):
    """A resume loads the states of the objects (model=...); returns (step, best scores, run id), a new run's too."""
    for name, obj in objects.items() if ckpt else ():
        # a GradScaler's state carries over only from fp16 to fp16
        if not isinstance(obj, torch.amp.GradScaler) or (obj.is_enabled() and ckpt[name]):
            load_fitting(obj, ckpt[name], f"{ckpt['file']}: its {name}")
    return (ckpt["step"], ckpt["best"], ckpt["run_id"]) if ckpt else (0, {}, os.urandom(6).hex())


def load_fitting(obj, state, what, advice=""):
    """obj.load_state_dict(state); a module's state with other keys or shapes is one UserError that says which."""
    own = obj.state_dict() if isinstance(obj, nn.Module) else {}
    wrong = {"missing": [k for k in own if k not in state], "unexpected": [k for k in state if own and k not in own],
             "of another shape": [k for k in own if k in state and state[k].shape != own[k].shape]}
    try:
        if any(wrong.values()):
            raise ValueError("; ".join(f"{len(v)} {kind}: {', '.join(v[:3])}{', ...' * (len(v) > 3)}"
                                       for kind, v in wrong.items() if v))
        obj.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"{what} does not fit ({str(e).splitlines()[0]}){advice}") from None


CREATED = []  # the run folder (or lock file) this process made and locked: removed by a failed start (no last.pt yet)


def claim_output_dir(cfg, ckpt, ctx):
    """--output-dir (else a resume's own folder, else runs/<method>/<date-time>), made and locked by rank 0 while this
    process lives (flock: the kernel releases it however the process ends); refused, unchanged, when another process
    holds it, or it holds a run this does not resume (torchrun ends the other ranks). Returns (the folder, the lock)."""
    folder = [cfg.output_dir or (os.path.dirname(ckpt["file"]) if ckpt else
                                 os.path.join(RUNS, time.strftime("%Y%m%d-%H%M%S")))]
    if ctx.ddp:
        dist.broadcast_object_list(folder, src=0)
    folder, made = folder[0], os.path.abspath(os.path.join(folder[0], ".lock"))
    # what this process makes: the folder's first missing parent, or else the lock file
    while not os.path.exists(made) and not os.path.exists(os.path.dirname(made)):
        made = os.path.dirname(made)
    new = ctx.master and not os.path.exists(made)
    try:
        if ctx.master:
            os.makedirs(folder, exist_ok=True)
            lock = open(os.path.join(folder, ".lock"), "a+")
            lock.seek(0)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            CREATED[:] = [made] if new else []
            held, other = [f for f in ("last.pt", "best.pt") if os.path.exists(os.path.join(folder, f))], None
            with contextlib.suppress(OSError, ValueError, AttributeError), open(folder + "/config.json") as f:
                other = json.load(f).get("run_id")
            if held and (not ckpt or other not in (None, ckpt["run_id"])):
                raise UserError(f"--output-dir {folder} already holds a run ({', '.join(held)}): " + (
                    f"another one than {ckpt['file']}; resume into that run's own folder, or into an empty one" if
                    ckpt else "pass --resume auto to continue it, or choose another --output-dir"))
            lock.truncate(0)
            print(os.getpid(), file=lock, flush=True)
            return folder, lock
    except BlockingIOError:
        raise UserError(f"--output-dir {folder} is in use by another run (PID {lock.read().strip()}); wait for it to "
                        f"end, or choose another --output-dir") from None
    except OSError as e:
        raise UserError(f"cannot write {e.filename or os.path.join(folder, '.lock')} ({e.strerror})") from None
    return folder, None


def write_config(cfg, ctx, ckpt, run_id, changed, **info):
    """config.json: the run id, every flag and what was derived from them (info), also printed. A resume keeps the
    run's config.json, appends a record of itself and cuts metrics.jsonl back to the checkpoint's step."""
    path, now = os.path.join(cfg.output_dir, "config.json"), time.strftime("%Y-%m-%dT%H:%M:%S")
    derived = dict(world_size=ctx.world, device=str(ctx.device), precision_used=ctx.precision, **info)
    run, lines = {"run_id": run_id, "started": now, **dataclasses.asdict(cfg), **derived}, []
    if ckpt:
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            run = json.load(f)
        run.setdefault("resumes", []).append({"at": now, "from": ckpt["file"], "step": ckpt["step"], "changed": changed,
                                              "world_size": ctx.world, "precision_used": ctx.precision})
        print(f"resumed from {ckpt['file']} at step {ckpt['step']}" + (f", changing {changed}" if changed else ""))
        with contextlib.suppress(FileNotFoundError), open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
            # whole lines only (a crash or a full disk may cut off the last one)
            lines = [line for line in f if line.endswith("}\n") and json.loads(line).get("step", 0) <= ckpt["step"]]
    if ctx.master:
        with atomic_open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w") as f:
            f.writelines(lines)
        with atomic_open(path, "w") as f:
            json.dump(run, f, indent=2)
        print(json.dumps(dict(dataclasses.asdict(cfg), **derived)))


SIGNALS = []  # Ctrl-C and SIGTERM of the run, read at log steps; [None] until main() starts the run
LOG_SECONDS = 2  # the time between log steps, at most


def on_signal(signum, frame):
    """Ctrl-C or SIGTERM: the first stops a started run at its next log step (or after the evaluation that runs), once
    last.pt is saved; one before the run starts, or a second one, quits at once."""
    if SIGNALS:
        raise Stopped(signum, "interrupted: quit at once" + ("" if SIGNALS == [None] else ", keeping the last save"))
    SIGNALS.append(signum)


def log_step(bar, cfg, ctx, model, step, shown, saved_at):
    """The loop's one GPU sync: the epoch's running means and the lr on the bar; what every rank decides together: a
    stop (Ctrl-C or SIGTERM), a timed save, the next log step (LOG_SECONDS on, at most --log-every); divergence."""
    # the epoch's steps per second so far, on rank 0
    d = bar.format_dict if ctx.master else dict(n=0, initial=0, elapsed=1)
    weights = torch.stack([p.detach().float().sum() for p in model.parameters()]).sum()
    timed = ctx.master and 0 < cfg.checkpoint_minutes <= (time.time() - saved_at) / 60
    stop, timed, bad, interval = agree(ctx, bool(SIGNALS), timed, ~weights.isfinite(), ctx.master * min(
        cfg.log_every, max(1, int(LOG_SECONDS * (d["n"] - d["initial"]) / max(d["elapsed"], 1e-3)))))
    if bad:
        kept = " and ".join(f for f in ("last.pt", "best.pt") if os.path.exists(os.path.join(cfg.output_dir, f)))
        raise Diverged(f"training diverged at step {step}: the weights are no longer finite; " + (f"{kept} in "
                       f"{cfg.output_dir} keep the last finite state" if kept else "nothing was saved, so the folder "
                       "can take a new run") + "; try a lower --learning-rate in a new --output-dir, or bf16 / fp32")
    bar.set_postfix_str(in_words(shown))
    return bool(stop), bool(timed), step + int(interval)


def agree(ctx, *flags):
    """Host or device flags as floats, each maxed over the ranks under DDP (so every rank takes the same decisions)."""
    flags = torch.stack([torch.as_tensor(f, dtype=torch.float64, device=ctx.device) for f in flags])
    if ctx.ddp:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


def in_words(values):
    """'mean loss -4.123 lr 0.001 knn_top1 57.19': values for a log line (epoch means say so)."""
    return " ".join(f"{'mean ' * (k in ('loss', 'tcr', 'sim'))}{k} {f'{v:.4g}' if isinstance(v, float) else v}"
                    for k, v in values.items())


def write_metrics(cfg, ctx, line):
    """The epoch's line, appended to metrics.jsonl (a line cut off by a crash is left out when read) and printed."""
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if ctx.master:
        try:
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror}: is the disk full or read-only?)") from None
        print(f"epoch {line['epoch']}/{cfg.max_epochs} " + in_words({k: v for k, v in line.items() if k != "epoch"}))


def save_checkpoint(cfg, ctx, state, best=False):
    """last.pt from rank 0, with a checksum of what it holds, and best.pt (when best) as a second name of that file;
    each written whole or not at all. Returns the time of the save (the clock of timed saves)."""
    last = os.path.join(cfg.output_dir, "last.pt")
    if ctx.master:
        with atomic_open(last) as f:
            torch.save(dict(state, checksum=checksum(state)), f)
        CREATED.clear()
    if ctx.master and best:
        # one copy on the disk for both names (a hard link); a copy where the file system has no links
        with atomic_open(os.path.join(cfg.output_dir, "best.pt")) as f:
            try:
                os.remove(f.name)
                os.link(last, f.name)
            except OSError:
                shutil.copyfile(last, f.name)
    return time.time()


def stopped(cfg, ctx, step):
    """The Stopped of a stop request, once last.pt is saved: its step and the command that continues the run."""
    launcher = f"torchrun --nproc_per_node {ctx.world}" if ctx.ddp else "python"
    return Stopped((SIGNALS or [signal.SIGTERM])[0], f"interrupted: saved {os.path.join(cfg.output_dir, 'last.pt')} "
                   f"at step {step}; continue with {launcher} {shlex.quote(sys.argv[0])} --resume auto --output-dir "
                   f"{shlex.quote(cfg.output_dir)}")


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """A file to write that replaces `path` only once complete, flushed to disk and renamed: a kill, a crash or a full
    disk never leaves a broken file and keeps the previous one; no .tmp stays. A failure is a UserError naming it."""
    try:
        with open(path + ".tmp", mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:
        # (torch.save reports a failed write as a RuntimeError)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
        kept = f"; the previous {os.path.basename(path)} is unchanged" if os.path.exists(path) else ""
        raise UserError(f"cannot write {path} ({reason}: is the disk full or read-only?){kept}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")


def checksum(x, h=None):
    """sha1 of all that a checkpoint holds (tensor bytes, numbers, strings), so that a damaged file shows on load."""
    h = h or hashlib.sha1()
    if isinstance(x, (dict, list, tuple)):
        for k, v in sorted(x.items(), key=lambda kv: str(kv[0])) if isinstance(x, dict) else enumerate(x):
            h.update(repr(k).encode())
            checksum(v, h)
    else:
        h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy() if torch.is_tensor(x) else
                 repr(x).encode())
    return h.hexdigest()


def load_checkpoint(path, script):
    """A checkpoint that `script` (or a renamed copy) wrote, whole: its checksum holds. Anything else is a UserError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} does not exist" if isinstance(e, FileNotFoundError) else f"{path} is not a readable "
                        f"checkpoint: corrupt, truncated or not written by torch.save ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "checksum" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by these scripts")
    if ckpt.pop("checksum") != checksum(ckpt):
        raise UserError(f"{path} is corrupt: what it holds does not match its checksum (a damaged disk or copy)")
    if ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {script}.py")
    return ckpt


def cli(argv=None):
    """main() as a command, exit code 0 when done: else one line on stderr (rank 0 speaks for all) and 2 for bad input
    or an unwritable file, 3 divergence, 128 + the signal after Ctrl-C / SIGTERM, 1 on a rank whose peer died."""
    cfg, given = parse_config(argv)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    rank = int(os.environ.get("RANK", 0))
    name = os.path.basename(__file__) + (f": rank {rank}" if rank else "")
    code, message, CREATED[:], SIGNALS[:] = 0, None, [], [None]
    try:
        main(cfg, given)
    except (UserError, Diverged, OSError) as e:
        code, message = 3 if isinstance(e, Diverged) else 2, f"{name}: error: {e}"
    except Stopped as e:
        code, message = 128 + e.args[0], e.args[1]
    except RuntimeError as e:
        # under torchrun: another process ended (its line says why), which broke this one's collective
        if not (dist.is_initialized() and (isinstance(e, dist.DistError) or "onnection" in str(e))):
            raise
        code, message = 1, f"{name}: stopped, as another process ended"
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if CREATED and (code == 2 or code > 128):
        # a run that fails or is stopped before its first checkpoint leaves no folder (or lock file) that it made
        with contextlib.suppress(OSError):
            shutil.rmtree(CREATED[0]) if os.path.isdir(CREATED[0]) else os.remove(CREATED[0])
    if message and (rank == 0 or code == 1):
        print(message, file=sys.stderr)
    if dist.is_initialized():
        # a process group left to the interpreter's exit aborts the process
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(cli())
