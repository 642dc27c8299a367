"""Everything is in pyproject.toml; this file only closes one setuptools gap.

setuptools' editable installs (`pip install -e .`) skip `data-files`: `editable_wheel` asks the
distribution for `has_data()`, which does not exist (the method is `has_data_files()`). Without the
data file the Jupyter Server extension is not enabled after an editable install; with this alias it is,
as it is after a regular install.
"""

from setuptools import setup
from setuptools.dist import Distribution


class _Distribution(Distribution):
    def has_data(self) -> bool:
        return self.has_data_files()


setup(distclass=_Distribution)
