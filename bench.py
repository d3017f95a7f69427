"""Throughput benchmark on synthetic data, in the spirit of nanoGPT's bench.py: a plain script.

Measures, on whatever device is present: the training steps of mmcr_pretrain.py (augmentation +
forward + loss + backward + Adam), empssl_pretrain.py (the same with the coding rate and LARS) and
mmcr_finetune.py (both types), with peak memory; the batched on-device augmentation against the
per-image torchvision.transforms.v2 pipeline of the reference implementations, alone and as the
reference feeds its GPU (a DataLoader with one worker per core); and the EMP-SSL total coding rate through
the small side (m x m) against the direct d x d logdet.

    python bench.py                                   # CPU: small shape (8 x 4 views), under a minute
    python bench.py --device cuda                     # GPU: the recipe's 64 images x 16 views
    python bench.py --device cuda --compile --only mmcr_step   # one step, model and augmentation compiled
    python bench.py --device cpu --steps 10 --warmup 2     # quicker, noisier

New sections (an EMP-SSL step, a finetune step) are functions bench_xxx(args, device) -> list of rows,
appended to BENCHES.
"""
import argparse
import os
import resource
import sys
import time

import torch
from torchvision.transforms import v2

import empssl_pretrain
import mmcr_finetune
import mmcr_pretrain

MEAN, STD = mmcr_pretrain.CIFAR_STATS["cifar10"]
# The MMCR recipe's augmentation, as mmcr_pretrain.main gives it to augment(), at CIFAR size.
AUG = dict(mmcr_pretrain.AUGMENT, size=32, norm=(MEAN, STD))


def timeit(fn, steps, warmup, device):
    """Mean seconds per call of fn(), after `warmup` untimed calls (compilation, cudnn autotune, caches)."""
    for _ in range(warmup):
        fn()
    # kernels run asynchronously: time on the stream with events
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / steps
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """GPU: peak allocated by torch since reset_peak. CPU: the whole process's peak RSS so far (it never resets)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    # ru_maxrss is in bytes on macOS, KiB elsewhere
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return f"{kib / 1024:.0f} MiB process RSS"


def row(name, views, seconds, memory, notes):
    return dict(name=name, views_s=views / seconds, ms=seconds * 1000, memory=memory, notes=notes)


def train_step(model, optimizer, args, device, inputs, loss_fn):
    """A step as in the scripts' loops: inputs() -> autocast forward -> float32 loss -> (scaled) backward -> update."""
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    ptdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    forward = torch.compile(model) if args.compile else model

    def step():
        x = inputs()
        with torch.autocast(device.type, dtype=ptdtype, enabled=args.precision != "fp32"):
            out = forward(x)
        loss = loss_fn(out)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def step_rows(name, make_step, inputs, views, args, device, shape):
    """Rows for a training step, the same step on one fixed batch of views, and the augmentation alone.

    The augmentation's cost inside the step is the difference of the first two: timed alone it can
    overstate it on a GPU, where its kernel launches may overlap with the previous step's kernels.
    """
    reset_peak(device)
    t_step = timeit(make_step(inputs), args.train_steps, args.warmup, device)
    mem_step = peak_memory(device)
    fixed = inputs()
    t_fixed = timeit(make_step(lambda: fixed), args.train_steps, args.warmup, device)
    reset_peak(device)
    t_aug = timeit(inputs, args.train_steps, args.warmup, device)
    shape = f"on {device.type}, {shape}, {args.precision}{', compiled' if args.compile else ''}"
    share = 100 * (t_step - t_fixed) / t_step
    return [row(name, views, t_step, mem_step, shape),
            row("  the same step on fixed views", views, t_fixed, mem_step,
                f"augmentation's share of the step: {share:.1f}%"),
            row("  augmentation alone", views, t_aug, peak_memory(device),
                f"{100 * t_aug / t_step:.1f}% of the step's time")]


