"""CPU tests of the four scripts and knn.py, on tiny data the tests generate themselves.

    python -m pytest -q test_smoke.py -m "not e2e"      # the unit tests alone
    python -m pytest -q test_smoke.py                   # everything; no GPU, internet or dataset

First the unit tests: they import the scripts' functions and compare them with independent references
(NumPy float64, torchvision.transforms.v2.functional, Pillow, plain Python loops), in this process.
Then the end-to-end tests, marked e2e: they run the scripts' command lines, as subprocesses (cwd = a
temporary directory) or in this process through cli(), on a tiny ImageFolder of odd-sized RGB /
grayscale png / jpg images. Everything written goes to pytest's tmp_path. Runs that several tests need
(a trained MMCR run, a fine-tuning, an EMP-SSL run, a killed and resumed run) are session fixtures.

The four scripts are copies by design: the code they share (augmentation, data loading, checkpoints,
the run folder, log steps, error reporting) is tested once, with one script, and
test_shared_definitions_are_identical checks that every shared definition is the same text in all of them.
"""
import ast
import copy
import dataclasses
import datetime
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)
import knn  # noqa: E402
import mmcr_pretrain as pretrain  # noqa: E402
from knn import knn_accuracy, knn_scores  # noqa: E402
from mmcr_pretrain import lr_at, mmcr_loss  # noqa: E402
import mmcr_finetune as finetune  # noqa: E402
import empssl_pretrain as empssl  # noqa: E402
import empssl_linear as linear  # noqa: E402

# -m "not e2e" selects the unit tests; the mark needs no registration file
warnings.filterwarnings("ignore", category=pytest.PytestUnknownMarkWarning)
e2e = pytest.mark.e2e

MMCR = os.path.join(REPO, "mmcr_pretrain.py")
FINETUNE = os.path.join(REPO, "mmcr_finetune.py")
EMPSSL = os.path.join(REPO, "empssl_pretrain.py")
LINEAR = os.path.join(REPO, "empssl_linear.py")
SCRIPTS = (MMCR, FINETUNE, EMPSSL, LINEAR)
MODULES = {MMCR: pretrain, FINETUNE: finetune, EMPSSL: empssl, LINEAR: linear}
# The tiny job: 33 training images (11 per class) at batch 8 = 4 steps per epoch (one image dropped).
# --device cpu: the same bit-exact CPU path on machines that do have a GPU.
TINY = ["--num-views", "4", "--batch-size", "8", "--num-neighbours", "5", "--max-epochs", "2", "--device", "cpu"]
EMPSSL_TINY = ["--train-patches", "4", "--valid-patches", "4", "--batch-size", "8", "--hidden-dim", "64",
               "--projection-dim", "32", "--num-neighbours", "5", "--max-epochs", "2", "--device", "cpu"]
