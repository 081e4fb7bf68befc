"""`miner tournament-check`: what a validator checks before it enrols our repository, run here.

G.O.D (validator/tournament/github_validation.py, trainer/host.py, trainer/runtime.py; read for
gradients-protocol.md §13): the commit must be a full 40-hex SHA reachable from a pushed branch
or tag; the default branch's root must hold a LICENSE(.md) and a NOTICE equal to the validator's
own, line by line with trailing spaces ignored; an obfuscation detector (a closed binary: we check
what its older open version looked for) runs on the commit; the image is built from
`ops/docker/standalone-text-trainer.dockerfile` (else `dockerfiles/...`) with the repository as
context. We ship no third-party text: `--fix` copies the validator's LICENSE.md and NOTICE from a
G.O.D checkout or URL the operator names.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

LICENSE_NAMES = ("LICENSE.md", "LICENSE", "license.md", "license", "License.md", "License")
NOTICE_NAMES = ("NOTICE", "NOTICE.txt", "notice.txt", "Notice.txt", "notice", "Notice")
DOCKERFILES = ("ops/docker/standalone-text-trainer.dockerfile", "dockerfiles/standalone-text-trainer.dockerfile")
ENTRYPOINT_MODULE = "trainers.tournament"
# What the detector's open predecessor flagged: encoded/packed payloads and compiled code.
SUSPICIOUS_SUFFIXES = (".b64", ".base64", ".enc", ".encrypted", ".obf", ".obfuscated", ".pyc", ".pyo", ".so",
                       ".dll", ".exe", ".bin", ".pt", ".pth", ".safetensors", ".whl", ".egg")
SUSPICIOUS_NAMES = ("payload", "exploit", "malware", "virus")
MAX_PY_LINE = 500


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def normalized(text: str) -> str:
    """The validator's comparison: lines with trailing spaces removed (a BOM or an extra
    trailing blank line still differ)."""
    return "\n".join(line.rstrip() for line in text.splitlines())


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)


def _show(repo: Path, rev: str, path: str) -> str | None:
    out = _git(repo, "show", f"{rev}:{path}")
    return out.stdout if out.returncode == 0 else None


def _tree(repo: Path, rev: str) -> set[str]:
    out = _git(repo, "ls-tree", "-r", "--name-only", rev)
    return set(out.stdout.splitlines()) if out.returncode == 0 else set()


def expected_files(validator_repo: Path) -> tuple[Path | None, Path | None]:
    """The validator's own LICENSE (LICENSE.md first) and NOTICE, as it picks them."""
    lic = next((validator_repo / n for n in ("LICENSE.md", "LICENSE") if (validator_repo / n).is_file()), None)
    notice = next((validator_repo / n for n in NOTICE_NAMES if (validator_repo / n).is_file()), None)
    return lic, notice


def check_legal_files(repo: Path, rev: str, validator_repo: Path | None) -> list[Check]:
    """LICENSE and NOTICE at `rev` (the default branch: the validator clones it, not our commit)."""
    if validator_repo is None:
        return [Check("license+notice", False, "cannot compare: give --validator-repo (a G.O.D checkout or git URL)")]
    tree = _tree(repo, rev)
    checks = []
    for kind, names, expected in (("license", LICENSE_NAMES, expected_files(validator_repo)[0]),
                                  ("notice", NOTICE_NAMES, expected_files(validator_repo)[1])):
        ours = next((n for n in names if n in tree), None)
        if expected is None:
            checks.append(Check(kind, True, f"the validator repository has no {kind} file: not checked"))
        elif ours is None:
            checks.append(Check(kind, False, f"no {'/'.join(names[:2])} at the root of {rev} (run with --fix)"))
        elif normalized(_show(repo, rev, ours) or "") != normalized(expected.read_text(encoding="utf-8")):
            checks.append(Check(kind, False, f"{ours} at {rev} differs from the validator's {expected.name} (--fix)"))
        else:
            checks.append(Check(kind, True, f"{ours} at {rev} equals the validator's {expected.name}"))
    return checks


def check_commit(repo: Path, commit: str) -> Check:
    if not re.fullmatch(r"[0-9a-fA-F]{40}", commit):
        return Check("commit", False, f"{commit!r} is not a full 40-hex SHA (validators refuse it)")
    if _git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        return Check("commit", False, f"{commit} is not a commit of this repository")
    refs = (_git(repo, "branch", "-r", "--contains", commit).stdout.split()
            + _git(repo, "tag", "--contains", commit).stdout.split())
    if not refs:
        return Check("commit", False, f"{commit[:12]} is on no remote branch or tag: push it (validators clone "
                                      f"the repository and check the commit out)")
    return Check("commit", True, f"{commit[:12]} is pushed (on {refs[0]})")


