"""The OpenMP wait defaults the `shoal` command sets before torch loads (core/openmp.py)."""
from __future__ import annotations

import os
import subprocess
import sys

from shoal.core.openmp import SPIN_ROUNDS, set_openmp_defaults


def test_a_short_spin_unless_the_user_chose_a_policy_or_a_count():
    env: dict[str, str] = {}
    set_openmp_defaults(env)
    assert env == {"GOMP_SPINCOUNT": SPIN_ROUNDS}
    chose_policy = {"OMP_WAIT_POLICY": "ACTIVE"}
    set_openmp_defaults(chose_policy)
    assert chose_policy == {"OMP_WAIT_POLICY": "ACTIVE"}   # a spin count would override it
    chose_count = {"GOMP_SPINCOUNT": "0"}
    set_openmp_defaults(chose_count)
    assert chose_count == {"GOMP_SPINCOUNT": "0"}


def test_the_shoal_command_sets_it_before_torch_loads():
    """main() applies the default first thing; torch is not imported by then."""
    code = ("import os, sys\n"
            "from shoal.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == f"{SPIN_ROUNDS} False"
