"""Pre-train a tiny MoE language model on CPU, average its snapshots with moemerge (PMA), and
show the paper's effect (arXiv 2505.12082): at a constant learning rate the average of the last
N snapshots has a lower held-out loss than the last snapshot; and PMA-init: after a loss spike,
resume from the DCP merge of the snapshots before it.

    python examples/pma_pretrain/run.py --out /tmp/pma_pretrain            # full (a few minutes)
    python examples/pma_pretrain/run.py --out /tmp/pma_medium --medium      # the README's plot
    python examples/pma_pretrain/run.py --out /tmp/pma_small --small        # seconds (the tests)

Writes OUT/results.md (table), OUT/pma_pretrain.png (plot), OUT/results.json, the snapshots
(OUT/run/step-NNNNNN, DCP with optimizer state), the nightly averages (OUT/merged/{sma,wma,ema},
`moemerge pma update`) and the PMA-init checkpoint (OUT/pma-init, `moemerge pma --format dcp`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from safetensors.torch import load_file

from moemerge.cli import main as moemerge

METHODS = ("sma", "wma", "ema")


@dataclass(frozen=True, slots=True, kw_only=True)
class Setup:
    """Sizes and schedule of one run."""

    vocab: int = 96
    d_model: int = 128
    layers: int = 3
    heads: int = 4
    experts: int = 8
    ffn: int = 256
    seq: int = 64
    batch: int = 16
    steps: int = 600
    every: int = 25
    """Steps between DCP snapshots."""
    last: int = 6
    """The window: `--last N` snapshots averaged each night."""
    night: int = 2
    """Snapshots between two nightly `pma update` runs."""
    lr: float = 3e-3
    """The constant learning rate (the setting PMA is for)."""
    spike_lr: float = 0.3
    spike_steps: int = 15
    resume_steps: int = 60
    eval_batches: int = 8
    seed: int = 0


#: What the committed plot was made with (about 4 minutes on 2 busy CPU cores).
MEDIUM = Setup(vocab=64, d_model=96, layers=2, experts=8, ffn=192, steps=240, every=10, last=6, night=2,
               resume_steps=40, eval_batches=6)
SMALL = Setup(vocab=32, d_model=32, layers=1, heads=2, experts=4, ffn=64, seq=32, batch=8, steps=40, every=10,
              last=2, night=1, spike_steps=4, resume_steps=6, eval_batches=2)


# -- the corpus: a random sparse Markov chain (held-out loss has a known floor) --------------


class Corpus:
    """Tokens from a fixed random order-1 Markov chain: each token has a few likely successors."""

    def __init__(self, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(vocab, vocab, generator=g) * 3.0
        self.p = torch.softmax(logits, dim=-1)
        self.vocab = vocab
        self.entropy = float(-(self.p * self.p.log()).sum(-1).mean())  # ~ the loss floor

    def batch(self, n: int, seq: int, g: torch.Generator) -> torch.Tensor:
        x = torch.empty(n, seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, self.vocab, (n,), generator=g)
        for t in range(seq):
            x[:, t + 1] = torch.multinomial(self.p[x[:, t]], 1, generator=g).squeeze(1)
        return x


# -- the model: a small transformer with a top-2 MoE feed-forward ---------------------------


class MoE(torch.nn.Module):
    """Top-2 routed experts (Mixtral-style), experts as fused tensors [E, ...]."""

    def __init__(self, d: int, f: int, e: int) -> None:
        super().__init__()
        self.router = torch.nn.Linear(d, e, bias=False)
        self.w_in = torch.nn.Parameter(torch.randn(e, d, f) / math.sqrt(d))
        self.w_out = torch.nn.Parameter(torch.randn(e, f, d) / math.sqrt(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gate = torch.softmax(self.router(flat), dim=-1)
        top, idx = gate.topk(2, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e in range(self.w_in.shape[0]):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                h = F.gelu(flat[rows] @ self.w_in[e]) @ self.w_out[e]
                out.index_add_(0, rows, h * top[rows, slot].unsqueeze(1))
        return out.reshape_as(x)


class Block(torch.nn.Module):
    def __init__(self, s: Setup) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(s.d_model)
        self.attn = torch.nn.MultiheadAttention(s.d_model, s.heads, batch_first=True)
        self.norm2 = torch.nn.LayerNorm(s.d_model)
        self.moe = MoE(s.d_model, s.ffn, s.experts)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.moe(self.norm2(x))


class TinyMoE(torch.nn.Module):
    def __init__(self, s: Setup) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(s.vocab, s.d_model)
        self.pos = torch.nn.Parameter(torch.randn(s.seq, s.d_model) * 0.02)
        self.layers = torch.nn.ModuleList([Block(s) for _ in range(s.layers)])
        self.norm = torch.nn.LayerNorm(s.d_model)
        self.head = torch.nn.Linear(s.d_model, s.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        x = self.embed(tokens) + self.pos[:n]
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(self.norm(x))


def loss_of(model: TinyMoE, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: TinyMoE, held_out: list[torch.Tensor]) -> float:
    model.eval()
    try:
        return sum(float(loss_of(model, b)) for b in held_out) / len(held_out)
    finally:
        model.train()


# -- snapshots, nightly averages, PMA-init ---------------------------------------------------


def save_snapshot(path: Path, model: TinyMoE, opt: torch.optim.Optimizer) -> None:
    """A training checkpoint as torch.distributed.checkpoint writes it: model and optimizer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=str(path), no_dist=True)


