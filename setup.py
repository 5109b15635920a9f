"""Build of the Cython datapath only; all metadata lives in pyproject.toml."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent

extensions = [
    Extension(
        "conn25._fastpath",
        sources=["src/_fastpath/_fastpath.pyx"],
        extra_compile_args=["-O3"],
        # OpenSSL's libcrypto: ChaCha20-Poly1305 for WireGuard's transport messages (aead.pxi).
        libraries=["crypto"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        # src: the module's own declarations, conn25/_fastpath.pxd (found by the
        # module's name); src/_fastpath: the per-concern .pxd files it includes
        # and the includes/*.pxd they cimport. Absolute, since pip builds from a
        # copy of the tree in another directory.
        include_path=[str(HERE / "src"), str(HERE / "src" / "_fastpath")],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
