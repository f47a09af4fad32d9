"""The client commands: `cotap embed` as a real subprocess over a folder with one corrupt image,
killed half way and restarted (finished files are not redone); `prototypes`, `correspond`,
`models` and `health` through `cotap.cli.main.main`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from cotap.cli.main import main
from cotap.client import read_features
from cotap.client.store import SUFFIX
from tests.clients.folders import image_folder
from tests.clients.live import live_server, metric, slow
from tests.server.helpers import photo


@pytest.fixture(scope="module")
def slow_server(tiny_bundle: Path) -> Iterator[str]:
    """A server whose every forward takes 40 ms more, so that a folder takes a few seconds."""
    with live_server(tiny_bundle, hook=slow(0.04), max_batch=4) as url:
        yield url


def outputs(dst: Path) -> dict[Path, int]:
    """Finished feature files and their mtimes (temporary files excluded)."""
    return {p: p.stat().st_mtime_ns for p in dst.rglob(f"*{SUFFIX}") if not p.name.startswith(".")}


def embed_cmd(src: Path, dst: Path, url: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cotap.cli.main",
        "embed",
        str(src),
        "--out",
        str(dst),
        "--url",
        url,
        "--images-per-request",
        "2",
        "--concurrency",
        "2",
        *extra,
    ]


def kill_half_way_and_resume(url: str, tmp: Path, n: int, sig: signal.Signals) -> dict[str, float]:
    """Run `cotap embed` on n images (one corrupt), stop it with `sig` once about half are written,
    run it again, and check the outcome. Returns timings and counts."""
    src, dst = tmp / "src", tmp / "out"
    image_folder(src, n, corrupt=(n // 3,))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    first = subprocess.Popen(
        embed_cmd(src, dst, url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    while len(outputs(dst)) < n // 2:
        assert first.poll() is None, first.communicate()[1].decode()[-2000:]
        assert time.monotonic() - t0 < 300, "too slow"
        time.sleep(0.01)
    first.send_signal(sig)
    _, err1 = first.communicate(timeout=60)
    t_first = time.monotonic() - t0
    time.sleep(0.5)  # let the server finish whatever the killed client had in flight
    kept = outputs(dst)
    assert n // 2 <= len(kept) < n - 1, f"{len(kept)} written before the stop: not half way"
    ran_before = metric(url, "cotap_images_total")

    t1 = time.monotonic()
    second = subprocess.run(embed_cmd(src, dst, url), capture_output=True, env=env, timeout=600)
    t_second = time.monotonic() - t1
    err2 = second.stderr.decode()
    ran = metric(url, "cotap_images_total") - ran_before

    assert second.returncode == 1, err2[-2000:]  # one image failed
    final = outputs(dst)
    assert len(final) == n - 1
    assert all(final[p] == m for p, m in kept.items()), "a finished file was written again"
    assert ran == n - 1 - len(kept), f"the server ran {ran} images; {n - 1 - len(kept)} were missing"
    assert f"{n}/{n}" in err2 and "img" in err2  # the progress bar reached the end
    bad = f"img{n // 3:04d}.jpg"
    assert "1 failed" in err2 and bad in err2
    listed = json.loads((dst / "failures.json").read_text())
    assert listed["count"] == 1 and listed["failures"][0]["path"].endswith(bad)
    assert len(list(read_features(dst))) == n - 1
    if sig == signal.SIGINT:
        assert first.returncode == 130 and "interrupted" in err1.decode()
    else:
        assert first.returncode == -signal.SIGKILL
    return {
        "first_s": t_first,
        "second_s": t_second,
        "kept": len(kept),
        "redone_by_server": ran,
    }


def test_embed_killed_and_resumed(slow_server: str, tmp_path: Path) -> None:
    r = kill_half_way_and_resume(slow_server, tmp_path, 60, signal.SIGKILL)
    print(f"SIGKILL at {r['kept']}/60; rest in {r['second_s']:.1f} s")


def test_embed_interrupted_with_ctrl_c_and_resumed(slow_server: str, tmp_path: Path) -> None:
    kill_half_way_and_resume(slow_server, tmp_path, 40, signal.SIGINT)


@pytest.mark.slow
def test_embed_500_images_killed_and_resumed(slow_server: str, tmp_path: Path) -> None:
    r = kill_half_way_and_resume(slow_server, tmp_path, 500, signal.SIGKILL)
    print(
        f"500 images: killed after {r['first_s']:.1f} s with {r['kept']} written; the rerun ran "
        f"{r['redone_by_server']:.0f} images in {r['second_s']:.1f} s"
    )


def test_prototypes_and_correspond_commands_plot(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(photo(64, 80, seed=1)).save(a)
    Image.fromarray(photo(64, 80, seed=1)[:, ::-1]).save(b)
    url = ["--url", server_url]
    assert (
        main(
            ["prototypes", str(a), "--plot", str(tmp_path / "p.png"), "--save", str(tmp_path / "p.st"), *url]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "grid 4x4" in out and "prototype" in out and "plot written" in out
    assert Image.open(tmp_path / "p.png").size[0] >= 256
    assert main(["correspond", str(a), str(b), "--plot", str(tmp_path / "c.png"), *url]) == 0
    out = capsys.readouterr().out
    assert "mutual matches" in out or "no mutual matches" in out
    assert Image.open(tmp_path / "c.png").size[1] == 384 + 24
    assert main(["prototypes", str(tmp_path / "missing.png"), *url]) == 2


def test_models_and_health_commands(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--url", server_url]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "varied" in out and "limits:" in out
    assert main(["models", "--json", "--url", server_url]) == 0
    assert json.loads(capsys.readouterr().out)["default"] == "tiny"
    assert main(["health", "--url", server_url]) == 0
    assert "ready" in capsys.readouterr().out
    assert main(["health", "--url", "http://127.0.0.1:9"]) == 1
    assert main(["models", "--url", "http://127.0.0.1:9", "--timeout", "2"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_health_is_a_probe_that_can_wait(capsys: pytest.CaptureFixture[str]) -> None:
    """A server that accepts and never answers is not ready after 5 s (not the 120 s of a request);
    `--wait` asks again until its time is up."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        t0 = time.monotonic()
        assert main(["health", "--url", f"http://127.0.0.1:{silent.getsockname()[1]}"]) == 1
        assert 4.5 < time.monotonic() - t0 < 9
    assert "unreachable" in capsys.readouterr().out
    t0 = time.monotonic()
    assert main(["health", "--url", "http://127.0.0.1:9", "--wait", "1"]) == 1
    assert 0.4 < time.monotonic() - t0 < 4
    assert "could not be reached within 1 s" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: "must be a positive number"
        main(["health", "--url", "http://127.0.0.1:9", "--timeout", "0"])