def load_dcp_model(path: Path, s: Setup) -> TinyMoE:
    """PMA-init: `dcp.load` of a checkpoint's model keys into a fresh model."""
    model = TinyMoE(s)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state["model"])
    return model


def load_hf_model(path: Path, s: Setup) -> TinyMoE:
    """A nightly average (a safetensors directory) into a fresh model."""
    model = TinyMoE(s)
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    model.load_state_dict(weights)
    return model


def cli(*args: str) -> None:
    """Run a `moemerge` command in this process (a cron job would run the same command line)."""
    code = moemerge([*args, "--no-progress"])
    if code != 0:
        raise SystemExit(f"moemerge {' '.join(args)} exited with {code}")


def nightly(out: Path, s: Setup, step: int, held_out: list[torch.Tensor], log: dict[str, Any]) -> None:
    """One night: `pma update` each running average over the newest snapshots, then evaluate."""
    pattern = str(out / "run" / "step-*")
    for m in METHODS:
        extra = ["--alpha", "0.3"] if m == "ema" else []
        cli("pma", "update", str(out / "state" / m), pattern, "-o", str(out / "merged" / m),
            "--method", m, "--last", str(s.last), *extra)
        log["merged"][m].append((step, evaluate(load_hf_model(out / "merged" / m, s), held_out)))


