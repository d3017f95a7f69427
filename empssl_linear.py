"""Linear evaluation on the bag-of-features embeddings written by empssl_pretrain.py.

The whole embedding set lives on the device (CIFAR-10 train: 50,000 x 4096 in fp16 is 400 MB); a batch is
an index slice of the epoch's permutation, no DataLoader, and the loop syncs with the host only to log, so
100 epochs of 500 steps take seconds on a GPU. The recipe is the EMP-SSL code's: SGD, momentum 0.9,
lr 0.03, weight decay 5e-5, batch 100, cosine decay per epoch over 100 epochs. One process, one device.

    python empssl_pretrain.py --output-dir runs/empssl/c10
    python empssl_linear.py --dataset runs/empssl/c10/embeddings

Where to edit (a copy of this file is a complete program):
    the loss          F.cross_entropy in main()
    the model         nn.Linear in main()
    the recipe        Config below: every field is a flag
Everything below the "plumbing" line (flags, run folders, resume, files) can stay unread.

Outputs in --output-dir: config.json, metrics.jsonl, last.pt (resumable), best.pt (best test top-1): the linear layer.
Exit codes: 0 done, 2 bad input or an unwritable file (one line on stderr), 3 training diverged, 128 + signal after
Ctrl-C / SIGTERM.
"""
import contextlib
import dataclasses
import fractions
import json
import math
import os
import shlex
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from knn import knn_accuracy

# the kind of checkpoint this script writes (a renamed copy keeps it, so that it resumes the runs it started)
SCRIPT, RUNS = "empssl_linear", "runs/empssl-linear"

