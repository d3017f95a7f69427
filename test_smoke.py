"""CPU smoke and unit tests of the four scripts and knn.py on tiny data the tests generate themselves.

    python -m pytest -q test_smoke.py                    # a few minutes on 2 CPU cores; no GPU, no internet, no dataset
    python -m pytest -q test_smoke.py --durations=10     # and the slowest tests

End-to-end tests run the real script as a subprocess (cwd = a temporary directory) on a tiny
ImageFolder of odd-sized RGB / grayscale png / jpg images; unit tests import the functions and
compare them with independent references (NumPy float64, torchvision.transforms.v2.functional,
plain Python loops). Everything written goes to pytest's tmp_path.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)
import knn  # noqa: E402
import mmcr_pretrain as pretrain  # noqa: E402
from knn import knn_accuracy, knn_scores  # noqa: E402
from mmcr_pretrain import atomic_save, lr_at, mmcr_loss  # noqa: E402
import mmcr_finetune as finetune  # noqa: E402
import empssl_pretrain as empssl  # noqa: E402
import empssl_linear  # noqa: E402

MMCR = os.path.join(REPO, "mmcr_pretrain.py")
FINETUNE = os.path.join(REPO, "mmcr_finetune.py")
EMPSSL = os.path.join(REPO, "empssl_pretrain.py")
LINEAR = os.path.join(REPO, "empssl_linear.py")
# The tiny job: 33 training images (11 per class) at batch 8 = 4 steps per epoch (one image dropped).
# --device cpu: the same bit-exact CPU path on machines that do have a GPU.
TINY = ["--num-views", "4", "--batch-size", "8", "--num-neighbours", "5", "--max-epochs", "2", "--device", "cpu"]
TRAIN_PER_CLASS, TEST_PER_CLASS, CLASSES = 11, 4, ("cat", "dog", "frog")
STEPS_PER_EPOCH = 3 * TRAIN_PER_CLASS // 8
METRIC_KEYS = {"epoch", "step", "loss", "lr", "knn_top1", "knn_top5", "epoch_seconds", "views_per_second"}
# Our batched ops and torchvision compute the same float32 formulas in a different order (grid_sample
# vs interpolate, separable vs 2-D blur kernel, fused blends); measured differences are <= 1e-6.
AUG_ATOL = 1e-5
# Subprocesses must never reach the network (CIFAR download): a dead proxy makes that fail fast and
# deterministically even on machines that do have internet. One thread per process: runs compared
# bit for bit share the setting, and on a busy 2-core machine 2 spinning threads are slower than 1.
ENV = dict(os.environ, OMP_NUM_THREADS="1", HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
           http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")


# ----------------------------------------------------------------------------- helpers and fixtures


def run(args, cwd, timeout=300, launcher=()):
    return subprocess.run([sys.executable, *launcher, MMCR, *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr):
    """Non-empty stderr lines, leaving out tqdm progress bars (they redraw with \\r)."""
    return [line for line in re.split(r"[\r\n]+", stderr) if line.strip() and "%|" not in line]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


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
        with open(os.path.join(root, split, "README.md"), "w") as f:  # a stray file next to the class folders
            f.write("tiny test data\n")
    return str(root)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"), TRAIN_PER_CLASS, TEST_PER_CLASS)


@pytest.fixture(scope="session")
def trained_run(image_folder, tmp_path_factory):
    """One uninterrupted 2-epoch, 4-view run: shared by the end-to-end and the resume test."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "run"
    proc = run(["--dataset", image_folder, "--data-dir", tmp / "data", "--output-dir", out, *TINY], cwd=tmp)
    return proc, str(out), str(tmp / "data")


# ----------------------------------------------------------------------------- 1. loss


def numpy_mmcr_loss(z, lmbda):
    z = z.astype(np.float64)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    centroids = z.mean(1)
    loss = -np.linalg.svd(centroids, compute_uv=False).sum()
    assert np.isclose(loss, -np.linalg.norm(centroids, "nuc"))
    return loss + lmbda * np.mean([np.linalg.norm(zb, "nuc") for zb in z])


@pytest.mark.parametrize("shape", [(8, 4, 16), (12, 3, 5), (5, 2, 7)])  # batch < dim, batch > dim, 2 views
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


# ----------------------------------------------------------------------------- 2. augmentation


