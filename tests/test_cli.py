"""The command lines, end to end, on the bundled model."""

import re
import subprocess
import sys

import pytest


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "mlx_gemma4.generate", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_generate_prints_text_offline():
    out = cli("--prompt", "The module provides", "--max-tokens", "12", "--seed", "0", "--verbose")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert re.search(r"generation: \d+ tokens, [\d.]+ tokens/s", out.stderr)


def test_prompt_from_stdin_and_greedy_is_repeatable():
    a = cli("--prompt", "-", "--max-tokens", "8", "--temp", "0", stdin="Return the value")
    b = cli("--prompt", "-", "--max-tokens", "8", "--temp", "0", stdin="Return the value")
    assert a.returncode == 0 and a.stdout == b.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "does not exist"),
    (["--max-tokens", "nope"], "invalid int value"),
])
def test_bad_input_is_one_line_and_nonzero(args, message):
    out = cli(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_chat_repl_keeps_history_and_resets():
    script = "Hello there\n/reset\nAgain\n/exit\n"
    out = subprocess.run([sys.executable, "-c", "from mlx_gemma4.cli import chat_main; chat_main()",
                          "--max-tokens", "4", "--temp", "0"], input=script, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(">> ") == 4
