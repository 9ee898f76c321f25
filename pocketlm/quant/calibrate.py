"""Calibrated weight-only quantization on the CPU: GPTQ and AWQ, layer by layer, into pocketlm's Int4Linear and
Int8Linear (the same codes, bf16 scales and zeros that round-to-nearest gives, so the kernels run them unchanged).

    pocketlm quantize smollm2 --to int4 --calib text.txt --method gptq -o ./smollm2-gptq
    pocketlm quantize gemma3-270m --to int4 --calib text.txt --method awq -o ./gemma-awq

What a layer sees of the calibration text is H = X^T X / n, the Gram matrix of its inputs X (n tokens, K channels):
for a weight error D (N, K) the mean squared error of the layer's output is tr(D H D^T) (`output_error`). Both
methods minimize that, each in its own way:

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").
The loop follows the authors' reference, IST-DASLab/gptq gptq.py `GPTQ.fasterquant` (which AutoGPTQ and
llm-compressor copy): the columns are quantized one at a time and each one's rounding error is spread over the
columns not yet quantized through the Cholesky factor of H^-1 (the optimal brain surgeon update), in lazy blocks
of 128 columns; H gets 1% of its mean diagonal added (percdamp). Where this differs from the reference, on
purpose: the group grids are fixed before the loop from the float weights (AutoGPTQ's `static_groups`) whenever
the columns go in act order (`act_order`: decreasing H_jj), so a group stays 32/64/128 adjacent input channels as
Int4Linear stores them; each group's grid is picked among clipped min/max grids by the H-weighted error of its
block (the reference's `mse` option, with H's diagonal block instead of plain squares); a group whose weights
already lie on a 4-bit grid (a GGUF's Q4 blocks) keeps it; a channel no calibration token used keeps its
weights (the reference zeroes them). One step beyond it (`refit`): with the codes fixed, each row's scales and
zeros are solved for by least squares on the same error (`refit_grid`).

AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"). As the
authors' mit-han-lab/llm-awq (auto_scale.py, auto_clip.py) and AutoAWQ's quantizer: the input channels that
carry large activations get their weights scaled up before rounding (s = mean|x|^alpha, alpha grid-searched in
[0, 1) per layer to minimize the output error of the layer quantized with that scale), the inverse scale folded
into the op before it so the model computes the same function: the RMSNorm's weight for q/k/v and gate/up, the
v rows for o_proj, the up rows for down_proj. With grouped-query attention several query heads read one v head,
so o_proj's scale is shared by the heads of a group (llm-awq skips o_proj when v and o differ in shape). Then
each group's clipping is searched as auto_clip does (not for the q and k rows). The error measured is each
linear's own output (llm-awq measures the attention or MLP block's). `awq+gptq` rounds the scaled weights with
GPTQ instead of to nearest.

Both run layer by layer (GPTQ's `llama_sequential`): the calibration text's inputs to each decoder layer are
captured, each layer's linears see them through hooks and are swapped for their quantized versions, then the
quantized layer runs on them to give the next layer its inputs, so each layer is calibrated on what the quantized
layers before it really give. With `true_sequential` (the reference's option, the default), q/k/v, o, gate/up
and down are done one after the other within a layer, each on inputs through the ones already quantized. Only
one layer's activations and its H matrices exist at a time. The output head stays int8 round-to-nearest (it is
the tied embedding's table too).

`budget_search` picks a kind per linear (int4 in groups of 32/64/128, int8, or float) so that the KL divergence of
the quantized model from the float one, measured as `pocketlm eval --task agreement` measures it, stays under a
budget at the fewest bits per weight, or (--max-bits) is the least it can be within a number of bits per weight. It
measures that KL on calibration sequences held out of what GPTQ fits the weights to (`held_out`): on tokens it
calibrated on, GPTQ's fit looks better than it is on any other text.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.quant import QuantScheme
from pocketlm.quant.int4 import Int4Linear, group_grid, pack_nibbles
from pocketlm.quant.int8 import Int8Linear

METHODS = ("gptq", "awq", "awq+gptq", "rtn")
# A linear's kinds, cheapest first, with their bits per weight: 4-bit codes plus a bf16 scale and zero per group;
# 8-bit codes plus one bf16 scale per row; fp32.
KINDS = ("int4-g128", "int4-g64", "int4-g32", "int8", "float")
# the stages of a decoder layer, in the order its forward reaches them (fused names: quantize() fuses first)
STAGES = (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))


def kind_bits(kind: str, in_features: int) -> float:
    if kind.startswith("int4-g"):
        return 4 + 32 / int(kind[6:])
    return {"int8": 8 + 16 / in_features, "float": 32.0}[kind]


@dataclass
class CalibConfig:
    method: str = "gptq"  # gptq | awq | rtn
    tokens: int = 32768  # calibration tokens (the first ones of the text)
    seq_len: int = 512  # tokens per calibration sequence
    batch: int = 8  # sequences per forward pass
    damp: float = 0.01  # GPTQ: H + damp * mean(diag H) * I (the reference's percdamp)
    block: int = 128  # GPTQ: columns per lazy batch update
    act_order: bool = True  # GPTQ: columns by decreasing H_jj, the group grids fixed beforehand
    true_sequential: bool = True  # one linear kind after the other within a layer, each on quantized inputs
    clip: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # group grids shrunk toward zero, searched
    awq_grid: int = 20  # AWQ: alpha in 0, 1/20, ..., 19/20
    refit: bool = True  # GPTQ: with its codes fixed, the scales and zeros refitted by least squares (refit_grid)
    kl_tokens: int = 1024  # --budget: tokens the KL is measured on (the calibration text's last ones, held out of GPTQ's)
    quiet: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise PocketLMError(f"unknown method {self.method!r}: choose {', '.join(METHODS)}")
        if self.tokens < self.seq_len:
            self.seq_len = max(16, self.tokens)


# ------------------------------------------------------------------------------------------- grids


def bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to what the checkpoint stores (bf16), kept in fp32."""
    return t.to(torch.bfloat16).float()


