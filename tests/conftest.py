"""Shared fixtures: random checkpoints written in the published Pythia layout, and the shared data paths.

Each checkpoint comes from a `transformers.GPTNeoXForCausalLM` built in memory with an explicit
rotary_pct (transformers 5 silently rewrites it otherwise), its weights rounded to float16 and saved the
way EleutherAI's files are: float16, legacy config keys, and the buffers minipythia must ignore.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

SHARED = Path(__file__).resolve().parents[2] / "shared"


def pg19_dir() -> Path | None:
    """The local PG-19 test books: $PG19_DIR, else ../shared/data/pg19-test next to the checkout."""
    path = Path(os.environ.get("PG19_DIR", SHARED / "data" / "pg19-test"))
    return path if path.is_dir() else None


def pythia_tokenizer_path() -> Path | None:
    path = Path(os.environ.get("PYTHIA_TOKENIZER", SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"))
    return path if path.is_file() else None


TINY = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
            intermediate_size=256, max_position_embeddings=256)


def hf_reference(seed: int = 0, rotary_pct: float = 0.25, use_parallel_residual: bool = True, **shape):
    """A random transformers GPT-NeoX model whose weights are exactly representable in float16."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    shape = {**TINY, **shape}
    torch.manual_seed(seed)
    config = GPTNeoXConfig(**shape, rotary_pct=rotary_pct, rotary_emb_base=10000,
                           use_parallel_residual=use_parallel_residual, eos_token_id=0, bos_token_id=0)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Larger than the default init (and non-trivial LayerNorms) so that parity means something.
            value = torch.randn_like(p) * 0.05
            if ("layernorm" in name or "layer_norm" in name) and name.endswith("weight"):
                value += 1.0
            p.copy_(value.half().float())
    rope = model.config.rope_parameters
    assert rope["partial_rotary_factor"] == rotary_pct, "transformers dropped the rotary_pct we asked for"
    return model


