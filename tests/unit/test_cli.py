"""The command line: every --help works, config errors are one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from kvbridge import cli

COMMANDS = [
    [],
    ["serve"],
    ["chat"],
    ["bench"],
    ["bench", "engine"],
    ["bench", "transfer"],
    ["bench", "serve"],
    ["deploy"],
    ["doctor"],
    ["worker"],
]


@pytest.fixture(autouse=True)
def keep_root_logging():
    """Commands set up the root logger; give pytest's handlers back after each test."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def run_main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's --help and usage errors
        return int(e.code or 0)


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "kvbridge")
def test_help(words, capsys):
    assert run_main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage:" in out.lower()


def test_top_level_help_lists_every_command(capsys):
    run_main(["--help"])
    out = capsys.readouterr().out
    for name in ("serve", "chat", "bench", "deploy", "doctor", "worker"):
        assert name in out


def test_help_is_fast_and_light():
    code = (
        "import sys; from kvbridge.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'fastapi', 'uvicorn', 'kvbridge.engine.engine') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in out, out


def one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def test_config_errors_are_one_line_exit_2(tmp_path: Path, capsys):
    one_line_error(capsys, ["serve", "--config", str(tmp_path / "missing.yaml")], "config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  model: x.gguf\n  dtype: float8\n")
    one_line_error(capsys, ["serve", "--config", str(bad)], "engine.dtype")
    bad.write_text("engine:\n  model: x.gguf\n  colour: blue\n")
    one_line_error(capsys, ["serve", "--config", str(bad)], "unknown setting 'engine.colour'")
    bad.write_text("engine: [unclosed\n")
    one_line_error(capsys, ["chat", "hi", "--config", str(bad)], "not valid YAML")
    one_line_error(capsys, ["serve", "--model", "x.gguf", "--block-size", "3"], "block_size must be a power of two")
    one_line_error(capsys, ["serve", "--model", "x.gguf", "--port", "70000"], "server.port")


def test_config_error_from_the_installed_command(tmp_path: Path):
    exe = Path(sys.executable).with_name("kvbridge")
    if not exe.exists():
        pytest.skip("the kvbridge entry point is not installed in this venv")
    r = subprocess.run(
        [str(exe), "serve", "--config", str(tmp_path / "nope.yaml")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr and "config file not found" in r.stderr


def test_flags_override_the_yaml(tmp_path: Path):
    y = tmp_path / "c.yaml"
    y.write_text(
        "engine:\n  model: a.gguf\n  dtype: float16\n  block_size: 32\nserver:\n  port: 9000\n  host: 127.0.0.1\n"
    )
    args = cli.build_parser().parse_args(
        ["serve", "--config", str(y), "--dtype", "bfloat16", "--port", "9001", "--max-num-seqs", "4"]
    )
    cfg = cli.build_config(args, {**cli.ENGINE_FLAGS, **cli.SERVER_FLAGS})
    assert (cfg.engine.model, cfg.engine.dtype, cfg.engine.block_size, cfg.engine.max_num_seqs) == (
        "a.gguf",
        "bfloat16",
        32,
        4,
    )
    assert (cfg.server.host, cfg.server.port, cfg.server.log_level) == ("127.0.0.1", 9001, "info")
    args = cli.build_parser().parse_args(["serve", "--model", "b.gguf"])
    cfg = cli.build_config(args, {**cli.ENGINE_FLAGS, **cli.SERVER_FLAGS})
    assert (cfg.engine.model, cfg.server.host, cfg.server.port) == ("b.gguf", "127.0.0.1", 8000)


def test_prefill_worker_without_a_transceiver_is_one_line(capsys):
    argv = ["worker", "--role", "prefill", "--model", "x.gguf", "--port", "0"]
    one_line_error(capsys, argv, "cache_transceiver_config.backend")


def test_delegates_get_their_argv(monkeypatch, capsys):
    seen = {}
    mod = types.ModuleType("kvbridge_test_fake_bench")
    mod.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "kvbridge_test_fake_bench", mod)
    monkeypatch.setitem(cli.DELEGATES, ("bench", "engine"), ("kvbridge_test_fake_bench", "a fake"))
    assert cli.main(["bench", "engine", "--requests", "16", "--help"]) == 0
    assert seen["argv"] == ["--requests", "16", "--help"]


def test_missing_delegate_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(cli.DELEGATES, ("doctor",), ("kvbridge.no_such_module", "checks"))
    one_line_error(capsys, ["doctor"], "not available", "kvbridge.no_such_module")
    assert run_main(["doctor", "--help"]) == 0
    assert "usage: kvbridge doctor" in capsys.readouterr().out


def test_chat_rejects_an_empty_prompt(capsys):
    one_line_error(capsys, ["chat", "   ", "--model", "x.gguf"], "prompt is empty")


def test_serve_binds_first_logs_one_line_and_runs_uvicorn(monkeypatch, capsys):
    """`kvbridge serve` without a model: the engine and uvicorn's run are stubbed."""
    import uvicorn

    from kvbridge.engine.block_pool import BlockPool

    class StubEngine:
        model_name, max_model_len, dtype_name = "stub-model", 128, "bfloat16"
        block_pool = BlockPool(10, 16)
        tokenizer = None

        def stats(self):
            return types.SimpleNamespace(num_blocks=10, num_free_blocks=10, num_waiting=0, num_running=0)

    ran = {}

    def fake_run(self, sockets=None):
        ran["address"] = sockets[0].getsockname()
        self.started = True

    monkeypatch.setattr(cli, "_load_engine", lambda cfg, log: StubEngine())
    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    assert cli.main(["serve", "--aggregated", "--model", "x.gguf", "--port", "0", "--dtype", "bfloat16"]) == 0
    host, port = ran["address"]
    assert host == "127.0.0.1" and port > 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "kvbridge.serve" in x]
    assert "model=stub-model" in line and "dtype=bfloat16" in line and "kv_blocks=10" in line
    assert f"http://127.0.0.1:{port}" in line


def test_serve_port_in_use_is_one_line(capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        assert cli.main(["serve", "--model", "x.gguf", "--port", str(s.getsockname()[1])]) == 1
    finally:
        s.close()
    err = capsys.readouterr().err.strip()
    assert "cannot listen on 127.0.0.1" in err and "\n" not in err


def test_chat_url_that_is_not_an_openai_server(capsys):
    """A URL that answers, but not with OpenAI's JSON: one line and status 1, no traceback."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotOpenAI(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert run_main(["chat", "hi", "--url", f"http://127.0.0.1:{server.server_port}"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "did not answer like an OpenAI-compatible server" in err, err


@pytest.mark.parametrize("bench", ["engine", "transfer", "serve"])
def test_bench_out_that_is_a_file_is_a_usage_error(bench, tmp_path: Path, capsys):
    taken = tmp_path / "results"
    taken.write_text("keep me")
    for out, says in ((taken, "is a file, not a folder"), (taken / "sub", "is not a writable folder")):
        assert run_main(["bench", bench, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and says in err.strip().splitlines()[-1], err
    assert taken.read_text() == "keep me"
