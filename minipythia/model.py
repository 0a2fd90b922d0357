"""The Pythia (GPT-NeoX) network in plain PyTorch: partial rotary, fused per-head QKV, parallel residual.

Module names follow the published checkpoints (minus the `gpt_neox.` prefix), so loading is a rename.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from .compressors import Compressor, NoCompression
from .config import PythiaConfig
from .kv import KVCache
from .precision import float32_prefill_default
from .prefill import Prompt
from .rotary import apply_rotary_, rotary_cos_sin


def linear(layer: nn.Module, x: torch.Tensor, upcast: torch.Tensor | None) -> torch.Tensor:
    """layer(x); with upcast, a float32 scratch of at least the layer's weight's size: the product of float32
    copies of x and the layer's weights, rounded back to x's dtype (a bf16 multi-token forward on a CPU without
    native bf16: minipythia/precision.py). Every layer copies its weight into the same scratch: no float32 set
    of weights is kept, and a fresh float32 matrix per call cost 5x the copy in page faults."""
    if upcast is None:
        return layer(x)
    weight = upcast[: layer.weight.numel()].view(layer.weight.shape).copy_(layer.weight)
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), weight, bias).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: PythiaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.head_size = config.head_size
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, cache: KVCache | None, upcast: torch.Tensor | None = None):
        B, T, C = x.shape
        # The fused projection is interleaved per head: [q_h, k_h, v_h] for each head h.
        qkv = linear(self.query_key_value, x, upcast).view(B, T, self.n_head, 3, self.head_size)
        apply_rotary_(qkv[:, :, :, :2], cos, sin)  # queries and keys, in one pass
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, nh, T, hs)

        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)  # (B, nh, n_kept + T, hs)
        n_past = k.size(2) - T
        # Heads that kept different numbers of entries are padded to the longest: (B, nh, n) True = an entry.
        padding = cache.key_padding(self.layer_idx) if cache is not None else None
        # SDPA's default scale is head_size ** -0.5, as in GPT-NeoX.
        if T == 1:
            if cache is not None and q.device.type == "cpu" and q.dtype == torch.bfloat16:
                # On CPUs without native bfloat16, SDPA's bf16 kernel for one query is several times slower
                # than float32 (docs/speed.md): it reads a float32 copy of the cache instead (bf16 values are
                # exact in float32, so only the attention's own rounding changes, and it shrinks).
                k, v = cache.in_float32(k, v)
                q = q.float()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if padding is None else padding[:, :, None]
                                               ).to(x.dtype)
        else:
            mask = None
            if n_past > 0:
                # Every cached entry precedes the new tokens, so the new block is causal among itself only.
                mask = torch.ones(T, n_past + T, dtype=torch.bool, device=x.device).tril(diagonal=n_past)
                if padding is not None:
                    mask = mask & padding[:, :, None]  # (B, nh, T, n)
            # With upcast, the attention's two products in float32 too, on the bf16 entries (exact in float32);
            # the compressor below still gets the bf16 queries.
            q_, k, v = (q.float(), k.float(), v.float()) if upcast is not None else (q, k, v)
            y = F.scaled_dot_product_attention(q_, k, v, attn_mask=mask, is_causal=mask is None).to(x.dtype)

        if cache is not None:
            # After the attention above saw every entry: a compression now only affects later tokens.
            cache.after_attention(self.layer_idx, q)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return linear(self.dense, y, upcast)


class MLP(nn.Module):
    def __init__(self, config: PythiaConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x, upcast: torch.Tensor | None = None):
        hidden = F.gelu(linear(self.dense_h_to_4h, x, upcast))  # exact (erf) GELU
        return linear(self.dense_4h_to_h, hidden, upcast)


class Block(nn.Module):
    def __init__(self, config: PythiaConfig, layer_idx: int):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache, upcast: torch.Tensor | None = None):
        attn = self.attention(self.input_layernorm(x), cos, sin, cache, upcast)
        if self.use_parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x), upcast)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x), upcast)


class Pythia(nn.Module):
    def __init__(self, config: PythiaConfig):
        super().__init__()
        self.config = config
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._rotary_table: tuple[torch.Tensor, torch.Tensor] | None = None  # see rotary()
        # A bf16 model's multi-token forwards multiply in float32 (minipythia/precision.py); for_inference decides.
        self.float32_prefill = False
        self._upcast: torch.Tensor | None = None  # see upcast_scratch()

    def rotary(self, start: int, length: int, device, dtype):
        """cos, sin (length, rotary_ndims) for positions start.., sliced from a table computed once per
        device and dtype (row for row the values rotary_cos_sin gives): a decode step then costs a slice."""
        end = start + length
        table = self._rotary_table
        stale = table is None or table[0].size(0) < end or table[0].dtype != dtype or table[0].device != device
        # A table made under inference_mode cannot be used by a forward that autograd records.
        if stale or (table[0].is_inference() and not torch.is_inference_mode_enabled()):
            # Sized for the trained positions at once (at most 2048, Pythia's, so that a config.json claiming 10^9
            # positions costs nothing until they are used), doubled when a longer sequence comes.
            size = max(min(self.config.max_position_embeddings, 2048), 2 * end if table is not None else end)
            table = self._rotary_table = rotary_cos_sin(self.config, 0, size, device, dtype)
        return table[0][start:end], table[1][start:end]

    def new_cache(self, batch_size: int = 1, compressor=None, decode_interval: int | None = None,
                  record_queries: bool = False, kv_bits: int | None = None, kv_group_size: int | None = None,
                  kv_residual: int | None = None) -> KVCache:
        """A cache for this model; kv_bits (with kv_group_size, kv_residual) stores what the compressor keeps
        quantized: the same as giving them to the compressor (its storage settings), which is where they live."""
        storage = {k: v for k, v in dict(kv_bits=kv_bits, kv_group_size=kv_group_size, kv_residual=kv_residual).items()
                   if v is not None}
        if compressor is not None and not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a minipythia Compressor (e.g. SnapKV()) or None, got "
                            f"{type(compressor).__name__}")
        if storage:
            compressor = dataclasses.replace(compressor or NoCompression(), **storage)
        p = self.embed_in.weight
        return KVCache(self.config, batch_size, dtype=p.dtype, device=p.device, compressor=compressor,
                       decode_interval=decode_interval, record_queries=record_queries)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False):
        """input_ids (B, T) -> logits (B, T, vocab), or (B, 1, vocab) for the last position only.

        With a cache, the tokens take positions cache.seen .. cache.seen+T-1, whatever the cache kept (from
        cache.next_position: the cache's length for a policy that re-rotates what it keeps, StreamingLLM's own).
        """
        self.check_ids(input_ids)
        B, T = input_ids.shape
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache was made for batch size {cache.batch_size}, input has {B}")
        if cache is not None and cache.in_prefill:
            prompt = Prompt(self, input_ids, last_only)
            cache.compressor.prepare(self, prompt)
            if prompt.recorded:  # the policy ran the uncompressed prefill already: the cache is filled from it
                prompt.prefill.fill(cache)
                return prompt.prefill.logits
        start = cache.next_position if cache is not None else 0
        x = self.embed_in(input_ids)  # (B, T, C)
        cos, sin = self.rotary(start, T, x.device, x.dtype)
        upcast = self.upcast_scratch() if self.float32_prefill and T > 1 and x.dtype == torch.bfloat16 else None
        for block in self.layers:
            x = block(x, cos, sin, cache, upcast)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = self.final_layer_norm(x[:, -1:])  # the LM head is a third of the FLOPs at 70m: skip it where
            # no logits are needed. One batch row at a time: a BLAS rounds a product of B rows otherwise than
            # B products of one (on MKL a GEMM from B = 4, where one row is a GEMV), and a prompt's logits must
            # not depend on the batch it was prefilled in (eval.ppl's batch_windows).
            # A one-row product streams the head like a decode step: in the model's dtype, upcast or not.
            return torch.cat([self.embed_out(row) for row in x.split(1)])
        return linear(self.embed_out, self.final_layer_norm(x), upcast)

    def upcast_scratch(self) -> torch.Tensor:
        """The float32 scratch that a float32-products forward copies each weight matrix into (linear()): the
        size of the largest one, made once (for pythia-70m the LM head's, 98 MiB)."""
        largest = max(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        if self._upcast is None or self._upcast.numel() < largest or self._upcast.device != self.embed_out.weight.device:
            self._upcast = torch.empty(largest, device=self.embed_out.weight.device)
        return self._upcast

    def check_ids(self, input_ids: torch.Tensor):
        """ValueError unless input_ids is a (B, T) integer tensor of ids in the vocabulary: an id beyond it
        means a tokenizer that is not this checkpoint's, and would fail deep inside the embedding."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a non-empty (batch, tokens) tensor, got {shape}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        low, high = (int(x) for x in torch.aminmax(input_ids))
        vocab = self.config.vocab_size
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the model's vocabulary (0 .. {vocab - 1}): the ids come "
                             f"from another tokenizer than this checkpoint's")

    @torch.no_grad()
    def locate_nonfinite(self, input_ids: torch.Tensor) -> str:
        """Where an uncached forward of input_ids (B, T) first holds NaN or Inf, for error messages: the stage
        (embedding, a layer's attention or MLP, the final norm, the head) and the position, and the parameters
        that hold non-finite values."""
        def first_bad(x: torch.Tensor, stage: str) -> str | None:
            bad = ~torch.isfinite(x).reshape(x.size(0), x.size(1), -1).all(dim=-1)  # (B, T)
            if not bad.any():
                return None
            row, position = (int(i) for i in bad.nonzero()[0])
            return f"{stage} at position {position}" + (f" of batch row {row}" if x.size(0) > 1 else "")

        weights = [name for name, p in self.named_parameters() if not torch.isfinite(p).all()]
        held = f"; non-finite parameters: {', '.join(weights[:3])}{' ...' if len(weights) > 3 else ''}" if weights else ""
        # The forward itself, watched: each stage's output is checked as it runs, in the order it runs.
        stages = [(self.embed_in, "the input embedding")]
        for i, block in enumerate(self.layers):
            stages += [(block.attention, f"layer {i}'s attention"), (block.mlp, f"layer {i}'s MLP"),
                       (block, f"layer {i}'s output")]
        stages += [(self.final_layer_norm, "the final layer norm"), (self.embed_out, "the LM head")]
        found: list[str] = []

        def watch(stage: str):
            def hook(module, inputs, output):
                if not found and (where := first_bad(output, stage)):
                    found.append(where)
            return hook

        handles = [module.register_forward_hook(watch(stage)) for module, stage in stages]
        try:
            self(input_ids)
        finally:
            for handle in handles:
                handle.remove()
        where = found[0] if found else None
        return (where or "nowhere in an uncached forward of these tokens") + held

    def for_inference(self, float32_prefill: bool | None = None) -> "Pythia":
        """The explicit step before decoding: eval mode, no gradients, the weight layout that decodes fastest,
        and for a bf16 model on CPU whether its multi-token forwards multiply in float32 (float32_prefill; None:
        the MINIPYTHIA_BF16_PREFILL environment variable, by default where the CPU lacks native bf16; see
        minipythia/precision.py). A float32 model computes as before either way.

        Decoding one token reads every weight once, so its speed is how fast the weights stream in. On CPU
        in float32 the 50304x512 LM head streams at about twice the rate when its (vocab, hidden) tensor is
        stored column-major, i.e. as the (hidden, vocab) matrix that `x @ W.T` reads row by row (docs/speed.md).
        Only that tensor changes: same shape, same values, other strides. Training wants none of this, so the
        loader leaves it to the caller."""
        self.eval().requires_grad_(False)
        head = self.embed_out.weight
        bf16_on_cpu = head.device.type == "cpu" and head.dtype == torch.bfloat16
        if bf16_on_cpu and float32_prefill is None:
            float32_prefill = float32_prefill_default()
        self.float32_prefill = bool(bf16_on_cpu and float32_prefill)
        if head.device.type == "cpu" and head.dtype == torch.float32 and head.is_contiguous():
            self.embed_out.weight = nn.Parameter(head.detach().t().contiguous().t(), requires_grad=False)
        return self

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random initialisation (GPT-NeoX style: normal(0, std), zero biases, unit LayerNorms)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if "layernorm" in name or "layer_norm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    @classmethod
    def from_pretrained(cls, source: str, dtype: torch.dtype = torch.float32, device="cpu",
                        revision: str | None = None) -> "Pythia":
        """Loads a local checkpoint directory (Hugging Face layout) or a hub id / registry name."""
        from .weights import load_pretrained

        return load_pretrained(cls, source, dtype=dtype, device=device, revision=revision)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

