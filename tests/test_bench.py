"""`pocketlm bench`: the --json schema is fixed (other tools read it); speeds themselves are never asserted."""

import json

from pocketlm import kernels
from pocketlm.cli import main

ROW_KEYS = {
    "engine", "kernels", "weights", "prompt_tok_s", "decode_tok_s", "ttft_s", "weight_bytes_per_token", "peak_rss_mb",
    "roofline_decode_tok_s", "fraction_of_roofline", "decode_vs_pocketlm", "prompt_vs_pocketlm",
}


def test_bench_json_schema(tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setattr("pocketlm.bench.BANDWIDTH_PROBE_MB", 64)
    args = ["bench", str(tiny_llama_dir), "--prompt-tokens", "24", "--new-tokens", "4", "--repeats", "1", "--json"]
    assert main([*args, "--quant", "int4", "--vs", "llama.cpp"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"schema", "model", "source", "prompt_tokens", "new_tokens", "repeats", "threads",
                        "read_bandwidth_gb_s", "results", "skipped"}
    assert out["schema"] == 2 and out["prompt_tokens"] == 24 and out["new_tokens"] == 4
    [ours] = out["results"]
    assert set(ours) == ROW_KEYS
    assert ours["engine"] == "pocketlm" and ours["weights"] == "int4" and ours["decode_vs_pocketlm"] == 1.0
    assert ours["kernels"] == kernels.target()  # the target this CPU runs best, named in every row
    assert ours["decode_tok_s"] > 0 and ours["roofline_decode_tok_s"] > 0 and ours["peak_rss_mb"] > 0
    # int4 codes plus bf16 scales, and the int8 head: well under the float weights' bytes
    float_bytes = sum(f.stat().st_size for f in tiny_llama_dir.glob("*.safetensors"))
    assert ours["weight_bytes_per_token"] < 0.4 * float_bytes
    # a .gguf peer on a folder model, or a peer that is not installed, is skipped with the reason
    [skipped] = out["skipped"]
    assert skipped["engine"] == "llama.cpp" and ("gguf" in skipped["reason"] or "pip install" in skipped["reason"])


def test_bench_table_with_transformers_beside(tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setattr("pocketlm.bench.BANDWIDTH_PROBE_MB", 64)
    args = ["bench", str(tiny_llama_dir), "--prompt-tokens", "24", "--new-tokens", "4", "--repeats", "1"]
    assert main([*args, "--vs", "transformers"]) == 0
    table = capsys.readouterr().out
    assert "pocketlm" in table and "transformers" in table and "roofline" in table