def bench_mmcr_step(args, device):
    """One MMCR training step as in mmcr_pretrain.main, and augmentation alone for the same views."""
    b, v = args.batch_size, args.num_views
    gen = torch.Generator(device).manual_seed(0)
    # stands in for the dataset
    pool = torch.randint(0, 256, (max(1024, b), 3, 32, 32), dtype=torch.uint8, device=device)
    model = mmcr_pretrain.MMCRModel(64, 128).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6, fused=device.type == "cuda")

    def views():
        idx = torch.randint(len(pool), (b,), device=device, generator=gen)
        return mmcr_pretrain.augment(pool[idx].repeat_interleave(v, 0), gen, dict(AUG, compile=args.compile))

    def make_step(inputs):
        return train_step(model, optimizer, args, device, inputs, lambda z: mmcr_pretrain.mmcr_loss(z.view(b, v, -1)))
    return step_rows("mmcr step (aug+fwd+bwd+adam)", make_step, views, b * v, args, device, f"{b} img x {v} views")


def bench_augment_batched(args, device):
    """mmcr_pretrain.augment on one batch of uint8 images already on the device."""
    gen = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (args.aug_views, 3, 32, 32), dtype=torch.uint8, device=device)
    reset_peak(device)
    fn = lambda: mmcr_pretrain.augment(images, gen, dict(AUG, compile=args.compile))
    t = timeit(fn, args.steps, args.warmup, device)
    return [row("augment batched (mmcr_pretrain)", args.aug_views, t, peak_memory(device),
                f"on {device.type}, {args.aug_views} views/call, {torch.get_num_threads()} threads"
                f"{', compiled' if args.compile else ''}")]


def per_image_pipeline():
    """The reference's per-image pipeline with the recipe's parameters, in torchvision.transforms.v2.

    As in the reference, every transform before ToImage runs on the PIL image: solarize compares uint8
    values with the threshold (255 x ours, which is in [0, 1] units).
    """
    # the same numbers as the batched pipeline
    a = AUG
    return v2.Compose([
        v2.RandomResizedCrop(a["size"], scale=a["scale"], ratio=a["ratio"]),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(*a["jitter"])], p=a["p_jitter"]),
        v2.RandomGrayscale(p=a["p_gray"]),
        v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 2.0))], p=a["p_blur"]),
        v2.RandomSolarize(a["solarize_threshold"] * 255, p=a["p_solarize"]),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def bench_augment_per_image(args, device):
    """The per-image pipeline on CPU PIL images, one process, image by image (as the reference's workers do)."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.aug_views, 3, 32, 32), dtype=torch.uint8)
    # The reference's CIFAR dataset hands PIL images to the transform; converting them here, untimed,
    # leaves that (amortised over the views of an image) out of the baseline: a conservative speedup.
    pil = [v2.functional.to_pil_image(x) for x in images]
    transform = per_image_pipeline()
    cpu = torch.device("cpu")
    # A pass over all images is slow (about 1000x a single image), so fewer timed passes suffice.
    t = timeit(lambda: [transform(x) for x in pil], max(1, args.steps // 4), min(1, args.warmup), cpu)
    return [row("augment per-image (torchvision v2)", args.aug_views, t, peak_memory(cpu),
                f"on cpu (as the reference), PIL, 1 process, {torch.get_num_threads()} threads")]


class MultiViewImages(torch.utils.data.Dataset):
    """The reference's training dataset: PIL images, each returned as a stack of V independently transformed views."""

    def __init__(self, images, views, transform):
        self.images, self.views, self.transform = images, views, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.stack([self.transform(self.images[i]) for _ in range(self.views)])


