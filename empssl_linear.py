"""Linear evaluation on the bag-of-features embeddings written by empssl_pretrain.py.

The whole embedding set lives on the device (CIFAR-10 train: 50,000 x 4096 in fp16 is 400 MB); a batch is
an index slice of the epoch's permutation, no DataLoader, and the loop syncs with the host only to log, so
100 epochs of 500 steps take seconds on a GPU. The recipe is the EMP-SSL code's: SGD, momentum 0.9,
lr 0.03, weight decay 5e-5, batch 100, cosine decay per epoch over 100 epochs. One process, one device.

    python empssl_pretrain.py --output-dir runs/empssl/c10
    python empssl_linear.py --dataset runs/empssl/c10/embeddings
A one-minute try on a CPU, after empssl_pretrain.py's (4 s, top-1 28.8 on 2 cores)
    python empssl_linear.py --dataset runs/try/empssl/embeddings --max-epochs 20 --output-dir runs/try/empssl-linear

Where to edit (a copy of this file is a complete program):
    the loss          F.cross_entropy in main()
    the model         nn.Linear in main()
    the recipe        Config below: every field is a flag
Below the "plumbing" line (errors, the run folder, checkpoint files, log steps) nothing needs reading.

Outputs in --output-dir: config.json, metrics.jsonl (epoch 0: the kNN of the embeddings), last.pt (resumable),
best.pt (best test top-1): the linear layer.
Exit codes: 0 done, 2 bad input or an unwritable file, 3 training diverged, 128 + signal after Ctrl-C / SIGTERM.
"""
import argparse
import contextlib
import dataclasses
import fcntl
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
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from knn import knn_accuracy


# the kind of checkpoint this script writes (a renamed copy keeps it, so that it resumes the runs it started)
SCRIPT, RUNS = "empssl_linear", "runs/empssl-linear"

# ----------------------------------------------------------------------------- config


