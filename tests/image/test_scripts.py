"""scripts/image says plainly what is wrong when it cannot build."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.conftest import IMAGE_SCRIPT, REPO

NOBODY = 65534


@pytest.fixture
def scripts_copy() -> Iterator[Path]:
    """scripts/image and scripts/image-tools in a folder any user may read."""
    root = Path(tempfile.mkdtemp(prefix="tether-image-scripts-"))
    try:
        (root / "scripts").mkdir()
        for name in ("image", "image-tools"):
            shutil.copy2(REPO / "scripts" / name, root / "scripts" / name)
        shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
        for path in (root, root / "scripts"):
            path.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root)


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload,no-any-return]


def test_an_unknown_command_or_option_is_named() -> None:
    result = _run([str(IMAGE_SCRIPT), "bake"])
    assert result.returncode == 1
    assert "image: unknown command bake (build, podman, env, help)" in result.stderr
    result = _run([str(IMAGE_SCRIPT), "build", "--colour", "red"])
    assert result.returncode == 1
    assert "image: unknown option --colour" in result.stderr


def _as_nobody(*argv: str) -> list[str]:
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) runs the script as another user"
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def test_building_as_another_user_than_root_says_it_needs_root(scripts_copy: Path) -> None:
    # The tools are there (installed as root, as the image tier does), the user is not root.
    assert _run([str(REPO / "scripts" / "image-tools")]).returncode == 0
    env = {"PATH": os.environ["PATH"], "HOME": str(scripts_copy)}
    result = _run(_as_nobody(str(scripts_copy / "scripts" / "image")), env=env)
    assert result.returncode == 1, result.stderr
    assert "needs root" in result.stderr


def test_missing_tools_without_root_are_named_with_how_to_install_them(scripts_copy: Path) -> None:
    # A PATH with bash and the few commands the scripts use, without buildah, podman or debootstrap.
    bin_dir = scripts_copy / "bin"
    bin_dir.mkdir()
    bin_dir.chmod(0o755)
    for tool in ("bash", "sed", "head", "id", "dirname", "cat", "env", "mkdir"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "HOME": str(scripts_copy)}
    result = _run(_as_nobody(str(bin_dir / "bash"), str(scripts_copy / "scripts" / "image")), env=env)
    assert result.returncode == 1, result.stderr
    assert "missing buildah podman runc debootstrap" in result.stderr
    assert "install them as root with apt-get" in result.stderr
    assert "cannot build without buildah podman runc debootstrap" in result.stderr
