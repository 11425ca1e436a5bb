"""`infinite-llm` command line: `generate` answers a prompt (the default model by default),
`serve` runs the OpenAI-compatible server, `bench serve` measures a running server."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from infinite_llm.config import EngineConfig

DEFAULT_PROMPT = "What is the capital of France?"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinite-llm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer one prompt and print the answer")
    gen.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None, dest="sampling_seed",
                     help="the request's sampling seed")
    gen.add_argument("--no-chat-template", action="store_true",
                     help="send the prompt as raw text even if the tokenizer has a chat template")
    _add_engine_flags(gen, skip=("seed",))  # --seed above is the request's
    _add_serve_parser(commands)
    _add_bench_parser(commands)
    return parser


_FLAG_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


_GROUP_TITLES = {"load": "model", "cache": "KV cache", "scheduler": "scheduler",
                 "cluster": "cluster"}


def _add_engine_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per `EngineConfig` option (`block_size` -> `--block-size`), grouped by config
    part, its help and choices the field's own; a flag left out is absent from the parsed args,
    so the config's default holds."""
    for part, fields in EngineConfig.option_groups().items():
        group = parser.add_argument_group(f"{_GROUP_TITLES[part]} options")
        for f in fields:
            if f.name not in skip:
                _add_flag(group, f)


def _add_flag(group: argparse._ArgumentGroup, f: dataclasses.Field) -> None:
    flag, kind, text = f"--{f.name.replace('_', '-')}", _flag_type(f), f.metadata["help"]
    if kind is bool:
        default = flag if f.default else f"--no-{flag[2:]}"
        group.add_argument(flag, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=f"{text} (default: {default})")
        return
    if f.default is not None:  # a None default is described by the help itself
        text = f"{text} (default: {f.default})"
    group.add_argument(flag, type=kind, choices=f.metadata["choices"],
                       default=argparse.SUPPRESS, help=text)


def _flag_type(f: dataclasses.Field) -> type:
    """The type of the field's default, else the one its annotation names besides None."""
    if f.default is not None:
        return type(f.default)
    names = [n.strip() for n in str(f.type).split("|") if n.strip() != "None"]
    return _FLAG_TYPES[names[0]]


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options set on the command line (those left out are absent)."""
    return {f.name: getattr(args, f.name) for f in EngineConfig.option_fields()
            if hasattr(args, f.name)}


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("--served-model-name", default=None,
                       help="the name clients pass as `model` (default: from --model)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require `Authorization: Bearer KEY` on /v1 routes")
    serve.add_argument("--max-waiting", type=int, default=None,
                       help="answer 503 while this many requests wait for their first token")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                       help="answer 413 for a larger request body (default 8 MiB)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    _add_engine_flags(serve)


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    add_bench_serve_arguments(
        kinds.add_parser("serve", help="load a running server with streaming requests")
    )


def add_bench_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--trace", default=None,
                   help='JSONL, one {"prompt_len", "output_len", "arrival_s"} per line')
    p.add_argument("--random-input-len", type=int, default=None)
    p.add_argument("--random-output-len", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--request-rate", type=float, default=None,
                   help="Poisson arrivals per second (inf: all at once); with a trace that has "
                        "arrival_s and no --request-rate, the trace's arrivals are kept")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="random token ids are below this (default: what /v1/models reports)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--output-json", default="bench_serve.json")
    p.add_argument("--output-png", default="bench_serve.png")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per request")


def _serve(args: argparse.Namespace) -> int:
    from infinite_llm.entrypoints.server import ServerConfig, run_server

    try:
        config = ServerConfig(EngineConfig.from_options(**_engine_options(args)), args.host,
                              args.port, args.api_key, args.max_waiting, args.max_body_bytes,
                              args.served_model_name, args.log_level)
        run_server(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        logging.basicConfig(level=args.log_level.upper(),
                            format="%(levelname)s %(name)s: %(message)s")
        return _serve(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "bench":
        from infinite_llm.entrypoints.bench import main as bench_main

        return bench_main(args)
    from infinite_llm.entrypoints.api import LLM  # after parsing, so --help is instant
    from infinite_llm.sampling import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed)
        with LLM(**_engine_options(args)) as llm:
            if not args.no_chat_template and getattr(llm.tokenizer, "chat_template", None):
                messages = [{"role": "user", "content": args.prompt}]
                out = llm.chat(messages, params, use_tqdm=False)
            else:
                out = llm.generate(args.prompt, params, use_tqdm=False)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out[0].outputs[0].text.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