def test_ops_match_torchvision():
    """Every per-view op against torchvision.transforms.v2.functional on each image alone."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 27, 31, generator=g)
    x[0, :, :5] = 0.5  # grey pixels: max == min in the hue conversion
    x[1] = x[1, :1]  # a grey image
    x[2, :, 3:7] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # saturated red: the hue sector edges
    x[3, :, :4] = (x[3, :, :4] > 0.5).float()  # exact 0 / 1 values (solarize threshold, clamping)
    f = torch.tensor([0.6, 1.0, 1.4, 0.0, 2.0, 0.9])
    hue = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.1, 0.5])
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0, 0.3])
    cases = {
        "brightness": (pretrain.adjust_brightness(x, f), [TF.adjust_brightness(x[i], f[i].item()) for i in range(6)]),
        "contrast": (pretrain.adjust_contrast(x, f), [TF.adjust_contrast(x[i], f[i].item()) for i in range(6)]),
        "saturation": (pretrain.adjust_saturation(x, f), [TF.adjust_saturation(x[i], f[i].item()) for i in range(6)]),
        "hue": (pretrain.adjust_hue(x, hue), [TF.adjust_hue(x[i], hue[i].item()) for i in range(6)]),
        "grayscale": (pretrain.grayscale(x), [TF.rgb_to_grayscale(x[i]) for i in range(6)]),
        "blur": (pretrain.gaussian_blur(x, sigma), [TF.gaussian_blur(x[i], [3, 3], [sigma[i].item()] * 2) for i in range(6)]),
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
    boxes = [(0, 0, 24, 24), (5, 11, 24, 24), (29 - 13, 35 - 17, 13, 17), (3, 7, 20, 9), (0, 34, 1, 1), (28, 0, 1, 24), (10, 4, 7, 23)]
    n = len(boxes)
    x = torch.rand(n, 3, 29, 35, generator=torch.Generator().manual_seed(0))
    top, left, h, w = (torch.tensor([float(b[k]) for b in boxes]) for k in range(4))
    for flip in (torch.zeros(n, dtype=torch.bool), torch.arange(n) % 2 == 0):
        ours = pretrain.resized_crop_flip(x, top, left, h, w, flip, 24)
        for i, (t, l, hh, ww) in enumerate(boxes):
            ref = TF.resized_crop(x[i], t, l, hh, ww, [24, 24], interpolation=InterpolationMode.BILINEAR, antialias=True)
            if flip[i]:
                ref = TF.horizontal_flip(ref)
            torch.testing.assert_close(ours[i], ref, rtol=0, atol=AUG_ATOL, msg=lambda m: f"box {boxes[i]} flip {bool(flip[i])}: {m}")


def test_sample_crops_cover_the_ranges():
    H, W, n = 224, 256, 20000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = pretrain.sample_crops(n, H, W, scale, ratio, torch.Generator().manual_seed(0))
    for t in (top, left, h, w):
        assert t.shape == (n,) and torch.equal(t, t.round())
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all() and (h >= 1).all() and (w >= 1).all()
    area, aspect = (h * w / (H * W)).numpy(), (w / h).numpy()
    slack = 0.02  # w and h are rounded to whole pixels
    assert area.min() >= scale[0] * (1 - slack) and area.max() <= 1
    assert ratio[0] * (1 - slack) <= aspect.min() and aspect.max() <= ratio[1] * (1 + slack)
    assert area.min() < 0.085 and area.max() > 0.97  # spans the range
    assert aspect.min() < 0.77 and aspect.max() > 1.3
    assert (top == 0).any() and (top + h == H).any() and (left == 0).any() and (left + w == W).any()  # positions reach every edge
    # same distribution as torchvision's RandomResizedCrop.get_params (fixed seeds: deterministic)
    torch.manual_seed(0)
    tv = np.array([RandomResizedCrop.get_params(torch.empty(3, H, W), list(scale), list(ratio)) for _ in range(3000)], dtype=float)
    tv_area = tv[:, 2] * tv[:, 3] / (H * W)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        assert abs(np.quantile(area, q) - np.quantile(tv_area, q)) < 0.02, q
    assert abs((area > 0.9).mean() - (tv_area > 0.9).mean()) < 0.012  # ~4 standard errors
    assert abs((top / (H - h).clamp(min=1)).mean().item() - 0.5) < 0.02  # uniform placement


def test_sample_crops_fixed_size():
    top, left, h, w = pretrain.sample_crops(2000, 32, 32, (0.25, 0.25), (1.0, 1.0), torch.Generator().manual_seed(0))
    assert (h == 16).all() and (w == 16).all()
    assert set(top.long().tolist()) == set(range(17)) and set(left.long().tolist()) == set(range(17))


@pytest.mark.parametrize("height,width", [(32, 66), (66, 32), (33, 70)])
def test_sample_crops_fallback_matches_torchvision(height, width):
    """No try fits (aspect of the image outside the ratio range, scale near 1): torchvision's centred fallback box."""
    scale, ratio = (0.9, 1.0), (3 / 4, 4 / 3)
    expected = RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio))
    got = pretrain.sample_crops(5, height, width, scale, ratio, torch.Generator().manual_seed(0))
    for k in range(5):
        assert tuple(int(t[k]) for t in got) == tuple(expected)


AUG = pretrain.AUGMENT
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


@pytest.mark.parametrize("size", [32, 24])
def test_augment_output(size):
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = pretrain.augment(images, torch.Generator().manual_seed(1), MEAN, STD, size, **AUG)
    assert out.shape == (12, 3, size, size) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.equal(out, pretrain.augment(images, torch.Generator().manual_seed(1), MEAN, STD, size, **AUG))  # seeded
    assert not torch.allclose(out, pretrain.augment(images, torch.Generator().manual_seed(2), MEAN, STD, size, **AUG))
    assert not torch.allclose(out[0], out[1])  # the views of one image differ


@pytest.mark.parametrize("p_jitter", [0.0, 1.0])
def test_augment_identity_settings(p_jitter):
    """Full-image crops, zero jitter, no grey / blur / solarize: every view is the normalised image or its mirror."""
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = pretrain.augment(images, torch.Generator().manual_seed(0), MEAN, STD, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                           jitter=(0.0, 0.0, 0.0, 0.0), p_jitter=p_jitter, p_gray=0.0, p_blur=0.0, blur="kernel3", p_solarize=0.0,
                           solarize_threshold=0.5)
    plain = pretrain.normalize(images, MEAN, STD)
    flipped = [not torch.allclose(out[i], plain[i], atol=1e-5) for i in range(16)]
    for i in range(16):
        torch.testing.assert_close(out[i], plain[i].flip(-1) if flipped[i] else plain[i], rtol=0, atol=1e-5)
    assert 0 < sum(flipped) < 16


def test_augment_always_grey():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = pretrain.augment(images, torch.Generator().manual_seed(0), MEAN, STD, 32, **dict(AUG, p_gray=1.0))
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2], rtol=0, atol=1e-5)


def natural_images(n, size=32, seed=0):
    """uint8 images that look like photographs to a blur: smooth shading, a few sharp-edged shapes, a little noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        for _ in range(3):
            cy, cx, r = (torch.randint(0, size, (3,), generator=g) // torch.tensor([1, 1, 3])).tolist()
            coarse[i][:, (yy - cy) ** 2 + (xx - cx) ** 2 < (r + 2) ** 2] = torch.rand(3, 1, generator=g)
    return ((coarse + 0.03 * torch.randn(coarse.shape, generator=g)).clamp(0, 1) * 255).round().byte()


@pytest.mark.parametrize("threshold,reference", [
    (1 / 255, lambda im: v2.RandomSolarize(0.5, p=1.0)(im)),  # the MMCR reference: RandomSolarize(0.5) on a PIL image
    (128 / 255, lambda im: ImageOps.solarize(im)),  # the EMP-SSL reference: ImageOps.solarize's default threshold 128
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
    expected = torch.stack([torch.from_numpy(np.array(TF.to_pil_image(x).filter(ImageFilter.GaussianBlur(sigma)))).permute(2, 0, 1)
                            for x in images]).float()
    ours = pretrain.pil_gaussian_blur(images.float() / 255, torch.full((16,), sigma)) * 255
    per_image = (ours - expected).abs().mean((1, 2, 3))
    assert per_image.max() <= 2.0, per_image  # Pillow rounds to uint8 after each of its 6 passes; we do not
    if sigma >= 1.0:  # much wider than the 3x3 kernel: that one would miss Pillow's result by far more
        narrow = (pretrain.gaussian_blur(images.float() / 255, torch.full((16,), sigma)) * 255 - expected).abs().mean((1, 2, 3))
        assert narrow.mean() > 2 * per_image.mean()


@pytest.mark.parametrize("module", [pretrain, empssl])
def test_augment_probabilities(module):
    """4,096 views of one colourful image: the fractions of grey and of solarized views are the recipe's p."""
    n, aug = 4096, module.AUGMENT
    image = natural_images(1, seed=2).expand(n, -1, -1, -1)
    zero, one = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    views = module.augment(image, torch.Generator().manual_seed(0), zero, one, 32, **aug)
    grey = (views[:, 0] == views[:, 1]).flatten(1).all(1) & (views[:, 0] == views[:, 2]).flatten(1).all(1)
    # the same draws with a threshold no pixel reaches: the views that differ are exactly the solarized ones
    plain = module.augment(image, torch.Generator().manual_seed(0), zero, one, 32, **dict(aug, solarize_threshold=2.0))
    solarized = (views != plain).flatten(1).any(1)
    for observed, p in ((grey.float().mean().item(), aug["p_gray"]), (solarized.float().mean().item(), aug["p_solarize"])):
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n), (observed, p)  # 4 standard errors


