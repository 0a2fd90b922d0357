"""Finding, reading and writing checkpoints in the published Hugging Face layout.

A source is a local directory (config.json + model.safetensors | sharded safetensors with an index |
pytorch_model.bin), or a registry name (`pythia-70m-deduped`) / hub id (`EleutherAI/pythia-70m-deduped`):
looked up under weights/ first (see minipythia.download), else fetched with huggingface_hub into its
cache (HF_HUB_OFFLINE=1 uses the cache only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import PythiaConfig, hub_id
from .bounded import first_line, shown
from .hub import bound_hub_requests, hub_timeout, transport_errors

PACKAGE_DIR = Path(__file__).resolve().parent
# Run from a clone (the source tree holds pyproject.toml), checkpoints live in its weights/; installed from a
# wheel, in weights/ under the working directory (site-packages is no place for downloads).
SOURCE_TREE = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").is_file() else None
WEIGHTS_DIR = SOURCE_TREE / "weights" if SOURCE_TREE else Path("weights")
# What the CLIs load when --model is left out: real Pythia when it can be had, else the small model we
# trained and ship (see weights/tiny-pg19/README.md), so every command runs offline. A wheel carries it as
# package data, minipythia/embedded/tiny-pg19 (pyproject.toml maps weights/ there).
DEFAULT_MODEL = "EleutherAI/pythia-70m-deduped"
EMBEDDED_MODEL = WEIGHTS_DIR / "tiny-pg19" if SOURCE_TREE else PACKAGE_DIR / "embedded" / "tiny-pg19"
# The dtypes a model can be loaded in, by name (float16 overflows in Pythia's attention).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HUB_FILES = ["config.json", "tokenizer.json", "*.safetensors", "model.safetensors.index.json"]

# Buffers the published files carry that the model recomputes or does not need: the causal mask, its
# fill value and the rotary frequencies. Every other tensor must map onto a parameter.
IGNORED_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")


def checkpoint_key(key: str) -> str | None:
    """Checkpoint tensor name -> our parameter name, or None for a buffer we drop. The head is `embed_out`
    in published files; transformers 5 calls it `lm_head` in memory, so a state_dict() saved by hand has that."""
    if key.endswith(IGNORED_SUFFIXES):
        return None
    if key == "lm_head.weight":
        return "embed_out.weight"
    return key.removeprefix("gpt_neox.")


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve(source: str | Path, revision: str | None = None) -> Path:
    """Returns a local directory holding the checkpoint, downloading it from the hub when needed."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; point --model at a checkpoint directory")
        return path
    repo = hub_id(str(source))
    # A path (absolute, relative to . or ~, or a checkpoint file) that is not there is not a hub id either.
    looks_like_path = path.is_absolute() or str(source).startswith((".", "~")) or path.suffix in (".json", ".bin",
                                                                                                     ".safetensors")
    if repo.count("/") != 1 or path.exists() or looks_like_path:
        raise ModelNotFoundError(f"{str(source)!r} is neither an existing checkpoint directory nor a hub id "
                                 f"(e.g. EleutherAI/pythia-70m-deduped)")
    local = local_weights_dir(repo, revision)
    if (local / "config.json").is_file():  # put there by `python -m minipythia.download`
        return local
    return download(repo, revision)


def local_weights_dir(repo: str, revision: str | None = None) -> Path:
    """weights/NAME[-REVISION]: where `python -m minipythia.download` keeps a hub checkpoint."""
    return WEIGHTS_DIR / (repo.split("/")[-1] + (f"-{revision}" if revision else ""))


