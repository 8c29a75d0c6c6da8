"""What `import fanin` does to the process: thread-wait policies (a user's own settings win)."""
import os
import subprocess
import sys

SHOW = "import os, fanin; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"


def run(**env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "FANIN_MALLOC_TUNING")}
    out = subprocess.run([sys.executable, "-c", SHOW], env={**base, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_sets_short_thread_waits():
    assert run() == ["3000", "16"]


def test_user_settings_win():
    assert run(OPENBLAS_THREAD_TIMEOUT="20", GOMP_SPINCOUNT="10") == ["10", "20"]
    assert run(OMP_WAIT_POLICY="PASSIVE") == ["None", "16"]


def test_malloc_tuning_can_be_switched_off():
    assert run(FANIN_MALLOC_TUNING="0") == ["3000", "16"]  # imports cleanly either way
