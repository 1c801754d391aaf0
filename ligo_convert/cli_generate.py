"""`ligo-convert generate`: a thin wrapper over :func:`ligo_convert.generate.generate`."""

from __future__ import annotations

import json

import click


@click.command("generate", epilog="""\b
Examples:
  ligo-convert pretrain micro-gpt2 --family hf-gpt2 --steps 400
  ligo-convert generate micro-gpt2 --prompt "def main(" --max-new-tokens 24
  ligo-convert generate micro-gpt2 --prompt "def main(" --max-new-tokens 24 --engine onnx
  ligo-convert generate micro-gpt2 --prompt "import " --json
""")
@click.argument("model")
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-new-tokens", default=32, show_default=True, type=int, help="Tokens to generate at most.")
@click.option("--engine", default="torch", show_default=True, metavar="torch|onnx",
              help="Run with PyTorch, or with onnxruntime (MODEL may then be an exported .onnx file; a folder is "
                   "exported and validated first).")
@click.option("--family", metavar="F", help="Read MODEL as this family instead of detecting it.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at the model's end-of-sequence token.")
@click.option("--json", "as_json", is_flag=True, help="Print the prompt, the new tokens and the text as JSON.")
def generate_command(model, prompt, max_new_tokens, engine, family, ignore_eos, as_json):
    """Continue --prompt with a causal LM, greedily, through its key/value cache: a quick look at what a grown
    model says.

    The prompt is encoded with MODEL's own tokenizer.json (or bytes when it has none, as `grow` and `eval` read
    text); decoding stops after --max-new-tokens or at the model's end-of-sequence token.  Both engines print the
    same text.
    """
    from .generate import generate

    log = (lambda line: click.echo(line, err=True))
    result = generate(model, prompt, max_new_tokens, engine, family=family, stop_at_eos=not ignore_eos,
                      log=log if engine == "onnx" else None)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(prompt + result.text)
    click.echo(f"({result.engine}: {len(result.tokens)} new tokens, stopped at {result.stopped}, "
               f"{result.tokens_per_second:.1f} tokens/s, tokenizer: {result.tokenizer})", err=True)