def bench_reference_loader(args, device):
    """The reference-style input pipeline: per-image v2 transforms in DataLoader workers, batches moved to the device.

    This is what feeds the GPU in the reference implementations (Lightning DataLoader, PIL CIFAR images,
    views transformed one by one in worker processes). Its views/s bounds the reference's training speed
    from above, whatever the GPU: our step's views/s divided by it is the speed-up of switching.
    """
    b, v = args.batch_size, args.num_views
    torch.manual_seed(0)
    # enough images for every warm-up and timed batch within one pass of the loader
    n = max(4096, (args.loader_workers + args.loader_batches + 1) * b)
    pil = [v2.functional.to_pil_image(x) for x in torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)]
    loader = torch.utils.data.DataLoader(MultiViewImages(pil, v, per_image_pipeline()), batch_size=b, shuffle=True,
                                         drop_last=True,
                                         num_workers=args.loader_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.loader_workers > 0)
    batches = iter(loader)
    # Untimed: starting the workers and their first round of batches, which all arrive at once. The timed
    # batches are then several rounds of every worker, so the prefetched queue does not inflate the rate.
    for _ in range(max(1, args.loader_workers)):
        next(batches)
    reset_peak(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.loader_batches):
        x = next(batches).to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / args.loader_batches
    del batches, x
    return [row("reference-style loader (v2, DataLoader)", b * v, seconds, peak_memory(device),
                f"{b} img x {v} views, {args.loader_workers} workers, {os.cpu_count()} cpus, to {device.type}")]


def bench_empssl_step(args, device):
    """One EMP-SSL training step as in empssl_pretrain.main (patches, 4096-d embedding, TCR + similarity, LARS)."""
    b, p = args.empssl_batch_size, args.patches
    gen = torch.Generator(device).manual_seed(0)
    pool = torch.randint(0, 256, (max(1024, b), 3, 32, 32), dtype=torch.uint8, device=device)
    model = empssl_pretrain.EMPSSLModel(64, 4096, 1024).to(device, memory_format=torch.channels_last)
    optimizer = empssl_pretrain.LARS(model.parameters(), lr=0.3, weight_decay=1e-4)

    def patches():
        idx = torch.randint(len(pool), (b,), device=device, generator=gen)
        aug = dict(empssl_pretrain.AUGMENT, size=32, norm=((0.5,) * 3, (0.5,) * 3), compile=args.compile)
        return empssl_pretrain.augment(pool[idx].repeat_interleave(p, 0), gen, aug)

    def loss_fn(out):
        z = out[1].view(b, p, -1)
        return -empssl_pretrain.total_coding_rate(z) - 200 * empssl_pretrain.patch_similarity(z)

    def make_step(inputs):
        return train_step(model, optimizer, args, device, inputs, loss_fn)
    return step_rows("empssl step (aug+fwd+bwd+lars)", make_step, patches, b * p, args, device,
                     f"{b} img x {p} patches")


def bench_blur(args, device):
    """The two blurs of augment() on every view of an EMP-SSL step: torchvision's 3x3 kernel and PIL's."""
    n = args.empssl_batch_size * args.patches
    x = torch.rand(n, 3, 32, 32, device=device, generator=torch.Generator(device).manual_seed(0))
    sigma = torch.empty(n, device=device).uniform_(0.1, 2.0)
    t3 = timeit(lambda: mmcr_pretrain.gaussian_blur(x, sigma), args.steps, args.warmup, device)
    tp = timeit(lambda: empssl_pretrain.pil_gaussian_blur(x, sigma), args.steps, args.warmup, device)
    return [row("blur 3x3 (mmcr)", n, t3, peak_memory(device),
                f"{n} views, every view blurred (augment blurs all, keeps 10%)"),
            row("blur pil radius sigma (empssl)", n, tp, peak_memory(device), f"{tp / t3:.1f}x the 3x3 blur")]


def direct_tcr(z, eps=0.2):
    """The coding rate as written, 1/2 logdet(I_d + d/(m eps) Z^T Z) on the d x d side: the baseline."""
    z = torch.nn.functional.normalize(z.float(), dim=-1).transpose(0, 1)
    m, d = z.shape[1], z.shape[2]
    return 0.5 * torch.logdet(torch.eye(d, device=z.device) + d / (m * eps) * z.transpose(1, 2) @ z).mean()


