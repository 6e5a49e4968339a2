"""Pure-Python twins of the compiled kernels in fastnet._c (same names, same behaviour)."""
