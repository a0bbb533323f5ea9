"""Package layout: the repo's top-level folders install under collision-safe import names.

    flaxdet/     -> flaxdet             (the JAX package)
    reference/   -> flaxdet_reference   (PyTorch mirror of visdet, the parity oracle)
    converters/  -> flaxdet_converters  (checkpoint I/O and visdet <-> Flax conversion)
"""
from setuptools import find_packages, setup

ROOTS = {"flaxdet": "flaxdet", "flaxdet_reference": "reference", "flaxdet_converters": "converters"}
packages, package_dir = [], {}
for name, folder in ROOTS.items():
    package_dir[name] = folder
    packages += [name] + [f"{name}.{p}" for p in find_packages(folder)]

setup(packages=packages, package_dir=package_dir, package_data={"flaxdet": ["presets/*.yaml"]})
