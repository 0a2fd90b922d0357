"""Writing a copy-from-context (induction) circuit into a trained model, for training to refine.

Copying from context takes two heads that only pay off together (Olsson et al., 2022, "In-context Learning
and Induction Heads"): a *previous-token head* that writes, at each position, which token came just before,
and a later *induction head* whose query is the current token and whose key is that written previous token,
so it attends to the position after an earlier occurrence of the current token and raises the logit of
what it finds there. Gradient descent finds the pair only after a long plateau: tiny-pg19 did not find it in
ten million tokens of books, nor in four million more of a pure copy task (weights/tiny-pg19/README.md).

`wire_induction_heads` overwrites one head in an early layer and one in a later layer with that circuit,
measured from the model's own activations on real text (least squares, no training); a few hundred training
steps afterwards let the rest of the model adapt to it. Which heads it overwrites lose what they did before.
"""

from __future__ import annotations

import math

import torch

# Logit per unit of summed cosine agreement in the previous-token head: its score for an offset d is
# POSITION_LOGIT * sum_p cos((d - 1) * theta_p) over every rotary frequency. With Pythia's 12 rotary features
# (6 frequencies, base 10000) that sum is 6 at d = 1, 5.52 at d = 0 and 2, and at most 5.2 at any other
# offset below 4096, so offset 1 wins by about 12 logits. The slow frequencies matter: with only the three
# fastest, offset 818 scored within 0.05 of offset 1.
POSITION_LOGIT = 24.0


