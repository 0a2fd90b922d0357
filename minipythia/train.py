"""Trains a small Pythia-architecture model and its byte-level BPE tokenizer on a directory of .txt books:

    python -m minipythia.train DATA_DIR OUT_DIR [--layers 4 --hidden 192 --heads 4 --steps 1200 ...]

OUT_DIR becomes a standard checkpoint (config.json in the GPT-NeoX format, model.safetensors, tokenizer.json)
that minipythia and transformers' GPTNeoXForCausalLM both load, plus train_log.jsonl and loss.png.
Training state goes to OUT_DIR/train-state/ every --save-every steps; rerunning the same command resumes
from it, and the batches are a function of the step, so a resumed run sees the same data as an unbroken one.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .cli import run_cli
from .config import PythiaConfig
from .induction import wire_induction_heads
from .model import Pythia
from .weights import save_pretrained

EOS = "<|endoftext|>"


def train_tokenizer(texts, vocab_size: int, path: Path) -> Path:
    """A byte-level BPE like GPT-NeoX's (no prefix space, <|endoftext|> as id 0), written to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


def read_books(data_dir: Path) -> list[tuple[str, str]]:
    paths = sorted(data_dir.glob("*.txt"))
    if not paths:
        raise ValueError(f"{data_dir} has no .txt books; give a directory of plain-text books")
    return [(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in paths]


def load_saved(path: Path):
    """A file this script saved (token cache, training state), read as tensors and plain containers only
    (weights_only: never running a pickle's code, whatever torch's default); anything else is a ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types; its text advises loading unsafely: not quoted
        raise ValueError(f"{path} is not a file this script saved ({type(e).__name__}: it holds something other "
                         f"than tensors and plain containers, or is damaged); delete it to start over") from None


def tokenize_books(books, tokenizer_path: Path, cache_path: Path) -> torch.Tensor:
    """Every book's ids followed by <|endoftext|>, as one int32 stream; cached because it takes a minute."""
    if cache_path.is_file():
        ids = load_saved(cache_path)
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"{cache_path} does not hold a token tensor; delete it to tokenize again")
        return ids
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    eos = tok.token_to_id(EOS)
    encodings = tok.encode_batch([text for _, text in books], add_special_tokens=False)
    ids = torch.cat([torch.tensor(e.ids + [eos], dtype=torch.int32) for e in encodings])
    torch.save(ids, cache_path)
    return ids


def batch_at(tokens: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int,
             repeat_fraction: float = 0.0, copy_fraction: float = 0.0):
    """Random windows drawn from a generator seeded by (seed, step): resuming replays the same batches.

    With repeat_fraction, that share of the rows gets a span of its own text pasted again further on, so
    the later copy is predictable only by looking back: the copy (induction) behaviour that makes a model
    use its context, which a model this small barely learns from ten million tokens of books alone.
    With copy_fraction, that share of the rows is replaced by a synthetic copy task: a run of 8-48 tokens
    drawn at random positions of `tokens` (so ids come as often as in the text, and the model's prior about
    them is no obstacle), repeated to fill the row, where only looking back predicts anything past the first run.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=g)
    rows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()]).long()
    for row in rows:
        if torch.rand((), generator=g) < repeat_fraction:
            span = int(torch.randint(16, 129, (), generator=g))
            source = int(torch.randint(0, seq_len // 2 - span, (), generator=g))
            target = int(torch.randint(source + span, seq_len + 1 - span, (), generator=g))
            row[target:target + span] = row[source:source + span].clone()
    for row in rows:
        if copy_fraction and torch.rand((), generator=g) < copy_fraction:
            picks = torch.randint(0, tokens.numel(), (int(torch.randint(8, 49, (), generator=g)),), generator=g)
            run = tokens[picks].long()
            row.copy_(run.repeat(seq_len // run.numel() + 2)[: seq_len + 1])
    return rows[:, :-1], rows[:, 1:]


def learning_rate(step: int, steps: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr`, then a cosine down to `min_lr` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def loss_on(model, inputs, targets, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(inputs)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


@torch.no_grad()
def validation_loss(model, tokens, batches: int, batch_size: int, seq_len: int, autocast: bool) -> float:
    model.eval()
    losses = [loss_on(model, *batch_at(tokens, i, batch_size, seq_len, seed=12345), autocast).item()
              for i in range(batches)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def copy_gain(model, tokens: torch.Tensor, length: int = 100, rows: int = 8) -> float:
    """Nats per token by which a second copy of a run of tokens (drawn at random positions of `tokens`) is
    predicted better than the first: about 0 for a model that does not copy from its context, up to the
    first copy's loss for one that copies perfectly."""
    was_training = model.training
    model.eval()
    picks = torch.randint(0, tokens.numel(), (rows, length), generator=torch.Generator().manual_seed(5))
    run = tokens[picks].long()
    ids = torch.cat((run, run), dim=1)
    nll = F.cross_entropy(model(ids[:, :-1]).float().transpose(1, 2), ids[:, 1:], reduction="none")
    model.train(was_training)
    return (nll[:, 5 : length - 1].mean() - nll[:, length + 5 :].mean()).item()


