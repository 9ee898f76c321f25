"""python -m pocketlm.kernels [--all]: build the CPU kernels for this CPU's best target now (scripts/setup runs
this), or every target it runs (--all: what the tests use), and say which."""

import sys

from pocketlm import kernels
from pocketlm.errors import PocketLMError

try:
    if kernels.library() is None:
        print(f"pocketlm kernels: not available ({kernels.why_unavailable}); aten's kernels will be used", file=sys.stderr)
    else:
        print(f"pocketlm kernels: {kernels.describe()}")
    if "--all" in sys.argv[1:]:
        for target in kernels.runnable_targets():
            print(f"pocketlm kernels: built {target.name}: {kernels.build(target)}")
except (PocketLMError, OSError) as e:
    sys.exit(f"pocketlm kernels: {e}")