def _ridge(x: torch.Tensor, y: torch.Tensor, strength: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares y ~ x @ w + b with a small ridge penalty, in float64: (w (in, out), b (out,))."""
    x1 = torch.cat((x, torch.ones(x.size(0), 1)), dim=1).double()
    gram = x1.T @ x1 + strength * x1.size(0) * torch.eye(x1.size(1), dtype=torch.double)
    w = torch.linalg.solve(gram, x1.T @ y.double())
    return w[:-1].float(), w[-1].float()


def _layer_inputs(model, rows: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """The residual stream entering each of `layers` (before its LayerNorm), on rows (B, T)."""
    seen, hooks = {}, []
    for i in layers:
        hooks.append(model.layers[i].input_layernorm.register_forward_pre_hook(
            lambda module, args, i=i: seen.__setitem__(i, args[0])))
    model(rows)
    for h in hooks:
        h.remove()
    return seen


@torch.no_grad()
def wire_induction_heads(model, rows: torch.Tensor, previous: tuple[int, int] = (0, 3),
                         induction: tuple[int, int] = (1, 0), code_dims: int | None = None, write_scale: float = 4.0,
                         match_scale: float = 3.0, copy_scale: float = 10.0):
    """Overwrites head previous = (layer, head) with a previous-token head and head induction = (layer, head)
    with an induction head, fitted on the token rows (B, T) of real text; returns the model.

    - The token code: a(t) = the top `code_dims` principal directions (default: as many as the head has
      non-rotary features), whitened, of the previous-token layer's normalised input at a token. Whitening
      makes different tokens' codes nearly orthogonal.
    - Previous-token head: queries and keys are constant biases on the rotary features only, so its score
      depends on the offset alone and peaks at 1. Its values are the code; its output writes the code,
      times `write_scale`, along the directions the residual stream uses least at the induction layer.
    - Induction head, on the features rotary leaves alone (so the match does not depend on distance):
      the query predicts the code of the current token, the key the code of the previous token, both
      times `match_scale`. Its value-output map is the best rank-head_size linear map from the attended
      position's normalised input to the direction in which the LM head raises that position's token,
      times `copy_scale`.
    """
    cfg = model.config
    (pl, ph), (il, ih) = previous, induction
    hs, nd, hidden = cfg.head_size, cfg.rotary_ndims, cfg.hidden_size
    code_dims = hs - nd if code_dims is None else code_dims
    if not pl < il < cfg.num_hidden_layers or not (ph < cfg.num_attention_heads and ih < cfg.num_attention_heads):
        raise ValueError(f"need previous layer < induction layer < {cfg.num_hidden_layers} and heads < "
                         f"{cfg.num_attention_heads}, got previous={previous} induction={induction}")
    if nd < 2 or code_dims > hs - nd:
        raise ValueError(f"need rotary features and code_dims <= {hs - nd} non-rotary ones, got "
                         f"{nd} rotary and code_dims={code_dims}")
    was_training = model.training
    model.eval()
    prev_attn, ind_attn = model.layers[pl].attention, model.layers[il].attention
    # The fused projection's rows are [q, k, v] per head; view them as (head, q/k/v, feature, hidden).
    prev_w = prev_attn.query_key_value.weight.view(cfg.num_attention_heads, 3, hs, hidden)
    prev_b = prev_attn.query_key_value.bias.view(cfg.num_attention_heads, 3, hs)
    ind_w = ind_attn.query_key_value.weight.view(cfg.num_attention_heads, 3, hs, hidden)
    ind_b = ind_attn.query_key_value.bias.view(cfg.num_attention_heads, 3, hs)

    # The code, from the previous-token layer's normalised input.
    before = _layer_inputs(model, rows, (pl, il))
    prev_in = model.layers[pl].input_layernorm(before[pl]).reshape(-1, hidden)
    mean = prev_in.mean(0)
    variances, directions = torch.linalg.eigh(torch.cov(prev_in.T))  # ascending
    to_code = (directions[:, -code_dims:] / variances[-code_dims:].sqrt()).T  # (code_dims, hidden)
    # Where the previous-token head writes: the directions the induction layer's input varies least along.
    quiet = torch.linalg.eigh(torch.cov(before[il].reshape(-1, hidden).T))[1][:, :code_dims]  # (hidden, code_dims)

    # Previous-token head. Rotary turns a query at i and a key at j into q . R((j - i) theta) k; with
    # q_p = m (cos theta_p, -sin theta_p) and k_p = m (1, 0) on the pair p, that is m^2 cos((i - j - 1) theta_p).
    magnitude = math.sqrt(POSITION_LOGIT * math.sqrt(hs))
    inv_freq = 1.0 / cfg.rotary_emb_base ** (torch.arange(0, nd, 2, dtype=torch.float32) / nd)
    prev_w[ph].zero_()
    prev_b[ph].zero_()
    for p in range(nd // 2):  # the fast frequencies tell offset 1 from 0 and 2, the slow ones from far offsets
        theta = inv_freq[p].item()
        prev_b[ph, 0, p], prev_b[ph, 0, p + nd // 2] = magnitude * math.cos(theta), -magnitude * math.sin(theta)
        prev_b[ph, 1, p] = magnitude
    prev_w[ph, 2, :code_dims] = to_code
    prev_b[ph, 2, :code_dims] = -to_code @ mean
    prev_out = prev_attn.dense.weight[:, ph * hs:(ph + 1) * hs]
    prev_out.zero_()
    prev_out[:, :code_dims] = write_scale * quiet

    # Induction head, fitted on the residual stream as it is now that the previous-token head writes.
    ind_in = model.layers[il].input_layernorm(_layer_inputs(model, rows, (il,))[il])  # (B, T, hidden)
    code = ((prev_in - mean) @ to_code.T).view(*rows.shape, code_dims)
    q_w, q_b = _ridge(ind_in.reshape(-1, hidden), code.reshape(-1, code_dims))
    k_w, k_b = _ridge(ind_in[:, 1:].reshape(-1, hidden), code[:, :-1].reshape(-1, code_dims))
    ind_w[ih, :2].zero_()
    ind_b[ih, :2].zero_()
    ind_w[ih, 0, nd:nd + code_dims], ind_b[ih, 0, nd:nd + code_dims] = match_scale * q_w.T, match_scale * q_b
    ind_w[ih, 1, nd:nd + code_dims], ind_b[ih, 1, nd:nd + code_dims] = match_scale * k_w.T, match_scale * k_b

    # Its output: adding gamma * (u_t - mean u) before the final LayerNorm raises token t's logit most.
    head = model.embed_out.weight
    raise_token = model.final_layer_norm.weight * (head - head.mean(0))
    raise_token = raise_token / raise_token.norm(dim=1, keepdim=True)  # (vocab, hidden)
    copy_map, _ = _ridge(ind_in.reshape(-1, hidden), raise_token[rows].reshape(-1, hidden))
    u, s, vh = torch.linalg.svd(copy_map)  # copy_map ~ (u s^1/2)(s^1/2 vh), cut to head_size
    ind_w[ih, 2] = (u[:, :hs] * s[:hs].sqrt()).T
    ind_b[ih, 2].zero_()
    ind_attn.dense.weight[:, ih * hs:(ih + 1) * hs] = copy_scale * vh[:hs].T * s[:hs].sqrt()
    model.train(was_training)
    return model
