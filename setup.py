"""Build the Cython kernels: src_c/<name>.pyx -> fastnet._c.<name> (auth: fastnet/_pure/auth.py).

Every kernel is compiled; a compiler or Cython failure stops the install
loudly instead of leaving a package that silently runs the pure twins.
"""
import glob
import os

from setuptools import Extension, setup
from Cython.Build import cythonize

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    exts = []
    # auth gains nothing from static types (hashlib and hmac do its work), so it
    # is compiled from its one source, the pure twin, in Cython's pure-Python mode
    sources = sorted(glob.glob(os.path.join("src_c", "*.pyx"))) + [os.path.join("fastnet", "_pure", "auth.py")]
    for pyx in sources:
        name = os.path.splitext(os.path.basename(pyx))[0]
        exts.append(
            Extension(
                "fastnet._c." + name,
                [pyx],
                extra_compile_args=["-O3", "-fno-strict-aliasing"],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            )
        )
    return cythonize(
        exts,
        include_path=["src_c"],
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    )


setup(ext_modules=extensions())
