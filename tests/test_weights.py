"""Checkpoint loading and saving: the published layout, its variants, strict key checks, configs, the hub cache."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minipythia.weights as weights
from minipythia import Pythia, PythiaConfig, Tokenizer
from minipythia.weights import ModelNotFoundError, save_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")


def hf_parameters(hf) -> dict:
    """transformers' parameters under our names (its LM head is `lm_head`, ours `embed_out` as published)."""
    out = {}
    for name, p in hf.state_dict().items():
        name = name.replace("lm_head.", "embed_out.").removeprefix("gpt_neox.")
        if not name.endswith(weights.IGNORED_SUFFIXES):
            out[name] = p
    return out


def assert_same_parameters(a: Pythia, b: Pythia):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def rewrite(checkpoint: Path, directory: Path, edit) -> Path:
    """A copy of `checkpoint` whose tensors went through edit(dict) (in place)."""
    directory.mkdir()
    shutil.copy(checkpoint / "config.json", directory / "config.json")
    tensors = load_file(checkpoint / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")
    return directory


@pytest.fixture(scope="module")
def published(reference_checkpoint):
    return reference_checkpoint("tiny", 0.25, True)


def test_published_layout_loads_every_parameter(published):
    hf, checkpoint = published
    stored = load_file(checkpoint / "model.safetensors")
    assert any(k.endswith("attention.bias") for k in stored) and stored["embed_out.weight"].dtype == torch.float16
    model = Pythia.from_pretrained(checkpoint)
    assert not model.training
    expected = hf_parameters(hf)
    ours = model.state_dict()
    assert ours.keys() == expected.keys()
    for name, p in ours.items():
        assert p.dtype == torch.float32 and p.device.type == "cpu"
        assert torch.equal(p, expected[name]), name
    assert not any(t.is_meta for t in model.state_dict().values())


def test_the_loader_leaves_a_trainable_model_and_for_inference_is_explicit(published):
    model = Pythia.from_pretrained(published[1])
    assert all(p.requires_grad for p in model.parameters())  # training starts from it as it is
    assert model.embed_out.weight.is_contiguous()
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    before = model(ids).detach()
    model.for_inference()
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.embed_out.weight.is_contiguous()  # stored column-major: same tensor, other strides
    assert (model(ids) - before).abs().max() < 1e-5


def test_a_forward_with_autograd_after_generate(published):
    """generate() runs under inference_mode; what it caches (the rotary table) must not break a later
    forward that autograd records."""
    from minipythia import generate

    model = Pythia.from_pretrained(published[1])
    generate(model, [1, 2, 3], max_new_tokens=2)
    model(torch.tensor([[1, 2]])).sum().backward()
    assert model.embed_out.weight.grad is not None


def test_bfloat16_loads_the_rounded_weights(published):
    _, checkpoint = published
    fp32, bf16 = Pythia.from_pretrained(checkpoint), Pythia.from_pretrained(checkpoint, dtype=torch.bfloat16)
    for (name, a), b in zip(fp32.state_dict().items(), bf16.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name


def test_float16_is_refused_with_a_clear_message(published):
    with pytest.raises(ValueError, match="float16.*(bfloat16|float32)"):
        Pythia.from_pretrained(published[1], dtype=torch.float16)


def test_unexpected_tensor_is_named(published, tmp_path):
    def add(t):
        t["gpt_neox.layers.0.attention.rotary_proj.weight"] = torch.zeros(4, dtype=torch.float16)

    directory = rewrite(published[1], tmp_path / "extra", add)
    with pytest.raises(ValueError, match=r"unexpected.*gpt_neox\.layers\.0\.attention\.rotary_proj\.weight"):
        Pythia.from_pretrained(directory)


@pytest.mark.parametrize("key", ["gpt_neox.layers.1.mlp.dense_4h_to_h.bias", "embed_out.weight",
                                 "gpt_neox.final_layer_norm.weight"])
def test_missing_tensor_is_named(published, tmp_path, key):
    directory = rewrite(published[1], tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=key.removeprefix("gpt_neox.").replace(".", r"\.")):
        Pythia.from_pretrained(directory)


@pytest.mark.parametrize("key", ["gpt_neox.layers.0.attention.query_key_value.weight", "gpt_neox.embed_in.weight",
                                 "gpt_neox.layers.1.post_attention_layernorm.bias"])
def test_misshaped_tensor_is_named(published, tmp_path, key):
    def shrink(t):
        t[key] = t[key][:-1].contiguous()

    directory = rewrite(published[1], tmp_path / "shape", shrink)
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*shape"):
        Pythia.from_pretrained(directory)


def test_sharded_safetensors_load_identically(published, tmp_path):
    _, checkpoint = published
    tensors = load_file(checkpoint / "model.safetensors")
    directory = tmp_path / "sharded"
    directory.mkdir()
    shutil.copy(checkpoint / "config.json", directory / "config.json")
    keys = sorted(tensors)
    shards = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in shard}, directory / name)
        weight_map.update({k: name for k in shard})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert not (directory / "model.safetensors").exists()
    assert_same_parameters(Pythia.from_pretrained(directory), Pythia.from_pretrained(checkpoint))


