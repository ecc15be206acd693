"""Build script. The package is pure Python; compiled kernels are optional."""
from setuptools import setup

setup()