def bench_tcr(args, device):
    """total_coding_rate (m x m Gram matrix, Cholesky) against the direct d x d logdet, at the recipe's shape."""
    z = torch.randn(100, 20, 1024, device=device, generator=torch.Generator(device).manual_seed(0))
    small, direct = empssl_pretrain.total_coding_rate(z), direct_tcr(z)
    steps = max(1, args.train_steps // 2)
    t_small = timeit(lambda: empssl_pretrain.total_coding_rate(z), steps, 1, device)
    t_direct = timeit(lambda: direct_tcr(z), steps, 1, device)
    note = (f"100 x 20 patches x 1024-d; {t_direct / t_small:.1f}x faster than direct; "
            f"values differ by {abs(small - direct).item():.1e}")
    return [row("tcr small side (m x m)", 2000, t_small, peak_memory(device), note),
            row("tcr direct (d x d)", 2000, t_direct, peak_memory(device), "logdet of 20 matrices 1024 x 1024")]


def bench_mmcr_loss(args, device):
    """The MMCR loss alone, forward and backward, at the step's shape: svdvals of the 64 x 128 centroid matrix (the
    backward needs the full SVD). Its share of the step, and the host sync it makes, tell whether the SVD matters."""
    b, v = args.batch_size, args.num_views
    z = torch.randn(b, v, 128, device=device, generator=torch.Generator(device).manual_seed(0), requires_grad=True)

    def loss_step():
        mmcr_pretrain.mmcr_loss(z).backward()
        z.grad = None
    t = timeit(loss_step, args.train_steps, args.warmup, device)
    return [row("mmcr loss (svdvals, fwd+bwd)", b * v, t, peak_memory(device), f"{b} x {v} x 128, float32")]


def bench_finetune_step(args, device):
    """One mmcr_finetune.py step (ssl crop + flip, classifier forward, cross-entropy, Adam) for both types."""
    b = args.finetune_batch_size
    gen = torch.Generator(device).manual_seed(0)
    pool = torch.randint(0, 256, (max(1024, b), 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (b,), device=device)

    def images():
        idx = torch.randint(len(pool), (b,), device=device, generator=gen)
        return mmcr_finetune.train_views(pool[idx], gen, dict(mmcr_finetune.AUGMENT, size=32, norm=(MEAN, STD)), "ssl")

    rows = []
    for finetune_type in ("linear", "backbone+linear"):
        model = mmcr_finetune.Classifier(mmcr_finetune.ResNet18(64), 10, frozen=finetune_type == "linear")
        model = model.to(device, memory_format=torch.channels_last)
        trained = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.Adam(trained, lr=0.01, fused=device.type == "cuda")
        loss_fn = lambda logits: torch.nn.functional.cross_entropy(logits.float(), labels)
        step = train_step(model, optimizer, args, device, images, loss_fn)
        reset_peak(device)
        t = timeit(step, args.train_steps, args.warmup, device)
        rows.append(row(f"finetune step ({finetune_type})", b, t, peak_memory(device),
                        f"images/s, batch {b}, {args.precision}"))
    # --finetune-type linear --augment none: the linear layer alone on cached 512-d features
    features = torch.randn(len(pool), 512, device=device)
    fc = torch.nn.Linear(512, 10).to(device)
    optimizer = torch.optim.Adam(fc.parameters(), lr=0.01)

    def cached_step():
        idx = torch.randint(len(features), (b,), device=device, generator=gen)
        loss = torch.nn.functional.cross_entropy(fc(features[idx]), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t = timeit(cached_step, args.steps, args.warmup, device)
    rows.append(row("finetune step (linear, cached features)", b, t, peak_memory(device),
                    f"images/s; 50 epochs of CIFAR-10 at this speed: {50 * 50000 / (b / t):.1f} s"))
    return rows


BENCHES = [bench_mmcr_step, bench_augment_batched, bench_augment_per_image, bench_reference_loader, bench_empssl_step,
           bench_blur, bench_tcr, bench_mmcr_loss, bench_finetune_step]


class Parser(argparse.ArgumentParser):
    # bad flags: one line on stderr, exit code 2 (argparse also prints usage)
    def error(self, message):
        print(f"bench.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 if supported, else fp16 on GPU, fp32 on CPU (as mmcr_pretrain.py)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model and the augmentation, as the scripts' --compile")
    p.add_argument("--batch-size", type=int, help="images per MMCR step (default 64 on GPU, 8 on CPU)")
    p.add_argument("--num-views", type=int, help="views per image (default 16 on GPU, 4 on CPU)")
    p.add_argument("--aug-views", type=int, default=1024, help="views per call of the augmentation benchmarks")
    p.add_argument("--steps", type=int, default=100,
                   help="timed iterations (the per-image pipeline, 1000x slower per call, does steps/4)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 10 on GPU, 5 on CPU)")
    p.add_argument("--train-steps", type=int, help="timed training steps (default 50 on GPU, 10 on CPU)")
    p.add_argument("--empssl-batch-size", type=int, help="images per EMP-SSL step (default 100 on GPU, 4 on CPU)")
    p.add_argument("--patches", type=int, help="patches per image in the EMP-SSL step (default 20 on GPU, 4 on CPU)")
    p.add_argument("--finetune-batch-size", type=int, help="images per finetune step (default 1024 on GPU, 32 on CPU)")
    p.add_argument("--loader-workers", type=int, default=os.cpu_count(),
                   help="DataLoader workers of the reference-style loader")
    p.add_argument("--loader-batches", type=int,
                   help="timed batches of the reference-style loader (default 4 x workers on GPU, 2 x on CPU)")
    p.add_argument("--only", nargs="+", choices=[b.__name__[len("bench_"):] for b in BENCHES],
                   help="run only these benchmarks")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    # CPU defaults are small so the whole run takes about a minute; GPU defaults are the recipe's shape.
    for name, on_gpu, on_cpu in (("batch_size", 64, 8), ("num_views", 16, 4), ("warmup", 10, 5),
                                 ("train_steps", 50, 10),
                                 ("empssl_batch_size", 100, 4), ("patches", 20, 4), ("finetune_batch_size", 1024, 32),
                                 ("loader_batches", 4 * max(1, args.loader_workers), 2 * max(1, args.loader_workers))):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if args.precision == "auto":
        args.precision = "fp32" if not gpu else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    for bad, message in ((args.batch_size < 1, "--batch-size must be positive"),
                         (args.num_views < 2, "--num-views must be at least 2"),
                         (args.aug_views < 1, "--aug-views must be positive"),
                         (args.loader_workers < 0 or args.loader_batches < 1,
                          "--loader-workers must be >= 0, --loader-batches positive"),
                         (args.steps < 1, "--steps must be positive"),
                         (args.warmup < 0, "--warmup must be >= 0"),
                         (min(args.train_steps, args.finetune_batch_size) < 1,
                          "--train-steps and --finetune-batch-size must be positive"),
                         (args.empssl_batch_size < 2 or args.patches < 2,
                          "--empssl-batch-size and --patches must be at least 2")):
        if bad:
            p.error(message)
    return args, device


def main():
    args, device = parse_args()
    # as mmcr_pretrain.main
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"precision {args.precision}, compile {args.compile}, steps {args.steps}, warmup {args.warmup}")
    views = args.batch_size * args.num_views
    print(f"mmcr step shape: {args.batch_size} images x {args.num_views} views = {views} views")
    # Each row is printed as soon as it is measured, so a benchmark that fails leaves the earlier rows in the log.
    line = "{:<42}  {:>9}  {:>8}  {:<21}  {}"
    print(line.format("name", "views/s", "ms/step", "peak memory", "notes"), flush=True)
    rows = []
    for bench in BENCHES:
        if not args.only or bench.__name__[len("bench_"):] in args.only:
            for r in bench(args, device):
                numbers = f"{r['views_s']:.0f}", f"{r['ms']:.1f}"
                print(line.format(r["name"], *numbers, r["memory"], r["notes"]), flush=True)
                rows.append(r)
    speed = {r["name"]: r["views_s"] for r in rows}
    if "augment batched (mmcr_pretrain)" in speed and "augment per-image (torchvision v2)" in speed:
        ratio = speed["augment batched (mmcr_pretrain)"] / speed["augment per-image (torchvision v2)"]
        print(f"augmentation speedup vs per-image torchvision: {ratio:.1f}x")
    step, loader = speed.get("mmcr step (aug+fwd+bwd+adam)"), speed.get("reference-style loader (v2, DataLoader)")
    if step and loader:
        print(f"mmcr step vs reference-style loader: {step / loader:.2f}x the views/s ({step:.0f} vs {loader:.0f})")


if __name__ == "__main__":
    main()