# ----------------------------------------------------------------------------- config


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # the method: edit these
    dataset: str = arg("", "required: a folder with train.pt and test.pt written by empssl_pretrain.py (its "
                       "embeddings/)")
    batch_size: int = arg(100, "embeddings per step")
    max_epochs: int = arg(100, "epochs of training")
    learning_rate: float = arg(0.03, "SGD (momentum 0.9) peak learning rate")
    weight_decay: float = arg(5e-5, "SGD weight decay")
    warmup_duration: float = arg(0.0, "fraction of the epochs spent in linear warm-up before the cosine decay")
    embedding_dim: int = arg(0, "dimension of the embeddings (0: read from the files; another value must match them)")
    num_neighbours: int = arg(20, "k of the kNN comparison at the start")
    temperature: float = arg(0.07, "temperature of the kNN comparison at the start")
    # the run: where, how, how often
    output_dir: str = arg("", "run folder (default runs/empssl-linear/<timestamp>); one that holds a run needs "
                          "--resume")
    resume: str = arg("", "a checkpoint of this script to resume from, or 'auto' for <output-dir>/last.pt if it "
                      "exists; the run continues with the checkpoint's recipe")
    device: str = arg("auto", "auto, cuda or cpu")
    precision: str = arg("auto", "auto (bf16 if supported, else fp16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    log_every: int = arg(100, "steps between progress-bar updates, the loop's only host syncs (and steps 1, 2, 4...)")
    checkpoint_minutes: float = arg(30.0, "also save last.pt inside an epoch this many minutes after the last save "
                                    "(0: only at epoch ends)")
    seed: int = arg(42, "random seed")


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    """Both splits of a dataset: images (uint8, N x 3 x S x S) or embeddings as x, int64 labels as y, class names."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list

    def to(self, device):
        return Data(self.train_x.to(device), self.train_y.to(device), self.test_x.to(device), self.test_y.to(device),
                    self.classes)


def load_embeddings(folder, embedding_dim):
    """Data (float32 embeddings) from folder/{train,test}.pt of empssl_pretrain.py; every mismatch a UserError."""
    if not folder:
        raise UserError("--dataset is required (the embeddings/ folder of an empssl_pretrain.py run)")
    if not os.path.isdir(folder):
        raise UserError(f"--dataset {folder} is not a folder (expected the embeddings/ folder of an "
                        f"empssl_pretrain.py run)")
    splits = {}
    for name in ("train", "test"):
        path = os.path.join(folder, f"{name}.pt")
        # empssl_pretrain.py writes <output-dir>/embeddings/{train,test}.pt
        d = read_torch_file(path, "embeddings file")
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
    return Data(xtr.float(), ytr, xte.float(), yte, classes)


# ----------------------------------------------------------------------------- eval


@torch.no_grad()
def classify(head, inputs, labels, batch_size=1024):
    """{top1, top5 (%), test_loss} of head (the classifier, or its linear layer on cached features) on inputs."""
    was_training = head.training
    head.eval()
    # summed loss, top-1 hits, top-5 hits: one host sync at the end
    sums = torch.zeros(3, device=labels.device)
    for i in range(0, len(inputs), batch_size):
        logits = head(inputs[i:i + batch_size]).float()
        y = labels[i:i + batch_size]
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y.view(-1, 1)
        sums += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), F.cross_entropy(logits, y, reduction="sum")])
    head.train(was_training)
    top1, top5, loss = (sums / len(inputs)).tolist()
    return {"top1": 100 * top1, "top5": 100 * top5, "test_loss": loss}


def evaluate(model, data, ctx):
    """The linear layer's {top1, top5, test_loss} on the test embeddings."""
    with ctx.autocast:
        return classify(model, data.test_x, data.test_y)


# ----------------------------------------------------------------------------- train


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up from base_lr / warmup_steps to base_lr, then cosine decay to 0: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def main(cfg, given=frozenset()):
    # the run's recipe (the checkpoint's when resuming), its device, its output folder (locked)
    control = RunControl(cfg, given)
    ctx = control.ctx

    # data: all embeddings on the device, float32 (float16 on disk)
    data = load_embeddings(cfg.dataset, cfg.embedding_dim).to(ctx.device)
    # every embedding: the last batch may be smaller
    steps_per_epoch = math.ceil(len(data.train_x) / cfg.batch_size)
    warmup_epochs = int(cfg.warmup_duration * cfg.max_epochs)

    # model, optimizer, and their state when resuming
    model = nn.Linear(data.train_x.shape[1], len(data.classes)).to(ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == "fp16")
    control.restore(model=model, optimizer=optimizer, scaler=scaler)
    knn = knn_accuracy(data.train_x, data.train_y, data.test_x, data.test_y, cfg.num_neighbours, cfg.temperature,
                       len(data.classes))
    print(f"knn on these embeddings: top1 {knn[0]:.2f} top5 {knn[1]:.2f} (k={cfg.num_neighbours}, T={cfg.temperature})")

    def checkpoint():
        """This script's state for last.pt / best.pt (the run control adds the step, the config and the best top-1)."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "classes": data.classes}

    control.start(checkpoint, model, steps_per_epoch, ("embeddings", cfg.batch_size), num_train=len(data.train_x),
                  num_test=len(data.test_x), num_classes=len(data.classes), embedding_dim=data.train_x.shape[1],
                  steps_per_epoch=steps_per_epoch, knn_top1=knn[0], knn_top5=knn[1])
    for epoch in control.epochs():
        order = epoch_order(len(data.train_x), cfg.seed, epoch, ctx.device)
        # per epoch, as the EMP-SSL code
        lr = set_lr(optimizer, lr_at(epoch, cfg.max_epochs, warmup_epochs, cfg.learning_rate))
        for step in control.steps(epoch):
            idx = order[(step % steps_per_epoch) * cfg.batch_size:][:cfg.batch_size]
            with ctx.autocast:
                logits = model(data.train_x[idx])
            loss = F.cross_entropy(logits.float(), data.train_y[idx])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            control.step_done(loss, lr)
        # the end of an epoch (a stop inside it skips this): the test set, metrics.jsonl, checkpoints
        if control.epoch_complete:
            control.end_epoch(lambda: evaluate(model, data, ctx))
    control.finish()


# ----------------------------------------------------------------------------- plumbing
# Nothing below changes the method: errors and exit codes, flags, DDP, the run folder and its lock, resume, the run
# control around the loop, random states, files.


class UserError(Exception):
    """Bad input or a file that cannot be written: one line on stderr, exit code 2, never a traceback."""


class Diverged(Exception):
    """Non-finite weights: one line on stderr, exit code 3."""


class Stopped(BaseException):
    """Ctrl-C or SIGTERM: one line on stderr (what was saved, how to continue), exit code 128 + the signal. A
    BaseException, as KeyboardInterrupt: no `except Exception` on its way may take it for an error."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


def setup(cfg):
    """The Context of this one process (torchrun is refused in check_config)."""
    return context(cfg)


def check_config(cfg):
    check_common(cfg)
    problems = [("RANK" in os.environ,
                 "empssl_linear.py trains one linear layer on one device: start it with python, not torchrun"),
                (not cfg.dataset and not cfg.resume,
                 "--dataset is required (the embeddings/ folder of an empssl_pretrain.py run)"),
                (cfg.embedding_dim < 0 or cfg.weight_decay < 0, "--embedding-dim and --weight-decay must be >= 0"),
                (cfg.batch_size < 1, "--batch-size must be positive"),
                (cfg.max_epochs < 1, "--max-epochs must be at least 1"),
                (cfg.learning_rate <= 0, "--learning-rate must be positive"),
                (not 0 <= cfg.warmup_duration < 1, "--warmup-duration must be in [0, 1)"),
                (cfg.num_neighbours < 1 or cfg.temperature <= 0, "--num-neighbours and --temperature must be positive"),
                (cfg.log_every < 1, "--log-every must be at least 1"),
                (cfg.checkpoint_minutes < 0, "--checkpoint-minutes must be >= 0"),
                (cfg.device not in ("auto", "cuda", "cpu"), "--device must be auto, cuda or cpu"),
                (cfg.precision not in ("auto", "bf16", "fp16", "fp32"), "--precision must be auto, bf16, fp16 or fp32"),
                (cfg.device == "cuda" and not torch.cuda.is_available(), "--device cuda but no GPU is available")]
    for bad, message in problems:
        if bad:
            raise UserError(message)
    # a run records where its data is, so that a resume finds it from any directory
    cfg.dataset = cfg.dataset and os.path.abspath(cfg.dataset)


def check_common(cfg):
    """What every script checks: float flags are finite numbers (NaN passes every comparison unnoticed), and
    --resume auto names its folder."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, not {value}")
    if cfg.resume == "auto" and not cfg.output_dir:
        raise UserError("--resume auto needs --output-dir, the folder of the run to continue")


def parse_config(argv=None):
    """argparse generated from the dataclass (--batch-size for batch_size, help from the field): the Config and the
    names of the flags that the command line gave (a resume takes the others from its checkpoint)."""
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        name = "--" + f.name.replace("_", "-")
        shown = f"{f.metadata['help']} (default: {readable(f.default)})".replace("%", "%%")
        if f.type is bool or f.type == "bool":
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=shown)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(name, type=kind, help=shown)
    given = vars(parser.parse_args(argv))
    return Config(**given), frozenset(given)


def readable(value):
    """A default as a person writes it: 1/255 rather than 0.00392156862745098, 1e-06, '' as ''."""
    if isinstance(value, float):
        fraction = fractions.Fraction(value).limit_denominator(1000)
        if float(fraction) == value and fraction.denominator > 1 and len(repr(value)) > 8:
            return f"{fraction.numerator}/{fraction.denominator}"
        return f"{value:g}"
    return repr(value) if value == "" else value


@dataclass
class Context:
    """Where this process runs: its device, its rank among the `world` processes of a torchrun job (0 of 1 without
    one), and the precision of its forward passes: `with ctx.autocast:` runs one in it."""
    device: torch.device
    precision: str
    rank: int = 0
    world: int = 1
    ddp: bool = False
    # under DDP with NCCL, a gloo group for the host-side flags that the ranks agree on at every step
    cpu_group: object = None

    @property
    def master(self):
        return self.rank == 0

    @property
    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.precision != "fp32")


def context(cfg, rank=0, world=1, ddp=False, cpu_group=None):
    """The Context of this process: its GPU (the LOCAL_RANK-th) if there is one and --device allows, else the CPU.
    Precision auto: bf16 where the GPU has it (compute capability 8+), fp16 with a GradScaler before, fp32 on a CPU."""
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    precision = cfg.precision
    if precision == "auto":
        precision = "fp32" if not cuda else "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    return Context(device, precision, rank, world, ddp, cpu_group)


# Flags that a resume may change: they do not change what the run computes. Every other flag comes from the checkpoint.
RESUME_MAY_CHANGE = {"max_epochs", "eval_every", "log_every", "checkpoint_minutes", "device", "precision", "compile",
                     "data_dir", "output_dir", "resume"}
# What makes a folder hold a run (config.json and views.png alone do not: their run never saved)
RUN_FILES = ("last.pt", "best.pt")


class RunControl:
    """Everything around the training loop, so that main() shows the method: the recipe (the checkpoint's when
    resuming), the device and DDP (setup), the output folder (locked while the run lives), the progress bar, timed
    saves, stop requests (Ctrl-C, SIGTERM), the divergence check, metrics.jsonl, last.pt / best.pt and the epoch lines.
    Under DDP the ranks take every decision together."""

    def __init__(self, cfg, given):
        self.cfg, self.signals, self.stopping = cfg, [], False
        for s in (signal.SIGINT, signal.SIGTERM):
            RunControl.handlers.setdefault(s, signal.getsignal(s))
            signal.signal(s, self.on_signal)
        check_config(cfg)
        self.resume_path = os.path.join(cfg.output_dir, "last.pt") if cfg.resume == "auto" else cfg.resume
        if cfg.resume == "auto" and not os.path.exists(self.resume_path):
            self.resume_path = ""
        self.resumed = load_checkpoint(self.resume_path, SCRIPT) if self.resume_path else None
        # a resume continues the checkpoint's recipe (device and precision too, unless the command line changes them)
        self.changed = adopt_recipe(cfg, given, self.resumed, self.resume_path) if self.resumed else {}
        self.ctx = setup(cfg)
        self.run_id = self.resumed.get("run_id") if self.resumed else uuid.uuid4().hex[:12]
        # a resume goes on in the checkpoint's own folder unless --output-dir says otherwise
        own = os.path.dirname(os.path.abspath(self.resume_path)) if self.resumed else ""
        cfg.output_dir = cfg.output_dir or own or os.path.join(RUNS, time.strftime("%Y%m%d-%H%M%S"))
        self.claim()
        self.step = self.resumed["step"] if self.resumed else 0
        self.best = self.resumed.get("best", {}) if self.resumed else {}
        # the step of the state that last.pt / best.pt hold
        self.file_steps = {"last.pt": self.step} if self.resumed else {}
        self.started, self.saved_step, self.pending, self.loss = self.step, None, False, torch.full((), math.nan)
        self.t_start = self.saved_at = time.time()

    # what release() gives back when the process is done with the run: signal handlers, output-folder locks
    handlers, locks = {}, []

    def on_signal(self, signum, frame):
        self.signals.append(signum)
        # the first one stops the run at the next step (or after the evaluation running now); a second quits at once
        if len(self.signals) > 1:
            raise Stopped(signum, f"interrupted again: quit at once; {self.kept()}")

    @classmethod
    def release(cls):
        """The previous signal handlers back, and the output folder's lock emptied and released."""
        for s, handler in cls.handlers.items():
            signal.signal(s, handler)
        cls.handlers.clear()
        while cls.locks:
            lock = cls.locks.pop()
            with contextlib.suppress(OSError, ValueError):
                lock.seek(0)
                lock.truncate()
                lock.close()

    def claim(self):
        """Rank 0 claims the output folder (claim_output_dir); every rank learns the outcome, the same folder or the
        same error."""
        outcome = [self.cfg.output_dir, None]
        if self.ctx.master:
            try:
                RunControl.locks.append(claim_output_dir(self.cfg.output_dir, self.resumed, self.run_id,
                                                         self.resume_path))
            except UserError as e:
                outcome[1] = str(e)
        if self.ctx.ddp:
            dist.broadcast_object_list(outcome, src=0, group=self.ctx.cpu_group)
        self.cfg.output_dir = outcome[0]
        if outcome[1]:
            raise UserError(outcome[1])

    def restore(self, **objects):
        """Resuming: load the checkpoint's saved states into the objects (model=..., optimizer=..., scaler=...)."""
        for name, obj in objects.items():
            state = self.resumed.get(name) if self.resumed else None
            # a GradScaler's state carries over only from fp16 to fp16
            if not self.resumed or (isinstance(obj, torch.amp.GradScaler) and not (obj.is_enabled() and state)):
                continue
            try:
                obj.load_state_dict(state)
            except (KeyError, RuntimeError, ValueError, TypeError) as e:
                raise UserError(f"{self.resume_path}: its {name} does not fit this script's: {problem_of(e)}")

    def start(self, checkpoint, model, steps_per_epoch, throughput, /, **info):
        """Before the first step: checkpoint() (the script's state to save), the model whose weights the divergence
        check reads, the steps per epoch, throughput (unit, count per step) for the progress bar and the metrics, and
        config.json: every flag and `info` (a resume adds a record of itself to the run's config.json). A resume from
        an epoch's end whose line metrics.jsonl lacks (a stop during its evaluation) runs that epoch's end first."""
        self.checkpoint, self.model, self.steps_per_epoch = checkpoint, model, steps_per_epoch
        self.unit, self.per_step = throughput
        if self.best.get("epoch"):
            self.file_steps["best.pt"] = self.best["epoch"] * steps_per_epoch
        pending = [False]
        if self.ctx.master:
            write_run_info(self.cfg, self.ctx, self.run_id, self.resumed, self.resume_path, self.changed, info)
            at_epoch_end = self.step > 0 and self.step % steps_per_epoch == 0
            pending[0] = bool(self.resumed) and at_epoch_end and self.step not in metrics_steps(self.cfg.output_dir)
        if self.ctx.ddp:
            dist.broadcast_object_list(pending, src=0, group=self.ctx.cpu_group)
        self.pending = pending[0]

    def saved(self, key, epoch):
        """The checkpoint's `key` (a random state) if `epoch` continues from it in the middle, else None."""
        mid_epoch = self.resumed and self.resumed["step"] % self.steps_per_epoch
        return self.resumed[key] if mid_epoch and epoch == self.resumed["step"] // self.steps_per_epoch else None

    def epochs(self):
        """The epochs still to run; after a stop request, a Stopped exception instead (exit code 128 + signal)."""
        epoch = self.step // self.steps_per_epoch - self.pending
        self.agree()
        while not self.stopping and epoch < self.cfg.max_epochs:
            yield epoch
            epoch += 1
        if self.stopping:
            raise self.stopped()

    def steps(self, epoch):
        """The steps of `epoch` still to run, with a progress bar; they end early, after a save, on a stop request."""
        self.epoch, self.first = epoch, max(self.step, epoch * self.steps_per_epoch)
        self.epoch_end = (epoch + 1) * self.steps_per_epoch
        self.loss_sum, self.t_epoch = torch.zeros((), device=self.ctx.device), time.time()
        self.bar = tqdm(total=self.steps_per_epoch, initial=self.first - epoch * self.steps_per_epoch,
                        desc=f"epoch {epoch + 1}/{self.cfg.max_epochs}", disable=not self.ctx.master, mininterval=1,
                        leave=False)
        with self.bar:
            for step in range(self.first, self.epoch_end):
                yield step
                if self.stopping:
                    return

    def step_done(self, loss, lr, **shown):
        """After each training step: at the log steps (the loop's only host syncs) check the weights and show the loss,
        lr, `shown` and the speed; save last.pt once --checkpoint-minutes have passed; note a stop request."""
        self.step += 1
        self.loss_sum += loss.detach()
        self.lr, self.loss = lr, loss
        self.bar.update()
        since = self.step - self.started
        if since % self.cfg.log_every == 0 or (since < self.cfg.log_every and since & (since - 1) == 0):
            self.check_finite()
            rate = (self.step - self.first) * self.per_step / (time.time() - self.t_epoch)
            values = {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in dict(loss=loss, **shown).items()}
            self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in values.items()}, "lr": f"{lr:.2e}",
                                  f"{self.unit}/s": f"{rate:.0f}"})
        stop, timed, _ = self.agree()
        if (stop or timed) and self.step < self.epoch_end:
            self.save("last.pt")

    @property
    def epoch_complete(self):
        return self.step == self.epoch_end

    def end_epoch(self, evaluate):
        """After an epoch's last step: save last.pt (a long evaluation that fails or is killed loses no training), run
        evaluate() (None, or scores: best.pt keeps the best of its first value), add the epoch's line to metrics.jsonl,
        save best.pt (and last.pt, which records the best) when it improved, print the line."""
        seconds = elapsed(self.t_epoch, self.ctx.device)
        steps = self.step - self.first
        self.save("last.pt")
        scores = evaluate() or {}
        self.pending = False
        stats = {"epoch": self.epoch + 1, "step": self.step, "loss": self.loss_sum.item() / steps if steps else None,
                 "lr": self.lr if steps else None, **scores, "epoch_seconds": round(seconds, 3),
                 f"{self.unit}_per_second": round(steps * self.per_step / seconds, 1)}
        key = next(iter(scores), None)
        improved = key is not None and scores[key] > self.best.get(key, -math.inf)
        if improved:
            self.best = dict(scores, epoch=self.epoch + 1)
        if self.ctx.master:
            append_metrics(self.cfg.output_dir, stats)
        # a stop requested during the evaluation ends the run after this epoch; every rank saves when rank 0 improved
        if self.agree(improved)[2]:
            self.save("best.pt", "last.pt")
        if self.ctx.master:
            shown = in_words({k: v for k, v in stats.items() if k not in ("epoch", "step") and "second" not in k})
            print(f"epoch {self.epoch + 1}/{self.cfg.max_epochs} step {self.step} {shown} {seconds:.1f}s "
                  f"{stats[f'{self.unit}_per_second']:.0f} {self.unit}/s", flush=True)

    def finish(self):
        if self.ctx.master:
            best = in_words({k: v for k, v in self.best.items() if k != "epoch"})
            print(f"done: best {best or '-'} (epoch {self.best.get('epoch', '-')}) in "
                  f"{time.time() - self.t_start:.1f}s; checkpoints in {self.cfg.output_dir}")

    def agree(self, vote=False):
        """(stop, timed save, vote): a stop was requested; --checkpoint-minutes have passed since the last save (rank
        0's clock); some rank voted. Decided on the host at every step, with no GPU sync, and all-reduced under DDP."""
        minutes = self.cfg.checkpoint_minutes
        flags = [len(self.signals) > 0, self.ctx.master and 0 < minutes <= (time.time() - self.saved_at) / 60, vote]
        if self.ctx.ddp:
            votes = torch.tensor(flags, dtype=torch.float)
            dist.all_reduce(votes, group=self.ctx.cpu_group)
            flags = (votes > 0).tolist()
        self.stopping = flags[0]
        return flags

    def check_finite(self):
        """Diverged once the weights are not finite (their sum is not): a GPU sync, so at log steps and saves only."""
        weights = sum(p.detach().float().sum() for p in self.model.parameters())
        bad = (~torch.isfinite(weights)).float()
        if self.ctx.ddp:
            dist.all_reduce(bad)
        if bad.item():
            raise Diverged(f"training diverged at step {self.step}: the loss is {self.loss.item():.4g} and the weights "
                           f"are no longer finite; {self.kept()}. Try a lower --learning-rate in a new "
                           f"--output-dir, or --precision bf16 or fp32 if this ran in fp16 (a resume may change it)")

    def save(self, *names):
        """Write the checkpoint of this step as each of names (rank 0; every rank builds it, a collective under DDP),
        never with weights that are not finite."""
        self.check_finite()
        ckpt = dict(self.checkpoint(), script=SCRIPT, run_id=self.run_id, step=self.step,
                    epoch=self.step // self.steps_per_epoch, best=self.best, config=dataclasses.asdict(self.cfg))
        if self.ctx.master:
            for name in names:
                atomic_save(ckpt, os.path.join(self.cfg.output_dir, name))
                self.file_steps[name] = self.step
        self.saved_step, self.saved_at = self.step, time.time()

    def kept(self):
        """What the run folder holds to go on from, in words."""
        kept = [f"{name} (step {self.file_steps.get(name, '?')})" for name in ("last.pt", "best.pt")
                if os.path.exists(os.path.join(self.cfg.output_dir, name))]
        if not kept:
            return "nothing was saved, so the folder can take a new run"
        return f"{' and '.join(kept)} in {self.cfg.output_dir} keep the last finite state"

    def stopped(self):
        signum = self.signals[0] if self.signals else signal.SIGTERM
        if not os.path.exists(os.path.join(self.cfg.output_dir, "last.pt")):
            return Stopped(signum, "interrupted before the first save: nothing to continue")
        what = (f"saved {os.path.join(self.cfg.output_dir, 'last.pt')} at step {self.saved_step}"
                if self.saved_step is not None else f"stopped before training went on; {self.kept()}")
        launcher = f"torchrun --nproc_per_node {self.ctx.world}" if self.ctx.ddp else "python"
        return Stopped(signum, f"interrupted: {what}; continue with {launcher} {shlex.quote(sys.argv[0])} "
                               f"--resume auto --output-dir {shlex.quote(self.cfg.output_dir)}")


def in_words(values):
    """'loss -4.1234 lr 1.00e-03 knn_top1 57.20': metrics for a log line (None left out)."""
    return " ".join(f"{k} {v:.4f}" if "loss" in k else f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.2f}"
                    for k, v in values.items() if v is not None)