def test_reference_recipes():
    """The defaults that reproduce the reference implementations (see README, Fidelity)."""
    assert pretrain.AUGMENT["p_gray"] == 0.1 and pretrain.AUGMENT["p_solarize"] == 0.2 and pretrain.AUGMENT["blur"] == "kernel3"
    assert pretrain.AUGMENT["solarize_threshold"] == 1 / 255 and pretrain.Config().grayscale_prob == 0.1
    assert empssl.AUGMENT["blur"] == "pil" and empssl.Config().blur == "pil"
    assert finetune.AUGMENT == pretrain.AUGMENT and finetune.Config().augment == "ssl" and finetune.Config().frozen_bn == "train"
    # CIFAR-10 normalised as the reference's Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)) after ToDtype(scale=True)
    img = natural_images(1)[0]
    reference = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))])
    torch.testing.assert_close(pretrain.normalize(img[None], *pretrain.CIFAR_STATS["cifar10"])[0], reference(TF.to_pil_image(img)))
    # --unscaled-inputs: the EMP-SSL reference's ToDtype without scale, then Normalize(0.5, 0.5)
    unscaled = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32), v2.Normalize((0.5,) * 3, (0.5,) * 3)])
    torch.testing.assert_close(pretrain.normalize(img[None], (0.5 / 255,) * 3, (0.5 / 255,) * 3)[0], unscaled(TF.to_pil_image(img)),
                               rtol=1e-5, atol=1e-3)


def test_finetune_ssl_views_are_the_pretraining_augmentation():
    images = natural_images(6)
    ours = finetune.train_views(images, torch.Generator().manual_seed(3), MEAN, STD, "ssl")
    assert torch.equal(ours, pretrain.augment(images, torch.Generator().manual_seed(3), MEAN, STD, 32, **pretrain.AUGMENT))


@pytest.mark.parametrize("frozen_bn", ["train", "eval"])
def test_frozen_backbone_batchnorm(frozen_bn):
    """--frozen-bn train: the frozen backbone re-estimates its BatchNorm statistics while the probe trains (the
    reference); eval: they stay those of pretraining. The weights never change, and the test pass is in eval mode."""
    model = finetune.Classifier(10, frozen=True, frozen_bn=frozen_bn)
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


# ----------------------------------------------------------------------------- data loading


def test_load_image_folder(image_folder, tmp_path):
    root = os.path.join(image_folder, "train")
    images, labels, classes = pretrain.load_image_folder(root, 32, str(tmp_path / "cache"))
    assert classes == list(CLASSES)
    assert images.shape == (3 * TRAIN_PER_CLASS, 3, 32, 32) and images.dtype == torch.uint8  # notes.txt / README.md skipped
    assert labels.tolist() == [c for c in range(3) for _ in range(TRAIN_PER_CLASS)]
    names = sorted(n for n in os.listdir(os.path.join(root, CLASSES[0])) if not n.endswith(".txt"))
    for i, name in enumerate(names):  # grey files decode to three equal channels, colour files do not
        assert torch.equal(images[i, 0], images[i, 1]) == ("_gray" in name), name
    assert images[labels == 0, 0].float().mean() > images[labels == 0, 2].float().mean() + 50  # class 0 is red
    cached = os.listdir(tmp_path / "cache")
    assert len(cached) == 1 and cached[0].endswith(".pt")
    again = pretrain.load_image_folder(root, 32, str(tmp_path / "cache"))  # from the cache
    assert torch.equal(again[0], images) and torch.equal(again[1], labels) and again[2] == classes


# ----------------------------------------------------------------------------- 3. kNN


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


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 23, 1024])  # 23 test samples: chunks smaller than, not dividing, equal to, larger than
@pytest.mark.parametrize("num_classes,k", [(7, 5), (3, 10), (7, 40)])
def test_knn_matches_brute_force(chunk_size, num_classes, k):
    g = torch.Generator().manual_seed(num_classes)
    train, test = torch.randn(40, 16, generator=g) * 5, torch.randn(23, 16, generator=g)
    train_labels, test_labels = torch.randint(0, num_classes, (40,), generator=g), torch.randint(0, num_classes, (23,), generator=g)
    test[:num_classes] = train[:num_classes] * 2  # some exact matches, so accuracy is not near zero
    test_labels[:num_classes] = train_labels[:num_classes]
    expected = brute_force_knn(train, train_labels, test, k, 0.5, num_classes)
    scores = knn_scores(train, train_labels, test, k, 0.5, num_classes, chunk_size=chunk_size)
    assert scores.shape == (23, num_classes)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    top1, top5 = knn_accuracy(train, train_labels, test, test_labels, k, 0.5, num_classes, chunk_size=chunk_size)
    e1, e5_lo, e5_hi = brute_force_accuracy(expected, test_labels)
    assert top1 == pytest.approx(e1, abs=1e-4) and e5_lo - 1e-4 <= top5 <= e5_hi + 1e-4
    assert top1 > 0 and (top5 < 100 or num_classes <= 5)
    if k >= 40:  # every class gets votes: no ties, so top-5 is exact
        assert e5_lo == e5_hi


