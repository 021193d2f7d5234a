"""The one build step pyproject.toml cannot declare: the wheel carries the built-in experiments.

experiments/ stays at the top of the repository, outside the package, so build_py copies its
*.toml files (and the Python modules an experiment names, e.g. custom_backbone.py) into the built
package as flowers/_builtin/experiments, where flowers.paths.builtin_experiments() finds them after
a non-editable install. An editable install reads experiments/ of the checkout instead.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE = Path(__file__).resolve().parent / "experiments"
SHIPPED = ("*.toml", "*.py")  # experiments/runs/ and other folders stay out


class BuildPyWithExperiments(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        files = sorted(f for pattern in SHIPPED for f in SOURCE.glob(pattern))
        if not any(f.suffix == ".toml" for f in files):
            raise SystemExit(f"no experiments to ship in {SOURCE} (an sdist needs MANIFEST.in)")
        target = Path(self.build_lib) / "flowers" / "_builtin" / "experiments"
        shutil.rmtree(target, ignore_errors=True)  # no stale experiment from an earlier build
        target.mkdir(parents=True)
        for file in files:
            shutil.copy2(file, target / file.name)


setup(cmdclass={"build_py": BuildPyWithExperiments})
