"""Packaging beyond pyproject.toml (which holds the metadata): the package is found under ``src/``, and the
repository's top-level ``conf/`` (Hydra's yaml files) is shipped inside it as ``foodvision/conf``, so an
installed ``foodvision-train`` finds its config from any directory (:mod:`foodvision.config`)."""

from setuptools import find_namespace_packages, find_packages, setup

# conf/ and each of its group folders (conf/hydra/launcher, conf/experiment, ...) as data-only packages.
CONF_PACKAGES = ["foodvision.conf", *(f"foodvision.conf.{name}" for name in find_namespace_packages("conf"))]

setup(
    packages=[*find_packages("src"), *CONF_PACKAGES],
    package_dir={"": "src", "foodvision.conf": "conf"},
    package_data={name: ["*.yaml"] for name in CONF_PACKAGES},
)
