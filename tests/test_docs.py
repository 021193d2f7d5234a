"""The documentation site builds strictly: no broken link or anchor, no page left out of the nav.

Runs what `nox -s docs` runs (`mkdocs build --strict`) into a temporary folder, in a subprocess with
a hard timeout, then checks the two generated references hold what they are generated from.
"""

import os
import re
import subprocess
import sys

from conftest import PROJECT_ROOT
from flowers import config
from flowers.cli.main import cli


def test_the_docs_site_builds_strictly_with_both_references(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about its successor
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (f"mkdocs build --strict failed (pip install -e '.[docs]' for "
                                    f"mkdocs):\n{result.stderr[-4000:]}")
    settings = (site / "reference" / "settings.html").read_text()
    missing = [f"{section}.{field}" for section, cls in config.SECTIONS.items()
               for field in cls.__dataclass_fields__ if f"<code>{section}.{field}</code>" not in settings]
    assert not missing, f"the built settings reference lacks {missing}"
    headings = set(re.findall(r'<h[2-6][^>]*id="([^"]+)"', (site / "reference" / "cli.html").read_text()))
    commands = {f"flowers-{name}" for name in cli.commands}
    assert commands <= headings, f"the built CLI reference lacks {sorted(commands - headings)}"
    assert (site / "example-report" / "learning_curves.png").is_file()
