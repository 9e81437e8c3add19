"""--print-config of both train scripts: every preset's resolved config printed as flags, which fed back without the
preset give the same config, and nothing is run or written."""
import dataclasses
import shlex

import pytest

import train_dit
import train_ldm
from conftest import TINY

CASES = [(m, p) for m in (train_dit, train_ldm) for p in (None, *m.PRESETS)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A 1-step DiT and LDM checkpoint: the frozen bases the ControlNet presets need (--init-from)."""
    root = tmp_path_factory.mktemp("bases")
    for module in (train_dit, train_ldm):
        assert module.main(TINY + ["--steps", "1", "--out", str(root / module.__name__)]) == 0
    return {m: str(root / m.__name__ / "last.pt") for m in (train_dit, train_ldm)}


def printed_words(text: str) -> list:
    """The words of a printed command: continuation lines joined, the trailing comment dropped."""
    return shlex.split(text.replace("\\\n", " "), comments=True)


@pytest.mark.parametrize("module,preset", CASES, ids=[f"{m.__name__}-{p or 'default'}" for m, p in CASES])
def test_print_config_round_trips_every_preset(module, preset, request, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                          # the default --out (runs/...) would appear here
    given = ["--preset", preset] if preset else []
    if preset and "controlnet" in preset:                # a ControlNet takes its architecture from its base
        given += ["--init-from", request.getfixturevalue("bases")[module]]
        capsys.readouterr()                              # the bases' training output
    assert module.main(given + ["--print-config"]) == 0
    text = capsys.readouterr().out
    words = printed_words(text)
    script = module.__name__ + ".py"
    assert words[:2] == ["python", script]
    assert module.configure(words[2:])[0] == module.configure(given)[0]
    named = {w[2:].split("=")[0] for w in text.split() if w.startswith("--")}
    for f in dataclasses.fields(module.FAMILY.config):         # every field shown, those equal to the default too
        flag = f.name.replace("_", "-")
        assert flag in named or "no-" + flag in named, flag
    assert module.main(words[2:] + ["--print-config"]) == 0
    assert capsys.readouterr().out == text              # a fixed point: printing the printed config changes nothing
    assert list(tmp_path.iterdir()) == []               # no run folder, no file


def test_print_config_shows_decided_auto_values_and_still_refuses_bad_input(tmp_path, capsys):
    assert train_dit.main(["--print-config", "--out", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    assert "--pixel-channels 32" in text and "--mlp-ratio 2.0" in text and "--token-conv" in text   # DiT-T's 'auto'
    assert "--corrupt-type symmetric" in text and "# not set, decided when the run starts: --compile" in text
    assert train_dit.main(["--print-config", "--corrupt", "1.5", "--out", str(tmp_path / "r")]) == 2
    assert "--corrupt must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