def train(s: Setup, out: Path) -> dict[str, Any]:
    torch.manual_seed(s.seed)
    corpus = Corpus(s.vocab, s.seed)
    g_train = torch.Generator().manual_seed(s.seed + 1)
    g_eval = torch.Generator().manual_seed(s.seed + 2)
    held_out = [corpus.batch(s.batch, s.seq, g_eval) for _ in range(s.eval_batches)]
    model = TinyMoE(s)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    log: dict[str, Any] = {"setup": asdict(s), "params": sum(p.numel() for p in model.parameters()),
                           "entropy_floor": corpus.entropy, "train": [], "snapshots": [],
                           "merged": {m: [] for m in METHODS}}
    t0 = time.monotonic()
    snaps = 0
    for step in range(1, s.steps + 1):
        loss = loss_of(model, corpus.batch(s.batch, s.seq, g_train))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["train"].append((step, float(loss)))
        if step % s.every == 0:
            save_snapshot(out / "run" / f"step-{step:06d}", model, opt)
            log["snapshots"].append((step, evaluate(model, held_out)))
            snaps += 1
            if snaps >= s.last and (snaps - s.last) % s.night == 0:
                nightly(out, s, step, held_out, log)
    log["train_seconds"] = time.monotonic() - t0

    # -- PMA-init: a spike (the LR raised far too high), then resume ---------------------------
    last_step = log["snapshots"][-1][0]
    spiked = load_dcp_model(out / "run" / f"step-{last_step:06d}", s)
    sopt = torch.optim.AdamW(spiked.parameters(), lr=s.spike_lr)
    spike = []
    for i in range(1, s.spike_steps + 1):
        loss = loss_of(spiked, corpus.batch(s.batch, s.seq, g_train))
        sopt.zero_grad()
        loss.backward()
        sopt.step()
        spike.append((last_step + i, evaluate(spiked, held_out)))
    log["spike"] = spike
    # the merge of the snapshots before the spike, as a DCP checkpoint the training job loads
    cli("pma", str(out / "run" / "step-*"), "-o", str(out / "pma-init"), "--format", "dcp", "--method", "sma",
        "--last", str(s.last), "--before-step", str(last_step + 1), "--dcp-prefix", "model.", "--overwrite")
    resumed: dict[str, list[tuple[int, float]]] = {}
    g_state = g_train.get_state()
    for name, start in (("PMA-init (SMA of last N, DCP)", out / "pma-init"),
                        ("last snapshot before the spike", out / "run" / f"step-{last_step:06d}")):
        g_train.set_state(g_state)  # both resumes see the same batches
        m = load_dcp_model(start, s)
        ropt = torch.optim.AdamW(m.parameters(), lr=s.lr)
        curve = [(last_step, evaluate(m, held_out))]
        for i in range(1, s.resume_steps + 1):
            loss = loss_of(m, corpus.batch(s.batch, s.seq, g_train))
            ropt.zero_grad()
            loss.backward()
            ropt.step()
            if i % max(1, s.resume_steps // 12) == 0 or i == s.resume_steps:
                curve.append((last_step + i, evaluate(m, held_out)))
        resumed[name] = curve
    log["resume"] = resumed
    return log


# -- report ----------------------------------------------------------------------------------


def table(log: dict[str, Any]) -> str:
    s = log["setup"]
    step, last = log["snapshots"][-1]
    rows = [f"| model (step {step}) | held-out loss | vs last snapshot |", "|---|---|---|",
            f"| last snapshot | {last:.4f} | |"]
    for m in METHODS:
        if log["merged"][m]:
            v = log["merged"][m][-1][1]
            rows.append(f"| {m.upper()} of last {s['last']} (`pma update`) | {v:.4f} | {v - last:+.4f} |")
    for name, curve in log["resume"].items():
        rows.append(f"| after spike: resume from {name}, {s['resume_steps']} steps | {curve[-1][1]:.4f} | "
                    f"{curve[-1][1] - last:+.4f} |")
    rows.append(f"| (loss floor: the chain's entropy) | {log['entropy_floor']:.4f} | |")
    return "\n".join(rows)


def plot(log: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
    xs, ys = zip(*log["snapshots"])
    a.plot(xs, ys, "o-", color="0.4", ms=3, label="snapshot")
    for m, c in zip(METHODS, ("C0", "C1", "C2")):
        if log["merged"][m]:
            mx, my = zip(*log["merged"][m])
            a.plot(mx, my, "s-", color=c, ms=3, label=f"{m.upper()} of last {log['setup']['last']}")
    a.axhline(log["entropy_floor"], ls=":", color="k", lw=1, label="loss floor")
    a.set(xlabel="step", ylabel="held-out loss", title="constant LR: snapshots vs averages")
    lo = log["entropy_floor"]
    a.set_ylim(lo - 0.05, max(ys[len(ys) // 4:]) + 0.1)
    a.legend(fontsize=8)
    sx, sy = zip(*log["spike"])
    b.plot(sx, sy, "x-", color="C3", label="LR raised: spike")
    for (name, curve), c in zip(log["resume"].items(), ("C0", "0.4")):
        cx, cy = zip(*curve)
        b.plot(cx, cy, "o-", ms=3, color=c, label=f"resume: {name}")
    b.set(xlabel="step", ylabel="held-out loss", title="PMA-init after a loss spike")
    b.set_yscale("log")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="working directory (replaced)")
    ap.add_argument("--small", action="store_true", help="a tiny model and a few steps (seconds)")
    ap.add_argument("--medium", action="store_true", help="a smaller model and fewer steps (minutes)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--plot", default=None, help="also copy the PNG here")
    args = ap.parse_args(argv)
    s = SMALL if args.small else MEDIUM if args.medium else Setup()
    if args.steps:
        s = Setup(**{**asdict(s), "steps": args.steps})
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    log = train(s, out)
    (out / "results.json").write_text(json.dumps(log, indent=1))
    md = table(log)
    (out / "results.md").write_text(md + "\n")
    plot(log, out / "pma_pretrain.png")
    if args.plot:
        shutil.copy(out / "pma_pretrain.png", args.plot)
    print(f"{log['params']:,} parameters, {s.steps} steps in {log['train_seconds']:.0f}s\n{md}")
    return log


if __name__ == "__main__":
    main()
