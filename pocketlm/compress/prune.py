"""Structured pruning with importance measured on calibration text: a smaller model of the same family.

    spec = PruneSpec(drop_layers=6, ffn=1024, vocab_from="domain.txt")
    report = prune_model("smollm2", "./smollm2-pruned", spec)     # writes a Hugging Face folder

One calibration pass over a few thousand tokens records, with forward hooks on the native model:
  - depth: each block's influence, 1 - cos(block input, block output) averaged over tokens (ShortGPT,
    Men et al. 2024; Minitron's "block importance"). The blocks that change the residual stream least go.
  - heads: the L2 norm of each head's attention output (the input of o_proj), summed over tokens
    (Minitron, Muralidharan et al. 2024). A KV group's importance is the sum of its query heads'.
  - MLP channels: the magnitude of each channel's activation act(gate(x)) * up(x) (the input of down_proj).
  - hidden channels: the magnitude of every RMSNorm's (LayerNorm's) output per channel, summed over the layers (Minitron).
Which rows and columns belong to a head or an MLP channel is the family's `cuts` row in families.py (Llama's
q/k/v/o_proj and gate/up/down_proj, Phi-2's dense and fc1/fc2, GPT-2's transposed Conv1D c_fc/c_proj, Phi-3's fused
qkv_proj and gate_up_proj cut as their parts); what it may cut is its `prune` row, and the rest is refused.
All importances come from the unpruned model; each layer then keeps its own top heads and channels (the
same count in every layer, so the config stays uniform); hidden channels are chosen once for the whole model.
Kept rows and columns stay in their original order, so pruning that keeps everything is the identity.

Vocabulary trimming keeps the tokens a domain text uses, every special/added token, the byte tokens (so
any text still encodes), and every token its BPE merges pass through on the way to a kept token. The
tokenizer is rewritten with ids renumbered in the old order; text made of kept tokens encodes to the same
tokens and the kept logits are unchanged.

The result is written with formats/hf.py write_model_folder, config.json updated and the recipe under its
"pocketlm" key; it loads, runs and exports like any other model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from pocketlm.errors import PocketLMError
from pocketlm.families import FAMILIES, family

DEFAULT_CALIB = Path(__file__).parent / "data" / "calib_wikitext2.txt"
CALIB_SEQ_LEN = 512  # tokens per calibration sequence
DECODERS = tuple(f.model_type for f in FAMILIES.values() if f.prune)  # the families.py rows prune can cut


@dataclass
class PruneSpec:
    drop_layers: int = 0  # blocks to remove
    heads: int | None = None  # query heads to keep per layer (None: all)
    kv_groups: int | None = None  # key/value heads to keep per layer (None: all)
    ffn: int | None = None  # MLP channels to keep (None: all)
    hidden: int | None = None  # hidden channels to keep (None: all)
    vocab_from: str | None = None  # a text file whose tokens are kept (None: the whole vocabulary)
    # with vocab_from: fill up to this many tokens with the tokenizer's most frequent ones (lowest merge rank)
    # made of characters the text uses, so words the sample lacks stay whole (None: the text's tokens only)
    vocab_size: int | None = None


# ---- calibration ---------------------------------------------------------------------------------


def read_text(path: str | Path, what: str) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise PocketLMError(f"{path}: no such {what} file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PocketLMError(f"{path}: the {what} file is not UTF-8 text") from None
    if not text.strip():
        raise PocketLMError(f"{path}: the {what} file is empty")
    return text


def calibration_batch(tokenizer, text: str, n_tokens: int, seq_len: int = CALIB_SEQ_LEN) -> torch.Tensor:
    """The first n_tokens of text as (n_seq, seq_len) ids; a shorter text gives one shorter sequence."""
    ids = tokenizer.encode(text)[:n_tokens]
    if len(ids) < 16:
        raise PocketLMError(f"calibration text has {len(ids)} tokens: give at least a few hundred")
    seq_len = min(seq_len, len(ids))
    n_seq = len(ids) // seq_len
    return torch.tensor(ids[: n_seq * seq_len]).view(n_seq, seq_len)


@dataclass
class Importance:
    block: torch.Tensor  # (L,) block influence, 1 - mean cos(in, out)
    head: torch.Tensor  # (L, nh) attention-output norm per query head
    channel: torch.Tensor  # (L, F) MLP activation magnitude per channel
    hidden: torch.Tensor  # (D,) RMSNorm (LayerNorm) output magnitude per hidden channel, summed over norms
    tokens: int = 0  # calibration tokens it was measured on


@dataclass
class Names:
    """Where a loaded model keeps what prune cuts, as state_dict keys (Llama's; GPT-2's in brackets)."""

    blocks: str  # the block list: "model.layers" ("transformer.h")
    embed: str  # the token embedding: "model.embed_tokens.weight" ("transformer.wte.weight")
    head: str  # the output head: "lm_head.weight"
    cuts: object  # families.Cuts: the Linears inside a block

    @classmethod
    def of(cls, model) -> "Names":
        # named_modules names each module once, by its first path: the stack's own name, not an Aliased alias
        name = {id(m): n for n, m in model.named_modules()}
        return cls(
            blocks=name[id(model.model.layers)],
            embed=f"{name[id(model.model.embed_tokens)]}.weight",
            head=f"{name[id(model.lm_head)]}.weight",
            cuts=family(model.cfg.model_type).cuts,
        )

    @property
    def embedding_keys(self) -> tuple[str, str]:
        """What count_params counts as the embedding: the token embedding and the head."""
        return self.embed, self.head


@torch.inference_mode()
def measure_importance(model, batch: torch.Tensor, on_step=None) -> Importance:
    """One forward pass per calibration sequence with hooks on every block, on the Linears after attention and
    after the MLP activation (the family's Cuts: o_proj, down_proj for Llama) and on every RMSNorm or LayerNorm;
    on_step() after each (a progress bar's advance)."""
    cfg = model.cfg
    cuts = family(cfg.model_type).cuts
    layers = model.model.layers
    L, nh, hd = cfg.n_layers, cfg.n_heads, cfg.head_dim
    imp = Importance(
        block=torch.zeros(L, dtype=torch.float64),
        head=torch.zeros(L, nh, dtype=torch.float64),
        channel=torch.zeros(L, cfg.intermediate_size, dtype=torch.float64),
        hidden=torch.zeros(cfg.dim, dtype=torch.float64),
        tokens=batch.numel(),
    )
    handles = []

    def block_hook(i):
        def hook(module, args, out):
            x = args[0]  # (B, T, D) the residual stream before and after block i
            cos = F.cosine_similarity(x.float(), out.float(), dim=-1)  # (B, T)
            imp.block[i] += (1 - cos).sum().double()
        return hook

    def head_hook(i):
        def hook(module, args):
            y = args[0]  # (B, T, nh*hd): attention output per head, before the output projection mixes the heads
            imp.head[i] += y.float().view(*y.shape[:2], nh, hd).norm(dim=-1).sum(dim=(0, 1)).double()
        return hook

    def channel_hook(i):
        def hook(module, args):
            a = args[0]  # (B, T, F): act(gate(x)) * up(x)
            imp.channel[i] += a.float().abs().sum(dim=(0, 1)).double()
        return hook

    def norm_hook(module, args, out):
        if out.shape[-1] == cfg.dim:  # not Gemma's q_norm / k_norm (over head_dim)
            imp.hidden.add_(out.float().abs().sum(dim=(0, 1)).double())

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(block_hook(i)))
        handles.append(layer.get_submodule(cuts.heads_out).register_forward_pre_hook(head_hook(i)))
        handles.append(layer.get_submodule(cuts.ffn_out).register_forward_pre_hook(channel_hook(i)))
    for name, module in model.named_modules():
        if type(module).__name__ == "RMSNorm" or isinstance(module, torch.nn.LayerNorm):  # Phi-2's: LayerNorm
            handles.append(module.register_forward_hook(norm_hook))
    try:
        for seq in batch:
            model.hidden(seq[None])  # (1, T, D); no KV cache: the causal mask is SDPA's
            if on_step is not None:
                on_step()
    finally:
        for h in handles:
            h.remove()
    n_tokens = batch.numel()
    imp.block /= n_tokens
    return imp


# ---- choosing what stays ---------------------------------------------------------------------------


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (so kept rows keep their order)."""
    return scores.topk(k).indices.sort().values


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise PocketLMError(message)


def refuse_unsupported_cuts(spec: PruneSpec, cfg) -> None:
    """One line when the spec asks for a cut the family's row in families.py does not list."""
    asked = {"layers": spec.drop_layers, "heads": spec.heads is not None or spec.kv_groups is not None,
             "ffn": spec.ffn is not None, "hidden": spec.hidden is not None}
    can = family(cfg.model_type).prune
    flags = {"layers": "--drop-layers", "heads": "--heads/--kv-groups", "ffn": "--ffn", "hidden": "--hidden"}
    missing = [flags[cut] for cut, wanted in asked.items() if wanted and cut not in can]
    _check(not missing, f"{' and '.join(missing)}: pruning {cfg.model_type} can cut only "
                        f"{', '.join(flags[c] for c in can)} (and --vocab-from)")


def validate(spec: PruneSpec, cfg) -> None:
    L, nh, nkv = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    _check(0 <= spec.drop_layers < L, f"--drop-layers {spec.drop_layers}: the model has {L} layers, keep at least one")
    groups = spec.kv_groups if spec.kv_groups is not None else nkv
    _check(1 <= groups <= nkv, f"--kv-groups {groups}: the model has {nkv} key/value groups (choose 1 to {nkv})")
    heads = spec.heads if spec.heads is not None else groups * (nh // nkv)
    _check(1 <= heads <= nh, f"--heads {heads}: the model has {nh} query heads (choose 1 to {nh})")
    _check(
        heads % groups == 0 and heads // groups <= nh // nkv,
        f"--heads {heads} with {groups} key/value groups: each group has {nh // nkv} query heads, so keep a "
        f"multiple of {groups} up to {groups * (nh // nkv)}",
    )
    if spec.ffn is not None:
        _check(1 <= spec.ffn <= cfg.intermediate_size, f"--ffn {spec.ffn}: the MLP has {cfg.intermediate_size} channels")
    if spec.hidden is not None:
        _check(1 <= spec.hidden <= cfg.dim, f"--hidden {spec.hidden}: the hidden size is {cfg.dim}")
    if spec.vocab_size is not None:
        _check(spec.vocab_from is not None, "--vocab-size tops up a --vocab-from trim: give --vocab-from FILE too")
        _check(1 <= spec.vocab_size <= cfg.vocab_size, f"--vocab-size {spec.vocab_size}: the vocabulary has {cfg.vocab_size} tokens")


def choose_heads(imp: torch.Tensor, nh: int, nkv: int, heads: int, groups: int) -> tuple[list[int], list[int]]:
    """One layer's (kept KV groups, kept query heads): the best groups by the sum of their heads' importance,
    then the best heads inside each kept group, the same number per group (as GQA needs). imp: (nh,)."""
    rep = nh // nkv
    per_group = imp.view(nkv, rep)  # query head h belongs to group h // rep
    kept_groups = top_k(per_group.sum(dim=1), groups).tolist()
    keep_per_group = heads // groups
    kept_heads = [g * rep + j for g in kept_groups for j in top_k(per_group[g], keep_per_group).tolist()]
    return kept_groups, kept_heads


# ---- surgery on the state dict (Hugging Face names, (out, in) Linear weights) ------------------------


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, idx).clone()


def _cols(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(1, idx).clone()


def _outputs(t: torch.Tensor, idx: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """Output features idx of a Linear's weight (out, in) or bias (out,); of a Conv1D's weight (in, out)."""
    return _cols(t, idx) if conv1d and t.dim() == 2 else _rows(t, idx)


def _inputs(t: torch.Tensor, idx: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """Input features idx of a Linear's weight (out, in); of a Conv1D's weight (in, out)."""
    return _rows(t, idx) if conv1d else _cols(t, idx)


def _head_rows(idx: list[int], hd: int) -> torch.Tensor:
    """Row indices of heads idx in a (n * hd, D) projection."""
    return torch.tensor([h * hd + j for h in idx for j in range(hd)], dtype=torch.long)


def split_fused(sd: dict, cfg) -> tuple[dict, bool]:
    """Phi-3's fused qkv_proj and gate_up_proj as HF's separate q/k/v_proj and gate/up_proj (the rows side by side
    in that order), which the surgery below cuts by name. -> (state dict, whether anything was fused)"""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {}
    for key, t in sd.items():
        if ".self_attn.qkv_proj." in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv])):
                out[key.replace("qkv_proj", name)] = part
        elif ".mlp.gate_up_proj." in key:
            for name, part in zip(("gate_proj", "up_proj"), t.chunk(2)):
                out[key.replace("gate_up_proj", name)] = part
        else:
            out[key] = t
    return out, len(out) != len(sd)


def join_fused(sd: dict) -> dict:
    """The inverse of split_fused: q/k/v_proj into qkv_proj, gate/up_proj into gate_up_proj."""
    out = {}
    for key, t in sd.items():
        if ".self_attn.q_proj." in key:
            k, v = sd[key.replace("q_proj", "k_proj")], sd[key.replace("q_proj", "v_proj")]
            out[key.replace("q_proj", "qkv_proj")] = torch.cat([t, k, v])
        elif ".mlp.gate_proj." in key:
            out[key.replace("gate_proj", "gate_up_proj")] = torch.cat([t, sd[key.replace("gate_proj", "up_proj")]])
        elif not any(f".{n}." in key for n in ("k_proj", "v_proj", "up_proj")):
            out[key] = t
    return out


def per_layer_fields(cfg) -> list[str]:
    """The config's own fields that name each layer's kind (layer_types; GPT-Neo's attention_layers): one string per
    layer. A dropped block takes its entry along, so every kept layer keeps its kind (sliding / full, local / global)."""
    def per_layer(value) -> bool:
        return isinstance(value, list) and len(value) == cfg.n_layers and all(isinstance(v, str) for v in value)

    return [f.name for f in fields(cfg) if f.init and per_layer(getattr(cfg, f.name))]


def prune_state_dict(sd: dict, cfg, spec: PruneSpec, imp: Importance, names: Names) -> tuple[dict, object, list[str]]:
    """(new state dict, new config, changes as lines). sd has HF names (`names` says which); cfg is a pocketlm
    decoder config (a family whose row in families.py lists what prune can cut)."""
    sd, fused = split_fused(sd, cfg)
    changes: list[str] = []
    cuts, conv1d = names.cuts, names.cuts.conv1d
    L, nh, nkv, hd = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    gemma = family(cfg.model_type).scaled_embedding  # sqrt(D) embedding scale and (1 + w) norms

    # width inside each layer: heads and KV groups, MLP channels
    groups = spec.kv_groups if spec.kv_groups is not None else nkv
    heads = spec.heads if spec.heads is not None else groups * (nh // nkv)
    ffn = spec.ffn if spec.ffn is not None else cfg.intermediate_size
    for i in range(L):
        p = f"{names.blocks}.{i}."
        if (heads, groups) != (nh, nkv):
            kept_groups, kept_heads = choose_heads(imp.head[i], nh, nkv, heads, groups)
            q_rows, kv_rows = _head_rows(kept_heads, hd), _head_rows(kept_groups, hd)
            for name, rows in zip(cuts.heads_in, (q_rows, kv_rows, kv_rows)):
                for suffix in ("weight", "bias"):
                    if (key := f"{p}{name}.{suffix}") in sd:
                        sd[key] = _outputs(sd[key], rows, conv1d)  # (n * hd, D) -> (n' * hd, D)
            key = f"{p}{cuts.heads_out}.weight"
            sd[key] = _inputs(sd[key], q_rows, conv1d)  # (D, nh' * hd)
        if ffn != cfg.intermediate_size:
            keep = top_k(imp.channel[i], ffn)
            for name in cuts.ffn_in:
                for suffix in ("weight", "bias"):
                    if (key := f"{p}{name}.{suffix}") in sd:
                        sd[key] = _outputs(sd[key], keep, conv1d)  # (F, D) -> (F', D)
            key = f"{p}{cuts.ffn_out}.weight"
            sd[key] = _inputs(sd[key], keep, conv1d)  # (D, F')
    if (heads, groups) != (nh, nkv):
        changes.append(f"attention: {nh} query heads / {nkv} KV groups -> {heads} / {groups} per layer")
    if ffn != cfg.intermediate_size:
        changes.append(f"MLP: {cfg.intermediate_size} -> {ffn} channels per layer")

    # hidden channels: every tensor that reads or writes the residual stream
    dim = spec.hidden if spec.hidden is not None else cfg.dim
    if dim != cfg.dim:
        keep = top_k(imp.hidden, dim)
        for key in list(sd):
            t = sd[key]
            over_d = key.endswith(("norm.weight", "norm.bias")) and not key.endswith(("q_norm.weight", "k_norm.weight"))
            if over_d:  # RMSNorm / LayerNorm over D, not Gemma's q_norm / k_norm over head_dim
                sd[key] = t.index_select(0, keep).clone()
            elif key in (names.embed, names.head):
                sd[key] = _cols(t, keep)  # (V, D')
            elif any(f".{n}.weight" in key for n in (*cuts.heads_in, *cuts.ffn_in)):
                sd[key] = _cols(t, keep)  # (out, D')
            elif any(f".{n}." in key for n in (cuts.heads_out, cuts.ffn_out)):
                sd[key] = _rows(t, keep) if t.dim() == 2 else t.index_select(0, keep).clone()  # (D', in) / (D',)
        if gemma:
            # Gemma scales the embedding by sqrt(D): with D' channels the scale would change. Multiply the
            # embedding by c = sqrt(D / D') so the input keeps its values; a tied head then sees c * E, which
            # the final norm undoes: (1 + w') = (1 + w) / c.
            c = math.sqrt(cfg.dim / dim)
            sd[names.embed] = sd[names.embed] * c
            if cfg.tie_word_embeddings:
                sd["model.norm.weight"] = (1 + sd["model.norm.weight"]) / c - 1
        changes.append(f"hidden: {cfg.dim} -> {dim} channels")

    # depth: drop the blocks with the least influence, renumber the rest
    kept_layers = list(range(L))
    blocks = f"{names.blocks}."
    if spec.drop_layers:
        dropped = sorted(imp.block.topk(spec.drop_layers, largest=False).indices.tolist())
        kept_layers = [i for i in range(L) if i not in dropped]
        renamed = {}
        for key, t in sd.items():
            if key.startswith(blocks):
                i, rest = key[len(blocks):].split(".", 1)
                if int(i) in dropped:
                    continue
                key = f"{blocks}{kept_layers.index(int(i))}.{rest}"
            renamed[key] = t
        sd = renamed
        scores = ", ".join(f"{i}:{imp.block[i]:.3f}" for i in dropped)
        changes.append(f"layers: {L} -> {len(kept_layers)}, dropped {dropped} (block influence {scores})")

    # the new shape, through the config's own fields: a value a config derives (GPT-2's head_dim) it derives again
    shape = dict(n_layers=len(kept_layers), n_heads=heads, n_kv_heads=groups, head_dim=hd, intermediate_size=ffn, dim=dim)
    shape |= {name: [getattr(cfg, name)[i] for i in kept_layers] for name in per_layer_fields(cfg)}
    own = {f.name for f in fields(cfg) if f.init}
    new = replace(cfg, **{k: v for k, v in shape.items() if k in own and v != getattr(cfg, k)})
    if getattr(cfg, "max_window_layers", None) is not None:  # Qwen2's: stays consistent with layer_types
        new = replace(new, max_window_layers=sum(1 for i in kept_layers if i < cfg.max_window_layers))
    return join_fused(sd) if fused else sd, new, changes


# ---- vocabulary trimming -------------------------------------------------------------------------


def _bpe_path(token: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Every symbol BPE passes through when it builds `token` from its characters: the characters, each merge's
    result, and so the token itself when it is reachable. The lowest-ranked adjacent pair merges first, as in
    `tokenizers`' BPE (leftmost on a tie). A token's path does not depend on its neighbours: a merge across its
    edge would leave it unfinished."""
    symbols = list(token)
    seen = list(symbols)
    while len(symbols) > 1:
        best, at = None, -1
        for j in range(len(symbols) - 1):
            r = ranks.get((symbols[j], symbols[j + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, j
        if best is None:
            break
        symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
        seen.append(symbols[at])
    return seen


def trim_vocab(tokenizer, text: str, size: int | None = None):
    """(kept old ids ascending, a new Tokenizer whose id k is old id kept[k]) for the tokens `text` needs,
    topped up to `size` tokens with the lowest-ranked (earliest merged: most frequent in the tokenizer's
    own training data) tokens written only in characters the text's tokens use: a sample of a domain
    then stands for the domain, and common words the sample happens to lack keep their single tokens."""
    from tokenizers import Tokenizer as Backend

    from pocketlm.tokenizer import Tokenizer, _bytes_to_unicode

    data = json.loads(tokenizer.backend.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise PocketLMError(f"vocabulary trimming supports BPE tokenizers; this one is {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    ranks = {m: r for r, m in reversed(list(enumerate(merges)))}  # first occurrence wins, as in tokenizers
    added = data.get("added_tokens") or []

    used = set(tokenizer.encode(text))
    keep = set(used)
    keep |= {t["id"] for t in added}  # every special / added token
    keep |= {i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id) if i is not None}
    keep |= set(tokenizer.stop_ids)
    # the alphabet, so that any text still encodes: byte tokens (<0xNN>) or the 256 byte-level characters
    alphabet = [f"<0x{b:02X}>" for b in range(256)] if model.get("byte_fallback") else list(_bytes_to_unicode().values())
    keep |= {vocab[a] for a in alphabet if a in vocab}
    # the tokens on each kept token's merge path (the path of an intermediate is part of its parent's)
    by_id = {i: t for t, i in vocab.items()}
    added_ids = {t["id"] for t in added}

    def with_paths(ids) -> set[int]:
        return set(ids) | {vocab[s] for i in ids if i in by_id and i not in added_ids for s in _bpe_path(by_id[i], ranks) if s in vocab}

    keep = with_paths(keep)
    if size is not None and len(keep) < size:
        chars = {c for i in used if i in by_id and i not in added_ids for c in by_id[i]}  # the text's script
        made_by = {}  # token -> rank of the merge that makes it
        for r, (a, b) in enumerate(merges):
            made_by.setdefault(a + b, r)
        for token in sorted(made_by, key=made_by.get):
            if len(keep) >= size:
                break
            if token in vocab and vocab[token] not in keep and set(token) <= chars:
                keep |= with_paths([vocab[token]])
    kept = sorted(keep)
    new_id = {old: new for new, old in enumerate(kept)}
    kept_tokens = {by_id[i] for i in kept if i in by_id}

    model["vocab"] = {t: new_id[i] for t, i in vocab.items() if i in new_id}
    model["merges"] = [[a, b] for a, b in merges if a in kept_tokens and b in kept_tokens and a + b in kept_tokens]
    data["added_tokens"] = [{**t, "id": new_id[t["id"]]} for t in added]
    data["post_processor"] = _remap_post_processor(data.get("post_processor"), new_id)
    backend = Backend.from_str(json.dumps(data))

    def remap(i):
        return new_id.get(i) if i is not None else None

    trimmed = Tokenizer(
        backend,
        bos_id=remap(tokenizer.bos_id),
        eos_id=remap(tokenizer.eos_id),
        pad_id=remap(tokenizer.pad_id),
        unk_id=remap(tokenizer.unk_id),
        add_bos=tokenizer.add_bos,
        add_eos=tokenizer.add_eos,
        chat_template=tokenizer.chat_template,
        extra_stop_ids=[remap(i) for i in tokenizer.stop_ids],
    )
    return torch.tensor(kept, dtype=torch.long), trimmed


def _remap_post_processor(pp, new_id: dict[int, int]):
    """Special-token ids inside a TemplateProcessing post-processor (a Sequence of them too)."""
    if not isinstance(pp, dict):
        return pp
    if pp.get("type") == "Sequence":
        return {**pp, "processors": [_remap_post_processor(p, new_id) for p in pp.get("processors", [])]}
    if pp.get("type") == "TemplateProcessing":
        specials = {k: {**v, "ids": [new_id[i] for i in v["ids"]]} for k, v in pp.get("special_tokens", {}).items()}
        return {**pp, "special_tokens": specials}
    return pp


def _remap_config_ids(hf_config: dict, new_id: dict[int, int]) -> None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = hf_config.get(key)
        if isinstance(value, list):
            hf_config[key] = [new_id[i] for i in value if i in new_id]
        elif isinstance(value, int):
            hf_config[key] = new_id.get(value)


# ---- counting ----------------------------------------------------------------------------------------


LLAMA_EMBEDDING_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def count_params(sd: dict, tied: bool, embedding_keys: tuple[str, str] = LLAMA_EMBEDDING_KEYS) -> dict[str, int]:
    """{"total", "embedding", "non_embedding"}; a tied head counts once (as the embedding). embedding_keys: the
    token embedding's and the head's keys (Names.of(model).embedding_keys; Llama's by default)."""
    head = embedding_keys[-1]
    tensors = {k: t for k, t in sd.items() if not (tied and k == head)}
    embedding = sum(t.numel() for k, t in tensors.items() if k in embedding_keys)
    total = sum(t.numel() for t in tensors.values())
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


# ---- the recipe ----------------------------------------------------------------------------------------


def prune(lm, spec: PruneSpec, calib_text: str | None = None, calib_tokens: int = 4096, vocab_text: str | None = None,
          progress=None, importance: Importance | None = None):
    """A loaded model (pocketlm.load.LoadedModel, fp32) -> (hf_config, state dict, tokenizer, report) of the pruned one.
    progress: a pocketlm.progress.Progress to count the calibration passes on, or None. importance: what
    calibration_importance measured on lm before (several cuts of one model measure it once)."""
    from pocketlm.config import config_from_hf
    from pocketlm.progress import NO_PROGRESS

    progress = progress or NO_PROGRESS

    cfg = lm.config
    if cfg.model_type not in DECODERS:
        raise PocketLMError(f"pruning supports decoders ({', '.join(DECODERS)}), not {cfg.model_type!r}")
    refuse_unsupported_cuts(spec, cfg)
    validate(spec, cfg)
    sd = {k: v for k, v in lm.model.state_dict().items()}
    names = Names.of(lm.model)
    tied = bool(cfg.tie_word_embeddings)
    before = count_params(sd, tied, names.embedding_keys)
    tokenizer = lm.tokenizer

    needs_calibration = (
        spec.drop_layers or spec.heads is not None or spec.kv_groups is not None or spec.ffn is not None
        or spec.hidden is not None
    )
    changes: list[str] = []
    if needs_calibration:
        imp = importance if importance is not None else calibration_importance(lm, calib_text, calib_tokens, progress)
        sd, cfg, changes = prune_state_dict(sd, cfg, spec, imp, names)
        changes.insert(0, f"importance measured on {imp.tokens} calibration tokens")
    hf_config = cfg.to_hf()
    if vocab_text is not None:
        kept, tokenizer = trim_vocab(tokenizer, vocab_text, spec.vocab_size)
        head_bias = names.head.removesuffix("weight") + "bias"  # Phi's and GPT-J's head have one
        for key in (names.embed, names.head, head_bias):
            if key in sd and not (tied and key == names.head):
                sd[key] = _rows(sd[key], kept)  # (V, D) -> (V', D); (V,) -> (V',)
        new_id = {old: new for new, old in enumerate(kept.tolist())}
        hf_config["vocab_size"] = len(kept)
        _remap_config_ids(hf_config, new_id)
        changes.append(f"vocabulary: {cfg.vocab_size} -> {len(kept)} tokens")
    if tied:
        sd.pop(names.head, None)
    config_from_hf(hf_config)  # the new config must read back
    after = count_params(sd, tied, names.embedding_keys)
    report = {"params_before": before, "params_after": after, "changes": changes}
    hf_config["pocketlm"] = {
        **{k: v for k, v in lm.meta.items() if k != "runtime_quant"},
        "pruned_from": str(lm.source),
        "recipe": {"prune": {k: v for k, v in asdict(spec).items() if v not in (None, 0)}, "calib_tokens": calib_tokens},
        "prune_report": report,
    }
    return hf_config, sd, tokenizer, report


def calibration_importance(lm, calib_text: str | None = None, calib_tokens: int = 4096, progress=None) -> Importance:
    """measure_importance on the first calib_tokens of calib_text (None: the bundled WikiText-2 sample)."""
    from pocketlm.progress import NO_PROGRESS

    text = calib_text if calib_text is not None else read_text(DEFAULT_CALIB, "calibration")
    # sequences no longer than the model's positions (GPT-2's learned ones end there)
    seq_len = min(CALIB_SEQ_LEN, getattr(lm.config, "max_position_embeddings", CALIB_SEQ_LEN))
    batch = calibration_batch(lm.tokenizer, text, calib_tokens, seq_len)
    progress = progress or NO_PROGRESS
    progress.step("calibration sequences", total=len(batch))
    return measure_importance(lm.model, batch, on_step=progress.advance)


def prune_model(ref: str, output: str | Path, spec: PruneSpec, calib: str | None = None, calib_tokens: int = 4096,
                progress=None) -> dict:
    """Load `ref`, prune it by `spec` and write the result to the folder `output`; returns the report.
    progress: a pocketlm.progress.Progress that shows the calibration passes and the write, or None."""
    import os

    from pocketlm.formats.hf import write_model_folder
    from pocketlm.load import load
    from pocketlm.progress import NO_PROGRESS, file_growth

    output = Path(output).expanduser()
    calib_text = read_text(calib, "calibration") if calib else None
    vocab_text = read_text(spec.vocab_from, "--vocab-from") if spec.vocab_from else None
    if calib_tokens < 16:
        raise PocketLMError(f"--calib-tokens {calib_tokens}: use at least a few hundred")
    lm = load(ref)
    if output.resolve() in (lm.source.resolve(), lm.path.resolve()):
        raise PocketLMError(f"{output}: the output would overwrite the model being pruned")
    hf_config, sd, tokenizer, report = prune(lm, spec, calib_text, calib_tokens, vocab_text, progress)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    tmp = output.with_name(f"{output.name}.tmp{os.getpid()}") / "model.safetensors"  # write_model_folder's temporary name
    (progress or NO_PROGRESS).step("writing", poll=file_growth(lambda: tmp, total))
    write_model_folder(output, hf_config, sd, tokenizer)
    return {"path": str(output), **report}
