"""settings: every value checked in one place, one line per error, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from settings import SETTINGS, Setting, SettingError, load, parse_bool, parse_pairs


def errors(capsys: pytest.CaptureFixture[str], names: list[str] | None = None, argv: list[str] | None = None,
           environ: dict[str, str] | None = None) -> list[str]:
    """The stderr lines of a load() that must fail with exit code 2."""
    with pytest.raises(SystemExit) as exited:
        load(names, argv or [], environ or {}, prog="cmd")
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err.splitlines()


def test_every_default_passes_its_own_checks() -> None:
    """A row added with a default its own bounds refuse would break every command at start."""
    for setting in SETTINGS:
        setting.parse(setting.default)


def test_the_positional_form_stays_valid_and_the_checks_are_optional_keywords() -> None:
    plain = Setting("SOME_COUNT", "3", "A count.", int)
    assert plain.parse("-7") == -7 and plain.flag == "--some-count" and plain.attr == "some_count"
    bounded = Setting("SOME_COUNT", "3", "A count.", int, low=1, high=9)
    with pytest.raises(SettingError, match=r"^SOME_COUNT='0': expected an integer from 1 to 9$"):
        bounded.parse("0")


@pytest.mark.parametrize(("raw", "value"), [(s, True) for s in ("true", "1", "yes", "on", "TRUE", " On ")]
                         + [(s, False) for s in ("false", "0", "no", "off", "False", "NO")])
def test_booleans_take_the_usual_spellings(raw: str, value: bool) -> None:
    assert parse_bool(raw) is value
    assert load(["WARMUP"], [], {"WARMUP": raw}).flag("warmup") is value


@pytest.mark.parametrize("raw", ["maybe", "", "2", "y", "enabled"])
def test_anything_else_is_not_a_boolean(raw: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert errors(capsys, ["PUBLIC_METRICS"], environ={"PUBLIC_METRICS": raw}) == [
        f"cmd: PUBLIC_METRICS={raw!r}: expected true or false (also 1/0, yes/no, on/off)"
    ]


def test_a_closed_choice_is_normalised_to_lower_case() -> None:
    assert load(["LOG_LEVEL"], ["--log-level", "DEBUG"], {}).log_level == "debug"


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"GATEWAY_PORT": "0"}, "GATEWAY_PORT='0': expected an integer from 1 to 65535"),
        ({"GATEWAY_PORT": "80.5"}, "GATEWAY_PORT='80.5': expected an integer from 1 to 65535"),
        ({"HEALTH_INTERVAL_S": "nan"}, "HEALTH_INTERVAL_S='nan': expected a number of at least 0.01"),
        ({"DRAIN_TIMEOUT_S": "-1"}, "DRAIN_TIMEOUT_S='-1': expected a number of at least 0"),
        ({"EXTPROC_PORT": "unix:"}, "EXTPROC_PORT='unix:': expected a port from 1 to 65535, or unix:/path"),
        ({"MODEL_NAME": " "}, "MODEL_NAME=' ': expected a non-empty value"),
        ({"EXTPROC_PORT": "unix:/" + "d" * 107},
         f"EXTPROC_PORT='unix:/{'d' * 107}': expected a unix socket path of at most 107 bytes"),
        ({"RESPONSES_WS_SOCKET": "/" + "d" * 107},
         f"RESPONSES_WS_SOCKET='/{'d' * 107}': expected a unix socket path of at most 107 bytes"),
        ({"SHIMMY_URL": "ftp://x"}, "SHIMMY_URL='ftp://x': expected an http:// or https:// URL, or nothing"),
        ({"MODEL_ALIASES": "a=b,c"}, "MODEL_ALIASES='a=b,c': expected name=value pairs separated by commas"),
        ({"SHIMMY_BACKEND": "docker"}, "SHIMMY_BACKEND='docker': expected auto, shimmy, emulator or external"),
    ],
)
def test_a_bad_value_names_the_setting_the_value_and_what_is_accepted(
    env: dict[str, str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert errors(capsys, environ=env) == [f"cmd: {line}"]


def test_every_bad_setting_is_reported_each_on_its_own_line(capsys: pytest.CaptureFixture[str]) -> None:
    lines = errors(capsys, argv=["--gateway-port", "x"], environ={"LOG_LEVEL": "loud", "GATEWAY_PORT": "8000"})
    assert lines == [
        "cmd: GATEWAY_PORT='x': expected an integer from 1 to 65535",  # the flag beats the environment
        "cmd: LOG_LEVEL='loud': expected debug, info, warning or error",
    ]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--gatway-port", "9000"], "cmd: unknown flag --gatway-port (did you mean --gateway-port?)"),
        (["--shimmy-prot=1"], "cmd: unknown flag --shimmy-prot (did you mean --shimmy-port?)"),
        (["--gateway-port", "1", "--zzz"], "cmd: unknown flag --zzz (see cmd --help)"),
        (["--gateway-port", "1", "stray"], "cmd: unexpected argument 'stray' (see cmd --help)"),
        (["--gateway"], "cmd: unknown flag --gateway (did you mean --gateway-port?)"),  # no abbreviations
        (["--log-level", "info", "--warmup", "on"],
         "cmd: --warmup: WARMUP is not a setting of cmd (see cmd --help)"),
        (["--gateway-port"], "cmd: argument --gateway-port: expected one argument (see cmd --help)"),
    ],
)
def test_an_unknown_flag_is_refused_with_the_closest_one(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert errors(capsys, ["GATEWAY_PORT", "SHIMMY_PORT", "LOG_LEVEL"], argv=argv) == [line]


def test_the_environment_for_children_round_trips() -> None:
    settings = load(argv=[], environ={"PUBLIC_METRICS": "off", "WARMUP": "yes", "HEALTH_INTERVAL_S": "0.5"})
    env = settings.env()
    assert (env["PUBLIC_METRICS"], env["WARMUP"], env["HEALTH_INTERVAL_S"]) == ("false", "true", "0.5")
    assert load(argv=[], environ=env) == settings


def test_parse_pairs_is_a_value_error_naming_the_setting() -> None:
    assert parse_pairs(" a = b ,c=d,", "X") == {"a": "b", "c": "d"}
    with pytest.raises(ValueError, match=r"^X='a': expected name=value pairs separated by commas, got 'a'$"):
        parse_pairs("a", "X")


@pytest.mark.parametrize("argv", [["shimmy-gateway", "--help"], ["shimmy-gateway", "up", "--help"],
                                  ["shimmy-gateway", "config", "--help"], ["shimmy-extproc", "--help"],
                                  ["shimmy-emulator", "--help"]], ids=" ".join)
def test_every_command_prints_its_help(argv: list[str]) -> None:
    """The installed commands, as a user runs them: every setting's help is printed, none crashes argparse.

    argparse %-formats each help text, so a help with a bare % ("95 %" of Envoy's heap) raised TypeError.
    """
    command = Path(sys.executable).with_name(argv[0])
    done = subprocess.run([str(command), *argv[1:]], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith(f"usage: {argv[0]}")
    if argv[0] == "shimmy-gateway":
        assert "past 95 % of it" in " ".join(done.stdout.split())
