"""python -m pocketlm.kernels: build the CPU kernels now (scripts/setup runs this) and say where they are."""

import sys

from pocketlm import kernels

if kernels.library() is None:
    print(f"pocketlm kernels: not available ({kernels.why_unavailable}); aten's kernels will be used", file=sys.stderr)
else:
    print(f"pocketlm kernels: {kernels.library_path()}")
