"""The package surface: light import, public names, the CLI dispatcher."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dispersive.cli import COMMANDS, main

HEAVY = ("matplotlib", "torchmetrics", "tensorboard", "diffusers", "torchvision", "scipy")


def test_import_is_light():
    # `import dispersive` must not pull in training, plotting or metrics libraries.
    code = (
        "import sys, dispersive; "
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import dispersive loaded heavy modules: {out.stdout}"


def test_public_names():
    import dispersive

    for name in dispersive.__all__:
        assert hasattr(dispersive, name), name


def test_cli_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_cli_unknown_command_names_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err


def test_every_command_module_has_the_interface():
    import importlib

    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(getattr(module, "add_arguments", None)), name
        assert callable(getattr(module, "run", None)), name


@pytest.mark.parametrize(
    "old, new",
    [
        ("dispersive.train.data", "dispersive.data.datasets"),
        ("dispersive.train.latents", "dispersive.data.latents"),
    ],
)
def test_moved_modules_keep_their_old_names(old, new, monkeypatch):
    import importlib

    module = importlib.import_module(new)
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=new):
        alias = importlib.import_module(old)
    assert module.__all__ and all(getattr(alias, n) is getattr(module, n) for n in module.__all__)


def test_python_m_dispersive_runs():
    out = subprocess.run(
        [sys.executable, "-m", "dispersive", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    import dispersive

    assert out.stdout.strip() == dispersive.__version__


def test_cli_main_puts_the_callers_signal_handlers_back(tmp_path, capsys):
    # main() turns SIGINT/SIGTERM into KeyboardInterrupt while a command runs; a program (or
    # the test suite) that calls main() must get its own handlers back, or a later SIGTERM
    # raises inside whatever it is doing (multiprocessing's exit handler, for one).
    import signal

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    sigint = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    try:
        assert main(["train", str(tmp_path / "missing.toml")]) == 2
        assert "missing.toml" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGTERM, before)