def test_knn_k_larger_than_bank_is_clamped(monkeypatch):
    monkeypatch.setattr(knn, "_warned", set())
    g = torch.Generator().manual_seed(0)
    train, test, labels = torch.randn(6, 8, generator=g), torch.randn(9, 8, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.warns(UserWarning, match=r"k=50 is larger than the memory bank \(6 samples\); using k=6"):
        scores = knn_scores(train, labels, test, 50, 0.1, 3, chunk_size=4)
    torch.testing.assert_close(scores, knn_scores(train, labels, test, 6, 0.1, 3))
    torch.testing.assert_close(scores.double(), brute_force_knn(train, labels, test, 50, 0.1, 3), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():  # once per (k, bank size), not on every evaluation
        warnings.simplefilter("error")
        knn_scores(train, labels, test, 50, 0.1, 3)


# ----------------------------------------------------------------------------- 4. schedule


def test_lr_schedule():
    base, total, warmup = 2.0, 110, 10
    assert lr_at(0, total, warmup, base) == pytest.approx(base / warmup)  # first warm-up step
    assert lr_at(4, total, warmup, base) == pytest.approx(base * 5 / warmup)
    assert lr_at(warmup - 1, total, warmup, base) == pytest.approx(base)  # end of warm-up
    assert lr_at(warmup, total, warmup, base) == pytest.approx(base)  # start of the cosine
    assert lr_at(warmup + (total - warmup) // 2, total, warmup, base) == pytest.approx(base / 2)  # middle of the cosine
    assert lr_at(total - 1, total, warmup, base) == pytest.approx(base * math.sin(math.pi / 200) ** 2)  # last step: small, > 0
    lrs = [lr_at(s, total, warmup, base) for s in range(total)]
    assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup])) and all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert min(lrs) > 0 and max(lrs) == pytest.approx(base)
    # no warm-up: starts at the peak; a single step does not divide by zero
    assert lr_at(0, 8, 0, base) == pytest.approx(base) and lr_at(0, 1, 0, base) == pytest.approx(base)


# ----------------------------------------------------------------------------- 7. atomic checkpoints