def problem_of(error):
    """The line of a load_state_dict error that says what is wrong (its first line only names the module)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[min(1, len(lines) - 1)][:200]


def adopt_recipe(cfg, given, ckpt, path):
    """A resume continues the run's recipe: every flag comes from the checkpoint's config but those in
    RESUME_MAY_CHANGE that the command line gives. Another value for any other flag is a UserError that lists them.
    Returns {flag: [the run's value, the new one]} of the changes made."""
    saved = ckpt["config"]
    if cfg.dataset not in ("cifar10", "cifar100") and "dataset" in saved:
        saved = dict(saved, dataset=os.path.abspath(saved["dataset"]) if saved["dataset"] else "")
    differ = sorted(n for n in given if n not in RESUME_MAY_CHANGE and n in saved and saved[n] != getattr(cfg, n))
    if differ:
        listed = ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)} (the run's: {saved[n]})" for n in differ)
        raise UserError(f"{path} continues its run's recipe, and the command line changes it: {listed}; leave these "
                        f"flags out to continue the run, or start a new run in another --output-dir")
    changed = {n: [saved[n], getattr(cfg, n)] for n in sorted(given & RESUME_MAY_CHANGE - {"resume", "output_dir"})
               if n in saved and saved[n] != getattr(cfg, n)}
    for f in dataclasses.fields(cfg):
        if f.name in saved and f.name not in given and f.name not in ("resume", "output_dir"):
            setattr(cfg, f.name, saved[f.name])
    return changed


def claim_output_dir(output_dir, resumed, run_id, resume_path):
    """Create --output-dir and lock it while this process lives (rank 0; the lock file .lock holds its PID). Refused,
    changing nothing: a folder another live process holds; a new run into a folder that holds a run; a resume into a
    folder that holds another run (another run id). A lock left by a dead process is taken over with a warning."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output-dir {output_dir}: {e.strerror}")
    check_output_dir(output_dir, resumed, run_id, resume_path)
    try:
        lock = open(os.path.join(output_dir, ".lock"), "a+")
    except OSError as e:
        raise UserError(f"cannot write to --output-dir {output_dir}: {e.strerror}")
    try:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        # no fcntl (Windows): no lock
        pass
    except OSError:
        lock.seek(0)
        holder = (lock.read().split() or ["?"])[0]
        raise UserError(f"--output-dir {output_dir} is in use by another run (PID {holder}); wait for it to end, "
                        f"or choose another --output-dir")
    # the holder's files may have appeared while this process waited for the lock
    check_output_dir(output_dir, resumed, run_id, resume_path)
    lock.seek(0)
    previous = lock.read().split()
    if previous:
        print(f"warning: --output-dir {output_dir} was locked by PID {previous[0]}, which ended without releasing it "
              f"(a crash or a kill); taking it over", file=sys.stderr)
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    lock.flush()
    # RunControl.release() empties the lock file at the end; the kernel releases the lock when the process ends, in
    # any way (a kill leaves the PID in the file: the next run warns)
    return lock


def check_output_dir(output_dir, resumed, run_id, resume_path):
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]
    if held and not resumed:
        raise UserError(f"--output-dir {output_dir} already holds a run ({', '.join(held)}): pass --resume auto to "
                        f"continue it, or choose another --output-dir")
    folder_run = folder_run_id(output_dir) if held else run_id
    if folder_run != run_id:
        raise UserError(f"--output-dir {output_dir} holds another run (run id {folder_run}) than {resume_path} (run id "
                        f"{run_id}): resume into that run's own folder, or into an empty one")


def folder_run_id(output_dir):
    """The run id of the run a folder holds (from config.json, else last.pt), None if it has none."""
    try:
        with open(os.path.join(output_dir, "config.json")) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError):
        path = os.path.join(output_dir, "last.pt")
        return load_checkpoint(path, SCRIPT).get("run_id") if os.path.exists(path) else None


def write_run_info(cfg, ctx, run_id, resumed, resume_path, changed, info):
    """config.json: the run id, every flag and what was derived from them (`info`), also printed. A resume keeps the
    run's config.json and appends a record: when, from which checkpoint and step, which flags it changed.
    metrics.jsonl keeps only the lines up to the checkpoint's step (none for a new run), so no epoch is listed twice."""
    path = os.path.join(cfg.output_dir, "config.json")
    derived = dict(world_size=ctx.world, device=str(ctx.device), precision_used=ctx.precision, **info)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    run = {"run_id": run_id, "started": now, **dataclasses.asdict(cfg), **derived}
    if resumed:
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                previous = json.load(f)
            run = previous if previous.get("run_id") == run_id else run
        record = {"at": now, "from": os.path.abspath(resume_path), "step": resumed["step"], "changed": changed,
                  **{k: derived[k] for k in ("world_size", "device", "precision_used")}}
        run.setdefault("resumes", []).append(record)
        print(f"resumed from {resume_path} at step {resumed['step']}" + (f", changing {changed}" if changed else ""))
    keep_metrics_until(cfg.output_dir, resumed["step"] if resumed else 0)
    atomic_write(path, lambda tmp: write_text(tmp, json.dumps(run, indent=2)))
    print(json.dumps(dict(dataclasses.asdict(cfg), **derived)))


def metrics_lines(output_dir):
    """The lines of metrics.jsonl as dicts; a line that is not JSON (cut off by a crash) is left out."""
    lines = []
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(output_dir, "metrics.jsonl")) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(line))
    return [line for line in lines if isinstance(line, dict) and isinstance(line.get("step"), int)]


