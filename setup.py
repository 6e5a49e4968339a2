"""Build the Cython kernels: src_c/<name>.pyx -> fastnet._c.<name> (auth: fastnet/_pure/auth.py).

Every kernel is compiled; a compiler or Cython failure stops the install
loudly instead of leaving a package that silently runs the pure twins.
"""
import glob
import os

import setuptools
from setuptools import Extension, setup
from Cython.Build import cythonize

if int(setuptools.__version__.split(".")[0]) < 77:
    # pip's isolated build gets it from build-system.requires; a direct
    # `setup.py build_ext` uses the environment's own setuptools
    raise SystemExit(f"fastnet needs setuptools>=77 for its license metadata (PEP 639), "
                     f"not {setuptools.__version__}: python -m pip install 'setuptools>=77'")

HERE = os.path.dirname(os.path.abspath(__file__))


def _depends(name):
    """The files a kernel's C source is generated from besides its .pyx.

    cythonize follows include and cimport when it decides to regenerate the
    C file; as depends, setuptools' own out-of-date check of the extension
    (which otherwise sees only its C source) covers them too.
    """
    if name == "auth":
        # compiled from fastnet/_pure/auth.py; this declares its cdef class
        return [os.path.join("src_c", "fastnet", "_c", "auth.pxd")]
    parts = glob.glob(os.path.join("src_c", name + "_*.pxi"))
    shared = [os.path.join("src_c", f) for f in ("sockio.pxi", "syscalls.pxd", "framing.pxd")]
    # the module's own declarations: Cython finds a module's .pxd by its
    # full name, fastnet._c.<name>, hence the package path under src_c
    own = [os.path.join("src_c", name + ".pxd"), os.path.join("src_c", "fastnet", "_c", name + ".pxd")]
    return sorted(p for p in set(parts + shared + own) if os.path.exists(p))


def extensions():
    sources = sorted(glob.glob(os.path.join("src_c", "*.pyx")))
    if not sources:
        # an sdist or checkout without the kernel sources would otherwise
        # install a package whose import fails
        raise SystemExit(
            "fastnet: no kernel sources (src_c/*.pyx) next to setup.py in "
            f"{HERE}; the source tree is incomplete, refusing to build"
        )
    exts = []
    # auth is compiled from its one source, the pure twin, in Cython's
    # pure-Python mode: hashlib and hmac do the work of its functions, and an
    # augmenting .pxd (src_c/fastnet/_c/auth.pxd) types its handshake machine
    sources.append(os.path.join("fastnet", "_pure", "auth.py"))
    for pyx in sources:
        name = os.path.splitext(os.path.basename(pyx))[0]
        exts.append(
            Extension(
                "fastnet._c." + name,
                [pyx],
                depends=_depends(name),
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
