"""Registration: the one tournament route (signed, like every route) and `miner tournament-check`,
which runs the validator's pre-tournament checks (G.O.D validator/tournament/github_validation.py,
trainer/host.py, trainer/runtime.py) on a real git repository with a pushed remote."""
import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from cluster.console.cli import main as miner
from cluster.console.registration import normalized
from cluster.protocol.signing import signed_headers

REPO = Path(__file__).resolve().parents[1]
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
# Stand-ins for the validator's LICENSE.md and NOTICE (their real text is copied by --fix from G.O.D)
LICENSE_TEXT = "Example License\n\n  Version 2.0\n\nTERMS AND CONDITIONS\n"
NOTICE_TEXT = "Example-on-Demand\nCopyright 2025 Example LLC\n"


def _get(env, path):
    return env["client"].get(path, headers=signed_headers(env["validator"], env["miner"].ss58_address, b""))


def test_training_repo_answers_text_from_settings_and_refuses_other_tournaments(api_env):
    resp = _get(api_env, "/training_repo/text")
    assert resp.status_code == 200
    assert resp.json() == {"github_repo": "https://github.com/example/miner",
                           "commit_hash": "0123456789abcdef0123456789abcdef01234567"}
    for kind in ("image", "environment"):  # enrolled there, we would pay the fee and fail every task
        resp = _get(api_env, f"/training_repo/{kind}")
        assert resp.status_code == 404 and "text tournaments only" in resp.json()["detail"]
    assert _get(api_env, "/training_repo/audio").status_code == 422
    assert api_env["client"].get("/training_repo/text").status_code == 401  # unsigned


def test_training_repo_without_settings_answers_503_with_the_reason(api_env):
    control = api_env["control"]
    control.settings = dataclasses.replace(control.settings, training_repo=None, training_commit=None)
    resp = _get(api_env, "/training_repo/text")
    assert resp.status_code == 503 and "MINER_TRAINING_COMMIT" in resp.json()["detail"]


@pytest.mark.parametrize("commit", ["main", "0123abc", "0123456789abcdef0123456789abcdef0123456z"])
def test_serve_refuses_to_start_on_a_commit_validators_refuse(commit, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINER_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MINER_TRAINING_COMMIT", commit)
    assert miner(["serve", "--port", "1"]) == 2
    assert "40-hex" in capsys.readouterr().err


def _git(cwd, *args):
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True, env=GIT_ENV).stdout


@pytest.fixture()
def fork(tmp_path):
    """A clone of this repository with its own bare 'GitHub' remote, and a validator checkout."""
    remote, clone, validator = tmp_path / "remote.git", tmp_path / "fork", tmp_path / "god"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(REPO), str(remote)], check=True, env=GIT_ENV)
    subprocess.run(["git", "clone", "--quiet", str(remote), str(clone)], check=True, env=GIT_ENV)
    validator.mkdir()
    (validator / "LICENSE.md").write_text(LICENSE_TEXT)
    (validator / "NOTICE").write_text(NOTICE_TEXT)
    return clone, validator


def _check(clone, validator, *extra):
    return miner(["tournament-check", "--repo", str(clone), "--validator-repo", str(validator), *extra])


def test_tournament_check_fails_until_the_validators_files_are_committed_and_pushed(fork, capsys):
    clone, validator = fork
    assert _check(clone, validator) == 1
    out = capsys.readouterr().out
    assert "FAIL  license" in out and "FAIL  notice" in out and "PASS  commit" in out and "PASS  dockerfile" in out
    assert _check(clone, validator, "--fix") == 1  # written, not yet on the default branch
    assert (clone / "LICENSE.md").read_text() == LICENSE_TEXT and (clone / "NOTICE").read_text() == NOTICE_TEXT
    _git(clone, "add", "LICENSE.md", "NOTICE")
    _git(clone, "commit", "-q", "-m", "validator license files")
    capsys.readouterr()
    assert _check(clone, validator) == 1  # committed, not pushed: the commit cannot be checked out
    assert "is on no remote branch" in capsys.readouterr().out
    _git(clone, "push", "-q", "origin", "HEAD")
    assert _check(clone, validator) == 0, capsys.readouterr().out
    assert "0 failed" in capsys.readouterr().out


def test_tournament_check_finds_what_the_detector_and_the_build_would_reject(fork, capsys):
    clone, validator = fork
    _check(clone, validator, "--fix")
    (clone / "cluster" / "helper.cpython-311.pyc").write_bytes(b"\x00compiled")
    (clone / "ops" / "docker" / "standalone-text-trainer.dockerfile").write_text(
        "FROM python:3.12-slim\nCOPY missing_dir ./missing_dir\nENTRYPOINT [\"python\", \"-m\", \"trainers.tournament\"]\n")
    _git(clone, "add", "-A", "-f")
    _git(clone, "commit", "-q", "-m", "bad")
    _git(clone, "push", "-q", "origin", "HEAD")
    assert _check(clone, validator) == 1
    out = capsys.readouterr().out
    assert "FAIL  obfuscation" in out and ".pyc" in out and "FAIL  build context" in out and "missing_dir" in out
    assert "PASS  license" in out and "PASS  commit" in out


def test_license_comparison_is_the_validators():
    """Trailing spaces and line endings are ignored; a BOM, indentation or an extra blank line are not."""
    assert normalized("a  \r\nb\t\n") == normalized("a\nb")
    assert normalized("a\n\n") != normalized("a\n")
    assert normalized("\ufeffa") != normalized("a") and normalized(" a") != normalized("a")