def metrics_steps(output_dir):
    return {line["step"] for line in metrics_lines(output_dir)}


def keep_metrics_until(output_dir, step):
    path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(path):
        kept = "".join(json.dumps(line) + "\n" for line in metrics_lines(output_dir) if line["step"] <= step)
        atomic_write(path, lambda tmp: write_text(tmp, kept))


def append_metrics(output_dir, stats):
    """One JSON line per epoch; a failed append (a full disk) is cut off again, leaving no half line."""
    path = os.path.join(output_dir, "metrics.jsonl")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror})")
    line = (json.dumps(stats) + "\n").encode()
    try:
        size = os.fstat(fd).st_size
        if os.write(fd, line) != len(line):
            raise OSError(28, "a short write")
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise UserError(f"cannot write {path} ({e.strerror}: is the disk full?); it keeps the lines before")
    finally:
        os.close(fd)


def epoch_order(n, seed, epoch, device):
    """The epoch's order of the training set: a pure function of (seed, epoch), so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).to(device)


def set_lr(optimizer, lr):
    """Write lr into every param group (times its lr_scale, if it has one); returns lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def elapsed(t, device):
    """Seconds since t, once the queued GPU work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.time() - t


def atomic_write(path, write):
    """write(tmp), then os.replace(tmp, path): a kill never leaves a broken file. A failed write (a full or read-only
    disk) removes tmp and is a UserError that names the file and says whether the previous one is kept."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        # on disk before the rename, so that a power cut or a crashed machine also leaves the old file or the new one
        fsync(tmp)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            fsync(os.path.dirname(os.path.abspath(path)))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or ["?"])[-1]
        kept = f"; the previous {os.path.basename(path)} is unchanged" if os.path.exists(path) else ""
        raise UserError(f"cannot write {path} ({reason.strip()[:160]}: is the disk full or read-only?){kept}") from None


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def atomic_save(obj, path):
    """torch.save through atomic_write."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_torch_file(path, what):
    """torch.load of a file these scripts wrote (tensors, numbers, strings only); missing or broken: a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable {what}: corrupt, truncated or not written by torch.save "
                        f"({type(e).__name__})")