def test_pytorch_model_bin_fallback_loads_identically(published, tmp_path):
    _, checkpoint = published
    directory = tmp_path / "bin"
    directory.mkdir()
    shutil.copy(checkpoint / "config.json", directory / "config.json")
    torch.save(load_file(checkpoint / "model.safetensors"), directory / "pytorch_model.bin")
    assert_same_parameters(Pythia.from_pretrained(directory), Pythia.from_pretrained(checkpoint))


def test_directory_without_weights(published, tmp_path):
    shutil.copy(published[1] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelNotFoundError, match="no model.safetensors"):
        Pythia.from_pretrained(tmp_path)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        Pythia.from_pretrained(tmp_path)


PUBLISHED_70M_CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
    "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 2048, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 8, "num_hidden_layers": 6,
    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.24.0", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304}


def test_config_legacy_keys():
    c = PythiaConfig.from_dict(PUBLISHED_70M_CONFIG)
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == \
        (50304, 512, 6, 8, 2048)
    assert (c.rotary_pct, c.rotary_emb_base, c.head_size, c.rotary_ndims) == (0.25, 10000.0, 64, 16)
    assert c.use_parallel_residual is True and c.layer_norm_eps == 1e-5 and c.eos_token_id == 0


@pytest.mark.parametrize("rotary_pct,base", [(1.0, 500.0), (0.5, 25000.0)])
def test_config_rope_parameters_form(rotary_pct, base):
    d = {k: v for k, v in PUBLISHED_70M_CONFIG.items() if k not in ("rotary_pct", "rotary_emb_base")}
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": base, "partial_rotary_factor": rotary_pct}
    c = PythiaConfig.from_dict(d)
    assert (c.rotary_pct, c.rotary_emb_base, c.rotary_ndims) == (rotary_pct, base, int(64 * rotary_pct))


def test_config_written_by_transformers(tmp_path):
    """transformers 5 saves only `rope_parameters` (no rotary_pct / rotary_emb_base)."""
    from transformers import GPTNeoXConfig

    GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, intermediate_size=96, vocab_size=300,
                  rotary_pct=1.0, rotary_emb_base=500, use_parallel_residual=False).save_pretrained(tmp_path)
    c = PythiaConfig.from_json(tmp_path / "config.json")
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers, c.intermediate_size, c.vocab_size) == \
        (64, 4, 3, 96, 300)
    assert (c.rotary_pct, c.rotary_emb_base, c.use_parallel_residual) == (1.0, 500.0, False)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "gpt_neox"), ({"hidden_act": "relu"}, "gelu"),
    ({"tie_word_embeddings": True}, "untied"), ({"num_attention_heads": 7}, "divisible"),
    ({"rotary_pct": 0.0}, r"\(0, 1\]")])
def test_config_rejects_what_pythia_is_not(change, message):
    with pytest.raises(ValueError, match=message):
        PythiaConfig.from_dict({**PUBLISHED_70M_CONFIG, **change})


