# Copyright (c) boat-mm contributors. All rights reserved.
"""Two processes of a gloo group, the CPU's stand-in for two GPUs of a
distributed run, for the tests that check what differs (or must not)
between the processes of a run."""
import subprocess
import sys
from pathlib import Path


def run_gloo_pair(script: str, tmp_path: Path, *args: str) -> None:
    """Run the Python code ``script`` in two processes at once, each with
    ``argv`` = its rank, the file store of their group, ``args``; fail
    with the output of a process that fails.

    Args:
        script (str): Python code; it starts the group itself
            (``init_method='file://' + sys.argv[2]``, ``world_size=2``).
        tmp_path (Path): A folder for the script and the store.
        *args (str): More arguments of both processes.
    """
    # (Not gloo_pair.py: its folder comes first on the script's sys.path.)
    path = tmp_path / 'gloo_pair_process.py'
    path.write_text(script)
    store = str(tmp_path / 'gloo_store')
    procs = [
        subprocess.Popen(
            [sys.executable,
             str(path), str(rank), store, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True) for rank in range(2)
    ]
    for proc in procs:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
