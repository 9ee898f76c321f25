"""A GGUF model's weights straight into pocketlm's quantized layers, one tensor at a time, with no float copy of the
model in memory or on disk (llama.cpp computes on the file's blocks; pocketlm lays them out for its kernels once
per start, in about the time it takes to read the file).

    state_dict, layers = quantized_state_dict(gguf_file, QuantScheme.parse("int4-mixed"), hf_config)

gives what `pocketlm quantize` would have written for the same model (fused projections, Int4Linear's codes and
bf16 scales, Int8Linear's rows), so `pocketlm.load` builds the model from it as from such a folder; `layers` are the
int4 layers made ready in the kernels' layout straight from the blocks (cpu.cpp's int4_pack_gguf), put in place of
their state dict entries.

Q4_0, Q4_1 and Q4_K blocks are groups of 32 on a 4-bit grid with a scale and an offset: Int4Linear's own form,
w = (q - 8) * scale + zero. Their codes move over as they are, and each group's scale and zero are computed in
fp32 from the block's fields, then held in bf16 as every Int4Linear holds them (that rounding is the one loss,
as on the dequantize-then-quantize path). Layers made ready for the kernels from Q4_0 or Q4_K tensors alone keep
their blocks' bytes instead (cpu.cpp's Q4_0 and Q4_K layouts: the file's weights exactly, 4.5 and 4.625 bits a
weight against 5). Q6_K tensors keep their blocks too (cpu.cpp's Q6_K layout, 6.56 bits a weight, Int8Linear's
"q6_k" layout; int8 rows where the kernels are off). Other types (Q5_*, Q8_0, F16, BF16, F32) are rounded as
`pocketlm.quant` rounds a float weight: int8 rows (in C, a row at a time: cpu.cpp's int8_rows_gguf, the same values
as the torch dequantizers and int8_rows), or int4 groups where the scheme asks int4 for every layer. Each tensor's
pages of the file are dropped once it is converted (madvise), so the process holds the quantized model and at most
one tensor in float.
"""

from __future__ import annotations

import mmap

import torch
from gguf import GGMLQuantizationType as T

from pocketlm import kernels
from pocketlm.formats.gguf import ARCHITECTURES, GGUFFile, TensorInfo, _hf_name, dequantize_tensor
from pocketlm.formats.gguf_quants import _f16, _k_scale_min, _nibbles, dequantize
from pocketlm.quant import QuantScheme
from pocketlm.quant.int4 import Int4Linear, pack_nibbles, quantize_groups
from pocketlm.quant.int8 import Int8Embedding, Int8Linear, int8_rows

GRID_TYPES = (T.Q4_0, T.Q4_1, T.Q4_K)  # blocks whose 32-wide groups are Int4Linear's groups of 32
CHUNK_ROWS = 1024  # rows dequantized at a time: a 7B model's (14336, 4096) layer holds 16 MB of float, not 235
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # fuse_projections'


