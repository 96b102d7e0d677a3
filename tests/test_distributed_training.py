"""The training stage under torchrun with 2 CPU processes (gloo): DDP logs the loss curve of one process on the same
global batch (`ddp_train_probe.py`). (FSDP is not tested: on CPU, transformers 5.23's Trainer with `fsdp="full_shard"`
still wraps the model in DistributedDataParallel.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


PROBE = Path(__file__).with_name("ddp_train_probe.py")
# Both runs see the same samples and decisions; only the order of floating-point sums differs (gradient all-reduce).
RELATIVE_TOLERANCE = 1e-5


def run_probe(tmp_path: Path, name: str, processes: int) -> dict:
    output = tmp_path / name / "losses.json"
    output.parent.mkdir()
    command = [sys.executable, str(PROBE), str(output)]
    if processes > 1:  # torchrun of this interpreter, whichever environment runs the tests
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command += [str(PROBE), str(output)]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return run_probe(tmp_path_factory.mktemp("single"), "single", 1)


def test_ddp_on_two_processes_gives_the_loss_curve_of_one(single_process, tmp_path):
    distributed = run_probe(tmp_path, "ddp", 2)
    assert distributed["world_size"] == 2 and distributed["wrapper"] == "DistributedDataParallel"
    assert len(distributed["losses"]) == len(single_process["losses"]) == 6
    for got, expected in zip(distributed["losses"], single_process["losses"]):
        assert got == pytest.approx(expected, rel=RELATIVE_TOLERANCE)