def load_checkpoint(path, script):
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"script", "model", "config", "step"} <= set(ckpt):
        raise UserError(f"{path} is not a checkpoint written by these scripts")
    if ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {script}.py")
    return ckpt


def cli(argv=None):
    """main() as a command: exit code 0 when done; bad input or an unwritable file 2, divergence 3, Ctrl-C / SIGTERM
    128 + the signal, each with one line on stderr."""
    cfg, given = parse_config(argv)
    code, message = 0, None
    try:
        main(cfg, given)
    except (UserError, OSError) as e:
        code, message = 2, f"{os.path.basename(__file__)}: error: {e}"
    except Diverged as e:
        code, message = 3, f"{os.path.basename(__file__)}: error: {e}"
    except Stopped as e:
        code, message = 128 + e.signum, str(e)
    except dist.DistBackendError:
        # under torchrun: another process ended (rank 0 says why), which broke this one's collective
        code, message = 1, f"{os.path.basename(__file__)}: rank {dist.get_rank()}: stopped, as another process ended"
    finally:
        RunControl.release()
        # a progress bar left open would take the message onto its line
        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
    # under torchrun rank 0 speaks for all ranks, which reach the same end
    ddp = dist.is_available() and dist.is_initialized()
    if message and (not ddp or dist.get_rank() == 0 or code == 1):
        print(message, file=sys.stderr)
    if ddp:
        # a process group left to the interpreter's exit aborts the process
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(cli())