def download(repo: str, revision: str | None = None, local_dir: str | Path | None = None) -> Path:
    """Fetches config, tokenizer and weights of a hub repository (safetensors, else pytorch_model.bin)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    bound_hub_requests()  # a hub that never answers fails after $MINIPYTHIA_HUB_TIMEOUT s instead of hanging
    wait = hub_timeout()
    try:
        local = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES, local_dir=local_dir,
                                       etag_timeout=wait))
        if not any(local.glob("*.safetensors")):  # some early training revisions only have the .bin
            local = Path(snapshot_download(repo, revision=revision, local_dir=local_dir, etag_timeout=wait,
                                           allow_patterns=HUB_FILES + ["pytorch_model.bin"]))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(f"model {repo!r} is not in the Hugging Face cache and the hub is unreachable"
                                 f"{' (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE') else ''}; "
                                 f"download it once with network, or pass a local checkpoint directory") from None
    except (RepositoryNotFoundError, HfHubHTTPError) as e:
        raise ModelNotFoundError(f"cannot download {repo!r} (revision {revision or 'main'}): "
                                 f"{first_line(e)}") from None
    except transport_errors() as e:  # a proxy that refuses, a timeout, a broken connection: the hub's transport
        raise ModelNotFoundError(f"model {repo!r} cannot be fetched: the hub is unreachable ({type(e).__name__}: "
                                 f"{first_line(e)}); download it once with network, or pass a local checkpoint "
                                 f"directory") from None
    return local


FIX = "download the checkpoint again (python -m minipythia.download NAME)"


def safetensors_files(directory: Path) -> list[str] | None:
    """The checkpoint's safetensors files (the shards its index names, or model.safetensors); None when it holds a
    pytorch_model.bin instead. A broken index is a ValueError naming it."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            if not files or not all(isinstance(f, str) for f in files):
                raise ValueError("no shard names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map of shard files: "
                             f"{first_line(e)}); {FIX}") from None
        absent = [f for f in files if not (directory / f).is_file()]
        if absent:
            raise ValueError(f"{index} names shard {shown(absent[0])}, which is not in {directory}; {FIX}")
        return files
    if (directory / "model.safetensors").is_file():
        return ["model.safetensors"]
    if (directory / "pytorch_model.bin").is_file():
        return None
    raise ModelNotFoundError(f"{directory} has no model.safetensors, safetensors index or pytorch_model.bin")


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, by checkpoint key, in their stored dtype. A file that cannot be
    read as what it claims to be is a ValueError naming it."""
    files = safetensors_files(directory)
    if files is None:
        try:
            state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for a file that is not a checkpoint
            raise ValueError(f"{directory / 'pytorch_model.bin'} cannot be read ({first_line(e)}); {FIX}") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError(f"{directory / 'pytorch_model.bin'} does not hold a state dict of tensors; {FIX}")
        return state
    return _read_safetensors(directory, files, lambda f, key: f.get_tensor(key))


def _read_safetensors(directory: Path, files: list[str], read) -> dict:
    """read(file, key) of every tensor of the files, by key."""
    found = {}
    for name in files:
        try:
            with safe_open(directory / name, framework="pt") as f:
                for key in f.keys():
                    found[key] = read(f, key)
        except Exception as e:  # safetensors' own error type for a truncated or foreign file
            raise ValueError(f"{directory / name} is not a readable safetensors file ({first_line(e)}); "
                             f"{FIX}") from None
    return found


def checkpoint_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape by checkpoint key, read from the safetensors headers without loading any tensor (a
    pytorch_model.bin has no header: it is loaded)."""
    files = safetensors_files(directory)
    if files is None:
        return {key: tuple(t.shape) for key, t in read_state_dict(directory).items()}
    return _read_safetensors(directory, files, lambda f, key: tuple(f.get_slice(key).get_shape()))


def config_disagreement(config: PythiaConfig, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The first config.json field that the checkpoint's tensors contradict, as a sentence; None when the sizes
    agree. Only sizes the tensors show are compared: the full check of every tensor comes with the weights."""
    by_name = {name: (key, shape) for key, shape in shapes.items() if (name := checkpoint_key(key)) is not None}
    layers = {name.split(".")[1] for name in by_name if name.startswith("layers.")}
    evidence = [("num_hidden_layers", len(layers), f"tensors for {len(layers)} layers (gpt_neox.layers.N.*)")]
    for name, axis, field in (("embed_in.weight", 0, "vocab_size"), ("embed_in.weight", 1, "hidden_size"),
                              ("layers.0.mlp.dense_h_to_4h.weight", 0, "intermediate_size")):
        key, shape = by_name.get(name, (None, None))
        if shape is not None and len(shape) == 2:
            evidence.append((field, shape[axis], f"{key} of shape {shape}"))
    for field, found, where in evidence:
        if getattr(config, field) != found:
            return f"config.json says {field} {getattr(config, field)}, but the checkpoint has {where}"
    return None


def read_config(directory: Path) -> PythiaConfig:
    """A checkpoint directory's config.json, checked against its tensors' shapes before anything is built from it:
    a config whose sizes are not the weights' (hidden_size 10^9 beside small weights) is a ValueError naming the
    field, not minutes of allocation."""
    config = PythiaConfig.from_json(directory / "config.json")
    problem = config_disagreement(config, checkpoint_shapes(directory))
    if problem:
        raise ValueError(f"{directory}: {problem}; restore config.json from the published checkpoint")
    return config


def load_pretrained(cls, source, dtype=torch.float32, device="cpu", revision=None):
    if dtype == torch.float16 or dtype == "float16":
        raise ValueError("float16 overflows in Pythia's attention (NaN logits); use dtype bfloat16 or float32")
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (a name or the torch dtype), got {dtype!r}")
    directory = resolve(source, revision)
    config = read_config(directory)
    with torch.device("meta"):
        model = cls(config)
    expected = dict(model.named_parameters())
    state = {}
    for key, tensor in read_state_dict(directory).items():
        name = checkpoint_key(key)
        if name is None:
            continue
        if name in state:
            raise ValueError(f"{directory}: the checkpoint holds {name!r} twice (as {key!r} too)")
        if name not in expected:
            raise ValueError(f"{directory}: unexpected tensor {key!r} in the checkpoint")
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{directory}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                             f"the config needs {tuple(expected[name].shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{directory}: tensor {key!r} is {tensor.dtype}, not floating point")
        state[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r}")
    model.load_state_dict(state, assign=True)
    return model.eval()


def save_pretrained(model, directory: str | Path, dtype=torch.float16):
    """Writes config.json and model.safetensors in the published layout (loadable by transformers too)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_dict = model.config.to_hf_dict()
    config_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    tensors = {}
    for name, p in model.state_dict().items():
        key = name if name.startswith("embed_out") else f"gpt_neox.{name}"
        tensors[key] = p.detach().to(device="cpu", dtype=dtype).contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