def write_published_checkpoint(hf_model, directory: Path, tokenizer_json: Path | None = None) -> Path:
    """Saves `hf_model` as EleutherAI publishes Pythia: float16 safetensors with the extra buffers."""
    directory.mkdir(parents=True, exist_ok=True)
    c = hf_model.config
    rope = c.rope_parameters
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
        "hidden_size": c.hidden_size, "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
        "layer_norm_eps": 1e-05, "max_position_embeddings": c.max_position_embeddings, "model_type": "gpt_neox",
        "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
        "rotary_emb_base": rope["rope_theta"], "rotary_pct": rope["partial_rotary_factor"],
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.24.0",
        "use_cache": True, "use_parallel_residual": c.use_parallel_residual, "vocab_size": c.vocab_size,
    }, indent=2))
    tensors = {k.replace("lm_head.", "embed_out."): v.half().contiguous() for k, v in hf_model.state_dict().items()}
    n = c.max_position_embeddings
    head_size = c.hidden_size // c.num_attention_heads
    nd = int(head_size * rope["partial_rotary_factor"])
    for i in range(c.num_hidden_layers):
        prefix = f"gpt_neox.layers.{i}.attention."
        tensors[prefix + "bias"] = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
        tensors[prefix + "masked_bias"] = torch.tensor(-1e9).half()
        tensors[prefix + "rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, nd, 2).float() / nd)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    if tokenizer_json is not None:
        (directory / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    return directory


def train_tiny_tokenizer(path: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE trained on a few generated sentences: enough for CLI and eval smoke tests."""
    from minipythia.train import train_tokenizer

    words = "the quick brown fox jumps over a lazy dog while seven old men read long books by the sea".split()
    g = torch.Generator().manual_seed(0)
    text = [" ".join(words[j] for j in torch.randint(len(words), (12,), generator=g)) + "." for _ in range(300)]
    return train_tokenizer(text, vocab_size, path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Pythia in the published layout, with a tokenizer.json: for CLI and eval smoke tests."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = train_tiny_tokenizer(root / "tokenizer.json")
    return write_published_checkpoint(hf_reference(), root / "ckpt", tokenizer)


@pytest.fixture(scope="session")
def tiny_hf_and_checkpoint(tiny_checkpoint):
    """The transformers model whose weights `tiny_checkpoint` holds."""
    return hf_reference(), tiny_checkpoint


# The pythia-70m architecture (head_size 64, the real vocabulary) for parity tests with random weights.
PYTHIA_70M = dict(vocab_size=50304, hidden_size=512, num_attention_heads=8, num_hidden_layers=6,
                  intermediate_size=2048, max_position_embeddings=2048)
REFERENCE_SHAPES = {"tiny": TINY, "70m": PYTHIA_70M}


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """get(shape, rotary_pct, use_parallel_residual) -> (transformers model, published-layout checkpoint dir).

    `shape` is a key of REFERENCE_SHAPES. Built once per session and argument set: the 70m shape takes seconds.
    """
    built = {}

    def get(shape: str = "tiny", rotary_pct: float = 0.25, use_parallel_residual: bool = True):
        key = (shape, rotary_pct, use_parallel_residual)
        if key not in built:
            hf = hf_reference(rotary_pct=rotary_pct, use_parallel_residual=use_parallel_residual,
                              **REFERENCE_SHAPES[shape])
            directory = tmp_path_factory.mktemp(f"ref-{shape}-rot{rotary_pct}-par{int(use_parallel_residual)}")
            built[key] = hf, write_published_checkpoint(hf, directory)
        return built[key]

    return get


@pytest.fixture(scope="module")
def single_thread():
    """Runs a module on one intra-op thread: with two OpenMP threads on a shared 2-core machine, small
    matmuls can be 100x slower when the other core is busy. Restores the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rotary_by_hand(x: torch.Tensor, positions, config) -> torch.Tensor:
    """GPT-NeoX rotary written out for tests: x (..., T, head_size) at integer positions (T,), the
    "rotate half" form on the first rotary_ndims features, float32 angles as transformers computes them."""
    nd = config.rotary_ndims
    inv_freq = 1.0 / config.rotary_emb_base ** (torch.arange(0, nd, 2, dtype=torch.float32) / nd)
    angles = torch.as_tensor(positions, dtype=torch.float32).reshape(-1, 1) * inv_freq  # (T, nd/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2, rest = x[..., : nd // 2], x[..., nd // 2 : nd], x[..., nd:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def decode_by_hand(model, token, position, kept_keys, kept_values, valid=None):
    """One decode step written out from the weights: token (B, 1) at rotary `position`, attending to the
    given kept K, V per layer (B, nh, n, hs) plus its own; with `valid` (per layer, (B, nh, n) bool), only to
    the entries it marks. Returns logits (B, 1, vocab) and the new keys."""
    c, sd = model.config, model.state_dict()
    nh, hs = c.num_attention_heads, c.head_size

    def ln(x, name):
        return F.layer_norm(x, (c.hidden_size,), sd[name + ".weight"], sd[name + ".bias"], c.layer_norm_eps)

    def linear(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    x = sd["embed_in.weight"][token]  # (B, 1, C)
    new_keys = []
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        qkv = linear(ln(x, p + "input_layernorm"), p + "attention.query_key_value")
        qkv = qkv.view(x.size(0), nh, 3, hs)  # one token: (B, nh, [q, k, v], hs)
        q, k, v = (qkv[:, :, j].unsqueeze(2) for j in range(3))  # (B, nh, 1, hs)
        q, k = rotary_by_hand(q, [position], c), rotary_by_hand(k, [position], c)
        new_keys.append(k)
        keys, values = torch.cat((kept_keys[i], k), dim=2), torch.cat((kept_values[i], v), dim=2)
        logits = q @ keys.transpose(-1, -2) / math.sqrt(hs)  # (B, nh, 1, n+1)
        if valid is not None:
            seen = torch.cat((valid[i], torch.ones_like(valid[i][..., :1])), dim=-1)  # and its own entry
            logits = logits.masked_fill(~seen[:, :, None], float("-inf"))
        weights = logits.softmax(dim=-1)
        attn = linear((weights @ values).transpose(1, 2).reshape(x.shape), p + "attention.dense")
        mlp_in = x if c.use_parallel_residual else x + attn
        mlp = linear(F.gelu(linear(ln(mlp_in, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h")),
                     p + "mlp.dense_4h_to_h")
        x = mlp_in + attn + mlp if c.use_parallel_residual else mlp_in + mlp
    return ln(x, "final_layer_norm") @ sd["embed_out.weight"].T, new_keys


def snapshot(cache):
    """Copies of every layer's kept keys, values and positions: three lists, one entry per layer."""
    layers = range(cache.num_layers)
    return ([cache.keys(i).clone() for i in layers], [cache.values(i).clone() for i in layers],
            [cache.positions(i).clone() for i in layers])


def causal_attention(q, k):
    """Float64 softmax attention (B, nh, Lq, Lk) of queries at the LAST Lq positions of the Lk keys."""
    q, k = q.double(), k.double()
    Lq, Lk = q.size(2), k.size(2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    visible = torch.arange(Lk) <= torch.arange(Lk - Lq, Lk)[:, None]
    return logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)


def random_ids(model, B: int, T: int, seed: int) -> torch.Tensor:
    """(B, T) token ids uniformly drawn from the model's vocabulary, seeded."""
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def kept_sets_agree(positions, ref_scores, n_keep: int, rel_gap: float = 1e-3) -> tuple[int, int]:
    """Per (batch, head), our kept positions (B, nh, n_keep) against the top n_keep of a reference's scores
    (B, nh, L), wherever the reference has no near-tie at the cut (a gap under rel_gap of the cut's score):
    those are counted as tied and skipped. Returns (compared, tied)."""
    compared = tied = 0
    B, H, _ = ref_scores.shape
    for b in range(B):
        for h in range(H):
            ranked = ref_scores[b, h].sort(descending=True)
            cut, below = ranked.values[n_keep - 1], ranked.values[n_keep]
            if not cut - below > rel_gap * cut.abs():
                tied += 1
                continue
            assert set(positions[b, h].tolist()) == set(ranked.indices[:n_keep].tolist()), (b, h)
            compared += 1
    return compared, tied


def check_decoding_by_hand(model, cache, token, position: int, keys, values, valid, steps: int = 3,
                           atol: float = 1e-5):
    """Decodes `steps` tokens through `cache` from `token` at `position`, each step's logits checked against
    decode_by_hand over the given kept K, V per layer and the entries `valid` marks (heads may keep
    different ones), to atol; each new token joins every head. Returns the last masks (per layer)."""
    for step in range(steps):
        by_hand, new_keys = decode_by_hand(model, token, position + step, keys, values, valid)
        ours = model(token, cache=cache)
        torch.testing.assert_close(ours, by_hand, rtol=0, atol=atol)
        new_values = [cache.values(i)[:, :, -1:] for i in range(cache.num_layers)]
        keys = [torch.cat((k, n), dim=2) for k, n in zip(keys, new_keys)]
        values = [torch.cat((v, n), dim=2) for v, n in zip(values, new_values)]
        valid = [torch.cat((m, torch.ones_like(m[..., :1])), dim=-1) for m in valid]
        token = ours[:, -1:].argmax(-1)
    return valid


def tiny_sweep(checkpoint: Path, tmp_path: Path, policies: str) -> Path:
    """Runs `python -m eval sweep` on one small book (96 / 32 windows, 200 tokens) with the given policies
    (YAML list lines) and returns its results folder."""
    from eval.__main__ import main
    from minipythia.cli import run_cli

    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(" ".join(["the quick brown fox jumps over a lazy dog"] * 60))
    (tmp_path / "s.yaml").write_text(f"data: {books}\nctx_len: 96\nstride: 32\nmax_tokens: 200\npolicies:\n{policies}")
    out = tmp_path / "out"
    assert run_cli(main, ["sweep", str(tmp_path / "s.yaml"), "--model", str(checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def scale_grid(tmp_path_factory, tiny_checkpoint) -> Path:
    """A sweep over two local models of different shapes x two "revisions" (each model directory holds a
    checkpoint folder per revision, as a local copy of training checkpoints), two books, PPL and recall:
    returns the YAML's path."""
    root = tmp_path_factory.mktemp("scale")
    tokenizer = tiny_checkpoint / "tokenizer.json"
    shapes = {"narrow": dict(hidden_size=32, num_hidden_layers=2), "deep": dict(hidden_size=64, num_hidden_layers=3)}
    for name, shape in shapes.items():
        for seed, revision in enumerate(("step1", "step2")):
            write_published_checkpoint(hf_reference(seed=seed, **shape), root / name / revision, tokenizer)
    books = root / "books"
    books.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven old men read long books by the sea".split()
    for i, book in enumerate(("alpha", "beta")):
        g = torch.Generator().manual_seed(i)
        (books / f"{book}.txt").write_text(" ".join(words[j] for j in torch.randint(len(words), (300,), generator=g)))
    (root / "scale.yaml").write_text(f"""\
model: [{root / 'narrow'}, {root / 'deep'}]
revision: [step1, step2]
data: {books}
ctx_len: 64
stride: 16
max_tokens: 160
batch_size: 2
tasks: [ppl, {{recall: {{contexts: [96], depths: [0.5], trials: 2, passage_tokens: 16, cue_tokens: 4}}}}]
policies:
  - {{compressor: none}}
  - {{compressor: snapkv, window_size: 4, max_capacity_prompt: [16, 24]}}
  - {{compressor: knorm, compression_ratio: 0.5}}
""")
    return root / "scale.yaml"


def result_files(out: Path) -> dict[str, bytes]:
    """Every result file of a results folder, by relative path: what a serial, a distributed and a resumed
    run must leave identical. Left out: the run's logs and what is written from them (sweep.json's runs and
    machine, units.jsonl, the reports and plots, which name run times)."""
    files = {}
    for path in sorted(out.rglob("*")):
        name = path.relative_to(out).as_posix()
        if path.is_file() and path.suffix in (".jsonl", ".json") and path.name not in ("units.jsonl", "sweep.json"):
            files[name] = path.read_bytes()
        elif path.name == "sweep.json":
            summary = json.loads(path.read_text())
            files[name] = json.dumps({k: v for k, v in summary.items() if k not in ("runs", "machine")}).encode()
    return files


def score_examples(task, model, examples, configs, meta: dict, path_of):
    """Each configuration's record on each example, appended to path_of(config) one example at a time: what a
    sweep's units write (eval.tasks.example_records is the step they run)."""
    from eval.results import append_jsonl
    from eval.tasks import example_records

    for example in examples:
        for c, record in zip(configs, example_records(task, model, [example], configs, meta)[0]):
            append_jsonl(path_of(c), record)