def arg(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Config:
    # the method: edit these
    dataset: str = arg("", "required for a new run: the embeddings/ folder of an empssl_pretrain.py run (train.pt, "
                       "test.pt)")
    batch_size: int = arg(100, "embeddings per step")
    max_epochs: int = arg(100, "epochs of training")
    learning_rate: float = arg(0.03, "SGD (momentum 0.9) peak learning rate")
    weight_decay: float = arg(5e-5, "SGD weight decay")
    warmup_duration: float = arg(0.0, "fraction of the epochs spent in linear warm-up before the cosine decay")
    embedding_dim: int = arg(0, "dimension of the embeddings (0: read from the files; another value must match them)")
    num_neighbours: int = arg(20, "k of the kNN comparison at the start")
    temperature: float = arg(0.07, "temperature of the kNN comparison at the start")
    # the run: where, how, how often
    output_dir: str = arg("", "run folder (default: runs/empssl-linear/<date-time>); one with a run needs --resume")
    resume: str = arg("", "a checkpoint to continue, or 'auto': <output-dir>/last.pt if there is one (default: a new "
                      "run); the run keeps the checkpoint's recipe")
    device: str = arg("auto", "auto, cuda or cpu")
    precision: str = arg("auto", "auto (bf16 if supported, else fp16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    log_every: int = arg(100, "most steps between log steps, the loop's only host syncs (they also come every 2 s)")
    checkpoint_minutes: float = arg(30.0, "also save last.pt at the first log step this many minutes after the last "
                                    "save (0: only at epoch ends)")
    seed: int = arg(42, "random seed, 0 to 2^32 - 1")


def check_config(cfg):
    """The first impossible flag value is a UserError; returns cfg with an absolute --dataset (so that a resume finds
    it from any directory)."""
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
            ("RANK" in os.environ, "empssl_linear.py trains one linear layer on one device: run it with python"),
            (cfg.embedding_dim < 0 or cfg.weight_decay < 0, "--embedding-dim and --weight-decay must be >= 0"),
            (cfg.batch_size < 1 or cfg.max_epochs < 1, "--batch-size and --max-epochs must be positive"),
            (cfg.learning_rate <= 0 or not 0 <= cfg.warmup_duration < 1,
             "--learning-rate must be positive, --warmup-duration in [0, 1)"),
            (cfg.num_neighbours < 1 or cfg.temperature <= 0, "--num-neighbours and --temperature must be positive")]:
        if bad:
            raise UserError(message)
    return dataclasses.replace(cfg, dataset=cfg.dataset and os.path.abspath(cfg.dataset))


# Flags that a resume may change: they do not change what the run computes. Every other flag comes from the checkpoint.
RESUME_MAY_CHANGE = {"max_epochs", "log_every", "checkpoint_minutes", "device", "precision", "output_dir", "resume"}


# ----------------------------------------------------------------------------- data


def load_embeddings(folder, embedding_dim, device):
    """folder/{train,test}.pt of empssl_pretrain.py on the device (embeddings float32 as train_x, test_x; labels as
    train_y, test_y; the class names); every mismatch a UserError."""
    if not folder:
        raise UserError("--dataset is required (the embeddings/ folder of an empssl_pretrain.py run)")
    if not os.path.isdir(folder):
        raise UserError(f"--dataset {folder} is not a folder (expected the embeddings/ folder of an "
                        f"empssl_pretrain.py run)")
    splits = {}
    for name in ("train", "test"):
        path = os.path.join(folder, f"{name}.pt")
        # empssl_pretrain.py writes <output-dir>/embeddings/{train,test}.pt
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path} is not a readable embeddings file ({type(e).__name__})") from None
        missing = [k for k in ("embeddings", "labels", "dim", "classes") if not isinstance(d, dict) or k not in d]
        if missing:
            raise UserError(f"{path} lacks the keys {missing} of an empssl_pretrain.py embeddings file")
        x, y = d["embeddings"], d["labels"]
        tensors = torch.is_tensor(x) and torch.is_tensor(y)
        if not (tensors and x.ndim == 2 and y.ndim == 1 and len(x) == len(y) and x.shape[1] == d["dim"]):
            raise UserError(f"{path}: embeddings {tuple(getattr(x, 'shape', ()))} and labels "
                            f"{tuple(getattr(y, 'shape', ()))} do not fit dim {d['dim']}")
        integers = not (y.is_floating_point() or y.is_complex())
        if len(x) == 0 or not integers or not x.is_floating_point() or not x.isfinite().all():
            raise UserError(f"{path}: needs at least one embedding, finite float embeddings and integer labels")
        if y.numel() and (y.min() < 0 or y.max() >= len(d["classes"])):
            raise UserError(f"{path}: labels range over {y.min().item()}..{y.max().item()}, outside the "
                            f"{len(d['classes'])} classes")
        splits[name] = (x, y.long(), list(d["classes"]))
    (xtr, ytr, classes), (xte, yte, test_classes) = splits["train"], splits["test"]
    if xtr.shape[1] != xte.shape[1]:
        raise UserError(f"train embeddings have dim {xtr.shape[1]}, test embeddings {xte.shape[1]}")
    if classes != test_classes:
        raise UserError(f"train.pt has {len(classes)} classes, test.pt {len(test_classes)} (or in another order)")
    if embedding_dim and embedding_dim != xtr.shape[1]:
        raise UserError(f"--embedding-dim {embedding_dim} disagrees with the files' dimension {xtr.shape[1]}")
    return SimpleNamespace(train_x=xtr.float().to(device), train_y=ytr.to(device), test_x=xte.float().to(device),
                           test_y=yte.to(device), classes=classes)


# ----------------------------------------------------------------------------- eval


@torch.no_grad()
def classify(head, inputs, labels):
    """{top1, top5 (%), test_loss} of head on the test set: the classifier on normalised images, or its linear layer
    on cached features; in chunks that a CPU computes in a second or so, so that the bar moves."""
    was_training, sums, size = head.training, torch.zeros(3, device=labels.device), 1024 if inputs.is_cuda else 64
    head.eval()
    # summed loss, top-1 hits, top-5 hits: one host sync at the end
    for x, y in tqdm(list(zip(inputs.split(size), labels.split(size))), desc="the classifier on the test images",
                     leave=False):
        logits = head(x).float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y.view(-1, 1)
        sums += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), F.cross_entropy(logits, y, reduction="sum")])
    head.train(was_training)
    top1, top5, loss = (sums / len(inputs)).tolist()
    return {"top1": 100 * top1, "top5": 100 * top5, "test_loss": loss}