FINETUNE_TINY = ["--batch-size", "8", "--max-epochs", "2", "--num-neighbours", "5", "--device", "cpu"]
TRAIN_PER_CLASS, TEST_PER_CLASS, CLASSES = 11, 4, ("cat", "dog", "frog")
STEPS_PER_EPOCH = 3 * TRAIN_PER_CLASS // 8
# the metrics every line must have (more may come); an epoch without evaluation has no scores
METRIC_KEYS = {"epoch", "step", "loss", "lr", "epoch_seconds", "views_per_second"}
SCORE_KEYS = {"knn_top1", "knn_top5"}
FINETUNE_KEYS = {"epoch", "step", "loss", "lr", "epoch_seconds", "images_per_second"}
TEST_KEYS = {"top1", "top5", "test_loss"}
# what every run folder holds at the end
RUN_FILES = {"config.json", "metrics.jsonl", "last.pt", "best.pt"}
# Our batched ops and torchvision compute the same float32 formulas in a different order (grid_sample
# vs interpolate, separable vs 2-D blur kernel, fused blends); measured differences are <= 1e-6.
AUG_ATOL = 1e-5
# Subprocesses must never reach the network (CIFAR download): a dead proxy makes that fail fast and
# deterministically even on machines that do have internet. One thread per process: runs compared
# bit for bit share the setting, and on a busy 2-core machine 2 spinning threads are slower than 1.
ENV = dict(os.environ, OMP_NUM_THREADS="1", HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
           http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")


# ----------------------------------------------------------------------------- helpers


def aug_of(module, size=32, norm=((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)), **changes):
    """The `aug` dict that module's main() gives augment(): its AUGMENT with a size, a normalisation and changes."""
    return dict(module.AUGMENT, size=size, norm=norm, **changes)


MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
AUG = aug_of(pretrain)


def natural_images(n, size=32, seed=0):
    """uint8 images that look like photographs to a blur: smooth shading, a few sharp-edged shapes, a little noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bicubic",
                                             align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        for _ in range(3):
            cy, cx, r = (torch.randint(0, size, (3,), generator=g) // torch.tensor([1, 1, 3])).tolist()
            coarse[i][:, (yy - cy) ** 2 + (xx - cx) ** 2 < (r + 2) ** 2] = torch.rand(3, 1, generator=g)
    return ((coarse + 0.03 * torch.randn(coarse.shape, generator=g)).clamp(0, 1) * 255).round().byte()


def make_image_folder(root, train_per_class, test_per_class, seed=0):
    """root/{train,test}/<class>/*: odd sizes 20-60 px, RGB and grayscale, png and jpg, plus notes.txt."""
    rng = np.random.default_rng(seed)
    colours = [(220, 50, 40), (40, 200, 60), (50, 60, 230)]
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, colour in zip(CLASSES, colours):
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                w, h = (int(s) for s in rng.integers(20, 61, size=2))
                pixels = np.clip(np.array(colour) + rng.normal(0, 50, (h, w, 3)), 0, 255).astype(np.uint8)
                im, gray = Image.fromarray(pixels), i % 3 == 2
                if gray:
                    im = im.convert("L")
                im.save(os.path.join(d, f"{i:02d}{'_gray' if gray else ''}.{'png' if i % 2 else 'jpg'}"))
            with open(os.path.join(d, "notes.txt"), "w") as f:
                f.write("not an image: must be skipped\n")
        # a stray file next to the class folders
        with open(os.path.join(root, split, "README.md"), "w") as f:
            f.write("tiny test data\n")
    return str(root)


def error_lines(stderr):
    """Non-empty stderr lines, leaving out tqdm progress bars (they redraw with \\r)."""
    return [line for line in re.split(r"[\r\n]+", stderr) if line.strip() and "%|" not in line]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"), TRAIN_PER_CLASS, TEST_PER_CLASS)


# ----------------------------------------------------------------------------- augmentation


def test_ops_match_torchvision():
    """Every per-view op against torchvision.transforms.v2.functional on each image alone (brightness, contrast and
    saturation: in test_color_jitter_matches_torchvision_in_every_order)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 27, 31, generator=g)
    # grey pixels: max == min in the hue conversion
    x[0, :, :5] = 0.5
    # a grey image
    x[1] = x[1, :1]
    # saturated red: the hue sector edges
    x[2, :, 3:7] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    # exact 0 / 1 values (solarize threshold, clamping)
    x[3, :, :4] = (x[3, :, :4] > 0.5).float()
    hue = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.1, 0.5])
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0, 0.3])
    cases = {
        "hue": (pretrain.adjust_hue(x, hue), [TF.adjust_hue(x[i], hue[i].item()) for i in range(6)]),
        "grayscale": (pretrain.grayscale(x), [TF.rgb_to_grayscale(x[i]) for i in range(6)]),
        "blur": (pretrain.gaussian_blur(x, sigma),
                 [TF.gaussian_blur(x[i], [3, 3], [sigma[i].item()] * 2) for i in range(6)]),
        "solarize": (pretrain.solarize(x), [TF.solarize(x[i], 0.5) for i in range(6)]),
    }
    for name, (ours, ref) in cases.items():
        ref = torch.stack(ref)
        assert ours.shape == ref.shape, name
        torch.testing.assert_close(ours, ref, rtol=0, atol=AUG_ATOL, msg=lambda m: f"{name}: {m}")
    # the blur's "off" value used by augment is an exact identity
    assert torch.equal(pretrain.gaussian_blur(x, torch.full((6,), 1e-3)), x)


def test_resized_crop_flip_matches_torchvision():
    # boxes (top, left, h, w) on a 29 x 35 image, never larger than the 24 x 24 output: corners, edges, 1 px, non-square
    boxes = [(0, 0, 24, 24), (5, 11, 24, 24), (29 - 13, 35 - 17, 13, 17), (3, 7, 20, 9), (0, 34, 1, 1), (28, 0, 1, 24),
             (10, 4, 7, 23)]
    n = len(boxes)
    x = torch.rand(n, 3, 29, 35, generator=torch.Generator().manual_seed(0))
    top, left, h, w = (torch.tensor([float(b[k]) for b in boxes]) for k in range(4))
    for flip in (torch.zeros(n, dtype=torch.bool), torch.arange(n) % 2 == 0):
        ours = pretrain.resized_crop_flip(x, top, left, h, w, flip, 24)
        for i, (t, l, hh, ww) in enumerate(boxes):
            ref = TF.resized_crop(x[i], t, l, hh, ww, [24, 24], interpolation=InterpolationMode.BILINEAR,
                                  antialias=True)
            if flip[i]:
                ref = TF.horizontal_flip(ref)
            torch.testing.assert_close(ours[i], ref, rtol=0, atol=AUG_ATOL,
                                       msg=lambda m: f"box {boxes[i]} flip {bool(flip[i])}: {m}")


def test_sample_crops_cover_the_ranges():
    H, W, n = 224, 256, 20000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    draws = torch.rand(n, 22, generator=torch.Generator().manual_seed(0))
    top, left, h, w = pretrain.sample_crops(draws, H, W, scale, ratio)
    for t in (top, left, h, w):
        assert t.shape == (n,) and torch.equal(t, t.round())
    assert ((top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
            and (h >= 1).all() and (w >= 1).all())
    area, aspect = (h * w / (H * W)).numpy(), (w / h).numpy()
    # w and h are rounded to whole pixels
    slack = 0.02
    assert area.min() >= scale[0] * (1 - slack) and area.max() <= 1
    assert ratio[0] * (1 - slack) <= aspect.min() and aspect.max() <= ratio[1] * (1 + slack)
    # spans the range
    assert area.min() < 0.085 and area.max() > 0.97
    assert aspect.min() < 0.77 and aspect.max() > 1.3
    # positions reach every edge
    assert (top == 0).any() and (top + h == H).any() and (left == 0).any() and (left + w == W).any()
    # same distribution as torchvision's RandomResizedCrop.get_params (fixed seeds: deterministic)
    torch.manual_seed(0)
    tv = np.array([RandomResizedCrop.get_params(torch.empty(3, H, W), list(scale), list(ratio)) for _ in range(3000)],
                  dtype=float)
    tv_area = tv[:, 2] * tv[:, 3] / (H * W)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        assert abs(np.quantile(area, q) - np.quantile(tv_area, q)) < 0.02, q
    # ~4 standard errors
    assert abs((area > 0.9).mean() - (tv_area > 0.9).mean()) < 0.012
    # uniform placement
    assert abs((top / (H - h).clamp(min=1)).mean().item() - 0.5) < 0.02


def test_sample_crops_fixed_size():
    top, left, h, w = pretrain.sample_crops(torch.rand(2000, 22), 32, 32, (0.25, 0.25), (1.0, 1.0))
    assert (h == 16).all() and (w == 16).all()
    assert set(top.long().tolist()) == set(range(17)) and set(left.long().tolist()) == set(range(17))


@pytest.mark.parametrize("height,width", [(32, 66), (66, 32), (33, 70)])
def test_sample_crops_fallback_matches_torchvision(height, width):
    """No try fits (aspect of the image outside the ratio range, scale near 1): torchvision's centred fallback box."""
    scale, ratio = (0.9, 1.0), (3 / 4, 4 / 3)
    expected = RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio))
    got = pretrain.sample_crops(torch.rand(5, 22), height, width, scale, ratio)
    for k in range(5):
        assert tuple(int(t[k]) for t in got) == tuple(expected)


@pytest.mark.parametrize("size", [32, 24])
def test_augment_output(size):
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = pretrain.augment(images, torch.Generator().manual_seed(1), aug_of(pretrain, size))
    assert out.shape == (12, 3, size, size) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # seeded
    assert torch.equal(out, pretrain.augment(images, torch.Generator().manual_seed(1), aug_of(pretrain, size)))
    assert not torch.allclose(out, pretrain.augment(images, torch.Generator().manual_seed(2), aug_of(pretrain, size)))
    # the views of one image differ
    assert not torch.allclose(out[0], out[1])


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_augment_compiled_matches_eager():
    """--compile runs augment_views through torch.compile: the same views as eager from the same draws (EMP-SSL's
    recipe, whose PIL blur adds the convolutions to MMCR's ops; one graph, no break)."""
    images = natural_images(8).repeat_interleave(4, 0)
    eager = empssl.augment(images, torch.Generator().manual_seed(0), aug_of(empssl))
    fused = empssl.augment(images, torch.Generator().manual_seed(0), aug_of(empssl, compile=True))
    # a pixel that lands on the solarize threshold may be inverted in one and not the other (float rounding); no
    # other difference is allowed
    pixels = eager * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    t = empssl.AUGMENT["solarize_threshold"] / 255
    on_threshold = torch.minimum((pixels - t).abs(), (pixels - (1 - t)).abs()) < 1e-5
    differ = (fused - eager).abs() > 1e-4
    assert not (differ & ~on_threshold).any() and differ.float().mean() < 1e-4
    torch.testing.assert_close(fused[~differ], eager[~differ], rtol=0, atol=1e-4)
    assert fused.is_contiguous(memory_format=torch.channels_last)


def test_color_jitter_matches_torchvision_in_every_order():
    """color_jitter against torchvision's four ops applied one after the other on each image alone, with the same
    factors, in each view's own order (all 24 orders, as ColorJitter's randperm(4) draws them)."""
    orders = torch.tensor(list(itertools.permutations(range(4))))
    n = len(orders)
    x = natural_images(n, size=16, seed=3).float() / 255
    g = torch.Generator().manual_seed(0)
    factors = 0.6 + 0.8 * torch.rand(n, 3, generator=g)
    hue = 0.4 * torch.rand(n, generator=g) - 0.2
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        expected = x[i]
        for op in orders[i].tolist():
            expected = ops[op](expected, (factors[i].tolist() + [hue[i].item()])[op])
        ours = pretrain.color_jitter(x, factors, hue, orders)[i]
        torch.testing.assert_close(ours, expected, rtol=0, atol=AUG_ATOL, msg=lambda m: f"order {orders[i]}: {m}")
    # the order matters: brightness 1.4 then saturation differs from saturation then brightness where pixels clip
    assert not torch.allclose(pretrain.color_jitter(x, factors, hue, orders)[0],
                              pretrain.color_jitter(x, factors, hue, orders.flip(1))[0], atol=1e-3)
    # factors 1 and hue 0: every view comes out as it went in
    same = pretrain.color_jitter(x, torch.ones(n, 3), torch.zeros(n), orders)
    torch.testing.assert_close(same, x, rtol=0, atol=1e-6)


def test_augment_takes_each_number_once_and_says_when_DRAWS_is_too_small(monkeypatch):
    """augment_views takes the uniform numbers of a view in order, one column at a time (the flip: column 22, after
    the crop's 22), and fewer than DRAWS; with fewer numbers drawn it says which constant to raise."""
    images = natural_images(4, size=8)
    numbers = torch.rand(4, pretrain.DRAWS, generator=torch.Generator().manual_seed(0))
    flipped, unflipped = numbers.clone(), numbers.clone()
    flipped[:, 22], unflipped[:, 22] = 0.0, 0.99
    identity = dict(aug_of(pretrain, 8, norm=((0.0,) * 3, (1.0,) * 3)), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                    p_jitter=0.0, p_gray=0.0, p_blur=0.0, p_solarize=0.0)
    views = [pretrain.augment_views(images, n, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), identity)
             for n in (flipped, unflipped)]
    torch.testing.assert_close(views[0], views[1].flip(-1), rtol=0, atol=1e-6)
    # the recipes' ops take no more numbers than augment() draws
    for module in (pretrain, empssl):
        module.augment(images, torch.Generator().manual_seed(0), aug_of(module, 8))
    monkeypatch.setattr(pretrain, "DRAWS", 30)
    with pytest.raises(ValueError, match="more than the 30 random numbers.*raise DRAWS"):
        pretrain.augment(images, torch.Generator().manual_seed(0), aug_of(pretrain, 8))


@pytest.mark.parametrize("p_jitter", [0.0, 1.0])
def test_augment_identity_settings(p_jitter):
    """Full-image crops, zero jitter, no grey / blur / solarize: every view is the normalised image or its mirror."""
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    identity = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=(0.0, 0.0, 0.0, 0.0), p_jitter=p_jitter, p_gray=0.0,
                    p_blur=0.0, blur=pretrain.gaussian_blur, p_solarize=0.0, solarize_threshold=0.5)
    out = pretrain.augment(images, torch.Generator().manual_seed(0), dict(identity, size=32, norm=(MEAN, STD)))
    plain = pretrain.normalize(images, (MEAN, STD))
    flipped = [not torch.allclose(out[i], plain[i], atol=1e-5) for i in range(16)]
    for i in range(16):
        torch.testing.assert_close(out[i], plain[i].flip(-1) if flipped[i] else plain[i], rtol=0, atol=1e-5)
    assert 0 < sum(flipped) < 16


def test_augment_always_grey():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = pretrain.augment(images, torch.Generator().manual_seed(0), dict(AUG, p_gray=1.0))
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("threshold,reference", [
    # the MMCR reference: RandomSolarize(0.5) on a PIL image
    (1 / 255, lambda im: v2.RandomSolarize(0.5, p=1.0)(im)),
    # the EMP-SSL reference: ImageOps.solarize's default threshold 128
    (128 / 255, lambda im: ImageOps.solarize(im)),
])
def test_solarize_matches_the_reference_on_pil_images(threshold, reference):
    images = natural_images(4)
    for img in images:
        expected = torch.from_numpy(np.array(reference(TF.to_pil_image(img)))).permute(2, 0, 1)
        ours = pretrain.solarize(img.float() / 255, threshold) * 255
        assert torch.equal(ours.round().byte(), expected)
    # the MMCR reference's "solarize" is a colour negative: every pixel but pure black is inverted
    assert (pretrain.solarize(images.float() / 255, 1 / 255) == 1 - images.float() / 255)[images > 0].all()


@pytest.mark.parametrize("sigma", [0.1, 0.4, 0.7, 1.0, 1.3, 1.6, 2.0])
def test_pil_blur_matches_pillow(sigma):
    """The EMP-SSL references blur PIL images with ImageFilter.GaussianBlur(radius=sigma)."""
    images = natural_images(16, seed=1)
    expected = torch.stack([
        torch.from_numpy(np.array(TF.to_pil_image(x).filter(ImageFilter.GaussianBlur(sigma)))).permute(2, 0, 1)
        for x in images]).float()
    ours = empssl.pil_gaussian_blur(images.float() / 255, torch.full((16,), sigma)) * 255
    per_image = (ours - expected).abs().mean((1, 2, 3))
    # Pillow rounds to uint8 after each of its 6 passes; we do not
    assert per_image.max() <= 2.0, per_image
    # much wider than the 3x3 kernel: that one would miss Pillow's result by far more
    if sigma >= 1.0:
        narrow = (pretrain.gaussian_blur(images.float() / 255, torch.full((16,), sigma)) * 255
                  - expected).abs().mean((1, 2, 3))
        assert narrow.mean() > 2 * per_image.mean()


@pytest.mark.parametrize("module", [pretrain, empssl])
def test_augment_probabilities(module):
    """4,096 views of one colourful image: the fractions of grey and of solarized views are the recipe's p."""
    n, aug = 4096, aug_of(module, norm=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    image = natural_images(1, seed=2).expand(n, -1, -1, -1)
    views = module.augment(image, torch.Generator().manual_seed(0), aug)
    grey = (views[:, 0] == views[:, 1]).flatten(1).all(1) & (views[:, 0] == views[:, 2]).flatten(1).all(1)
    # the same draws with a threshold no pixel reaches: the views that differ are exactly the solarized ones
    plain = module.augment(image, torch.Generator().manual_seed(0), dict(aug, solarize_threshold=256))
    solarized = (views != plain).flatten(1).any(1)
    for observed, p in ((grey.float().mean().item(), aug["p_gray"]),
                        (solarized.float().mean().item(), aug["p_solarize"])):
        # 4 standard errors
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n), (observed, p)


def test_reference_recipes():
    """The defaults that reproduce the reference implementations (see README, Fidelity)."""
    assert (pretrain.AUGMENT["p_gray"] == 0.1 and pretrain.AUGMENT["p_solarize"] == 0.2
            and pretrain.AUGMENT["blur"] is pretrain.gaussian_blur)
    assert pretrain.AUGMENT["solarize_threshold"] == 1 and pretrain.Config().grayscale_prob == 0.1
    assert empssl.AUGMENT["blur"] is empssl.pil_gaussian_blur and empssl.Config().blur == "pil"
    # AUGMENT may differ between the scripts (EMP-SSL's does), but fine-tuning uses the pretraining's (its own copy
    # of the blur function, which test_shared_definitions_are_identical checks is the same code)
    same = lambda a: {**a, "blur": a["blur"].__name__}
    assert (same(finetune.AUGMENT) == same(pretrain.AUGMENT) and finetune.Config().augment == "ssl"
            and finetune.Config().frozen_bn == "train")
    # CIFAR-10 normalised as the reference's Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    # after ToDtype(scale=True)
    img = natural_images(1)[0]
    reference = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))])
    torch.testing.assert_close(pretrain.normalize(img[None], pretrain.CIFAR_STATS["cifar10"])[0],
                               reference(TF.to_pil_image(img)))
    # --unscaled-inputs: the EMP-SSL reference's ToDtype without scale, then Normalize(0.5, 0.5)
    unscaled = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32), v2.Normalize((0.5,) * 3, (0.5,) * 3)])
    torch.testing.assert_close(pretrain.normalize(img[None], ((0.5 / 255,) * 3, (0.5 / 255,) * 3))[0],
                               unscaled(TF.to_pil_image(img)), rtol=1e-5, atol=1e-3)


def test_normalization_choices():
    """--normalize: CIFAR's constants by name (auto for --dataset cifar10 / cifar100, or forced for an ImageFolder copy
    of CIFAR), else the training images' own per-channel mean and std."""
    images = natural_images(20)
    pixels = images.double() / 255
    own = pretrain.normalization("auto", "path/to/imagefolder", images)
    np.testing.assert_allclose(own[0], pixels.mean((0, 2, 3)).numpy(), rtol=1e-9)
    np.testing.assert_allclose(own[1], pixels.std((0, 2, 3), unbiased=False).numpy(), rtol=1e-6)
    assert pretrain.normalization("dataset", "cifar10", images) == own
    assert pretrain.normalization("cifar10", "path/to/imagefolder", images) == pretrain.CIFAR_STATS["cifar10"]
    assert pretrain.normalization("auto", "cifar100", images) == pretrain.CIFAR_STATS["cifar100"]


def test_finetune_ssl_views_are_the_pretraining_augmentation():
    images = natural_images(6)
    ours = finetune.train_views(images, torch.Generator().manual_seed(3), aug_of(finetune), "ssl")
    assert torch.equal(ours, pretrain.augment(images, torch.Generator().manual_seed(3), aug_of(pretrain)))


def test_finetune_crop_flip_copies_pixels():
    """crop-flip = a 4-px zero-padded random crop + flip: every view is a shifted (mirrored) copy of the image."""
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    views = finetune.train_views(images, gen, aug_of(finetune, 12, ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))), "crop-flip")
    views = views * 255
    padded = torch.nn.functional.pad(images.float(), (4, 4, 4, 4))
    for v, p in zip(views, padded):
        crops = [p[:, t:t + 12, s:s + 12] for t in range(9) for s in range(9)]
        assert any(torch.allclose(v, c, atol=1e-3) or torch.allclose(v, c.flip(-1), atol=1e-3) for c in crops)

# ----------------------------------------------------------------------------- losses and optimizer


def numpy_mmcr_loss(z, lmbda):
    z = z.astype(np.float64)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    centroids = z.mean(1)
    loss = -np.linalg.svd(centroids, compute_uv=False).sum()
    assert np.isclose(loss, -np.linalg.norm(centroids, "nuc"))
    return loss + lmbda * np.mean([np.linalg.norm(zb, "nuc") for zb in z])


# batch < dim, batch > dim, 2 views
@pytest.mark.parametrize("shape", [(8, 4, 16), (12, 3, 5), (5, 2, 7)])
@pytest.mark.parametrize("lmbda", [0.0, 0.7])
def test_mmcr_loss_matches_numpy(shape, lmbda):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 3 + 0.5
    z.requires_grad_(True)
    loss = mmcr_loss(z, lmbda)
    assert loss.dtype == torch.float32 and loss.shape == ()
    np.testing.assert_allclose(loss.item(), numpy_mmcr_loss(z.detach().numpy(), lmbda), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # the gradient against the same loss written independently in float64 autograd
    z64 = z.detach().double().requires_grad_(True)
    zn = z64 / z64.norm(dim=-1, keepdim=True)
    ref = -torch.linalg.matrix_norm(zn.mean(1), ord="nuc") + lmbda * torch.linalg.matrix_norm(zn, ord="nuc").mean()
    ref.backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)


def test_mmcr_loss_ignores_scale_of_embeddings():
    z = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(1))
    scale = torch.rand(6, 4, 1, generator=torch.Generator().manual_seed(2)) * 10 + 0.1
    torch.testing.assert_close(mmcr_loss(z * scale, 0.3), mmcr_loss(z, 0.3))


def numpy_tcr(z, eps):
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    m, p, d = z.shape
    rates = [0.5 * np.linalg.slogdet(np.eye(d) + d / (m * eps) * z[:, i].T @ z[:, i])[1] for i in range(p)]
    return float(np.mean(rates))


# m < d and m > d
@pytest.mark.parametrize("shape", [(6, 3, 16), (20, 2, 5)])
def test_total_coding_rate_matches_numpy(shape):
    z = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = empssl.total_coding_rate(z.float().requires_grad_(), eps=0.2)
    assert ours.item() == pytest.approx(numpy_tcr(z.numpy(), 0.2), rel=1e-5)
    ours.backward()


def test_patch_similarity_matches_numpy():
    z = torch.randn(7, 5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    zn = z.numpy() / np.linalg.norm(z.numpy(), axis=-1, keepdims=True)
    c = zn.mean(1, keepdims=True)
    expected = ((zn * c).sum(-1) / np.linalg.norm(c, axis=-1)).mean()
    assert empssl.patch_similarity(z.float() * 3).item() == pytest.approx(expected, rel=1e-5)


def test_bag_of_features_of_no_images_is_empty():
    """A rank with no test images (fewer images than ranks) embeds none, and gathers the others' rows."""
    model = empssl.EMPSSLModel(8, 32, 16)
    images = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    out = empssl.bag_of_features(model, images, torch.Generator(), aug_of(empssl), 2, "test", progress=False)
    assert out.shape == (0, 32) and out.dtype == torch.float32


def test_empssl_loss_path_is_float32_under_bf16_autocast():
    """Under bf16 autocast the projector and the loss still compute in float32 (the reference's fp16 keeps 11 bits of
    mantissa where bf16 keeps 8): the gradients of the projector's weights equal float64's for the same embedding h."""
    torch.manual_seed(0)
    model, n, patches = empssl.EMPSSLModel(16, 64, 32), 8, 4
    views = torch.randn(n * patches, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, z = model(views)
    assert h.dtype == torch.bfloat16 and z.dtype == torch.float32
    z = z.view(n, patches, -1)
    (-empssl.total_coding_rate(z) - 200 * empssl.patch_similarity(z)).backward()
    # the same projector in float64 on the same h, and the loss written out in float64
    projector = copy.deepcopy(model.projector).double()
    z64 = torch.nn.functional.normalize(projector(h.detach().double()).view(n, patches, -1), dim=-1)
    rows = z64.transpose(0, 1)
    tcr = 0.5 * torch.logdet(torch.eye(n, dtype=torch.float64) + 32 / (n * 0.2) * rows @ rows.transpose(1, 2)).mean()
    similarity = torch.nn.functional.cosine_similarity(z64, z64.mean(1, keepdim=True), dim=-1).mean()
    (-tcr - 200 * similarity).backward()
    for (name, ours), theirs in zip(model.projector.named_parameters(), projector.parameters()):
        # BatchNorm follows the first layer, so its bias gets a zero gradient (up to rounding)
        if name == "0.bias":
            continue
        error = (ours.grad.double() - theirs.grad).norm() / theirs.grad.norm()
        # bf16 projector: about 4e-2
        assert error < 1e-4, (name, error.item())


def test_lars_step_matches_hand_computation():
    lr, wd, mom, eta = 0.3, 1e-4, 0.9, 0.005
    # ||w|| = 5
    big = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    # huge weight: trust ratio > lr, clipped to lr
    small = torch.nn.Parameter(torch.tensor([[1e4, 0.0], [0.0, 0.0]]))
    # ndim 1: no adaptation, no weight decay
    bias = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    # ||g|| = 2
    big.grad = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    small.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    bias.grad = torch.tensor([0.5, 0.5])
    before = [p.detach().clone() for p in (big, small, bias)]
    empssl.LARS([big, small, bias], lr=lr, weight_decay=wd, momentum=mom, nesterov=True, trust_coefficient=eta).step()
    # < 1: no clipping
    ratio = eta * 5 / (2 + wd * 5) / lr
    d_big = (torch.tensor([[0.0, 2.0], [0.0, 0.0]]) + wd * before[0]) * ratio
    # ratio eta * 1e4 / (1 + 1) / lr > 1: clipped to 1
    d_small = torch.tensor([[1.0, 0.0], [0.0, 0.0]]) + wd * before[1]
    d_bias = torch.tensor([0.5, 0.5])
    # first nesterov step: d + mom * d
    for p, b, d in zip((big, small, bias), before, (d_big, d_small, d_bias)):
        assert torch.allclose(p.detach(), b - lr * (1 + mom) * d, atol=1e-7)


# ----------------------------------------------------------------------------- kNN


def brute_force_knn(train, train_labels, test, k, temperature, num_classes):
    train = train.double() / train.double().norm(dim=1, keepdim=True)
    test = test.double() / test.double().norm(dim=1, keepdim=True)
    k = min(k, len(train))
    scores = torch.zeros(len(test), num_classes, dtype=torch.float64)
    for i in range(len(test)):
        sims = [(float(test[i] @ train[j]), int(train_labels[j])) for j in range(len(train))]
        for sim, label in sorted(sims, reverse=True)[:k]:
            scores[i, label] += math.exp(sim / temperature)
    return scores


def brute_force_accuracy(scores, test_labels):
    """(top1, lowest top5, highest top5): classes tied with the true one (e.g. no votes at all) may go either way."""
    top1 = top5_lo = top5_hi = 0
    for s, y in zip(scores.tolist(), test_labels.tolist()):
        top1 += max(range(len(s)), key=lambda c: s[c]) == y
        above, tied = sum(v > s[y] for v in s), sum(v == s[y] for v in s) - 1
        top5_lo += above + tied < 5
        top5_hi += above < 5
    return 100 * top1 / len(scores), 100 * top5_lo / len(scores), 100 * top5_hi / len(scores)


# 23 test samples: chunks smaller than, not dividing, equal to, larger than
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 23, 1024])
@pytest.mark.parametrize("num_classes,k", [(7, 5), (3, 10), (7, 40)])
def test_knn_matches_brute_force(chunk_size, num_classes, k):
    g = torch.Generator().manual_seed(num_classes)
    train, test = torch.randn(40, 16, generator=g) * 5, torch.randn(23, 16, generator=g)
    train_labels, test_labels = (torch.randint(0, num_classes, (40,), generator=g),
                                 torch.randint(0, num_classes, (23,), generator=g))
    # some exact matches, so accuracy is not near zero
    test[:num_classes] = train[:num_classes] * 2
    test_labels[:num_classes] = train_labels[:num_classes]
    expected = brute_force_knn(train, train_labels, test, k, 0.5, num_classes)
    scores = knn_scores(train, train_labels, test, k, 0.5, num_classes, chunk_size=chunk_size)
    assert scores.shape == (23, num_classes)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    top1, top5 = knn_accuracy(train, train_labels, test, test_labels, k, 0.5, num_classes, chunk_size=chunk_size)
    e1, e5_lo, e5_hi = brute_force_accuracy(expected, test_labels)
    assert top1 == pytest.approx(e1, abs=1e-4) and e5_lo - 1e-4 <= top5 <= e5_hi + 1e-4
    assert top1 > 0 and (top5 < 100 or num_classes <= 5)
    # every class gets votes: no ties, so top-5 is exact
    if k >= 40:
        assert e5_lo == e5_hi


def test_knn_k_larger_than_bank_is_clamped(monkeypatch):
    monkeypatch.setattr(knn, "_warned", set())
    g = torch.Generator().manual_seed(0)
    train, test, labels = (torch.randn(6, 8, generator=g), torch.randn(9, 8, generator=g),
                           torch.tensor([0, 1, 2, 0, 1, 2]))
    # names the asked k, the bank size, the k used
    with pytest.warns(UserWarning, match=r"k=50\b.*\b6\b.*k=6\b"):
        scores = knn_scores(train, labels, test, 50, 0.1, 3, chunk_size=4)
    torch.testing.assert_close(scores, knn_scores(train, labels, test, 6, 0.1, 3))
    torch.testing.assert_close(scores.double(), brute_force_knn(train, labels, test, 50, 0.1, 3), rtol=1e-5, atol=1e-5)
    # once per (k, bank size), not on every evaluation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        knn_scores(train, labels, test, 50, 0.1, 3)


# ----------------------------------------------------------------------------- schedule


def test_lr_schedule():
    base, total, warmup = 2.0, 110, 10
    # first warm-up step
    assert lr_at(0, total, warmup, base) == pytest.approx(base / warmup)
    assert lr_at(4, total, warmup, base) == pytest.approx(base * 5 / warmup)
    # end of warm-up
    assert lr_at(warmup - 1, total, warmup, base) == pytest.approx(base)
    # start of the cosine
    assert lr_at(warmup, total, warmup, base) == pytest.approx(base)
    # middle of the cosine
    assert lr_at(warmup + (total - warmup) // 2, total, warmup, base) == pytest.approx(base / 2)
    # last step: small, > 0
    assert lr_at(total - 1, total, warmup, base) == pytest.approx(base * math.sin(math.pi / 200) ** 2)
    lrs = [lr_at(s, total, warmup, base) for s in range(total)]
    assert (all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup]))
            and all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:])))
    assert min(lrs) > 0 and max(lrs) == pytest.approx(base)
    # no warm-up: starts at the peak; a single step does not divide by zero
    assert lr_at(0, 8, 0, base) == pytest.approx(base) and lr_at(0, 1, 0, base) == pytest.approx(base)


# ----------------------------------------------------------------------------- data loading


def test_load_image_folder(image_folder, tmp_path, monkeypatch, capsys):
    root = os.path.join(image_folder, "train")
    images, labels, classes = pretrain.load_image_folder(root, 32, str(tmp_path / "cache"))
    assert classes == list(CLASSES)
    # notes.txt / README.md skipped
    assert images.shape == (3 * TRAIN_PER_CLASS, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [c for c in range(3) for _ in range(TRAIN_PER_CLASS)]
    names = sorted(n for n in os.listdir(os.path.join(root, CLASSES[0])) if not n.endswith(".txt"))
    # grey files decode to three equal channels, colour files do not
    for i, name in enumerate(names):
        assert torch.equal(images[i, 0], images[i, 1]) == ("_gray" in name), name
    # class 0 is red
    assert images[labels == 0, 0].float().mean() > images[labels == 0, 2].float().mean() + 50
    cached = os.listdir(tmp_path / "cache")
    assert len(cached) == 1 and cached[0].startswith("imagefolder-") and cached[0].endswith(".pt")
    capsys.readouterr()
    # the second call reads the cache: no image is opened, nothing is said
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded again despite a good cache"))
    again = pretrain.load_image_folder(root, 32, str(tmp_path / "cache"))
    assert torch.equal(again[0], images) and torch.equal(again[1], labels) and again[2] == classes
    assert error_lines(capsys.readouterr().err) == []


@pytest.mark.parametrize("damage", ["truncated", "another file"])
def test_a_broken_image_folder_cache_heals_itself(image_folder, tmp_path, capsys, damage):
    """A cache that is truncated (a kill while it was written elsewhere, a full disk) or holds something else is
    reported in one warning line, decoded again and rewritten: it never breaks a run."""
    root, cache_dir = os.path.join(image_folder, "train"), tmp_path / "cache"
    images, labels, classes = pretrain.load_image_folder(root, 32, str(cache_dir))
    (cache,) = cache_dir.glob("imagefolder-*.pt")
    if damage == "truncated":
        data = cache.read_bytes()
        cache.write_bytes(data[:len(data) // 2])
    else:
        # a valid torch file, not of decoded images
        torch.save({"embeddings": images}, cache)
    capsys.readouterr()
    again = pretrain.load_image_folder(root, 32, str(cache_dir))
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("warning:") and str(cache) in lines[0], lines
    assert torch.equal(again[0], images) and torch.equal(again[1], labels) and again[2] == classes
    # rewritten in place, nothing left over
    assert [p.name for p in cache_dir.iterdir()] == [cache.name]
    healed = load(cache)
    assert (torch.equal(healed["images"], images) and torch.equal(healed["labels"], labels)
            and healed["classes"] == classes)

# ----------------------------------------------------------------------------- model


def torchvision_cifar_resnet18():
    """torchvision's ResNet18 with the CIFAR stem (3x3 stride-1, no max-pool) and no fc: what the references train."""
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool, net.fc = torch.nn.Identity(), torch.nn.Identity()
    return net


def test_resnet18_is_torchvisions():
    """Our ResNet18 at width 64 has torchvision's parameter names and shapes, computes the same function with the
    same weights (train and eval mode), and starts from the same initialisation (Kaiming normal, fan out)."""
    torch.manual_seed(0)
    ours, theirs = pretrain.ResNet18(64), torchvision_cifar_resnet18()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    for name, p in ours.named_parameters():
        q = dict(theirs.named_parameters())[name]
        if p.ndim == 4:
            # 1.5% is about 5 standard errors of the smallest layer's std estimate
            assert abs(p.std().item() / q.std().item() - 1) < 0.015 * max(1.0, (1728 / p.numel()) ** 0.5), name
        else:
            assert torch.equal(p, q), name
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 3, 32, 32)
    for mode in (True, False):
        torch.testing.assert_close(ours.train(mode)(x), theirs.train(mode)(x), rtol=1e-5, atol=1e-5)
    assert ours.feature_dim == 512


def test_width_and_blocks_shape_the_backbone_and_the_architecture_says_so():
    model = pretrain.MMCRModel(96, 32)
    assert model.backbone(torch.randn(2, 3, 32, 32)).shape == (2, 768)
    assert model.architecture == {"backbone": "ResNet18", "file": MMCR, "width": 96, "blocks": [2, 2, 2, 2],
                                  "feature_dim": 768, "projection_dim": 32}
    assert model.projector[0].in_features == 768
    assert empssl.EMPSSLModel(80, 64, 16).pre_feature[0].in_features == 640
    assert finetune.Classifier(finetune.ResNet18(96), 10, frozen=True).fc.in_features == 768
    # blocks per stage: a ResNet18 of (1, 1, 1, 1) has half the blocks, and mmcr_finetune.py builds it from the record
    small = pretrain.ResNet18(16, (1, 1, 1, 1))
    assert [len(getattr(small, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    rebuilt = finetune.build_backbone({"backbone": "ResNet18", "file": "x.py", "width": 16, "blocks": [1, 1, 1, 1]},
                                      finetune.Config())
    assert rebuilt.state_dict().keys() == small.state_dict().keys()


@pytest.mark.parametrize("frozen_bn", ["train", "eval"])
def test_frozen_backbone_batchnorm(frozen_bn):
    """--frozen-bn train: the frozen backbone re-estimates its BatchNorm statistics while the probe trains (the
    reference); eval: they stay those of pretraining. The weights never change, and the test pass is in eval mode."""
    model = finetune.Classifier(finetune.ResNet18(16), 10, frozen=True, frozen_bn=frozen_bn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(8, 3, 32, 32) + 3)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.startswith("backbone.") and ("running_" in k or "num_batches" in k) for k in moved)
    assert bool(moved) == (frozen_bn == "train")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.eval()
    assert not model.backbone.training



# ----------------------------------------------------------------------------- flags, run folders, files


def test_help_and_the_printed_config_write_a_default_alike(capsys):
    """--help shows each default once, as config.json and the printed config write it (1, 0.001, 1e-06, "auto"), and
    an empty default not at all: the help itself says what it means."""
    for module in MODULES.values():
        with pytest.raises(SystemExit):
            module.parse_config(["--help"])
        options = {o.split()[0].rstrip(","): " ".join(o.split())
                   for o in re.split(r"\n  (?=--)", capsys.readouterr().out)[1:]}
        for f in dataclasses.fields(module.Config):
            shown = options[f"--{f.name.replace('_', '-')}"]
            assert shown.count("default") <= 1 and "(default: '')" not in shown and '(default: "")' not in shown, shown
            if f.default != "":
                assert f"(default: {json.dumps(f.default)})" in shown, shown
            else:
                # an empty default: the help says what it means
                assert "default" in shown or "required" in shown, shown
    cfg, _ = pretrain.parse_config([])
    assert '"solarize_threshold": 1,' in json.dumps(dataclasses.asdict(cfg))
    assert pretrain.Config().solarize_threshold == 1


def test_parse_config_knows_which_flags_were_given():
    cfg, given = pretrain.parse_config(["--batch-size", "8", "--no-compile", "--dataset", "x"])
    assert cfg.batch_size == 8 and cfg.dataset == "x" and cfg.compile is False and cfg.num_views == 16
    assert given == {"batch_size", "compile", "dataset"}


def with_checksum(ckpt):
    """A checkpoint dict as the scripts save one: with the checksum of what it holds."""
    return dict(ckpt, checksum=pretrain.checksum(ckpt))


def test_load_resume_takes_the_checkpoints_flags_and_refuses_other_values(tmp_path):
    """A resume continues the run's recipe: flags left out come from the checkpoint, the flags of RESUME_MAY_CHANGE
    may differ (and are recorded), any other one that differs is one error listing all of them."""
    saved = dataclasses.asdict(pretrain.Config(batch_size=8, num_views=4, max_epochs=2, dataset="/data/x"))
    torch.save(with_checksum({"script": "mmcr_pretrain", "config": saved, "step": 4}), tmp_path / "last.pt")
    cfg, given = pretrain.parse_config(["--resume", "auto", "--output-dir", str(tmp_path), "--max-epochs", "3",
                                        "--batch-size", "8"])
    cfg, ckpt, changed = pretrain.load_resume(cfg, given)
    assert (cfg.num_views, cfg.dataset, cfg.max_epochs, cfg.output_dir) == (4, "/data/x", 3, str(tmp_path))
    assert changed == {"max_epochs": [2, 3]} and ckpt["step"] == 4 and ckpt["file"] == str(tmp_path / "last.pt")
    cfg, given = pretrain.parse_config(["--resume", "auto", "--output-dir", str(tmp_path), "--batch-size", "16",
                                        "--num-views", "8", "--max-epochs", "3"])
    with pytest.raises(pretrain.UserError, match=r"--batch-size 16 \(the run's: 8\), --num-views 8 \(the run's: 4\)"):
        pretrain.load_resume(cfg, given)
    # no checkpoint in the folder: a new run
    cfg, given = pretrain.parse_config(["--resume", "auto", "--output-dir", str(tmp_path / "new")])
    assert pretrain.load_resume(cfg, given) == (cfg, None, {})


def test_a_checkpoint_with_a_flipped_bit_is_corrupt(tmp_path):
    """Every checkpoint carries the sha1 of what it holds: one flipped bit in the tensor data (which torch.load does
    not notice) is a UserError that says 'corrupt', and so is a checkpoint without a checksum."""
    ckpt = {"script": "mmcr_pretrain", "step": 3, "model": pretrain.MMCRModel(16, 8).state_dict()}
    path = tmp_path / "last.pt"
    pretrain.save_checkpoint(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(master=True), ckpt)
    assert pretrain.load_checkpoint(str(path), "mmcr_pretrain")["step"] == 3
    data = bytearray(path.read_bytes())
    # most of the file is tensor data
    data[int(len(data) * 0.6)] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(pretrain.UserError, match="last.pt is corrupt"):
        pretrain.load_checkpoint(str(path), "mmcr_pretrain")
    torch.save(ckpt, path)
    with pytest.raises(pretrain.UserError, match="not a checkpoint written by these scripts"):
        pretrain.load_checkpoint(str(path), "mmcr_pretrain")


class FakeBar:
    """What log_step reads of a tqdm bar (the steps done, from initial, and the seconds elapsed) and writes (the
    postfix)."""

    def __init__(self, rate):
        self.format_dict, self.postfix = {"n": 5, "initial": 1, "elapsed": 4 / rate if rate else 0.0}, None

    def set_postfix_str(self, text):
        self.postfix = text


@pytest.mark.parametrize("rate,log_every,interval", [(None, 50, 50), (0.25, 1000, 1), (10, 1000, 20), (10, 15, 15),
                                                     (100, 50, 50)])
def test_log_steps_come_every_two_seconds_at_most(rate, log_every, interval, tmp_path, monkeypatch):
    """The next log step: LOG_SECONDS on at the bar's pace, at most --log-every steps; the bar shows the epoch's
    running mean and says so. A stop request, a timed save and divergence are decided there."""
    cfg = SimpleNamespace(log_every=log_every, checkpoint_minutes=1.0, output_dir=str(tmp_path))
    ctx = SimpleNamespace(master=True, ddp=False, device=torch.device("cpu"))
    model, bar = torch.nn.Linear(3, 2), FakeBar(rate)
    monkeypatch.setattr(pretrain, "SIGNALS", [])
    assert pretrain.log_step(bar, cfg, ctx, model, 10, {"loss": -2.5, "lr": 0.001}, time.time()) == (
        False, False, 10 + interval)
    assert bar.postfix == "mean loss -2.5 lr 0.001"
    # a minute after the last save: a timed save; a Ctrl-C: a stop
    monkeypatch.setattr(pretrain, "SIGNALS", [signal.SIGINT])
    assert pretrain.log_step(bar, cfg, ctx, model, 10, {"loss": 0.0}, time.time() - 61)[:2] == (True, True)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(pretrain.Diverged, match="diverged at step 10.*nothing was saved"):
        pretrain.log_step(bar, cfg, ctx, model, 10, {"loss": math.nan}, time.time())


def test_metrics_lines_cut_off_by_a_crash_are_left_out_on_resume(tmp_path, capsys):
    """A resume keeps the whole lines of metrics.jsonl up to its checkpoint's step (so no epoch is listed twice and a
    line cut off by a crash or a full disk is gone) and appends a record of itself to config.json; an append that
    fails names the file."""
    (tmp_path / "config.json").write_text(json.dumps({"run_id": "r", "seed": 1}))
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "step": 4}\n{"epoch": 2, "step": 8}\n{"epoch": 3, "st')
    cfg = pretrain.Config(output_dir=str(tmp_path), max_epochs=3)
    ctx = SimpleNamespace(world=1, device="cpu", precision="fp32", master=True)
    pretrain.write_config(cfg, ctx, {"file": "x/last.pt", "step": 4}, "r", {"max_epochs": [2, 3]})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1, "step": 4}\n'
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["seed"] == 1 and [r["step"] for r in config["resumes"]] == [4]
    pretrain.write_metrics(cfg, ctx, {"epoch": 2, "step": 8, "loss": -1.5})
    assert "epoch 2/3 step 8 mean loss -1.5" in capsys.readouterr().out
    with pytest.raises(pretrain.UserError, match=r"cannot write .*missing/metrics\.jsonl \(No such file"):
        pretrain.write_metrics(dataclasses.replace(cfg, output_dir=str(tmp_path / "missing")), ctx, {"epoch": 3})


def test_an_unwritable_cache_only_warns(image_folder, tmp_path, capsys):
    """The decoded-image cache is optional: when --data-dir cannot take it, one warning and the images anyway."""
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    cache = str(tmp_path / "cache")
    images, labels, classes = pretrain.load_image_folder(os.path.join(image_folder, "test"), 32, cache)
    assert images.shape == (3 * TEST_PER_CLASS, 3, 32, 32) and classes == list(CLASSES)
    warned = [line for line in error_lines(capsys.readouterr().err) if line.startswith("warning:")]
    assert len(warned) == 1 and "cache" in warned[0]


def test_atomic_open_keeps_the_previous_file_when_a_write_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    with pretrain.atomic_open(path) as f:
        torch.save({"step": 1, "w": torch.arange(10.0)}, f)
    # no temp file left behind
    assert os.listdir(tmp_path) == ["last.pt"]
    before = open(path, "rb").read()
    real_save, targets = torch.save, []

    # writes half a file, then the disk is full
    def dying_save(obj, f, *args, **kwargs):
        targets.append(f.name)
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    # one line: which file, the reason, what is kept
    said = r"cannot write .*last\.pt \(No space left.*previous last\.pt is unchanged"
    with pytest.raises(pretrain.UserError, match=said):
        with pretrain.atomic_open(path) as f:
            torch.save({"step": 2, "w": torch.zeros(1000)}, f)
    monkeypatch.undo()
    # written elsewhere first, and that half-written file is gone
    assert targets and os.path.abspath(targets[0]) != os.path.abspath(path)
    assert os.listdir(tmp_path) == ["last.pt"] and open(path, "rb").read() == before
    # a second Ctrl-C during a save (a Stopped, which no `except Exception` takes): no .tmp stays either
    with pytest.raises(pretrain.Stopped):
        with pretrain.atomic_open(path) as f:
            f.write(b"half a checkpoint")
            raise pretrain.Stopped(signal.SIGINT, "interrupted: quit at once")
    assert os.listdir(tmp_path) == ["last.pt"] and open(path, "rb").read() == before


# ----------------------------------------------------------------------------- shared code

# top-level definitions that each script has its own version of, and those that one script has its own version of
MAY_DIFFER = {"Config", "main", "check_config", "evaluate", "AUGMENT", "RESUME_MAY_CHANGE"}
# empssl_linear.py runs one process: its versions have no DDP in them
OWN_VERSION = {(name, "empssl_linear.py") for name in ("setup", "claim_output_dir", "agree", "stopped", "cli")}
MAIN_BLOCK = "if __name__ == '__main__'"


def top_level_definitions(path):
    """{name: [source text]} of a script's top-level def and class statements (with their decorators), assignments
    to a single name, and its `if __name__ == '__main__'` block. Comments above a definition are not part of it."""
    with open(path) as f:
        source = f.read()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        elif isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            name = MAIN_BLOCK
        else:
            continue
        decorators = ["@" + ast.get_source_segment(source, d) + "\n" for d in getattr(node, "decorator_list", [])]
        found.setdefault(name, []).append("".join(decorators) + ast.get_source_segment(source, node))
    return found


def test_shared_definitions_are_identical():
    """The scripts are copies by design: every top-level definition found in two or more of them must be the same
    text everywhere (an edit to a shared block goes into every copy), except those in MAY_DIFFER."""
    definitions = {os.path.basename(s): top_level_definitions(s) for s in SCRIPTS}
    shared = {}
    for script, defs in definitions.items():
        for name, text in defs.items():
            shared.setdefault(name, {})[script] = text
    shared = {name: texts for name, texts in shared.items() if len(texts) > 1}
    # the test sees the shared blocks (a parser that found nothing would pass vacuously)
    assert {"load_image_folder", "augment", "load_dataset", "claim_output_dir", "log_step", "save_checkpoint",
            "classify", "ResNet18", "Gather", MAIN_BLOCK} <= set(shared)
    assert MAY_DIFFER <= set(shared), (
        f"no longer defined in two scripts: {sorted(MAY_DIFFER - set(shared))}: drop from MAY_DIFFER")
    problems = []
    for name, texts in sorted(shared.items()):
        if name in MAY_DIFFER:
            continue
        versions = {}
        for script, text in texts.items():
            if (name, script) not in OWN_VERSION:
                versions.setdefault("\n\n".join(text), []).append(script)
        if len(versions) > 1:
            (a, a_scripts), (b, b_scripts) = list(versions.items())[:2]
            diff = difflib.unified_diff(a.splitlines(), b.splitlines(), a_scripts[0], b_scripts[0], lineterm="", n=1)
            problems.append(f"{name} differs between " + " / ".join(", ".join(s) for s in versions.values()) + ":\n"
                            + "\n".join(list(diff)[:30]))
    if problems:
        pytest.fail("shared definitions that are not the same code:\n\n" + "\n\n".join(problems), pytrace=False)


# ----------------------------------------------------------------------------- DDP
# In-process tests of the collectives: every DDP_JOBS entry runs once in one 2-process gloo group (one spawn, so
# the imports are paid once), and each test compares its entry with the same computation in one process.

DDP_WORLD = 2
LMBDAS = (0.0, 0.4)


def mmcr_ddp_input():
    # global batch 10 > dim 6
    return torch.randn(10, 4, 6, generator=torch.Generator().manual_seed(0))


def tcr_ddp_input():
    return torch.randn(12, 3, 8, generator=torch.Generator().manual_seed(3))


def ddp_mmcr_loss(rank, world):
    z_all = mmcr_ddp_input()
    per, results = len(z_all) // world, {}
    for lmbda in LMBDAS:
        z = z_all[rank * per:(rank + 1) * per].clone().requires_grad_(True)
        loss = mmcr_loss(z, lmbda)
        loss.backward()
        results[lmbda] = (loss.detach(), z.grad)
    return results


def ddp_tcr(rank, world):
    local = tcr_ddp_input().chunk(world)[rank].clone().requires_grad_()
    tcr = empssl.total_coding_rate(local)
    tcr.backward()
    return tcr.detach(), local.grad


def ddp_gather_rows(rank, world, n):
    # this rank's share
    rows = torch.arange(n, dtype=torch.float32).view(-1, 1).repeat(1, 3)[rank::world]
    return empssl.gather_rows(rows, n)


DDP_JOBS = {"mmcr_loss": (ddp_mmcr_loss, ()), "tcr": (ddp_tcr, ()),
            # 7: uneven shares are padded, then cut
            "gather_rows 7": (ddp_gather_rows, (7,)), "gather_rows 8": (ddp_gather_rows, (8,)),
            # 1: rank 1 has no rows
            "gather_rows 1": (ddp_gather_rows, (1,))}


def _ddp_worker(rank, world, init_file, out_dir):
    """One rank: join the gloo group, run every DDP_JOBS entry, save {name: result} to out_dir/rank<rank>.pt."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.save({name: fn(rank, world, *args) for name, (fn, args) in DDP_JOBS.items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def ddp_results(tmp_path_factory):
    """[{job name: result} of rank 0, ... of rank 1]."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(DDP_WORLD, str(tmp / "init"), str(tmp)), nprocs=DDP_WORLD, join=True)
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(DDP_WORLD)]


def test_ddp_mmcr_loss_equals_single_process_loss(ddp_results):
    z_all = mmcr_ddp_input()
    per = len(z_all) // DDP_WORLD
    for lmbda in LMBDAS:
        z = z_all.clone().requires_grad_(True)
        loss = mmcr_loss(z, lmbda)
        loss.backward()
        for rank in range(DDP_WORLD):
            rank_loss, rank_grad = ddp_results[rank]["mmcr_loss"][lmbda]
            torch.testing.assert_close(rank_loss, loss.detach(), rtol=1e-5, atol=1e-6)
            # every rank computes the global loss: the gather's backward sums world_size equal gradients
            torch.testing.assert_close(rank_grad / DDP_WORLD, z.grad[rank * per:(rank + 1) * per], rtol=1e-4, atol=1e-6)


def test_ddp_tcr_equals_single_process_tcr(ddp_results):
    single = tcr_ddp_input().requires_grad_()
    tcr = empssl.total_coding_rate(single)
    tcr.backward()
    for rank in range(DDP_WORLD):
        rank_tcr, rank_grad = ddp_results[rank]["tcr"]
        assert rank_tcr.item() == pytest.approx(tcr.item(), rel=1e-5)
        assert torch.allclose(rank_grad / DDP_WORLD, single.grad.chunk(DDP_WORLD)[rank], atol=1e-5)


@pytest.mark.parametrize("n", [1, 7, 8])
def test_gather_rows_puts_every_row_back_in_order(ddp_results, n):
    for rank in range(DDP_WORLD):
        assert torch.equal(ddp_results[rank][f"gather_rows {n}"][:, 0], torch.arange(n, dtype=torch.float32))


# ============================================================================= end to end (marked e2e)
# The scripts' command lines: as subprocesses, or in this process through cli() where a run ends before training.


def run_script(script, args, cwd, launcher=(), timeout=300, **popen):
    """Run a script to its end: python [launcher...] script args (launcher: e.g. torch.distributed.run's flags)."""
    return subprocess.run([sys.executable, *launcher, script, *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout, **popen)


def run_cli(script, args, capsys):
    """The script's command line in this process, through its cli(): exit code, stdout and stderr, as run_script."""
    capsys.readouterr()
    code = MODULES[script].cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_ok(proc):
    """The process succeeded: exit code 0 and no traceback."""
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def assert_one_error_line(proc, script, *phrases, code=2):
    """The scripts' contract for bad input (code 2) and divergence (code 3): that exit code, no traceback, and
    exactly one stderr line '<script>.py: error: ...' that contains every phrase. Returns the line."""
    lines = [line for line in error_lines(proc.stderr) if not line.startswith(("warning:", "note:"))]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    glued = [line for line in re.split(r"[\r\n]+", proc.stderr) if "%|" in line and ": error: " in line]
    assert not glued, f"the error is printed on a progress bar's line, not on a line of its own: {glued[0]!r}"
    assert len(lines) == 1 and lines[0].startswith(f"{os.path.basename(script)}: error: "), repr(proc.stderr[-2000:])
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def epoch_lines(out_dir):
    """The lines of metrics.jsonl of training epochs (the finetune's and linear probe's epoch 0 is the kNN before)."""
    try:
        return len([m for m in read_metrics(out_dir) if m["epoch"] > 0])
    except FileNotFoundError:
        return 0


def file_hashes(folder):
    """{relative path: sha256} of every file under folder."""
    hashes = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def assert_same_weights(final, reference, optimizer_keys=()):
    """Bit-identical model tensors and, for each name in optimizer_keys, optimizer state tensors."""
    assert final["model"].keys() == reference["model"].keys()
    for name, value in reference["model"].items():
        assert torch.equal(final["model"][name], value), name
    states, ref_states = final["optimizer"]["state"], reference["optimizer"]["state"]
    assert states.keys() == ref_states.keys()
    for key in optimizer_keys:
        for i in ref_states:
            assert torch.equal(states[i][key], ref_states[i][key]), (i, key)


def wait_for(predicate, proc, log=None, timeout=300):
    """Poll predicate() until it holds; fail if proc exits first (showing the end of the log file) or on timeout."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            tail = open(log).read()[-3000:] if log else ""
            raise AssertionError(f"exited early with {proc.returncode}: {tail}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def interrupt(script, args, cwd, when, sig=signal.SIGTERM, saved=True):
    """Start `script args`, send sig once when(log text) holds, wait for the end. Checks the stop: SIGINT / SIGTERM exit
    with 128 + signal and one stderr line, naming last.pt and --resume auto if saved, else that nothing was saved;
    SIGKILL really killed it. Returns its stderr."""
    log = os.path.join(cwd, f"interrupted-{int(sig)}.log")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, script, *map(str, args)], cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=f, text=True)
        try:
            wait_for(lambda: when(open(log).read()), proc, log)
            proc.send_signal(sig)
            proc.wait(timeout=300)
        finally:
            proc.kill()
            proc.wait()
    stderr = open(log).read()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    if sig == signal.SIGKILL:
        # killed, not finished
        assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
        return stderr
    assert proc.returncode == 128 + sig, stderr[-3000:]
    lines = [line for line in error_lines(stderr) if not line.startswith("warning:")]
    assert len(lines) == 1, lines
    if saved:
        assert lines[0].startswith("interrupted: saved") and "last.pt" in lines[0] and "--resume auto" in lines[0]
    else:
        assert lines[0].startswith("interrupted before the first save"), lines
    return stderr


def interrupt_and_resume(script, args, out, cwd, when, sig=signal.SIGTERM):
    """Run `script args --output-dir out --resume auto`, interrupt it with sig once when(its stderr) holds, then run the
    same command again to its end. Returns (the last.pt the interrupted run left, the resumed run's
    CompletedProcess)."""
    args = [*args, "--output-dir", out, "--resume", "auto"]
    interrupt(script, args, cwd, when, sig)
    saved = load(os.path.join(out, "last.pt"))
    # metrics.jsonl has a line for each epoch that ended before the saved step, and no more
    steps_per_epoch = json.load(open(os.path.join(out, "config.json")))["steps_per_epoch"]
    assert epoch_lines(out) == saved["step"] // steps_per_epoch
    resumed = assert_ok(run_script(script, args, cwd))
    assert f"resumed from {os.path.join(out, 'last.pt')} at step {saved['step']}" in resumed.stdout
    return saved, resumed


@pytest.fixture(scope="session")
def trained_run(image_folder, tmp_path_factory):
    """One uninterrupted 2-epoch, 4-view MMCR run: (process, run folder, data dir); the reference of the resume tests
    and the pretrained checkpoint of the fine-tuning tests. Its --dataset is relative to its working directory (the
    run records it as absolute). Tests that change its folder work on a copy."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "run"
    proc = run_script(MMCR, ["--dataset", os.path.relpath(image_folder, tmp), "--data-dir", tmp / "data",
                             "--output-dir", out, *TINY], cwd=tmp)
    return proc, str(out), str(tmp / "data")


def finetune_args(trained_run, finetune_type, data_dir=None):
    _, pretrained, pretrained_data = trained_run
    return ["--checkpoint", os.path.join(pretrained, "best.pt"), "--data-dir", data_dir or pretrained_data,
            "--finetune-type", finetune_type, *FINETUNE_TINY]


@pytest.fixture(scope="session")
def finetune_run(trained_run, tmp_path_factory):
    """A 2-epoch backbone+linear fine-tuning of the trained run's best.pt, from another directory (the pretraining
    run's dataset path must still be found): (process, run folder)."""
    tmp = tmp_path_factory.mktemp("finetune")
    out = tmp / "ft"
    return (run_script(FINETUNE, [*finetune_args(trained_run, "backbone+linear"), "--output-dir", out], cwd=tmp),
            str(out))


def empssl_args(image_folder, data_dir):
    return ["--dataset", image_folder, "--data-dir", data_dir, *EMPSSL_TINY]


@pytest.fixture(scope="session")
def empssl_run(image_folder, tmp_path_factory):
    """A tiny EMP-SSL run (2 epochs, 4 patches, 64-d embedding): (process, run folder, data dir)."""
    tmp = tmp_path_factory.mktemp("empssl")
    out = tmp / "run"
    proc = run_script(EMPSSL, [*empssl_args(image_folder, tmp / "data"), "--output-dir", out], cwd=tmp)
    return proc, str(out), str(tmp / "data")


def fake_pretrained(path, dataset, width=16, **changes):
    """A checkpoint as mmcr_pretrain.py writes one, with random weights of a narrow ResNet18 (quick to fine-tune)."""
    model = pretrain.MMCRModel(width, 8)
    config = dataclasses.asdict(pretrain.Config(dataset=str(dataset), width=width, projection_dim=8))
    ckpt = {"script": "mmcr_pretrain", "run_id": "fake", "model": model.state_dict(), "best": {},
            "running": torch.zeros(1), "architecture": model.architecture, "config": config, "step": 4,
            "classes": list(CLASSES), "norm": ((0.5,) * 3, (0.25,) * 3)}
    for key, value in changes.items():
        if key in config:
            config[key] = value
        else:
            ckpt[key] = value
    torch.save(with_checksum(ckpt), path)
    return str(path)


# ----------------------------------------------------------------------------- training runs and their outputs


@e2e
def test_end_to_end(trained_run):
    proc, out, data_dir = trained_run
    assert_ok(proc)
    files = set(os.listdir(out))
    assert RUN_FILES | {"views.png"} <= files and not [f for f in files if f.endswith(".tmp")]
    # decoded ImageFolder cached under --data-dir
    assert os.listdir(os.path.join(data_dir, "cache"))
    # 8 rows (the first images of the batch), each the image and its 4 views, 32 px with 1 px between
    assert Image.open(os.path.join(out, "views.png")).size == (5 * 33 + 1, 8 * 33 + 1)
    config = json.load(open(os.path.join(out, "config.json")))
    assert ((config["num_train"], config["num_test"], config["num_classes"], config["world_size"])
            == (3 * TRAIN_PER_CLASS, 3 * TEST_PER_CLASS, 3, 1))
    assert config["steps_per_epoch"] == STEPS_PER_EPOCH and config["num_views"] == 4
    # the relative --dataset, recorded absolute
    assert os.path.isabs(config["dataset"]) and os.path.isdir(os.path.join(config["dataset"], "train"))
    metrics = read_metrics(out)
    assert len(metrics) == 2
    total = 2 * STEPS_PER_EPOCH
    for epoch, m in enumerate(metrics, 1):
        assert METRIC_KEYS | SCORE_KEYS <= set(m), m
        assert (m["epoch"], m["step"]) == (epoch, epoch * STEPS_PER_EPOCH)
        # -||C||_* of 8 centroids of unit vectors
        assert math.isfinite(m["loss"]) and -math.sqrt(8 * 8) <= m["loss"] < 0
        assert m["lr"] == pytest.approx(lr_at(m["step"] - 1, total, int(0.1 * total), 1e-3))
        assert 0 <= m["knn_top1"] <= m["knn_top5"] <= 100 and m["epoch_seconds"] > 0 and m["views_per_second"] > 0
    printed = re.findall(r"^epoch (\d+)/2 step \d+ mean loss .*knn_top1 ([\d.]+) knn_top5 ([\d.]+)", proc.stdout, re.M)
    assert [(int(e), float(a), float(b)) for e, a, b in printed] == [
        (m["epoch"], pytest.approx(m["knn_top1"], abs=0.006), pytest.approx(m["knn_top5"], abs=0.006)) for m in metrics]
    assert re.search(r"^done: best knn_top1 [\d.]+ knn_top5 [\d.]+ epoch [12] in ", proc.stdout, re.M)
    # the progress bar shows the epoch's running mean loss from the first step on (--log-every 50 > 4 steps)
    assert re.search(r"epoch 1/2: +25%.*mean loss -[\d.]+ lr", proc.stderr)
    last, best = load(os.path.join(out, "last.pt")), load(os.path.join(out, "best.pt"))
    assert last["script"] == "mmcr_pretrain" and last["step"] == total
    assert last["run_id"] == config["run_id"] and last["architecture"]["width"] == 64
    assert last.pop("checksum") == pretrain.checksum(last)
    assert best["best"]["knn_top1"] == max(m["knn_top1"] for m in metrics)
    assert best["step"] == best["best"]["epoch"] * STEPS_PER_EPOCH
    # best.pt of the last epoch is a second name of last.pt's file, not a second copy
    same_file = os.stat(os.path.join(out, "best.pt")).st_ino == os.stat(os.path.join(out, "last.pt")).st_ino
    assert same_file == (best["step"] == last["step"])
    model = pretrain.MMCRModel(64, 128)
    # strict: the checkpoint is the whole model
    model.load_state_dict(last["model"])
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def backbone_of(state):
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


@e2e
@pytest.mark.parametrize("finetune_type", ["linear", "backbone+linear"])
def test_finetune_end_to_end(trained_run, finetune_run, tmp_path, finetune_type):
    _, pretrained, pretrained_data = trained_run
    if finetune_type == "backbone+linear":
        proc, out = finetune_run
    else:
        # and a broken ImageFolder cache (both splits' files truncated) only costs a decoding, with a warning each
        shutil.copytree(os.path.join(pretrained_data, "cache"), tmp_path / "data" / "cache")
        caches = sorted((tmp_path / "data" / "cache").iterdir())
        for cache in caches:
            cache.write_bytes(cache.read_bytes()[:cache.stat().st_size // 2])
        out = tmp_path / "ft"
        proc = run_script(FINETUNE, [*finetune_args(trained_run, "linear", tmp_path / "data"), "--output-dir", out],
                          cwd=tmp_path)
        warned = [line for line in error_lines(proc.stderr) if line.startswith("warning:")]
        assert (len(caches) == 2 and len(warned) == 2
                and all(str(c) in " ".join(warned) for c in caches)), proc.stderr[-3000:]
        # rewritten whole
        assert all(load(c)["images"].dtype == torch.uint8 for c in caches)
    assert_ok(proc)
    # epoch 0: the loaded backbone's kNN, before training
    assert re.search(r"^epoch 0/2 step 0 knn_top1 [\d.]+ knn_top5 [\d.]+$", proc.stdout, re.M)
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and SCORE_KEYS <= set(metrics[0])
    assert all(FINETUNE_KEYS | TEST_KEYS <= set(m) for m in metrics[1:])
    assert all(math.isfinite(m["loss"]) and 0 <= m["top1"] <= m["top5"] <= 100 for m in metrics[1:])
    assert re.search(r"^done: best top1 [\d.]+ top5 [\d.]+ test_loss [\d.]+", proc.stdout, re.M)
    before, after = (backbone_of(load(os.path.join(pretrained, "best.pt"))["model"]),
                     backbone_of(load(os.path.join(out, "last.pt"))["model"]))
    assert before.keys() == after.keys()
    same = {k: torch.equal(before[k], after[k]) for k in before}
    statistics = {k for k in before if "running_" in k or "num_batches" in k}
    # weights untouched; --frozen-bn train (default): BatchNorm statistics re-estimated
    if finetune_type == "linear":
        assert all(same[k] for k in before if k not in statistics) and not all(same[k] for k in statistics)
    else:
        assert not all(same.values())
    assert load(os.path.join(out, "last.pt"))["script"] == "mmcr_finetune"


@e2e
def test_finetune_linear_probe_learns(trained_run, image_folder, tmp_path):
    """33 points in a 512-d feature space are linearly separable whatever their labels: with test = train,
    a linear probe that really trains reaches 100% (on cached features, --augment none)."""
    _, pretrained, _ = trained_run
    root = tmp_path / "same"
    shutil.copytree(os.path.join(image_folder, "train"), root / "train")
    shutil.copytree(os.path.join(image_folder, "train"), root / "test")
    out = tmp_path / "ft"
    proc = assert_ok(run_script(FINETUNE, ["--checkpoint", os.path.join(pretrained, "best.pt"), "--dataset", root,
                                           "--data-dir", tmp_path / "data", "--output-dir", out, "--augment", "none",
                                           "--frozen-bn", "eval", "--batch-size", 8, "--max-epochs", 60,
                                           "--learning-rate", 0.05, "--warmup-duration", 0, "--eval-every", 10,
                                           "--num-neighbours", 5, "--device", "cpu"], cwd=tmp_path))
    metrics = read_metrics(out)
    # --eval-every 10
    assert "top1" not in metrics[1] and metrics[10]["top1"] is not None
    assert metrics[-1]["top1"] == 100.0
    assert metrics[-1]["loss"] < metrics[1]["loss"] / 3


@e2e
def test_finetune_takes_the_pretraining_subset_and_a_batch_that_fits(image_folder, tmp_path, capsys):
    """A checkpoint trained with --limit-train / --limit-test: the probe uses the same subset unless told otherwise,
    and its default batch (1024) shrinks to the 20 training images instead of failing."""
    ckpt = fake_pretrained(tmp_path / "pre.pt", image_folder, limit_train=20, limit_test=9)
    proc = run_cli(FINETUNE, ["--checkpoint", ckpt, "--data-dir", tmp_path / "data", "--output-dir", tmp_path / "ft",
                              "--max-epochs", 1, "--num-neighbours", 5, "--device", "cpu"], capsys)
    assert_ok(proc)
    config = json.load(open(tmp_path / "ft" / "config.json"))
    assert (config["num_train"], config["num_test"], config["batch_size"]) == (20, 9, 20)
    # told otherwise: all the images
    proc = run_cli(FINETUNE, ["--checkpoint", ckpt, "--data-dir", tmp_path / "data", "--output-dir", tmp_path / "all",
                              "--max-epochs", 1, "--limit-train", 0, "--limit-test", 0, "--num-neighbours", 5,
                              "--device", "cpu"], capsys)
    assert_ok(proc)
    assert json.load(open(tmp_path / "all" / "config.json"))["num_train"] == 3 * TRAIN_PER_CLASS


SMALL_CNN = """class SmallCNN(nn.Module):
    \"\"\"A hacker's backbone: two strided convolutions, then global average pooling; 2 x width features.\"\"\"

    def __init__(self, width):
        super().__init__()
        self.feature_dim = 2 * width
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


"""


def hacked_copy(tmp_path, name, *edits):
    """A copy of mmcr_pretrain.py with each (old, new) edit made once, and knn.py beside it."""
    source = open(MMCR).read()
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    (tmp_path / name).write_text(source)
    shutil.copy(os.path.join(REPO, "knn.py"), tmp_path / "knn.py")
    return str(tmp_path / name)


@e2e
def test_a_copy_with_its_own_backbone_fine_tunes_with_model_from(image_folder, tmp_path, capsys):
    """The hacker's change of the backbone, two edits in a copy of mmcr_pretrain.py: a small CNN class, and MMCRModel
    building it. The unchanged mmcr_finetune.py refuses its checkpoint with one line naming the file, the class and
    the flag (a checkpoint never runs code); with --model-from it builds the class from that file and fine-tunes it,
    linear and backbone+linear."""
    script = hacked_copy(tmp_path, "my_mmcr.py",
                         ("class MMCRModel(nn.Module):", SMALL_CNN + "class MMCRModel(nn.Module):"),
                         ("self.backbone = ResNet18(width)", "self.backbone = SmallCNN(width)"))
    assert_ok(run_script(script, ["--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir",
                                  tmp_path / "run", *TINY, "--max-epochs", 1, "--num-views", 2], cwd=tmp_path))
    pretrained = load(tmp_path / "run" / "best.pt")
    assert pretrained["architecture"]["backbone"] == "SmallCNN" and pretrained["architecture"]["file"] == script
    args = ["--checkpoint", tmp_path / "run" / "best.pt", "--data-dir", tmp_path / "data", *FINETUNE_TINY,
            "--max-epochs", 1]
    proc = run_cli(FINETUNE, [*args, "--output-dir", tmp_path / "refused"], capsys)
    assert_one_error_line(proc, FINETUNE, "SmallCNN", script, "--model-from")
    assert not os.path.exists(tmp_path / "refused")
    for finetune_type in ("linear", "backbone+linear"):
        out = tmp_path / finetune_type
        assert_ok(run_script(FINETUNE, [*args, "--model-from", script, "--finetune-type", finetune_type,
                                        "--output-dir", out], cwd=tmp_path))
        final = load(out / "last.pt")["model"]
        assert final["fc.weight"].shape == (3, 128) and len(read_metrics(out)) == 2
        moved = not torch.equal(final["backbone.net.0.weight"], pretrained["model"]["backbone.net.0.weight"])
        assert moved == (finetune_type == "backbone+linear")


@e2e
def test_a_resnet18_with_other_blocks_fine_tunes_as_it_is(image_folder, tmp_path):
    """A copy whose ResNet18 has one block per stage: the checkpoint records the blocks, and mmcr_finetune.py builds
    that shape itself, without --model-from."""
    script = hacked_copy(tmp_path, "shallow.py", ("blocks=(2, 2, 2, 2)):", "blocks=(1, 1, 1, 1)):"))
    assert_ok(run_script(script, ["--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir",
                                  tmp_path / "run", *TINY, "--max-epochs", 1, "--num-views", 2, "--width", 16],
                         cwd=tmp_path))
    assert load(tmp_path / "run" / "best.pt")["architecture"]["blocks"] == [1, 1, 1, 1]
    assert_ok(run_script(FINETUNE, ["--checkpoint", tmp_path / "run" / "best.pt", "--data-dir", tmp_path / "data",
                                    "--output-dir", tmp_path / "ft", *FINETUNE_TINY, "--max-epochs", 1], cwd=tmp_path))
    assert "backbone.layer1.1.conv1.weight" not in load(tmp_path / "ft" / "last.pt")["model"]


@e2e
def test_empssl_end_to_end_then_linear(empssl_run, tmp_path):
    proc, out, _ = empssl_run
    assert_ok(proc)
    assert re.search(r"knn_top1 [\d.]+ knn_top5 [\d.]+", proc.stdout)
    # the evaluation's progress bars say what they compute
    assert "bag of features of the train images (4 patches each)" in proc.stderr
    assert "bag of features of the test images" in proc.stderr
    assert RUN_FILES | {"views.png", "embeddings"} <= set(os.listdir(out))
    for split, n in (("train", 3 * TRAIN_PER_CLASS), ("test", 3 * TEST_PER_CLASS)):
        d = load(os.path.join(out, "embeddings", f"{split}.pt"))
        assert {"embeddings", "labels", "dim", "patches", "checkpoint", "dataset", "classes"} <= set(d)
        assert d["embeddings"].shape == (n, 64) and d["embeddings"].dtype == torch.float16 and d["dim"] == 64
        assert d["labels"].shape == (n,) and d["labels"].dtype == torch.int64 and d["patches"] == 4
        assert torch.isfinite(d["embeddings"].float()).all()
    metrics = read_metrics(out)
    assert all(METRIC_KEYS <= set(m) for m in metrics)
    # --eval-every 0: evaluated after the last epoch only
    assert [SCORE_KEYS <= set(m) for m in metrics] == [False, True]
    # 8 images x (image + 4 patches)
    assert Image.open(os.path.join(out, "views.png")).size == (5 * 33 + 1, 8 * 33 + 1)
    lin = run_script(LINEAR, ["--dataset", os.path.join(out, "embeddings"), "--output-dir", tmp_path / "lin",
                              "--max-epochs", 3, "--batch-size", 8, "--num-neighbours", 5, "--device", "cpu"],
                     cwd=tmp_path)
    assert_ok(lin)
    assert [m["epoch"] for m in read_metrics(tmp_path / "lin")] == [0, 1, 2, 3]


def write_embeddings(folder, xtr, ytr, xte, yte, classes, **override):
    os.makedirs(folder, exist_ok=True)
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        d = {"embeddings": x.half(), "labels": y, "dim": x.shape[1], "patches": 4, "classes": classes,
             "checkpoint": "-", "dataset": "-"}
        d.update(override.get(name, {}))
        torch.save(d, os.path.join(folder, f"{name}.pt"))
    return str(folder)


def separated(n, classes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.arange(n) % classes
    return means[y] + torch.randn(n, dim, generator=g), y


@e2e
@pytest.mark.parametrize("shuffle", [False, True])
def test_linear_probe_learns_from_data_not_label_order(tmp_path, shuffle):
    classes = [f"c{i}" for i in range(10)]
    (xtr, ytr), (xte, yte) = separated(600, 10, 32, 1), separated(300, 10, 32, 2)
    # labels no longer tied to the data: test accuracy must fall to chance
    if shuffle:
        ytr = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(5))]
    folder = write_embeddings(tmp_path / "emb", xtr, ytr, xte, yte, classes)
    out = tmp_path / "lin"
    proc = assert_ok(run_script(LINEAR, ["--dataset", folder, "--output-dir", out, "--max-epochs", 5, "--device", "cpu",
                                         "--num-neighbours", 20], cwd=tmp_path))
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3, 4, 5] and SCORE_KEYS <= set(metrics[0])
    assert all({"epoch", "loss", "lr"} | TEST_KEYS <= set(m) for m in metrics[1:])
    assert re.search(r"^done: best top1 [\d.]+ top5 [\d.]+", proc.stdout, re.M)
    if shuffle:
        assert metrics[-1]["top1"] < 25
    else:
        assert metrics[-1]["top1"] > 95
    assert load(out / "best.pt")["model"]["weight"].shape == (10, 32)


# ----------------------------------------------------------------------------- run folders: one run each, resume


@e2e
@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_a_run_folder_is_never_overwritten(script, trained_run, image_folder, tmp_path, capsys):
    """Without --resume, an --output-dir that holds a run is refused with one line that names it and the way to
    continue it, and every file in it stays byte for byte as it was. mmcr_pretrain.py: a copy of a finished run and
    the command that made it; the others: the files a run starts with, and a --dataset / --checkpoint that does not
    exist (so the check comes before any data is loaded)."""
    run, missing = tmp_path / "run", tmp_path / "nothing_here"
    if script == MMCR:
        proc, finished, data_dir = trained_run
        assert_ok(proc)
        shutil.copytree(finished, run)
        args = ["--dataset", image_folder, "--data-dir", data_dir, *TINY]
    else:
        run.mkdir()
        (run / "config.json").write_text('{"seed": 1}\n')
        (run / "metrics.jsonl").write_text('{"epoch": 1, "step": 4}\n')
        (run / "last.pt").write_bytes(b"not even a checkpoint")
        args = {FINETUNE: ["--checkpoint", missing, "--data-dir", tmp_path / "data", *FINETUNE_TINY],
                EMPSSL: ["--dataset", missing, "--data-dir", tmp_path / "data", *EMPSSL_TINY],
                LINEAR: ["--dataset", missing, "--device", "cpu"]}[script]
    before = file_hashes(run)
    proc = run_cli(script, [*args, "--output-dir", run], capsys)
    assert_one_error_line(proc, script, str(run), "--resume auto")
    assert file_hashes(run) == before


@pytest.fixture(scope="session")
def killed_run(trained_run, image_folder, tmp_path_factory):
    """The trained run's command, with a timed save at every log step (--checkpoint-minutes 0.0001: they come by the
    clock) and a log step at every step (--log-every 1), killed with SIGKILL after the first save inside epoch 2, then
    resumed with --resume auto to its end. Returns (run folder, a copy of the last.pt the kill left, the resumed run's
    CompletedProcess)."""
    _, _, data_dir = trained_run
    tmp = tmp_path_factory.mktemp("killed")
    out = tmp / "run"

    # a last.pt of a step inside epoch 2 (mmap: the tensors are not read; saves replace the file whole)
    def saved_inside_epoch_2(log):
        try:
            return torch.load(out / "last.pt", mmap=True, weights_only=True)["step"] > STEPS_PER_EPOCH
        except (FileNotFoundError, RuntimeError):
            return False

    args = ["--dataset", image_folder, "--data-dir", data_dir, *TINY, "--checkpoint-minutes", 0.0001, "--log-every", 1]
    saved, resumed = interrupt_and_resume(MMCR, args, out, tmp, saved_inside_epoch_2, signal.SIGKILL)
    torch.save(saved, tmp / "killed.pt")
    return str(out), str(tmp / "killed.pt"), resumed


@e2e
def test_sigkill_then_resume_gives_the_uninterrupted_weights(killed_run, trained_run):
    """A hard kill loses only the steps since the last timed save; the dead process's lock is gone with it (no
    warning), and the resumed run ends bit-identical to the uninterrupted one (--log-every and --checkpoint-minutes
    do not change the maths), the epoch's mean loss in metrics.jsonl too (its sum so far is in the checkpoint)."""
    out, killed, resumed = killed_run
    saved = load(killed)
    # inside epoch 2: the views of the steps after it come from the step's own seed
    assert STEPS_PER_EPOCH < saved["step"] < 2 * STEPS_PER_EPOCH
    assert not [line for line in error_lines(resumed.stderr) if line.startswith("warning:")], resumed.stderr
    final, reference = load(os.path.join(out, "last.pt")), load(os.path.join(trained_run[1], "last.pt"))
    assert final["step"] == reference["step"] == 2 * STEPS_PER_EPOCH
    assert_same_weights(final, reference, ("exp_avg", "exp_avg_sq"))
    metrics, ref_metrics = read_metrics(out), read_metrics(trained_run[1])
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [(m["knn_top1"], m["loss"]) for m in metrics] == [(m["knn_top1"], m["loss"]) for m in ref_metrics]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@e2e
def test_resume_from_an_older_checkpoint_keeps_each_epoch_once(killed_run, trained_run, tmp_path):
    """A finished 2-epoch run resumed from its mid-epoch-2 checkpoint (with nothing but --resume): metrics.jsonl drops
    the lines after that step and ends with epochs [1, 2], not [1, 2, 2]; the weights come out the same again."""
    finished, killed, _ = killed_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]
    proc = assert_ok(run_script(MMCR, ["--output-dir", run, "--resume", killed], cwd=tmp_path))
    assert f"resumed from {killed} at step {load(killed)['step']}" in proc.stdout
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    # the kept line is untouched
    assert metrics[0] == read_metrics(finished)[0]
    assert_same_weights(load(run / "last.pt"), load(os.path.join(trained_run[1], "last.pt")))


@e2e
def test_a_resume_continues_the_runs_recipe(trained_run, tmp_path, capsys):
    """--resume auto --output-dir alone continues a run with its own flags (here: extended by --max-epochs, which a
    resume may change); config.json keeps the recipe and records the resume. A flag that changes the recipe is
    refused, listing the differences, and changes nothing."""
    _, finished, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = file_hashes(run)
    for flags, phrases in ((["--weight-decay", 0.5], ["--weight-decay 0.5 (the run's: 1e-06)"]),
                           (["--dataset", tmp_path, "--batch-size", 4], ["--batch-size 4 (the run's: 8)",
                                                                        f"--dataset {tmp_path}"])):
        proc = run_cli(MMCR, ["--resume", "auto", "--output-dir", run, *flags], capsys)
        assert_one_error_line(proc, MMCR, *phrases, "another --output-dir")
        assert file_hashes(run) == before
    proc = assert_ok(run_script(MMCR, ["--resume", "auto", "--output-dir", run, "--max-epochs", 3], cwd=tmp_path))
    last = load(run / "last.pt")
    assert last["step"] == 3 * STEPS_PER_EPOCH and [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]
    assert (last["config"]["num_views"], last["config"]["batch_size"], last["config"]["max_epochs"]) == (4, 8, 3)
    config = json.load(open(run / "config.json"))
    assert config["max_epochs"] == 2 and config["run_id"] == last["run_id"]
    assert [(r["step"], r["changed"]) for r in config["resumes"]] == [(2 * STEPS_PER_EPOCH, {"max_epochs": [2, 3]})]


@e2e
def test_finetune_and_linear_resume_with_nothing_but_the_folder(finetune_run, empssl_run, tmp_path, capsys):
    """The command that a stop prints, --resume auto --output-dir X, is enough for every script: the checkpoint (or the
    embeddings folder) comes from the run."""
    for script, finished in ((FINETUNE, finetune_run[1]), (LINEAR, None)):
        if script == LINEAR:
            embeddings = os.path.join(empssl_run[1], "embeddings")
            finished = str(tmp_path / "lin")
            assert_ok(run_cli(LINEAR, ["--dataset", embeddings, "--output-dir", finished, "--max-epochs", 1,
                                       "--batch-size", 8, "--num-neighbours", 5, "--device", "cpu"], capsys))
        run = tmp_path / f"{os.path.basename(script)}-run"
        shutil.copytree(finished, run)
        epochs = epoch_lines(run)
        assert_ok(run_cli(script, ["--resume", "auto", "--output-dir", run, "--max-epochs", epochs + 1], capsys))
        assert [m["epoch"] for m in read_metrics(run)] == list(range(epochs + 2))


@e2e
def test_a_resume_into_the_folder_of_another_run_is_refused(killed_run, trained_run, tmp_path, capsys):
    other, _, _ = killed_run
    folder = tmp_path / "other"
    shutil.copytree(other, folder)
    before = file_hashes(folder)
    proc = run_cli(MMCR, ["--resume", os.path.join(trained_run[1], "last.pt"), "--output-dir", folder], capsys)
    assert_one_error_line(proc, MMCR, str(folder), "another one than", "own folder")
    assert file_hashes(folder) == before


@e2e
def test_a_second_run_on_the_same_folder_is_refused(image_folder, tmp_path, capsys):
    """Two runs started on one --output-dir: the second exits 2 at once, naming the first one's PID; the first goes on
    (and stops cleanly on SIGTERM)."""
    out = tmp_path / "run"
    args = ["--dataset", image_folder, "--data-dir", tmp_path / "data", *TINY, "--max-epochs", 50, "--output-dir", out]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen([sys.executable, MMCR, *map(str, args)], cwd=tmp_path, env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=f)
        try:
            wait_for(lambda: os.path.exists(out / ".lock") and open(out / ".lock").read().strip(), first, log)
            proc = run_cli(MMCR, args, capsys)
            assert_one_error_line(proc, MMCR, "in use by another run", f"PID {first.pid}")
            assert first.poll() is None
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=300) == 128 + signal.SIGTERM
        finally:
            first.kill()
            first.wait()


@e2e
def test_ctrl_c_saves_and_exits_cleanly(image_folder, tmp_path):
    out = tmp_path / "run"
    # 50 epochs: however fast the machine, the run is still going when Ctrl-C arrives; views.png: training started
    interrupt(MMCR, ["--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir", out, *TINY,
                     "--max-epochs", "50"], tmp_path, lambda log: os.path.exists(out / "views.png"), signal.SIGINT)
    saved = load(out / "last.pt")
    assert 1 <= saved["step"] < 50 * STEPS_PER_EPOCH and saved["script"] == "mmcr_pretrain"
    assert epoch_lines(out) <= saved["step"] // STEPS_PER_EPOCH
    assert not os.path.exists(out / "last.pt.tmp")


@e2e
def test_ctrl_c_during_the_last_evaluation_still_ends_with_130(image_folder, tmp_path):
    """Ctrl-C while EMP-SSL's final bag-of-features evaluation runs: the evaluation finishes, its metrics, embeddings
    and checkpoints are written, and the run exits 130 (not 0) with the one 'interrupted' line."""
    out = tmp_path / "run"
    stderr = interrupt(EMPSSL, [*empssl_args(image_folder, tmp_path / "data"), "--max-epochs", 1, "--valid-patches",
                                8, "--output-dir", out], tmp_path, lambda log: "bag of features of the train" in log,
                       signal.SIGINT)
    # its bar moves: 33 images in chunks of 32 (256 patches) on a CPU
    assert re.search(r"bag of features of the train images \(8 patches each\): +\d+%\|.*\| 32/33", stderr)
    assert load(out / "last.pt")["step"] == STEPS_PER_EPOCH
    assert SCORE_KEYS <= set(read_metrics(out)[0])
    assert os.path.exists(out / "embeddings" / "test.pt")


@e2e
def test_a_kill_during_the_evaluation_is_resumed_from_the_last_save(image_folder, tmp_path, capsys):
    """EMP-SSL killed during its bag-of-features evaluation: last.pt is the last timed save (files are written after
    the evaluation), and --resume auto runs the rest of the epoch and the evaluation once, with the epoch's whole loss
    in its metrics line."""
    out = tmp_path / "run"
    args = [*empssl_args(image_folder, tmp_path / "data"), "--max-epochs", 1, "--valid-patches", 8, "--output-dir", out,
            "--checkpoint-minutes", 0.0001, "--log-every", 1]
    interrupt(EMPSSL, args, tmp_path, lambda log: "bag of features of the train" in log, signal.SIGKILL)
    killed = load(out / "last.pt")["step"]
    proc = assert_ok(run_cli(EMPSSL, ["--resume", "auto", "--output-dir", out], capsys))
    metrics = read_metrics(out)
    assert len(metrics) == 1 and SCORE_KEYS <= set(metrics[0]) and math.isfinite(metrics[0]["loss"])
    assert os.path.exists(out / "embeddings" / "test.pt") and "knn_top1" in proc.stdout
    assert killed == STEPS_PER_EPOCH - 1 and f"at step {killed}" in proc.stdout


@e2e
def test_a_stop_during_the_finetune_startup_knn_saves_and_resumes(tmp_path, capsys):
    """SIGTERM while mmcr_finetune.py computes the loaded backbone's kNN (its bar moves and names what it computes):
    the kNN finishes and is written (epoch 0), last.pt is saved at step 0, exit 143; --resume auto --output-dir goes on
    without the pretraining checkpoint (deleted), and does not recompute the kNN."""
    images = make_image_folder(tmp_path / "images", 80, 40)
    ckpt = fake_pretrained(tmp_path / "pre.pt", images, width=64)
    out = tmp_path / "ft"
    stderr = interrupt(FINETUNE, ["--checkpoint", ckpt, "--data-dir", tmp_path / "data", "--output-dir", out,
                                  *FINETUNE_TINY, "--max-epochs", 1], tmp_path,
                       lambda log: "backbone features of the train images" in log)
    # 240 images in chunks of 64
    assert re.search(r"backbone features of the train images: +\d+%\|.*\| 64/240", stderr)
    assert load(out / "last.pt")["step"] == 0 and [m["epoch"] for m in read_metrics(out)] == [0]
    os.remove(ckpt)
    proc = assert_ok(run_cli(FINETUNE, ["--resume", "auto", "--output-dir", out], capsys))
    assert [m["epoch"] for m in read_metrics(out)] == [0, 1] and "epoch 0/" not in proc.stdout


@e2e
def test_finetune_sigterm_then_resume_gives_the_uninterrupted_weights(trained_run, finetune_run, tmp_path):
    reference_proc, reference = finetune_run
    assert_ok(reference_proc)
    out = tmp_path / "run"
    # a log step at every step: SIGTERM once the bar shows epoch 2 going
    saved, _ = interrupt_and_resume(FINETUNE, [*finetune_args(trained_run, "backbone+linear"), "--log-every", 1], out,
                                    tmp_path, lambda log: "epoch 2/2:  25%" in log)
    # stopped inside epoch 2
    assert STEPS_PER_EPOCH < saved["step"] < 2 * STEPS_PER_EPOCH
    assert_same_weights(load(out / "last.pt"), load(os.path.join(reference, "last.pt")), ("exp_avg", "exp_avg_sq"))
    assert [m.get("top1") for m in read_metrics(out)] == [m.get("top1") for m in read_metrics(reference)]


@e2e
def test_empssl_sigterm_then_resume_gives_the_uninterrupted_weights(empssl_run, image_folder, tmp_path):
    reference_proc, reference, data_dir = empssl_run
    assert_ok(reference_proc)
    out = tmp_path / "run"
    saved, _ = interrupt_and_resume(EMPSSL, [*empssl_args(image_folder, data_dir), "--log-every", 1], out, tmp_path,
                                    lambda log: "epoch 2/2:  25%" in log)
    assert STEPS_PER_EPOCH < saved["step"] < 2 * STEPS_PER_EPOCH
    # LARS state too
    assert_same_weights(load(out / "last.pt"), load(os.path.join(reference, "last.pt")), ("momentum_buffer",))
    emb, ref_emb = load(out / "embeddings" / "test.pt"), load(os.path.join(reference, "embeddings", "test.pt"))
    assert torch.equal(emb["embeddings"], ref_emb["embeddings"])


def file_size_limit(n_bytes):
    """For the child process: writes beyond n_bytes fail with EFBIG (SIGXFSZ ignored), as on a full disk."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return limit


@e2e
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(trained_run, tmp_path):
    """Resuming a finished run to 3 epochs where files may not grow past 50 MB (a 136 MB checkpoint cannot be
    written): exit 2 with one line naming last.pt, no .tmp left, and last.pt / best.pt as they were."""
    _, finished, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = file_hashes(run)
    proc = run_script(MMCR, ["--resume", "auto", "--output-dir", run, "--max-epochs", 3], cwd=tmp_path,
                      preexec_fn=file_size_limit(50 * 2 ** 20))
    line = assert_one_error_line(proc, MMCR, "cannot write", ".pt", "is unchanged")
    assert "last.pt" in line or "best.pt" in line
    after = file_hashes(run)
    assert not [f for f in after if f.endswith(".tmp")]
    assert {f: after[f] for f in ("last.pt", "best.pt")} == {f: before[f] for f in ("last.pt", "best.pt")}
    assert load(run / "last.pt")["step"] == 2 * STEPS_PER_EPOCH


@e2e
def test_a_full_disk_at_the_start_names_the_file_and_leaves_no_folder(trained_run, image_folder, tmp_path):
    """No file may grow at all (the decoded images are cached already): exit 2, one line naming the file that could not
    be written, and no run folder left behind."""
    _, _, data_dir = trained_run
    args = ["--dataset", image_folder, "--data-dir", data_dir, *TINY, "--output-dir", tmp_path / "run"]
    proc = run_script(MMCR, args, cwd=tmp_path, preexec_fn=file_size_limit(0))
    assert_one_error_line(proc, MMCR, "cannot write", str(tmp_path / "run" / ".lock"))
    assert not os.path.exists(tmp_path / "run")


QUICK_START = {MMCR: ["--max-epochs", 20, "--eval-every", 5, "--output-dir", "runs/mmcr/c10"],
               EMPSSL: ["--output-dir", "runs/empssl/c10"],
               FINETUNE: ["--checkpoint", "runs/mmcr/c10/best.pt"],
               LINEAR: ["--dataset", "runs/empssl/c10/embeddings"]}


@e2e
@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_a_failed_start_leaves_no_run_folder(script, tmp_path, capsys, monkeypatch):
    """The README's Quick start commands offline (no CIFAR-10 download; so no pretraining checkpoint, no embeddings):
    each exits 2 with one line and leaves no runs/ folder, neither its own nor runs/<method>/<time> by default."""
    monkeypatch.chdir(tmp_path)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for args in (QUICK_START[script], QUICK_START[script][:-2] if "--output-dir" in QUICK_START[script] else []):
        assert_one_error_line(run_cli(script, [*args, "--device", "cpu"], capsys), script)
        assert not os.path.exists(tmp_path / "runs")


@e2e
@pytest.mark.parametrize("script", [MMCR, EMPSSL], ids=os.path.basename)
def test_a_diverged_run_stops_with_exit_3_and_keeps_its_checkpoints(script, trained_run, empssl_run, tmp_path):
    """A NaN weight in last.pt, resumed: the run stops at its first log step with exit code 3 and one line saying it
    diverged and which files keep the last finite state, and last.pt / best.pt stay as they were. (On the CPU MMCR's
    SVD would raise on the NaN; the script turns that into the same stop.)"""
    proc, finished, _ = trained_run if script == MMCR else empssl_run
    assert_ok(proc)
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ckpt = load(run / "last.pt")
    del ckpt["checksum"]
    # a parameter, not a buffer
    ckpt["model"]["backbone.conv1.weight"][0, 0, 0, 0] = math.nan
    torch.save(with_checksum(ckpt), run / "last.pt")
    before = file_hashes(run)
    proc = run_script(script, ["--output-dir", run, "--resume", "auto", "--max-epochs", 3], cwd=tmp_path)
    assert_one_error_line(proc, script, "diverged", "last.pt and best.pt in", "keep the last finite state", code=3)
    after = file_hashes(run)
    assert {f: after.get(f) for f in ("last.pt", "best.pt")} == {f: before[f] for f in ("last.pt", "best.pt")}
    assert not [f for f in after if f.endswith(".tmp")]


@e2e
def test_a_run_that_diverges_before_its_first_save_leaves_a_folder_to_rerun(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--dataset", image_folder, "--data-dir", tmp_path / "data", *TINY, "--max-epochs", 1, "--output-dir", out]
    proc = run_cli(MMCR, [*args, "--learning-rate", 1e30], capsys)
    assert_one_error_line(proc, MMCR, "diverged at step", "nothing was saved", code=3)
    assert not os.path.exists(out / "last.pt")
    assert_ok(run_cli(MMCR, args, capsys))


# ----------------------------------------------------------------------------- DDP with torchrun

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


@e2e
def test_torchrun_two_cpu_processes(image_folder, tmp_path):
    out = tmp_path / "run"
    proc = assert_ok(run_script(MMCR, ["--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir", out,
                                       *TINY], tmp_path, TORCHRUN))
    config = json.load(open(out / "config.json"))
    assert config["world_size"] == 2 and config["steps_per_epoch"] == STEPS_PER_EPOCH
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2] and all(METRIC_KEYS | SCORE_KEYS <= set(m) for m in metrics)
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert load(out / "last.pt")["step"] == 2 * STEPS_PER_EPOCH
    # printed once, by rank 0
    assert len(re.findall(r"^epoch \d/2 ", proc.stdout, re.M)) == 2


@e2e
def test_empssl_torchrun_two_cpu_processes(image_folder, tmp_path):
    out = tmp_path / "run"
    proc = assert_ok(run_script(EMPSSL, ["--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir",
                                         out, *EMPSSL_TINY, "--max-epochs", 1], tmp_path, TORCHRUN))
    # printed by rank 0 only
    assert len(re.findall(r"^epoch 1/1 .*knn_top1", proc.stdout, re.M)) == 1
    # every image, gathered from both ranks
    for split, n in (("train", 3 * TRAIN_PER_CLASS), ("test", 3 * TEST_PER_CLASS)):
        d = load(out / "embeddings" / f"{split}.pt")
        assert d["embeddings"].shape == (n, 64) and torch.isfinite(d["embeddings"].float()).all()


@e2e
def test_when_a_torchrun_process_dies_the_other_ends_with_one_line(image_folder, tmp_path):
    """Two DDP processes started as torchrun starts them (its environment variables), rank 0 killed with SIGKILL once
    training runs: rank 1, whose collective breaks, ends with exit code 1 and one line, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    args = [MMCR, "--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir", tmp_path / "run", *TINY,
            "--max-epochs", 50]
    procs = []
    try:
        for rank in (0, 1):
            with open(tmp_path / f"rank{rank}.log", "w") as log:
                procs.append(subprocess.Popen([sys.executable, *map(str, args)], cwd=tmp_path,
                                              stdout=subprocess.DEVNULL, stderr=log,
                                              env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))
        wait_for(lambda: os.path.exists(tmp_path / "run" / "views.png"), procs[0], tmp_path / "rank0.log")
        procs[0].kill()
        code = procs[1].wait(timeout=120)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    stderr = (tmp_path / "rank1.log").read_text()
    assert code == 1 and "Traceback" not in stderr, stderr[-3000:]
    # (torch's own warnings, [W...], may come before it)
    lines = [line for line in error_lines(stderr) if not re.match(r"(\[rank\d\]:)?\[W", line)]
    assert lines == ["mmcr_pretrain.py: rank 1: stopped, as another process ended"], stderr[-3000:]


# ----------------------------------------------------------------------------- bad input
# The error plumbing (load_dataset, load_image_folder, read_torch_file, load_checkpoint, the run control, cli) is the
# same code in every script: each of its paths is tested once, with mmcr_pretrain.py. Each script then gets the checks
# only it has. Every case runs the script's command line in this process (it ends before any training).


class Case:
    """What a bad-input case builds its command line from: a temporary folder and the tiny image folder."""

    def __init__(self, tmp, images):
        self.tmp, self.images = tmp, images

    def mmcr(self, *extra):
        return MMCR, ["--dataset", self.images, "--data-dir", self.tmp / "data", *TINY, "--output-dir",
                      self.tmp / "run", *extra]

    def finetune(self, checkpoint, *extra):
        return FINETUNE, ["--checkpoint", checkpoint, "--data-dir", self.tmp / "data", "--output-dir",
                          self.tmp / "run", "--device", "cpu", *extra]

    def linear(self, folder, *extra):
        return LINEAR, ["--dataset", folder, "--output-dir", self.tmp / "run", "--device", "cpu", *extra]

    def file(self, name, content):
        """tmp/name with this content."""
        (self.tmp / name).write_bytes(content)
        return self.tmp / name

    def checkpoint(self, name, **changes):
        return fake_pretrained(self.tmp / name, self.images, **changes)

    def embeddings(self, train_x=None, train_y=None, test_x=None, **override):
        x, y = torch.randn(12, 8), torch.arange(12) % 3
        return write_embeddings(self.tmp / "e", x if train_x is None else train_x, y if train_y is None else train_y,
                                x if test_x is None else test_x, y, ["a", "b", "c"], **override)


def no_images(t):
    for s in ("train", "test"):
        os.makedirs(t.tmp / "empty" / s / "cat")
        (t.tmp / "empty" / s / "cat" / "notes.txt").write_text("no images here")
    return t.tmp / "empty"


def corrupt_images(t):
    root = make_image_folder(t.tmp / "corrupt", 2, 1)
    for name in ("broken.jpg", "also_broken.png"):
        (t.tmp / "corrupt" / "train" / "dog" / name).write_bytes(os.urandom(500))
    return root


def empty_class(t):
    root = make_image_folder(t.tmp / "holes", 2, 1)
    os.makedirs(t.tmp / "holes" / "train" / "zebra")
    return root


def two_classes(t):
    root = make_image_folder(t.tmp / "two", 3, 2)
    for split in ("train", "test"):
        shutil.rmtree(os.path.join(root, split, CLASSES[2]))
    return root


def foreign_checkpoint(t):
    torch.save({"weights": torch.zeros(3)}, t.tmp / "foreign.pt")
    return t.tmp / "foreign.pt"


def wrong_keys(t):
    folder = t.embeddings()
    torch.save({"features": torch.zeros(3)}, os.path.join(folder, "train.pt"))
    return folder


def narrower_weights(t):
    """A checkpoint that says width 24 but holds the weights of width 16."""
    return t.checkpoint("narrow.pt", architecture=dict(pretrain.MMCRModel(16, 8).architecture, width=24))


def flipped_bit(t):
    """A checkpoint with one bit flipped in its tensor data, which torch.load does not notice."""
    path = t.checkpoint("flipped.pt")
    data = bytearray(open(path, "rb").read())
    data[int(len(data) * 0.6)] ^= 0x10
    open(path, "wb").write(bytes(data))
    return path


def hand_made(t):
    """A dict with the keys of a checkpoint, saved by hand (the fault trials' case)."""
    torch.save({"model": {}, "config": {}, "step": 0, "script": "mmcr_pretrain"}, t.tmp / "hand.pt")
    return t.tmp / "hand.pt"


BAD_INPUTS = [
    # shared paths, with mmcr_pretrain.py
    pytest.param(lambda t: t.mmcr("--dataset", t.tmp / "no_such_dataset"), ["no_such_dataset"], id="missing dataset"),
    pytest.param(lambda t: t.mmcr("--dataset", no_images(t)), ["Found no valid file for the classes cat"],
                 id="no images"),
    pytest.param(lambda t: t.mmcr("--dataset", corrupt_images(t), "--batch-size", 2),
                 ["cannot read 2 images", "broken.jpg", "also_broken.png"], id="corrupt images, all named"),
    pytest.param(lambda t: t.mmcr("--dataset", empty_class(t), "--batch-size", 2), ["zebra"], id="empty class folder"),
    pytest.param(lambda t: t.mmcr("--dataset", "cifar10", "--data-dir", t.tmp / "empty_data"),
                 ["offline", "https://www.cs.toronto.edu/~kriz/cifar.html", "ImageFolder"], id="cifar10 offline"),
    pytest.param(lambda t: t.mmcr("--resume", t.tmp / "missing.pt"), ["missing.pt", "does not exist"],
                 id="resume missing checkpoint"),
    pytest.param(lambda t: t.mmcr("--resume", t.file("garbage.pt", os.urandom(1000))),
                 ["garbage.pt", "not a readable checkpoint"], id="resume corrupt checkpoint"),
    pytest.param(lambda t: t.mmcr("--resume", foreign_checkpoint(t)),
                 ["foreign.pt", "not a checkpoint written by these scripts"], id="resume foreign checkpoint"),
    pytest.param(lambda t: t.mmcr("--resume", t.checkpoint("other.pt"), "--projection-dim", 64),
                 ["--projection-dim 64 (the run's: 8)", "another --output-dir"], id="resume with another recipe"),
    pytest.param(lambda t: t.mmcr("--output-dir", t.file("run", b"a file where the run folder should go")),
                 ["cannot write", "run", "File exists"], id="output dir is a file"),
    pytest.param(lambda t: t.mmcr("--resume", flipped_bit(t)), ["flipped.pt is corrupt"], id="resume a flipped bit"),
    pytest.param(lambda t: t.mmcr("--resume", "auto", "--output-dir", ""), ["--resume auto needs --output-dir"],
                 id="resume auto without a folder"),
    pytest.param(lambda t: t.mmcr("--learning-rate", "nan"), ["--learning-rate must be a finite number"], id="lr nan"),
    pytest.param(lambda t: t.mmcr("--learning-rate", "inf"), ["--learning-rate must be a finite number"], id="lr inf"),
    pytest.param(lambda t: t.mmcr("--weight-decay", "nan"), ["--weight-decay must be a finite"], id="weight decay nan"),
    pytest.param(lambda t: t.mmcr("--checkpoint-minutes", "nan"), ["--checkpoint-minutes must be a finite"],
                 id="checkpoint minutes nan"),
    pytest.param(lambda t: t.mmcr("--temperature=-inf"), ["--temperature must be a finite"], id="temperature inf"),
    pytest.param(lambda t: t.mmcr("--seed", 4611686018427387904), ["--seed must be in"], id="seed too large"),
    # what only mmcr_pretrain.py checks
    pytest.param(lambda t: t.mmcr("--num-views", 1), ["--num-views"], id="mmcr: one view"),
    pytest.param(lambda t: t.mmcr("--batch-size", 1000), ["--batch-size 1000 is larger than the training set"],
                 id="mmcr: batch larger than training set"),
    pytest.param(lambda t: t.mmcr("--normalize", "imagenet"), ["--normalize must be"], id="mmcr: normalize"),
    # mmcr_finetune.py: its --checkpoint must be an MMCR pretraining checkpoint it can build, for as many classes
    pytest.param(lambda t: t.finetune(t.checkpoint("empssl.pt", script="empssl_pretrain")),
                 ["empssl_pretrain.py, not mmcr_pretrain.py"], id="finetune: EMP-SSL checkpoint"),
    pytest.param(lambda t: t.finetune(t.checkpoint("c.pt"), "--dataset", two_classes(t)), ["2 classes in", "3 in"],
                 id="finetune: class count"),
    pytest.param(lambda t: t.finetune(t.checkpoint("vit.pt", architecture={"backbone": "ViT", "width": 64,
                                                                         "blocks": None, "file": "/x/vit.py"})),
                 ["backbone is a ViT", "/x/vit.py", "--model-from /x/vit.py"], id="finetune: another backbone class"),
    pytest.param(lambda t: t.finetune(t.checkpoint("vit.pt"), "--model-from", t.file("vit.py", b"x = 1\n")),
                 ["vit.py defines no class ResNet18"], id="finetune: --model-from without the class"),
    pytest.param(lambda t: t.finetune(narrower_weights(t)), ["its backbone does not fit", "of another shape",
                                                             "--model-from"], id="finetune: weights of another width"),
    pytest.param(lambda t: t.finetune(t.checkpoint("empty.pt", model={"projector.0.weight": torch.zeros(8, 128)})),
                 ["its backbone does not fit", "missing: conv1.weight"], id="finetune: missing keys"),
    pytest.param(lambda t: t.finetune(hand_made(t)), ["hand.pt is not a checkpoint written by these scripts"],
                 id="finetune: a hand-made checkpoint"),
    # empssl_pretrain.py
    pytest.param(lambda t: (EMPSSL, ["--dataset", t.images, "--data-dir", t.tmp / "data", "--output-dir",
                                     t.tmp / "run", *EMPSSL_TINY, "--train-patches", 1]),
                 ["--train-patches"], id="empssl: one patch"),
    # empssl_linear.py: what it checks in the embeddings files
    pytest.param(lambda t: t.linear(t.tmp / "nope"), ["not a folder"], id="linear: missing directory"),
    pytest.param(lambda t: t.linear(wrong_keys(t)), ["lacks the keys"], id="linear: wrong keys"),
    pytest.param(lambda t: t.linear(t.embeddings(test_x=torch.randn(12, 6))), ["dim 8, test embeddings 6"],
                 id="linear: dims differ"),
    pytest.param(lambda t: t.linear(t.embeddings(train_y=torch.arange(12) % 3 + 1)), ["outside the 3 classes"],
                 id="linear: labels out of range"),
    pytest.param(lambda t: t.linear(t.embeddings(train_x=torch.randn(0, 8), train_y=torch.zeros(0, dtype=torch.long))),
                 ["at least one embedding"], id="linear: empty train set"),
    pytest.param(lambda t: t.linear(t.embeddings(), "--embedding-dim", 16), ["--embedding-dim 16", "disagrees"],
                 id="linear: embedding dim flag"),
    pytest.param(lambda t: t.linear(t.embeddings(), "--learning-rate", "nan"), ["--learning-rate must be a finite"],
                 id="linear: lr nan"),
]


@e2e
@pytest.mark.parametrize("case,phrases", BAD_INPUTS)
def test_bad_input_one_line_exit_2(case, phrases, image_folder, tmp_path, capsys, monkeypatch):
    # no download may reach the network
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    script, args = case(Case(tmp_path, image_folder))
    before = os.path.exists(tmp_path / "run")
    proc = run_cli(script, args, capsys)
    assert_one_error_line(proc, script, *phrases)
    # a failed start leaves no run folder that it made
    assert os.path.exists(tmp_path / "run") == before


def test_under_torchrun_rank_0_alone_reports_bad_input(capsys, monkeypatch):
    """Every rank checks the flags; only rank 0 says what is wrong, once (before any process group exists)."""
    for rank, lines in (("1", []), ("0", ["mmcr_pretrain.py: error: --seed must be in 0 .. 2^32 - 1"])):
        monkeypatch.setenv("RANK", rank)
        proc = run_cli(MMCR, ["--seed", -1], capsys)
        assert proc.returncode == 2 and error_lines(proc.stderr) == lines, proc.stderr


@e2e
def test_a_ctrl_c_before_the_run_starts_quits_at_once_and_leaves_no_folder(image_folder, tmp_path, capsys,
                                                                            monkeypatch):
    """Ctrl-C while the data loads: the run quits at once (no save to wait for), and the folder it made is gone."""
    real = pretrain.load_dataset

    def interrupted(*args):
        pretrain.on_signal(signal.SIGINT, None)
        return real(*args)

    monkeypatch.setattr(pretrain, "load_dataset", interrupted)
    args = ["--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir", tmp_path / "runs" / "a", *TINY]
    proc = run_cli(MMCR, args, capsys)
    assert proc.returncode == 130 and error_lines(proc.stderr) == ["interrupted: quit at once"], proc.stderr
    assert not os.path.exists(tmp_path / "runs")


# ----------------------------------------------------------------------------- bench.py


@e2e
def test_bench_runs_every_row(tmp_path):
    """bench.py at the smallest sizes: every benchmark runs and prints its rows (their numbers mean nothing here). A
    benchmark that breaks would otherwise first show on a lent GPU, whose minutes are few."""
    import bench
    args = ["--device", "cpu", "--steps", "1", "--warmup", "0", "--train-steps", "1", "--batch-size", "2",
            "--num-views", "2", "--aug-views", "8", "--empssl-batch-size", "2", "--patches", "2",
            "--finetune-batch-size", "4", "--loader-workers", "1", "--loader-batches", "1"]
    proc = assert_ok(run_script(os.path.join(REPO, "bench.py"), args, cwd=tmp_path))
    names = [line.split("  ")[0].strip() for line in proc.stdout.splitlines()[3:] if "  " in line]
    for b in bench.BENCHES:
        # each benchmark's first row is named after it: bench_mmcr_step prints "mmcr step ..."
        words = b.__name__[len("bench_"):].split("_")
        assert any(all(w in n for w in words) for n in names), (b.__name__, names)
