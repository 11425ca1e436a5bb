"""`infinite-llm` command line: `generate` answers a prompt (the default model by default)."""

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
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--num-kv-blocks", type=int, default=None)
    gen.add_argument("--block-size", type=int, default=16)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from infinite_llm import LLM, SamplingParams  # after parsing, so --help is instant

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        llm = LLM(args.model, device=args.device, dtype=args.dtype,
                  num_kv_blocks=args.num_kv_blocks, block_size=args.block_size)
        if not args.no_chat_template and getattr(llm.tokenizer, "chat_template", None):
            out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
        else:
            out = llm.generate(args.prompt, params, use_tqdm=False)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out[0].outputs[0].text.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
