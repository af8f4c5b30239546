"""`genserve generate` and `genserve chat`: clients of a running server. They import no torch."""

from __future__ import annotations

import argparse
import sys

from genserve.service.cli.flags import env_default


def _client_request(args: argparse.Namespace, messages: list[dict[str, str]] | None = None):  # noqa: ANN202
    from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb

    parameters = pb.GenerationParameters()
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(parameters, name, value)
    # A CLI user who sets a temperature wants sampling (generate() would need do_sample=True as well).
    parameters.do_sample = bool(args.temperature) or args.do_sample
    parameters.stop_strings.extend(args.stop)
    if args.prompt_lookup is not None:
        parameters.prompt_lookup_num_tokens = args.prompt_lookup
    if args.guidance_scale is not None:
        parameters.guidance_scale = args.guidance_scale
    if messages is not None:
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])
        request = pb.GenerateRequest(messages=chat, parameters=parameters)
    else:
        request = pb.GenerateRequest(text=args.prompt, parameters=parameters)
    if args.negative_prompt is not None:
        request.negative_text = args.negative_prompt
    if args.regex is not None:
        request.constraint.regex = args.regex
    elif args.json_schema is not None:
        request.constraint.json_schema = _text_or_file(args.json_schema)
    elif args.choice:
        request.constraint.choice.choices.extend(args.choice)
    elif args.grammar is not None:
        request.constraint.grammar = _text_or_file(args.grammar)
    return request


def _text_or_file(value: str) -> str:
    """A flag that takes either its text or the path of a file holding it."""
    from pathlib import Path

    path = Path(value)
    return path.read_text() if len(value) < 4096 and path.is_file() else value


def _stub(target: str):  # noqa: ANN202
    import grpc

    from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc

    return generate_pb2_grpc.TextGenerationStub(grpc.insecure_channel(target))


def _stream_to_stdout(stub, request) -> str:  # noqa: ANN001
    import grpc

    text = []
    try:
        for message in stub.GenerateStream(request):
            print(message.text, end="", flush=True)
            text.append(message.text)
    except grpc.RpcError as error:
        print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
        raise SystemExit(1) from None
    print()
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    stub = _stub(args.target)
    request = _client_request(args)
    if args.stream:
        _stream_to_stdout(stub, request)
        return 0
    try:
        response = stub.Generate(request)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(response.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    stub = _stub(args.target)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("genserve chat: type a message, Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = _stream_to_stdout(stub, _client_request(args, messages))
        messages.append({"role": "assistant", "content": reply})


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=env_default("target", "localhost:50051"), help="server address host:port")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="> 0 turns sampling on")
    parser.add_argument("--do-sample", action="store_true", help="sample even at the default temperature")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--prompt-lookup", type=int, help="speculative decoding: N tokens proposed by prompt lookup")
    parser.add_argument(
        "--guidance-scale", type=float, help="classifier-free guidance scale (> 1 steers away from --negative-prompt)"
    )
    parser.add_argument("--negative-prompt", help="guidance's negative prompt (default: the prompt's last token)")
    constraint = parser.add_mutually_exclusive_group()
    constraint.add_argument("--regex", help="the output full-matches this regular expression")
    constraint.add_argument("--json-schema", help="the output is JSON valid against this schema (a file or JSON text)")
    constraint.add_argument("--choice", action="append", help="the output is one of these strings (repeatable)")
    constraint.add_argument("--grammar", help="the output follows this Lark/GBNF grammar (a file or the text)")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="one generation from a running server")
    generate.add_argument("prompt", help="the prompt text (sent as is, no chat template)")
    generate.add_argument("--stream", action="store_true", help="print text as it is generated")
    _add_client_arguments(generate)
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="interactive streaming chat with a running server (chat template applied)")
    chat.add_argument("--system", default="", help="a system message to start the conversation with")
    _add_client_arguments(chat)
    chat.set_defaults(handler=cmd_chat)