def _diagonal_blocks(H: torch.Tensor, g: int) -> torch.Tensor:
    """H (K, K) -> its K/g diagonal blocks (K/g, g, g): what one group's error costs, without the cross terms."""
    G = H.shape[0] // g
    return H.view(G, g, G, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


class Int4Grid:
    """One grid per (row, group): w = (q - 8) * scale + zero, q in 0..15, scale and zero bf16 (Int4Linear's)."""

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
        self.scale, self.zero, self.g = scale, zero, group_size  # (N, K/g) each, fp32 holding bf16 values
        self.code_dtype = torch.uint8

    @classmethod
    def fit(cls, w: torch.Tensor, g: int, H: torch.Tensor | None = None, clip=(1.0,), find_grids: bool = True) -> Int4Grid:
        """The grid of each group of w (N, K): its min/max grid (or the 4-bit grid it already lies on, unless
        find_grids is False), or that grid shrunk toward zero by a factor in `clip`, whichever gives the least
        H-weighted error in the group."""
        N, K = w.shape
        groups = w.float().reshape(N, K // g, g)  # (N, G, g)
        hi0 = groups.amax(-1, keepdim=True)
        if find_grids:
            lo0, step0, on_grid = group_grid(groups)  # (N, G, 1) each
        else:  # min/max only: weights scaled by AWQ lie on no grid, and looking costs a sort per group
            lo0 = groups.amin(-1, keepdim=True)
            step0, on_grid = (hi0 - lo0).clamp(min=1e-8) / 15, torch.zeros_like(hi0, dtype=torch.bool)
        blocks = _diagonal_blocks(H, g) if H is not None and len(clip) > 1 else None  # (G, g, g)
        best_err = best_scale = best_zero = None
        for r in clip if blocks is not None else (1.0,):
            scale = step0 if r == 1.0 else ((hi0 - lo0) * r).clamp(min=1e-8) / 15
            lo = lo0 if r == 1.0 else lo0 * r
            scale, lo = torch.where(on_grid, step0, scale), torch.where(on_grid, lo0, lo)  # a grid found is kept
            scale, zero = bf16(scale), bf16(lo + 8 * scale)
            if blocks is None:
                return cls(scale[..., 0], zero[..., 0], g)
            d = groups - ((((groups - zero) / scale + 8).round().clamp(0, 15) - 8) * scale + zero)  # (N, G, g)
            err = torch.einsum("ngi,gij,ngj->ng", d, blocks, d)[..., None]  # (N, G, 1)
            if best_err is None:
                best_err, best_scale, best_zero = err, scale, zero
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        return cls(best_scale[..., 0], best_zero[..., 0], g)

    def refit(self, w: torch.Tensor, first: int, Hg: torch.Tensor | None, clip) -> None:
        """The grid of the group starting at column `first`, from its current weights w (N, g) and its block of H
        (g, g) (GPTQ's groups found as the loop reaches them, from weights the earlier columns' errors moved)."""
        grid = Int4Grid.fit(w, self.g, Hg, clip)
        self.scale[:, first // self.g], self.zero[:, first // self.g] = grid.scale[:, 0], grid.zero[:, 0]

    def column(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """w (N,), the weights of input channel j -> codes (N,) and the values they stand for (N,)."""
        scale, zero = self.scale[:, j // self.g], self.zero[:, j // self.g]
        q = ((w - zero) / scale + 8).round_().clamp_(0, 15)
        return q, (q - 8) * scale + zero

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w (N, K) -> codes (N, K) uint8 and the dequantized weight (N, K)."""
        N, K = w.shape
        scale = self.scale.repeat_interleave(self.g, dim=1)  # (N, K)
        zero = self.zero.repeat_interleave(self.g, dim=1)
        q = ((w.float() - zero) / scale + 8).round().clamp(0, 15)
        return q.to(torch.uint8), (q - 8) * scale + zero

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, K) -> the weight (N, K) they stand for on this grid."""
        N, K = codes.shape
        q = codes.float().view(N, K // self.g, self.g) - 8
        return (q * self.scale[..., None] + self.zero[..., None]).view(N, K)

    def module(self, codes: torch.Tensor, bias: torch.Tensor | None) -> Int4Linear:
        N, K = codes.shape
        layer = Int4Linear(K, N, self.g, bias=bias is not None)
        layer.qweight = pack_nibbles(codes.to(torch.uint8))
        layer.scales_and_zeros = torch.stack([self.scale, self.zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return layer.pack()


class Int8Grid:
    """One symmetric grid per row: w = q * scale, q in -127..127, scale bf16 (Int8Linear's)."""

    g = 0

    def __init__(self, scale: torch.Tensor):
        self.scale = scale  # (N,)
        self.code_dtype = torch.int8

    @classmethod
    def fit(cls, w: torch.Tensor, H: torch.Tensor | None = None, clip=(1.0,)) -> Int8Grid:
        absmax = w.float().abs().amax(dim=1).clamp(min=1e-12)  # (N,)
        if H is None or len(clip) == 1:
            return cls(bf16(absmax / 127))
        diag = H.diagonal()  # (K,): 8 bits leave errors too small for the cross terms to matter
        best_err, best = None, None
        for r in clip:
            scale = bf16(absmax * r / 127)
            d = w - (w / scale[:, None]).round().clamp(-127, 127) * scale[:, None]
            err = (d * d * diag).sum(1)  # (N,)
            best = scale if best is None else torch.where(err < best_err, scale, best)
            best_err = err if best_err is None else torch.minimum(err, best_err)
        return cls(best)

    def refit(self, w, first, H, clip) -> None:
        raise AssertionError("an int8 grid has no groups")

    def column(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = (w / self.scale).round_().clamp_(-127, 127)
        return q, q * self.scale

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = (w.float() / self.scale[:, None]).round().clamp(-127, 127)
        return q.to(torch.int8), q * self.scale[:, None]

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float() * self.scale[:, None]

    def module(self, codes: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        N, K = codes.shape
        layer = Int8Linear(K, N, bias=bias is not None)
        layer.weight.copy_(codes.to(torch.int8))
        layer.scales.copy_(self.scale.to(torch.bfloat16))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return layer.pack()


def fit_grid(kind: str, w: torch.Tensor, H: torch.Tensor | None = None, clip=(1.0,), find_grids: bool = True):
    if kind == "int8":
        return Int8Grid.fit(w, H, clip)
    return Int4Grid.fit(w, int(kind.removeprefix("int4-g")), H, clip, find_grids)


def output_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    """The mean squared output error, summed over the N outputs, of using q (N, K) for w: tr(D H D^T)."""
    d = (w.detach() - q.detach()).float()
    return float(((d @ H) * d).sum())


# -------------------------------------------------------------------------------------------- GPTQ


def gptq(w: torch.Tensor, H: torch.Tensor, grid, damp: float = 0.01, block: int = 128, act_order: bool = True,
         clip=(1.0,)) -> torch.Tensor:
    """GPTQ's codes for w (N, K) on `grid` (fixed when act_order, else each group's is found as the loop reaches
    it), given H (K, K) = X^T X / n of the layer's inputs. Returns codes (N, K) in the grid's dtype."""
    W = w.detach().float().clone()  # (N, K)
    N, K = W.shape
    H = H.clone()
    dead = H.diagonal() == 0  # an input no calibration token used
    H[dead, dead] = 1
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp)  # (K, K) upper: row j is what column j's error does to the columns after it
    codes = torch.empty(N, K, dtype=torch.float32)  # filled in perm's order, written back at the end
    dynamic = not act_order and grid.g  # groups found as the loop reaches them (the reference's default)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2]  # (N, b) a view: updated in place
        Err1 = torch.empty_like(W1)  # (N, b) each column's error over its Hinv diagonal
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        for i in range(i2 - i1):
            j = int(perm[i1 + i])  # the input channel this column is
            if dynamic and j % grid.g == 0:  # (blocks hold whole groups: block is a multiple of g)
                grid.refit(W1[:, i : i + grid.g], j, H[j : j + grid.g, j : j + grid.g], clip)
            w_col = W1[:, i]
            q, deq = grid.column(w_col, j)
            codes[:, i1 + i] = q
            err = (w_col - deq) / Hinv1[i, i]  # (N,)
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # the columns of this block after i absorb the error
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # the lazy update of every later column
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out.to(grid.code_dtype)


def refit_grid(w: torch.Tensor, codes: torch.Tensor, H: torch.Tensor, grid):
    """With the codes fixed, the scales and zeros that minimize the output error tr(D H D^T), D = w - dequantized:
    per row a least-squares problem in its 2 values per group (1 per row for int8), solved exactly, then rounded to
    bf16; a row keeps its old grid where that is not better. (Not in the GPTQ reference: GPTQ fixes the grid and
    picks codes; this step then fixes the codes and picks the grid, the alternation AutoRound and OmniQuant
    generalize.) Returns a new grid."""
    N, K = w.shape
    w, Hw = w.float(), w.float() @ H  # (N, K) each
    if isinstance(grid, Int8Grid):
        u = codes.float()  # (N, K)
        scale = bf16((u * Hw).sum(1) / ((u @ H) * u).sum(1).clamp(min=1e-30))  # (N,)
        new = Int8Grid(scale)
    else:
        g, G = grid.g, K // grid.g
        U = codes.float().view(N, G, g) - 8  # (N, G, g)
        T = torch.einsum("nai,aik->nak", U, H.view(G, g, K)).view(N, G, G, g)  # sum_i u_ai H[(a,i), (b,j)]
        SS, SZ = (T * U[:, None]).sum(-1), T.sum(-1)  # (N, G, G): scale-scale and scale-zero terms
        ZZ = H.view(G, g, G, g).sum((1, 3)).expand(N, G, G)  # zero-zero terms, the same for every row
        A = torch.cat([torch.cat([SS, SZ], 2), torch.cat([SZ.transpose(1, 2), ZZ], 2)], 1)  # (N, 2G, 2G)
        A.diagonal(dim1=1, dim2=2).add_(1e-6 * A.diagonal(dim1=1, dim2=2).mean().clamp(min=1e-30))
        Hw = Hw.view(N, G, g)
        theta = torch.linalg.solve(A, torch.cat([(U * Hw).sum(-1), Hw.sum(-1)], 1))  # (N, 2G)
        new = Int4Grid(bf16(theta[:, :G]), bf16(theta[:, G:]), g)
    old_err, new_err = _row_errors(w, grid.dequantize(codes), H), _row_errors(w, new.dequantize(codes), H)
    keep = ~(new_err < old_err)  # (N,) also where the solve gave nan
    if isinstance(grid, Int8Grid):
        new.scale[keep] = grid.scale[keep]
    else:
        new.scale[keep], new.zero[keep] = grid.scale[keep], grid.zero[keep]
    return new


def _row_errors(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    d = w - q
    return ((d @ H) * d).sum(1)  # (N,)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, dampened more if H is too ill-conditioned."""
    mean = H.diagonal().mean()
    for attempt in range(6):
        Hd = H.clone()
        Hd.diagonal().add_(damp * 10**attempt * mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
    raise PocketLMError("GPTQ: the calibration inputs' Gram matrix is not positive definite even when dampened")


# --------------------------------------------------------------------------------------------- AWQ


def awq_scale(w: torch.Tensor, H: torch.Tensor, x_mean: torch.Tensor, kind: str, grid_steps: int = 20,
              tie=None) -> tuple[torch.Tensor, float, float]:
    """AWQ's per-input-channel scale s (K,) for w (N, K): of s = x_mean^alpha (normalized to a geometric mean
    of 1 between its extremes, as llm-awq), alpha in 0, 1/grid_steps, ..., the one whose round-to-nearest of
    w * s, divided back by s, leaves the least output error. alpha = 0 is plain round-to-nearest, so the
    result is never worse on the calibration text. tie(s) makes channels that must share a scale share it.
    Returns s, its error and round-to-nearest's."""
    x_mean = tie(x_mean) if tie is not None else x_mean
    best = (None, math.inf)
    plain = None
    for step in range(grid_steps):
        alpha = step / grid_steps
        s = x_mean.pow(alpha).clamp(min=1e-4)  # (K,)
        s = s / (s.max() * s.min()).sqrt()
        if alpha == 0:
            s = torch.ones_like(s)
        _, deq = fit_grid(kind, w * s, find_grids=alpha == 0).quantize(w * s)
        err = output_error(w, deq / s, H)
        plain = err if alpha == 0 else plain
        if err < best[1]:
            best = (s, err)
    return best[0], best[1], plain


AWQ_FOLDS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@torch.no_grad()
def awq_fold(layer: nn.Module, name: str, s: torch.Tensor) -> None:
    """Scale the input channels of the linear `name` of a decoder layer by s (K,) and undo it in the op that makes
    its input, so the layer computes the same function: the RMSNorm before q/k/v and before gate/up, the v rows of
    qkv for o_proj (s must then be equal across the query heads of a KV head), the up rows of gate/up for
    down_proj (act(gate) * up is linear in up)."""
    attn, mlp = layer.self_attn, layer.mlp
    linear = layer.get_submodule(name)
    if name == "self_attn.qkv_proj":
        fold_into_norm(layer.input_layernorm, s)
    elif name == "mlp.gate_up_proj":
        fold_into_norm(getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm, s)
    elif name == "self_attn.o_proj":
        nh, n_kv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
        v_rows = slice((nh + n_kv) * hd, (nh + 2 * n_kv) * hd)  # qkv's output: q heads, k heads, v heads
        s_v = s.view(n_kv, nh // n_kv, hd)[:, 0].reshape(-1)  # (n_kv * hd,): query head h reads v head h // (nh / n_kv)
        attn.qkv_proj.weight[v_rows] /= s_v[:, None]
        if attn.qkv_proj.bias is not None:
            attn.qkv_proj.bias[v_rows] /= s_v
    elif name == "mlp.down_proj":
        F_ = mlp.gate_up_proj.out_features // 2
        mlp.gate_up_proj.weight[F_:] /= s[:, None]  # the up half
        if mlp.gate_up_proj.bias is not None:
            mlp.gate_up_proj.bias[F_:] /= s
    else:
        raise ValueError(f"no op before {name} to fold an AWQ scale into")
    linear.weight.mul_(s)  # (N, K) * (K,)


def fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """The RMSNorm before a linear gives x / s instead of x (the linear's columns take the * s)."""
    from pocketlm.models.gemma3 import RMSNorm as GemmaRMSNorm

    with torch.no_grad():
        if isinstance(norm, GemmaRMSNorm):  # scales by (1 + weight)
            norm.weight.copy_((1 + norm.weight.float()) / s - 1)
        else:
            norm.weight.div_(s)


# ----------------------------------------------------------------------------------- layer by layer


class _Stop(Exception):
    """Raised by a hook once it has what it came for: the rest of the forward pass is not needed."""


def calibration_ids(tokenizer, text: str, tokens: int, seq_len: int) -> torch.Tensor:
    """The first `tokens` tokens of text as (n, seq_len) ids, each sequence starting with the tokenizer's BOS
    (as every prompt does), the last partial sequence dropped."""
    from pocketlm.engine.generate import encode_raw

    ids = encode_raw(tokenizer, text)
    bos = [ids[0]] if tokenizer.bos_id is not None and ids and ids[0] == tokenizer.bos_id else []
    body = ids[len(bos) :]
    step = seq_len - len(bos)
    n = min(tokens // seq_len, len(body) // step)
    if n < 1:
        raise PocketLMError(f"the calibration text has {len(ids)} tokens: give at least {seq_len}")
    return torch.tensor([bos + body[i * step : (i + 1) * step] for i in range(n)])  # (n, seq_len)


@torch.no_grad()
def layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple]]:
    """Each batch's input to the first decoder layer (B, T, D), and the other arguments every layer is called
    with (RoPE tables, masks: the same for every batch of one shape), caught by pre-hooks."""
    layers = model.model.layers
    args: list = [None] * len(layers)
    xs: list[torch.Tensor] = []

    def hook_for(i: int):
        def hook(module, a, kw):
            if args[i] is None:
                args[i] = (a[1:], kw)
            if i == 0:
                xs.append(a[0].detach())
                if args[-1] is not None:  # the first batch ran through every layer: the rest stop here
                    raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for ids in batches:
            try:
                model.hidden(ids)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return xs, args


class _Stats:
    """What a linear's hook gathers over the calibration inputs: H = X^T X / n and mean |x| per channel."""

    def __init__(self, K: int):
        self.H = torch.zeros(K, K)
        self.abs_sum = torch.zeros(K)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (n, K)
        self.H.addmm_(x.T, x)
        self.abs_sum += x.abs().sum(0)
        self.n += x.shape[0]

    def finish(self) -> _Stats:
        self.H /= max(1, self.n)
        self.x_mean = self.abs_sum / max(1, self.n)
        return self


@torch.no_grad()
def collect(layer: nn.Module, names: list[str], xs: list[torch.Tensor], args: tuple) -> dict[str, _Stats]:
    """Run `layer` on every input, hooks on its linears `names` gathering their _Stats; the pass stops once
    all of them have seen their input."""
    modules = dict(layer.named_modules())
    stats = {name: _Stats(modules[name].in_features) for name in names}
    seen: set[str] = set()

    def hook_for(name: str):
        def hook(module, inputs):
            stats[name].add(inputs[0])
            seen.add(name)
            if len(seen) == len(names):
                raise _Stop

        return hook

    handles = [modules[name].register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        for x in xs:
            seen.clear()
            try:
                layer(x, *args[0], **args[1])
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {name: s.finish() for name, s in stats.items()}


def _swap_in(layer: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, new)


def _is_fused(model: nn.Module) -> bool:
    return any(getattr(m, "qkv_proj", None) is not None for m in model.modules())


def layer_kinds(model: nn.Module, scheme: QuantScheme) -> dict[str, str]:
    """Every decoder-layer linear's kind under `scheme` (its per-layer plan, or the scheme's bits, int8 where
    int4's groups do not divide the input width, as quantize() does)."""
    kinds = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            kinds[name] = scheme.layer_kind(name, m.in_features)
    return kinds


def calibrate(model: nn.Module, ids: torch.Tensor, scheme: QuantScheme, cfg: CalibConfig) -> dict:
    """Quantize `model`'s decoder-layer linears in place with cfg.method on the calibration ids (n, T), layer by
    layer; then quantize() finishes the rest (the int8 head, the tied embedding). Returns a report: the output
    error of each linear against round-to-nearest's on the same inputs."""
    from pocketlm.eval.tasks import progress_bar
    from pocketlm.quant import quantize

    if not _is_fused(model) and hasattr(model, "fuse_projections"):
        model.fuse_projections()
    model.eval()
    kinds = layer_kinds(model, scheme)
    report = {"method": cfg.method, "tokens": int(ids.numel()), "seq_len": int(ids.shape[1]), "errors": {}}
    if cfg.method != "rtn":
        batches = list(ids.split(cfg.batch))
        xs, args = layer_inputs(model, batches)
        layers = model.model.layers
        start = time.perf_counter()
        with progress_bar(f"{cfg.method} layers", len(layers), not cfg.quiet) as advance:
            for i, layer in enumerate(layers):
                prefix = f"model.layers.{i}."
                plan = {name.removeprefix(prefix): kind for name, kind in kinds.items() if name.startswith(prefix)}
                quantize_layer = _awq_layer if cfg.method.startswith("awq") else _gptq_layer
                errors = quantize_layer(layer, plan, xs, args[i], cfg)
                report["errors"].update({prefix + k: v for k, v in errors.items()})
                with torch.no_grad():  # the quantized layer gives the next one its inputs
                    xs = [layer(x, *args[i][0], **args[i][1]) for x in xs]
                advance()
        report["seconds"] = round(time.perf_counter() - start, 1)
        del xs
    quantize(model, scheme)  # the output head, the tied embedding; and every linear when method is rtn
    return report


def _quantizable(plan: dict[str, str], names) -> list[str]:
    return [n for n in names if n in plan and plan[n] != "float"]


def _stages(plan: dict[str, str], true_sequential: bool) -> list[list[str]]:
    known = [n for stage in STAGES for n in stage]
    stages = [_quantizable(plan, stage) for stage in STAGES] + [_quantizable(plan, [n for n in plan if n not in known])]
    stages = [s for s in stages if s]
    return stages if true_sequential else [[n for s in stages for n in s]]


def _gptq_layer(layer: nn.Module, plan: dict[str, str], xs, args, cfg: CalibConfig) -> dict:
    """GPTQ on each linear of one decoder layer; returns {name: (GPTQ's output error, round-to-nearest's)}."""
    errors = {}
    for stage in _stages(plan, cfg.true_sequential):
        stats = collect(layer, stage, xs, args)
        for name in stage:
            linear = layer.get_submodule(name)
            w, H = linear.weight.detach().float(), stats[name].H
            grid = fit_grid(plan[name], w, H, cfg.clip)
            codes = gptq(w, H, grid, cfg.damp, cfg.block, cfg.act_order, cfg.clip)
            if cfg.refit:
                grid = refit_grid(w, codes, H, grid)
            new = grid.module(codes, linear.bias)
            errors[name] = (output_error(w, _dequantized(new), H), output_error(w, _dequantized(_rtn(plan[name], linear)), H))
            _swap_in(layer, name, new)
    return errors


def _rtn(kind: str, linear: nn.Linear) -> nn.Module:
    """What quantize() makes of this linear without calibration (quantize_groups' grid, Int8Linear's)."""
    if kind == "int8":
        return Int8Linear.from_linear(linear)
    return Int4Linear.from_linear(linear, int(kind.removeprefix("int4-g")))


def _dequantized(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, (Int4Linear, Int8Linear)):
        return layer.dequantized()
    return layer.weight.detach().float()


def _awq_layer(layer: nn.Module, plan: dict[str, str], xs, args, cfg: CalibConfig) -> dict:
    """AWQ on one decoder layer: every scale searched on the float layer's inputs, folded in, then each linear's
    clipping searched and its weights rounded to nearest. Returns {name: (AWQ's output error, RTN's)}."""
    names = _quantizable(plan, [n for stage in STAGES for n in stage] + [n for n in plan if n not in sum(STAGES, ())])
    stats = collect(layer, names, xs, args)
    rtn_errors = {n: output_error(layer.get_submodule(n).weight.float(), _dequantized(_rtn(plan[n], layer.get_submodule(n))), stats[n].H)
                  for n in names}
    attn = layer.self_attn
    nh, n_kv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim

    def tie_heads(v: torch.Tensor) -> torch.Tensor:  # (nh * hd,): one value per (KV head, channel)
        return v.view(n_kv, nh // n_kv, hd).mean(1, keepdim=True).expand(n_kv, nh // n_kv, hd).reshape(-1)

    for name in names:
        if name not in AWQ_FOLDS:
            continue  # nothing before it to fold a scale into: plain round-to-nearest with clipping
        if name == "self_attn.qkv_proj" and getattr(layer, "parallel", False):
            continue  # a parallel block (Phi-2): the norm before q/k/v feeds the MLP too, so no scale folds into it
        st = stats[name]
        w = layer.get_submodule(name).weight.detach().float()
        s, _, _ = awq_scale(w, st.H, st.x_mean, plan[name], cfg.awq_grid, tie=tie_heads if name == "self_attn.o_proj" else None)
        awq_fold(layer, name, s)
        st.H /= s[:, None] * s[None, :]  # the inputs are now x / s

    errors = {}
    for name in names:
        linear = layer.get_submodule(name)
        w, H = linear.weight.detach().float(), stats[name].H
        grid = fit_grid(plan[name], w, H, cfg.clip)
        if name == "self_attn.qkv_proj" and isinstance(grid, Int4Grid):  # no clipping for q and k (llm-awq)
            plain = fit_grid(plan[name], w)
            qk = slice(0, (nh + n_kv) * hd)
            grid.scale[qk], grid.zero[qk] = plain.scale[qk], plain.zero[qk]
        if cfg.method == "awq+gptq":  # AWQ's scales, then GPTQ's rounding on the scaled weights
            codes = gptq(w, H, grid, cfg.damp, cfg.block, cfg.act_order, cfg.clip)
            grid = refit_grid(w, codes, H, grid) if cfg.refit else grid
        else:
            codes = grid.quantize(w)[0]
        new = grid.module(codes, linear.bias)
        errors[name] = (output_error(w, _dequantized(new), H), rtn_errors[name])
        _swap_in(layer, name, new)
    return errors


# ------------------------------------------------------------------------------------- the KL budget


@torch.no_grad()
def _kl_pass(model: nn.Module, first: int, xs: list[torch.Tensor], args: list, ref_logp: list[torch.Tensor]) -> float:
    """Mean KL(float || model) over the KL sequences' positions, running the decoder layers from `first` on
    their cached inputs xs (one (1, T, D) tensor per sequence), as eval.agreement compares them."""
    from pocketlm.eval.agreement import CHUNK

    total, n = 0.0, 0
    for x, ref in zip(xs, ref_logp):
        for layer, (a, kw) in zip(model.model.layers[first:], args[first:]):
            x = layer(x, *a, **kw)
        h = model.model.norm(x)[0, :-1]  # (T-1, D): position t predicts t + 1
        for b in range(0, h.shape[0], CHUNK):
            logp = torch.log_softmax(model.logits(h[None, b : b + CHUNK])[0].float(), dim=-1)  # (c, V)
            p_ref = ref[b : b + CHUNK]
            total += float((p_ref.exp() * (p_ref - logp)).sum())
            n += logp.shape[0]
    return total / n


@torch.no_grad()
def _reference(model: nn.Module, kl_ids: torch.Tensor) -> tuple[list, list, list]:
    """The float model on the KL sequences: every layer's inputs, each layer's other arguments, the log-probs."""
    from pocketlm.eval.agreement import CHUNK

    xs_by_layer, args = [], None
    for seq in kl_ids.split(1):
        x0, a = layer_inputs(model, [seq])
        args = a
        xs = [x0[0]]
        for layer, (la, kw) in zip(model.model.layers, a):
            xs.append(layer(xs[-1], *la, **kw))
        xs_by_layer.append(xs)
    ref_logp = []
    for xs in xs_by_layer:
        h = model.model.norm(xs[-1])[0, :-1]
        ref_logp.append(torch.cat([torch.log_softmax(model.logits(h[None, b : b + CHUNK])[0].float(), dim=-1)
                                   for b in range(0, h.shape[0], CHUNK)]))  # (T-1, V)
    per_layer = [[xs[i] for xs in xs_by_layer] for i in range(len(model.model.layers))]
    return per_layer, args, ref_logp


def _options(K: int) -> list[str]:
    """The kinds a linear of input width K can take, cheapest first."""
    return [k for k in KINDS if not k.startswith("int4-g") or K % int(k[6:]) == 0]


def held_out(ids: torch.Tensor, kl_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration ids (n, T) split into (the sequences GPTQ calibrates on, the last kl_tokens // T sequences,
    at least one, that the budget's KL is measured on)."""
    n, T = ids.shape
    n_kl = max(1, kl_tokens // T)
    if n <= n_kl:
        raise PocketLMError(f"--budget needs at least {(n_kl + 1) * T} calibration tokens ({n_kl * T} held out to measure "
                            f"the KL on, {T} or more to calibrate on) and got {n * T}: give a longer --calib text or more --calib-tokens")
    return ids[:-n_kl], ids[-n_kl:]


def budget_search(ref_lm, load_float, scheme: QuantScheme, ids: torch.Tensor, budget: float | None, cfg: CalibConfig,
                  max_bits: float | None = None) -> tuple[nn.Module, dict]:
    """A kind per decoder-layer linear (int4 in groups of 128/64/32, int8, float) so that the quantized model's mean
    KL(float || quantized) on the calibration text's last cfg.kl_tokens tokens is at most `budget`, with the
    fewest bits; or, with `max_bits` (bits per weight on average, codes and scales) and no budget, the least KL
    within those bits (with both: the budget, never past max_bits). Those tokens are held out of the statistics
    (H) and of the calibration, so the KL is measured on text the weights were not fit to. ref_lm: the float model
    (a LoadedModel, the reference); load_float() gives a fresh copy of it.

    1. Each linear's candidates are quantized (cfg.method, on H from the float model's activations) and their
       output errors e(t, k) = tr(D H D^T) computed; the KL each linear alone costs at its cheapest kind is
       measured by running the float layers after it on the held-out KL tokens (the layers before it give the same
       inputs as in the float model); KL(t, k) is predicted as KL(t, cheapest) * e(t, k) / e(t, cheapest).
    2. Greedy knapsack from all-cheapest: the upgrade with the most predicted KL saved per bit added (among those
       that keep the plan within max_bits), until the predicted sum (plus the int8 head's own KL, measured) is
       under the target, or no upgrade fits.
    3. The plan is built (layer by layer, cfg.method) and its KL measured as `eval --task agreement` does; over
       the budget, the target shrinks by budget / measured and step 2 goes on, up to 5 times.
    Returns the quantized model and a report (the plan, bits per weight, predicted and measured KL)."""
    from pocketlm.eval.agreement import agreement_stats
    from pocketlm.eval.tasks import progress_bar

    if budget is None and max_bits is None:
        raise PocketLMError("the bits search needs a KL budget (--budget), a bits cap (--max-bits), or both")
    if cfg.method.startswith("awq"):
        raise PocketLMError("--budget picks bits with --method gptq or rtn (AWQ's scales change the layers before each linear)")
    ref = ref_lm.model.eval()
    if hasattr(ref, "fuse_projections") and not _is_fused(ref):
        ref.fuse_projections()
    ids, kl_ids = held_out(ids, cfg.kl_tokens)  # (n, T) to calibrate on, (n_kl, T) to measure the KL on
    linears = {name: m for name, m in ref.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}
    layer_of = {name: int(name.split(".")[2]) for name in linears}
    start = time.perf_counter()

    options = {name: _options(m.in_features) for name, m in linears.items()}
    plan = {name: options[name][0] for name in linears}  # all-cheapest: where step 2 starts
    fewest_bits = _mean_bits(plan, linears)
    if max_bits is not None and fewest_bits > max_bits:
        raise PocketLMError(f"--max-bits {max_bits:g}: the fewest bits this model's linears take is {fewest_bits:.2f} "
                            f"per weight; give more")

    # ---- 1. each linear's candidates and the KL it costs alone
    xs_kl, args_kl, ref_logp = _reference(ref, kl_ids)
    head_kl = _head_kl(ref, kl_ids, ref_logp, xs_kl, args_kl)  # before the long part: the budget must leave room for it
    if budget is not None and head_kl >= budget:
        raise PocketLMError(f"--budget {budget}: the int8 output head alone costs KL {head_kl:.4g}; give a larger budget")
    stats: dict[str, _Stats] = {}
    batches = list(ids.split(cfg.batch))
    xs, args = layer_inputs(ref, batches)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            prefix = f"model.layers.{i}."
            names = [n.removeprefix(prefix) for n in linears if n.startswith(prefix)]
            stats.update({prefix + k: v for k, v in collect(layer, names, xs, args[i]).items()})
            xs = [layer(x, *args[i][0], **args[i][1]) for x in xs]
    del xs
    errors: dict[str, dict[str, float]] = {}
    cheapest: dict[str, torch.Tensor] = {}
    with progress_bar("budget: linears", len(linears), not cfg.quiet) as advance:
        for name, m in linears.items():
            w, H = m.weight.detach().float(), stats[name].H
            errors[name] = {"float": 0.0}
            for kind in options[name][:-1]:
                deq = _candidate(kind, m, H, cfg)
                errors[name][kind] = output_error(w, deq, H)
                if kind == options[name][0]:
                    cheapest[name] = deq
            advance()
    kl_alone = {}
    with progress_bar("budget: KL per linear", len(linears), not cfg.quiet) as advance:
        for name, m in linears.items():
            saved = m.weight.data
            m.weight.data = cheapest[name]
            kl_alone[name] = _kl_pass(ref, layer_of[name], xs_kl[layer_of[name]], args_kl, ref_logp)
            m.weight.data = saved
            advance()
    del cheapest, stats

    def predicted(name: str, kind: str) -> float:
        e0 = errors[name][options[name][0]]
        return 0.0 if kind == "float" or e0 == 0 else kl_alone[name] * errors[name][kind] / e0

    # ---- 2 and 3: greedy upgrades to a target, built and measured
    numel = {name: m.weight.numel() for name, m in linears.items()}
    bits_of = lambda name, kind: numel[name] * kind_bits(kind, linears[name].in_features)  # noqa: E731
    room = math.inf if max_bits is None else (max_bits - fewest_bits) * sum(numel.values())  # bits upgrades may add
    target, rounds, measured, model = (0.0 if budget is None else budget - head_kl), [], None, None
    for _ in range(5):
        before = dict(plan)
        total = sum(predicted(n, k) for n, k in plan.items())
        while total > target:
            best = None
            for name, kind in plan.items():
                here = options[name].index(kind)
                for better in options[name][here + 1 :]:
                    saved = predicted(name, kind) - predicted(name, better)
                    cost = bits_of(name, better) - bits_of(name, kind)
                    if saved > 0 and cost <= room and (best is None or saved / cost > best[0]):
                        best = (saved / cost, name, better)
            if best is None:
                break
            total -= predicted(best[1], plan[best[1]]) - predicted(best[1], best[2])
            room -= bits_of(best[1], best[2]) - bits_of(best[1], plan[best[1]])
            plan[best[1]] = best[2]
        if rounds and plan == before:
            break  # no upgrade fits within max_bits any more: the plan built last stands
        plan_scheme = QuantScheme(scheme.weights, scheme.group_size, layers=dict(plan))
        lm = load_float()
        calibrate(lm.model, ids, plan_scheme, CalibConfig(**{**cfg.__dict__, "quiet": True}))
        model = lm.model
        flat = kl_ids.reshape(-1)
        measured = agreement_stats(model, ref_lm.model, flat, kl_ids.shape[1], kl_ids.shape[1])["kl_mean"]
        rounds.append({"target": target, "predicted": total + head_kl, "measured": measured, "bits": _mean_bits(plan, linears)})
        if budget is None or measured <= budget:
            break
        target *= budget / measured * 0.9
    report = {
        "budget": budget, "max_bits": max_bits, "kl_measured": measured, "kl_tokens": int(kl_ids.numel()), "tokens": int(ids.numel()), "head_kl": head_kl,
        "bits_per_weight": _mean_bits(plan, linears), "rounds": rounds, "plan": plan,
        "kinds": {k: sum(1 for v in plan.values() if v == k) for k in KINDS if k in plan.values()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    if budget is not None and measured > budget:
        more = "give a larger budget" + (" or more --max-bits" if max_bits is not None else "")
        raise PocketLMError(f"--budget {budget}: the best plan found gives KL {measured:.4g} on the held-out calibration text "
                            f"(at {report['bits_per_weight']:.2f} bits per weight); {more}")
    return model, report


def _mean_bits(plan: dict[str, str], linears: dict[str, nn.Module]) -> float:
    bits = sum(kind_bits(plan[n], m.in_features) * m.weight.numel() for n, m in linears.items())
    return bits / sum(m.weight.numel() for m in linears.values())


def _candidate(kind: str, linear: nn.Linear, H: torch.Tensor, cfg: CalibConfig) -> torch.Tensor:
    """The dequantized weight `linear` gets as `kind` by cfg.method: GPTQ on H, or round-to-nearest."""
    if cfg.method != "gptq":
        return _dequantized(_rtn(kind, linear))
    w = linear.weight.detach().float()
    grid = fit_grid(kind, w, H, cfg.clip)
    codes = gptq(w, H, grid, cfg.damp, cfg.block, cfg.act_order, cfg.clip)
    return (refit_grid(w, codes, H, grid) if cfg.refit else grid).dequantize(codes)


@torch.no_grad()
def _head_kl(model: nn.Module, kl_ids: torch.Tensor, ref_logp, xs_kl, args_kl) -> float:
    """The KL the int8 output head costs alone (with a tied embedding, the embedding reads the same int8 table)."""
    head = model.lm_head
    w = head.weight.data
    q = Int8Linear.from_linear(head)
    head.weight.data = q.weight.float() * q.scales.float()[:, None]
    tied = getattr(model.cfg, "tie_word_embeddings", False)
    if tied:
        x0 = [layer_inputs(model, [seq])[0][0] for seq in kl_ids.split(1)]
    kl = _kl_pass(model, 0, x0 if tied else xs_kl[0], args_kl, ref_logp)
    head.weight.data = w
    return kl


# ---------------------------------------------------------------------------------------- the command


def read_calibration(path: str | None) -> tuple[str, str]:
    """(text, where it came from): a .txt file as it is, a .jsonl file's rows (each row's "text", or its string
    values) joined by blank lines; None: the bundled WikiText-2 sample that prune calibrates on."""
    import json
    from pathlib import Path

    if path is None:
        path = str(Path(__file__).parents[1] / "compress" / "data" / "calib_wikitext2.txt")
    file = Path(path).expanduser()
    if not file.is_file():
        raise PocketLMError(f"{file}: no such calibration file")
    try:
        raw = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PocketLMError(f"{file}: the calibration file is not UTF-8 text") from None
    if file.suffix == ".jsonl":
        parts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise PocketLMError(f"{file}:{n}: not valid JSON ({e})") from None
                values = [row["text"]] if isinstance(row, dict) and "text" in row else \
                    [v for v in (row.values() if isinstance(row, dict) else [row]) if isinstance(v, str)]
                parts.append("\n\n".join(v for v in values if v))
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise PocketLMError(f"{file}: the calibration file has no text")
    return raw, str(file.resolve())


def quantize_calibrated(ref: str, out, scheme: QuantScheme, calib: str | None, cfg: CalibConfig,
                        budget: float | None = None, max_bits: float | None = None) -> dict:
    """`pocketlm quantize MODEL --calib FILE [--method M] [--budget KL] [--max-bits B]`: load the float model,
    quantize it layer by layer on the calibration text (or pick the bits for a KL budget or within a bits cap),
    write the folder. Returns the report."""
    from pocketlm.load import load
    from pocketlm.quant import write_quantized

    text, source = read_calibration(calib)
    lm = load(ref, quant="none")
    if lm.meta.get("quantization"):
        raise PocketLMError(f"{lm.source} is already quantized; quantize the float model it came from")
    if lm.is_encoder:
        raise PocketLMError(f"{lm.name} is an encoder: calibrated quantization is for decoders")
    if not any(name.startswith("model.layers.0.") for name in lm.model.state_dict()):
        # GPT-2, GPT-Neo, GPT-J keep transformers' names (transformer.h.<i>...); the passes below walk model.layers.<i>
        raise PocketLMError(f"calibrated quantization does not support {lm.config.model_type} models yet; "
                            f"quantize without --calib (round to nearest), or use a Llama-like family")
    ids = calibration_ids(lm.tokenizer, text, cfg.tokens, min(cfg.seq_len, lm.context_length))
    searched = budget is not None or max_bits is not None
    if searched:
        model, report = budget_search(lm, lambda: load(ref, quant="none"), scheme, ids, budget, cfg, max_bits)
        lm.model, scheme = model, QuantScheme(scheme.weights, scheme.group_size, layers=report["plan"])
    else:
        report = calibrate(lm.model, ids, scheme, cfg)
    meta = {"method": cfg.method, "calib": source, "tokens": report["tokens"], "seq_len": int(ids.shape[1])}
    if searched:
        meta.update({k: report[k] for k in ("budget", "max_bits", "kl_measured", "kl_tokens", "bits_per_weight", "kinds")})
    write_quantized(lm, scheme, out, calibration=meta)
    return report
