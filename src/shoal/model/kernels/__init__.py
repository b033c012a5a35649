"""shoal's C++ CPU kernels (csrc/), built once per machine and chosen at run time."""
