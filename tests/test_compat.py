"""Which SGLang releases the plugin runs on: the check at registration, and a start refused with one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sglang_ckpt_plugin.demo.launch import free_port, server_env
from sglang_ckpt_plugin.server import sglang_compat as sg
from sglang_ckpt_plugin.server.hooks import hook_table

from .conftest import communicate_or_dump


@pytest.mark.compat
def test_the_installed_release_has_every_target():
    assert sg.missing_names([t for t, _, _ in hook_table()] + list(sg.ACCESSED_NAMES)) == []
    assert sg.missing_names(["sglang.srt.server_args.ServerArgs.no_such_field"])[0][1].startswith("AttributeError")
    assert sg.release_problem([t for t, _, _ in hook_table()]) is None
    assert sg.sglang_version() in sg.TESTED_RELEASES


def test_a_missing_target_is_named_with_the_supported_range():
    problem = sg.release_problem(["sglang.srt.no_such_module.fn", "sglang.srt.managers.scheduler.Scheduler.nope"])
    assert problem is not None and "\n" not in problem
    assert f"does not support SGLang {sg.sglang_version()}: cannot resolve sglang.srt.no_such_module.fn" in problem
    assert "(AttributeError: module" in problem and "and 1 more" in problem
    assert "0.5.21" in problem and "0.5.23" in problem and "uninstall sglang-ckpt-plugin" in problem


def test_every_hook_target_is_checked():
    """The table hooks.py registers is the one the check resolves: no hook is added beside it."""
    import inspect

    from sglang_ckpt_plugin.server import hooks

    assert inspect.getsource(hooks).count("HookRegistry.register(") == 1
    assert len({target for target, _, _ in hook_table()}) == len(hook_table()) == 21


@pytest.mark.slow
@pytest.mark.compat
def test_server_on_a_release_without_a_target_refuses_to_start(llama_a, tmp_path):
    """A real launch_server: the plugin refuses before anything listens, exit code non-zero, one line."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tests.missing_target_server",
        "--model-path",
        str(llama_a),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-total-tokens",
        "4096",
        "--load-format",
        "dummy",
        "--wait-for-initial-weights",
    ]
    child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=server_env("cpu"), start_new_session=True
    )
    _, err = communicate_or_dump(child, 180, "the refused server")
    assert child.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("sglang-ckpt-plugin does not support SGLang")]
    assert len(lines) == 1, err[-3000:]
    assert "cannot resolve sglang.srt.managers.scheduler.Scheduler.no_such_hook (AttributeError" in lines[0]
    assert "tested: 0.5.21" in lines[0]
    assert "Uvicorn running" not in err and "Application startup complete" not in err


@pytest.mark.slow
def test_the_package_builds_without_warnings_and_with_an_spdx_license(tmp_path):
    """What `pip install sglang-ckpt-plugin` builds: no deprecation warnings of ours, License-Expression set."""
    import shutil
    import zipfile
    from pathlib import Path

    root, src = Path(__file__).parents[1], tmp_path / "src"  # a copy: setuptools writes build/ beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, src / name)
    shutil.copytree(
        root / "sglang_ckpt_plugin", src / "sglang_ckpt_plugin", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = "\n".join(line for line in (out.stdout + out.stderr).splitlines() if "Location 'file:" not in line)
    assert "Deprecat" not in text and "SetuptoolsWarning" not in text, text[-4000:]
    (wheel,) = tmp_path.glob("sglang_ckpt_plugin-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith("METADATA"))).decode()
        assert any(n.endswith("licenses/LICENSE") for n in zf.namelist())
    assert "License-Expression: Apache-2.0" in meta and "Requires-Dist: sglang>=0.5.21" in meta