def grid_groups(info: TensorInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0, Q4_1 or Q4_K tensor (N, K) -> codes (N * K / 32, 32) uint8 in 0..15, scale and zero (N * K / 32,)
    fp32 per group of 32, with w = (q - 8) * scale + zero. Block layouts: ggml-common.h's block_q4_0, block_q4_1,
    block_q4_K, read as formats/gguf_quants.py's dequantizers read them."""
    raw = torch.from_numpy(info.data)
    if info.ggml_type == T.Q4_0:  # d | qs[16]: w = d (q - 8)
        blocks = raw.view(-1, 18)
        codes = _nibbles(blocks[:, 2:].unsqueeze(1)).reshape(-1, 32)
        scale = _f16(blocks, 0)[:, 0]
        return codes, scale, torch.zeros_like(scale)
    if info.ggml_type == T.Q4_1:  # d | m | qs[16]: w = d q + m
        blocks = raw.view(-1, 20)
        codes = _nibbles(blocks[:, 4:].unsqueeze(1)).reshape(-1, 32)
        scale, m = _f16(blocks, 0)[:, 0], _f16(blocks, 2)[:, 0]
        return codes, scale, m + 8 * scale
    blocks = raw.view(-1, 144)  # Q4_K: d | dmin | scales[12] | qs[128]; 8 groups of 32: w = (d sc) q - dmin m
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    scale = (_f16(blocks, 0) * sc.float()).reshape(-1)  # (n * 8,)
    minimum = (_f16(blocks, 2) * mn.float()).reshape(-1)
    codes = _nibbles(blocks[:, 16:].view(n, 4, 32)).reshape(-1, 32)
    return codes, scale, 8 * scale - minimum


def int4_from_grid(infos: list[TensorInfo], rows: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Int4Linear's buffers (qweight (N, K/2), scales_and_zeros (K/32, N, 2) bf16) of the tensors side by side
    (a fused projection), each with its rows reordered where `rows` gives an order (Llama's q and k)."""
    codes, scales_and_zeros = [], []
    for info, order in zip(infos, rows):
        N, K = info.shape
        c, scale, zero = grid_groups(info)
        c = pack_nibbles(c.view(N, K))  # (N, K/2)
        sz = torch.stack([scale, zero], -1).view(N, K // 32, 2).to(torch.bfloat16)  # (N, K/32, 2)
        if order is not None:
            c, sz = c[order], sz[order]
        codes.append(c)
        scales_and_zeros.append(sz)
    return {"qweight": torch.cat(codes), "scales_and_zeros": torch.cat(scales_and_zeros).transpose(0, 1).contiguous()}


def int4_layer_from_grid(infos: list[TensorInfo], rows: list[torch.Tensor | None], bias: torch.Tensor | None) -> Int4Linear | None:
    """An Int4Linear holding only the kernels' layout, written straight from the blocks of the tensors side by side
    (a fused projection; each part but the last a whole number of the layout's 16-row blocks); None where the
    kernels are not built or the parts do not line up (int4_from_grid's plain buffers then)."""
    if not kernels.int4_kernel_on() or any(info.shape[0] % 16 for info in infos[:-1]):
        return None
    types = {info.ggml_type.name for info in infos}
    layout = types.pop().lower() if len(types) == 1 and types <= {"Q4_0", "Q4_K"} else "zeros"  # the blocks' own bytes
    return Int4Linear.from_packed(kernel_layout(infos, rows, layout), infos[0].shape[1], sum(i.shape[0] for i in infos), 32, bias, layout)


def kernel_layout(infos: list[TensorInfo], rows: list[torch.Tensor | None], layout: str) -> torch.Tensor:
    """The tensors side by side (each but the last a whole number of 16-row blocks) in the kernels' `layout`
    (kernels.INT4_LAYOUTS), written straight from their blocks by int4_pack_gguf, rows reordered where given."""
    N, K = sum(info.shape[0] for info in infos), infos[0].shape[1]
    packed = kernels.weight_buffer(kernels.int4_packed_bytes(N, K, 32, layout))
    block_bytes = kernels.int4_packed_bytes(16, K, 32, layout)  # one block of 16 rows
    first = 0
    for info, order in zip(infos, rows):
        blocks = torch.from_numpy(info.data)
        kernels.int4_pack_gguf(blocks, info.ggml_type.name, info.shape[0], K, order, packed[first // 16 * block_bytes :], layout)
        first += info.shape[0]
    return packed


def has_own_layout(info: TensorInfo, int4: bool) -> bool:
    """Whether own_layout_layer lays this tensor out: Q4_0 and Q4_K where `int4` allows, Q6_K; the kernels on."""
    return kernels.int4_kernel_on() and (info.ggml_type == T.Q6_K or (int4 and info.ggml_type in (T.Q4_0, T.Q4_K)))


def own_layout_layer(info: TensorInfo, order: torch.Tensor | None, bias: torch.Tensor | None) -> torch.nn.Module:
    """One tensor (has_own_layout) in its blocks' own kernel layout: Q4_0, Q4_K an Int4Linear; Q6_K an Int8Linear's
    "q6_k"."""
    N, K = info.shape
    if info.ggml_type == T.Q6_K:
        return Int8Linear.of_q6_k(kernel_layout([info], [order], "q6_k"), K, N, bias)
    return int4_layer_from_grid([info], [order], bias)


def float_rows(info: TensorInfo):
    """A matrix's rows in float, CHUNK_ROWS at a time: (first row, (rows, K) fp32). GGML blocks never cross a row."""
    N, K = info.shape
    raw = torch.from_numpy(info.data).view(N, -1)  # (N, bytes a row)
    for first in range(0, N, CHUNK_ROWS):
        rows = raw[first : first + CHUNK_ROWS]
        yield first, dequantize(rows.reshape(-1), info.ggml_type, (rows.shape[0], K))


def int8_layer(infos: list[TensorInfo], orders: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Int8Linear's buffers of the tensors side by side, each row rounded on its own (int8_rows), so a chunk of rows
    at a time straight into the result, the rows reordered after (Llama's q and k)."""
    N, K = sum(info.shape[0] for info in infos), infos[0].shape[1]
    weight, scales = torch.empty(N, K, dtype=torch.int8), torch.empty(N, dtype=torch.bfloat16)
    start = 0
    for info, order in zip(infos, orders):
        if kernels.library() is not None and info.ggml_type.name in kernels.GGUF_ROW_TYPES:  # in C, the rows in parallel
            part = slice(start, start + info.shape[0])
            kernels.int8_rows_gguf(torch.from_numpy(info.data), info.ggml_type.name, *info.shape, weight[part], scales[part])
        else:
            for first, rows in float_rows(info):
                end = start + first + rows.shape[0]
                weight[start + first : end], scales[start + first : end] = int8_rows(rows)
        part = slice(start, start + info.shape[0])
        if order is not None:
            weight[part], scales[part] = weight[part][order], scales[part][order]
        start += info.shape[0]
    return {"weight": weight, "scales": scales}


def release(info: TensorInfo) -> None:
    """Drop the file's pages of a converted tensor from this process (they are read again if ever touched)."""
    view = info.data.base
    mapping = getattr(view, "obj", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        start = info.offset - info.offset % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, start, info.offset + info.n_bytes - start)


def quantized_state_dict(f: GGUFFile, scheme: QuantScheme, config: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.nn.Module]]:
    """The state dict of the model `config` describes (gguf.py's config of f) quantized by `scheme`, as
    `pocketlm.quant.write_quantized` would save it (fused q/k/v and gate/up, int4 or int8 layers, float norms), and
    the modules made ready instead, by name: int4 and int8 layers in the kernels' layouts, an untied embedding's int8
    rows; None for a fused projection whose parts are made ready each on its own (their types differ)."""
    arch = ARCHITECTURES[f.architecture]
    by_hf_name = {_hf_name(name, arch.block_names, arch.top_names, arch.blocks): info for name, info in f.tensors.items()}
    by_hf_name = {k: v for k, v in by_hf_name.items() if k is not None}
    embed = arch.top_names["token_embd"]  # model.embed_tokens; GPT-2's transformer.wte
    positions = arch.top_names.get("position_embd")  # GPT-2's learned positions (transformer.wpe): a float table
    tied = "lm_head.weight" not in by_hf_name
    if tied:  # the head is the embedding's table: int8 rows, which the embedding looks up too (or, a head kept in its
        # 4-bit blocks, int8 rows of the embedding's own)
        by_hf_name["lm_head.weight"] = by_hf_name.pop(f"{embed}.weight")
    row_orders = _row_orders(f, arch, config)

    def float_tensor(hf_name: str, info: TensorInfo) -> torch.Tensor:
        w = arch.fix(info.name, dequantize_tensor(info), config)
        # a Linear's weight as the module holds it, (out, in): the file's shape (GPT-2's fix turns it to Conv1D's)
        return w if w.shape == info.shape else w.t()

    state_dict: dict[str, torch.Tensor] = {}
    ready: dict[str, torch.nn.Module] = {}
    done: set[str] = set()
    for hf_name, info in by_hf_name.items():
        if hf_name in done:
            continue
        module, _, kind = hf_name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        fused = next((f_ for f_, parts in FUSED.items() if leaf in parts), None)
        if scheme.head == "float" and module in (embed, "lm_head"):  # a QLoRA base's: the file's values, tied or not
            state_dict[hf_name] = float_tensor(hf_name, info)
            if tied and module == "lm_head":
                state_dict[f"{embed}.weight"] = state_dict[hf_name]
            release(info)
            continue
        if hf_name == f"{embed}.weight":  # untied: int8 rows, as a tied one reads the int8 head's
            ready[embed] = Int8Embedding.of_rows(**int8_layer([info], [None]))
            release(info)
            continue
        weight = by_hf_name.get(f"{module}.weight")
        if module == positions or not (fused or module == "lm_head" or len(weight.shape) == 2):  # not a Linear (o_proj, Phi's fc1, ...)
            state_dict[hf_name] = float_tensor(hf_name, info)  # norms
            release(info)
            continue
        if kind != "weight":
            continue  # a projection's bias: taken with its weight
        names = [f"{parent}.{p}.weight" for p in FUSED[fused]] if fused else [hf_name]
        parts = [by_hf_name[n] for n in names]
        target = f"{parent}.{fused}" if fused else module
        layer_kind = scheme.head if module == "lm_head" else scheme.weights
        if module == "lm_head" and scheme.weights == "int4" and info.ggml_type in GRID_TYPES and (not tied or kernels.int4_kernel_on()):
            layer_kind = "int4"  # a head already on a 4-bit grid: as the file has it (int8 would read 1.8x the bytes)
            if tied:  # the embedding then looks its rows up in int8 rows of its own, not in the head
                ready[embed] = Int8Embedding.of_rows(**int8_layer([info], [None]))
        K = parts[0].shape[1]
        biases = [by_hf_name.get(n.removesuffix("weight") + "bias") for n in names]
        orders = [row_orders.get(p.name) for p in parts]
        buffers = {}
        int4_grid = layer_kind == "int4" and scheme.group_size == 32  # a 4-bit tensor can keep its blocks
        if int4_grid and all(p.ggml_type in GRID_TYPES for p in parts):
            bias = torch.cat([float_tensor(b.name, b) for b in biases]) if all(biases) else None
            layer = int4_layer_from_grid(parts, orders, bias)
            if layer is not None:
                ready[target] = layer
                biases = []  # in the layer already
            else:
                buffers = int4_from_grid(parts, orders)
        elif layer_kind == "int4" and K % scheme.group_size == 0 and scheme.off_grid == "int4":
            # int4 everywhere, off the file's grids: rounded from float as pocketlm.quant rounds any weight
            w = torch.cat([float_tensor(n, p) for n, p in zip(names, parts)])  # (N, K): one layer in float
            codes, sz, _ = quantize_groups(w, scheme.group_size)
            buffers = {"qweight": pack_nibbles(codes), "scales_and_zeros": sz}
            del w
        elif all(p.ggml_type == T.Q6_K for p in parts) and kernels.int4_kernel_on() and all(p.shape[0] % 16 == 0 for p in parts[:-1]):
            # Q6_K blocks as they are (6.56 bits a weight, where int8 rows take 8: a Q4_K_M file's head and half its
            # ffn_down and attn_v); a tied head keeps int8 rows too, which the embedding looks up
            bias = torch.cat([float_tensor(b.name, b) for b in biases]) if all(biases) else None
            rows = tuple(int8_layer(parts, orders).values()) if module == "lm_head" and tied else None
            ready[target] = Int8Linear.of_q6_k(kernel_layout(parts, orders, "q6_k"), K, sum(p.shape[0] for p in parts), bias, rows)
            biases = []
        elif fused and all(has_own_layout(p, int4_grid) for p in parts):
            # parts of different types (Q4_K_M's Q4_K q and k with a Q6_K v, in half its layers): each in its own
            # layout, side by side, where one fused layer would take int8 rows for all (8 bits against 4.625)
            for part, tensor, order, b in zip(FUSED[fused], parts, orders, biases):
                ready[f"{parent}.{part}"] = own_layout_layer(tensor, order, float_tensor(b.name, b) if b else None)
            ready[target] = None  # no fused projection here (pocketlm.load.build)
            biases = []
        else:  # int8 rows (int4-mixed: the tensors off 4-bit grids; Q5 and Q8 types never lie on them)
            buffers = int8_layer(parts, orders)
            if module != "lm_head" and kernels.int8_kernel_on() and K % 32 == 0:
                # made ready in the kernel's layout now, its plain rows let go: kept in the state dict until the
                # model is built, every int8 layer's rows beside its layout made a 3B Q4_K_M's peak 1.1 GB higher
                bias = torch.cat([float_tensor(b.name, b) for b in biases]) if all(biases) else None
                ready[target] = Int8Linear.of_rows(buffers["weight"], buffers["scales"], bias)
                buffers, biases = {}, []
        for key, value in buffers.items():
            state_dict[f"{target}.{key}"] = value
        if any(b is not None for b in biases):
            state_dict[f"{target}.bias"] = torch.cat([float_tensor(b.name, b) for b in biases])
        for name, part in zip(names, parts):
            done.add(name)
            release(part)
            if (bias := by_hf_name.get(name.removesuffix("weight") + "bias")) is not None:
                release(bias)
    return state_dict, ready


def _row_orders(f: GGUFFile, arch, config: dict) -> dict[str, torch.Tensor]:
    """The row order that undoes the file's own (Llama's q and k rows, interleaved by convert_hf_to_gguf.py for
    llama.cpp's RoPE): the architecture's fix applied to row numbers. Only the tensors it reorders."""
    orders = {}
    for name, info in f.tensors.items():
        if len(info.shape) != 2:
            continue
        rows = torch.arange(info.shape[0], dtype=torch.float64)[:, None]
        fixed = arch.fix(name, rows, config)
        if fixed.shape == rows.shape and not torch.equal(fixed, rows):  # (GPT-2's transposition is the file's layout)
            orders[name] = fixed[:, 0].long()
    return orders