@pytest.mark.parametrize("rotary_pct,parallel", [(0.25, True), (1.0, False)])
@torch.no_grad()
def test_save_pretrained_round_trips_and_loads_in_transformers(reference_checkpoint, tmp_path, rotary_pct, parallel):
    from transformers import GPTNeoXForCausalLM

    _, checkpoint = reference_checkpoint("tiny", rotary_pct, parallel)
    model = Pythia.from_pretrained(checkpoint)
    save_pretrained(model, tmp_path)
    again = Pythia.from_pretrained(tmp_path)
    assert again.config == model.config
    assert_same_parameters(again, model)

    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["partial_rotary_factor"] == rotary_pct
    assert hf.config.use_parallel_residual == parallel
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_pretrained_in_other_dtypes_is_exact(tmp_path, dtype):
    config = PythiaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=48, rotary_pct=0.5)
    model = Pythia(config).init_weights(seed=0).to(dtype)
    save_pretrained(model, tmp_path, dtype=dtype)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert_same_parameters(Pythia.from_pretrained(tmp_path, dtype=dtype), model)


# --- the Hugging Face hub cache, offline ----------------------------------------------------------------

@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache under tmp_path, offline. huggingface_hub reads HF_HUB_CACHE and
    HF_HUB_OFFLINE into `huggingface_hub.constants` when first imported, and snapshot_download looks them
    up there at call time: set both the environment (for anything imported later) and the constants."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def add_to_hub_cache(cache: Path, repo: str, checkpoint: Path, tokenizer: Path) -> Path:
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, snapshot / name)
    shutil.copy(tokenizer, snapshot / "tokenizer.json")
    return snapshot


def test_hub_id_loads_from_the_offline_cache(offline_hub, published, tiny_checkpoint):
    _, checkpoint = published
    snapshot = add_to_hub_cache(offline_hub, "EleutherAI/pythia-tiny", checkpoint, tiny_checkpoint / "tokenizer.json")
    assert weights.resolve("EleutherAI/pythia-tiny").resolve() == snapshot.resolve()
    assert_same_parameters(Pythia.from_pretrained("EleutherAI/pythia-tiny"), Pythia.from_pretrained(checkpoint))
    tok = Tokenizer.from_pretrained("EleutherAI/pythia-tiny")
    assert tok.decode(tok.encode("the lazy dog.")) == "the lazy dog."


@pytest.mark.parametrize("source", ["EleutherAI/pythia-not-cached", "pythia-70m-deduped"])
def test_hub_id_absent_from_the_offline_cache(offline_hub, monkeypatch, tmp_path, source):
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "no-weights-here")  # registry names go to the hub
    with pytest.raises(ModelNotFoundError) as info:
        Pythia.from_pretrained(source)
    message = str(info.value)
    assert "EleutherAI/pythia-" in message and "HF_HUB_OFFLINE" in message and "local checkpoint directory" in message


def test_registry_name_is_looked_up_in_the_weights_directory_first(offline_hub, monkeypatch, tmp_path, published):
    shutil.copytree(published[1], tmp_path / "pythia-70m")
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    assert weights.resolve("pythia-70m") == tmp_path / "pythia-70m"
    assert_same_parameters(Pythia.from_pretrained("pythia-70m"), Pythia.from_pretrained(published[1]))


def test_neither_directory_nor_hub_id(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither an existing checkpoint directory nor a hub id"):
        Pythia.from_pretrained(str(tmp_path / "a" / "b" / "c"))


def test_importing_minipythia_does_not_import_transformers():
    code = "import minipythia, sys; assert 'transformers' not in sys.modules, 'transformers was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr


@torch.no_grad()
def test_tiny_checkpoint_fixture_matches_its_reference(tiny_hf_and_checkpoint):
    """The shared fixture other tests build on: its checkpoint holds its transformers model's weights."""
    hf, checkpoint = tiny_hf_and_checkpoint
    model = Pythia.from_pretrained(checkpoint)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4
    tok = Tokenizer.from_pretrained(checkpoint)
    assert tok.decode(tok.encode("the quick brown fox.")) == "the quick brown fox."
