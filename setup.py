"""Package discovery (metadata and dependencies are in setup.cfg): every package under
edge_vila/, and the toolchain folders the layout keeps at the top level installed as
subpackages of edge_vila, so nothing generic like `quant` lands on a user's import path."""
from setuptools import find_packages, setup

TOP_LEVEL = ("quant", "export", "jetson")  # folder -> edge_vila.<folder>

packages = find_packages(include=["edge_vila", "edge_vila.*"])
package_dir = {}
for folder in TOP_LEVEL:
    package_dir[f"edge_vila.{folder}"] = folder
    packages += [f"edge_vila.{folder}"] + [f"edge_vila.{folder}.{p}" for p in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