def test_embed_command_reports_bad_arguments(server_url: str, tmp_path: Path) -> None:
    assert main(["embed", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--url", server_url]) == 2
    (tmp_path / "src").mkdir()
    code = main(
        ["embed", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--outputs", "x", "--url", server_url]
    )
    assert code == 2


def test_a_closed_pipe_ends_the_command_quietly(server_url: str, tmp_path: Path) -> None:
    """`cotap prototypes photo.jpg | head -1`: once the reader has gone, no traceback, exit 0."""
    a = tmp_path / "a.png"
    Image.fromarray(photo(64, 80, seed=1)).save(a)
    cmd = [sys.executable, "-m", "cotap.cli.main", "prototypes", str(a), "--url", server_url]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as usual
    try:
        done = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, timeout=120, env=env)
    finally:
        os.close(write)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import cotap.cli.main as cli_main

    def fails(args: object) -> int:
        raise BrokenPipeError("a subprocess went away")

    class Parser:
        def parse_args(self, argv: object) -> argparse.Namespace:
            return argparse.Namespace(func=fails)

    monkeypatch.setattr(cli_main, "build_parser", Parser)
    with pytest.raises(BrokenPipeError, match="subprocess"):
        cli_main.main(["models"])  # stdout (pytest's capture) is fine: the error is not swallowed


def test_plot_and_save_paths_and_alpha(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors import safe_open

    a = tmp_path / "a.png"
    Image.fromarray(photo(64, 80, seed=1)).save(a)
    url = ["--url", server_url]
    # a plot in the format its extension names
    assert main(["prototypes", str(a), "--plot", str(tmp_path / "p.jpg"), *url]) == 0
    assert Image.open(tmp_path / "p.jpg").format == "JPEG"
    assert main(["correspond", str(a), str(a), "--plot", str(tmp_path / "c.webp"), *url]) == 0
    assert Image.open(tmp_path / "c.webp").format == "WEBP"
    capsys.readouterr()
    assert main(["prototypes", str(a), "--plot", str(tmp_path / "p.xyz"), *url]) == 2
    assert "extension '.xyz'" in capsys.readouterr().err
    # places that cannot be written: a clear error, no traceback
    for argv in (
        ["prototypes", str(a), "--plot", "/proc/cotap-test.png"],
        ["prototypes", str(a), "--save", "/proc/cotap-test.st"],
        ["correspond", str(a), str(a), "--save", "/proc/nope/cotap-test.st"],
        ["correspond", str(a), str(a), "--plot", "/proc/cotap-test.png"],
    ):
        assert main([*argv, *url]) == 2, argv
        err = capsys.readouterr().err
        assert "cannot write the" in err and "/proc/" in err, err
    # --alpha must be an opacity
    for bad in ("2", "-0.1", "half"):
        with pytest.raises(SystemExit) as e:
            main(["prototypes", str(a), "--alpha", bad, *url])
        assert e.value.code == 2
        assert "--alpha" in capsys.readouterr().err
    # --save metadata as the server and the feature store write theirs: strings unquoted
    assert main(["prototypes", str(a), "--save", str(tmp_path / "p.st"), *url]) == 0
    assert main(["correspond", str(a), str(a), "--save", str(tmp_path / "c.st"), *url]) == 0
    with safe_open(str(tmp_path / "p.st"), "numpy") as f:
        meta = f.metadata()
    assert meta["model"] == "tiny" and meta["grid"] == "[4,4]" and len(meta["bundle_sha256"]) == 64
    with safe_open(str(tmp_path / "c.st"), "numpy") as f:
        meta = f.metadata()
        assert f.get_tensor("match").shape == (4, 4)
    assert meta["model"] == "tiny" and json.loads(meta["source_grid"]) == [4, 4]


def test_client_commands_refuse_a_wrong_url(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--url", server_url + "/api"]) == 2
    err = capsys.readouterr().err
    assert f"{server_url}/api/v1/models answered 404" in err and "does not look like a cotap server" in err
