"""`atomlab chat BUNDLE`: talk to a released model in the terminal, the reply streamed as it is generated.

The conversation is kept and sent whole each turn, in the bundle's chat template; when it no
longer fits the model's context, the oldest turns are dropped (and the user told). Commands:
`/reset` forgets the conversation, `/system TEXT` sets the system prompt (`/system` alone
clears it), `/quit` leaves, as do end of input and Ctrl-C at the prompt; Ctrl-C during a reply
stops that reply. Works the same with stdin a pipe: `printf 'hello\\n/quit\\n' | atomlab chat BUNDLE`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from atomlab.errors import AtomlabError
from atomlab.infer.engine import Engine, Request, SamplingParams, check_params

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /quit"


def register(commands: argparse._SubParsersAction) -> None:
    """Add `atomlab chat` to the CLI's subcommands; its handler is `run_chat`."""
    sub = commands.add_parser(
        "chat",
        help="chat with a release bundle in the terminal",
        description="Chat with a release bundle in the terminal. " + HELP + ".",
    )
    sub.add_argument("bundle", help="release bundle folder (runs/release-...)")
    sub.add_argument("--system", default=None, help="system prompt")
    sub.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    sub.add_argument("--top-k", type=int, default=50, help="sample from the K most likely tokens; 0 = off (default 50)")
    sub.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 = off (default 0.95)")
    sub.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    sub.add_argument("--seed", type=int, default=None, help="sampling seed, for replies that can be reproduced")
    sub.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda (default auto)")
    sub.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    try:
        return _chat_loop(args)
    except KeyboardInterrupt:  # while loading the model; at the prompt and in a reply it is handled below
        print()
        return 0


def _chat_loop(args: argparse.Namespace) -> int:
    engine = Engine.from_bundle(args.bundle, device=args.device)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    check_params(params, engine.args.vocab_size)  # fail at start, not at the first message
    if params.max_tokens < 1:
        raise AtomlabError(f"--max-tokens must be at least 1, got {params.max_tokens}")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    sys.stdout.reconfigure(errors="replace")  # a model can write characters the terminal cannot show

    print(f"atomlab chat: {_model_name(args.bundle)}, context {engine.max_context} tokens, on {engine.device}")
    print(HELP)
    chat = Conversation(engine, args.system, params)
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        line = line.strip()
        if not interactive:
            print(f"you> {line}")  # a transcript that reads like the terminal session
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                chat.history.clear()
                print("(conversation cleared)")
            elif command == "/system":
                chat.system = rest.strip() or None
                print(f"(system prompt set: {chat.system})" if chat.system else "(system prompt cleared)")
            else:
                print(f"(unknown command {command}; {HELP})")
            continue
        chat.reply(line)


class Conversation:
    """The history of one chat and how a new message is answered within the model's context."""

    def __init__(self, engine: Engine, system: str | None, params: SamplingParams) -> None:
        self.engine = engine
        self.system = system
        self.params = params
        self.history: list[dict[str, str]] = []  # user and assistant messages, oldest first
        # room kept for the reply when old turns are dropped: max_tokens, but at most half the context
        self.reply_room = min(params.max_tokens, engine.max_context // 2)

    def prompt_for(self, message: str) -> list[int] | None:
        """The prompt ids for a new user message, dropping the oldest turns until it fits;
        None (the user is told) when the message cannot fit even alone."""
        dropped = 0
        while True:
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages += [*self.history, {"role": "user", "content": message}]
            prompt = self.engine.chat_prompt(messages)
            if len(prompt) + self.reply_room <= self.engine.max_context or not self.history:
                break
            del self.history[:2]  # the oldest user message and its reply
            dropped += 1
        if dropped:
            print(f"(context full: dropped the oldest {dropped} turn{'s' if dropped > 1 else ''})")
        if len(prompt) >= self.engine.max_context:
            print(
                f"(message too long: the prompt is {len(prompt)} tokens and the model's context "
                f"{self.engine.max_context}; shorten it, or /system to shorten the system prompt)",
            )
            return None
        return prompt

    def reply(self, message: str) -> None:
        prompt = self.prompt_for(message)
        if prompt is None:
            return
        print("assistant> ", end="", flush=True)
        params = self.params
        if params.seed is not None:  # reproducible conversations, but not the same draws every turn
            params = replace(params, seed=params.seed + len(self.history) // 2)
        request = Request(prompt, params, on_text=lambda piece: print(piece, end="", flush=True))
        try:
            completion = self.engine.generate([request])[0]
        except KeyboardInterrupt:
            print("\n(reply stopped; it is not kept in the conversation)")
            return
        print()
        if completion.finish_reason == "length":
            room = self.engine.max_context - len(prompt)
            limit = "--max-tokens" if self.params.max_tokens <= room else "the end of the model's context"
            print(f"(reply cut at {completion.completion_tokens} tokens: {limit})")
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": completion.text}]


def _model_name(bundle: str) -> str:
    try:
        config = json.loads((Path(bundle) / "config.json").read_text(encoding="utf-8"))
        return f"{config.get('model_name', Path(bundle).name)} ({config['parameters']['total']:,} parameters)"
    except (OSError, ValueError, KeyError, TypeError):
        return Path(bundle).name