def check_dockerfile(repo: Path, commit: str) -> tuple[Check, str | None]:
    tree = _tree(repo, commit)
    path = next((p for p in DOCKERFILES if p in tree), None)
    if path is None:
        return Check("dockerfile", False, f"none of {', '.join(DOCKERFILES)} at {commit[:12]}"), None
    text = _show(repo, commit, path) or ""
    if ENTRYPOINT_MODULE not in text:
        return Check("dockerfile", False, f"{path} does not run `python -m {ENTRYPOINT_MODULE}`"), text
    return Check("dockerfile", True, f"{path} (the validator builds the first of {', '.join(DOCKERFILES)})"), text


def check_build_context(repo: Path, commit: str, dockerfile: str | None) -> Check:
    """Every COPY source of the dockerfile is in the commit and not dropped by .dockerignore."""
    if dockerfile is None:
        return Check("build context", False, "no dockerfile to read")
    tree = _tree(repo, commit)
    ignored = [p.strip().rstrip("/") for p in (_show(repo, commit, ".dockerignore") or "").splitlines()
               if p.strip() and not p.startswith("#")]
    missing = []
    for line in dockerfile.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD") or any(w.startswith("--from") for w in words):
            continue
        for src in (w for w in words[1:-1] if not w.startswith("--")):
            src = src.rstrip("/").lstrip("./")
            present = src in tree or any(p.startswith(src + "/") for p in tree) or src in ("", ".")
            if not present or any(src == i or src.startswith(i + "/") for i in ignored):
                missing.append(src)
    if missing:
        return Check("build context", False, f"COPY sources missing from {commit[:12]} or .dockerignored: {missing}")
    return Check("build context", True, "every COPY source is in the commit")


def check_obfuscation(repo: Path, commit: str) -> Check:
    found = []
    for path in sorted(_tree(repo, commit)):
        name = path.rsplit("/", 1)[-1].lower()
        if name.endswith(SUSPICIOUS_SUFFIXES) or any(s in name for s in SUSPICIOUS_NAMES):
            found.append(f"{path} (file type)")
        elif path.endswith(".py"):
            text = _show(repo, commit, path) or ""
            if "\0" in text or any(len(line) > MAX_PY_LINE for line in text.splitlines()):
                found.append(f"{path} (binary or a line over {MAX_PY_LINE} characters)")
    if found:
        return Check("obfuscation", False, "the detector may reject: " + "; ".join(found[:8]))
    return Check("obfuscation", True, "no binaries, encoded payloads or packed lines")


def default_branch(repo: Path) -> str:
    out = _git(repo, "symbolic-ref", "--short", "refs/remotes/origin/HEAD")
    return out.stdout.strip() if out.returncode == 0 else "HEAD"


def run_checks(repo: Path, commit: str | None, validator_repo: Path | None) -> list[Check]:
    commit = commit or _git(repo, "rev-parse", "HEAD").stdout.strip()
    dockerfile_check, dockerfile = check_dockerfile(repo, commit)
    return [check_commit(repo, commit), *check_legal_files(repo, default_branch(repo), validator_repo),
            dockerfile_check, check_build_context(repo, commit, dockerfile), check_obfuscation(repo, commit)]


def validator_checkout(source: str) -> tuple[Path, Path | None]:
    """(a G.O.D checkout, a temporary folder to remove): a local path as is, a URL cloned (--depth 1)."""
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser(), None
    tmp = Path(tempfile.mkdtemp(prefix="god-"))
    out = subprocess.run(["git", "clone", "--depth", "1", source, str(tmp / "repo")], capture_output=True, text=True)
    if out.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"cannot clone {source}: {out.stderr.strip()[-300:]}")
    return tmp / "repo", tmp


def fix_legal_files(repo: Path, validator_repo: Path) -> list[str]:
    """Copies the validator's LICENSE(.md) and NOTICE to our root, under the names it reads first."""
    lic, notice = expected_files(validator_repo)
    written = []
    for source in (lic, notice):
        if source is not None:
            shutil.copyfile(source, repo / source.name)
            written.append(source.name)
    return written
