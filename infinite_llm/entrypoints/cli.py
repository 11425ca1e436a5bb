"""`infinite-llm` command line: `generate` answers a prompt (the default model by default),
`serve` runs the OpenAI-compatible server, `bench serve` measures a running server."""

from __future__ import annotations

import argparse
import logging
import sys

DEFAULT_PROMPT = "What is the capital of France?"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinite-llm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer one prompt and print the answer")
    gen.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    gen.add_argument("--model", default=None,
                     help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-chat-template", action="store_true",
                     help="send the prompt as raw text even if the tokenizer has a chat template")
    _add_engine_flags(gen, skip=("seed",))  # --seed above is the sampling seed
    _add_serve_parser(commands)
    _add_bench_parser(commands)
    return parser


# Engine options as flags: EngineConfig field -> type; unset flags keep EngineConfig's defaults.
_ENGINE_FLAGS: dict[str, type] = {
    "device": str, "dtype": str, "num_kv_blocks": int, "kv_cache_fraction": float,
    "block_size": int, "max_num_seqs": int, "max_num_batched_tokens": int, "max_model_len": int,
    "seed": int, "num_instances": int, "kv_mode": str, "worker_timeout_s": float,
    "enforce_eager": bool, "async_scheduling": bool, "data_backend": str,
}


def _add_engine_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("engine options (see EngineConfig)")
    for name, kind in _ENGINE_FLAGS.items():
        if name in skip:
            continue
        if kind is bool:  # --name / --no-name; absent = EngineConfig's default
            group.add_argument(f"--{name.replace('_', '-')}",
                               action=argparse.BooleanOptionalAction, default=None)
        else:
            group.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)


def _engine_options(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, object]:
    return {n: getattr(args, n) for n in _ENGINE_FLAGS
            if n not in skip and getattr(args, n) is not None}


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("--model", default=None,
                       help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
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
        config = ServerConfig(args.model, _engine_options(args), args.host, args.port,
                              args.api_key, args.max_waiting, args.max_body_bytes,
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
    from infinite_llm import LLM, SamplingParams  # after parsing, so --help is instant

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        with LLM(args.model, **_engine_options(args, skip=("seed",))) as llm:
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