def test_atomic_save_survives_a_failing_save(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    atomic_save({"step": 1, "w": torch.arange(10.0)}, path)
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind
    before = open(path, "rb").read()

    real_save, targets = torch.save, []

    def dying_save(obj, f, *args, **kwargs):  # writes half a file, then the process "dies"
        targets.append(f)
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert targets and os.path.abspath(targets[0]) != os.path.abspath(path)  # written elsewhere first
    assert open(path, "rb").read() == before
    d = load(path)
    assert d["step"] == 1 and torch.equal(d["w"], torch.arange(10.0))
    atomic_save({"step": 3}, path)  # a later save replaces the file
    assert load(path)["step"] == 3


# ----------------------------------------------------------------------------- 5. end to end


def test_end_to_end(trained_run, image_folder):
    proc, out, data_dir = trained_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(f for f in os.listdir(out)) == ["best.pt", "config.json", "last.pt", "metrics.jsonl", "views.png"]
    assert os.listdir(os.path.join(data_dir, "cache"))  # decoded ImageFolder cached under --data-dir
    # 8 rows (the first images of the batch), each the image and its 4 views, 32 px with 1 px between
    assert Image.open(os.path.join(out, "views.png")).size == (5 * 33 + 1, 8 * 33 + 1)
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["num_train"], config["num_test"], config["num_classes"], config["world_size"]) == (3 * TRAIN_PER_CLASS, 3 * TEST_PER_CLASS, 3, 1)
    assert config["steps_per_epoch"] == STEPS_PER_EPOCH and config["num_views"] == 4
    metrics = read_metrics(out)
    assert len(metrics) == 2
    total = 2 * STEPS_PER_EPOCH
    for epoch, m in enumerate(metrics, 1):
        assert set(m) == METRIC_KEYS
        assert (m["epoch"], m["step"]) == (epoch, epoch * STEPS_PER_EPOCH)
        assert math.isfinite(m["loss"]) and -math.sqrt(8 * 8) <= m["loss"] < 0  # -||C||_* of 8 centroids of unit vectors
        assert m["lr"] == pytest.approx(lr_at(m["step"] - 1, total, int(0.1 * total), 1e-3))
        assert 0 <= m["knn_top1"] <= m["knn_top5"] <= 100 and m["epoch_seconds"] > 0 and m["views_per_second"] > 0
    printed = re.findall(r"^epoch \d+/2 step \d+ loss \S+ lr \S+ knn top1 ([\d.]+) top5 ([\d.]+)", proc.stdout, re.M)
    assert [(float(a), float(b)) for a, b in printed] == [(pytest.approx(m["knn_top1"], abs=0.006), pytest.approx(m["knn_top5"], abs=0.006)) for m in metrics]
    assert re.search(r"^done: best knn top1 [\d.]+ top5 [\d.]+ \(epoch [12]\)", proc.stdout, re.M)
    last, best = load(os.path.join(out, "last.pt")), load(os.path.join(out, "best.pt"))
    assert last["script"] == "mmcr_pretrain" and last["step"] == total and last["epoch"] == 2
    assert best["best"]["knn_top1"] == max(m["knn_top1"] for m in metrics)
    assert best["step"] == best["best"]["epoch"] * STEPS_PER_EPOCH
    model = pretrain.MMCRModel(128)
    model.load_state_dict(last["model"])  # strict: the checkpoint is the whole model
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- 6. interrupt and resume


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited early with {proc.returncode}: {proc.communicate()[1][-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def metrics_lines(path):
    try:
        with open(path) as f:
            return f.read().count("\n")
    except FileNotFoundError:
        return 0


def test_sigterm_then_resume_gives_the_uninterrupted_weights(trained_run, image_folder, tmp_path):
    _, uninterrupted, _ = trained_run
    out = tmp_path / "run"
    args = ["--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir", out, "--resume", "auto", *TINY]
    proc = subprocess.Popen([sys.executable, MMCR, *map(str, args)], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: metrics_lines(out / "metrics.jsonl") >= 1, proc)  # epoch 1 done: interrupt early in epoch 2
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted: saved" in stderr
    saved = load(out / "last.pt")
    assert STEPS_PER_EPOCH < saved["step"] < 2 * STEPS_PER_EPOCH  # mid-epoch: the augmentation RNG state must be restored
    assert metrics_lines(out / "metrics.jsonl") == 1

    resumed = run(args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'last.pt'} at step {saved['step']}" in resumed.stdout
    final, reference = load(out / "last.pt"), load(os.path.join(uninterrupted, "last.pt"))
    assert final["step"] == reference["step"] == 2 * STEPS_PER_EPOCH
    assert final["model"].keys() == reference["model"].keys()
    for name, value in reference["model"].items():
        assert torch.equal(final["model"][name], value), name
    for a, b in zip(final["optimizer"]["state"].values(), reference["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    metrics, ref_metrics = read_metrics(out), read_metrics(uninterrupted)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["knn_top1"] for m in metrics] == [m["knn_top1"] for m in ref_metrics]


def test_ctrl_c_saves_and_exits_cleanly(image_folder, tmp_path):
    out = tmp_path / "run"
    # 50 epochs: however fast the machine, the run is still going when Ctrl-C arrives
    args = ["--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir", out, *TINY, "--max-epochs", "50"]
    proc = subprocess.Popen([sys.executable, MMCR, *map(str, args)], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def config_written():
        try:
            return json.load(open(out / "config.json"))["steps_per_epoch"] > 0
        except (FileNotFoundError, ValueError):
            return False

    try:
        wait_for(config_written, proc)  # the handlers are installed right after config.json
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("interrupted: saved") and "--resume auto" in lines[0]
    saved = load(out / "last.pt")
    assert 1 <= saved["step"] < 50 * STEPS_PER_EPOCH and saved["script"] == "mmcr_pretrain"
    assert metrics_lines(out / "metrics.jsonl") <= saved["step"] // STEPS_PER_EPOCH
    assert not os.path.exists(out / "last.pt.tmp")


# ----------------------------------------------------------------------------- 8. DDP


def test_torchrun_two_cpu_processes(image_folder, tmp_path):
    out = tmp_path / "run"
    proc = run(["--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir", out, *TINY], cwd=tmp_path,
               launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    config = json.load(open(out / "config.json"))
    assert config["world_size"] == 2 and config["steps_per_epoch"] == STEPS_PER_EPOCH
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2] and all(set(m) == METRIC_KEYS for m in metrics)
    assert all(math.isfinite(m["loss"]) and m["knn_top1"] is not None for m in metrics)
    last = load(out / "last.pt")
    assert last["step"] == 2 * STEPS_PER_EPOCH and len(last["aug_rng"]) == 2  # every rank's augmentation RNG
    assert not torch.equal(last["aug_rng"][0], last["aug_rng"][1])
    assert len(re.findall(r"^epoch \d/2 step", proc.stdout, re.M)) == 2  # printed once, by rank 0


LMBDAS = (0.0, 0.4)


def _ddp_loss_worker(rank, world, init_file, z_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        z_all = torch.load(z_file)
        per = len(z_all) // world
        results = {}
        for lmbda in LMBDAS:
            z = z_all[rank * per:(rank + 1) * per].clone().requires_grad_(True)
            loss = mmcr_loss(z, lmbda)
            loss.backward()
            results[lmbda] = (loss.detach(), z.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_loss_equals_single_process_loss(tmp_path):
    world, z_all = 2, torch.randn(10, 4, 6, generator=torch.Generator().manual_seed(0))  # global batch 10 > dim 6
    torch.save(z_all, tmp_path / "z.pt")
    mp.spawn(_ddp_loss_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "z.pt"), str(tmp_path)), nprocs=world, join=True)
    per = len(z_all) // world
    for lmbda in LMBDAS:
        z = z_all.clone().requires_grad_(True)
        loss = mmcr_loss(z, lmbda)
        loss.backward()
        for rank in range(world):
            rank_loss, rank_grad = torch.load(tmp_path / f"rank{rank}.pt")[lmbda]
            torch.testing.assert_close(rank_loss, loss.detach(), rtol=1e-5, atol=1e-6)
            # every rank computes the global loss: the gather's backward sums world_size equal gradients
            torch.testing.assert_close(rank_grad / world, z.grad[rank * per:(rank + 1) * per], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- 9. bad input


def bad_input_case(name, image_folder, tmp_path):
    """(extra arguments, a string the error line must contain) for each bad input."""
    folder = ["--dataset", image_folder]
    if name == "missing dataset":
        return ["--dataset", tmp_path / "no_such_dataset"], "no_such_dataset"
    if name == "no images":
        for s in ("train", "test"):
            os.makedirs(tmp_path / "empty" / s / "cat")
            (tmp_path / "empty" / s / "cat" / "notes.txt").write_text("no images here")
        return ["--dataset", tmp_path / "empty"], "no images found"
    if name == "corrupt image":
        root = make_image_folder(tmp_path / "corrupt", 2, 1)
        broken = tmp_path / "corrupt" / "train" / "dog" / "broken.jpg"
        broken.write_bytes(os.urandom(500))
        return ["--dataset", root, "--batch-size", "2"], str(broken)
    if name == "one view":
        return [*folder, "--num-views", "1"], "--num-views"
    if name == "batch larger than training set":
        return [*folder, "--batch-size", "1000"], "larger than the training set"
    if name == "resume missing checkpoint":
        return [*folder, "--resume", tmp_path / "missing.pt"], "missing.pt does not exist"
    if name == "resume corrupt checkpoint":
        (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))
        return [*folder, "--resume", tmp_path / "garbage.pt"], "garbage.pt is not a readable checkpoint"
    if name == "resume foreign checkpoint":
        torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
        return [*folder, "--resume", tmp_path / "foreign.pt"], "not a checkpoint written by these scripts"
    if name == "empty class folder":
        root = make_image_folder(tmp_path / "holes", 2, 1)
        os.makedirs(tmp_path / "holes" / "train" / "zebra")
        return ["--dataset", root, "--batch-size", "2"], "zebra"
    if name == "output dir is a file":
        (tmp_path / "run").write_text("a file where the run folder should go")
        return folder, "File exists"
    if name == "cifar10 offline":
        os.makedirs(tmp_path / "empty_data")
        return ["--dataset", "cifar10", "--data-dir", tmp_path / "empty_data"], "offline"
    raise ValueError(name)


@pytest.mark.parametrize("name", ["missing dataset", "no images", "corrupt image", "one view", "batch larger than training set",
                                  "resume missing checkpoint", "resume corrupt checkpoint", "resume foreign checkpoint", "cifar10 offline",
                                  "empty class folder", "output dir is a file"])
def test_bad_input_one_line_exit_2(name, image_folder, tmp_path):
    args, must_contain = bad_input_case(name, image_folder, tmp_path)
    if "--data-dir" not in args:
        args = [*args, "--data-dir", tmp_path / "data"]
    proc = run([*TINY, *args, "--output-dir", tmp_path / "run"], cwd=tmp_path)  # later flags win
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("mmcr_pretrain.py: error: ") and must_contain in lines[0], lines[0]
    assert not os.path.isdir(tmp_path / "run") or not os.path.exists(tmp_path / "run" / "last.pt")
    if name == "cifar10 offline":
        assert "https://www.cs.toronto.edu/~kriz/cifar.html" in lines[0] and "ImageFolder" in lines[0]


def test_resume_takes_the_command_lines_recipe(trained_run, image_folder, tmp_path):
    """A resumed run follows its own flags: --max-epochs extends a finished run, --weight-decay replaces the saved one."""
    _, uninterrupted, data_dir = trained_run
    os.makedirs(tmp_path / "run")
    shutil.copy(os.path.join(uninterrupted, "last.pt"), tmp_path / "run" / "last.pt")
    proc = run(["--dataset", image_folder, "--data-dir", data_dir, "--output-dir", tmp_path / "run", "--resume", "auto", *TINY,
                "--max-epochs", 3, "--weight-decay", 0.5], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = load(tmp_path / "run" / "last.pt")
    assert last["step"] == 3 * STEPS_PER_EPOCH and [m["epoch"] for m in read_metrics(tmp_path / "run")] == [3]
    assert [g["weight_decay"] for g in last["optimizer"]["param_groups"]] == [0.5]


# ============================================================================= mmcr_finetune.py


FINETUNE_KEYS = {"epoch", "step", "train_loss", "lr", "test_loss", "top1", "top5", "epoch_seconds", "images_per_second"}


def run_script(script, args, cwd, timeout=300):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def backbone_of(state):
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


@pytest.mark.parametrize("finetune_type", ["linear", "backbone+linear"])
def test_finetune_end_to_end(trained_run, image_folder, tmp_path, finetune_type):
    _, pretrained, data_dir = trained_run
    out = tmp_path / "ft"
    proc = run_script(FINETUNE, ["--checkpoint", os.path.join(pretrained, "best.pt"), "--data-dir", data_dir, "--output-dir", out,
                                 "--finetune-type", finetune_type, "--batch-size", 8, "--max-epochs", 2, "--num-neighbours", 5,
                                 "--device", "cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^loaded backbone of .*: knn top1 [\d.]+ top5 [\d.]+", proc.stdout, re.M)
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2] and all(set(m) == FINETUNE_KEYS for m in metrics)
    assert all(math.isfinite(m["train_loss"]) and 0 <= m["top1"] <= m["top5"] <= 100 for m in metrics)
    assert re.search(r"^done: best top1 [\d.]+ top5 [\d.]+", proc.stdout, re.M)
    before, after = backbone_of(load(os.path.join(pretrained, "best.pt"))["model"]), backbone_of(load(out / "last.pt")["model"])
    assert before.keys() == after.keys()
    same = {k: torch.equal(before[k], after[k]) for k in before}
    statistics = {k for k in before if "running_" in k or "num_batches" in k}
    if finetune_type == "linear":  # weights untouched; --frozen-bn train (default): BatchNorm statistics re-estimated
        assert all(same[k] for k in before if k not in statistics) and not all(same[k] for k in statistics)
    else:
        assert not all(same.values())
    assert load(out / "last.pt")["script"] == "mmcr_finetune"


def test_finetune_linear_probe_learns(trained_run, image_folder, tmp_path):
    """33 points in a 512-d feature space are linearly separable whatever their labels: with test = train,
    a linear probe that really trains reaches 100% (on cached features, --augment none)."""
    _, pretrained, _ = trained_run
    root = tmp_path / "same"
    shutil.copytree(os.path.join(image_folder, "train"), root / "train")
    shutil.copytree(os.path.join(image_folder, "train"), root / "test")
    out = tmp_path / "ft"
    proc = run_script(FINETUNE, ["--checkpoint", os.path.join(pretrained, "best.pt"), "--dataset", root, "--data-dir", tmp_path / "data",
                                 "--output-dir", out, "--augment", "none", "--frozen-bn", "eval", "--batch-size", 8, "--max-epochs", 60, "--learning-rate", 0.05,
                                 "--warmup-duration", 0, "--eval-every", 10, "--num-neighbours", 5, "--device", "cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training the linear layer on cached features" in proc.stdout
    metrics = read_metrics(out)
    assert metrics[0]["top1"] is None and metrics[9]["top1"] is not None  # --eval-every 10
    assert metrics[-1]["top1"] == 100.0
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] / 3


def reference_and_resumed(script, common, tmp_path, steps):
    """Run `common` uninterrupted into ref/; run it again into run/, SIGTERM it once epoch 1 is written,
    resume with --resume auto. Returns (final last.pt, reference last.pt) for the caller to compare."""
    reference = run_script(script, [*common, "--output-dir", tmp_path / "ref"], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "run"
    args = [*common, "--output-dir", out, "--resume", "auto"]
    proc = subprocess.Popen([sys.executable, script, *map(str, args)], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: metrics_lines(out / "metrics.jsonl") >= 1, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]
    assert load(out / "last.pt")["step"] < steps
    resumed = run_script(script, args, cwd=tmp_path)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    return load(out / "last.pt"), load(tmp_path / "ref" / "last.pt")


def test_finetune_sigterm_then_resume_gives_the_uninterrupted_weights(trained_run, image_folder, tmp_path):
    _, pretrained, data_dir = trained_run
    common = ["--checkpoint", os.path.join(pretrained, "best.pt"), "--data-dir", data_dir, "--finetune-type", "backbone+linear",
              "--batch-size", 8, "--max-epochs", 3, "--num-neighbours", 5, "--device", "cpu"]
    final, ref = reference_and_resumed(FINETUNE, common, tmp_path, 3 * STEPS_PER_EPOCH)
    assert all(torch.equal(final["model"][k], v) for k, v in ref["model"].items())


def finetune_bad_input(name, trained_run, image_folder, tmp_path):
    _, pretrained, data_dir = trained_run
    ckpt = os.path.join(pretrained, "best.pt")
    if name == "missing checkpoint":
        return ["--checkpoint", tmp_path / "nope.pt"], "does not exist"
    if name == "not a checkpoint":
        (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 100)
        return ["--checkpoint", tmp_path / "junk.pt"], "not a readable checkpoint"
    if name == "EMP-SSL checkpoint":
        fake = {k: v for k, v in load(ckpt).items()}
        fake["script"] = "empssl_pretrain"
        torch.save(fake, tmp_path / "empssl.pt")
        return ["--checkpoint", tmp_path / "empssl.pt"], "empssl_pretrain.py, not mmcr_pretrain.py"
    if name == "class count":
        two = make_image_folder(tmp_path / "two", 3, 2)
        for split in ("train", "test"):
            shutil.rmtree(os.path.join(two, split, CLASSES[2]))
        return ["--checkpoint", ckpt, "--dataset", two], "3 classes"
    raise KeyError(name)


@pytest.mark.parametrize("name", ["missing checkpoint", "not a checkpoint", "EMP-SSL checkpoint", "class count"])
def test_finetune_bad_input_one_line_exit_2(name, trained_run, image_folder, tmp_path):
    args, expected = finetune_bad_input(name, trained_run, image_folder, tmp_path)
    proc = run_script(FINETUNE, [*args, "--data-dir", tmp_path / "data", "--output-dir", tmp_path / "out", "--device", "cpu"], cwd=tmp_path)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("mmcr_finetune.py: error:") and expected in lines[0], lines
    if name == "class count":
        assert "has 2" in lines[0]  # both numbers
    assert "Traceback" not in proc.stderr


def test_finetune_crop_flip_copies_pixels():
    """crop-flip = a 4-px zero-padded random crop + flip: every view is a shifted (mirrored) copy of the image."""
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    views = finetune.train_views(images, gen, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "crop-flip") * 255
    padded = torch.nn.functional.pad(images.float(), (4, 4, 4, 4))
    for v, p in zip(views, padded):
        crops = [p[:, t:t + 12, s:s + 12] for t in range(9) for s in range(9)]
        assert any(torch.allclose(v, c, atol=1e-3) or torch.allclose(v, c.flip(-1), atol=1e-3) for c in crops)


# ============================================================================= empssl_pretrain.py


def numpy_tcr(z, eps):
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    m, p, d = z.shape
    rates = [0.5 * np.linalg.slogdet(np.eye(d) + d / (m * eps) * z[:, i].T @ z[:, i])[1] for i in range(p)]
    return float(np.mean(rates))


@pytest.mark.parametrize("shape", [(6, 3, 16), (20, 2, 5)])  # m < d and m > d
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


def test_lars_step_matches_hand_computation():
    lr, wd, mom, eta = 0.3, 1e-4, 0.9, 0.005
    big = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))   # ||w|| = 5
    small = torch.nn.Parameter(torch.tensor([[1e4, 0.0], [0.0, 0.0]]))  # huge weight: trust ratio > lr, clipped to lr
    bias = torch.nn.Parameter(torch.tensor([1.0, -2.0]))               # ndim 1: no adaptation, no weight decay
    big.grad = torch.tensor([[0.0, 2.0], [0.0, 0.0]])                  # ||g|| = 2
    small.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    bias.grad = torch.tensor([0.5, 0.5])
    before = [p.detach().clone() for p in (big, small, bias)]
    empssl.LARS([big, small, bias], lr=lr, weight_decay=wd, momentum=mom, nesterov=True, trust_coefficient=eta).step()
    ratio = eta * 5 / (2 + wd * 5) / lr  # < 1: no clipping
    d_big = (torch.tensor([[0.0, 2.0], [0.0, 0.0]]) + wd * before[0]) * ratio
    d_small = torch.tensor([[1.0, 0.0], [0.0, 0.0]]) + wd * before[1]  # ratio eta * 1e4 / (1 + 1) / lr > 1: clipped to 1
    d_bias = torch.tensor([0.5, 0.5])
    for p, b, d in zip((big, small, bias), before, (d_big, d_small, d_bias)):  # first nesterov step: d + mom * d
        assert torch.allclose(p.detach(), b - lr * (1 + mom) * d, atol=1e-7)


def empssl_run(image_folder, tmp_path):
    """A tiny EMP-SSL run (2 epochs, 4 patches, 64-d embedding); checks its outputs; returns the run folder."""
    out = tmp_path / "run"
    proc = run_script(EMPSSL, ["--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir", out, *EMPSSL_TINY], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"knn top1 [\d.]+ top5 [\d.]+", proc.stdout)
    assert sorted(os.listdir(out)) == ["best.pt", "config.json", "embeddings", "last.pt", "metrics.jsonl", "views.png"]
    for split, n in (("train", 3 * TRAIN_PER_CLASS), ("test", 3 * TEST_PER_CLASS)):
        d = load(out / "embeddings" / f"{split}.pt")
        assert {"embeddings", "labels", "dim", "patches", "checkpoint", "dataset", "classes"} <= set(d)
        assert d["embeddings"].shape == (n, 64) and d["embeddings"].dtype == torch.float16 and d["dim"] == 64
        assert d["labels"].shape == (n,) and d["labels"].dtype == torch.int64 and d["patches"] == 4
        assert torch.isfinite(d["embeddings"].float()).all()
    return out




EMPSSL_TINY = ["--train-patches", "4", "--valid-patches", "4", "--batch-size", "8", "--hidden-dim", "64", "--projection-dim", "32",
               "--num-neighbours", "5", "--max-epochs", "2", "--device", "cpu"]


def test_empssl_sigterm_then_resume_gives_the_uninterrupted_weights(image_folder, tmp_path):
    common = ["--dataset", image_folder, "--data-dir", tmp_path / "data", *EMPSSL_TINY, "--max-epochs", 3]
    final, ref = reference_and_resumed(EMPSSL, common, tmp_path, 3 * STEPS_PER_EPOCH)
    assert all(torch.equal(final["model"][k], v) for k, v in ref["model"].items())
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"])  # the LARS state resumes too
               for a, b in zip(final["optimizer"]["state"].values(), ref["optimizer"]["state"].values()))
    emb, ref_emb = load(tmp_path / "run" / "embeddings" / "test.pt"), load(tmp_path / "ref" / "embeddings" / "test.pt")
    assert torch.equal(emb["embeddings"], ref_emb["embeddings"])


def _ddp_tcr_worker(rank, world, init_file, z_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    z = torch.load(z_file)
    local = z.chunk(world)[rank].clone().requires_grad_()
    tcr = empssl.total_coding_rate(local)
    tcr.backward()
    torch.save({"tcr": tcr.detach(), "grad": local.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_tcr_equals_single_process_tcr(tmp_path):
    z = torch.randn(12, 3, 8, generator=torch.Generator().manual_seed(3))
    torch.save(z, tmp_path / "z.pt")
    mp.spawn(_ddp_tcr_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "z.pt"), str(tmp_path)), nprocs=2)
    single = z.clone().requires_grad_()
    tcr = empssl.total_coding_rate(single)
    tcr.backward()
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["tcr"].item() == pytest.approx(tcr.item(), rel=1e-5)
        assert torch.allclose(r["grad"] / 2, single.grad.chunk(2)[rank], atol=1e-5)


def _gather_rows_worker(rank, world, init_file, n, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = torch.arange(n, dtype=torch.float32).view(-1, 1).repeat(1, 3)[rank::world]  # this rank's share
    torch.save(empssl.gather_rows(rows, n), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("n", [7, 8])  # uneven shares are padded, then cut
def test_gather_rows_puts_every_row_back_in_order(tmp_path, n):
    mp.spawn(_gather_rows_worker, args=(2, str(tmp_path / "init"), n, str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt")[:, 0], torch.arange(n, dtype=torch.float32))


def test_empssl_torchrun_two_cpu_processes(image_folder, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", EMPSSL,
                           *map(str, ["--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir", out, *EMPSSL_TINY,
                                      "--max-epochs", 1])], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(re.findall(r"^epoch 1/1 step \d+ loss \S+ lr \S+ knn top1", proc.stdout, re.M)) == 1  # printed by rank 0 only
    for split, n in (("train", 3 * TRAIN_PER_CLASS), ("test", 3 * TEST_PER_CLASS)):  # every image, gathered from both ranks
        d = load(out / "embeddings" / f"{split}.pt")
        assert d["embeddings"].shape == (n, 64) and torch.isfinite(d["embeddings"].float()).all()


@pytest.mark.parametrize("name", ["one patch", "missing dataset", "MMCR checkpoint"])
def test_empssl_bad_input_one_line_exit_2(name, trained_run, image_folder, tmp_path):
    args = ["--dataset", image_folder, "--data-dir", tmp_path / "data", "--output-dir", tmp_path / "out", *EMPSSL_TINY]
    args += {"one patch": ["--train-patches", 1], "missing dataset": ["--dataset", tmp_path / "nope"],
             "MMCR checkpoint": ["--resume", os.path.join(trained_run[1], "last.pt")]}[name]
    proc = run_script(EMPSSL, args, cwd=tmp_path)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("empssl_pretrain.py: error:"), proc.stderr[-3000:]


# ============================================================================= empssl_linear.py


def write_embeddings(folder, xtr, ytr, xte, yte, classes, **override):
    os.makedirs(folder, exist_ok=True)
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        d = {"embeddings": x.half(), "labels": y, "dim": x.shape[1], "patches": 4, "classes": classes, "checkpoint": "-", "dataset": "-"}
        d.update(override.get(name, {}))
        torch.save(d, os.path.join(folder, f"{name}.pt"))
    return str(folder)


def separated(n, classes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.arange(n) % classes
    return means[y] + torch.randn(n, dim, generator=g), y


@pytest.mark.parametrize("shuffle", [False, True])
def test_linear_probe_learns_from_data_not_label_order(tmp_path, shuffle):
    classes = [f"c{i}" for i in range(10)]
    (xtr, ytr), (xte, yte) = separated(600, 10, 32, 1), separated(300, 10, 32, 2)
    if shuffle:  # labels no longer tied to the data: test accuracy must fall to chance
        ytr = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(5))]
    folder = write_embeddings(tmp_path / "emb", xtr, ytr, xte, yte, classes)
    out = tmp_path / "lin"
    proc = run_script(LINEAR, ["--dataset", folder, "--output-dir", out, "--max-epochs", 5, "--device", "cpu", "--num-neighbours", 20], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]
    assert {"epoch", "train_loss", "lr", "test_loss", "top1", "top5"} <= set(metrics[0])
    assert re.search(r"^done: best top1 [\d.]+ top5 [\d.]+", proc.stdout, re.M)
    if shuffle:
        assert metrics[-1]["top1"] < 25
    else:
        assert metrics[-1]["top1"] > 95
    assert load(out / "best.pt")["model"]["weight"].shape == (10, 32)


def test_empssl_end_to_end_then_linear(image_folder, tmp_path):
    out = empssl_run(image_folder, tmp_path)
    assert [m["knn_top1"] is None for m in read_metrics(out)] == [True, False]  # --eval-every 0: evaluated after the last epoch only
    assert Image.open(out / "views.png").size == (5 * 33 + 1, 8 * 33 + 1)  # 8 images x (image + 4 patches)
    proc = run_script(LINEAR, ["--dataset", out / "embeddings", "--output-dir", tmp_path / "lin", "--max-epochs", 3, "--batch-size", 8,
                               "--num-neighbours", 5, "--device", "cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_metrics(tmp_path / "lin")) == 3


def linear_bad_input(name, tmp_path):
    classes = ["a", "b", "c"]
    x, y = torch.randn(12, 8), torch.arange(12) % 3
    if name == "missing directory":
        return tmp_path / "nope", [], "not a folder"
    if name == "missing test.pt":
        folder = write_embeddings(tmp_path / "e", x, y, x, y, classes)
        os.remove(os.path.join(folder, "test.pt"))
        return folder, [], "test.pt does not exist"
    if name == "wrong keys":
        folder = write_embeddings(tmp_path / "e", x, y, x, y, classes)
        torch.save({"features": x}, os.path.join(folder, "train.pt"))
        return folder, [], "lacks the keys"
    if name == "dims differ":
        return write_embeddings(tmp_path / "e", x, y, torch.randn(12, 6), y, classes), [], "dim 8, test embeddings 6"
    if name == "labels out of range":
        return write_embeddings(tmp_path / "e", x, y + 1, x, y, classes), [], "outside the 3 classes"
    if name == "empty train set":
        return write_embeddings(tmp_path / "e", x[:0], y[:0], x, y, classes), [], "at least one embedding"
    if name == "embedding dim flag":
        return write_embeddings(tmp_path / "e", x, y, x, y, classes), ["--embedding-dim", 16], "disagrees"
    raise KeyError(name)


@pytest.mark.parametrize("name", ["missing directory", "missing test.pt", "wrong keys", "dims differ", "labels out of range", "embedding dim flag",
                                  "empty train set"])
def test_linear_bad_input_one_line_exit_2(name, tmp_path):
    folder, extra, expected = linear_bad_input(name, tmp_path)
    proc = run_script(LINEAR, ["--dataset", folder, "--output-dir", tmp_path / "out", "--device", "cpu", *extra], cwd=tmp_path)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("empssl_linear.py: error:") and expected in lines[0], lines
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("module", [finetune, empssl, empssl_linear])
def test_shared_blocks_are_the_same_code(module):
    """The scripts are copies by design; the blocks they share must not drift apart."""
    import inspect
    for name in ("lr_at", "atomic_save", "read_torch_file", "load_checkpoint", "parse_config"):
        assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(pretrain, name)), name
    if module is not empssl_linear:
        for name in ("load_image_folder", "load_dataset", "sample_crops", "resized_crop_flip", "cifar_resnet18", "normalize"):
            assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(pretrain, name)), name
    if module is not empssl_linear:
        for name in ("augment", "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "gaussian_blur",
                     "pil_gaussian_blur", "solarize", "grayscale", "CIFAR_STATS"):
            assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(pretrain, name)) if callable(getattr(module, name)) \
                else getattr(module, name) == getattr(pretrain, name), name
    if module is empssl:
        for name in ("Gather", "gather", "save_views"):
            assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(pretrain, name)), name
