"""Pythia (GPT-NeoX) hyper-parameters, read from a checkpoint's config.json, and the published sizes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class PythiaConfig:
    vocab_size: int = 50304
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    eos_token_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rotary_pct", "rotary_emb_base", "layer_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
                raise ValueError(f"{name} must be a number, got {value!r}")
        for name in ("rotary_emb_base", "layer_norm_eps"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if not isinstance(self.use_parallel_residual, bool):
            raise ValueError(f"use_parallel_residual must be true or false, got {self.use_parallel_residual!r}")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool) or self.eos_token_id < 0:
            raise ValueError(f"eos_token_id must be a token id, got {self.eos_token_id!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_size * self.rotary_pct)

    @classmethod
    def from_dict(cls, d: dict) -> "PythiaConfig":
        """Reads both the published (transformers 4.x) keys and the newer `rope_parameters` form."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object of settings, got {type(d).__name__}")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"the config lacks {', '.join(missing)}")
        if d.get("model_type", "gpt_neox") != "gpt_neox":
            raise ValueError(f"config.json has model_type {d['model_type']!r}; minipythia loads only gpt_neox (Pythia)")
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported; Pythia uses 'gelu'")
        if d.get("tie_word_embeddings", False):
            raise ValueError("tie_word_embeddings=true is not supported; Pythia's embed_out is untied")
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be a mapping, got {rope!r}")
        rotary_pct = d.get("rotary_pct", rope.get("partial_rotary_factor", 0.25))
        rotary_base = d.get("rotary_emb_base", rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        eos = d.get("eos_token_id", 0)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            intermediate_size=d.get("intermediate_size", 4 * d["hidden_size"]),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rotary_pct=_as_float(rotary_pct),
            rotary_emb_base=_as_float(rotary_base),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            use_parallel_residual=d.get("use_parallel_residual", True),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "PythiaConfig":
        """A checkpoint's config.json; anything wrong with it is a ValueError naming the file."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); restore it from the published checkpoint") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict:
        """config.json in the published layout (legacy keys), loadable by minipythia and transformers."""
        d = asdict(self)
        d.update(
            architectures=["GPTNeoXForCausalLM"],
            model_type="gpt_neox",
            hidden_act="gelu",
            bos_token_id=self.eos_token_id,
            tie_word_embeddings=False,
            use_cache=True,
            # transformers >= 5 reads rope_parameters and ignores rotary_pct when both are absent/conflicting.
            rope_parameters={"rope_type": "default", "rope_theta": self.rotary_emb_base,
                             "partial_rotary_factor": self.rotary_pct},
        )
        return d


def _as_float(value):
    """A number as a float; anything else as it is, for __post_init__ to name."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


# The published Pythia sizes (Biderman et al. 2023, "Pythia", Table 1; 14m and 31m added later by EleutherAI):
# name -> (num_hidden_layers, hidden_size, num_attention_heads). Each also exists as "-deduped".
# config.json in the checkpoint stays the authority (vocab_size differs for the largest sizes).
PYTHIA_SHAPES = {
    "14m": (6, 128, 4),
    "31m": (6, 256, 8),
    "70m": (6, 512, 8),
    "160m": (12, 768, 12),
    "410m": (24, 1024, 16),
    "1b": (16, 2048, 8),
    "1.4b": (24, 2048, 16),
    "2.8b": (32, 2560, 32),
    "6.9b": (32, 4096, 32),
    "12b": (36, 5120, 40),
}

MODEL_NAMES = [f"pythia-{size}{suffix}" for size in PYTHIA_SHAPES for suffix in ("", "-deduped")]


def hub_id(name: str) -> str:
    """'pythia-70m-deduped' -> 'EleutherAI/pythia-70m-deduped' (names outside the registry are returned as given)."""
    return f"EleutherAI/{name}" if name in MODEL_NAMES else name


def config_for_size(size: str, vocab_size: int = 50304) -> PythiaConfig:
    """The architecture of a published size, for benchmarks and tests with random weights."""
    size = size.removeprefix("pythia-").removesuffix("-deduped")
    if size not in PYTHIA_SHAPES:
        raise ValueError(f"unknown Pythia size {size!r}; choose one of {', '.join(PYTHIA_SHAPES)}")
    layers, hidden, heads = PYTHIA_SHAPES[size]
    return PythiaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden)