# ----------------------------------------------------------------------------- train


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up from base_lr / warmup_steps to base_lr, then cosine decay to 0: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def epoch_order(n, seed, epoch, device):
    """The epoch's order; as a step's views (its own seed): a pure function, so a resume needs no random state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).to(device)


def main(cfg, given=frozenset()):
    # the run: a resume continues its checkpoint's recipe; this process's device; the run folder, locked
    cfg = check_config(cfg)
    cfg, ckpt, changed = load_resume(cfg, given)
    ctx = setup(cfg)
    cfg.output_dir, lock = claim_output_dir(cfg, ckpt, ctx)

    # data: all embeddings on the device, float32 (float16 on disk)
    data = load_embeddings(cfg.dataset, cfg.embedding_dim, ctx.device)
    # every embedding: the last batch may be smaller
    steps_per_epoch = math.ceil(len(data.train_x) / cfg.batch_size)
    warmup_epochs = int(cfg.warmup_duration * cfg.max_epochs)

    # model and optimizer; a resume loads their states and goes on from the checkpoint's step
    model = nn.Linear(data.train_x.shape[1], len(data.classes)).to(ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == "fp16")
    step, best, run_id = load_states(ckpt, model=model, optimizer=optimizer, scaler=scaler)
    running = torch.zeros(1, device=ctx.device)

    def state():
        """What last.pt (and best.pt) hold: all that a resume needs."""
        return dict(script=SCRIPT, run_id=run_id, config=dataclasses.asdict(cfg), step=step, best=best,
                    running=running.cpu(), model=model.state_dict(), optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(), classes=data.classes)

    # config.json; from here Ctrl-C or SIGTERM stops the run at its next log step, once last.pt is saved
    write_config(cfg, ctx, ckpt, run_id, changed, num_train=len(data.train_x), num_test=len(data.test_x),
                 num_classes=len(data.classes), embedding_dim=data.train_x.shape[1], steps_per_epoch=steps_per_epoch)
    SIGNALS.clear()
    # a new run: the kNN on these embeddings first (as empssl_pretrain.py's), epoch 0 of metrics.jsonl; a stop during
    # it saves last.pt at step 0
    if not ckpt:
        top1, top5 = knn_accuracy(data.train_x, data.train_y, data.test_x, data.test_y, cfg.num_neighbours,
                                  cfg.temperature, len(data.classes))
        write_metrics(cfg, ctx, dict(epoch=0, step=0, knn_top1=top1, knn_top5=top5))
        if SIGNALS:
            save_checkpoint(cfg, ctx, state())
            raise stopped(cfg, ctx, step)
    t_start = saved_at = time.time()
    next_log = step + 1
    for epoch in range(step // steps_per_epoch, cfg.max_epochs):
        order = epoch_order(len(data.train_x), cfg.seed, epoch, ctx.device)
        # per epoch, as the EMP-SSL code
        lr = lr_at(epoch, cfg.max_epochs, warmup_epochs, cfg.learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the sum of the epoch's losses (a resume inside the epoch continues the checkpoint's)
        inside = ckpt and step == ckpt["step"] and step % steps_per_epoch
        running = ckpt["running"].to(ctx.device) if inside else torch.zeros(1, device=ctx.device)
        first, t_epoch = step, time.time()
        with tqdm(total=steps_per_epoch, initial=step % steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.max_epochs}",
                  unit="step", leave=False) as bar:
            while step < (epoch + 1) * steps_per_epoch:
                idx = order[(step % steps_per_epoch) * cfg.batch_size:][:cfg.batch_size]
                with ctx.autocast:
                    logits = model(data.train_x[idx])
                loss = F.cross_entropy(logits.float(), data.train_y[idx])
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                running += loss.detach()
                step += 1
                bar.update()
                if step == next_log or step % steps_per_epoch == 0:
                    # a log step (every 2 s or --log-every steps): the one GPU sync; a stop, a save, divergence
                    shown = dict(loss=running.item() / (step - epoch * steps_per_epoch), lr=lr)
                    stop, timed, next_log = log_step(bar, cfg, ctx, model, step, shown, saved_at)
                    # (at the epoch's end, its evaluation and files come first)
                    if (stop or timed) and step % steps_per_epoch:
                        saved_at = save_checkpoint(cfg, ctx, state())
                    if stop and step % steps_per_epoch:
                        raise stopped(cfg, ctx, step)
        # the epoch's end: the test set, metrics.jsonl, last.pt, best.pt
        seconds = time.time() - t_epoch
        with ctx.autocast:
            scores = classify(model, data.test_x, data.test_y)
        improved = scores["top1"] > best.get("top1", -1)
        best = dict(scores, epoch=epoch + 1) if improved else best
        write_metrics(cfg, ctx, dict(epoch=epoch + 1, step=step, loss=running.item() / steps_per_epoch, lr=lr, **scores,
                                     epoch_seconds=round(seconds, 3), embeddings_per_second=round(
                                         (step - first) * cfg.batch_size / seconds)))
        saved_at = save_checkpoint(cfg, ctx, state(), best=improved)
        # a stop asked for during the evaluation ends the run here, with its files written
        if SIGNALS:
            raise stopped(cfg, ctx, step)
    print(f"done: best {in_words(best)} in {time.time() - t_start:.1f}s; checkpoints in {cfg.output_dir}")


# ----------------------------------------------------------------------------- plumbing
# A hacker need not read further: flag checks and errors, the run folder, checkpoint files, log steps and stops.


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
    """This process's device and precision (`with ctx.autocast:`); one process, one device (no DDP). Precision auto:
    bf16 where the GPU has it (compute capability 8+), fp16 with a GradScaler before, fp32 on a CPU."""
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = cfg.precision if cfg.precision != "auto" else "fp32" if not cuda else (
        "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return SimpleNamespace(device=device, precision=precision, rank=0, world=1, master=True,
                           autocast=torch.autocast(device.type, dtype, enabled=bool(dtype)))


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
    """--output-dir (else a resume's own folder, else runs/<method>/<date-time>), made and locked while this process
    lives (flock: the kernel releases it however the process ends); refused, unchanged, when another process
    holds it, or it holds a run this does not resume. Returns (the folder, the lock)."""
    folder = [cfg.output_dir or (os.path.dirname(ckpt["file"]) if ckpt else
                                 os.path.join(RUNS, time.strftime("%Y%m%d-%H%M%S")))]
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
    """Host or device flags as floats (one GPU sync)."""
    flags = torch.stack([torch.as_tensor(f, dtype=torch.float64, device=ctx.device) for f in flags])
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
    return Stopped((SIGNALS or [signal.SIGTERM])[0], f"interrupted: saved {os.path.join(cfg.output_dir, 'last.pt')} "
                   f"at step {step}; continue with python {shlex.quote(sys.argv[0])} --resume auto --output-dir "
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
    """main() as a command, exit code 0 when done: else one line on stderr and 2 for bad input
    or an unwritable file, 3 divergence, 128 + the signal after Ctrl-C / SIGTERM."""
    cfg, given = parse_config(argv)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    name, code, message, CREATED[:], SIGNALS[:] = os.path.basename(__file__), 0, None, [], [None]
    try:
        main(cfg, given)
    except (UserError, Diverged, OSError) as e:
        code, message = 3 if isinstance(e, Diverged) else 2, f"{name}: error: {e}"
    except Stopped as e:
        code, message = 128 + e.args[0], e.args[1]
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if CREATED and (code == 2 or code > 128):
        # a run that fails or is stopped before its first checkpoint leaves no folder (or lock file) that it made
        with contextlib.suppress(OSError):
            shutil.rmtree(CREATED[0]) if os.path.isdir(CREATED[0]) else os.remove(CREATED[0])
    if message:
        print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(cli())
