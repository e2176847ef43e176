"""The documentation builds: MkDocs in strict mode, with no broken link or anchor and no page left out of the nav;
and the README, its front door, stays short and points at files that exist."""

import os
import re
import subprocess
import sys

import yaml

from tests.conftest import REPO

README = REPO / "README.md"
RELATIVE_LINK = re.compile(r"\]\((?!https?://|#)([^)#\s]+)(?:#[^)]*)?\)")


def mkdocs_build(config, site) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=config.parent, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_docs_build_in_strict_mode(tmp_path):
    build = mkdocs_build(REPO / "mkdocs.yml", tmp_path / "site")
    assert build.returncode == 0, build.stderr
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()  # generated from the schema
    assert "distill.lora" in (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text()


def test_a_broken_link_an_unknown_anchor_or_a_page_missing_from_the_nav_fails_the_build(tmp_path):
    validation = yaml.safe_load((REPO / "mkdocs.yml").read_text())["validation"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[gone](gone.md) and [no such part](index.md#nowhere)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the nav\n")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump({"site_name": "check", "nav": ["index.md"],
                                                         "validation": validation}))
    build = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert build.returncode != 0
    assert "not included in the \"nav\"" in build.stderr and "orphan.md" in build.stderr
    assert "contains a link 'gone.md', but the target is not found" in build.stderr
    assert "contains a link 'index.md#nowhere', but there is no such anchor" in build.stderr


def test_the_readme_is_a_front_door_of_at_most_250_lines():
    assert len(README.read_text().splitlines()) <= 250


def test_every_relative_link_of_the_readme_names_a_file_that_exists():
    targets = RELATIVE_LINK.findall(README.read_text())
    assert "docs/getting-started.md" in targets
    assert [target for target in targets if not (REPO / target).exists()] == []