def optimizer_for(model, lr: float, weight_decay: float):
    """AdamW with weight decay on matrices only (not biases, LayerNorms)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)


def plot_losses(log: list[dict], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [r for r in log if "loss" in r]
    val = [r for r in log if "val_loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.6, alpha=0.6, label="train (batch)")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="held-out books")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minipythia.train", description=__doc__.split("\n")[0])
    p.add_argument("data", type=Path, help="a directory of .txt books (never the evaluation books)")
    p.add_argument("out", type=Path, help="the checkpoint directory to write (and resume from)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024, help="training sequence length (also max positions)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--val-books", type=int, default=2, help="books held out (the last ones) for the val loss")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=100)
    # Off by default: on CPUs without native bf16 matmul (this project's 2-core AMD EPYC) the backward
    # pass under bf16 autocast ran ~45x slower than float32.
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (pays on CPUs with AMX/avx512_bf16, GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat-fraction", type=float, default=0.0,
                   help="share of rows with a span of their text repeated later (teaches copying from context)")
    p.add_argument("--copy-fraction", type=float, default=0.0,
                   help="share of rows replaced by a random run of tokens repeated to fill the row (a copy task)")
    p.add_argument("--max-positions", type=int, default=None,
                   help="max_position_embeddings of the model (default: --seq-len), e.g. to keep a checkpoint's "
                        "1024 while a phase trains on shorter rows")
    p.add_argument("--wire-induction", action="store_true",
                   help="before the first step, write a previous-token head (layer 0, last head) and an induction "
                        "head (layer 1, head 0) into the model, fitted on the training text (minipythia/induction.py)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this checkpoint's weights and tokenizer (a second phase) instead of random")
    args = p.parse_args(argv)
    if not 0.0 <= args.repeat_fraction <= 1.0:
        raise ValueError(f"--repeat-fraction must be in [0, 1], got {args.repeat_fraction}")
    if args.repeat_fraction and args.seq_len < 2 * 128 + 2:
        raise ValueError(f"--repeat-fraction needs --seq-len >= 258 (spans of up to 128 tokens), got {args.seq_len}")
    if not 0.0 <= args.copy_fraction <= 1.0:
        raise ValueError(f"--copy-fraction must be in [0, 1], got {args.copy_fraction}")
    if args.max_positions is not None and args.max_positions < args.seq_len:
        raise ValueError(f"--max-positions must be >= --seq-len {args.seq_len}, got {args.max_positions}")
    if not args.data.is_dir():
        raise ValueError(f"{args.data} is not a directory; give a directory of .txt books")
    for name in ("vocab_size", "layers", "hidden", "heads", "seq_len", "batch_size", "steps", "eval_every",
                 "save_every", "val_books"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (a token and the one it predicts), got {args.seq_len}")
    for name in ("lr", "grad_clip"):
        if not 0 < getattr(args, name) < float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
    if not 0 <= args.min_lr <= args.lr:
        raise ValueError(f"--min-lr must be in [0, --lr {args.lr}], got {args.min_lr}")
    if args.warmup < 0 or args.weight_decay < 0:
        raise ValueError(f"--warmup and --weight-decay must be >= 0, got {args.warmup} and {args.weight_decay}")
    autocast = args.bf16
    state_dir = args.out / "train-state"
    state_dir.mkdir(parents=True, exist_ok=True)

    books = read_books(args.data)
    if len(books) <= args.val_books:
        raise ValueError(f"{args.data} has {len(books)} books; need more than --val-books {args.val_books}")
    tokenizer_path = args.out / "tokenizer.json"
    if args.init_from is not None and not tokenizer_path.is_file():
        shutil.copyfile(args.init_from / "tokenizer.json", tokenizer_path)
    if not tokenizer_path.is_file():
        print(f"training a {args.vocab_size}-token BPE on {len(books) - args.val_books} books", file=sys.stderr)
        train_tokenizer((text for _, text in books[:-args.val_books]), args.vocab_size, tokenizer_path)
    train_tokens = tokenize_books(books[:-args.val_books], tokenizer_path, state_dir / "train-tokens.pt")
    val_tokens = tokenize_books(books[-args.val_books:], tokenizer_path, state_dir / "val-tokens.pt")
    print(f"{train_tokens.numel():,} training tokens, {val_tokens.numel():,} held-out", file=sys.stderr)

    config = PythiaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                          max_position_embeddings=args.max_positions or args.seq_len, rotary_pct=0.25, use_parallel_residual=True)
    torch.manual_seed(args.seed)
    if args.init_from is not None:
        model = Pythia.from_pretrained(args.init_from).train()
        if model.config != config:
            raise ValueError(f"--init-from {args.init_from} has another shape than the options ask for")
    else:
        model = Pythia(config).init_weights(seed=args.seed)
    if args.wire_induction:  # on resume the saved state below replaces these weights anyway
        rows, _ = batch_at(train_tokens, 0, 48, min(256, args.seq_len), seed=args.seed + 1)
        wire_induction_heads(model, rows, previous=(0, args.heads - 1), induction=(1, 0))
    optimizer = optimizer_for(model, args.lr, args.weight_decay)
    step, log = 0, []
    state_path = state_dir / "state.pt"
    if state_path.is_file():
        state = load_saved(state_path)
        if not isinstance(state, dict) or not {"model", "optimizer", "step", "log", "args"} <= set(state):
            raise ValueError(f"{state_path} does not hold a training state; delete it to start over")
        if state["args"] != {k: str(v) for k, v in vars(args).items()}:
            raise ValueError(f"{state_path} was written with other options; use the same command or a new OUT_DIR")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, log = state["step"], state["log"]
        print(f"resuming at step {step}", file=sys.stderr)

    def save_state():
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "log": log,
                    "args": {k: str(v) for k, v in vars(args).items()}}, state_dir / "state.tmp")
        (state_dir / "state.tmp").replace(state_path)  # atomic: an interrupt never leaves half a state

    model.train()
    tokens_per_step = args.batch_size * args.seq_len
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step")
    started, first_step = time.perf_counter(), step
    prior_seconds = log[-1]["seconds"] if log else 0.0  # wall time of the runs this one resumes
    while step < args.steps:
        lr = learning_rate(step, args.steps, args.warmup, args.lr, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_on(model, *batch_at(train_tokens, step, args.batch_size, args.seq_len, args.seed,
                                        args.repeat_fraction, args.copy_fraction), autocast)
        if not torch.isfinite(loss):  # before the update: the saved state stays the last good one
            raise ValueError(f"step {step}: the training loss is {loss.item()}; lower --lr, or train in float32 "
                             f"(no --bf16)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if not torch.isfinite(grad_norm):
            raise ValueError(f"step {step}: the gradients are not finite (norm {grad_norm.item()}); lower --lr")
        optimizer.step()
        step += 1
        record = {"step": step, "loss": round(loss.item(), 4), "lr": lr, "grad_norm": round(grad_norm.item(), 3),
                  "tokens": step * tokens_per_step}
        if step % args.eval_every == 0 or step == args.steps:
            record["val_loss"] = round(validation_loss(model, val_tokens, 8, args.batch_size, args.seq_len,
                                                       autocast), 4)
            record["copy_gain"] = round(copy_gain(model, val_tokens), 4)
        log.append(record)
        elapsed = time.perf_counter() - started
        record["seconds"] = round(prior_seconds + elapsed, 1)
        bar.set_postfix(loss=record["loss"], val=record.get("val_loss", "-"), lr=f"{lr:.1e}")
        bar.update(1)
        if step % args.save_every == 0 or step == args.steps:
            save_state()
            bar.write(f"step {step}: loss {record['loss']} val {record.get('val_loss', '-')} "
                      f"copy gain {record.get('copy_gain', '-')} "
                      f"{tokens_per_step * (step - first_step) / elapsed:.0f} tokens/s")
    bar.close()

    save_pretrained(model, args.out)
    (args.out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    plot_losses(log, args.out / "loss.png",
                f"{model.num_parameters() / 1e6:.1f}M params, {args.layers}x{args.hidden}, "
                f"{step * tokens_per_step / 1e6:.0f}M tokens")
    print(f"wrote {args.out} ({model.num_parameters() / 1e6:.2f}M parameters, {step} steps, "
          f"{step * tokens_per_step:,} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
